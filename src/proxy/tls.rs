//! Mutual TLS in the proxy: the TLS contexts listeners and clusters name (read from Envoy's
//! protos, anything else NACKed), the secrets SDS delivers, and the rustls configs built from
//! both. Configs are built once per (context, secrets) and dropped when a secret changes:
//! connections made before a rotation keep their sessions, new ones present the new
//! certificate.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::google::protobuf::Any;

use super::proto::{decode, Reject};
use crate::security::{self, Material};

pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
pub const RAW_BUFFER_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
const RAW_BUFFER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";
const UPSTREAM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
const DOWNSTREAM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// The secrets a TLS context presents and trusts, by SDS name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Secrets {
    pub cert: String,
    pub ca: String,
}

/// A listener chain's TLS: the certificate to present and whether a client must present one
/// that chains to the root.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DownstreamTls {
    pub secrets: Secrets,
    pub require_client: bool,
}

/// A cluster's TLS: SNI, the server identities accepted (none: any of the root), ALPN offered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    pub secrets: Secrets,
    pub sni: String,
    pub sans: Vec<String>,
    pub alpn: Vec<String>,
}

/// What a transport socket is.
#[derive(Clone, Debug, PartialEq)]
pub enum Socket<T> {
    Plaintext,
    Tls(T),
}

fn typed(ts: &core::TransportSocket) -> Result<Option<&Any>, Reject> {
    match &ts.config_type {
        Some(core::transport_socket::ConfigType::TypedConfig(a)) => Ok(Some(a)),
        None => Ok(None),
        #[allow(unreachable_patterns)]
        Some(_) => Err(format!("transport socket {}: typed_config only", ts.name)),
    }
}

fn is_raw(ts: &core::TransportSocket, any: Option<&Any>) -> bool {
    any.map_or(ts.name == RAW_BUFFER_SOCKET, |a| {
        a.type_url == RAW_BUFFER_TYPE
    })
}

fn sds_name(c: &tls::SdsSecretConfig, what: &str) -> Result<String, Reject> {
    let ads = matches!(
        c.sds_config
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref()),
        Some(core::config_source::ConfigSourceSpecifier::Ads(_))
    );
    if !ads || c.name.is_empty() {
        return Err(format!(
            "{what}: secrets must be named and come over ADS (SDS)"
        ));
    }
    Ok(c.name.clone())
}

/// The parts of a CommonTlsContext meshbench runs: one certificate and one validation
/// context, both by SDS name; SAN matchers of type URI (exact); TLS 1.2-1.3; ALPN.
fn common(c: &tls::CommonTlsContext) -> Result<(Secrets, Vec<String>, Vec<String>), Reject> {
    use tls::common_tls_context::ValidationContextType;
    if !c.tls_certificates.is_empty() || c.tls_certificate_sds_secret_configs.len() != 1 {
        return Err("TLS context: exactly one certificate, by SDS name, is supported".into());
    }
    let cert = sds_name(&c.tls_certificate_sds_secret_configs[0], "certificate")?;
    let (default, ca) =
        match &c.validation_context_type {
            Some(ValidationContextType::CombinedValidationContext(v)) => (
                v.default_validation_context.clone().unwrap_or_default(),
                sds_name(
                    v.validation_context_sds_secret_config.as_ref().ok_or(
                        "TLS context: the combined validation context needs an SDS secret",
                    )?,
                    "validation context",
                )?,
            ),
            Some(ValidationContextType::ValidationContextSdsSecretConfig(s)) => {
                (Default::default(), sds_name(s, "validation context")?)
            }
            _ => return Err(
                "TLS context: a validation context by SDS name is required (peers are verified)"
                    .into(),
            ),
        };
    let mut sans = Vec::new();
    for m in &default.match_typed_subject_alt_names {
        use envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
        let uri = m.san_type == tls::subject_alt_name_matcher::SanType::Uri as i32;
        match m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref()) {
            Some(MatchPattern::Exact(s)) if uri && m.oid.is_empty() => sans.push(s.clone()),
            _ => {
                return Err(
                    "TLS context: only exact URI subject alt name matchers are supported".into(),
                )
            }
        }
    }
    #[allow(deprecated)]
    let unsupported_validation = default.trusted_ca.is_some()
        || !default.verify_certificate_spki.is_empty()
        || !default.verify_certificate_hash.is_empty()
        || !default.match_subject_alt_names.is_empty()
        || default.crl.is_some()
        || default.allow_expired_certificate
        || default.trust_chain_verification != 0;
    if unsupported_validation {
        return Err("TLS context: validation beyond the root and URI SANs is not supported".into());
    }
    if let Some(p) = &c.tls_params {
        use tls::tls_parameters::TlsProtocol;
        let ok = |v: i32, dflt| {
            let v = if v == TlsProtocol::TlsAuto as i32 {
                dflt
            } else {
                v
            };
            v == TlsProtocol::TlSv12 as i32 || v == TlsProtocol::TlSv13 as i32
        };
        if !ok(p.tls_minimum_protocol_version, TlsProtocol::TlSv12 as i32)
            || !ok(p.tls_maximum_protocol_version, TlsProtocol::TlSv13 as i32)
            || !p.cipher_suites.is_empty()
            || !p.ecdh_curves.is_empty()
            || !p.signature_algorithms.is_empty()
        {
            return Err(
                "TLS context: TLS 1.2-1.3 with default ciphers, curves and signatures only".into(),
            );
        }
    }
    if c.custom_handshaker.is_some() || c.key_log.is_some() {
        return Err("TLS context: custom handshakers and key logs are not supported".into());
    }
    Ok((Secrets { cert, ca }, sans, c.alpn_protocols.clone()))
}

/// A cluster's transport socket.
pub fn upstream(ts: &core::TransportSocket) -> Result<Socket<UpstreamTls>, Reject> {
    let any = typed(ts)?;
    if is_raw(ts, any) {
        return Ok(Socket::Plaintext);
    }
    match any {
        Some(a) if a.type_url == UPSTREAM_TYPE => {
            let u: tls::UpstreamTlsContext = decode(a)?;
            let c = u
                .common_tls_context
                .as_ref()
                .ok_or("upstream TLS context without a common_tls_context")?;
            let (secrets, sans, alpn) = common(c)?;
            if u.auto_host_sni || u.auto_sni_san_validation || u.allow_renegotiation {
                return Err(
                    "upstream TLS: auto SNI, SNI SAN validation and renegotiation are not supported"
                        .into(),
                );
            }
            Ok(Socket::Tls(UpstreamTls {
                secrets,
                sni: u.sni,
                sans,
                alpn,
            }))
        }
        _ => Err(format!(
            "transport socket {}: only {TLS_SOCKET} (UpstreamTlsContext) and {RAW_BUFFER_SOCKET} are supported",
            ts.name
        )),
    }
}

/// A listener chain's transport socket.
pub fn downstream(ts: &core::TransportSocket) -> Result<Socket<DownstreamTls>, Reject> {
    let any = typed(ts)?;
    if is_raw(ts, any) {
        return Ok(Socket::Plaintext);
    }
    match any {
        Some(a) if a.type_url == DOWNSTREAM_TYPE => {
            let d: tls::DownstreamTlsContext = decode(a)?;
            let c = d
                .common_tls_context
                .as_ref()
                .ok_or("downstream TLS context without a common_tls_context")?;
            let (secrets, sans, _alpn) = common(c)?;
            if !sans.is_empty() {
                return Err("downstream TLS: client SAN matching is not supported (use RBAC)".into());
            }
            if d.require_sni.is_some_and(|v| v.value) || d.session_ticket_keys_type.is_some() {
                return Err("downstream TLS: require_sni and session tickets are not supported".into());
            }
            Ok(Socket::Tls(DownstreamTls {
                secrets,
                require_client: d.require_client_certificate.is_some_and(|v| v.value),
            }))
        }
        _ => Err(format!(
            "transport socket {}: only {TLS_SOCKET} (DownstreamTlsContext) and {RAW_BUFFER_SOCKET} are supported",
            ts.name
        )),
    }
}

/// A secret from SDS: a certificate with its key, or a root to trust (PEM, inline).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    Cert {
        chain_pem: Vec<u8>,
        key_pem: Vec<u8>,
    },
    Ca {
        pem: Vec<u8>,
    },
}

fn inline(d: &Option<core::DataSource>, what: &str) -> Result<Vec<u8>, Reject> {
    use core::data_source::Specifier;
    match d.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(Specifier::InlineBytes(b)) => Ok(b.clone()),
        Some(Specifier::InlineString(s)) => Ok(s.clone().into_bytes()),
        _ => Err(format!(
            "{what}: only inline bytes or strings are supported"
        )),
    }
}

pub fn secret(s: &tls::Secret) -> Result<(String, Secret), Reject> {
    let err = |m: &str| format!("secret {}: {m}", s.name);
    let v = match &s.r#type {
        Some(tls::secret::Type::TlsCertificate(c)) => {
            if c.private_key_provider.is_some() || c.watched_directory.is_some() {
                return Err(err(
                    "private key providers and watched directories are not supported",
                ));
            }
            Secret::Cert {
                chain_pem: inline(&c.certificate_chain, "certificate_chain")
                    .map_err(|e| err(&e))?,
                key_pem: inline(&c.private_key, "private_key").map_err(|e| err(&e))?,
            }
        }
        Some(tls::secret::Type::ValidationContext(v)) => Secret::Ca {
            pem: inline(&v.trusted_ca, "trusted_ca").map_err(|e| err(&e))?,
        },
        _ => {
            return Err(err(
                "only TLS certificates and validation contexts are supported",
            ))
        }
    };
    Ok((s.name.clone(), v))
}

/// Secrets received and the configs built from them.
#[derive(Default)]
pub struct TlsStore {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    secrets: HashMap<String, Secret>,
    servers: HashMap<DownstreamTls, Arc<rustls::ServerConfig>>,
    clients: HashMap<UpstreamTls, Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStore")
    }
}

impl TlsStore {
    /// Checks `secrets` (each certificate must parse with its key, each root must parse)
    /// and stores them; configs built from older ones are dropped. Nothing changes on error.
    pub fn update(&self, secrets: Vec<(String, Secret)>) -> Result<(), Reject> {
        for (name, s) in &secrets {
            let check = match s {
                Secret::Cert { chain_pem, key_pem } => security::server_config(
                    &Material {
                        chain_pem: chain_pem.clone(),
                        key_pem: key_pem.clone(),
                        roots_pem: vec![],
                    },
                    false,
                )
                .map(drop),
                Secret::Ca { pem } => security::roots_check(pem),
            };
            check.map_err(|e| format!("secret {name}: {e}"))?;
        }
        let mut inner = self.inner.write().unwrap();
        for (name, s) in secrets {
            inner.secrets.insert(name, s);
        }
        inner.servers.clear();
        inner.clients.clear();
        Ok(())
    }

    pub fn has(&self, name: &str) -> bool {
        self.inner.read().unwrap().secrets.contains_key(name)
    }

    /// Names held with what each is (for the admin's config dump).
    pub fn summary(&self) -> BTreeMap<String, &'static str> {
        self.inner
            .read()
            .unwrap()
            .secrets
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    match s {
                        Secret::Cert { .. } => "tls_certificate",
                        Secret::Ca { .. } => "validation_context",
                    },
                )
            })
            .collect()
    }

    fn material(inner: &Inner, s: &Secrets) -> Result<Material, String> {
        let missing = |n: &str| format!("secret {n} not received (SDS)");
        let (chain_pem, key_pem) = match inner.secrets.get(&s.cert) {
            Some(Secret::Cert { chain_pem, key_pem }) => (chain_pem.clone(), key_pem.clone()),
            Some(_) => return Err(format!("secret {} is not a certificate", s.cert)),
            None => return Err(missing(&s.cert)),
        };
        let roots_pem = match inner.secrets.get(&s.ca) {
            Some(Secret::Ca { pem }) => pem.clone(),
            Some(_) => return Err(format!("secret {} is not a validation context", s.ca)),
            None => return Err(missing(&s.ca)),
        };
        Ok(Material {
            chain_pem,
            key_pem,
            roots_pem,
        })
    }

    pub fn server(&self, d: &DownstreamTls) -> Result<Arc<rustls::ServerConfig>, String> {
        if let Some(c) = self.inner.read().unwrap().servers.get(d) {
            return Ok(c.clone());
        }
        let mut inner = self.inner.write().unwrap();
        let m = Self::material(&inner, &d.secrets)?;
        let c = security::server_config(&m, d.require_client)?;
        inner.servers.insert(d.clone(), c.clone());
        Ok(c)
    }

    pub fn client(&self, u: &UpstreamTls) -> Result<Arc<rustls::ClientConfig>, String> {
        if let Some(c) = self.inner.read().unwrap().clients.get(u) {
            return Ok(c.clone());
        }
        let mut inner = self.inner.write().unwrap();
        let m = Self::material(&inner, &u.secrets)?;
        let c = security::client_config(
            &m,
            u.sans.clone(),
            u.alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        )?;
        inner.clients.insert(u.clone(), c.clone());
        Ok(c)
    }
}
