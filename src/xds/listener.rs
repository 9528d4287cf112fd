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
use crate::model::{labels_match, Mesh, TargetPort};

/// Ports (targetPort) on which this proxy's pod serves some service, sorted.
pub fn inbound_ports(mesh: &Mesh, node: &NodeInfo) -> Vec<u16> {
    let mut ports: Vec<u16> = mesh
        .services
        .values()
        .filter(|s| s.namespace == node.namespace)
        .filter(|s| {
            s.selector
                .as_ref()
                .is_some_and(|sel| !sel.is_empty() && labels_match(sel, &node.labels))
        })
        .flat_map(|s| s.ports.iter())
        .filter_map(|p| match p.target_port {
            TargetPort::Number(n) => Some(n),
            TargetPort::Name(_) => None,
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Listeners for one proxy; empty when the node id carries no pod IP.
pub fn listeners(mesh: &Mesh, node: &NodeInfo) -> Vec<Resource> {
    let Some(ip) = &node.ip else { return vec![] };
    let mut out = vec![outbound_listener(ip)];
    for port in inbound_ports(mesh, node) {
        out.push(inbound_listener(ip, port));
    }
    out
}

pub fn outbound_listener(ip: &str) -> Resource {
    let manager = http_connection_manager(
        "outbound",
        hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads_source()),
            route_config_name: OUTBOUND_ROUTE_NAME.to_string(),
        }),
    );
    listener(
        format!("{ip}_{OUTBOUND_PORT}"),
        ip,
        OUTBOUND_PORT,
        manager,
        core::TrafficDirection::Outbound,
    )
}

pub fn inbound_listener(ip: &str, port: u16) -> Resource {
    let manager = http_connection_manager(
        &format!("inbound_{port}"),
        hcm::http_connection_manager::RouteSpecifier::RouteConfig(
            super::route::inbound_route_config(port),
        ),
    );
    listener(
        format!("{ip}_{port}"),
        ip,
        port,
        manager,
        core::TrafficDirection::Inbound,
    )
}

/// HCM with the fault filter (per-route config turns it on) before the router, as Istio does.
/// Never an empty filter list: Envoy ACKs that and then hangs every request.
fn http_connection_manager(
    stat_prefix: &str,
    routes: hcm::http_connection_manager::RouteSpecifier,
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
        http_filters: vec![
            filter(FAULT_FILTER, pack_any(HttpFault::default())),
            filter(ROUTER_FILTER, pack_any(Router::default())),
        ],
        ..Default::default()
    }
}

fn listener(
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
