//! Workload identity: the mesh CA, SPIFFE IDs and the short-lived workload
//! certificates the proxy presents and checks on HBONE.
//!
//! The CA is either generated into the agent's state directory on first
//! start (a dev box) or loaded from Istio's plug-in CA files (`ca-cert.pem`,
//! `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`) in a cluster. Workload
//! keys are made in memory and never written anywhere; the CA key file is
//! mode 0600. Certificates are issued per identity on first use and
//! re-issued when half their lifetime has passed: new handshakes take the
//! new one, established connections keep going on the old session.
//!
//! It does not decide who may talk to whom (that is policy) or carry bytes
//! (that is [`crate::proxy::inbound`]).

#![forbid(unsafe_code)]

pub mod csr;
pub mod istio_api;
pub mod remote;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use thiserror::Error;

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Istio's default workload certificate lifetime.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_hours(24);
/// The plug-in CA files, named as Istio's `cacerts` secret names them.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Where a generated CA lives under the state directory.
pub const GENERATED_CA_DIR: &str = "ca";

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("CA file {path}: {message}; {fix}")]
    CaFile { path: PathBuf, message: String, fix: &'static str },
    #[error(
        "CA key {key} does not match the certificate {cert}; put the key that belongs to that certificate in {key}"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("cannot write the mesh CA into {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot issue a certificate for {identity}: {message}")]
    Issue { identity: String, message: String },
    #[error("`{0}` is not a SPIFFE identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadSpiffeId(String),
}

/// A workload's identity, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, as
/// Istio writes it in the certificate's URI SAN.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

/// An optional identity as a log field: its SPIFFE ID, or nothing (written
/// straight into the log line, no string allocated per connection).
pub struct Principal<'a>(pub Option<&'a Identity>);

impl fmt::Display for Principal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(i) => fmt::Display::fmt(i, f),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Identity, IdentityError> {
        let bad = || IdentityError::BadSpiffeId(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

/// The SPIFFE identities in a certificate's URI SANs.
pub fn identities_in(cert: &CertificateDer<'_>) -> Vec<Identity> {
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.parse().ok(),
            _ => None,
        })
        .collect()
}

fn read_file(path: &Path, fix: &'static str) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|e| IdentityError::CaFile {
        path: path.to_path_buf(),
        message: e.to_string(),
        fix,
    })
}

fn parse_certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls::pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => {
            for cert in &c {
                if x509_parser::parse_x509_certificate(cert.as_ref()).is_err() {
                    return Err(IdentityError::CaFile {
                        path: path.to_path_buf(),
                        message: "a PEM block is not an X.509 certificate".into(),
                        fix: "replace it with the PEM certificate (-----BEGIN CERTIFICATE-----)",
                    });
                }
            }
            Ok(c)
        }
        Ok(_) => Err(IdentityError::CaFile {
            path: path.to_path_buf(),
            message: "no PEM certificate in it".into(),
            fix: "it must hold at least one -----BEGIN CERTIFICATE----- block",
        }),
        Err(e) => Err(IdentityError::CaFile {
            path: path.to_path_buf(),
            message: format!("not PEM: {e:?}"),
            fix: "it must hold PEM certificates",
        }),
    }
}

/// The mesh CA: signs workload certificates; its root is what every proxy
/// trusts.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate followed by its chain up to (not including) the
    /// root: sent after each workload certificate.
    chain: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    root_ders: Vec<CertificateDer<'static>>,
    pub trust_domain: String,
    /// Where it came from, for the start-up log.
    pub origin: String,
}

impl MeshCa {
    /// Istio's plug-in CA files in `dir`.
    pub fn load_plugin(dir: &Path, trust_domain: &str) -> Result<MeshCa, IdentityError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let cert_pem =
            read_file(&cert_path, "the plug-in CA needs ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem")?;
        let key_pem =
            read_file(&key_path, "the plug-in CA needs ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem")?;
        let root_pem =
            read_file(&root_path, "the plug-in CA needs ca-cert.pem, ca-key.pem, root-cert.pem and cert-chain.pem")?;
        let ca_cert = parse_certs(&cert_path, &cert_pem)?.remove(0);
        let roots_der = parse_certs(&root_path, &root_pem)?;
        // cert-chain.pem is the CA certificate followed by its intermediates
        // (Istio's layout); a missing one means a CA signed by the root.
        let chain = if chain_path.exists() {
            let text = read_file(&chain_path, "it must hold PEM certificates")?;
            parse_certs(&chain_path, &text)?.into_iter().filter(|c| !roots_der.contains(c)).collect()
        } else {
            vec![ca_cert.clone()]
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| IdentityError::CaFile {
            path: key_path.clone(),
            message: format!("not a PEM private key ({e})"),
            fix: "it must hold the CA's PKCS#8 private key (-----BEGIN PRIVATE KEY-----)",
        })?;
        let (_, x509) = x509_parser::parse_x509_certificate(ca_cert.as_ref()).map_err(|e| IdentityError::CaFile {
            path: cert_path.clone(),
            message: e.to_string(),
            fix: "it must hold the CA certificate in PEM",
        })?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(IdentityError::KeyMismatch { key: key_path, cert: cert_path });
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key).map_err(|e| IdentityError::CaFile {
            path: cert_path.clone(),
            message: e.to_string(),
            fix: "it must be a CA certificate",
        })?;
        let mut roots = RootCertStore::empty();
        for r in roots_der.clone() {
            roots.add(r).map_err(|e| IdentityError::CaFile {
                path: root_path.clone(),
                message: e.to_string(),
                fix: "it must hold the mesh's root certificate",
            })?;
        }
        Ok(MeshCa {
            issuer,
            chain,
            roots: Arc::new(roots),
            root_ders: roots_der,
            trust_domain: trust_domain.to_string(),
            origin: format!("plug-in CA files in {}", dir.display()),
        })
    }

    /// The CA in `state_dir/ca`, made there on first start.
    pub fn load_or_generate(state_dir: &Path, trust_domain: &str) -> Result<MeshCa, IdentityError> {
        let dir = state_dir.join(GENERATED_CA_DIR);
        if !dir.join(CA_KEY_FILE).exists() {
            write_self_signed_ca(&dir, trust_domain)?;
        }
        let mut ca = MeshCa::load_plugin(&dir, trust_domain)?;
        ca.origin = format!("generated CA in {}", dir.display());
        Ok(ca)
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots)
    }

    /// A new key and certificate for `id`, valid from a minute ago (clock
    /// skew between nodes) for `lifetime`.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        self.issue_between(id, now - Duration::from_mins(1), now + lifetime)
    }

    /// A certificate for `id` valid from `not_before` to `not_after`.
    pub fn issue_between(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, IdentityError> {
        let err = |m: String| IdentityError::Issue { identity: id.to_string(), message: m };
        let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let cert = workload_params(id, not_before, not_after)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        WorkloadCert::new(chain, &key, not_after).map_err(err)
    }

    /// Sign a checked CSR's key as `id` for `lifetime`: the chain in PEM,
    /// leaf first and the root last, as Istio's CA answers.
    pub fn sign_csr(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &Identity,
        lifetime: Duration,
    ) -> Result<Vec<String>, IdentityError> {
        let now = SystemTime::now();
        let cert = workload_params(id, now - Duration::from_mins(1), now + lifetime)?
            .signed_by(public_key, &self.issuer)
            .map_err(|e| IdentityError::Issue { identity: id.to_string(), message: e.to_string() })?;
        let mut pems = vec![cert.pem()];
        pems.extend(self.chain.iter().map(|c| der_to_pem(c)));
        let last = self.chain.last().unwrap_or_else(|| cert.der());
        pems.push(der_to_pem(self.root_of(last)));
        Ok(pems)
    }

    /// The root that issued `cert` (by subject; the first root if none
    /// matches, as during a rotation's overlap every root is sent anyway).
    fn root_of(&self, cert: &CertificateDer<'_>) -> &CertificateDer<'static> {
        let issuer = x509_parser::parse_x509_certificate(cert.as_ref()).map(|(_, c)| c.issuer().as_raw().to_vec());
        self.root_ders
            .iter()
            .find(|r| {
                let subject =
                    x509_parser::parse_x509_certificate(r.as_ref()).map(|(_, c)| c.subject().as_raw().to_vec());
                matches!((&issuer, subject), (Ok(i), Ok(s)) if *i == s)
            })
            .unwrap_or(&self.root_ders[0])
    }

    /// The mesh's root certificates in PEM (the bundle every agent trusts).
    pub fn root_bundle_pem(&self) -> String {
        self.root_ders.iter().map(|c| der_to_pem(c)).collect()
    }

    /// A server certificate for the CA's own TLS, for `dns_names`, signed
    /// by the mesh CA, with its key.
    pub fn serving_cert(&self, dns_names: &[String], lifetime: Duration) -> Result<Arc<CertifiedKey>, IdentityError> {
        let err = |m: String| IdentityError::Issue { identity: "the CA's serving certificate".into(), message: m };
        let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, dns_names.first().cloned().unwrap_or_default());
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => {
                    n.clone().try_into().map(SanType::DnsName).map_err(|e: rcgen::Error| err(format!("{n}: {e}")))
                }
            })
            .collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::try_from(lifetime).map_err(|e| err(e.to_string()))?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| err(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        WorkloadCert::new(chain, &key, SystemTime::now() + lifetime).map(|c| c.key).map_err(err)
    }
}

/// What every workload certificate says, whoever asked: the one SPIFFE
/// URI, signing and key-agreement use, client and server auth, no CA bit.
fn workload_params(
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, IdentityError> {
    let err = |m: String| IdentityError::Issue { identity: id.to_string(), message: m };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id.to_string().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    Ok(params)
}

/// One certificate in PEM.
pub fn der_to_pem(der: &CertificateDer<'_>) -> String {
    let cfg = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), cfg)
}

/// A self-signed mesh root, used directly as the signing CA: (certificate
/// PEM, key PEM).
pub fn self_signed_ca_pem(trust_domain: &str) -> Result<(String, String), IdentityError> {
    let key = KeyPair::generate()
        .map_err(|e| IdentityError::Issue { identity: "the mesh CA".into(), message: e.to_string() })?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, "redirector mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(10 * 365);
    let cert = params
        .self_signed(&key)
        .map_err(|e| IdentityError::Issue { identity: "the mesh CA".into(), message: e.to_string() })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A CA in Istio's plug-in layout, as PEM text: what goes into the files
/// (or the Secret `cacerts`) of that name.
pub struct PluginCaPem {
    /// `ca-cert.pem`: the signing certificate.
    pub cert: String,
    /// `ca-key.pem`: its key.
    pub key: String,
    /// `root-cert.pem`: the roots the mesh trusts.
    pub root: String,
    /// `cert-chain.pem`: the signing certificate up to the root.
    pub chain: String,
}

/// How long an intermediate CA made by [`intermediate_ca_pem`] lives, at
/// most (Istio's sample tooling gives its intermediates two years); never
/// past its root.
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_hours(2 * 365 * 24);

/// A fresh intermediate CA signed by the CA in `root_dir` (plug-in layout,
/// e.g. a root `redirector ca create` made): what a cluster's CA holds when
/// the root's key stays offline. It may sign workload certificates only
/// (path length 0), lives [`INTERMEDIATE_LIFETIME`] or until the root
/// expires, and its chain runs up to the root.
pub fn intermediate_ca_pem(root_dir: &Path, trust_domain: &str) -> Result<PluginCaPem, IdentityError> {
    let root = MeshCa::load_plugin(root_dir, trust_domain)?;
    let issue = |m: String| IdentityError::Issue { identity: "the intermediate CA".into(), message: m };
    let key = KeyPair::generate().map_err(|e| issue(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name.push(DnType::CommonName, "redirector mesh intermediate CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let signer_path = root_dir.join(CA_CERT_FILE);
    let signer =
        parse_certs(&signer_path, &read_file(&signer_path, "it must hold the CA certificate in PEM")?)?.remove(0);
    let signer_not_after = x509_parser::parse_x509_certificate(signer.as_ref())
        .map_err(|e| issue(e.to_string()))?
        .1
        .validity()
        .not_after
        .to_datetime();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = (now + INTERMEDIATE_LIFETIME).min(signer_not_after);
    if params.not_after <= now + time::Duration::days(1) {
        return Err(IdentityError::CaFile {
            path: root_dir.join(CA_CERT_FILE),
            message: "expires within a day".into(),
            fix: "make a new root (`redirector ca create DIR`) and sign the intermediate with it",
        });
    }
    let cert = params.signed_by(&key, &root.issuer).map_err(|e| issue(e.to_string()))?;
    let pem = |d: &CertificateDer<'_>| ::pem::encode(&::pem::Pem::new("CERTIFICATE", d.to_vec()));
    let root_pem = std::fs::read_to_string(root_dir.join(ROOT_CERT_FILE))
        .map_err(|e| IdentityError::Write { path: root_dir.join(ROOT_CERT_FILE), source: e })?;
    let mut chain = cert.pem();
    for c in &root.chain {
        chain.push_str(&pem(c));
    }
    for r in &root.root_ders {
        if !root.chain.contains(r) {
            chain.push_str(&pem(r));
        }
    }
    Ok(PluginCaPem { cert: cert.pem(), key: key.serialize_pem(), root: root_pem, chain })
}

/// Write a self-signed root into `dir` in the plug-in layout. Also what
/// `redirector ca create` does, so nodes can share one.
pub fn write_self_signed_ca(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    let (pem, key_pem) = self_signed_ca_pem(trust_domain)?;
    write_plugin_ca(dir, &PluginCaPem { cert: pem.clone(), key: key_pem, root: pem.clone(), chain: pem })
}

/// Write `ca` into `dir` in the plug-in layout (the key 0600).
pub fn write_plugin_ca(dir: &Path, ca: &PluginCaPem) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |path: &Path, source| IdentityError::Write { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, e))?;
    // Never through a link planted in the directory, and the key's mode
    // is 0600 also when the file was there before.
    let open = |p: &Path, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .and_then(|f| f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode)).map(|()| f))
            .map_err(|e| werr(p, e))
    };
    for (name, text) in [(CA_CERT_FILE, &ca.cert), (ROOT_CERT_FILE, &ca.root), (CERT_CHAIN_FILE, &ca.chain)] {
        let p = dir.join(name);
        open(&p, 0o644)?.write_all(text.as_bytes()).map_err(|e| werr(&p, e))?;
    }
    let p = dir.join(CA_KEY_FILE);
    open(&p, 0o600)?.write_all(ca.key.as_bytes()).map_err(|e| werr(&p, e))?;
    Ok(())
}

/// Istio's `COMPLIANCE_POLICY` (`mesh.compliancePolicy`): which TLS key
/// exchanges and cipher suites every TLS endpoint of the process offers and
/// accepts (HBONE both ways, gateway ports, the CA's API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompliancePolicy {
    /// The post-quantum hybrid X25519MLKEM768 preferred, with X25519,
    /// P-256 and P-384 beside it for peers that lack it.
    #[default]
    Default,
    /// Istio's `pqc`: TLS 1.3 with AES-GCM only, and X25519MLKEM768 as the
    /// only key exchange; a peer without it is refused.
    Pqc,
}

impl FromStr for CompliancePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(CompliancePolicy::Default),
            "pqc" => Ok(CompliancePolicy::Pqc),
            "fips-140-2" => Err("`fips-140-2` needs a FIPS-validated crypto module, which this build does not have; use `pqc` or leave it empty".into()),
            other => Err(format!("`{other}` is not a compliance policy: use `pqc` (Istio's values: \"\", pqc) or leave it empty")),
        }
    }
}

impl fmt::Display for CompliancePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CompliancePolicy::Default => "default",
            CompliancePolicy::Pqc => "pqc",
        })
    }
}

static PROVIDER: std::sync::OnceLock<(CompliancePolicy, Arc<CryptoProvider>)> = std::sync::OnceLock::new();

/// Fix the process's compliance policy; call before any TLS is set up.
/// Setting another after the first (or after [`provider`] fixed the
/// default) is an error: one process speaks one policy.
pub fn set_compliance_policy(policy: CompliancePolicy) -> Result<(), String> {
    let (set, _) = PROVIDER.get_or_init(|| (policy, Arc::new(provider_for(policy))));
    if *set == policy {
        Ok(())
    } else {
        Err(format!("the compliance policy is already `{set}`; it cannot become `{policy}` in a running process"))
    }
}

/// The process's compliance policy.
pub fn compliance_policy() -> CompliancePolicy {
    PROVIDER.get().map_or(CompliancePolicy::Default, |(p, _)| *p)
}

/// The crypto provider every TLS configuration of the process is built
/// with (aws-lc-rs, which has ML-KEM), restricted by its policy.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::clone(
        &PROVIDER.get_or_init(|| (CompliancePolicy::Default, Arc::new(provider_for(CompliancePolicy::Default)))).1,
    )
}

/// The provider of a policy (tests and benchmarks compare them).
pub fn provider_for(policy: CompliancePolicy) -> CryptoProvider {
    use rustls::crypto::aws_lc_rs;
    let mut p = aws_lc_rs::default_provider();
    // rustls' default order already puts X25519MLKEM768 first; say so
    // rather than depend on it.
    p.kx_groups = match policy {
        CompliancePolicy::Default => vec![
            aws_lc_rs::kx_group::X25519MLKEM768,
            aws_lc_rs::kx_group::X25519,
            aws_lc_rs::kx_group::SECP256R1,
            aws_lc_rs::kx_group::SECP384R1,
        ],
        CompliancePolicy::Pqc => vec![aws_lc_rs::kx_group::X25519MLKEM768],
    };
    if policy == CompliancePolicy::Pqc {
        p.cipher_suites =
            vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256, aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384];
    }
    p
}

/// A workload's current certificate and key.
#[derive(Clone)]
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub issued: SystemTime,
    pub expires: SystemTime,
    /// When to ask for the next one: half-life (Istio rotates at 50%),
    /// earlier by up to 5% of the life for a remote CA's, so pods
    /// started together do not renew together.
    pub renew_at: SystemTime,
}

impl WorkloadCert {
    /// A chain (leaf first) and the leaf's key, for presenting.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &KeyPair,
        expires: SystemTime,
    ) -> Result<WorkloadCert, String> {
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider().key_provider.load_private_key(private).map_err(|e| e.to_string())?;
        let issued = SystemTime::now();
        let renew_at = issued + expires.duration_since(issued).unwrap_or_default() / 2;
        Ok(WorkloadCert { key: Arc::new(CertifiedKey::new(chain, signing)), issued, expires, renew_at })
    }

    /// Valid from `issued`; renewed at half-life less up to `jitter` of
    /// the life.
    pub fn valid_from(mut self, issued: SystemTime, jitter: f64) -> WorkloadCert {
        let life = self.expires.duration_since(issued).unwrap_or_default();
        self.issued = issued;
        self.renew_at = issued + life.mul_f64(0.5 - jitter.clamp(0.0, 0.5));
        self
    }

    /// Time for a new one.
    fn due(&self) -> bool {
        SystemTime::now() >= self.renew_at
    }

    fn expired(&self) -> bool {
        SystemTime::now() >= self.expires
    }
}

/// A CA asked over the network ([`remote::RemoteCa`]).
pub trait RemoteSigner: Send + Sync {
    /// A new key and certificate for `id`.
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
        lifetime: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>>;
    /// The trust bundle now, and its bytes.
    fn roots(&self) -> Result<(RootCertStore, Vec<u8>), IdentityError>;
    /// Where it is, for logs.
    fn describe(&self) -> String;
}

/// Backoff after a failed request: 200 ms doubling to 30 s, with up to a
/// quarter added at random so agents do not retry in step.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << failures.min(8)).min(Duration::from_secs(30));
    base + base.mul_f64(rand::random::<f64>() / 4.0)
}

/// Who signs the store's certificates: a CA key this process holds (a dev
/// box, files shared by hand), or a control-plane CA asked over Istio's
/// API (a cluster: no key on the node).
pub enum Signer {
    Local(Box<MeshCa>),
    Remote(Arc<dyn RemoteSigner>),
}

/// A remote identity's request state: asked now, or when to ask again.
#[derive(Default)]
struct Asking {
    in_flight: bool,
    failures: u32,
    not_before: Option<std::time::Instant>,
}

/// Workload certificates by identity, rotated at half-life: issued on
/// first use by a local CA; asked for ahead of use from a remote one
/// ([`CertStore::want`]), as a pod is served only once its certificate is
/// here.
pub struct CertStore {
    signer: Signer,
    trust_domain: String,
    lifetime: Duration,
    certs: RwLock<HashMap<Identity, WorkloadCert>>,
    roots: RwLock<(Arc<RootCertStore>, Vec<u8>)>,
    roots_generation: std::sync::atomic::AtomicU64,
    asking: std::sync::Mutex<HashMap<Identity, Asking>>,
    /// Bumped when a remote certificate arrives (the pod loop serves the
    /// pods that waited for it).
    arrived: tokio::sync::watch::Sender<u64>,
    pub rotations: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
}

impl CertStore {
    pub fn new(ca: MeshCa, lifetime: Duration) -> Arc<CertStore> {
        let (td, roots) = (ca.trust_domain.clone(), ca.roots());
        CertStore::with_signer(Signer::Local(Box::new(ca)), td, roots, lifetime)
    }

    /// A store whose certificates come from a remote CA; fails when the
    /// trust bundle cannot be read.
    pub fn remote(
        ca: Arc<dyn RemoteSigner>,
        trust_domain: &str,
        lifetime: Duration,
    ) -> Result<Arc<CertStore>, IdentityError> {
        let (roots, bytes) = ca.roots()?;
        let store = CertStore::with_signer(Signer::Remote(ca), trust_domain.to_string(), Arc::new(roots), lifetime);
        store.roots.write().expect("roots lock").1 = bytes;
        Ok(store)
    }

    fn with_signer(
        signer: Signer,
        trust_domain: String,
        roots: Arc<RootCertStore>,
        lifetime: Duration,
    ) -> Arc<CertStore> {
        Arc::new(CertStore {
            signer,
            trust_domain,
            lifetime,
            certs: RwLock::new(HashMap::new()),
            roots: RwLock::new((roots, Vec::new())),
            roots_generation: Default::default(),
            asking: std::sync::Mutex::default(),
            arrived: tokio::sync::watch::channel(0).0,
            rotations: Default::default(),
            failures: Default::default(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Where certificates come from, for the start-up log.
    pub fn origin(&self) -> String {
        match &self.signer {
            Signer::Local(ca) => ca.origin.clone(),
            Signer::Remote(r) => format!("{} (no CA key on this node)", r.describe()),
        }
    }

    /// The roots peers' chains must reach now.
    pub fn roots(&self) -> Arc<RootCertStore> {
        Arc::clone(&self.roots.read().expect("roots lock").0)
    }

    /// Changes when the trust bundle does.
    pub fn roots_generation(&self) -> u64 {
        self.roots_generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes when a certificate arrives from a remote CA.
    pub fn arrivals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.arrived.subscribe()
    }

    /// Whether `id` has a certificate to present now (always, with a
    /// local CA).
    pub fn ready(&self, id: &Identity) -> bool {
        match self.signer {
            Signer::Local(_) => true,
            Signer::Remote(_) => self.certs.read().expect("cert store lock").get(id).is_some_and(|c| !c.expired()),
        }
    }

    /// The certificate to present as `id` now.
    pub fn get(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        if let Some(c) = self.certs.read().expect("cert store lock").get(id) {
            // A remote CA's certificate is renewed ahead, in the
            // background; until then (a CA outage) it serves to expiry.
            if !c.due() || matches!(self.signer, Signer::Remote(_)) && !c.expired() {
                return Ok(c.clone());
            }
        }
        let Signer::Local(ca) = &self.signer else {
            return Err(IdentityError::Issue {
                identity: id.to_string(),
                message: "no certificate from the mesh CA yet".into(),
            });
        };
        let mut certs = self.certs.write().expect("cert store lock");
        if let Some(c) = certs.get(id) {
            if !c.due() {
                return Ok(c.clone());
            }
        }
        let fresh = ca.issue(id, self.lifetime)?;
        self.stored(&mut certs, id, fresh.clone());
        Ok(fresh)
    }

    fn stored(&self, certs: &mut HashMap<Identity, WorkloadCert>, id: &Identity, fresh: WorkloadCert) {
        let expires_in = fresh.expires.duration_since(SystemTime::now()).unwrap_or_default().as_secs();
        if certs.insert(id.clone(), fresh).is_some() {
            self.rotations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(identity = %id, expires_in_s = expires_in, "workload certificate rotated");
        } else {
            tracing::info!(identity = %id, expires_in_s = expires_in, "workload certificate issued");
        }
    }

    /// Ask a remote CA for each of `ids` that has no certificate yet (or
    /// one due), unless asked already or backing off after a failure.
    pub fn want<'a>(self: &Arc<Self>, ids: impl IntoIterator<Item = &'a Identity>) {
        let Signer::Remote(_) = &self.signer else { return };
        for id in ids {
            let needed = self.certs.read().expect("cert store lock").get(id).is_none_or(WorkloadCert::due);
            if needed {
                self.ask(id);
            }
        }
    }

    fn ask(self: &Arc<Self>, id: &Identity) {
        let Signer::Remote(ca) = &self.signer else { return };
        {
            let mut asking = self.asking.lock().expect("asking lock");
            let a = asking.entry(id.clone()).or_default();
            if a.in_flight || a.not_before.is_some_and(|t| std::time::Instant::now() < t) {
                return;
            }
            a.in_flight = true;
        }
        let (store, ca, id) = (Arc::clone(self), Arc::clone(ca), id.clone());
        tokio::spawn(async move {
            let result = ca.fetch(&id, store.lifetime).await;
            let mut asking = store.asking.lock().expect("asking lock");
            let a = asking.entry(id.clone()).or_default();
            a.in_flight = false;
            match result {
                Ok(cert) => {
                    a.failures = 0;
                    a.not_before = None;
                    drop(asking);
                    store.stored(&mut store.certs.write().expect("cert store lock"), &id, cert);
                    store.arrived.send_modify(|n| *n += 1);
                }
                Err(e) => {
                    let wait = backoff(a.failures);
                    a.failures += 1;
                    a.not_before = Some(std::time::Instant::now() + wait);
                    store.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(identity = %id, error = %e, retry_in_ms = wait.as_millis() as u64, "no certificate from the mesh CA; the current one (if any) serves until it expires");
                }
            }
        });
    }

    /// Re-issue every certificate that is due (the agent calls this
    /// periodically so idle identities are rotated too), forget identities
    /// no workload has any more, and read a remote CA's trust bundle again.
    pub fn rotate_due(self: &Arc<Self>, keep: &dyn Fn(&Identity) -> bool) {
        let ids: Vec<Identity> = self.certs.read().expect("cert store lock").keys().cloned().collect();
        for id in ids {
            if !keep(&id) {
                self.certs.write().expect("cert store lock").remove(&id);
                self.asking.lock().expect("asking lock").remove(&id);
                continue;
            }
            match &self.signer {
                Signer::Remote(_) => self.want([&id]),
                Signer::Local(_) => {
                    if let Err(e) = self.get(&id) {
                        tracing::warn!(identity = %id, error = %e, "certificate rotation failed; the current one stays until it expires");
                    }
                }
            }
        }
        self.reload_roots();
    }

    fn reload_roots(&self) {
        let Signer::Remote(ca) = &self.signer else { return };
        match ca.roots() {
            Ok((roots, bytes)) => {
                let mut current = self.roots.write().expect("roots lock");
                if current.1 != bytes {
                    tracing::info!(roots = roots.len(), bundle = %ca.describe(), "trust bundle changed: peers chained to any of its roots are trusted");
                    *current = (Arc::new(roots), bytes);
                    self.roots_generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(e) => tracing::debug!(error = %e, "trust bundle unreadable; the current roots stay"),
        }
    }

    /// When each identity's certificate expires (status, tests).
    pub fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        let mut v: Vec<_> =
            self.certs.read().expect("cert store lock").iter().map(|(i, c)| (i.clone(), c.expires)).collect();
        v.sort();
        v
    }
}

/// The current time as rustls wants it.
pub fn now() -> UnixTime {
    UnixTime::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compliance_policies_parse_as_istios_and_pqc_offers_only_the_hybrid() {
        assert_eq!("".parse::<CompliancePolicy>(), Ok(CompliancePolicy::Default));
        assert_eq!("pqc".parse::<CompliancePolicy>(), Ok(CompliancePolicy::Pqc));
        assert!("fips-140-2".parse::<CompliancePolicy>().unwrap_err().contains("FIPS"));
        assert!("PQC".parse::<CompliancePolicy>().unwrap_err().contains("`PQC` is not a compliance policy"));
        let names = |p: CompliancePolicy| {
            provider_for(p).kx_groups.iter().map(|g| format!("{:?}", g.name())).collect::<Vec<_>>()
        };
        assert_eq!(names(CompliancePolicy::Pqc), ["X25519MLKEM768"]);
        assert_eq!(names(CompliancePolicy::Default)[..2], ["X25519MLKEM768", "X25519"]);
        let pqc = provider_for(CompliancePolicy::Pqc);
        assert!(pqc.cipher_suites.iter().all(|c| c.tls13().is_some()));
        assert_eq!(pqc.cipher_suites.len(), 2);
    }

    /// L9: the CA files are never written through a link planted in the
    /// directory, and an existing key file is left 0600.
    #[test]
    fn the_ca_files_are_not_written_through_links_and_the_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("redirector-ca-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(CA_KEY_FILE)).unwrap();
        assert!(write_self_signed_ca(&dir, "cluster.local").is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
        std::fs::remove_file(dir.join(CA_KEY_FILE)).unwrap();
        std::fs::write(dir.join(CA_KEY_FILE), "old").unwrap();
        std::fs::set_permissions(dir.join(CA_KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_self_signed_ca(&dir, "cluster.local").unwrap();
        let mode = std::fs::metadata(dir.join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("redirector-identity-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn spiffe_ids_round_trip_and_reject_other_shapes() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep".parse().unwrap();
        assert_eq!(id, Identity::new("cluster.local", "default", "sleep"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        for bad in ["spiffe://cluster.local/ns/default", "https://x/ns/a/sa/b", "spiffe:///ns/a/sa/b"] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_generated_ca_issues_certificates_carrying_the_spiffe_id() {
        let dir = tmp("gen");
        let ca = MeshCa::load_or_generate(&dir, "example.org").unwrap();
        let mode = std::fs::metadata(dir.join("ca").join(CA_KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let id = Identity::new("example.org", "ns1", "web");
        let cert = ca.issue(&id, Duration::from_hours(1)).unwrap();
        assert_eq!(identities_in(&cert.key.cert[0]), vec![id]);
        // The same CA again on the next start, not a new one.
        let again = MeshCa::load_or_generate(&dir, "example.org").unwrap();
        assert_eq!(again.chain, ca.chain);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_key_that_does_not_match_its_certificate_is_refused() {
        let a = tmp("a");
        let b = tmp("b");
        write_self_signed_ca(&a, "cluster.local").unwrap();
        write_self_signed_ca(&b, "cluster.local").unwrap();
        std::fs::copy(b.join(CA_KEY_FILE), a.join(CA_KEY_FILE)).unwrap();
        let err = MeshCa::load_plugin(&a, "cluster.local").err().unwrap().to_string();
        assert!(err.contains("does not match"), "{err}");
        std::fs::write(a.join(CA_CERT_FILE), "not a certificate").unwrap();
        let err = MeshCa::load_plugin(&a, "cluster.local").err().unwrap().to_string();
        assert!(err.contains("ca-cert.pem") && err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn certificates_are_rotated_after_half_their_life() {
        let dir = tmp("rot");
        let ca = MeshCa::load_or_generate(&dir, "cluster.local").unwrap();
        let store = CertStore::new(ca, Duration::from_secs(2));
        let id = Identity::new("cluster.local", "default", "a");
        let first = store.get(&id).unwrap();
        assert!(Arc::ptr_eq(&first.key, &store.get(&id).unwrap().key));
        std::thread::sleep(Duration::from_millis(1100));
        let second = store.get(&id).unwrap();
        assert!(!Arc::ptr_eq(&first.key, &second.key));
        assert_eq!(store.rotations.load(std::sync::atomic::Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
