//! Compiling a set of config objects into a [`Mesh`], with validation as istioctl would do it.
//! Every problem is collected (not just the first), each naming its origin and field path.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// Resolves `objects` plus REST-registered `endpoints` into a mesh, or every error found.
/// A reference to a host or subset nothing defines is a warning, as `istioctl analyze`
/// reports it (the object is kept and takes effect when the host appears), unless
/// `strict_references` makes it an error.
pub fn compile<'a>(
    objects: impl IntoIterator<Item = &'a Object>,
    endpoints: impl IntoIterator<Item = std::sync::Arc<Workload>>,
    strict_references: bool,
) -> Result<Mesh, Vec<ConfigError>> {
    let objects: Vec<&Object> = objects.into_iter().collect();
    let mut c = Compiler {
        mesh: Mesh::default(),
        errors: Vec::new(),
        strict_references,
    };
    c.services(&objects);
    c.workloads(&objects, endpoints);
    c.destination_rules(&objects);
    c.mesh.gateways = objects
        .iter()
        .filter_map(|o| match &o.spec {
            Spec::Gateway(g) => Some(((o.namespace.clone(), o.name.clone()), g.clone())),
            _ => None,
        })
        .collect();
    c.virtual_services(&objects);
    c.sidecars(&objects);
    c.mesh.peer_authentications = objects
        .iter()
        .filter_map(|o| match &o.spec {
            Spec::PeerAuthentication(p) => Some(((o.namespace.clone(), o.name.clone()), p.clone())),
            _ => None,
        })
        .collect();
    c.mesh.authorization_policies = objects
        .iter()
        .filter_map(|o| match &o.spec {
            Spec::AuthorizationPolicy(p) => {
                Some(((o.namespace.clone(), o.name.clone()), p.clone()))
            }
            _ => None,
        })
        .collect();
    c.route_rules(&objects);
    c.mesh.envoy_filters = objects
        .iter()
        .filter_map(|o| match &o.spec {
            Spec::EnvoyFilter(f) => Some((o.namespace.clone(), std::sync::Arc::new(f.clone()))),
            _ => None,
        })
        .collect();
    if c.errors.is_empty() {
        Ok(c.mesh)
    } else {
        Err(c.errors)
    }
}

/// Changes to the config store go through compilation: a set that does not compile is
/// never produced.
impl ConfigSet {
    pub fn compile(&self) -> Result<Mesh, Vec<ConfigError>> {
        compile(
            self.objects.values(),
            self.endpoints.values().cloned(),
            self.strict_references,
        )
    }

    /// The set with `batch` added (objects with the same kind, namespace and name replaced),
    /// and its compiled mesh; or every error. Two documents of one batch with the same key is
    /// an error, as `kubectl apply` would report it.
    pub fn with_applied(&self, batch: Vec<Object>) -> Result<(ConfigSet, Mesh), Vec<ConfigError>> {
        let mut next = self.clone();
        let mut first_seen: BTreeMap<Key, Origin> = BTreeMap::new();
        let mut errors = Vec::new();
        for o in batch {
            let key = o.key();
            if let Some(prev) = first_seen.get(&key) {
                errors.push(ConfigError {
                    file: o.origin.file.clone(),
                    document: o.origin.document,
                    object: key.to_string(),
                    field: "metadata.name".into(),
                    message: format!("duplicate name: {key} is also defined at {prev}"),
                });
                continue;
            }
            first_seen.insert(key.clone(), o.origin.clone());
            next.objects.insert(key, o);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Stored objects first, the batch last: a conflict between them is reported on the
        // batch's object (the one being applied), not on the one already accepted.
        let in_batch = |o: &&Object| first_seen.contains_key(&o.key());
        let ordered = next
            .objects
            .values()
            .filter(|o| !in_batch(o))
            .chain(next.objects.values().filter(in_batch));
        let mesh = compile(
            ordered,
            next.endpoints.values().cloned(),
            next.strict_references,
        )?;
        Ok((next, mesh))
    }

    /// The set without `key`, if the rest still compiles. `Ok(None)` when there is no such object.
    pub fn without(&self, key: &Key) -> Result<Option<(ConfigSet, Mesh)>, Vec<ConfigError>> {
        let mut next = self.clone();
        if next.objects.remove(key).is_none() {
            return Ok(None);
        }
        let mesh = next.compile()?;
        Ok(Some((next, mesh)))
    }
}

struct Compiler {
    mesh: Mesh,
    errors: Vec<ConfigError>,
    strict_references: bool,
}

fn err(o: &Object, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: o.origin.file.clone(),
        document: o.origin.document,
        object: o.key().to_string(),
        field: field.into(),
        message: message.into(),
    }
}

impl Compiler {
    fn error(&mut self, o: &Object, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(err(o, field, message));
    }

    /// A reference to what nothing defines (yet): a warning naming what happens meanwhile,
    /// or an error under `strict_references`.
    fn dangling(&mut self, o: &Object, field: impl Into<String>, message: String, meanwhile: &str) {
        if self.strict_references {
            self.errors.push(err(o, field, message));
        } else {
            let message = format!("{message}; kept: {meanwhile}");
            self.mesh.warnings.push(err(o, field, message));
        }
    }

    /// The host a reference means when nothing defines it (yet): short names are qualified
    /// with the document's namespace, as istiod does, so the route names the cluster that
    /// will exist once the host is defined.
    fn resolve_or_qualify(&self, host: &str, ns: &str) -> String {
        self.resolve(host, ns).unwrap_or_else(|| {
            if host.contains('.') {
                host.to_string()
            } else {
                fqdn(host, ns)
            }
        })
    }

    /// Resolves a host as written in a document of namespace `ns` to a known service host.
    fn resolve(&self, host: &str, ns: &str) -> Option<String> {
        let candidates = if host.contains('.') {
            let parts = host.split('.').count();
            let mut c = vec![host.to_string()];
            if parts == 2 {
                c.push(format!("{host}.{DOMAIN_SUFFIX}"));
            } else if host.ends_with(".svc") {
                c.push(format!("{host}.cluster.local"));
            }
            c
        } else {
            vec![fqdn(host, ns), host.to_string()]
        };
        candidates
            .into_iter()
            .find(|h| self.mesh.services.contains_key(h))
    }

    fn services(&mut self, objects: &[&Object]) {
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for o in objects {
            let (svcs, field) = match &o.spec {
                Spec::Service(s) => (
                    vec![MeshService {
                        name: o.name.clone(),
                        namespace: o.namespace.clone(),
                        host: fqdn(&o.name, &o.namespace),
                        ports: s.ports.clone(),
                        selector: Some(s.selector.clone()),
                        addresses: s.cluster_ip.iter().cloned().collect(),
                        inline_endpoints: vec![],
                        kubernetes: true,
                        export_to: s.export_to.clone(),
                    }],
                    "metadata.name".to_string(),
                ),
                Spec::ServiceEntry(se) => (
                    se.hosts
                        .iter()
                        .map(|h| MeshService {
                            name: h.split('.').next().unwrap_or(h).to_string(),
                            namespace: o.namespace.clone(),
                            host: h.clone(),
                            ports: se.ports.clone(),
                            selector: se.workload_selector.clone(),
                            addresses: se.addresses.clone(),
                            inline_endpoints: se.endpoints.clone(),
                            kubernetes: false,
                            export_to: se.export_to.clone(),
                        })
                        .collect(),
                    "spec.hosts".to_string(),
                ),
                _ => continue,
            };
            for mut svc in svcs {
                let before = svc.inline_endpoints.len();
                svc.inline_endpoints.retain(|e| !e.address.is_empty());
                if svc.inline_endpoints.len() < before {
                    self.mesh.warnings.push(err(
                        o,
                        "spec.endpoints",
                        "endpoints without an address (they name a network) are kept out: meshbench simulates one network",
                    ));
                }
                if svc.ports.is_empty() && svc.kubernetes {
                    self.error(o, "spec.ports", "a service needs at least one port");
                }
                let mut names = BTreeSet::new();
                for (i, p) in svc.ports.iter().enumerate() {
                    if !names.insert(p.port) {
                        self.error(
                            o,
                            format!("spec.ports[{i}].port"),
                            format!("port {} listed twice", p.port),
                        );
                    }
                }
                if let Some(prev) = seen.insert(svc.host.clone(), o.key().to_string()) {
                    self.error(
                        o,
                        field.clone(),
                        format!("host {} is already defined by {prev}", svc.host),
                    );
                    continue;
                }
                self.mesh.services.insert(svc.host.clone(), svc);
            }
        }
    }

    fn workloads(
        &mut self,
        objects: &[&Object],
        endpoints: impl IntoIterator<Item = std::sync::Arc<Workload>>,
    ) {
        for o in objects {
            if let Spec::WorkloadEntry(we) = &o.spec {
                if we.address.is_empty() {
                    self.mesh.warnings.push(err(
                        o,
                        "spec.address",
                        "address is unset (the entry names a network): kept, but it is no endpoint, since meshbench simulates one network",
                    ));
                    continue;
                }
                self.mesh.workloads.push(std::sync::Arc::new(Workload {
                    name: o.name.clone(),
                    namespace: o.namespace.clone(),
                    entry: we.clone(),
                }));
            }
        }
        self.mesh.workloads.extend(endpoints);
    }

    fn destination_rules(&mut self, objects: &[&Object]) {
        let mut bound: BTreeMap<String, String> = BTreeMap::new();
        for o in objects {
            let Spec::DestinationRule(dr) = &o.spec else {
                continue;
            };
            let Some(host) = self.resolve(&dr.host, &o.namespace) else {
                self.dangling(
                    o,
                    "spec.host",
                    format!(
                        "unknown host {:?}: no Service or ServiceEntry defines it",
                        dr.host
                    ),
                    "it applies once the host is defined",
                );
                continue;
            };
            if let Some(prev) = bound.insert(host.clone(), o.key().to_string()) {
                self.error(
                    o,
                    "spec.host",
                    format!("host {host} already has a DestinationRule ({prev})"),
                );
                continue;
            }
            let mut names = BTreeSet::new();
            for (i, s) in dr.subsets.iter().enumerate() {
                if !names.insert(&s.name) {
                    self.error(
                        o,
                        format!("spec.subsets[{i}].name"),
                        format!("duplicate subset name {:?}", s.name),
                    );
                }
                if s.name.is_empty() || s.name.contains('|') {
                    self.error(
                        o,
                        format!("spec.subsets[{i}].name"),
                        "a subset name must be non-empty and must not contain '|'",
                    );
                }
            }
            self.mesh.policies.insert(
                host,
                HostPolicy {
                    traffic_policy: dr.traffic_policy.clone(),
                    subsets: dr.subsets.clone(),
                    namespace: o.namespace.clone(),
                    export_to: dr.export_to.clone(),
                },
            );
        }
    }

    /// Checks one destination. A host or subset nothing defines is routed all the same, to
    /// a cluster that does not exist until it is defined: proxies answer 503 meanwhile, as
    /// Envoy does for istiod's routes.
    fn destination(&mut self, o: &Object, field: &str, d: &Destination) {
        let Some(host) = self.resolve(&d.host, &o.namespace) else {
            self.dangling(
                o,
                format!("{field}.host"),
                format!(
                    "unknown host {:?}: no Service or ServiceEntry defines it",
                    d.host
                ),
                "requests routed to it get 503 until the host is defined",
            );
            return;
        };
        if let Some(subset) = &d.subset {
            let defined = self
                .mesh
                .policies
                .get(&host)
                .is_some_and(|p| p.subsets.iter().any(|s| &s.name == subset));
            if !defined {
                self.dangling(
                    o,
                    format!("{field}.subset"),
                    format!(
                        "subset {subset:?} of host {host} is not defined by any DestinationRule"
                    ),
                    "requests routed to it get 503 until a DestinationRule defines it",
                );
            }
        }
        let svc = &self.mesh.services[&host];
        match d.port {
            Some(p) if !svc.ports.iter().any(|sp| sp.port == p) => {
                let msg = format!("host {host} has no port {p}");
                self.error(o, format!("{field}.port.number"), msg);
            }
            None if svc.ports.len() > 1 => {
                let msg = format!("host {host} has several ports: name one with port.number");
                self.error(o, format!("{field}.port"), msg);
            }
            _ => {}
        }
    }

    fn check_route(&mut self, o: &Object, field: &str, r: &HttpRoute) {
        for (i, m) in r.matches.iter().enumerate() {
            if let Some(StringMatch::Regex(re)) = &m.uri {
                if let Err(e) = regex::Regex::new(re) {
                    self.error(
                        o,
                        format!("{field}.match[{i}].uri.regex"),
                        format!("invalid regex: {}", one_line(&e.to_string())),
                    );
                }
            }
            let headers = m.headers.iter().map(|h| ("headers", h));
            let without = m.without_headers.iter().map(|h| ("withoutHeaders", h));
            for (key, (h, sm)) in headers.chain(without) {
                if let StringMatch::Regex(re) = sm {
                    if let Err(e) = regex::Regex::new(re) {
                        self.error(
                            o,
                            format!("{field}.match[{i}].{key}.{h}.regex"),
                            format!("invalid regex: {}", one_line(&e.to_string())),
                        );
                    }
                }
            }
        }
        if r.route.is_empty() {
            self.error(
                o,
                format!("{field}.route"),
                "a route needs at least one destination",
            );
        }
        check_weights(&r.route.iter().map(|d| d.weight).collect::<Vec<_>>())
            .into_iter()
            .for_each(|m| self.error(o, format!("{field}.route"), m));
        for (i, d) in r.route.iter().enumerate() {
            self.destination(
                o,
                &format!("{field}.route[{i}].destination"),
                &d.destination,
            );
        }
        if let Some(f) = &r.fault {
            if let Some(a) = &f.abort {
                if !(200..=599).contains(&a.http_status) {
                    self.error(
                        o,
                        format!("{field}.fault.abort.httpStatus"),
                        format!("{} is not an HTTP status (200-599)", a.http_status),
                    );
                }
                if !(0.0..=100.0).contains(&a.percent) {
                    self.error(
                        o,
                        format!("{field}.fault.abort.percentage"),
                        "percentage must be within 0-100",
                    );
                }
            }
            if let Some(d) = &f.delay {
                if !(0.0..=100.0).contains(&d.percent) {
                    self.error(
                        o,
                        format!("{field}.fault.delay.percentage"),
                        "percentage must be within 0-100",
                    );
                }
            }
        }
    }

    fn virtual_services(&mut self, objects: &[&Object]) {
        for o in objects {
            let Spec::VirtualService(vs) = &o.spec else {
                continue;
            };
            if vs.hosts.is_empty() {
                self.error(o, "spec.hosts", "a VirtualService needs at least one host");
            }
            for (i, r) in vs.http.iter().enumerate() {
                self.check_route(o, &format!("spec.http[{i}]"), r);
            }
            // `gateways` empty means the sidecars ("mesh"); other names bind Gateways,
            // `name` in the VirtualService's namespace or `ns/name`.
            let binds_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
            for (i, g) in vs.gateways.iter().enumerate().filter(|(_, g)| *g != "mesh") {
                let (ns, name) = g.split_once('/').unwrap_or((&o.namespace, g));
                let key = (ns.to_string(), name.to_string());
                if !self.mesh.gateways.contains_key(&key) {
                    self.dangling(
                        o,
                        format!("spec.gateways[{i}]"),
                        format!("unknown gateway {ns}/{name}: no Gateway defines it"),
                        "its routes apply once the Gateway is defined",
                    );
                }
                let hosts = vs
                    .hosts
                    .iter()
                    .map(|h| {
                        // Validated lowercase when read.
                        if h.contains('.') || h.contains('*') {
                            h.clone()
                        } else {
                            self.resolve_or_qualify(h, &o.namespace)
                        }
                    })
                    .collect();
                let http = vs
                    .http
                    .iter()
                    .map(|r| self.resolve_route(r, &o.namespace))
                    .collect();
                self.mesh.gateway_routes.push(GatewayRoutes {
                    gateway: key,
                    source: o.key().to_string(),
                    namespace: o.namespace.clone(),
                    hosts,
                    http,
                    export_to: vs.export_to.clone(),
                });
            }
            if !binds_mesh {
                continue;
            }
            for (i, h) in vs.hosts.iter().enumerate() {
                if h == "*" {
                    self.error(
                        o,
                        format!("spec.hosts[{i}]"),
                        "the wildcard host * is not allowed for a VirtualService bound to the mesh (name a Gateway in gateways)",
                    );
                    continue;
                }
                let Some(host) = self.resolve(h, &o.namespace) else {
                    self.dangling(
                        o,
                        format!("spec.hosts[{i}]"),
                        format!("unknown host {h:?}: no Service or ServiceEntry defines it"),
                        "its routes apply once the host is defined",
                    );
                    continue;
                };
                if let Some(prev) = self.mesh.routes.get(&host) {
                    let msg = format!("host {host} is already routed by {}", prev.source);
                    self.error(o, format!("spec.hosts[{i}]"), msg);
                    continue;
                }
                let http = vs
                    .http
                    .iter()
                    .map(|r| self.resolve_route(r, &o.namespace))
                    .collect();
                self.mesh.routes.insert(
                    host,
                    HostRoutes {
                        source: o.key().to_string(),
                        http,
                        namespace: o.namespace.clone(),
                        export_to: vs.export_to.clone(),
                    },
                );
            }
        }
    }

    /// Rewrites destination hosts to FQDNs (qualified as istiod does when nothing defines
    /// them; `check_route` reported that).
    fn resolve_route(&self, r: &HttpRoute, ns: &str) -> HttpRoute {
        let mut r = r.clone();
        for d in &mut r.route {
            d.destination.host = self.resolve_or_qualify(&d.destination.host, ns);
        }
        r
    }

    /// Maps the seed's RouteRules onto the same model: one HttpRoute per rule, in precedence
    /// order (highest first); label sets become subsets (reusing a DestinationRule subset with
    /// the same labels, else a synthesised one named `k=v,...` as the seed's cluster names show).
    fn route_rules(&mut self, objects: &[&Object]) {
        let mut by_host: BTreeMap<String, Vec<(&Object, &RouteRuleSpec)>> = BTreeMap::new();
        for o in objects {
            let Spec::RouteRule(rr) = &o.spec else {
                continue;
            };
            match self.resolve(&rr.destination, &o.namespace) {
                Some(h) => by_host.entry(h).or_default().push((o, rr)),
                None => self.dangling(
                    o,
                    "spec.destination.name",
                    format!(
                        "unknown host {:?}: no Service or ServiceEntry defines it",
                        rr.destination
                    ),
                    "its rules apply once the host is defined",
                ),
            }
        }
        for (host, mut rules) in by_host {
            rules.sort_by(|a, b| {
                b.1.precedence
                    .cmp(&a.1.precedence)
                    .then(a.0.name.cmp(&b.0.name))
            });
            if let Some(prev) = self.mesh.routes.get(&host) {
                let msg = format!("host {host} is already routed by {}", prev.source);
                for (o, _) in &rules {
                    self.error(o, "spec.destination", msg.clone());
                }
                continue;
            }
            let mut http = Vec::new();
            for (o, rr) in &rules {
                let mut route = Vec::new();
                for (labels, weight) in &rr.route {
                    let subset = (!labels.is_empty()).then(|| self.subset_for(&host, labels));
                    route.push(RouteDestination {
                        destination: Destination {
                            host: host.clone(),
                            subset,
                            port: None,
                        },
                        weight: *weight,
                    });
                }
                if route.is_empty() {
                    route.push(RouteDestination {
                        destination: Destination {
                            host: host.clone(),
                            subset: None,
                            port: None,
                        },
                        weight: None,
                    });
                }
                let r = HttpRoute {
                    name: Some(o.name.clone()),
                    matches: rr.matches.clone(),
                    route,
                    timeout: rr.timeout,
                    retries: rr.retries.clone(),
                    fault: rr.fault.clone(),
                    request_headers: Default::default(),
                    response_headers: Default::default(),
                };
                self.check_route(o, "spec", &r);
                http.push(r);
            }
            let source = rules
                .iter()
                .map(|(o, _)| o.key().to_string())
                .collect::<Vec<_>>()
                .join(",");
            let namespace = rules[0].0.namespace.clone();
            self.mesh.routes.insert(
                host,
                HostRoutes {
                    source,
                    http,
                    namespace,
                    export_to: None,
                },
            );
        }
    }

    /// Sidecars; a second one without a workload selector in a namespace is ambiguous (as
    /// `istioctl analyze` reports it): an error.
    fn sidecars(&mut self, objects: &[&Object]) {
        let mut unselected: BTreeMap<&str, String> = BTreeMap::new();
        for o in objects {
            let Spec::Sidecar(s) = &o.spec else { continue };
            if s.selector.is_none() {
                if let Some(prev) = unselected.insert(&o.namespace, o.key().to_string()) {
                    self.error(
                        o,
                        "spec.workloadSelector",
                        format!("namespace {} already has a Sidecar without a workload selector ({prev})", o.namespace),
                    );
                    continue;
                }
            }
            self.mesh
                .sidecars
                .insert((o.namespace.clone(), o.name.clone()), s.clone());
        }
    }

    fn subset_for(&mut self, host: &str, labels: &Labels) -> String {
        let policy = self
            .mesh
            .policies
            .entry(host.to_string())
            .or_insert(HostPolicy {
                traffic_policy: None,
                subsets: vec![],
                namespace: String::new(),
                export_to: None,
            });
        if let Some(s) = policy.subsets.iter().find(|s| &s.labels == labels) {
            return s.name.clone();
        }
        let name = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        policy.subsets.push(Subset {
            name: name.clone(),
            labels: labels.clone(),
            traffic_policy: None,
        });
        name
    }
}

/// Weight rules as istioctl applies them: one destination may omit its weight (it gets 100);
/// with several, every one needs a weight and they must sum to 100.
pub fn check_weights(weights: &[Option<u32>]) -> Vec<String> {
    match weights {
        [] | [None] | [Some(100)] => vec![],
        [Some(w)] => vec![format!(
            "the only destination has weight {w}; it must be 100 or omitted"
        )],
        _ => {
            if weights.iter().any(Option::is_none) {
                return vec!["every destination needs a weight when there are several".into()];
            }
            // Summed wide: 32-bit weights must not wrap into a false 100.
            let sum: u64 = weights.iter().flatten().map(|w| u64::from(*w)).sum();
            if sum != 100 {
                vec![format!("destination weights sum to {sum}, not 100")]
            } else {
                vec![]
            }
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
