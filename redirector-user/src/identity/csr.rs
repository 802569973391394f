//! Certificate signing requests: the agent makes one per workload identity
//! (the key stays in its memory), the mesh CA checks one before it signs.
//!
//! What the CA accepts, as istiod does and no more: a PEM CSR of at most
//! [`MAX_CSR_BYTES`], signed by its own key, an ECDSA P-256/P-384 or
//! Ed25519 key or RSA of at least 2048 bits, carrying exactly one SAN, a
//! SPIFFE URI. Everything else the CA writes itself (validity, usages, no
//! CA bit), whatever the CSR asks.

#![forbid(unsafe_code)]

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use x509_parser::prelude::FromDer;

use super::{Identity, IdentityError};

/// A CSR larger than this is refused unread (one P-256 CSR is ~500 bytes;
/// an RSA-4096 one under 2 KiB).
pub const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why the CA refuses a CSR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("the CSR is {0} bytes, over the {MAX_CSR_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("the CSR is not a PEM CERTIFICATE REQUEST")]
    NotPem,
    #[error("the CSR does not parse as PKCS#10")]
    Unparsable,
    #[error("the CSR's key type is not allowed ({0}); use ECDSA P-256 or P-384, Ed25519, or RSA of 2048 bits or more")]
    KeyType(String),
    #[error("the CSR's {kind} key has {bits} bits; at least {min} are required")]
    WeakKey { kind: &'static str, bits: usize, min: usize },
    #[error("the CSR's signature does not verify with its own key")]
    BadSignature,
    #[error("the CSR asks for an extension the CA does not sign")]
    Extension,
    #[error("the CSR carries {0} subject alternative names; exactly one SPIFFE URI is required")]
    SanCount(usize),
    #[error("the CSR's subject alternative name `{0}` is not a SPIFFE identity")]
    NotSpiffe(String),
}

/// A CSR that passed every check: the key to certify and the identity it
/// asks for.
pub struct CheckedCsr {
    pub public_key: rcgen::PublicKey,
    pub identity: Identity,
}

/// A new key for `id` (ECDSA P-256, as ztunnel's) and its CSR in PEM. The
/// key never leaves the caller.
pub fn new_key_and_csr(id: &Identity) -> Result<(KeyPair, String), IdentityError> {
    let err = |m: String| IdentityError::Issue { identity: id.to_string(), message: m };
    let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id.to_string().try_into().map_err(|e: rcgen::Error| err(e.to_string()))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params.serialize_request(&key).map_err(|e| err(e.to_string()))?;
    let pem = csr.pem().map_err(|e| err(e.to_string()))?;
    Ok((key, pem))
}

/// Check a CSR as the CA must before it signs anything.
pub fn check(pem: &str) -> Result<CheckedCsr, CsrError> {
    use rustls::pki_types::pem::PemObject;
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::NotPem)?;
    let (_, parsed) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
        .map_err(|_| CsrError::Unparsable)?;
    check_key(&parsed.certification_request_info.subject_pki)?;
    let params = rcgen::CertificateSigningRequestParams::from_der(&der).map_err(|e| match e {
        rcgen::Error::InvalidCertificationRequestSignature => CsrError::BadSignature,
        rcgen::Error::UnsupportedExtension => CsrError::Extension,
        rcgen::Error::UnsupportedSignatureAlgorithm => CsrError::KeyType("its signature algorithm".into()),
        _ => CsrError::Unparsable,
    })?;
    let sans = &params.params.subject_alt_names;
    if sans.len() != 1 {
        return Err(CsrError::SanCount(sans.len()));
    }
    let identity = match &sans[0] {
        SanType::URI(u) => u.as_str().parse::<Identity>().map_err(|_| CsrError::NotSpiffe(u.as_str().into()))?,
        other => return Err(CsrError::NotSpiffe(format!("{other:?}"))),
    };
    Ok(CheckedCsr { public_key: params.public_key, identity })
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), CsrError> {
    const ED25519: &str = "1.3.101.112";
    let oid = spki.algorithm.algorithm.to_id_string();
    if oid == ED25519 {
        return Ok(());
    }
    match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(k)) => {
            let bits = k.key_size();
            if bits < 2048 {
                return Err(CsrError::WeakKey { kind: "RSA", bits, min: 2048 });
            }
            Ok(())
        }
        Ok(x509_parser::public_key::PublicKey::EC(p)) => {
            let bits = p.key_size();
            if bits < 256 {
                return Err(CsrError::WeakKey { kind: "ECDSA", bits, min: 256 });
            }
            Ok(())
        }
        _ => Err(CsrError::KeyType(oid)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa)
    }

    #[test]
    fn an_agents_csr_passes_and_names_its_identity() {
        let (_key, pem) = new_key_and_csr(&id("web")).unwrap();
        let checked = check(&pem).unwrap();
        assert_eq!(checked.identity, id("web"));
    }

    #[test]
    fn csrs_with_other_sans_bad_signatures_or_no_pem_are_refused() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id("a").to_string().try_into().unwrap()),
            SanType::URI(id("b").to_string().try_into().unwrap()),
        ];
        let two = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_eq!(check(&two).err(), Some(CsrError::SanCount(2)));
        params.subject_alt_names = vec![SanType::DnsName("web.default.svc".try_into().unwrap())];
        let dns = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(check(&dns), Err(CsrError::NotSpiffe(_))));

        // One bit of the signature flipped.
        let (_k, good) = new_key_and_csr(&id("web")).unwrap();
        use rustls::pki_types::pem::PemObject;
        let mut der =
            rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap().as_ref().to_vec();
        let last = der.len() - 3;
        der[last] ^= 1;
        let bad = rcgen_pem(&der);
        assert_eq!(check(&bad).err(), Some(CsrError::BadSignature));

        assert_eq!(check("hello").err(), Some(CsrError::NotPem));
        assert!(matches!(check(&"A".repeat(MAX_CSR_BYTES + 1)), Err(CsrError::TooLarge(_))));
    }

    fn rcgen_pem(der: &[u8]) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.to_vec()))
    }
}
