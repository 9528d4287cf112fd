//! Workload identity and mutual TLS, shared by pilot (its CA issues the certificates) and the
//! proxy (rustls configurations that present them and verify peers).
//!
//! Identities are SPIFFE ids as Istio writes them (`spiffe://cluster.local/ns/NS/sa/SA`), carried
//! as the only subject alternative name (a URI) of a short-lived ECDSA P-256 certificate. Names
//! are never checked as DNS names: a client checks the server's URI SAN against the list the
//! control plane gave it (none: any certificate of the mesh's root), a server checks only that
//! the client's chain ends at the root (authorization is a separate step).
//!
//! Crates: rcgen issues, rustls (with ring: no C toolchain beyond cc is needed, where aws-lc
//! wants cmake) speaks TLS, x509-parser reads the peer's SAN.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Istio's default trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The SPIFFE id of a service account.
pub fn spiffe_id(namespace: &str, service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}")
}

/// Pilot's DNS name on its mTLS xDS port (istiod's), and its identity.
pub const PILOT_DNS_NAME: &str = "istiod.istio-system.svc";
pub fn pilot_id() -> String {
    spiffe_id("istio-system", "istiod")
}

/// Istio's workload certificate lifetime (istio-agent's default is 24 h; rotation at half of it).
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// A certificate authority: a self-signed root made at start.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    root_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// A workload certificate: PEM chain (leaf, then the root), PEM key, expiry.
#[derive(Clone, Debug)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

fn rcgen_err(e: rcgen::Error) -> String {
    format!("certificate: {e}")
}

impl Ca {
    /// A new root, valid for ten years.
    pub fn generate() -> Result<Ca, String> {
        Ca::with_key(KeyPair::generate().map_err(rcgen_err)?)
    }

    /// A new CA key (PKCS#8 PEM) for [`Ca::from_key_pem`].
    pub fn new_key_pem() -> String {
        KeyPair::generate()
            .map(|k| k.serialize_pem())
            .unwrap_or_default()
    }

    /// The root of an existing key: the same subject and key as every root made from it, so
    /// certificates one made verify against any other (as a CA kept across restarts).
    pub fn from_key_pem(pem: &str) -> Result<Ca, String> {
        Ca::with_key(KeyPair::from_pem(pem).map_err(rcgen_err)?)
    }

    fn with_key(key: KeyPair) -> Result<Ca, String> {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, TRUST_DOMAIN);
        dn.push(DnType::CommonName, "meshbench root CA");
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(3650);
        let issuer = CertifiedIssuer::self_signed(p, key).map_err(rcgen_err)?;
        let root_pem = issuer.pem();
        Ok(Ca { issuer, root_pem })
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A certificate for `spiffe` valid for `ttl` (from a minute ago, for clock skew).
    pub fn issue(&self, spiffe: &str, ttl: Duration) -> Result<Issued, String> {
        self.issue_with_dns(spiffe, &[], ttl)
    }

    /// As [`Ca::issue`], with DNS names too (pilot's own serving certificate).
    pub fn issue_with_dns(
        &self,
        spiffe: &str,
        dns: &[&str],
        ttl: Duration,
    ) -> Result<Issued, String> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            spiffe
                .to_string()
                .try_into()
                .map_err(|e| format!("identity {spiffe:?}: {e}"))?,
        )];
        for d in dns {
            p.subject_alt_names.push(SanType::DnsName(
                d.to_string()
                    .try_into()
                    .map_err(|e| format!("{d:?}: {e}"))?,
            ));
        }
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::NoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::minutes(1);
        p.not_after = now + time::Duration::try_from(ttl).map_err(|e| e.to_string())?;
        let key = KeyPair::generate().map_err(rcgen_err)?;
        let cert = p.signed_by(&key, &self.issuer).map_err(rcgen_err)?;
        Ok(Issued {
            chain_pem: format!("{}{}", cert.pem(), self.root_pem),
            key_pem: key.serialize_pem(),
            not_after: SystemTime::now() + ttl,
        })
    }
}

/// The crypto provider every TLS config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let out: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate PEM: {e}"))?;
    if out.is_empty() {
        return Err("no certificate in the PEM data".into());
    }
    Ok(out)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("private key PEM: {e}"))
}

fn roots(pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut store = rustls::RootCertStore::empty();
    for c in certs(pem)? {
        store
            .add(c)
            .map_err(|e| format!("trusted CA certificate: {e}"))?;
    }
    Ok(Arc::new(store))
}

/// Checks that PEM data holds at least one usable root certificate.
pub fn roots_check(pem: &[u8]) -> Result<(), String> {
    roots(pem).map(drop)
}

/// What a TLS endpoint presents and trusts: PEM bytes as SDS delivers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub roots_pem: Vec<u8>,
}

/// A server config: presents the workload certificate; with `require_client`, a client must
/// present one that chains to the root. `alpn` is offered when the client's list overlaps it;
/// rustls refuses a handshake whose lists do not overlap, where Envoy carries on without ALPN,
/// so the list is left empty when the client offers only Istio's markers.
pub fn server_config(
    m: &Material,
    require_client: bool,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| e.to_string())?;
    let builder = if require_client {
        let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots(&m.roots_pem)?,
            provider,
        )
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(certs(&m.chain_pem)?, key(&m.key_pem)?)
        .map_err(|e| format!("workload certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// Istio's ALPN markers a sidecar client offers on mTLS connections.
pub const ISTIO_ALPN: [&[u8]; 2] = [b"istio-peer-exchange", b"istio"];

/// A client config: presents the workload certificate, verifies the server's chain against
/// the root and, when `sans` is not empty, that the server's URI SAN is one of them.
pub fn client_config(
    m: &Material,
    sans: Vec<String>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots(&m.roots_pem)?,
        provider.clone(),
    )
    .build()
    .map_err(|e| format!("server verifier: {e}"))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SanVerifier { inner, sans }))
        .with_client_auth_cert(certs(&m.chain_pem)?, key(&m.key_pem)?)
        .map_err(|e| format!("workload certificate: {e}"))?;
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

/// The first URI SAN of a DER certificate (a SPIFFE id in this mesh).
pub fn uri_san(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    })
}

/// Chain verification by webpki; the name check is Istio's: the URI SAN against a list.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    sans: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first, then the DNS name, which a SPIFFE certificate does
        // not carry: a name error means the chain is good.
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if self.sans.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        match uri_san(end_entity) {
            Some(id) if self.sans.contains(&id) => Ok(ServerCertVerified::assertion()),
            other => Err(rustls::Error::General(format!(
                "server identity {} is not one of {}",
                other.as_deref().unwrap_or("(none)"),
                self.sans.join(", ")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn material(ca: &Ca, id: &str) -> Material {
        let i = ca.issue(id, Duration::from_secs(60)).unwrap();
        Material {
            chain_pem: i.chain_pem.into_bytes(),
            key_pem: i.key_pem.into_bytes(),
            roots_pem: ca.root_pem().as_bytes().to_vec(),
        }
    }

    /// A handshake over loopback: `client_id` presents its certificate to a server of
    /// `server_id`, checking it against `sans`. Returns the identity the server saw.
    async fn handshake(
        server: Material,
        client: Material,
        sans: Vec<String>,
    ) -> Result<Option<String>, String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&server, true)?);
        let srv = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| uri_san(c));
            let mut b = [0u8; 2];
            tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(peer)
        });
        let connector = tokio_rustls::TlsConnector::from(client_config(
            &client,
            sans,
            ISTIO_ALPN.iter().map(|a| a.to_vec()).collect(),
        )?);
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("outbound_.9080_._.reviews.default.svc.cluster.local")
            .unwrap()
            .to_owned();
        let client_side = async {
            let mut tls = connector
                .connect(name, s)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"hi").await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let c = client_side.await;
        let s = srv.await.unwrap();
        c?;
        s
    }

    /// A CA made again from its key (a restarted pilot) trusts what the first one issued.
    #[tokio::test]
    async fn a_root_made_again_from_its_key_trusts_earlier_certificates() {
        let key = Ca::new_key_pem();
        let (a, b) = (
            Ca::from_key_pem(&key).unwrap(),
            Ca::from_key_pem(&key).unwrap(),
        );
        let id = spiffe_id("default", "x");
        let mut old = material(&a, &id);
        old.roots_pem = b.root_pem().as_bytes().to_vec();
        let mut new = material(&b, &id);
        new.roots_pem = a.root_pem().as_bytes().to_vec();
        handshake(old, new, vec![id]).await.unwrap();
    }

    #[tokio::test]
    async fn mutual_tls_checks_the_root_and_the_server_identity() {
        let ca = Ca::generate().unwrap();
        let reviews = spiffe_id("default", "bookinfo-reviews");
        let pp = spiffe_id("default", "bookinfo-productpage");
        // Both sides of one mesh; the server's identity is on the list.
        let seen = handshake(
            material(&ca, &reviews),
            material(&ca, &pp),
            vec![reviews.clone()],
        )
        .await
        .unwrap();
        assert_eq!(seen.as_deref(), Some(pp.as_str()));
        // No list: any certificate of the root.
        assert!(
            handshake(material(&ca, &reviews), material(&ca, &pp), vec![])
                .await
                .is_ok()
        );
        // The wrong identity is refused by the client.
        let e = handshake(
            material(&ca, &pp),
            material(&ca, &pp),
            vec![reviews.clone()],
        )
        .await
        .unwrap_err();
        assert!(e.contains("not one of"), "{e}");
        // A client of another root is refused by the server.
        let other = Ca::generate().unwrap();
        let mut stranger = material(&other, &pp);
        stranger.roots_pem = ca.root_pem().as_bytes().to_vec();
        assert!(handshake(material(&ca, &reviews), stranger, vec![])
            .await
            .is_err());
    }
}
