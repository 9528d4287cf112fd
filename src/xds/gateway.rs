//! What a gateway proxy (node id `router~...`) gets, as istiod builds it: for the Gateways
//! whose selector matches its labels (in any namespace), one listener per port its servers
//! use, named `0.0.0.0_PORT` where PORT is the target port of the gateway Service's port the
//! server names (a server on 80 of a Service mapping 80 -> 8080 listens on 8080); each with
//! an HTTP connection manager whose RDS route configuration is `http.PORT`. The route
//! configuration holds a virtual host `HOST:SERVER_PORT` for every host where a bound
//! VirtualService's hosts and a server's hosts intersect, with the VirtualService's routes;
//! with nothing bound, the `blackhole:PORT` virtual host answers 404.
//!
//! Gateways get no sidecar listeners and no inbound clusters; their clusters and endpoints are
//! the outbound ones every sidecar gets.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::route::v3::{self as route, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;

use super::node::NodeInfo;
use super::*;
use crate::model::{exported, labels_match, GatewayServer, GatewaySpec, Mesh};

/// Name of a gateway's route configuration for a listener port.
pub fn route_name(port: u16) -> String {
    format!("http.{port}")
}

/// Name of a gateway listener.
pub fn listener_name(port: u16) -> String {
    format!("0.0.0.0_{port}")
}

type GatewayKey = (String, String);

/// The servers of the Gateways selecting this node, by listener port.
fn servers_by_port<'a>(
    mesh: &'a Mesh,
    node: &NodeInfo,
) -> BTreeMap<u16, Vec<(&'a GatewayKey, &'a GatewayServer)>> {
    let mut out: BTreeMap<u16, Vec<(&GatewayKey, &GatewayServer)>> = BTreeMap::new();
    let selects =
        |g: &GatewaySpec| !g.selector.is_empty() && labels_match(&g.selector, &node.labels);
    for (key, g) in mesh.gateways.iter().filter(|(_, g)| selects(g)) {
        for s in &g.servers {
            out.entry(target_port(mesh, node, s.port))
                .or_default()
                .push((key, s));
        }
    }
    out
}

/// The target port of the gateway pod's Service port `port` (istiod binds the listener there);
/// `port` itself when no Service of the pod's namespace selecting it has that port.
fn target_port(mesh: &Mesh, node: &NodeInfo, port: u16) -> u16 {
    mesh.ports_serving(&node.namespace, &node.labels)
        .find(|p| p.port == port)
        .and_then(|p| p.target_port.number())
        .unwrap_or(port)
}

/// A gateway's listeners. They bind the pod IP, as meshbench's sidecars do (pods share the
/// host's network on the local backend), under istiod's names.
pub fn listeners(mesh: &Mesh, node: &NodeInfo) -> Vec<Resource> {
    let Some(ip) = &node.ip else { return vec![] };
    servers_by_port(mesh, node)
        .into_keys()
        .map(|port| {
            let manager = listener::http_connection_manager(
                &format!("outbound_0.0.0.0_{port}"),
                hcm::http_connection_manager::RouteSpecifier::Rds(hcm::Rds {
                    config_source: Some(ads_source()),
                    route_config_name: route_name(port),
                }),
                &[],
            );
            listener::listener(
                listener_name(port),
                ip,
                port,
                manager,
                core::TrafficDirection::Outbound,
            )
        })
        .collect()
}

/// The intersection of two hosts, each `*`, `*.suffix` or a name: the more specific one when
/// one covers the other.
pub fn intersect(a: &str, b: &str) -> Option<String> {
    let covers = |wide: &str, narrow: &str| -> bool {
        if wide == "*" {
            return true;
        }
        match wide.strip_prefix('*') {
            // `*.example.com` covers `a.example.com` and `*.a.example.com`.
            Some(suffix) => narrow.ends_with(suffix) && narrow.len() > suffix.len(),
            None => wide == narrow,
        }
    };
    if covers(a, b) {
        Some(b.to_string())
    } else if covers(b, a) {
        Some(a.to_string())
    } else {
        None
    }
}

/// A gateway's route configurations, one per listener port.
pub fn route_configs(mesh: &Mesh, node: &NodeInfo) -> HashMap<String, Resource> {
    let mut out = HashMap::new();
    for (port, servers) in servers_by_port(mesh, node) {
        // domain -> (virtual host name, routes), in the order VirtualServices bind.
        let mut hosts: Vec<(String, String, Vec<route::Route>)> = Vec::new();
        let bound = mesh
            .gateway_routes
            .iter()
            .filter(|gr| exported(&gr.export_to, &gr.namespace, &node.namespace));
        for gr in bound {
            for (gw, server) in servers.iter().filter(|(gw, _)| **gw == gr.gateway) {
                for h in &gr.hosts {
                    for (ns, sh) in &server.hosts {
                        let visible =
                            ns == "*" || *ns == gr.namespace || (ns == "." && gw.0 == gr.namespace);
                        let Some(domain) = visible.then(|| intersect(h, sh)).flatten() else {
                            continue;
                        };
                        let routes: Vec<route::Route> = gr
                            .http
                            .iter()
                            .enumerate()
                            .flat_map(|(i, r)| {
                                super::route::envoy_routes(mesh, &gr.source, i, r, "", port)
                            })
                            .collect();
                        match hosts.iter_mut().find(|(d, _, _)| *d == domain) {
                            Some((_, _, existing)) => existing.extend(routes),
                            None => hosts.push((
                                domain.clone(),
                                format!("{domain}:{}", server.port),
                                routes,
                            )),
                        }
                    }
                }
            }
        }
        let mut virtual_hosts: Vec<VirtualHost> = hosts
            .into_iter()
            .map(|(domain, name, routes)| VirtualHost {
                name,
                domains: if domain == "*" {
                    vec![domain]
                } else {
                    vec![domain.clone(), format!("{domain}:*")]
                },
                routes,
                ..Default::default()
            })
            .collect();
        if virtual_hosts.is_empty() {
            virtual_hosts.push(blackhole(port));
        }
        let name = route_name(port);
        let rc = RouteConfiguration {
            name: name.clone(),
            virtual_hosts,
            validate_clusters: Some(protobuf::BoolValue { value: false }),
            ..Default::default()
        };
        out.insert(name.clone(), Resource::new(name, rc));
    }
    out
}

/// istiod's virtual host for a gateway port nothing is bound to: 404 for everything.
fn blackhole(port: u16) -> VirtualHost {
    VirtualHost {
        name: format!("blackhole:{port}"),
        domains: vec!["*".into()],
        routes: vec![route::Route {
            name: "default".into(),
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::DirectResponse(
                route::DirectResponseAction {
                    status: 404,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_intersections() {
        for (a, b, want) in [
            ("*", "bookinfo.example.com", Some("bookinfo.example.com")),
            ("*.example.com", "*", Some("*.example.com")),
            ("*.example.com", "a.example.com", Some("a.example.com")),
            ("*.example.com", "*.a.example.com", Some("*.a.example.com")),
            ("a.example.com", "b.example.com", None),
            ("*.example.com", "example.com", None),
            ("*", "*", Some("*")),
        ] {
            assert_eq!(intersect(a, b).as_deref(), want, "{a} {b}");
            assert_eq!(intersect(b, a).as_deref(), want, "{b} {a}");
        }
    }
}
