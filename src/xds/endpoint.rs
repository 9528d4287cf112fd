//! EDS: one ClusterLoadAssignment per outbound cluster, holding the addresses of the
//! workloads that the service (and subset) selects.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3::{self as endpoint, ClusterLoadAssignment};

use super::*;
use crate::model::{port_endpoints, Mesh, MtlsMode, SelectIndex, TLS_MODE_LABEL};

/// `envoy.transport_socket_match: {tlsMode: istio}`: what auto mTLS's cluster match reads.
fn tls_mode_metadata() -> core::Metadata {
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    core::Metadata {
        filter_metadata: [(
            super::tls::SOCKET_MATCH_KEY.to_string(),
            Struct {
                fields: [(
                    "tlsMode".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("istio".into())),
                    },
                )]
                .into(),
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// Assignments for every outbound cluster, keyed by cluster name.
pub fn assignments(mesh: &Mesh) -> HashMap<String, Resource> {
    let mut out = HashMap::new();
    let index = SelectIndex::new(mesh);
    for (host, svc) in &mesh.services {
        let subsets = mesh
            .policies
            .get(host)
            .map(|p| p.subsets.as_slice())
            .unwrap_or_default();
        let selected = index.selected(svc);
        for port in &svc.ports {
            let mut add = |name: String, labels| {
                let eps = port_endpoints(&selected, port, labels)
                    .map(|(e, p)| {
                        let mut ep = lb_endpoint(&e.address, p, e.weight, e.healthy);
                        // istiod's mtlsChecker: no mTLS to a port its PeerAuthentications
                        // (workload or port level included) turn off.
                        if e.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio")
                            && mesh.mtls_mode(&svc.namespace, &e.labels, p) != MtlsMode::Disable
                        {
                            ep.metadata = Some(tls_mode_metadata());
                        }
                        ep
                    })
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

#[cfg(test)]
mod tests {
    use crate::model::compile::compile;
    use crate::model::{SelectIndex, Workload, WorkloadEntrySpec};

    /// The index selects exactly what the plain scan selects, in the same order.
    #[test]
    fn select_index_matches_the_scan() {
        let mut text: String = (0..7)
            .map(|k| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: churn-svc-{k}, namespace: churn}}\nspec:\n  selector: {{app: churn-svc-{k}}}\n  ports: [{{name: http, port: 8080}}]\n---\n"))
            .collect();
        text.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: two-labels, namespace: churn}\nspec:\n  selector: {app: churn-svc-1, tier: x}\n  ports: [{name: http, port: 8080}]\n");
        let objects = crate::config::parse("t.yaml", &text).unwrap().objects;
        let workloads: Vec<Workload> = (0..200)
            .map(|i| Workload {
                name: format!("w{i}"),
                namespace: if i % 13 == 0 { "other" } else { "churn" }.into(),
                entry: WorkloadEntrySpec {
                    address: format!("10.0.{}.{}", i / 250, i % 250),
                    labels: [
                        ("app".to_string(), format!("churn-svc-{}", i % 7)),
                        (
                            "tier".to_string(),
                            if i % 3 == 0 { "x" } else { "y" }.into(),
                        ),
                    ]
                    .into(),
                    ports: Default::default(),
                    weight: 1,
                    healthy: true,
                    service_account: None,
                },
            })
            .collect();
        let mesh = compile(objects.iter(), workloads.into_iter().map(Into::into), false).unwrap();
        let index = SelectIndex::new(&mesh);
        for svc in mesh.services.values() {
            let a: Vec<*const WorkloadEntrySpec> = mesh
                .selected(svc)
                .into_iter()
                .map(|e| e as *const _)
                .collect();
            let b: Vec<*const WorkloadEntrySpec> = index
                .selected(svc)
                .into_iter()
                .map(|e| e as *const _)
                .collect();
            assert!(!a.is_empty(), "{} selects nothing", svc.name);
            assert_eq!(a, b, "{}", svc.name);
        }
    }
}

#[cfg(test)]
mod mtls_tests {
    use super::*;
    use prost::Message;

    /// Which of reviews' endpoints carry the `tlsMode: istio` metadata that auto mTLS reads,
    /// with `extra` PeerAuthentications applied.
    fn tls_marked(extra: &str) -> Vec<(String, bool)> {
        let mut text = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080, name: http, targetPort: 8080}], selector: {app: reviews}}\n");
        for (v, ip) in [("v1", "10.0.0.1"), ("v2", "10.0.0.2")] {
            text.push_str(&format!("---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: reviews-{v}}}\nspec: {{address: {ip}, labels: {{app: reviews, version: {v}, security.istio.io/tlsMode: istio}}}}\n"));
        }
        text.push_str(extra);
        let objects = crate::config::parse("t.yaml", &text).unwrap().objects;
        let mesh = crate::model::compile::compile(objects.iter(), [], false).unwrap();
        let a = &assignments(&mesh)["outbound|9080||reviews.default.svc.cluster.local"];
        let cla = ClusterLoadAssignment::decode(a.any.value.as_slice()).unwrap();
        let mut out: Vec<(String, bool)> = cla.endpoints[0]
            .lb_endpoints
            .iter()
            .map(|e| {
                let Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier
                else {
                    panic!("no endpoint")
                };
                let Some(core::address::Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    panic!("no address")
                };
                (sa.address.clone(), e.metadata.is_some())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn auto_mtls_skips_endpoints_whose_port_is_disabled() {
        let pa = |spec: &str| {
            format!("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa}}\nspec: {spec}\n")
        };
        let both = vec![
            ("10.0.0.1".to_string(), true),
            ("10.0.0.2".to_string(), true),
        ];
        let only_v1 = vec![
            ("10.0.0.1".to_string(), true),
            ("10.0.0.2".to_string(), false),
        ];
        let none = vec![
            ("10.0.0.1".to_string(), false),
            ("10.0.0.2".to_string(), false),
        ];
        assert_eq!(tls_marked(""), both);
        // Workload level: v2 turns mTLS off.
        assert_eq!(
            tls_marked(&pa(
                "{selector: {matchLabels: {version: v2}}, mtls: {mode: DISABLE}}"
            )),
            only_v1
        );
        // Port level, on the target port (8080), under a STRICT workload mode.
        assert_eq!(
            tls_marked(&pa("{selector: {matchLabels: {version: v2}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}")),
            only_v1
        );
        // Port level on another port changes nothing.
        assert_eq!(
            tls_marked(&pa("{selector: {matchLabels: {version: v2}}, mtls: {mode: STRICT}, portLevelMtls: {9090: {mode: DISABLE}}}")),
            both
        );
        // Namespace level.
        assert_eq!(tls_marked(&pa("{mtls: {mode: DISABLE}}")), none);
    }
}
