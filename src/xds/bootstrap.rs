//! The Envoy bootstrap that makes a real Envoy a meshbench sidecar: the node identity as
//! Istio writes it, an admin listener, and ADS as the only dynamic source, through a static
//! HTTP/2 cluster (Envoy never initialises over an HTTP/1 xDS cluster).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::node::{router_id, sidecar_id, APP_IP_KEY, INTERCEPTION_MODE_KEY, LABELS_KEY, REDIRECT};
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
    /// The pod's traffic is captured (node metadata `INTERCEPTION_MODE: REDIRECT`).
    pub capture: bool,
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
        let mut metadata = json!({ LABELS_KEY: self.labels, APP_IP_KEY: self.app_ip });
        if self.capture {
            metadata[INTERCEPTION_MODE_KEY] = json!(REDIRECT);
        }
        let mut v = json!({
            "node": {
                "id": self.node_id(),
                "cluster": self.service,
                "metadata": metadata,
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

/// What `meshbench proxy --bootstrap` takes from a bootstrap that [`EnvoyBootstrap`] wrote
/// (the agent writes one file for either proxy kind).
#[derive(Clone, Debug)]
pub struct Parsed {
    pub node_id: String,
    pub cluster: String,
    pub labels: Labels,
    pub app_ip: String,
    pub capture: bool,
    pub admin: SocketAddr,
    pub xds: SocketAddr,
    pub xds_mode: super::XdsMode,
    pub tls: Option<crate::security::Material>,
}

/// Reads back what [`EnvoyBootstrap::to_json_with_tls`] writes; other bootstraps are refused
/// with the field that does not fit.
pub fn parse(v: &Value) -> Result<Parsed, String> {
    let s = |ptr: &str| -> Result<String, String> {
        v.pointer(ptr)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| format!("bootstrap: {ptr} is missing or not a string"))
    };
    let addr = |ptr: &str| -> Result<SocketAddr, String> {
        let a = v
            .pointer(&format!("{ptr}/address"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("bootstrap: {ptr}/address is missing"))?;
        let p = v
            .pointer(&format!("{ptr}/port_value"))
            .and_then(Value::as_u64)
            .filter(|p| *p > 0 && *p <= 65535)
            .ok_or_else(|| format!("bootstrap: {ptr}/port_value is not a port"))?;
        let ip: std::net::IpAddr = a
            .parse()
            .map_err(|_| format!("bootstrap: {ptr}/address {a:?} is not an IP address"))?;
        Ok(SocketAddr::new(ip, p as u16))
    };
    let meta = v.pointer("/node/metadata");
    let labels: Labels = meta
        .and_then(|m| m.get(LABELS_KEY))
        .and_then(Value::as_object)
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let xds_mode = match s("/dynamic_resources/ads_config/api_type")?.as_str() {
        "GRPC" => super::XdsMode::Sotw,
        "DELTA_GRPC" => super::XdsMode::Delta,
        other => {
            return Err(format!(
                "bootstrap: api_type {other:?} (GRPC or DELTA_GRPC)"
            ))
        }
    };
    let cluster0 = "/static_resources/clusters/0";
    let tls = match v.pointer(&format!(
        "{cluster0}/transport_socket/typed_config/common_tls_context"
    )) {
        None => None,
        Some(c) => {
            let pem = |ptr: &str| -> Result<Vec<u8>, String> {
                c.pointer(ptr)
                    .and_then(Value::as_str)
                    .map(|t| t.as_bytes().to_vec())
                    .ok_or_else(|| format!("bootstrap: xds_cluster TLS {ptr} is missing"))
            };
            Some(crate::security::Material {
                chain_pem: pem("/tls_certificates/0/certificate_chain/inline_string")?,
                key_pem: pem("/tls_certificates/0/private_key/inline_string")?,
                roots_pem: pem("/validation_context/trusted_ca/inline_string")?,
            })
        }
    };
    Ok(Parsed {
        node_id: s("/node/id")?,
        cluster: s("/node/cluster")?,
        app_ip: meta
            .and_then(|m| m.get(APP_IP_KEY))
            .and_then(Value::as_str)
            .unwrap_or(super::node::DEFAULT_APP_IP)
            .to_string(),
        capture: meta
            .and_then(|m| m.get(INTERCEPTION_MODE_KEY))
            .and_then(Value::as_str)
            == Some(REDIRECT),
        labels,
        admin: addr("/admin/address/socket_address")?,
        xds: addr(&format!(
            "{cluster0}/load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address"
        ))?,
        xds_mode,
        tls,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_back_what_to_json_writes() {
        let b = EnvoyBootstrap {
            pod_ip: "10.1.0.2".into(),
            pod_name: "reviews-v1-0".into(),
            namespace: "default".into(),
            service: "reviews".into(),
            labels: [("app".to_string(), "reviews".to_string())].into(),
            app_ip: "127.0.0.1".into(),
            admin: "10.1.0.2:15000".parse().unwrap(),
            xds: "10.1.0.1:15012".parse().unwrap(),
            xds_mode: super::super::XdsMode::Delta,
            router: false,
            capture: true,
        };
        let m = crate::security::Material {
            chain_pem: b"chain".to_vec(),
            key_pem: b"key".to_vec(),
            roots_pem: b"root".to_vec(),
        };
        let p = parse(&b.to_json_with_tls(Some(&m))).unwrap();
        assert_eq!(p.node_id, b.node_id());
        assert_eq!(
            (p.cluster.as_str(), &p.labels, p.app_ip.as_str()),
            ("reviews", &b.labels, "127.0.0.1")
        );
        assert!(p.capture);
        assert_eq!((p.admin, p.xds), (b.admin, b.xds));
        assert_eq!(p.xds_mode, super::super::XdsMode::Delta);
        let t = p.tls.unwrap();
        assert_eq!(
            (t.chain_pem, t.key_pem, t.roots_pem),
            (m.chain_pem, m.key_pem, m.roots_pem)
        );
        let plain = parse(&b.to_json()).unwrap();
        assert!(plain.tls.is_none());
        let err = parse(&serde_json::json!({"node": {"id": "x"}})).unwrap_err();
        assert!(
            err.starts_with("bootstrap: /") && err.contains("missing"),
            "{err}"
        );
    }
}
