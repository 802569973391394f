//! The mesh's mutual TLS, as Istio ambient's ztunnel speaks it on HBONE:
//! TLS 1.3 only, ALPN `h2`, certificates whose URI SAN is the workload's
//! SPIFFE ID, chains checked against the mesh root.
//!
//! The client checks that the server is the identity it expected (the
//! destination's service account), not a DNS name; the server requires a
//! client certificate from the mesh and reads the peer's identity from it.

#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, Error, ServerConfig, SignatureScheme};

use crate::identity::{identities_in, CertStore, Identity};

pub const ALPN_H2: &[u8] = b"h2";

/// Presents `identity`'s current certificate (so a rotation takes effect on
/// the next handshake).
#[derive(Debug)]
struct Presents {
    store: Arc<CertStore>,
    identity: Identity,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl Presents {
    fn key(&self) -> Option<Arc<CertifiedKey>> {
        match self.store.get(&self.identity) {
            Ok(c) => Some(c.key),
            Err(e) => {
                tracing::warn!(identity = %self.identity, error = %e, "no certificate to present");
                None
            }
        }
    }
}

impl ResolvesServerCert for Presents {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
}

impl ResolvesClientCert for Presents {
    fn resolve(&self, _issuers: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.key()
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The server side of HBONE for one workload: requires a client certificate
/// chained to the mesh's roots (those of the trust bundle now: a root
/// rotation's overlap trusts both).
pub fn server_config(store: &Arc<CertStore>, identity: &Identity) -> Result<Arc<ServerConfig>, Error> {
    let provider = crate::identity::provider();
    let verifier = Arc::new(BundleClientVerifier::new(store, &provider)?);
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(Presents { store: Arc::clone(store), identity: identity.clone() }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection proves its certificate afresh (a
    // resumed session would carry a rotated or removed identity on).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// WebPKI client verification against the store's roots, rebuilt when the
/// trust bundle changes.
#[derive(Debug)]
struct BundleClientVerifier {
    store: Arc<CertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::RwLock<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl BundleClientVerifier {
    fn new(store: &Arc<CertStore>, provider: &Arc<rustls::crypto::CryptoProvider>) -> Result<Self, Error> {
        let generation = store.roots_generation();
        let v = Self::build(store, provider)?;
        Ok(BundleClientVerifier {
            store: Arc::clone(store),
            provider: Arc::clone(provider),
            current: std::sync::RwLock::new((generation, v)),
        })
    }

    fn build(
        store: &CertStore,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        WebPkiClientVerifier::builder_with_provider(store.roots(), Arc::clone(provider))
            .build()
            .map_err(|e| Error::General(e.to_string()))
    }

    fn now(&self) -> Arc<dyn ClientCertVerifier> {
        let generation = self.store.roots_generation();
        {
            let cur = self.current.read().expect("verifier lock");
            if cur.0 == generation {
                return Arc::clone(&cur.1);
            }
        }
        match Self::build(&self.store, &self.provider) {
            Ok(v) => {
                *self.current.write().expect("verifier lock") = (generation, Arc::clone(&v));
                v
            }
            Err(e) => {
                tracing::warn!(error = %e, "the new trust bundle cannot verify clients; the previous roots stay");
                Arc::clone(&self.current.read().expect("verifier lock").1)
            }
        }
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // Peers have one identity each; no hint is needed.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, Error> {
        let verified = self.now().verify_client_cert(end_entity, intermediates, now).map_err(chain_error)?;
        // A member of the mesh, judged in the handshake so the peer hears
        // why (a bad_certificate alert) instead of a bare close after it.
        let Some(id) = identities_in(end_entity).into_iter().next() else {
            return Err(PeerRefused::error("no_identity", "the certificate carries no SPIFFE identity".into()));
        };
        if id.trust_domain != self.store.trust_domain() {
            return Err(PeerRefused::error(
                "foreign_trust_domain",
                format!("{id} is of another trust domain than {}", self.store.trust_domain()),
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.now().supported_verify_schemes()
    }
}

/// The client side of HBONE: presents `source`, accepts only a server
/// certificate chained to the mesh root that carries one of `expected`.
pub fn client_config(
    store: &Arc<CertStore>,
    source: &Identity,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = crate::identity::provider();
    let verifier = Arc::new(ExpectIdentity {
        store: Arc::clone(store),
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Presents { store: Arc::clone(store), identity: source.clone() }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The verified peer identity of a finished handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    certs?.first().and_then(|c| identities_in(c).into_iter().next())
}

/// Chain to the mesh root, then the SPIFFE ID: the server name the client
/// dialled is an address, never what is checked.
#[derive(Debug)]
struct ExpectIdentity {
    /// Its roots are read at each handshake (a rotated bundle applies to
    /// the next connection).
    store: Arc<CertStore>,
    expected: Vec<Identity>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.store.roots(),
            intermediates,
            now,
            self.algs.all,
        )
        .map_err(chain_error)?;
        let presented = identities_in(end_entity);
        if presented.iter().any(|p| self.expected.contains(p)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(PeerRefused::error(
                "wrong_identity",
                format!(
                    "the peer presented {} but {} was expected",
                    presented.first().map_or_else(|| "no SPIFFE identity".into(), std::string::ToString::to_string),
                    self.expected.iter().map(std::string::ToString::to_string).collect::<Vec<_>>().join(" or ")
                ),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A chain that names one of the mesh's roots (or another CA with the same
/// name, as every `cluster.local` CA has) but whose signature does not
/// verify with its key was issued by a CA the mesh does not know: say so
/// (`unknown_ca`), not `decrypt_error`, which reads as a broken handshake.
fn chain_error(e: Error) -> Error {
    #[allow(deprecated, reason = "webpki still reports a chain's bad signature as BadSignature")]
    match e {
        Error::InvalidCertificate(rustls::CertificateError::BadSignature) => {
            Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
        }
        e => e,
    }
}

/// A peer certificate that chains to the mesh's roots but is refused by
/// the mesh's own rules. It reaches rustls as an invalid certificate, so
/// the peer gets a `bad_certificate` alert (a chain that does not verify
/// gets `unknown_ca`, `certificate_expired` and so on from WebPKI), and
/// the log and counters get [`PeerRefused::reason`].
#[derive(Debug)]
pub struct PeerRefused {
    /// The refusal counter's `reason` label.
    pub reason: &'static str,
    pub message: String,
}

impl PeerRefused {
    fn error(reason: &'static str, message: String) -> Error {
        Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(PeerRefused {
            reason,
            message,
        }))))
    }

    /// The mesh's refusal inside a failed handshake's error, if it is one.
    pub fn of(e: &std::io::Error) -> Option<&PeerRefused> {
        match e.get_ref()?.downcast_ref::<Error>()? {
            Error::InvalidCertificate(rustls::CertificateError::Other(o)) => o.0.downcast_ref::<PeerRefused>(),
            _ => None,
        }
    }
}

impl std::fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PeerRefused {}

/// What is wrong with a gateway server's certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum GatewayCertError {
    #[error("holds no PEM certificate")]
    NoCertificate,
    #[error("holds no PEM private key")]
    NoKey,
    #[error("the private key does not match the certificate ({0})")]
    Mismatch(Error),
}

/// A gateway server's certificate chain (`cert_pem`, leaf first) and
/// `key_pem`, checked: both parse and the key is the certificate's.
pub fn gateway_certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, GatewayCertError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| GatewayCertError::NoCertificate)?;
    if certs.is_empty() {
        return Err(GatewayCertError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| GatewayCertError::NoKey)?;
    CertifiedKey::from_der(certs, key, &crate::identity::provider()).map(Arc::new).map_err(GatewayCertError::Mismatch)
}

/// The rustls configuration of a gateway port terminating TLS (Istio's
/// `tls.mode: SIMPLE`) for its servers, each a certificate for its hosts:
/// TLS 1.2 and 1.3, no client certificate, ALPN h2 then http/1.1.
pub fn gateway_server_config(servers: Vec<(Vec<String>, Arc<CertifiedKey>)>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(crate::identity::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { servers }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The certificate of the first server whose hosts match the client's SNI,
/// as Envoy's filter chains match a gateway's servers; a name no server
/// takes is refused. A client that sends no name (an address) gets the
/// first server's.
#[derive(Debug)]
struct BySni {
    servers: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else { return self.servers.first().map(|(_, k)| Arc::clone(k)) };
        let name = name.to_ascii_lowercase();
        self.servers
            .iter()
            .find(|(hosts, _)| {
                hosts.iter().any(|h| crate::mesh::source_dir::host_matches(&h.to_ascii_lowercase(), &name))
            })
            .map(|(_, k)| Arc::clone(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{CertStore, MeshCa};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The certificate a gateway port presents to a client sending `sni`
    /// (trusting any server), or the handshake's error.
    async fn presented(cfg: Arc<ServerConfig>, sni: Option<&str>) -> Result<Vec<u8>, String> {
        #[derive(Debug)]
        struct AnyServer;
        impl ServerCertVerifier for AnyServer {
            fn verify_server_cert(
                &self,
                _: &CertificateDer<'_>,
                _: &[CertificateDer<'_>],
                _: &ServerName<'_>,
                _: &[u8],
                _: UnixTime,
            ) -> Result<ServerCertVerified, Error> {
                Ok(ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &CertificateDer<'_>,
                _: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, Error> {
                Ok(HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
                crate::identity::provider().signature_verification_algorithms.supported_schemes()
            }
        }
        let (c, srv) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { tokio_rustls::TlsAcceptor::from(cfg).accept(srv).await.map(|_| ()) });
        let mut ccfg = ClientConfig::builder_with_provider(crate::identity::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth();
        ccfg.enable_sni = sni.is_some();
        let name = ServerName::try_from(sni.unwrap_or("gateway.invalid").to_string()).unwrap();
        let r = tokio_rustls::TlsConnector::from(Arc::new(ccfg)).connect(name, c).await;
        let _ = server.await;
        let tls = r.map_err(|e| e.to_string())?;
        Ok(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
    }

    /// Several HTTPS servers on one gateway port, each with its own
    /// certificate: the client's SNI picks the server (wildcards as in a
    /// Gateway's hosts); a name no server takes is refused; no name gets
    /// the first. A key that is not the certificate's is named.
    #[tokio::test]
    async fn a_gateway_port_presents_the_certificate_of_the_server_its_sni_names() {
        let make = |host: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![host.into()]).unwrap().self_signed(&key).unwrap();
            (cert.pem(), key.serialize_pem(), cert.der().to_vec())
        };
        let (a_pem, a_key, a_der) = make("a.example.com");
        let (b_pem, b_key, b_der) = make("b.example.org");
        let servers = vec![
            (vec!["a.example.com".to_string()], gateway_certified_key(a_pem.as_bytes(), a_key.as_bytes()).unwrap()),
            (vec!["*.example.org".to_string()], gateway_certified_key(b_pem.as_bytes(), b_key.as_bytes()).unwrap()),
        ];
        let cfg = gateway_server_config(servers);
        assert_eq!(presented(Arc::clone(&cfg), Some("a.example.com")).await.unwrap(), a_der);
        assert_eq!(presented(Arc::clone(&cfg), Some("B.Example.org")).await.unwrap(), b_der);
        assert_eq!(presented(Arc::clone(&cfg), None).await.unwrap(), a_der);
        assert!(presented(cfg, Some("c.example.net")).await.is_err(), "a name no server takes");
        let e = gateway_certified_key(a_pem.as_bytes(), b_key.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("the private key does not match the certificate"), "{e}");
        assert!(matches!(gateway_certified_key(b"", a_key.as_bytes()), Err(GatewayCertError::NoCertificate)));
    }

    fn store(name: &str) -> Arc<CertStore> {
        let d = std::env::temp_dir().join(format!("redirector-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        CertStore::new(MeshCa::load_or_generate(&d, "cluster.local").unwrap(), Duration::from_hours(1))
    }

    /// A handshake between `client` (expecting `expected`) and a server
    /// presenting `server_id` from `server_store`. Returns the identity the
    /// server saw, or the client's error.
    async fn handshake(
        client_store: &Arc<CertStore>,
        server_store: &Arc<CertStore>,
        server_id: &Identity,
        expected: &Identity,
    ) -> Result<Option<Identity>, String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let scfg = server_config(server_store, server_id).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(scfg).accept(s).await.ok()?;
            let id = peer_identity(tls.get_ref().1.peer_certificates());
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
            id
        });
        let ccfg = client_config(client_store, &Identity::new("cluster.local", "a", "client"), vec![expected.clone()])
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(ccfg).connect(ServerName::IpAddress(addr.ip().into()), tcp).await;
        match r {
            Ok(mut tls) => {
                tls.write_all(b"x").await.unwrap();
                Ok(server.await.unwrap())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn each_side_learns_and_checks_the_others_spiffe_identity() {
        let s = store("ok");
        let server = Identity::new("cluster.local", "b", "server");
        let seen = handshake(&s, &s, &server, &server).await.unwrap();
        assert_eq!(seen, Some(Identity::new("cluster.local", "a", "client")));
    }

    #[tokio::test]
    async fn a_server_with_the_wrong_identity_is_refused() {
        let s = store("wrong");
        let server = Identity::new("cluster.local", "b", "impostor");
        let err = handshake(&s, &s, &server, &Identity::new("cluster.local", "b", "server")).await.unwrap_err();
        assert!(err.contains("spiffe://cluster.local/ns/b/sa/impostor"), "{err}");
    }

    #[tokio::test]
    async fn a_peer_from_a_foreign_ca_is_refused() {
        let ours = store("ours");
        let foreign = store("foreign");
        let server = Identity::new("cluster.local", "b", "server");
        let err = handshake(&ours, &foreign, &server, &server).await.unwrap_err();
        assert!(err.contains("invalid peer certificate"), "{err}");
    }
}
