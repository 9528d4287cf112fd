//! Mutual TLS as istiod writes it for sidecars: the upstream TLS context of ISTIO_MUTUAL
//! clusters (and of auto mTLS's `tlsMode-istio` match), the downstream context of inbound
//! filter chains, and the listener filter that tells TLS from plaintext. Certificates come
//! by name over SDS: `default` (the workload's) and `ROOTCA` (the mesh's root).

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::transport_sockets::raw_buffer::v3::RawBuffer;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::util::pack_any;

use super::ads_source;

/// The workload certificate's secret name.
pub const CERT_SECRET: &str = "default";
/// The root certificate's secret name.
pub const ROOT_SECRET: &str = "ROOTCA";
pub const TLS_SOCKET: &str = "envoy.transport_sockets.tls";
pub const RAW_BUFFER_SOCKET: &str = "envoy.transport_sockets.raw_buffer";
pub const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
/// Endpoint metadata namespace read by `transport_socket_matches`.
pub const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";
/// ALPN a sidecar client offers (Istio's markers).
pub const CLIENT_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];
/// ALPN an inbound chain offers.
pub const SERVER_ALPN: [&str; 2] = ["h2", "http/1.1"];

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads_source()),
    }
}

fn common(alpn: &[&str], sans: &[String]) -> tls::CommonTlsContext {
    use tls::common_tls_context::{CombinedCertificateValidationContext, ValidationContextType};
    tls::CommonTlsContext {
        tls_params: Some(tls::TlsParameters {
            tls_minimum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: tls::tls_parameters::TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        alpn_protocols: alpn.iter().map(|a| a.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(tls::CertificateValidationContext {
                    match_typed_subject_alt_names: sans
                        .iter()
                        .map(|s| tls::SubjectAltNameMatcher {
                            san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: Some(matcher::StringMatcher {
                                match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(
                                    s.clone(),
                                )),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(ROOT_SECRET)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The client side of ISTIO_MUTUAL towards `host:port`, accepting the server identities
/// `sans` (none: any identity of the mesh).
pub fn upstream_socket(port: u16, host: &str, sans: &[String]) -> core::TransportSocket {
    let ctx = tls::UpstreamTlsContext {
        common_tls_context: Some(common(&CLIENT_ALPN, sans)),
        sni: format!("outbound_.{port}_._.{host}"),
        ..Default::default()
    };
    core::TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    }
}

/// Plaintext, said explicitly (auto mTLS's fallback match).
pub fn raw_buffer_socket() -> core::TransportSocket {
    core::TransportSocket {
        name: RAW_BUFFER_SOCKET.to_string(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            RawBuffer::default(),
        ))),
    }
}

/// The server side of an inbound chain: the client must present a certificate of the mesh.
pub fn downstream_socket() -> core::TransportSocket {
    let ctx = tls::DownstreamTlsContext {
        common_tls_context: Some(common(&SERVER_ALPN, &[])),
        require_client_certificate: Some(envoy_types::pb::google::protobuf::BoolValue {
            value: true,
        }),
        ..Default::default()
    };
    core::TransportSocket {
        name: TLS_SOCKET.to_string(),
        config_type: Some(core::transport_socket::ConfigType::TypedConfig(pack_any(
            ctx,
        ))),
    }
}

/// The listener filter that reads the first bytes to tell TLS from plaintext.
pub fn tls_inspector() -> envoy_types::pb::envoy::config::listener::v3::ListenerFilter {
    use envoy_types::pb::envoy::config::listener::v3 as listener;
    listener::ListenerFilter {
        name: TLS_INSPECTOR.to_string(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(
            pack_any(TlsInspector::default()),
        )),
        ..Default::default()
    }
}
