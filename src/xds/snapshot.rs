//! The snapshot cache: one consistent, versioned set of resources built from a [`Mesh`].
//!
//! Clusters, endpoints and routes are the same for every sidecar, so they are translated and
//! encoded once per config version and shared (`Arc`) by every connection; only listeners and
//! inbound clusters depend on the proxy's identity and are built per node ([`Snapshot::view`]).
//! That keeps a push to 1,000 proxies at one translation plus 1,000 cheap hash diffs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::node::NodeInfo;
use super::*;
use crate::model::Mesh;

#[derive(Debug)]
pub struct Snapshot {
    /// The config version this snapshot was built from (what `POST /v1/apply` returned).
    pub version: u64,
    /// When the earliest change merged into this snapshot was accepted.
    pub changed_at: Instant,
    pub changed_at_wall: SystemTime,
    pub mesh: Arc<Mesh>,
    /// Outbound clusters, sorted by name.
    pub clusters: Vec<Resource>,
    pub endpoints: HashMap<String, Resource>,
    pub routes: HashMap<String, Resource>,
    /// The snapshot this one was compared with, and per type the names that differ from it
    /// (changed, added or removed): a proxy that holds that one needs at most these.
    pub prev_version: Option<u64>,
    pub changed: HashMap<&'static str, std::collections::HashSet<String>>,
    /// Hash of what listeners and inbound clusters are built from (services' namespaces,
    /// selectors and target ports): equal keys let a proxy keep its view's listeners.
    pub listeners_key: u64,
    /// What sidecars see when Sidecars or `exportTo` narrow it, per (namespace, Sidecar):
    /// built on first use and shared by every proxy of that scope.
    scopes: std::sync::Mutex<Scopes>,
    /// `mesh.scoped()`, computed once.
    scoped: bool,
    /// Pilot's CA and the rotation epoch: each proxy's secrets (SDS) are issued per epoch.
    /// `None`: no secrets are served.
    pub security: Option<(Arc<super::secret::Issuer>, u64)>,
}

/// A sidecar's visibility class: its namespace and the Sidecar it is under.
pub type ScopeKey = (String, Option<crate::model::SidecarKey>);

/// Scopes of one snapshot: each class's visible set (by hash; `None`: the whole mesh), and
/// the resources per distinct visible set, so classes that see the same share them.
#[derive(Debug, Default)]
struct Scopes {
    classes: HashMap<ScopeKey, Option<u64>>,
    built: HashMap<u64, Arc<Scope>>,
}

/// Classes remembered per snapshot (namespaces come from node ids; past this, each view
/// computes its visible set again rather than growing the map).
const SCOPE_CLASSES: usize = 10_000;

/// The outbound resources one scope sees.
#[derive(Debug)]
pub struct Scope {
    pub clusters: Vec<Resource>,
    pub endpoints: HashMap<String, Resource>,
    pub routes: HashMap<String, Resource>,
}

impl Snapshot {
    pub fn build(
        version: u64,
        mesh: Arc<Mesh>,
        changed_at: Instant,
        changed_at_wall: SystemTime,
    ) -> Snapshot {
        Snapshot {
            version,
            changed_at,
            changed_at_wall,
            listeners_key: listeners_key(&mesh),
            prev_version: None,
            changed: HashMap::new(),
            clusters: cluster::outbound_clusters(&mesh),
            endpoints: endpoint::assignments(&mesh),
            routes: route::route_configs(&mesh),
            scopes: Default::default(),
            scoped: mesh.scoped(),
            mesh,
            security: None,
        }
    }

    /// The scope of a sidecar, or `None` when it sees the whole mesh (no Sidecar applies and
    /// nothing is exported narrowly; gateways always do).
    pub fn scope(&self, node: &NodeInfo) -> Option<Arc<Scope>> {
        if node.router || !self.scoped {
            return None;
        }
        let key = (
            node.namespace.clone(),
            self.mesh
                .sidecar_for(&node.namespace, &node.labels)
                .cloned(),
        );
        {
            let scopes = self.scopes.lock().unwrap();
            match scopes.classes.get(&key) {
                Some(None) => return None,
                Some(Some(id)) => {
                    // Absent while another stream is still building it: build it here too.
                    if let Some(s) = scopes.built.get(id) {
                        return Some(s.clone());
                    }
                }
                None => {}
            }
        }
        let v = self.mesh.visibility(&key.0, key.1.as_ref());
        let id = (!v.everything).then(|| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            v.hash(&mut h);
            h.finish()
        });
        {
            let mut scopes = self.scopes.lock().unwrap();
            if scopes.classes.len() < SCOPE_CLASSES {
                scopes.classes.insert(key, id);
            }
            if let Some(s) = scopes.built.get(&id?) {
                return Some(s.clone());
            }
        }
        let visible = self.mesh.visible(&v);
        let scope = Arc::new(Scope {
            clusters: cluster::outbound_clusters(&visible),
            endpoints: endpoint::assignments(&visible),
            routes: route::route_configs(&visible),
        });
        Some(
            self.scopes
                .lock()
                .unwrap()
                .built
                .entry(id?)
                .or_insert(scope)
                .clone(),
        )
    }

    /// As [`Snapshot::build`], recording what differs from `prev`.
    pub fn build_after(
        prev: &Snapshot,
        version: u64,
        mesh: Arc<Mesh>,
        changed_at: Instant,
        changed_at_wall: SystemTime,
    ) -> Snapshot {
        let mut s = Snapshot::build(version, mesh, changed_at, changed_at_wall);
        fn differ<'a>(
            a: impl Iterator<Item = &'a Resource> + Clone,
            b: impl Iterator<Item = &'a Resource> + Clone,
        ) -> std::collections::HashSet<String> {
            let index = |it: &mut dyn Iterator<Item = &'a Resource>| -> HashMap<&'a str, u64> {
                it.map(|r| (r.name.as_str(), r.hash)).collect()
            };
            let (ia, ib) = (index(&mut a.clone()), index(&mut b.clone()));
            ia.iter()
                .filter(|(n, h)| ib.get(*n) != Some(*h))
                .map(|(n, _)| n.to_string())
                .chain(
                    ib.keys()
                        .filter(|n| !ia.contains_key(*n))
                        .map(|n| n.to_string()),
                )
                .collect()
        }
        s.changed.insert(
            CLUSTER_TYPE,
            differ(prev.clusters.iter(), s.clusters.iter()),
        );
        s.changed.insert(
            ENDPOINT_TYPE,
            differ(prev.endpoints.values(), s.endpoints.values()),
        );
        s.changed
            .insert(ROUTE_TYPE, differ(prev.routes.values(), s.routes.values()));
        s.prev_version = Some(prev.version);
        s
    }

    /// What differs for a proxy whose previous view is `old` and new view `new`: the names
    /// per type, when `old` was built on the snapshot this one was compared with and the
    /// listeners were kept; `None` means compare everything.
    pub fn changes_for(
        &self,
        old: Option<&View>,
        new: &View,
    ) -> Option<&HashMap<&'static str, std::collections::HashSet<String>>> {
        let old = old?;
        (self.prev_version == Some(old.snapshot.version) && new.kept_listeners)
            .then_some(&self.changed)
    }

    /// An empty snapshot (version 0) for a control plane with no config yet.
    pub fn empty() -> Snapshot {
        Snapshot::build(
            0,
            Arc::new(Mesh::default()),
            Instant::now(),
            SystemTime::now(),
        )
    }

    /// The resources one proxy sees, keeping `prev`'s listeners and inbound clusters when
    /// nothing they are built from changed (an endpoint churn rebuilds no listener).
    pub fn view_from(self: &Arc<Self>, node: &NodeInfo, prev: Option<&View>) -> View {
        match prev {
            Some(p) if p.snapshot.listeners_key == self.listeners_key => View {
                snapshot: self.clone(),
                listeners: p.listeners.clone(),
                inbound_clusters: p.inbound_clusters.clone(),
                routes: p.routes.clone(),
                scope: self.scope(node),
                kept_listeners: true,
                node: self.node_for_secrets(node),
                secrets: Default::default(),
            },
            _ => self.view(node),
        }
    }

    /// The resources one proxy sees.
    pub fn view(self: &Arc<Self>, node: &NodeInfo) -> View {
        if node.router {
            return View {
                snapshot: self.clone(),
                listeners: gateway::listeners(&self.mesh, node),
                inbound_clusters: vec![],
                routes: Arc::new(gateway::route_configs(&self.mesh, node)),
                scope: None,
                kept_listeners: false,
                node: self.node_for_secrets(node),
                secrets: Default::default(),
            };
        }
        let listeners = listener::listeners(&self.mesh, node);
        let mut inbound: Vec<Resource> = match &node.ip {
            Some(_) => listener::inbound_ports(&self.mesh, node)
                .into_iter()
                .map(|p| cluster::inbound_cluster(p, &node.app_ip))
                .collect(),
            None => vec![],
        };
        if node.capture && node.ip.is_some() {
            inbound.extend(cluster::passthrough_clusters());
        }
        View {
            snapshot: self.clone(),
            listeners,
            inbound_clusters: inbound,
            routes: Arc::default(),
            scope: self.scope(node),
            kept_listeners: false,
            node: self.node_for_secrets(node),
            secrets: Default::default(),
        }
    }

    /// A proxy's SPIFFE identity: the service account of the workload registered at its pod
    /// IP in its namespace (`default` when none).
    pub fn identity(&self, node: &NodeInfo) -> String {
        if let Some(p) = &node.proven {
            return p.clone();
        }
        let sa = node.ip.as_deref().map_or_else(
            || "default".to_string(),
            |ip| self.mesh.service_account_at(&node.namespace, ip),
        );
        crate::security::spiffe_id(&node.namespace, &sa)
    }

    /// Whether a client certificate's identity may speak for `node`, as istiod checks its
    /// xDS clients: the identity's namespace is the node's, and when a workload is registered
    /// at the node's pod IP, the service account is that workload's.
    pub fn may_speak_for(&self, node: &NodeInfo, proven: &str) -> Result<(), String> {
        let prefix = format!("spiffe://{}/ns/", crate::security::TRUST_DOMAIN);
        let (ns, sa) = proven
            .strip_prefix(&prefix)
            .and_then(|r| r.split_once("/sa/"))
            .ok_or_else(|| format!("{proven:?} is not a SPIFFE identity of this mesh"))?;
        if ns != node.namespace {
            return Err(format!(
                "the certificate is of namespace {ns}, the node of {}",
                node.namespace
            ));
        }
        let registered = node.ip.as_deref().and_then(|ip| {
            self.mesh
                .workloads
                .iter()
                .find(|w| w.namespace == node.namespace && w.entry.address == ip)
                .map(|w| w.entry.service_account.as_deref().unwrap_or("default"))
        });
        match registered {
            Some(expected) if expected != sa => Err(format!(
                "the certificate is service account {sa}, the pod at {} runs as {expected}",
                node.ip.as_deref().unwrap_or("?")
            )),
            _ => Ok(()),
        }
    }

    /// What a view needs to issue the proxy's secrets, when this snapshot serves any.
    fn node_for_secrets(&self, node: &NodeInfo) -> Option<Arc<NodeInfo>> {
        self.security.as_ref().map(|_| Arc::new(node.clone()))
    }
}

fn listeners_key(mesh: &Mesh) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in mesh.services.values() {
        s.namespace.hash(&mut h);
        s.selector.hash(&mut h);
        for p in &s.ports {
            format!("{:?}", p.target_port).hash(&mut h);
        }
    }
    // A captured sidecar has a listener per service port number.
    mesh.service_port_numbers().hash(&mut h);
    // Listeners carry the EnvoyFilters' rate limits and the PeerAuthentications' TLS chains.
    format!("{:?}", mesh.envoy_filters).hash(&mut h);
    format!("{:?}", mesh.peer_authentications).hash(&mut h);
    format!("{:?}", mesh.authorization_policies).hash(&mut h);
    // What each sidecar sees (a change of visibility is compared in full).
    if mesh.scoped() {
        format!("{:?}", mesh.sidecars).hash(&mut h);
        // Who owns what matters too: `.` exports to the owner's namespace.
        for s in mesh.services.values() {
            (&s.namespace, &s.export_to).hash(&mut h);
        }
        for (host, r) in &mesh.routes {
            (host, &r.namespace, &r.export_to).hash(&mut h);
        }
        for (host, p) in &mesh.policies {
            (host, &p.namespace, &p.export_to).hash(&mut h);
        }
    }
    // Gateways' listeners and routes (whose default ports come from the services' ports).
    if !mesh.gateways.is_empty() {
        format!("{:?}", (&mesh.gateways, &mesh.gateway_routes)).hash(&mut h);
        for s in mesh.services.values() {
            for p in &s.ports {
                p.port.hash(&mut h);
            }
        }
    }
    h.finish()
}

/// One proxy's resources for one snapshot.
#[derive(Clone, Debug)]
pub struct View {
    pub snapshot: Arc<Snapshot>,
    pub listeners: Vec<Resource>,
    pub inbound_clusters: Vec<Resource>,
    /// Route configurations of this proxy's own (a gateway's `http.PORT`).
    pub routes: Arc<HashMap<String, Resource>>,
    /// What a sidecar under a Sidecar or narrow `exportTo` sees instead of the whole mesh.
    pub scope: Option<Arc<Scope>>,
    /// Listeners and inbound clusters are the previous view's (nothing they depend on changed).
    pub kept_listeners: bool,
    /// The proxy, when the snapshot serves secrets.
    node: Option<Arc<NodeInfo>>,
    /// Its secrets, issued on first request.
    secrets: std::sync::OnceLock<Arc<HashMap<String, Resource>>>,
}

impl View {
    /// Whether the type is requested with a wildcard (all resources in every response).
    pub fn is_wildcard(type_url: &str) -> bool {
        type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE
    }

    /// Every resource of a wildcard type (CDS, LDS).
    pub fn all(&self, type_url: &str) -> Vec<&Resource> {
        match type_url {
            CLUSTER_TYPE => self
                .scope
                .as_ref()
                .map_or(&self.snapshot.clusters, |s| &s.clusters)
                .iter()
                .chain(&self.inbound_clusters)
                .collect(),
            LISTENER_TYPE => self.listeners.iter().collect(),
            _ => vec![],
        }
    }

    /// A named resource of EDS or RDS.
    pub fn get(&self, type_url: &str, name: &str) -> Option<&Resource> {
        match type_url {
            ENDPOINT_TYPE => self
                .scope
                .as_ref()
                .map_or(&self.snapshot.endpoints, |s| &s.endpoints)
                .get(name),
            ROUTE_TYPE => self.routes.get(name).or_else(|| {
                self.scope
                    .as_ref()
                    .map_or(&self.snapshot.routes, |s| &s.routes)
                    .get(name)
            }),
            SECRET_TYPE => self.secrets()?.get(name),
            _ => None,
        }
    }

    /// The proxy's secrets: its identity is its pod's service account (the registered
    /// workload at its IP), `default` otherwise.
    fn secrets(&self) -> Option<&HashMap<String, Resource>> {
        let (issuer, epoch) = self.snapshot.security.as_ref()?;
        let node = self.node.as_ref()?;
        let secrets = self
            .secrets
            .get_or_init(|| issuer.secrets(&node.id, &self.snapshot.identity(node), *epoch));
        Some(secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        http_connection_manager::RouteSpecifier, HttpConnectionManager,
    };
    use prost::Message;

    /// go-control-plane's consistency rule: every EDS name a cluster uses and every RDS name a
    /// listener uses exists in the snapshot.
    #[test]
    fn snapshot_is_consistent() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/bookinfo/bookinfo.yaml"
        ))
        .unwrap();
        let mut objects = config::parse("bookinfo.yaml", &text).unwrap().objects;
        let routes = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/bookinfo/destination-rule-all.yaml"
        ))
        .unwrap();
        objects.extend(config::parse("dr.yaml", &routes).unwrap().objects);
        let mesh = crate::model::compile::compile(objects.iter(), [], false).unwrap();
        let snap = Arc::new(Snapshot::build(
            1,
            Arc::new(mesh),
            Instant::now(),
            SystemTime::now(),
        ));
        let node = NodeInfo {
            id: "x".into(),
            cluster: "reviews".into(),
            ip: Some("127.0.5.5".into()),
            pod: "reviews-v1-0".into(),
            namespace: "default".into(),
            labels: [
                ("app".to_string(), "reviews".to_string()),
                ("version".to_string(), "v1".to_string()),
            ]
            .into(),
            app_ip: "127.0.6.5".into(),
            capture: false,
            router: false,
            proven: None,
        };
        let view = snap.view(&node);
        for r in view.all(CLUSTER_TYPE) {
            let c = Cluster::decode(r.any.value.as_slice()).unwrap();
            if let Some(eds) = c.eds_cluster_config {
                assert!(
                    view.get(ENDPOINT_TYPE, &eds.service_name).is_some(),
                    "no EDS for {}",
                    c.name
                );
            }
        }
        assert!(view
            .all(CLUSTER_TYPE)
            .iter()
            .any(|r| r.name == "outbound|9080|v3|reviews.default.svc.cluster.local"));
        assert!(view
            .all(CLUSTER_TYPE)
            .iter()
            .any(|r| r.name == "inbound|9080||"));
        let names: Vec<_> = view
            .all(LISTENER_TYPE)
            .iter()
            .map(|r| r.name.clone())
            .collect();
        assert_eq!(names, vec!["127.0.5.5_15001", "127.0.5.5_9080"]);
        for r in view.all(LISTENER_TYPE) {
            let l = Listener::decode(r.any.value.as_slice()).unwrap();
            let any = match &l.filter_chains[0].filters[0].config_type {
                Some(
                    envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                        a,
                    ),
                ) => a,
                _ => panic!("no typed config"),
            };
            let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
            assert!(!hcm.http_filters.is_empty());
            if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                assert!(view.get(ROUTE_TYPE, &rds.route_config_name).is_some());
            }
        }
    }

    fn snapshot_of(yaml: &str) -> Arc<Snapshot> {
        let objects = config::parse("t.yaml", yaml).unwrap().objects;
        let mesh = crate::model::compile::compile(objects.iter(), [], false).unwrap();
        Arc::new(Snapshot::build(
            1,
            Arc::new(mesh),
            Instant::now(),
            SystemTime::now(),
        ))
    }

    fn node(namespace: &str, router: bool) -> NodeInfo {
        let id = if router {
            super::super::node::router_id("127.0.9.9", "p", namespace)
        } else {
            super::super::node::sidecar_id("127.0.9.9", "p", namespace)
        };
        NodeInfo::from_node(&envoy_types::pb::envoy::config::core::v3::Node {
            id,
            ..Default::default()
        })
    }

    fn cluster_names(v: &View) -> Vec<String> {
        v.all(CLUSTER_TYPE).iter().map(|r| r.name.clone()).collect()
    }

    const TWO_TENANTS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: tenant-a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: tenant-b}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: tenant-c}\nspec: {ports: [{port: 80}]}\n";

    /// The root namespace's default Sidecar reads `.` as each proxy's own namespace (Istio's
    /// documented mesh-wide default), and namespaces seeing the same hosts share one scope.
    #[test]
    fn a_root_sidecar_scopes_every_namespace_to_itself() {
        let snap = snapshot_of(&format!("{TWO_TENANTS}---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: istio-system}}\nspec:\n  egress: [{{hosts: [\"./*\", \"istio-system/*\"]}}]\n"));
        let a = snap.view(&node("tenant-a", false));
        assert_eq!(
            cluster_names(&a),
            vec!["outbound|80||a.tenant-a.svc.cluster.local"]
        );
        let b = snap.view(&node("tenant-b", false));
        assert_eq!(
            cluster_names(&b),
            vec!["outbound|80||b.tenant-b.svc.cluster.local"]
        );
        // A namespace with no services of its own sees nothing; a gateway sees everything.
        assert!(cluster_names(&snap.view(&node("tenant-z", false))).is_empty());
        assert_eq!(
            cluster_names(&snap.view(&node("istio-system", true))).len(),
            3
        );
        // exportTo only: namespaces that see everything share the whole mesh (no copy).
        let snap = snapshot_of(&TWO_TENANTS.replace(
            "{name: c, namespace: tenant-c}",
            "{name: c, namespace: tenant-c, annotations: {networking.istio.io/exportTo: \".\"}}",
        ));
        assert!(snap.scope(&node("tenant-c", false)).is_none());
        let a = snap.scope(&node("tenant-a", false)).unwrap();
        let b = snap.scope(&node("tenant-b", false)).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "equal visible sets share one scope");
        assert_eq!(a.clusters.len(), 2);
    }

    /// Moving a DestinationRule exported to `.` to another namespace changes who sees it,
    /// though no global resource changes: the proxies' views must be rebuilt.
    #[test]
    fn visibility_owners_are_part_of_the_listeners_key() {
        let dr = |ns: &str| {
            format!("{TWO_TENANTS}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: a, namespace: {ns}}}\nspec: {{host: a.tenant-a.svc.cluster.local, exportTo: [.], subsets: [{{name: v1, labels: {{version: v1}}}}]}}\n")
        };
        let (one, two) = (snapshot_of(&dr("tenant-a")), snapshot_of(&dr("tenant-b")));
        assert_eq!(one.clusters.len(), two.clusters.len());
        assert_ne!(one.listeners_key, two.listeners_key);
        let has_subset = |s: &Arc<Snapshot>, ns: &str| {
            cluster_names(&s.view(&node(ns, false)))
                .iter()
                .any(|c| c.contains("|v1|"))
        };
        assert!(has_subset(&one, "tenant-a") && !has_subset(&one, "tenant-b"));
        assert!(has_subset(&two, "tenant-b") && !has_subset(&two, "tenant-a"));
    }

    /// A gateway binds only the VirtualServices exported to its namespace.
    #[test]
    fn gateways_bind_only_virtual_services_exported_to_them() {
        let yaml = |export: &str| {
            format!("{TWO_TENANTS}---\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: gw, namespace: istio-system}}\nspec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 80, protocol: HTTP}}, hosts: [\"*\"]}}]}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a, namespace: tenant-a}}\nspec: {{hosts: [a.example.com], gateways: [istio-system/gw], exportTo: [{export}], http: [{{route: [{{destination: {{host: a}}}}]}}]}}\n")
        };
        let mut gw = node("istio-system", true);
        gw.labels = [("istio".to_string(), "ingressgateway".to_string())].into();
        for (export, bound) in [("\"*\"", true), ("istio-system", true), (".", false)] {
            let snap = snapshot_of(&yaml(export));
            let view = snap.view(&gw);
            let rc = view.get(ROUTE_TYPE, "http.80").expect("a gateway route");
            let rc = envoy_types::pb::envoy::config::route::v3::RouteConfiguration::decode(
                rc.any.value.as_slice(),
            )
            .unwrap();
            let names: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
            let want = if bound {
                "a.example.com:80"
            } else {
                "blackhole:80"
            };
            assert_eq!(names, vec![want], "exportTo {export}");
        }
    }
}
