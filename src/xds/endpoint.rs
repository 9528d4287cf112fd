//! EDS: one ClusterLoadAssignment per outbound cluster, holding the addresses of the
//! workloads that the service (and subset) selects.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::{self as endpoint, ClusterLoadAssignment};

use super::*;
use crate::model::{port_endpoints, Mesh};

/// Assignments for every outbound cluster, keyed by cluster name.
pub fn assignments(mesh: &Mesh) -> HashMap<String, Resource> {
    let mut out = HashMap::new();
    for (host, svc) in &mesh.services {
        let subsets = mesh
            .policies
            .get(host)
            .map(|p| p.subsets.as_slice())
            .unwrap_or_default();
        let selected = mesh.selected(svc);
        for port in &svc.ports {
            let mut add = |name: String, labels| {
                let eps = port_endpoints(&selected, port, labels)
                    .map(|(e, p)| lb_endpoint(&e.address, p, e.weight, e.healthy))
                    .collect();
                let cla = ClusterLoadAssignment {
                    cluster_name: name.clone(),
                    endpoints: vec![locality(eps)],
                    ..Default::default()
                };
                out.insert(name.clone(), Resource::new(name, cla));
            };
            add(outbound_cluster_name(port.port, None, host), None);
            for s in subsets {
                add(
                    outbound_cluster_name(port.port, Some(&s.name), host),
                    Some(&s.labels),
                );
            }
        }
    }
    out
}

pub(crate) fn locality(lb_endpoints: Vec<endpoint::LbEndpoint>) -> endpoint::LocalityLbEndpoints {
    endpoint::LocalityLbEndpoints {
        lb_endpoints,
        ..Default::default()
    }
}

pub(crate) fn lb_endpoint(ip: &str, port: u16, weight: u32, healthy: bool) -> endpoint::LbEndpoint {
    endpoint::LbEndpoint {
        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
            endpoint::Endpoint {
                address: Some(socket_address(ip, port)),
                ..Default::default()
            },
        )),
        health_status: if healthy {
            core::HealthStatus::Healthy
        } else {
            core::HealthStatus::Unhealthy
        } as i32,
        load_balancing_weight: u32v(weight.max(1)),
        ..Default::default()
    }
}
