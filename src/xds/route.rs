//! RDS: the outbound route configuration (named by the listener port, `15001`), one virtual
//! host per service port with the seed's domain list, routes from the host's VirtualService (or
//! RouteRules), else a default route to `outbound|PORT||HOST`. Also the inbound route that the
//! inbound listeners carry inline.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::route::v3::{self as route, RouteConfiguration, VirtualHost};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::util::pack_any;

use super::*;
use crate::model::{self, HttpRoute, Mesh, MeshService, ServicePort, StringMatch};

/// Retry conditions used when a VirtualService gives attempts but no retryOn (Istio's default).
pub const DEFAULT_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
/// Retries of istiod's default policy (on every route a VirtualService gives no `retries`).
pub const DEFAULT_RETRIES: u32 = 2;
/// How often a retry's host selection is redone to avoid a host already tried (istiod's).
pub const HOST_SELECTION_RETRY_MAX_ATTEMPTS: i64 = 5;

/// The retry policy istiod gives a route: its default when the VirtualService says nothing;
/// none for `attempts: 0`; else the attempts, per-try timeout and conditions it gives (HTTP
/// status codes in `retryOn` become retriable status codes, as istiod parses them). Every
/// policy avoids hosts already tried (`previous_hosts`, up to 5 re-picks).
pub fn retry_policy(retries: Option<&model::Retries>) -> Option<route::RetryPolicy> {
    let (attempts, per_try_timeout, retry_on) = match retries {
        None => (DEFAULT_RETRIES, None, None),
        Some(r) if r.attempts == 0 => return None,
        Some(r) => (r.attempts, r.per_try_timeout, r.retry_on.as_deref()),
    };
    let (retry_on, retriable_status_codes) = match retry_on {
        None => (DEFAULT_RETRY_ON.to_string(), vec![]),
        Some(s) => parse_retry_on(s),
    };
    Some(route::RetryPolicy {
        retry_on,
        num_retries: u32v(attempts),
        per_try_timeout: per_try_timeout.map(pb_duration),
        retriable_status_codes,
        retry_host_predicate: vec![route::retry_policy::RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(
                route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                    pack_any(envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate {}),
                ),
            ),
        }],
        host_selection_retry_max_attempts: HOST_SELECTION_RETRY_MAX_ATTEMPTS,
        ..Default::default()
    })
}

/// Splits a `retryOn` list into Envoy conditions and HTTP status codes; codes imply
/// `retriable-status-codes`.
fn parse_retry_on(s: &str) -> (String, Vec<u32>) {
    let mut conditions = Vec::new();
    let mut codes = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) if (100..=599).contains(&code) => codes.push(code),
            _ => conditions.push(part.to_string()),
        }
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    (conditions.join(","), codes)
}

/// Route configurations shared by every sidecar, keyed by name: `15001` (every service
/// port, for sidecars the app calls explicitly) and, as istiod names them for captured
/// sidecars, one per service port number (`9080`: the services on that port, reached through
/// the `0.0.0.0_9080` listener). A proxy receives only those its listeners name.
pub fn route_configs(mesh: &Mesh) -> HashMap<String, Resource> {
    let mut used = BTreeSet::new();
    let mut virtual_hosts = Vec::new();
    // Per port number: the domains taken and the virtual hosts.
    let mut by_port: std::collections::BTreeMap<u16, (BTreeSet<String>, Vec<VirtualHost>)> =
        Default::default();
    for (host, svc) in &mesh.services {
        for (i, port) in svc.ports.iter().enumerate() {
            let names: Vec<String> = domains(svc, port, i == 0)
                .into_iter()
                .filter(|d| used.insert(d.clone()))
                .collect();
            let routes: Vec<route::Route> = match mesh.routes.get(host) {
                Some(hr) => hr
                    .http
                    .iter()
                    .enumerate()
                    .flat_map(|(i, r)| envoy_routes(mesh, &hr.source, i, r, host, port.port))
                    .collect(),
                None => vec![default_route(
                    &outbound_cluster_name(port.port, None, host),
                    host,
                    retry_policy(None),
                )],
            };
            let (taken, hosts) = by_port.entry(port.port).or_default();
            let port_domains: Vec<String> = domains(svc, port, true)
                .into_iter()
                .filter(|d| taken.insert(d.clone()))
                .collect();
            hosts.push(VirtualHost {
                name: format!("{host}:{}", port.port),
                domains: port_domains,
                routes: routes.clone(),
                ..Default::default()
            });
            virtual_hosts.push(VirtualHost {
                name: format!("{host}:{}", port.port),
                domains: names,
                routes,
                ..Default::default()
            });
        }
    }
    let config = |name: String, virtual_hosts| {
        let rc = RouteConfiguration {
            name: name.clone(),
            virtual_hosts,
            validate_clusters: Some(protobuf::BoolValue { value: false }),
            ..Default::default()
        };
        (name.clone(), Resource::new(name, rc))
    };
    // Captured apps may call any host on a service's port: what no service claims goes where
    // the app was connecting (istiod's `allow_any`, outboundTrafficPolicy ALLOW_ANY).
    let mut out: HashMap<String, Resource> = by_port
        .into_iter()
        .map(|(port, (_, mut hosts))| {
            hosts.push(allow_any());
            config(port.to_string(), hosts)
        })
        .collect();
    out.extend([config(OUTBOUND_ROUTE_NAME.to_string(), virtual_hosts)]);
    out
}

/// istiod's `allow_any` virtual host: every other host on the port, to `PassthroughCluster`
/// with no timeout and no retries.
fn allow_any() -> VirtualHost {
    VirtualHost {
        name: ALLOW_ANY.into(),
        domains: vec!["*".into()],
        routes: vec![route::Route {
            name: ALLOW_ANY.into(),
            r#match: Some(route::RouteMatch {
                path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::route::Action::Route(route::RouteAction {
                cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                    super::PASSTHROUGH_CLUSTER.into(),
                )),
                timeout: Some(pb_duration(Duration::ZERO)),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The name of that virtual host and its route (istiod's).
pub const ALLOW_ANY: &str = "allow_any";

/// Domains as the seed shows them: each name form with and without `:port`, then addresses.
/// Port-less forms go to the service's first port only, so they stay unique.
pub fn domains(svc: &MeshService, port: &ServicePort, with_bare: bool) -> Vec<String> {
    let mut names = Vec::new();
    if svc.kubernetes {
        let ns = &svc.namespace;
        let n = &svc.name;
        names.extend([
            n.clone(),
            format!("{n}.{ns}"),
            format!("{n}.{ns}.svc"),
            format!("{n}.{ns}.svc.cluster"),
            svc.host.clone(),
        ]);
    } else {
        names.push(svc.host.clone());
    }
    names.extend(svc.addresses.iter().cloned());
    let mut out = Vec::new();
    for n in names {
        out.push(format!("{n}:{}", port.port));
        if with_bare {
            out.push(n);
        }
    }
    out
}

/// The catch-all route to `cluster`; outbound routes carry istiod's default retry policy,
/// inbound ones none (istiod retries on the client side only).
fn default_route(
    cluster: &str,
    host: &str,
    retry_policy: Option<route::RetryPolicy>,
) -> route::Route {
    route::Route {
        name: "default".into(),
        r#match: Some(route::RouteMatch {
            path_specifier: Some(route::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::route::Action::Route(route::RouteAction {
            cluster_specifier: Some(route::route_action::ClusterSpecifier::Cluster(
                cluster.into(),
            )),
            timeout: Some(pb_duration(Duration::ZERO)),
            retry_policy,
            ..Default::default()
        })),
        decorator: Some(route::Decorator {
            operation: format!("{host}/*"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One Envoy route per match of an HTTP route (Istio ORs the matches).
pub(super) fn envoy_routes(
    mesh: &Mesh,
    source: &str,
    index: usize,
    r: &HttpRoute,
    host: &str,
    port: u16,
) -> Vec<route::Route> {
    let action = route_action(mesh, r, host, port);
    let matches = if r.matches.is_empty() {
        vec![model::HttpMatch::default()]
    } else {
        r.matches.clone()
    };
    matches
        .iter()
        .map(|m| {
            let mut er = route::Route {
                name: r.name.clone().unwrap_or_else(|| format!("{index}")),
                r#match: Some(route_match(m)),
                action: Some(route::route::Action::Route(action.clone())),
                decorator: Some(route::Decorator {
                    operation: source.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            if let Some(f) = &r.fault {
                er.typed_per_filter_config
                    .insert(FAULT_FILTER.into(), pack_any(http_fault(f)));
            }
            (er.request_headers_to_add, er.request_headers_to_remove) =
                header_ops(&r.request_headers);
            (er.response_headers_to_add, er.response_headers_to_remove) =
                header_ops(&r.response_headers);
            er
        })
        .collect()
}

/// Istio's header operations as Envoy's: `set` overwrites, `add` appends, `remove` removes.
fn header_ops(
    ops: &model::HeaderOps,
) -> (
    Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>,
    Vec<String>,
) {
    use envoy_types::pb::envoy::config::core::v3::{
        header_value_option::HeaderAppendAction, HeaderValue, HeaderValueOption,
    };
    let option = |(k, v): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    let add = ops
        .set
        .iter()
        .map(|kv| option(kv, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            ops.add
                .iter()
                .map(|kv| option(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect();
    (add, ops.remove.clone())
}

fn route_match(m: &model::HttpMatch) -> route::RouteMatch {
    use route::route_match::PathSpecifier;
    let path_specifier = Some(match &m.uri {
        None => PathSpecifier::Prefix("/".into()),
        Some(StringMatch::Exact(p)) => PathSpecifier::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => PathSpecifier::Prefix(p.clone()),
        Some(StringMatch::Regex(r)) => PathSpecifier::SafeRegex(regex(r)),
    });
    let headers = m
        .headers
        .iter()
        .map(|(name, sm)| route::HeaderMatcher {
            name: name.clone(),
            header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(
                string_matcher(sm),
            )),
            ..Default::default()
        })
        .chain(
            m.without_headers
                .iter()
                .map(|(name, sm)| route::HeaderMatcher {
                    name: name.clone(),
                    header_match_specifier: Some(
                        route::header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(
                            sm,
                        )),
                    ),
                    invert_match: true,
                    treat_missing_header_as_empty: true,
                }),
        )
        .collect();
    route::RouteMatch {
        path_specifier,
        headers,
        ..Default::default()
    }
}

fn regex(r: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: r.to_string(),
        ..Default::default()
    }
}

fn string_matcher(sm: &StringMatch) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    let p = match sm {
        StringMatch::Exact(s) => MatchPattern::Exact(s.clone()),
        StringMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
        StringMatch::Regex(s) => MatchPattern::SafeRegex(regex(s)),
    };
    matcher::StringMatcher {
        match_pattern: Some(p),
        ..Default::default()
    }
}

/// The destination's cluster: its own port, else the routed port when it is the same host,
/// else the destination service's only port.
fn destination_cluster(mesh: &Mesh, d: &model::Destination, host: &str, port: u16) -> String {
    let dport = d.port.unwrap_or_else(|| {
        if d.host == host {
            port
        } else {
            mesh.services
                .get(&d.host)
                .and_then(|s| s.ports.first())
                .map_or(port, |p| p.port)
        }
    });
    outbound_cluster_name(dport, d.subset.as_deref(), &d.host)
}

fn route_action(mesh: &Mesh, r: &HttpRoute, host: &str, port: u16) -> route::RouteAction {
    use route::route_action::ClusterSpecifier;
    let cluster_specifier = if r.route.len() == 1 {
        ClusterSpecifier::Cluster(destination_cluster(
            mesh,
            &r.route[0].destination,
            host,
            port,
        ))
    } else {
        ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: r
                .route
                .iter()
                .map(|d| route::weighted_cluster::ClusterWeight {
                    name: destination_cluster(mesh, &d.destination, host, port),
                    weight: u32v(d.weight.unwrap_or(0)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let retry_policy = retry_policy(r.retries.as_ref());
    route::RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(pb_duration(r.timeout.unwrap_or(Duration::ZERO))),
        retry_policy,
        ..Default::default()
    }
}

fn fraction(percent: f64) -> Option<types::FractionalPercent> {
    Some(types::FractionalPercent {
        numerator: (percent * 10_000.0).round() as u32,
        denominator: types::fractional_percent::DenominatorType::Million as i32,
    })
}

fn http_fault(f: &model::Fault) -> fault::HttpFault {
    fault::HttpFault {
        delay: f.delay.as_ref().map(|d| common_fault::FaultDelay {
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                pb_duration(d.fixed_delay),
            )),
            percentage: fraction(d.percent),
        }),
        abort: f.abort.as_ref().map(|a| fault::FaultAbort {
            error_type: Some(fault::fault_abort::ErrorType::HttpStatus(
                a.http_status as u32,
            )),
            percentage: fraction(a.percent),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The inbound route: everything to the pod's own app.
pub fn inbound_route_config(port: u16) -> RouteConfiguration {
    let cluster = inbound_cluster_name(port);
    RouteConfiguration {
        name: format!("inbound|{port}||"),
        virtual_hosts: vec![VirtualHost {
            name: format!("inbound|http|{port}"),
            domains: vec!["*".into()],
            routes: vec![default_route(&cluster, &cluster, None)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use route::route_action::ClusterSpecifier;

    fn config(yaml: &str) -> RouteConfiguration {
        let base = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080, name: http}], selector: {app: reviews}, clusterIP: 10.0.0.7}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\n";
        let objects = crate::config::parse("t.yaml", &format!("{base}{yaml}"))
            .unwrap()
            .objects;
        let mesh = crate::model::compile::compile(objects.iter(), [], false).unwrap();
        let r = &route_configs(&mesh)[OUTBOUND_ROUTE_NAME];
        RouteConfiguration::decode(r.any.value.as_slice()).unwrap()
    }

    fn action(r: &route::Route) -> &route::RouteAction {
        match &r.action {
            Some(route::route::Action::Route(a)) => a,
            _ => panic!("not a route action"),
        }
    }

    #[test]
    fn seed_domains_and_default_route() {
        let rc = config("");
        let vh = &rc.virtual_hosts[0];
        assert_eq!(vh.name, "reviews.default.svc.cluster.local:9080");
        for d in [
            "reviews",
            "reviews:9080",
            "reviews.default",
            "reviews.default.svc.cluster.local:9080",
            "10.0.0.7",
            "10.0.0.7:9080",
        ] {
            assert!(
                vh.domains.iter().any(|x| x == d),
                "{d} missing from {:?}",
                vh.domains
            );
        }
        assert_eq!(
            action(&vh.routes[0]).cluster_specifier,
            Some(ClusterSpecifier::Cluster(
                "outbound|9080||reviews.default.svc.cluster.local".into()
            ))
        );
    }

    #[test]
    fn weights_matches_retries_and_faults() {
        let rc = config(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
    - uri: {prefix: /api}
    fault: {abort: {httpStatus: 503, percentage: {value: 12.5}}}
    retries: {attempts: 3, perTryTimeout: 250ms, retryOn: 5xx}
    timeout: 2s
    route:
    - destination: {host: reviews, subset: v2}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
",
        );
        let routes = &rc.virtual_hosts[0].routes;
        assert_eq!(
            routes.len(),
            3,
            "two matches OR-ed, then the weighted route"
        );
        let h = &routes[0].r#match.as_ref().unwrap().headers[0];
        assert_eq!(h.name, "end-user");
        let a = action(&routes[0]);
        assert_eq!(a.timeout, Some(pb_duration(Duration::from_secs(2))));
        let rp = a.retry_policy.as_ref().unwrap();
        assert_eq!(
            (rp.retry_on.as_str(), rp.num_retries.as_ref().unwrap().value),
            ("5xx", 3)
        );
        assert_eq!(
            rp.per_try_timeout,
            Some(pb_duration(Duration::from_millis(250)))
        );
        let f = fault::HttpFault::decode(
            routes[1].typed_per_filter_config[FAULT_FILTER]
                .value
                .as_slice(),
        )
        .unwrap();
        let abort = f.abort.unwrap();
        assert_eq!(
            abort.error_type,
            Some(fault::fault_abort::ErrorType::HttpStatus(503))
        );
        assert_eq!(abort.percentage.unwrap().numerator, 125_000);
        match &action(&routes[2]).cluster_specifier {
            Some(ClusterSpecifier::WeightedClusters(w)) => {
                let got: Vec<_> = w
                    .clusters
                    .iter()
                    .map(|c| (c.name.as_str(), c.weight.as_ref().unwrap().value))
                    .collect();
                assert_eq!(
                    got,
                    vec![
                        ("outbound|9080|v1|reviews.default.svc.cluster.local", 90),
                        ("outbound|9080|v2|reviews.default.svc.cluster.local", 10)
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn istios_default_retry_policy_unless_the_virtual_service_sets_one() {
        // No VirtualService: istiod's default on the default route.
        let rc = config("");
        let rp = action(&rc.virtual_hosts[0].routes[0])
            .retry_policy
            .clone()
            .unwrap();
        assert_eq!(rp.retry_on, DEFAULT_RETRY_ON);
        assert_eq!(rp.num_retries.unwrap().value, 2);
        assert!(rp.retriable_status_codes.is_empty());
        assert_eq!(rp.host_selection_retry_max_attempts, 5);
        assert_eq!(
            rp.retry_host_predicate[0].name,
            "envoy.retry_host_predicates.previous_hosts"
        );
        let rc = config(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
  - match: [{headers: {end-user: {exact: kim}}}]
    retries: {attempts: 4, retryOn: \"gateway-error,503,429\"}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
",
        );
        let routes = &rc.virtual_hosts[0].routes;
        // attempts: 0 switches retries off.
        assert!(action(&routes[0]).retry_policy.is_none());
        // Status codes in retryOn become retriable status codes.
        let rp = action(&routes[1]).retry_policy.clone().unwrap();
        assert_eq!(rp.retry_on, "gateway-error,retriable-status-codes");
        assert_eq!(rp.retriable_status_codes, [503, 429]);
        assert_eq!(rp.num_retries.unwrap().value, 4);
        assert_eq!(rp.host_selection_retry_max_attempts, 5);
        // A route with no retries: the default.
        let rp = action(&routes[2]).retry_policy.clone().unwrap();
        assert_eq!(
            (rp.retry_on.as_str(), rp.num_retries.unwrap().value),
            (DEFAULT_RETRY_ON, 2)
        );
    }
}
