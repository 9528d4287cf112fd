//! SDS over ADS: each proxy's `default` secret (its workload certificate, for the identity its
//! pod's service account gives it) and `ROOTCA` (the mesh's root), issued by pilot's CA on
//! first request and again on each rotation epoch. istio-agent serves these to Envoy over a
//! local socket; here pilot serves them on the proxy's ADS stream (Envoy accepts both).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;

use super::tls::{CERT_SECRET, ROOT_SECRET};
use super::Resource;
use crate::security::{Ca, Issued};

/// Certificates remembered (one per proxy); past this the cache starts over.
const MAX_CACHED: usize = 50_000;

/// Pilot's CA with the certificates it has issued, per proxy and epoch.
pub struct Issuer {
    ca: Ca,
    pub ttl: Duration,
    root: Resource,
    cache: Mutex<HashMap<String, Cached>>,
    /// Certificates issued (`/metrics`: `pilot_certificates_issued_total`).
    pub issued: std::sync::atomic::AtomicU64,
}

struct Cached {
    epoch: u64,
    spiffe: String,
    secrets: Arc<HashMap<String, Resource>>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Issuer(ttl {:?})", self.ttl)
    }
}

fn inline(bytes: &str) -> Option<core::DataSource> {
    Some(core::DataSource {
        specifier: Some(core::data_source::Specifier::InlineBytes(
            bytes.as_bytes().to_vec(),
        )),
        ..Default::default()
    })
}

/// `default`: the certificate chain and key.
pub fn certificate_secret(issued: &Issued) -> Resource {
    Resource::new(
        CERT_SECRET,
        tls::Secret {
            name: CERT_SECRET.into(),
            r#type: Some(tls::secret::Type::TlsCertificate(tls::TlsCertificate {
                certificate_chain: inline(&issued.chain_pem),
                private_key: inline(&issued.key_pem),
                ..Default::default()
            })),
        },
    )
}

/// `ROOTCA`: the trusted root.
pub fn root_secret(root_pem: &str) -> Resource {
    Resource::new(
        ROOT_SECRET,
        tls::Secret {
            name: ROOT_SECRET.into(),
            r#type: Some(tls::secret::Type::ValidationContext(
                tls::CertificateValidationContext {
                    trusted_ca: inline(root_pem),
                    ..Default::default()
                },
            )),
        },
    )
}

impl Issuer {
    pub fn new(ca: Ca, ttl: Duration) -> Issuer {
        let root = root_secret(ca.root_pem());
        Issuer {
            ca,
            ttl,
            root,
            cache: Mutex::default(),
            issued: Default::default(),
        }
    }

    pub fn root_pem(&self) -> &str {
        self.ca.root_pem()
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A certificate for `spiffe` with this issuer's lifetime (not cached, not a proxy's).
    pub fn issue(&self, spiffe: &str) -> Result<crate::security::Issued, String> {
        let i = self.ca.issue(spiffe, self.ttl)?;
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(i)
    }

    /// The secrets of proxy `node_id` with identity `spiffe` for `epoch`: issued once per
    /// (proxy, epoch, identity), shared after. A certificate that cannot be issued leaves
    /// the proxy with the root only (its TLS clusters and listeners keep warming).
    pub fn secrets(
        &self,
        node_id: &str,
        spiffe: &str,
        epoch: u64,
    ) -> Arc<HashMap<String, Resource>> {
        if let Some(c) = self.cache.lock().unwrap().get(node_id) {
            if c.epoch == epoch && c.spiffe == spiffe {
                return c.secrets.clone();
            }
        }
        let mut map = HashMap::from([(ROOT_SECRET.to_string(), self.root.clone())]);
        match self.ca.issue(spiffe, self.ttl) {
            Ok(i) => {
                self.issued
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                map.insert(CERT_SECRET.to_string(), certificate_secret(&i));
            }
            Err(e) => tracing::error!(node = node_id, %spiffe, "cannot issue a certificate: {e}"),
        }
        let secrets = Arc::new(map);
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(
            node_id.to_string(),
            Cached {
                epoch,
                spiffe: spiffe.to_string(),
                secrets: secrets.clone(),
            },
        );
        secrets
    }
}
