//! xDS v3: translation of the mesh model into Envoy resources (one file per resource type),
//! the versioned snapshot cache, the ADS server with its nonce/ACK/NACK rules, the debounce in
//! front of it, and the Envoy bootstrap that points a real Envoy at it.
//!
//! Layering: `cluster`, `endpoint`, `route`, `listener` know the mesh and Envoy's protos but no
//! streams; `ads` knows streams, nonces and versions but nothing of the mesh; `snapshot` is
//! the seam between them.

pub mod ads;
pub mod bootstrap;
pub mod cluster;
pub mod debounce;
pub mod endpoint;
pub mod gateway;
pub mod listener;
pub mod node;
pub mod rbac;
pub mod route;
pub mod secret;
pub mod snapshot;
pub mod tls;

use std::hash::{Hash, Hasher};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf;
use prost::{Message, Name};

pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Which ADS method a client uses: state of the world or delta (incremental).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdsMode {
    #[default]
    Sotw,
    Delta,
}

impl std::fmt::Display for XdsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdsMode::Sotw => "sotw",
            XdsMode::Delta => "delta",
        })
    }
}

/// Push order, make-before-break: clusters before the endpoints that fill them, listeners
/// before the routes they name; secrets last, as istiod pushes them (clusters and listeners
/// that name a secret warm until it arrives, and a proxy asks for it at once).
pub const PUSH_ORDER: [&str; 5] = [
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
];

/// Short name of a type URL for logs, metrics and the REST API (`cds`, `eds`, `lds`, `rds`,
/// `sds`).
pub fn type_short(type_url: &str) -> &'static str {
    match type_url {
        LISTENER_TYPE => "lds",
        ROUTE_TYPE => "rds",
        CLUSTER_TYPE => "cds",
        ENDPOINT_TYPE => "eds",
        SECRET_TYPE => "sds",
        _ => "unknown",
    }
}

/// The outbound listener port on every pod IP (the app sends outbound HTTP there).
pub const OUTBOUND_PORT: u16 = 15001;
/// Name of the route configuration the outbound listener uses (route configs are named by port).
pub const OUTBOUND_ROUTE_NAME: &str = "15001";
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const ROUTER_FILTER: &str = "envoy.filters.http.router";
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
pub const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
pub const TCP_PROXY_FILTER: &str = "envoy.filters.network.tcp_proxy";
pub const ORIGINAL_DST_FILTER: &str = "envoy.filters.listener.original_dst";
/// A captured sidecar's ORIGINAL_DST clusters (istiod's names): outbound connections and
/// requests no service claims, and inbound connections to undeclared ports.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";
/// Where a captured sidecar's inbound passthrough connections come from (Istio's): the
/// capture rules let loopback traffic from it through instead of capturing it again.
pub const INBOUND_PASSTHROUGH_SOURCE: &str = "127.0.0.6";

/// One encoded resource with a content hash (the per-resource version).
#[derive(Clone, Debug)]
pub struct Resource {
    pub name: String,
    pub any: protobuf::Any,
    pub hash: u64,
}

impl Resource {
    pub fn new<T: Message + Name>(name: impl Into<String>, msg: T) -> Resource {
        let any = envoy_types::util::pack_any(msg);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        any.value.hash(&mut h);
        Resource {
            name: name.into(),
            any,
            hash: h.finish(),
        }
    }
}

/// Istio's cluster name: `outbound|PORT|SUBSET|HOST`.
pub fn outbound_cluster_name(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or(""))
}

/// Istio's inbound cluster name: `inbound|PORT||`.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

pub(crate) fn pb_duration(d: Duration) -> protobuf::Duration {
    protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(crate) fn u32v(v: u32) -> Option<protobuf::UInt32Value> {
    Some(protobuf::UInt32Value { value: v })
}

/// A config source that says "over the ADS stream".
pub(crate) fn ads_source() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn socket_address(ip: &str, port: u16) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    }
}
