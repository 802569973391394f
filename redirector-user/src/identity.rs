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
        for r in roots_der {
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
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id.to_string().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| err(e.to_string()))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let provider = provider();
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = provider.key_provider.load_private_key(private).map_err(|e| err(e.to_string()))?;
        Ok(WorkloadCert {
            key: Arc::new(CertifiedKey::new(chain, signing)),
            issued: SystemTime::now(),
            expires: not_after,
        })
    }
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

/// Write a self-signed root into `dir` in the plug-in layout. Also what
/// `redirector ca create` does, so nodes can share one.
pub fn write_self_signed_ca(dir: &Path, trust_domain: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let werr = |path: &Path, source| IdentityError::Write { path: path.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(|e| werr(dir, e))?;
    let (pem, key_pem) = self_signed_ca_pem(trust_domain)?;
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
    for name in [CA_CERT_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
        let p = dir.join(name);
        open(&p, 0o644)?.write_all(pem.as_bytes()).map_err(|e| werr(&p, e))?;
    }
    let p = dir.join(CA_KEY_FILE);
    open(&p, 0o600)?.write_all(key_pem.as_bytes()).map_err(|e| werr(&p, e))?;
    Ok(())
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A workload's current certificate and key.
#[derive(Clone)]
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub issued: SystemTime,
    pub expires: SystemTime,
}

impl WorkloadCert {
    /// Past half its life: time for a new one (Istio rotates at 50%).
    fn due(&self) -> bool {
        let life = self.expires.duration_since(self.issued).unwrap_or_default();
        SystemTime::now() >= self.issued + life / 2
    }
}

/// Workload certificates by identity, issued on first use and rotated at
/// half-life.
pub struct CertStore {
    ca: MeshCa,
    lifetime: Duration,
    certs: RwLock<HashMap<Identity, WorkloadCert>>,
    pub rotations: std::sync::atomic::AtomicU64,
}

impl CertStore {
    pub fn new(ca: MeshCa, lifetime: Duration) -> Arc<CertStore> {
        Arc::new(CertStore { ca, lifetime, certs: RwLock::new(HashMap::new()), rotations: Default::default() })
    }

    pub fn trust_domain(&self) -> &str {
        &self.ca.trust_domain
    }

    pub fn ca(&self) -> &MeshCa {
        &self.ca
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.ca.roots()
    }

    /// The certificate to present as `id` now.
    pub fn get(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        if let Some(c) = self.certs.read().expect("cert store lock").get(id) {
            if !c.due() {
                return Ok(c.clone());
            }
        }
        let mut certs = self.certs.write().expect("cert store lock");
        if let Some(c) = certs.get(id) {
            if !c.due() {
                return Ok(c.clone());
            }
        }
        let fresh = self.ca.issue(id, self.lifetime)?;
        if certs.insert(id.clone(), fresh.clone()).is_some() {
            self.rotations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(identity = %id, "workload certificate rotated");
        } else {
            tracing::info!(identity = %id, lifetime_s = self.lifetime.as_secs(), "workload certificate issued");
        }
        Ok(fresh)
    }

    /// Re-issue every certificate that is due (the agent calls this
    /// periodically so idle identities are rotated too) and forget
    /// identities no workload has any more.
    pub fn rotate_due(&self, keep: &dyn Fn(&Identity) -> bool) {
        let ids: Vec<Identity> = self.certs.read().expect("cert store lock").keys().cloned().collect();
        for id in ids {
            if !keep(&id) {
                self.certs.write().expect("cert store lock").remove(&id);
                continue;
            }
            if let Err(e) = self.get(&id) {
                tracing::warn!(identity = %id, error = %e, "certificate rotation failed; the current one stays until it expires");
            }
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
