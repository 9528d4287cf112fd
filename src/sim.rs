//! Simulated proxies: lightweight in-process xDS clients (SotW or delta) with distinct sidecar
//! identities, as Istio's pilot-load does. Each subscribes as Envoy would (CDS, EDS for the
//! EDS clusters, LDS, RDS for the listeners' route names), decodes every resource of every
//! response, and ACKs (optionally after a delay, or NACKs a given fraction). Each records when
//! it first received every config version, so propagation is measured per proxy. Streams
//! share a few HTTP/2 connections (one per `STREAMS_PER_CONNECTION`), so thousands fit on one
//! machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::clock::unix_ms;
use crate::proxy::resources::{self, RouteSource};
use crate::xds::{
    node, XdsMode, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, PUSH_ORDER, ROUTE_TYPE,
};

/// Namespace of every simulated proxy (the REST API can leave them out of `/v1/proxies`).
pub const SIM_NAMESPACE: &str = "meshbench-sim";
const STREAMS_PER_CONNECTION: usize = 50;

#[derive(Clone, Debug)]
pub struct FleetSpec {
    pub proxies: usize,
    pub mode: XdsMode,
    /// Wait this long before each ACK (a slow proxy).
    pub ack_delay: Duration,
    /// Fraction (0..1) of responses NACKed instead of ACKed.
    pub nack_fraction: f64,
    /// Namespaces the proxies are spread over, round-robin (default: [`SIM_NAMESPACE`]).
    pub namespaces: Vec<String>,
}

/// What one simulated proxy saw.
#[derive(Debug, Default)]
pub struct SimStats {
    pub node_id: String,
    /// Config version -> (first received, ACK sent), wall ms.
    pub versions: Mutex<BTreeMap<u64, (f64, Option<f64>)>>,
    pub responses: AtomicU64,
    pub resources: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes per type, in `PUSH_ORDER` (CDS, EDS, LDS, RDS).
    pub bytes_by_type: [AtomicU64; 5],
    pub nacks: AtomicU64,
    /// Holds clusters and listeners (its first full config arrived).
    pub ready: AtomicBool,
}

impl SimStats {
    /// When this proxy first received a version at or after `v`, and when it ACKed that.
    pub fn reached(&self, v: u64) -> Option<(f64, Option<f64>)> {
        self.versions
            .lock()
            .unwrap()
            .range(v..)
            .next()
            .map(|(_, t)| *t)
    }
}

pub struct Fleet {
    pub sims: Vec<Arc<SimStats>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Connects `spec.proxies` simulated sidecars to the ADS server at `xds`; returns once
    /// every stream is open (not necessarily synced: see [`Fleet::wait_ready`]).
    pub async fn start(xds: SocketAddr, spec: &FleetSpec) -> Result<Fleet, String> {
        let mut sims = Vec::new();
        let mut tasks = Vec::new();
        let mut channel = None;
        // Pilot serves one stream per node identity: fleets started side by side get pod
        // names of their own.
        static FLEETS: AtomicU64 = AtomicU64::new(0);
        let fleet = FLEETS.fetch_add(1, Relaxed);
        for i in 0..spec.proxies {
            if i % STREAMS_PER_CONNECTION == 0 {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
                    .map_err(|e| e.to_string())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("simulated proxies: connect to {xds}: {e}"))?;
                channel = Some(ch);
            }
            let ip = sim_ip(i);
            let pod = format!("sim-{fleet}-{i}");
            let namespace = match spec.namespaces.as_slice() {
                [] => SIM_NAMESPACE,
                list => &list[i % list.len()],
            };
            let stats = Arc::new(SimStats {
                node_id: node::sidecar_id(&ip, &pod, namespace),
                ..Default::default()
            });
            let sim = Sim {
                stats: stats.clone(),
                spec: spec.clone(),
                subscribed: HashMap::new(),
                held: HashMap::new(),
                last: HashMap::new(),
                lds_requested: false,
            };
            let client = AggregatedDiscoveryServiceClient::new(channel.clone().expect("set"))
                .max_decoding_message_size(256 << 20);
            tasks.push(tokio::spawn(async move {
                if let Err(e) = sim.run(client).await {
                    tracing::debug!("simulated proxy ended: {e}");
                }
            }));
            sims.push(stats);
        }
        Ok(Fleet { sims, tasks })
    }

    /// Waits until every simulated proxy holds clusters and listeners.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), String> {
        let start = tokio::time::Instant::now();
        loop {
            let ready = self.sims.iter().filter(|s| s.ready.load(Relaxed)).count();
            if ready == self.sims.len() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{ready} of {} simulated proxies got their config within {limit:?}",
                    self.sims.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.sims.iter().map(|s| s.bytes.load(Relaxed)).sum()
    }

    pub fn responses(&self) -> u64 {
        self.sims.iter().map(|s| s.responses.load(Relaxed)).sum()
    }

    /// Closes every stream.
    pub async fn stop(mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Pod address of simulated proxy `i` (never bound: simulated proxies serve no traffic).
fn sim_ip(i: usize) -> String {
    format!("10.254.{}.{}", i / 250, i % 250 + 1)
}

/// The requests a simulated proxy sends, whichever the ADS method.
enum Wire {
    Sotw(mpsc::Sender<DiscoveryRequest>),
    Delta(mpsc::Sender<DeltaDiscoveryRequest>),
}

/// One response, whichever the ADS method: its type, version, nonce, the resources it
/// carries and (delta) the names it removes.
struct Incoming {
    type_url: String,
    version: String,
    nonce: String,
    resources: Vec<(String, Any)>,
    removed: Vec<String>,
    bytes: usize,
}

struct Sim {
    stats: Arc<SimStats>,
    spec: FleetSpec,
    /// EDS / RDS names subscribed.
    subscribed: HashMap<&'static str, BTreeSet<String>>,
    /// Clusters and listeners held (name -> resource), to know the full set under delta.
    held: HashMap<String, BTreeMap<String, Any>>,
    /// SotW: (version, nonce) of the latest response per type, carried by later requests.
    last: HashMap<String, (String, String)>,
    lds_requested: bool,
}

impl Sim {
    fn node(&self) -> Node {
        Node {
            id: self.stats.node_id.clone(),
            cluster: "sim".into(),
            metadata: Some(node::metadata(
                &[("app".to_string(), "sim".to_string())].into(),
                "127.0.0.1",
            )),
            user_agent_name: "meshbench-sim".into(),
            ..Default::default()
        }
    }

    async fn run(
        mut self,
        mut client: AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    ) -> Result<(), String> {
        match self.spec.mode {
            XdsMode::Sotw => {
                let (tx, rx) = mpsc::channel(16);
                let wire = Wire::Sotw(tx);
                self.subscribe(&wire, CLUSTER_TYPE, vec![], vec![], true)
                    .await;
                let mut stream = client
                    .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                while let Some(r) = stream.message().await.map_err(|e| e.to_string())? {
                    let inc = sotw_incoming(r);
                    self.on_response(&wire, inc).await;
                }
            }
            XdsMode::Delta => {
                let (tx, rx) = mpsc::channel(16);
                let wire = Wire::Delta(tx);
                self.subscribe(&wire, CLUSTER_TYPE, vec![], vec![], true)
                    .await;
                let mut stream = client
                    .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                while let Some(r) = stream.message().await.map_err(|e| e.to_string())? {
                    let inc = delta_incoming(r);
                    self.on_response(&wire, inc).await;
                }
            }
        }
        Ok(())
    }

    /// A subscription request: SotW names the full set, delta the changes.
    async fn subscribe(
        &self,
        wire: &Wire,
        type_url: &str,
        names: Vec<String>,
        unsubscribe: Vec<String>,
        first: bool,
    ) {
        match wire {
            Wire::Sotw(tx) => {
                let (version, nonce) = self.last.get(type_url).cloned().unwrap_or_default();
                let _ = tx
                    .send(DiscoveryRequest {
                        node: first.then(|| self.node()),
                        version_info: version,
                        response_nonce: nonce,
                        type_url: type_url.into(),
                        resource_names: self.names(type_url),
                        ..Default::default()
                    })
                    .await;
            }
            Wire::Delta(tx) => {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        node: first.then(|| self.node()),
                        type_url: type_url.into(),
                        resource_names_subscribe: names,
                        resource_names_unsubscribe: unsubscribe,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }

    fn names(&self, type_url: &str) -> Vec<String> {
        self.subscribed
            .get(type_url)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    async fn on_response(&mut self, wire: &Wire, inc: Incoming) {
        let received = unix_ms(std::time::SystemTime::now());
        let s = &self.stats;
        s.responses.fetch_add(1, Relaxed);
        s.resources.fetch_add(inc.resources.len() as u64, Relaxed);
        s.bytes.fetch_add(inc.bytes as u64, Relaxed);
        if let Some(i) = PUSH_ORDER.iter().position(|t| *t == inc.type_url) {
            s.bytes_by_type[i].fetch_add(inc.bytes as u64, Relaxed);
        }
        let version: Option<u64> = inc.version.parse().ok();
        if let Some(v) = version {
            s.versions
                .lock()
                .unwrap()
                .entry(v)
                .or_insert((received, None));
        }
        let type_url = inc.type_url.clone();
        self.last
            .insert(type_url.clone(), (inc.version.clone(), inc.nonce.clone()));
        let decoded = self.decode(&inc, matches!(wire, Wire::Sotw(_)));
        // The full CDS/LDS set held after this response (what EDS and RDS subscriptions follow
        // from); EDS and RDS bodies are decoded and dropped, which keeps thousands affordable.
        if type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE {
            let held = self.held.entry(type_url.clone()).or_default();
            if matches!(wire, Wire::Sotw(_)) {
                held.clear();
            }
            for n in &inc.removed {
                held.remove(n);
            }
            for (n, a) in inc.resources {
                held.insert(n, a);
            }
        }
        let nack = decoded.is_err()
            || (self.spec.nack_fraction > 0.0
                && rand::rng().random::<f64>() < self.spec.nack_fraction);
        if !self.spec.ack_delay.is_zero() {
            tokio::time::sleep(self.spec.ack_delay).await;
        }
        let error = nack.then(|| RpcStatus {
            code: 13,
            message: decoded
                .err()
                .unwrap_or_else(|| "simulated NACK".to_string()),
            details: vec![],
        });
        if nack {
            s.nacks.fetch_add(1, Relaxed);
        }
        match wire {
            Wire::Sotw(tx) => {
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: inc.version.clone(),
                        resource_names: self.names(&type_url),
                        type_url: type_url.clone(),
                        response_nonce: inc.nonce.clone(),
                        error_detail: error,
                        ..Default::default()
                    })
                    .await;
            }
            Wire::Delta(tx) => {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        type_url: type_url.clone(),
                        response_nonce: inc.nonce.clone(),
                        error_detail: error,
                        ..Default::default()
                    })
                    .await;
            }
        }
        if let Some(v) = version {
            let acked = unix_ms(std::time::SystemTime::now());
            if let Some(e) = s.versions.lock().unwrap().get_mut(&v) {
                e.1.get_or_insert(acked);
            }
        }
        self.follow_up(wire, &type_url).await;
    }

    /// Every resource decoded as the type it claims to be (as a proxy must to apply it):
    /// SotW names come from decoding (empty when it failed); delta resources are decoded here.
    fn decode(&self, inc: &Incoming, sotw: bool) -> Result<(), String> {
        let bad = |name: &str, any: &Any| {
            if sotw {
                name.is_empty()
            } else {
                resource_name(&inc.type_url, any).is_none()
            }
        };
        if inc.resources.iter().any(|(n, a)| bad(n, a)) {
            return Err(format!("cannot decode a {} resource", inc.type_url));
        }
        Ok(())
    }

    /// Subscriptions a response implies: EDS names after CDS, LDS once, RDS after LDS.
    async fn follow_up(&mut self, wire: &Wire, type_url: &str) {
        let held = self.held.get(type_url).cloned().unwrap_or_default();
        match type_url {
            CLUSTER_TYPE => {
                let names: BTreeSet<String> = held
                    .values()
                    .filter_map(|a| Cluster::decode(a.value.as_slice()).ok())
                    .filter_map(|c| c.eds_cluster_config.map(|e| e.service_name))
                    .collect();
                self.resubscribe(wire, ENDPOINT_TYPE, names).await;
                if self.subscribed[ENDPOINT_TYPE].is_empty() {
                    self.request_lds(wire).await;
                }
            }
            ENDPOINT_TYPE => self.request_lds(wire).await,
            LISTENER_TYPE => {
                let names: BTreeSet<String> = held
                    .values()
                    .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
                    .filter_map(|l| resources::listeners(&l, &Default::default()).ok())
                    .flatten()
                    .filter_map(|l| match l.routes {
                        RouteSource::Rds(n) => Some(n),
                        RouteSource::Inline(_) => None,
                    })
                    .collect();
                self.resubscribe(wire, ROUTE_TYPE, names).await;
                self.stats.ready.store(true, Relaxed);
            }
            _ => {}
        }
    }

    async fn resubscribe(&mut self, wire: &Wire, type_url: &'static str, names: BTreeSet<String>) {
        let current = self.subscribed.entry(type_url).or_default();
        if *current == names {
            return;
        }
        let added: Vec<String> = names.difference(current).cloned().collect();
        let removed: Vec<String> = current.difference(&names).cloned().collect();
        *current = names;
        let first = false;
        self.subscribe(wire, type_url, added, removed, first).await;
    }

    async fn request_lds(&mut self, wire: &Wire) {
        if !self.lds_requested {
            self.lds_requested = true;
            self.subscribe(wire, LISTENER_TYPE, vec![], vec![], false)
                .await;
        }
    }
}

/// SotW resources carry no names beside them: decoding each (which a proxy must do anyway)
/// gives the name; a resource that does not decode gets an empty one and is NACKed.
fn sotw_incoming(r: DiscoveryResponse) -> Incoming {
    let bytes = r.encoded_len();
    Incoming {
        resources: r
            .resources
            .into_iter()
            .map(|a| (resource_name(&r.type_url, &a).unwrap_or_default(), a))
            .collect(),
        type_url: r.type_url,
        version: r.version_info,
        nonce: r.nonce,
        removed: vec![],
        bytes,
    }
}

fn delta_incoming(r: DeltaDiscoveryResponse) -> Incoming {
    let bytes = r.encoded_len();
    Incoming {
        resources: r
            .resources
            .into_iter()
            .filter_map(|res| res.resource.map(|a| (res.name, a)))
            .collect(),
        type_url: r.type_url,
        version: r.system_version_info,
        nonce: r.nonce,
        removed: r.removed_resources,
        bytes,
    }
}

/// Decodes a resource as its type; returns its name.
fn resource_name(type_url: &str, a: &Any) -> Option<String> {
    let v = a.value.as_slice();
    if a.type_url != type_url {
        return None;
    }
    match type_url {
        CLUSTER_TYPE => Cluster::decode(v).ok().map(|c| c.name),
        ENDPOINT_TYPE => ClusterLoadAssignment::decode(v)
            .ok()
            .map(|c| c.cluster_name),
        LISTENER_TYPE => Listener::decode(v).ok().map(|l| l.name),
        ROUTE_TYPE => RouteConfiguration::decode(v).ok().map(|r| r.name),
        _ => None,
    }
}
