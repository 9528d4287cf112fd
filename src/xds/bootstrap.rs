//! The Envoy bootstrap that makes a real Envoy a meshbench sidecar: the node identity as
//! Istio writes it, an admin listener, and ADS as the only dynamic source, through a static
//! HTTP/2 cluster (Envoy never initialises over an HTTP/1 xDS cluster).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::node::{router_id, sidecar_id, APP_IP_KEY, LABELS_KEY};
use crate::model::Labels;

#[derive(Clone, Debug)]
pub struct EnvoyBootstrap {
    pub pod_ip: String,
    pub pod_name: String,
    pub namespace: String,
    /// node.cluster: the app's service name.
    pub service: String,
    pub labels: Labels,
    pub app_ip: String,
    pub admin: SocketAddr,
    pub xds: SocketAddr,
    /// ADS method: SotW (`GRPC`) or delta (`DELTA_GRPC`).
    pub xds_mode: super::XdsMode,
    /// A gateway proxy (`router~...` node id) rather than a sidecar.
    pub router: bool,
}

impl EnvoyBootstrap {
    pub fn node_id(&self) -> String {
        if self.router {
            router_id(&self.pod_ip, &self.pod_name, &self.namespace)
        } else {
            sidecar_id(&self.pod_ip, &self.pod_name, &self.namespace)
        }
    }

    pub fn to_json(&self) -> Value {
        self.to_json_with_tls(None)
    }

    /// As [`EnvoyBootstrap::to_json`]; with `tls`, ADS goes over mutual TLS (pilot's
    /// `--xds-tls-addr`): Envoy presents that certificate and checks that pilot's chains to
    /// the root and names `istiod`.
    pub fn to_json_with_tls(&self, tls: Option<&crate::security::Material>) -> Value {
        let ads = json!({"ads": {}, "resource_api_version": "V3"});
        let mut v = json!({
            "node": {
                "id": self.node_id(),
                "cluster": self.service,
                "metadata": { LABELS_KEY: self.labels, APP_IP_KEY: self.app_ip },
            },
            "admin": {
                "address": {"socket_address": {"address": self.admin.ip().to_string(), "port_value": self.admin.port()}},
            },
            "dynamic_resources": {
                "ads_config": {
                    "api_type": match self.xds_mode {
                        super::XdsMode::Sotw => "GRPC",
                        super::XdsMode::Delta => "DELTA_GRPC",
                    },
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                },
                "cds_config": ads,
                "lds_config": ads,
            },
            "static_resources": {
                "clusters": [{
                    "name": "xds_cluster",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "xds_cluster",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": self.xds.ip().to_string(), "port_value": self.xds.port()
                        }}}}]}],
                    },
                }],
            },
        });
        if let Some(m) = tls {
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            v["static_resources"]["clusters"][0]["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": crate::security::PILOT_DNS_NAME,
                    "common_tls_context": {
                        "alpn_protocols": ["h2"],
                        "tls_certificates": [{
                            "certificate_chain": {"inline_string": text(&m.chain_pem)},
                            "private_key": {"inline_string": text(&m.key_pem)},
                        }],
                        "validation_context": {
                            "trusted_ca": {"inline_string": text(&m.roots_pem)},
                            "match_typed_subject_alt_names": [{
                                "san_type": "URI",
                                "matcher": {"exact": crate::security::pilot_id()},
                            }],
                        },
                    },
                },
            });
        }
        v
    }
}

/// Finds Envoy as docs/contracts.md says: `MESHBENCH_ENVOY`, else `envoy` on PATH.
pub fn find_envoy() -> Option<PathBuf> {
    std::env::var_os("MESHBENCH_ENVOY")
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("envoy"))
                    .find(|p| p.is_file())
            })
        })
}
