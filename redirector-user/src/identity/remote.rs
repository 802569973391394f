//! The agent's side of a control-plane CA: it asks, never signs.
//!
//! For each identity it serves, the agent makes a key in memory, sends its
//! CSR to the CA (`mesh.caAddress`, Istio's API) with its own projected
//! service-account token (audience `istio-ca`, re-read on every call, as
//! the kubelet rotates it), and keeps the chain it gets back. A pod's
//! identity is asked for with `ImpersonatedIdentity`; the CA grants it
//! only while such a pod is scheduled on this node. The trust bundle
//! (`mesh.caRootCert`, a ConfigMap's `root-cert.pem`) is read again when
//! it changes, so a bundle with the old and the new root is trusted
//! through a rotation.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use super::istio_api::{CaClient, IstioCertificateRequest};
use super::{csr, Identity, IdentityError, WorkloadCert};

/// A remote CA and what the agent presents to it.
pub struct RemoteCa {
    pub client: CaClient,
    /// The projected service-account token (audience `istio-ca`).
    pub token_path: PathBuf,
    /// The trust bundle: every root the mesh trusts now.
    pub root_path: PathBuf,
    /// The agent's own identity: asked for as itself, not on a pod's
    /// behalf.
    pub own: Identity,
}

impl RemoteCa {
    /// A new key and certificate for `id` from the CA.
    pub async fn fetch(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
        let err = |m: String| IdentityError::Issue { identity: id.to_string(), message: m };
        let (key, csr) = csr::new_key_and_csr(id)?;
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| {
            err(format!(
                "cannot read the service-account token {}: {e}; mount a projected token with audience istio-ca there (mesh.caTokenPath)",
                self.token_path.display()
            ))
        })?;
        let on_behalf = (*id != self.own).then_some(id);
        let response = self
            .client
            .create_certificate(&token, IstioCertificateRequest::new(csr, lifetime, on_behalf))
            .await
            .map_err(|s| err(format!("the CA at {} refused: {} ({:?})", self.client.address, s.message(), s.code())))?;
        let mut chain = Vec::new();
        for pem in &response.cert_chain {
            use rustls::pki_types::pem::PemObject;
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(c.map_err(|e| err(format!("the CA answered a chain that is not PEM: {e:?}")))?);
            }
        }
        let leaf = chain.first().ok_or_else(|| err("the CA answered an empty chain".into()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| err(format!("the CA's certificate does not parse: {e}")))?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(err("the CA's certificate is not for the key this agent sent".into()));
        }
        if super::identities_in(leaf) != vec![id.clone()] {
            return Err(err("the CA's certificate does not carry exactly the identity asked for".into()));
        }
        let expires = system_time(x509.validity().not_after.timestamp());
        // The root stays out of what is presented (the peer has it).
        if chain.len() > 1 {
            chain.pop();
        }
        let cert = WorkloadCert::new(chain, &key, expires).map_err(err)?;
        // Renewed at half the life left on arrival (the CA backdates
        // its certificates for clock skew).
        Ok(cert.valid_from(SystemTime::now(), rand::random::<f64>() * 0.05))
    }
}

/// The trust bundle at `path`: every root certificate in it, and its bytes.
pub fn read_bundle(path: &std::path::Path) -> Result<(RootCertStore, Vec<u8>), IdentityError> {
    let text = std::fs::read(path).map_err(|e| IdentityError::CaFile {
        path: path.to_path_buf(),
        message: e.to_string(),
        fix: "mount the mesh's root bundle there (the ConfigMap istio-ca-root-cert's root-cert.pem; mesh.caRootCert)",
    })?;
    let certs = super::parse_certs(path, &String::from_utf8_lossy(&text))?;
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| IdentityError::CaFile {
            path: path.to_path_buf(),
            message: e.to_string(),
            fix: "it must hold the mesh's root certificates in PEM",
        })?;
    }
    Ok((roots, text))
}

fn system_time(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

impl super::RemoteSigner for RemoteCa {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
        lifetime: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>> {
        Box::pin(RemoteCa::fetch(self, id, lifetime))
    }

    fn roots(&self) -> Result<(RootCertStore, Vec<u8>), IdentityError> {
        read_bundle(&self.root_path)
    }

    fn describe(&self) -> String {
        format!("the mesh CA at {} (trust bundle {})", self.client.address, self.root_path.display())
    }
}
