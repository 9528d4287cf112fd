//! The mesh model: pure types for services, workloads, routes and policies, plus the
//! validation that decides whether a set of config objects forms a usable mesh.
//!
//! No I/O here. `config` turns YAML/JSON into [`Object`]s; [`ConfigSet::compile`] turns a whole set
//! of objects into a [`Mesh`] (or every error, each naming where it came from); `xds` turns a
//! [`Mesh`] into Envoy resources.

pub mod compile;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Namespace used when a document names none, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";
/// The cluster domain suffix, as in a default Kubernetes cluster.
pub const DOMAIN_SUFFIX: &str = "svc.cluster.local";

pub type Labels = BTreeMap<String, String>;

/// Where a config object came from: file (or `request` for the REST API) and its document
/// index within that file (1-based, as people count them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub file: String,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)
    }
}

/// One config problem, named by file, document, object, field path and reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigError {
    pub file: String,
    pub document: usize,
    /// `Kind/namespace/name` when known.
    pub object: String,
    /// Field path such as `spec.http[0].route[1].weight`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file, self.document)?;
        if !self.object.is_empty() {
            write!(f, " ({})", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The kinds meshbench understands. `RouteRule` is the seed's `config.istio.io/v1alpha2` form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    Deployment,
    VirtualService,
    DestinationRule,
    ServiceEntry,
    WorkloadEntry,
    RouteRule,
    EnvoyFilter,
    Gateway,
    Sidecar,
    PeerAuthentication,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Service,
        Kind::Deployment,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::RouteRule,
        Kind::EnvoyFilter,
        Kind::Gateway,
        Kind::Sidecar,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Deployment => "Deployment",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::RouteRule => "RouteRule",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::Gateway => "Gateway",
            Kind::Sidecar => "Sidecar",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Parses a kind name case-insensitively, also accepting plural forms (`virtualservices`).
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL.into_iter().find(|k| {
            let name = k.as_str().to_ascii_lowercase();
            name == lower || name == singular
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity of a stored object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// A parsed config object with its origin.
#[derive(Clone, Debug, Serialize)]
pub struct Object {
    pub origin: Origin,
    pub namespace: String,
    pub name: String,
    pub spec: Spec,
}

impl Object {
    pub fn key(&self) -> Key {
        Key {
            kind: self.spec.kind(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", content = "spec")]
pub enum Spec {
    Service(ServiceSpec),
    Deployment(DeploymentSpec),
    VirtualService(VirtualServiceSpec),
    DestinationRule(DestinationRuleSpec),
    ServiceEntry(ServiceEntrySpec),
    WorkloadEntry(WorkloadEntrySpec),
    RouteRule(RouteRuleSpec),
    EnvoyFilter(EnvoyFilterSpec),
    Gateway(GatewaySpec),
    Sidecar(SidecarSpec),
    PeerAuthentication(PeerAuthenticationSpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Service(_) => Kind::Service,
            Spec::Deployment(_) => Kind::Deployment,
            Spec::VirtualService(_) => Kind::VirtualService,
            Spec::DestinationRule(_) => Kind::DestinationRule,
            Spec::ServiceEntry(_) => Kind::ServiceEntry,
            Spec::WorkloadEntry(_) => Kind::WorkloadEntry,
            Spec::RouteRule(_) => Kind::RouteRule,
            Spec::EnvoyFilter(_) => Kind::EnvoyFilter,
            Spec::Gateway(_) => Kind::Gateway,
            Spec::Sidecar(_) => Kind::Sidecar,
            Spec::PeerAuthentication(_) => Kind::PeerAuthentication,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl TargetPort {
    /// The port number, when given as one.
    pub fn number(&self) -> Option<u16> {
        match self {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceSpec {
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
    pub cluster_ip: Option<String>,
    /// The `networking.istio.io/exportTo` annotation.
    pub export_to: ExportTo,
}

/// Istio's `exportTo`: the namespaces a config is visible to. `None` (not given) and `*` mean
/// every namespace, `.` the config's own, `~` none; other entries are namespace names.
pub type ExportTo = Option<Vec<String>>;

/// Whether a config of namespace `owner` with `export_to` is visible in namespace `to`.
pub fn exported(export_to: &ExportTo, owner: &str, to: &str) -> bool {
    match export_to {
        None => true,
        Some(list) => list
            .iter()
            .any(|e| e == "*" || e == to || (e == "." && owner == to)),
    }
}

/// Whether an export list narrows visibility at all.
pub fn narrows(export_to: &ExportTo) -> bool {
    export_to
        .as_ref()
        .is_some_and(|l| !l.iter().any(|e| e == "*"))
}

#[derive(Clone, Debug, Serialize)]
pub struct DeploymentSpec {
    pub replicas: u32,
    pub labels: Labels,
    /// containerPort values, with their names when given.
    pub container_ports: Vec<(Option<String>, u16)>,
    /// `spec.template.spec.serviceAccountName` (the pods' identity; `default` when absent).
    pub service_account: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<Labels>,
    pub export_to: ExportTo,
}

/// A workload registered without a Kubernetes controller (Istio WorkloadEntry), also the shape
/// of ServiceEntry inline endpoints and of REST API endpoint registrations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntrySpec {
    pub address: String,
    #[serde(default)]
    pub labels: Labels,
    /// Service port name -> port on this workload (overrides targetPort).
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Health as the registry sees it; unhealthy endpoints are sent with UNHEALTHY status.
    #[serde(default = "default_true")]
    pub healthy: bool,
    /// The workload's service account (its mTLS identity); `default` when absent.
    #[serde(
        default,
        rename = "serviceAccount",
        alias = "service_account",
        skip_serializing_if = "Option::is_none"
    )]
    pub service_account: Option<String>,
}

pub(crate) fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}
fn default_weight() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HttpMatch {
    pub uri: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    /// `withoutHeaders`: headers that must not match (an absent header counts as empty, so
    /// it qualifies, as istiod writes it).
    pub without_headers: BTreeMap<String, StringMatch>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteDestination {
    pub destination: Destination,
    /// `None` when the document gave no weight.
    pub weight: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Retries {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// 0..=100
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultAbort {
    pub http_status: u16,
    /// 0..=100
    pub percent: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoute {
    pub name: Option<String>,
    /// Any of these matches (OR); empty means match everything.
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
    /// `headers.request` / `headers.response`.
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

/// Istio's header operations: `set` replaces, `add` appends, `remove` deletes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub export_to: ExportTo,
}

/// Istio's `Sidecar`: what the selected proxies import (`egress.hosts`, `ns/host` split).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SidecarSpec {
    /// `workloadSelector.labels`; none applies to the whole namespace.
    pub selector: Option<Labels>,
    /// (namespace: `*`, `.`, `~` or a name; host: `*`, `*.suffix` or a name).
    pub egress: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConnectionPool {
    pub max_connections: Option<u32>,
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    pub connect_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    /// Below this share of healthy hosts outlier detection stops mattering (panic mode);
    /// istiod's default is 0 (never).
    pub min_health_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// `tls.mode`: how clients talk to the host (none: Istio's auto mTLS).
    pub tls: Option<ClientTls>,
}

/// DestinationRule `tls.mode` values meshbench runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ClientTls {
    /// Plaintext.
    Disable,
    /// Mutual TLS with the mesh's certificates.
    IstioMutual,
}

/// PeerAuthentication modes: how a workload's port accepts connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum MtlsMode {
    /// Plaintext only.
    Disable,
    /// Mutual TLS and plaintext.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// A PeerAuthentication: for the workloads its selector matches (none or empty: the whole
/// namespace, or the mesh in the root namespace), a mode and per-port modes (`None`: UNSET,
/// inherit).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<Labels>,
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, Option<MtlsMode>>,
}

/// An AuthorizationPolicy as far as meshbench runs it (ALLOW and DENY; sources by principal
/// and namespace; operations by method, path and port; conditions on request headers, source
/// principal and namespace, destination port). Each list of values matches when any value
/// does; a source, operation or rule matches when all its lists do.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicySpec {
    /// `selector.matchLabels`; none: every workload of the namespace (of the mesh in the root
    /// namespace).
    pub selector: Option<Labels>,
    pub action: AuthzAction,
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AuthzAction {
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AuthzRule {
    /// Any of these sources (none: any source).
    pub from: Vec<AuthzSource>,
    /// Any of these operations (none: any operation).
    pub to: Vec<AuthzOperation>,
    /// All of these conditions.
    pub when: Vec<AuthzCondition>,
}

/// Values and negated values of one field (`principals` / `notPrincipals`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Values {
    pub is: Vec<String>,
    pub not: Vec<String>,
}

impl Values {
    pub fn is_empty(&self) -> bool {
        self.is.is_empty() && self.not.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AuthzSource {
    pub principals: Values,
    pub namespaces: Values,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AuthzOperation {
    pub methods: Values,
    pub paths: Values,
    pub ports: Values,
}

/// `when`: `request.headers[NAME]`, `source.principal`, `source.namespace` or
/// `destination.port`, with values.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthzCondition {
    pub key: String,
    pub values: Values,
}

/// The pod label Istio's injector sets on workloads with a sidecar; auto mTLS sends mutual
/// TLS only to endpoints that carry it.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

impl TrafficPolicy {
    /// A subset's policy overrides the rule's, field group by field group, as in Istio.
    pub fn merged(base: Option<&TrafficPolicy>, over: Option<&TrafficPolicy>) -> TrafficPolicy {
        let base = base.cloned().unwrap_or_default();
        match over {
            None => base,
            Some(o) => TrafficPolicy {
                load_balancer: o.load_balancer.or(base.load_balancer),
                connection_pool: o.connection_pool.clone().or(base.connection_pool),
                outlier_detection: o.outlier_detection.clone().or(base.outlier_detection),
                tls: o.tls.or(base.tls),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub subsets: Vec<Subset>,
    pub traffic_policy: Option<TrafficPolicy>,
    pub export_to: ExportTo,
}

/// The seed's `config.istio.io/v1alpha2 RouteRule`.
#[derive(Clone, Debug, Serialize)]
pub struct RouteRuleSpec {
    pub destination: String,
    pub precedence: i32,
    pub matches: Vec<HttpMatch>,
    /// (pod labels, weight)
    pub route: Vec<(Labels, Option<u32>)>,
    pub timeout: Option<Duration>,
    pub retries: Option<Retries>,
    pub fault: Option<Fault>,
}

// ---------------------------------------------------------------------------------------------
// The compiled mesh: what translation to xDS consumes.

/// A service as the data plane sees it: a host with ports and a way to find its endpoints.
#[derive(Clone, Debug, Serialize)]
pub struct MeshService {
    pub name: String,
    pub namespace: String,
    /// FQDN for Kubernetes services (`reviews.default.svc.cluster.local`), the host for entries.
    pub host: String,
    pub ports: Vec<ServicePort>,
    /// Workload label selector (`None` means only inline endpoints, as for a ServiceEntry
    /// without workloadSelector).
    pub selector: Option<Labels>,
    pub addresses: Vec<String>,
    /// Endpoints declared inline (ServiceEntry endpoints).
    pub inline_endpoints: Vec<WorkloadEntrySpec>,
    /// Whether short names (`reviews`, `reviews.default`) resolve to it.
    pub kubernetes: bool,
    pub export_to: ExportTo,
}

/// A workload instance (pod, WorkloadEntry or REST-registered endpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(flatten)]
    pub entry: WorkloadEntrySpec,
}

/// Routing for one host: the VirtualService (or RouteRules) bound to it.
#[derive(Clone, Debug, Serialize)]
pub struct HostRoutes {
    /// `VirtualService/ns/name` or `RouteRule/ns/name,...`, used as the Envoy route decorator.
    pub source: String,
    pub http: Vec<HttpRoute>,
    /// The VirtualService's namespace and `exportTo`.
    pub namespace: String,
    pub export_to: ExportTo,
}

/// An Istio Gateway: which proxies (`selector`, in any namespace) serve which ports and hosts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewaySpec {
    pub selector: Labels,
    pub servers: Vec<GatewayServer>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GatewayServer {
    /// The server's port number (a Service port of the gateway; the listener is on its
    /// target port).
    pub port: u16,
    /// `ns/host` as written, split: `namespace` is `*` (any), `.` (the Gateway's) or a name.
    pub hosts: Vec<(String, String)>,
}

/// A VirtualService bound to one Gateway (`gateways: [ns/name]`).
#[derive(Clone, Debug, Serialize)]
pub struct GatewayRoutes {
    /// The Gateway's (namespace, name).
    pub gateway: (String, String),
    /// `VirtualService/ns/name`.
    pub source: String,
    /// The VirtualService's namespace (for the servers' `ns/host` host filters).
    pub namespace: String,
    /// Hosts as written (wildcards allowed; short names qualified with the namespace).
    pub hosts: Vec<String>,
    /// Destinations resolved as for sidecars.
    pub http: Vec<HttpRoute>,
    /// The VirtualService's `exportTo`: a gateway binds it only when it is exported to the
    /// gateway's namespace.
    pub export_to: ExportTo,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostPolicy {
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    /// The DestinationRule's namespace and `exportTo`.
    pub namespace: String,
    pub export_to: ExportTo,
}

/// A validated mesh. Maps are keyed by service host (FQDN).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Mesh {
    pub services: BTreeMap<String, MeshService>,
    pub routes: BTreeMap<String, HostRoutes>,
    pub policies: BTreeMap<String, HostPolicy>,
    /// Shared with the config store: a change of endpoints copies pointers, not workloads.
    pub workloads: Vec<std::sync::Arc<Workload>>,
    /// Things accepted but not acted on (gateway-only routes, unsupported kinds...).
    pub warnings: Vec<ConfigError>,
    /// EnvoyFilters by namespace (those of [`ROOT_NAMESPACE`] apply everywhere).
    pub envoy_filters: Vec<(String, std::sync::Arc<EnvoyFilterSpec>)>,
    /// Gateways by (namespace, name).
    pub gateways: BTreeMap<(String, String), GatewaySpec>,
    /// VirtualServices bound to gateways, in the order of their keys.
    pub gateway_routes: Vec<GatewayRoutes>,
    /// Sidecars by (namespace, name).
    pub sidecars: BTreeMap<(String, String), SidecarSpec>,
    /// PeerAuthentications by (namespace, name).
    pub peer_authentications: BTreeMap<(String, String), PeerAuthenticationSpec>,
    /// AuthorizationPolicies by (namespace, name).
    pub authorization_policies: BTreeMap<(String, String), AuthorizationPolicySpec>,
}

/// The hosts one sidecar sees (sorted); `everything` when that is the whole mesh.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Visibility {
    pub services: Vec<String>,
    pub routes: Vec<String>,
    pub policies: Vec<String>,
    pub everything: bool,
}

/// Which Sidecar a proxy is under, if any: one of its namespace selecting its labels (the
/// first by name), else its namespace's without a selector, else the root namespace's without
/// a selector (Istio's order).
pub type SidecarKey = (String, String);

impl Mesh {
    /// The ports of the services of `namespace` that select a pod with `labels`.
    pub fn ports_serving<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a ServicePort> + 'a {
        self.services
            .values()
            .filter(move |s| s.namespace == namespace)
            .filter(move |s| {
                s.selector
                    .as_ref()
                    .is_some_and(|sel| !sel.is_empty() && labels_match(sel, labels))
            })
            .flat_map(|s| s.ports.iter())
    }

    pub fn sidecar_for(&self, namespace: &str, labels: &Labels) -> Option<&SidecarKey> {
        let mut in_ns = self.sidecars.iter().filter(|((ns, _), _)| ns == namespace);
        in_ns
            .clone()
            .find(|(_, s)| {
                s.selector
                    .as_ref()
                    .is_some_and(|sel| labels_match(sel, labels))
            })
            .or_else(|| in_ns.find(|(_, s)| s.selector.is_none()))
            .or_else(|| {
                self.sidecars
                    .iter()
                    .find(|((ns, _), s)| ns == ROOT_NAMESPACE && s.selector.is_none())
            })
            .map(|(k, _)| k)
    }

    /// Whether anything narrows what a proxy sees (a Sidecar, or an `exportTo` other than
    /// every namespace): when not, every sidecar sees the whole mesh.
    pub fn scoped(&self) -> bool {
        !self.sidecars.is_empty()
            || self.services.values().any(|s| narrows(&s.export_to))
            || self.routes.values().any(|r| narrows(&r.export_to))
            || self.policies.values().any(|p| narrows(&p.export_to))
    }

    /// What a sidecar of `namespace` under `sidecar` sees: the hosts of the services exported
    /// to its namespace that its Sidecar's egress hosts import (`.` is the proxy's own
    /// namespace, also under the root namespace's default Sidecar, as Istio reads it), and of
    /// those the hosts whose VirtualService and DestinationRule are exported to it.
    pub fn visibility(&self, namespace: &str, sidecar: Option<&SidecarKey>) -> Visibility {
        let egress = sidecar
            .and_then(|k| self.sidecars.get(k))
            .map(|s| &s.egress);
        let imported = |svc: &MeshService| match egress {
            None => true,
            Some(hosts) => hosts.iter().any(|(ns, h)| {
                let ns_ok =
                    ns == "*" || ns == &svc.namespace || (ns == "." && namespace == svc.namespace);
                ns_ok && host_matches(h, &svc.host)
            }),
        };
        let services: Vec<String> = self
            .services
            .values()
            .filter(|s| exported(&s.export_to, &s.namespace, namespace) && imported(s))
            .map(|s| s.host.clone())
            .collect();
        let visible = |h: &String| services.binary_search(h).is_ok();
        let routes: Vec<String> = self
            .routes
            .iter()
            .filter(|(h, r)| visible(h) && exported(&r.export_to, &r.namespace, namespace))
            .map(|(h, _)| h.clone())
            .collect();
        let policies: Vec<String> = self
            .policies
            .iter()
            .filter(|(h, p)| visible(h) && exported(&p.export_to, &p.namespace, namespace))
            .map(|(h, _)| h.clone())
            .collect();
        let everything = services.len() == self.services.len()
            && routes.len() == self.routes.len()
            && policies.len() == self.policies.len();
        Visibility {
            services,
            routes,
            policies,
            everything,
        }
    }

    /// The mesh restricted to what `v` makes visible (no gateways).
    pub fn visible(&self, v: &Visibility) -> Mesh {
        // The lists are sorted (taken from maps keyed by host).
        let has = |list: &[String], h: &String| list.binary_search(h).is_ok();
        Mesh {
            services: self
                .services
                .iter()
                .filter(|(h, _)| has(&v.services, h))
                .map(|(h, s)| (h.clone(), s.clone()))
                .collect(),
            routes: self
                .routes
                .iter()
                .filter(|(h, _)| has(&v.routes, h))
                .map(|(h, r)| (h.clone(), r.clone()))
                .collect(),
            policies: self
                .policies
                .iter()
                .filter(|(h, _)| has(&v.policies, h))
                .map(|(h, p)| (h.clone(), p.clone()))
                .collect(),
            workloads: self.workloads.clone(),
            warnings: vec![],
            envoy_filters: self.envoy_filters.clone(),
            gateways: BTreeMap::new(),
            gateway_routes: vec![],
            sidecars: BTreeMap::new(),
            peer_authentications: self.peer_authentications.clone(),
            authorization_policies: self.authorization_policies.clone(),
        }
    }

    /// The AuthorizationPolicies that apply to a workload of `namespace` with `labels`: its
    /// namespace's that select it (or select nothing) and the root namespace's, by name.
    pub fn authorization_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = (&'a (String, String), &'a AuthorizationPolicySpec)> + 'a {
        self.authorization_policies
            .iter()
            .filter(move |((ns, _), p)| {
                (ns == namespace || ns == ROOT_NAMESPACE)
                    && p.selector.as_ref().is_none_or(|s| labels_match(s, labels))
            })
    }

    /// Every service port number, sorted (a captured sidecar's `0.0.0.0_PORT` listeners).
    pub fn service_port_numbers(&self) -> Vec<u16> {
        let ports: std::collections::BTreeSet<u16> = self
            .services
            .values()
            .flat_map(|s| s.ports.iter().map(|p| p.port))
            .collect();
        ports.into_iter().collect()
    }

    /// How a workload of `namespace` with `labels` accepts connections on `port` (its target
    /// port), as Istio resolves PeerAuthentications: the workload's own (its port-level mode,
    /// then its mode), then the namespace's, then the root namespace's; PERMISSIVE when none
    /// says (Istio's default). UNSET inherits.
    pub fn mtls_mode(&self, namespace: &str, labels: &Labels, port: u16) -> MtlsMode {
        let workload = self
            .peer_authentications
            .iter()
            .find(|((ns, _), p)| {
                ns == namespace
                    && p.selector
                        .as_ref()
                        .is_some_and(|s| !s.is_empty() && labels_match(s, labels))
            })
            .map(|(_, p)| p);
        if let Some(p) = workload {
            if let Some(Some(m)) = p.ports.get(&port) {
                return *m;
            }
            if let Some(m) = p.mode {
                return m;
            }
        }
        self.namespace_mtls(namespace)
    }

    /// The mode of a namespace (its PeerAuthentication without a selector, else the root
    /// namespace's, else PERMISSIVE): what auto mTLS assumes of the namespace's services.
    pub fn namespace_mtls(&self, namespace: &str) -> MtlsMode {
        let wide = |ns: &str| {
            self.peer_authentications
                .iter()
                .find(|((n, _), p)| n == ns && p.selector.as_ref().is_none_or(|s| s.is_empty()))
                .and_then(|(_, p)| p.mode)
        };
        wide(namespace)
            .or_else(|| wide(ROOT_NAMESPACE))
            .unwrap_or(MtlsMode::Permissive)
    }

    /// The service account of the workload at `ip` in `namespace` (`default` when none is
    /// registered or it names none): what a proxy's certificate says it is.
    pub fn service_account_at(&self, namespace: &str, ip: &str) -> String {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.entry.address == ip)
            .and_then(|w| w.entry.service_account.clone())
            .unwrap_or_else(|| "default".to_string())
    }

    /// The EnvoyFilters that select a workload of `namespace` with `labels`, in order.
    pub fn envoy_filters_for<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = &'a EnvoyFilterSpec> + 'a {
        self.envoy_filters
            .iter()
            .filter(move |(ns, f)| {
                (ns == namespace || ns == ROOT_NAMESPACE)
                    && f.selector.as_ref().is_none_or(|s| labels_match(s, labels))
            })
            .map(|(_, f)| &**f)
    }
}

/// The namespace whose EnvoyFilters apply to every namespace (Istio's root namespace).
pub const ROOT_NAMESPACE: &str = "istio-system";

/// An EnvoyFilter as far as meshbench runs one: local rate limits inserted into sidecars'
/// HTTP connection managers or merged into their inbound routes. Other patches are refused
/// when the document is read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EnvoyFilterSpec {
    /// `workloadSelector.labels`; none selects every workload of the namespace.
    pub selector: Option<Labels>,
    pub patches: Vec<RateLimitPatch>,
}

/// Which side of a sidecar a patch applies to (`match.context`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PatchContext {
    Inbound,
    Outbound,
    Any,
}

impl PatchContext {
    pub fn inbound(self) -> bool {
        matches!(self, PatchContext::Inbound | PatchContext::Any)
    }
    pub fn outbound(self) -> bool {
        matches!(self, PatchContext::Outbound | PatchContext::Any)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateLimitPatch {
    pub context: PatchContext,
    /// `match.listener.portNumber` / `match.routeConfiguration.portNumber`.
    pub port: Option<u16>,
    /// None: the filter itself (`HTTP_FILTER`); some: a route's config (`HTTP_ROUTE` MERGE).
    pub route: Option<RouteSelector>,
    pub limit: LocalRateLimitSpec,
}

/// `match.routeConfiguration.vhost`: a virtual host name and a route name (none: any).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RouteSelector {
    pub vhost: Option<String>,
    pub route: Option<String>,
}

/// Envoy's `LocalRateLimit` fields meshbench runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalRateLimitSpec {
    pub stat_prefix: String,
    pub token_bucket: Option<TokenBucketSpec>,
    /// (numerator, denominator: 100, 10,000 or 1,000,000); none: 0%.
    pub filter_enabled: Option<(u32, u32)>,
    pub filter_enforced: Option<(u32, u32)>,
    /// (name, value, append)
    pub response_headers_to_add: Vec<(String, String, bool)>,
    pub status: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenBucketSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// Registered workloads indexed by (namespace, label key, label value), so selecting a
/// service's workloads looks at the candidates of one selector label, not at every workload.
pub struct SelectIndex<'a> {
    mesh: &'a Mesh,
    by_label: std::collections::HashMap<(&'a str, &'a str, &'a str), Vec<&'a Workload>>,
}

impl<'a> SelectIndex<'a> {
    pub fn new(mesh: &'a Mesh) -> SelectIndex<'a> {
        let mut by_label: std::collections::HashMap<_, Vec<&Workload>> = Default::default();
        for w in &mesh.workloads {
            let w: &Workload = w;
            for (k, v) in &w.entry.labels {
                by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(w);
            }
        }
        SelectIndex { mesh, by_label }
    }

    /// As [`Mesh::selected`], in the same order.
    pub fn selected(&self, svc: &'a MeshService) -> Vec<&'a WorkloadEntrySpec> {
        let registered: Vec<&WorkloadEntrySpec> = match svc.selector.as_ref() {
            Some(sel) if !sel.is_empty() => {
                // The rarest selector label's candidates, each checked against the rest.
                let candidates = sel
                    .iter()
                    .map(|(k, v)| {
                        self.by_label
                            .get(&(svc.namespace.as_str(), k.as_str(), v.as_str()))
                            .map_or(&[][..], |l| l.as_slice())
                    })
                    .min_by_key(|l| l.len())
                    .unwrap_or(&[]);
                candidates
                    .iter()
                    .filter(|w| labels_match(sel, &w.entry.labels))
                    .map(|w| &w.entry)
                    .collect()
            }
            // An empty selector: Mesh::selected's rule, unindexed.
            Some(_) => return self.mesh.selected(svc),
            None => vec![],
        };
        svc.inline_endpoints.iter().chain(registered).collect()
    }
}

impl Mesh {
    /// The workloads a service selects: inline endpoints first, then registered workloads
    /// whose labels match its selector in its namespace.
    pub fn selected<'a>(&'a self, svc: &'a MeshService) -> Vec<&'a WorkloadEntrySpec> {
        let registered = self.workloads.iter().filter(|w| {
            w.namespace == svc.namespace
                && svc
                    .selector
                    .as_ref()
                    .is_some_and(|sel| labels_match(sel, &w.entry.labels))
        });
        svc.inline_endpoints
            .iter()
            .chain(registered.map(|w| &w.entry))
            .collect()
    }
}

/// Of `selected` workloads, those in the subset (if any) that serve `port`, with the port.
pub fn port_endpoints<'a>(
    selected: &'a [&'a WorkloadEntrySpec],
    port: &'a ServicePort,
    subset_labels: Option<&'a Labels>,
) -> impl Iterator<Item = (&'a WorkloadEntrySpec, u16)> + 'a {
    selected
        .iter()
        .copied()
        .filter(move |e| subset_labels.is_none_or(|l| labels_match(l, &e.labels)))
        .filter_map(move |e| endpoint_port(e, port).map(|p| (e, p)))
}

/// Every selector label present with the same value.
/// Whether a host pattern (`*`, `*.suffix` or a name) matches a host.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The port a workload serves a service port on: the workload's own mapping by port name,
/// else a numeric targetPort, else the service port. A named targetPort the workload does not
/// map means the workload does not serve that port.
pub fn endpoint_port(e: &WorkloadEntrySpec, port: &ServicePort) -> Option<u16> {
    if let Some(p) = e.ports.get(&port.name) {
        return Some(*p);
    }
    match &port.target_port {
        TargetPort::Number(n) => Some(*n),
        TargetPort::Name(name) => e.ports.get(name).copied(),
    }
}

/// The FQDN of a Kubernetes-style service.
pub fn fqdn(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.{DOMAIN_SUFFIX}")
}

/// Parses Istio/Go-style durations: `7s`, `100ms`, `1.5s`, `2m`, `1h`, `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m or h)"))?;
        if num_len == 0 {
            return Err(format!("duration {s:?}: expected a number"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("duration {s:?}: bad number {:?}", &rest[..num_len]))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            u => {
                return Err(format!(
                    "duration {s:?}: unknown unit {u:?} (use ms, s, m or h)"
                ))
            }
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    if !(total.is_finite() && total <= MAX_DURATION.as_secs_f64()) {
        return Err(format!(
            "duration {s:?} is longer than the longest meshbench accepts ({}h)",
            MAX_DURATION.as_secs() / 3600
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

/// The longest duration any config, scenario or flag may give: 30 days. Longer values are
/// mistakes (or attacks) and overflow timers and Envoy's protobuf durations downstream.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Every stored config object plus the endpoints registered through the REST API: the
/// control plane's whole input. Changes produce a new set; the old one stays valid until the
/// new one compiles, so a bad batch changes nothing.
#[derive(Clone, Debug, Default)]
pub struct ConfigSet {
    pub objects: BTreeMap<Key, Object>,
    /// Keyed by (namespace, name).
    pub endpoints: BTreeMap<(String, String), std::sync::Arc<Workload>>,
    /// References to undefined hosts and subsets are errors, not warnings.
    pub strict_references: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("7s").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("7parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn kind_names() {
        assert_eq!(Kind::parse("virtualservices"), Some(Kind::VirtualService));
        assert_eq!(Kind::parse("Service"), Some(Kind::Service));
        assert_eq!(Kind::parse("gateways"), Some(Kind::Gateway));
        assert_eq!(Kind::parse("Namespace"), None);
    }
}
