//! LDS, per proxy: the outbound listener on POD_IP:15001 (HCM + RDS `15001`; the app sends its
//! outbound HTTP there with the service as Host), and one inbound listener on
//! POD_IP:targetPort for each port a service selecting this pod serves (HCM with an inline
//! route to `inbound|PORT||`, whose endpoint is the app on its pod-local address).

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::listener::v3::{self as listener, Listener};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    self as hcm, HttpConnectionManager,
};
use envoy_types::util::pack_any;

use super::node::NodeInfo;
use super::*;
use crate::model::{LocalRateLimitSpec, Mesh, MtlsMode, RateLimitPatch, RouteSelector};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3 as types;
use prost::Message;

/// Ports (targetPort) on which this proxy's pod serves some service, sorted.
pub fn inbound_ports(mesh: &Mesh, node: &NodeInfo) -> Vec<u16> {
    let mut ports: Vec<u16> = mesh
        .ports_serving(&node.namespace, &node.labels)
        .filter_map(|p| p.target_port.number())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Listeners for one proxy; empty when the node id carries no pod IP. EnvoyFilters that
/// select the proxy's workload add their local rate limits (filter and per-route configs).
pub fn listeners(mesh: &Mesh, node: &NodeInfo) -> Vec<Resource> {
    let Some(ip) = &node.ip else { return vec![] };
    let patches: Vec<&RateLimitPatch> = mesh
        .envoy_filters_for(&node.namespace, &node.labels)
        .flat_map(|f| f.patches.iter())
        .collect();
    let filter_limits = |inbound: bool, port: Option<u16>| -> Vec<&LocalRateLimitSpec> {
        patches
            .iter()
            .filter(|p| p.route.is_none())
            .filter(|p| {
                if inbound {
                    p.context.inbound()
                } else {
                    p.context.outbound()
                }
            })
            .filter(|p| p.port.is_none() || p.port == port)
            .map(|p| &p.limit)
            .collect()
    };
    if node.capture {
        let mut out = vec![virtual_outbound()];
        for port in mesh.service_port_numbers() {
            out.push(outbound_port_listener(
                port,
                &filter_limits(false, Some(port)),
            ));
        }
        // Ports no Service declares pass through only where nothing is enforced: not
        // under STRICT, and not when an AuthorizationPolicy applies (Istio puts mTLS and
        // network RBAC on its passthrough chains; meshbench has neither, so it refuses).
        let enforced = mesh.mtls_mode(&node.namespace, &node.labels, 0) == MtlsMode::Strict
            || mesh
                .authorization_for(&node.namespace, &node.labels)
                .next()
                .is_some();
        let inbound = inbound_ports(mesh, node)
            .into_iter()
            .map(|port| {
                let route_limits: Vec<(&RouteSelector, &LocalRateLimitSpec)> = patches
                    .iter()
                    .filter(|p| p.context.inbound() && (p.port.is_none() || p.port == Some(port)))
                    .filter_map(|p| p.route.as_ref().map(|r| (r, &p.limit)))
                    .collect();
                let l = inbound_listener(
                    "0.0.0.0",
                    port,
                    &filter_limits(true, Some(port)),
                    &route_limits,
                    mesh.mtls_mode(&node.namespace, &node.labels, port),
                    &super::rbac::filters(mesh, &node.namespace, &node.labels),
                );
                (
                    port,
                    Listener::decode(l.any.value.as_slice()).expect("just encoded"),
                )
            })
            .collect();
        out.push(virtual_inbound(inbound, !enforced));
        return out;
    }
    let mut out = vec![outbound_listener(ip, &filter_limits(false, None))];
    for port in inbound_ports(mesh, node) {
        let route_limits: Vec<(&RouteSelector, &LocalRateLimitSpec)> = patches
            .iter()
            .filter(|p| p.context.inbound() && (p.port.is_none() || p.port == Some(port)))
            .filter_map(|p| p.route.as_ref().map(|r| (r, &p.limit)))
            .collect();
        out.push(inbound_listener(
            ip,
            port,
            &filter_limits(true, Some(port)),
            &route_limits,
            mesh.mtls_mode(&node.namespace, &node.labels, port),
            &super::rbac::filters(mesh, &node.namespace, &node.labels),
        ));
    }
    out
}

/// Envoy's `LocalRateLimit` for a spec.
pub fn local_rate_limit(spec: &LocalRateLimitSpec) -> LocalRateLimit {
    let fraction = |f: Option<(u32, u32)>| {
        f.map(|(numerator, denominator)| core::RuntimeFractionalPercent {
            default_value: Some(types::FractionalPercent {
                numerator,
                denominator: match denominator {
                    100 => types::fractional_percent::DenominatorType::Hundred,
                    10_000 => types::fractional_percent::DenominatorType::TenThousand,
                    _ => types::fractional_percent::DenominatorType::Million,
                } as i32,
            }),
            runtime_key: String::new(),
        })
    };
    #[allow(deprecated)] // `append` is what Istio's examples set
    let response_headers_to_add = spec
        .response_headers_to_add
        .iter()
        .map(|(k, v, append)| core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: k.clone(),
                value: v.clone(),
                ..Default::default()
            }),
            append_action: if *append {
                core::header_value_option::HeaderAppendAction::AppendIfExistsOrAdd
            } else {
                core::header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
            } as i32,
            ..Default::default()
        })
        .collect();
    LocalRateLimit {
        stat_prefix: spec.stat_prefix.clone(),
        token_bucket: spec.token_bucket.as_ref().map(|tb| types::TokenBucket {
            max_tokens: tb.max_tokens,
            tokens_per_fill: Some(envoy_types::pb::google::protobuf::UInt32Value {
                value: tb.tokens_per_fill,
            }),
            fill_interval: Some(pb_duration(tb.fill_interval)),
        }),
        filter_enabled: fraction(spec.filter_enabled),
        filter_enforced: fraction(spec.filter_enforced),
        response_headers_to_add,
        status: spec
            .status
            .map(|code| types::HttpStatus { code: code as i32 }),
        ..Default::default()
    }
}

/// Where iptables sends a captured pod's outbound connections (Istio's `virtualOutbound`):
/// each goes to the listener of its original destination (`use_original_dst`), else through
/// the passthrough chain to where it was going.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Where iptables sends a captured pod's inbound connections, on 15006.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub use crate::capture::INBOUND_CAPTURE_PORT;

fn tcp_proxy_chain(name: &str, cluster: &str) -> listener::FilterChain {
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        tcp_proxy::ClusterSpecifier, TcpProxy,
    };
    listener::FilterChain {
        name: name.into(),
        filters: vec![listener::Filter {
            name: TCP_PROXY_FILTER.into(),
            config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(
                TcpProxy {
                    stat_prefix: cluster.into(),
                    cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
                    ..Default::default()
                },
            ))),
        }],
        ..Default::default()
    }
}

/// `virtualOutbound`: 0.0.0.0:15001 with `use_original_dst`; what no listener takes passes
/// through (Istio's ALLOW_ANY outbound traffic policy).
pub fn virtual_outbound() -> Resource {
    let l = Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket_address("0.0.0.0", OUTBOUND_PORT)),
        use_original_dst: Some(protobuf::BoolValue { value: true }),
        filter_chains: vec![tcp_proxy_chain(
            "PassthroughFilterChain",
            PASSTHROUGH_CLUSTER,
        )],
        traffic_direction: core::TrafficDirection::Outbound as i32,
        ..Default::default()
    };
    Resource::new(VIRTUAL_OUTBOUND, l)
}

/// `0.0.0.0_PORT`: not bound (`bind_to_port: false`); `virtualOutbound` hands it the
/// connections to any address on PORT, routed by route configuration `PORT`.
pub fn outbound_port_listener(port: u16, limits: &[&LocalRateLimitSpec]) -> Resource {
    let manager = http_connection_manager(
        &format!("outbound_0.0.0.0_{port}"),
        hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads_source()),
            route_config_name: port.to_string(),
        }),
        limits,
    );
    let name = format!("0.0.0.0_{port}");
    let mut r = listener(
        name.clone(),
        "0.0.0.0",
        port,
        manager,
        core::TrafficDirection::Outbound,
    );
    let mut l = Listener::decode(r.any.value.as_slice()).expect("just encoded");
    l.bind_to_port = Some(protobuf::BoolValue { value: false });
    r = Resource::new(name, l);
    r
}

/// `virtualInbound`: 0.0.0.0:15006 with the `original_dst` listener filter; each inbound
/// port's chains (as the explicit layout's inbound listener has them, TLS split included)
/// matched by destination port, and (`passthrough`) a chain for any other port.
fn virtual_inbound(ports: Vec<(u16, Listener)>, passthrough: bool) -> Resource {
    let original_dst = listener::ListenerFilter {
        name: ORIGINAL_DST_FILTER.into(),
        config_type: Some(listener::listener_filter::ConfigType::TypedConfig(pack_any(
            envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst::default(),
        ))),
        ..Default::default()
    };
    let mut listener_filters = vec![original_dst];
    let mut filter_chains = Vec::new();
    for (port, l) in ports {
        if !l.listener_filters.is_empty() && listener_filters.len() == 1 {
            listener_filters.extend(l.listener_filters);
        }
        for mut chain in l.filter_chains {
            let m = chain
                .filter_chain_match
                .get_or_insert_with(Default::default);
            m.destination_port = Some(protobuf::UInt32Value { value: port as u32 });
            chain.name = if chain.name.is_empty() {
                format!("0.0.0.0_{port}")
            } else {
                format!("0.0.0.0_{port}_{}", chain.name)
            };
            filter_chains.push(chain);
        }
    }
    if passthrough {
        filter_chains.push(tcp_proxy_chain(
            "InboundPassthroughFilterChain",
            INBOUND_PASSTHROUGH_CLUSTER,
        ));
    }
    let l = Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket_address("0.0.0.0", INBOUND_CAPTURE_PORT)),
        listener_filters,
        filter_chains,
        traffic_direction: core::TrafficDirection::Inbound as i32,
        ..Default::default()
    };
    Resource::new(VIRTUAL_INBOUND, l)
}

pub fn outbound_listener(ip: &str, limits: &[&LocalRateLimitSpec]) -> Resource {
    let manager = http_connection_manager(
        "outbound",
        hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads_source()),
            route_config_name: OUTBOUND_ROUTE_NAME.to_string(),
        }),
        limits,
    );
    listener(
        format!("{ip}_{OUTBOUND_PORT}"),
        ip,
        OUTBOUND_PORT,
        manager,
        core::TrafficDirection::Outbound,
    )
}

pub fn inbound_listener(
    ip: &str,
    port: u16,
    limits: &[&LocalRateLimitSpec],
    route_limits: &[(&RouteSelector, &LocalRateLimitSpec)],
    mtls: MtlsMode,
    rbac: &[envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac],
) -> Resource {
    let mut rc = super::route::inbound_route_config(port);
    for vh in &mut rc.virtual_hosts {
        for r in &mut vh.routes {
            // The last matching patch wins, as successive MERGEs of one key would.
            if let Some((_, l)) = route_limits.iter().rev().find(|(sel, _)| {
                sel.vhost.as_ref().is_none_or(|n| *n == vh.name)
                    && sel.route.as_ref().is_none_or(|n| *n == r.name)
            }) {
                r.typed_per_filter_config.insert(
                    LOCAL_RATE_LIMIT_FILTER.into(),
                    pack_any(local_rate_limit(l)),
                );
            }
        }
    }
    let mut manager = http_connection_manager(
        &format!("inbound_{port}"),
        hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc),
        limits,
    );
    // istiod's order: the RBAC filters (DENY, then ALLOW) before everything else here.
    manager.http_filters.splice(
        0..0,
        rbac.iter().map(|r| hcm::HttpFilter {
            name: super::rbac::RBAC_FILTER.to_string(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(pack_any(
                r.clone(),
            ))),
            ..Default::default()
        }),
    );
    let mut r = listener(
        format!("{ip}_{port}"),
        ip,
        port,
        manager,
        core::TrafficDirection::Inbound,
    );
    if mtls != MtlsMode::Disable {
        let mut l = Listener::decode(r.any.value.as_slice()).expect("just encoded");
        secure_inbound(&mut l, mtls);
        r = Resource::new(r.name, l);
    }
    r
}

/// As istiod's inbound chains: the listener tells TLS from plaintext (tls_inspector); a TLS
/// connection gets the mutual TLS chain (a client certificate of the mesh is required), a
/// plaintext one the plaintext chain under PERMISSIVE and nothing under STRICT.
fn secure_inbound(l: &mut Listener, mtls: MtlsMode) {
    let plain = l.filter_chains.pop().expect("one chain");
    let by_transport = |t: &str| listener::FilterChainMatch {
        transport_protocol: t.to_string(),
        ..Default::default()
    };
    l.listener_filters = vec![super::tls::tls_inspector()];
    l.filter_chains = vec![listener::FilterChain {
        name: "inbound-mtls".into(),
        filter_chain_match: Some(by_transport("tls")),
        transport_socket: Some(super::tls::downstream_socket()),
        ..plain.clone()
    }];
    if mtls == MtlsMode::Permissive {
        l.filter_chains.push(listener::FilterChain {
            name: "inbound-plaintext".into(),
            filter_chain_match: Some(by_transport("raw_buffer")),
            ..plain
        });
    }
}

/// HCM with the fault filter (per-route config turns it on) before the router, as Istio does;
/// local rate limits inserted by EnvoyFilters come first. Never an empty filter list: Envoy
/// ACKs that and then hangs every request. Paths are normalized as istiod's default mesh
/// config (`pathNormalization` BASE) asks: dot segments resolved before RBAC and routing,
/// escaped slashes kept.
pub(super) fn http_connection_manager(
    stat_prefix: &str,
    routes: hcm::http_connection_manager::RouteSpecifier,
    limits: &[&LocalRateLimitSpec],
) -> HttpConnectionManager {
    let filter = |name: &str, any| hcm::HttpFilter {
        name: name.to_string(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any)),
        ..Default::default()
    };
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(routes),
        http_filters: limits
            .iter()
            .map(|l| filter(LOCAL_RATE_LIMIT_FILTER, pack_any(local_rate_limit(l))))
            .chain([
                filter(FAULT_FILTER, pack_any(HttpFault::default())),
                filter(ROUTER_FILTER, pack_any(Router::default())),
            ])
            .collect(),
        normalize_path: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
        path_with_escaped_slashes_action:
            hcm::http_connection_manager::PathWithEscapedSlashesAction::KeepUnchanged as i32,
        ..Default::default()
    }
}

pub(super) fn listener(
    name: String,
    ip: &str,
    port: u16,
    manager: HttpConnectionManager,
    direction: core::TrafficDirection,
) -> Resource {
    let l = Listener {
        name: name.clone(),
        address: Some(socket_address(ip, port)),
        filter_chains: vec![listener::FilterChain {
            filters: vec![listener::Filter {
                name: HCM_FILTER.to_string(),
                config_type: Some(listener::filter::ConfigType::TypedConfig(pack_any(manager))),
            }],
            ..Default::default()
        }],
        traffic_direction: direction as i32,
        ..Default::default()
    };
    Resource::new(name, l)
}
