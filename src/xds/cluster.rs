//! CDS: one EDS cluster per service port (`outbound|PORT||HOST`) and per DestinationRule subset
//! (`outbound|PORT|SUBSET|HOST`), with the rule's load balancer, circuit breakers and outlier
//! detection; one STATIC inbound cluster per port a sidecar's pod serves (`inbound|PORT||`).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{self as cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::util::pack_any;

use super::*;
use crate::model::{ClientTls, LoadBalancer, Mesh, MtlsMode, SelectIndex, TrafficPolicy};

/// Istio's default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every outbound cluster of the mesh, sorted by name.
pub fn outbound_clusters(mesh: &Mesh) -> Vec<Resource> {
    let mut out = Vec::new();
    let index = SelectIndex::new(mesh);
    for (host, svc) in &mesh.services {
        let policy = mesh.policies.get(host);
        // The identities a client accepts from the service: its workloads' service accounts.
        let mut sans: Vec<String> = index
            .selected(svc)
            .iter()
            .filter(|w| w.labels.contains_key(crate::model::TLS_MODE_LABEL))
            .map(|w| {
                crate::security::spiffe_id(
                    &svc.namespace,
                    w.service_account.as_deref().unwrap_or("default"),
                )
            })
            .collect();
        sans.sort();
        sans.dedup();
        let server_mode = mesh.namespace_mtls(&svc.namespace);
        for port in &svc.ports {
            let base = policy.and_then(|p| p.traffic_policy.as_ref());
            let tls = |tp: &TrafficPolicy| Transport {
                port: port.port,
                host,
                sans: &sans,
                mode: match tp.tls {
                    Some(ClientTls::Disable) => TlsChoice::Plaintext,
                    Some(ClientTls::IstioMutual) => TlsChoice::Mutual,
                    // Istio's auto mTLS: mutual TLS to endpoints with a sidecar unless the
                    // server side is known to refuse it.
                    None if server_mode == MtlsMode::Disable => TlsChoice::Plaintext,
                    None => TlsChoice::Auto,
                },
            };
            let name = outbound_cluster_name(port.port, None, host);
            let tp = TrafficPolicy::merged(base, None);
            out.push(Resource::new(
                name.clone(),
                eds_cluster(&name, &tp, &tls(&tp)),
            ));
            for subset in policy.map(|p| p.subsets.as_slice()).unwrap_or_default() {
                let name = outbound_cluster_name(port.port, Some(&subset.name), host);
                let tp = TrafficPolicy::merged(base, subset.traffic_policy.as_ref());
                out.push(Resource::new(
                    name.clone(),
                    eds_cluster(&name, &tp, &tls(&tp)),
                ));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// How a cluster's connections are secured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TlsChoice {
    Plaintext,
    /// ISTIO_MUTUAL: every endpoint.
    Mutual,
    /// Auto mTLS: endpoints labelled with a sidecar (`tlsMode: istio`), plaintext to the rest.
    Auto,
}

struct Transport<'a> {
    port: u16,
    host: &'a str,
    sans: &'a [String],
    mode: TlsChoice,
}

fn apply_transport(c: &mut Cluster, t: &Transport) {
    let socket = || super::tls::upstream_socket(t.port, t.host, t.sans);
    match t.mode {
        TlsChoice::Plaintext => {}
        TlsChoice::Mutual => c.transport_socket = Some(socket()),
        TlsChoice::Auto => {
            use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
            c.transport_socket_matches = vec![
                cluster::cluster::TransportSocketMatch {
                    name: "tlsMode-istio".into(),
                    r#match: Some(Struct {
                        fields: [(
                            "tlsMode".to_string(),
                            Value {
                                kind: Some(Kind::StringValue("istio".into())),
                            },
                        )]
                        .into(),
                    }),
                    transport_socket: Some(socket()),
                },
                cluster::cluster::TransportSocketMatch {
                    name: "tlsMode-disabled".into(),
                    r#match: Some(Struct::default()),
                    transport_socket: Some(super::tls::raw_buffer_socket()),
                },
            ];
        }
    }
}

fn eds_cluster(name: &str, tp: &TrafficPolicy, transport: &Transport) -> Cluster {
    let mut c = Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads_source()),
            service_name: name.to_string(),
        }),
        connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
        ..Default::default()
    };
    apply_policy(&mut c, tp);
    apply_transport(&mut c, transport);
    c
}

fn apply_policy(c: &mut Cluster, tp: &TrafficPolicy) {
    c.lb_policy = match tp.load_balancer.unwrap_or(LoadBalancer::RoundRobin) {
        LoadBalancer::RoundRobin => cluster::cluster::LbPolicy::RoundRobin,
        LoadBalancer::LeastRequest => cluster::cluster::LbPolicy::LeastRequest,
        LoadBalancer::Random => cluster::cluster::LbPolicy::Random,
    } as i32;
    if let Some(cp) = &tp.connection_pool {
        if let Some(t) = cp.connect_timeout {
            c.connect_timeout = Some(pb_duration(t));
        }
        let th = cluster::circuit_breakers::Thresholds {
            max_connections: cp.max_connections.and_then(u32v),
            max_pending_requests: cp.http1_max_pending_requests.and_then(u32v),
            max_requests: cp.http2_max_requests.and_then(u32v),
            max_retries: cp.max_retries.and_then(u32v),
            ..Default::default()
        };
        c.circuit_breakers = Some(cluster::CircuitBreakers {
            thresholds: vec![th],
            ..Default::default()
        });
        if let Some(n) = cp.max_requests_per_connection {
            let opts = upstream_http::HttpProtocolOptions {
                common_http_protocol_options: Some(core::HttpProtocolOptions {
                    max_requests_per_connection: u32v(n),
                    ..Default::default()
                }),
                upstream_protocol_options: Some(
                    upstream_http::http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        upstream_http::http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                upstream_http::http_protocol_options::explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                                    core::Http1ProtocolOptions::default(),
                                ),
                            ),
                        },
                    ),
                ),
                ..Default::default()
            };
            c.typed_extension_protocol_options.insert(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                pack_any(opts),
            );
        }
    }
    if let Some(od) = &tp.outlier_detection {
        // As istiod writes it: a configured count is enforced (100%) unless it is 0, and the
        // panic threshold is minHealthPercent (0 by default, so panic mode is off).
        let enforced = |n: Option<u32>| n.map(|n| if n > 0 { 100 } else { 0 }).and_then(u32v);
        c.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: od.consecutive_5xx_errors.and_then(u32v),
            enforcing_consecutive_5xx: enforced(od.consecutive_5xx_errors),
            consecutive_gateway_failure: od.consecutive_gateway_errors.and_then(u32v),
            enforcing_consecutive_gateway_failure: enforced(od.consecutive_gateway_errors),
            interval: od.interval.map(pb_duration),
            base_ejection_time: od.base_ejection_time.map(pb_duration),
            max_ejection_percent: od.max_ejection_percent.and_then(u32v),
            ..Default::default()
        });
        c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(envoy_types::pb::envoy::r#type::v3::Percent {
                value: f64::from(od.min_health_percent.unwrap_or(0)),
            }),
            ..Default::default()
        });
    }
}

/// The inbound cluster for a pod port: a STATIC cluster pointing at the app's pod-local address.
/// `PassthroughCluster` and `InboundPassthroughCluster` (ORIGINAL_DST): a captured sidecar's
/// connections to destinations the mesh does not know go where they were going.
pub fn passthrough_clusters() -> Vec<Resource> {
    [
        super::PASSTHROUGH_CLUSTER,
        super::INBOUND_PASSTHROUGH_CLUSTER,
    ]
    .into_iter()
    .map(|name| {
        // Inbound passthrough connects from 127.0.0.6, which the capture rules let through
        // (from the sidecar's uid to the pod's own address would be captured again: a loop).
        let upstream_bind_config = (name == super::INBOUND_PASSTHROUGH_CLUSTER)
            .then(|| envoy_types::pb::envoy::config::core::v3::BindConfig {
                source_address: Some(envoy_types::pb::envoy::config::core::v3::SocketAddress {
                    address: INBOUND_PASSTHROUGH_SOURCE.into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(0),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            });
        Resource::new(
            name,
            Cluster {
                name: name.into(),
                cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
                    cluster::cluster::DiscoveryType::OriginalDst as i32,
                )),
                lb_policy: cluster::cluster::LbPolicy::ClusterProvided as i32,
                connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
                upstream_bind_config,
                ..Default::default()
            },
        )
    })
    .collect()
}

pub fn inbound_cluster(port: u16, app_ip: &str) -> Resource {
    let name = inbound_cluster_name(port);
    let c = Cluster {
        name: name.clone(),
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(pb_duration(DEFAULT_CONNECT_TIMEOUT)),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.clone(),
            endpoints: vec![super::endpoint::locality(vec![
                super::endpoint::lb_endpoint(app_ip, port, 1, true),
            ])],
            ..Default::default()
        }),
        ..Default::default()
    };
    Resource::new(name, c)
}
