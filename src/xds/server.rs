//! The ADS server (state of the world): one task per stream, the xDS protocol rules, and the
//! push/ACK bookkeeping that the REST API and `/metrics` expose.
//!
//! Rules followed (see XDS-NOTES.md for what real Envoy does):
//! - a request whose `response_nonce` is not the latest sent for that type on that stream is
//!   stale and ignored (Envoy ACKs back-to-back pushes separately);
//! - a NACK (`error_detail` set) is recorded and not answered: the server resends only when the
//!   config changes again, so a bad resource cannot cause a push loop;
//! - a first request for a type (empty nonce, also after a reconnect) is answered in full;
//! - CDS and LDS responses carry every resource; EDS and RDS responses carry only the named
//!   resources that changed (incremental EDS), plus the assignment of every cluster that CDS
//!   just changed, so a warming cluster never waits for `initial_fetch_timeout`.
//!
//! Delta xDS (`DeltaAggregatedResources`) streams live in [`super::delta`] and share the
//! bookkeeping below.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use super::node::NodeInfo;
use super::snapshot::{Snapshot, View};
use super::*;

/// Longest NACK message kept (Envoy can embed a dump of the whole response).
const MAX_NACK_MESSAGE: usize = 1024;

pub fn unix_ms(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// What the REST API shows for one proxy and type.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TypeStatus {
    pub pushed_version: Option<String>,
    pub pushed_nonce: Option<String>,
    pub pushed_at_ms: Option<f64>,
    pub pushed_resources: usize,
    pub pushes: u64,
    pub acked_version: Option<String>,
    pub acked_at_ms: Option<f64>,
    pub nacks: u64,
    pub last_nack: Option<Nack>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
    pub at_ms: f64,
}

/// One connected proxy, as `GET /v1/proxies` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub connection: u64,
    pub node: NodeInfo,
    pub connected_at_ms: f64,
    /// The newest config version whose pushes this proxy has all ACKed.
    pub synced_version: Option<u64>,
    /// Milliseconds from the change being accepted to that last ACK.
    pub synced_ack_ms: Option<f64>,
    pub types: BTreeMap<&'static str, TypeStatus>,
    /// The latest snapshot versions this proxy was sent, with when the first response of each
    /// went out and when the proxy had ACKed all of it (wall clock ms); for propagation.
    pub history: std::collections::VecDeque<VersionTimes>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VersionTimes {
    pub version: u64,
    pub pushed_at_ms: f64,
    pub acked_at_ms: Option<f64>,
}

/// Versions kept in each proxy's history.
const HISTORY: usize = 256;

/// Connected proxies' status, shared by the streams and the REST API.
#[derive(Debug, Default)]
pub struct Tracker {
    proxies: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl Tracker {
    pub fn list(&self) -> Vec<ProxyStatus> {
        self.list_where(|_| true)
    }

    /// The proxies `keep` selects (only those are copied).
    pub fn list_where(&self, keep: impl Fn(&ProxyStatus) -> bool) -> Vec<ProxyStatus> {
        self.proxies
            .lock()
            .unwrap()
            .values()
            .filter(|p| keep(p))
            .cloned()
            .collect()
    }

    fn update(&self, conn: u64, f: impl FnOnce(&mut ProxyStatus)) {
        if let Some(p) = self.proxies.lock().unwrap().get_mut(&conn) {
            f(p)
        }
    }
}

/// Prometheus histogram with fixed bucket bounds in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        if let Some(i) = self.bounds.iter().position(|b| seconds <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Counters for `/metrics`, per type in [`PUSH_ORDER`] order.
#[derive(Debug)]
pub struct Metrics {
    pub pushes: [AtomicU64; 4],
    pub bytes_sent: [AtomicU64; 4],
    pub nacks: [AtomicU64; 4],
    pub stale_requests: AtomicU64,
    pub connected: AtomicU64,
    pub snapshots_built: AtomicU64,
    pub push_latency: Histogram,
    pub ack_latency: Histogram,
    pub snapshot_build: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            pushes: Default::default(),
            bytes_sent: Default::default(),
            nacks: Default::default(),
            stale_requests: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            snapshots_built: AtomicU64::new(0),
            push_latency: Histogram::new(LATENCY_BOUNDS),
            ack_latency: Histogram::new(LATENCY_BOUNDS),
            snapshot_build: Histogram::new(LATENCY_BOUNDS),
        }
    }
}

fn type_index(type_url: &str) -> usize {
    PUSH_ORDER.iter().position(|t| *t == type_url).unwrap_or(0)
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        for (name, help, vals) in [
            (
                "meshbench_pilot_xds_pushes_total",
                "xDS responses sent",
                &self.pushes,
            ),
            (
                "meshbench_pilot_xds_bytes_sent_total",
                "Encoded bytes of xDS responses sent",
                &self.bytes_sent,
            ),
            (
                "meshbench_pilot_xds_nacks_total",
                "NACKs received",
                &self.nacks,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (t, v) in PUSH_ORDER.iter().zip(vals) {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    type_short(t),
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_xds_stale_requests_total Requests ignored for a stale nonce\n# TYPE meshbench_pilot_xds_stale_requests_total counter\nmeshbench_pilot_xds_stale_requests_total {}",
            self.stale_requests.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_xds_connected_proxies ADS streams open\n# TYPE meshbench_pilot_xds_connected_proxies gauge\nmeshbench_pilot_xds_connected_proxies {}",
            self.connected.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP meshbench_pilot_snapshots_built_total Snapshots built\n# TYPE meshbench_pilot_snapshots_built_total counter\nmeshbench_pilot_snapshots_built_total {}",
            self.snapshots_built.load(Ordering::Relaxed)
        );
        self.push_latency.render(
            "meshbench_pilot_push_latency_seconds",
            "Config change accepted -> response sent",
            &mut out,
        );
        self.ack_latency.render(
            "meshbench_pilot_ack_latency_seconds",
            "Config change accepted -> proxy ACKed every type",
            &mut out,
        );
        self.snapshot_build.render(
            "meshbench_pilot_snapshot_build_seconds",
            "Time to translate and encode a snapshot",
            &mut out,
        );
        out
    }
}

/// The ADS service. Cloning shares everything.
#[derive(Clone)]
pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    pub tracker: Arc<Tracker>,
    pub metrics: Arc<Metrics>,
    next_conn: Arc<AtomicU64>,
    /// Send every subscribed assignment when any changed (not only the changed ones).
    pub full_push: bool,
}

impl AdsServer {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        tracker: Arc<Tracker>,
        metrics: Arc<Metrics>,
    ) -> AdsServer {
        AdsServer {
            snapshots,
            tracker,
            metrics,
            next_conn: Arc::new(AtomicU64::new(1)),
            full_push: false,
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 << 20)
    }
}

/// Bookkeeping shared by the SotW and the delta streams: the tracker the REST API shows and
/// the metrics `/metrics` exports.
impl AdsServer {
    pub(super) fn register(&self, conn: u64, info: &NodeInfo) {
        tracing::info!(conn, node = %info.id, "proxy connected");
        self.metrics.connected.fetch_add(1, Ordering::Relaxed);
        self.tracker.proxies.lock().unwrap().insert(
            conn,
            ProxyStatus {
                connection: conn,
                node: info.clone(),
                connected_at_ms: unix_ms(SystemTime::now()),
                synced_version: None,
                synced_ack_ms: None,
                history: Default::default(),
                types: BTreeMap::new(),
            },
        );
    }

    pub(super) fn unregister(&self, conn: u64) {
        if self.tracker.proxies.lock().unwrap().remove(&conn).is_some() {
            self.metrics.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn record_push(
        &self,
        conn: u64,
        type_url: &str,
        snap: &Snapshot,
        nonce: &str,
        count: usize,
        bytes: u64,
    ) {
        let i = type_index(type_url);
        self.metrics.pushes[i].fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes_sent[i].fetch_add(bytes, Ordering::Relaxed);
        self.metrics
            .push_latency
            .observe(snap.changed_at.elapsed().as_secs_f64());
        let snap_version = snap.version;
        self.tracker.update(conn, |p| {
            let t = p.types.entry(type_short(type_url)).or_default();
            t.pushed_version = Some(snap_version.to_string());
            t.pushed_nonce = Some(nonce.to_string());
            let now = unix_ms(SystemTime::now());
            t.pushed_at_ms = Some(now);
            t.pushed_resources = count;
            t.pushes += 1;
            if p.history.back().is_none_or(|h| h.version != snap_version) {
                if p.history.len() == HISTORY {
                    p.history.pop_front();
                }
                p.history.push_back(VersionTimes {
                    version: snap_version,
                    pushed_at_ms: now,
                    acked_at_ms: None,
                });
            }
        });
    }

    pub(super) fn record_ack(&self, conn: u64, type_url: &str, version: String) {
        self.tracker.update(conn, |p| {
            let t = p.types.entry(type_short(type_url)).or_default();
            t.acked_version = Some(version);
            t.acked_at_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    /// Records a NACK (message truncated: Envoy can embed the whole response in it).
    pub(super) fn record_nack(
        &self,
        conn: u64,
        type_url: &str,
        version: &str,
        nonce: &str,
        err: &envoy_types::pb::google::rpc::Status,
    ) {
        let mut message = err.message.clone();
        if message.len() > MAX_NACK_MESSAGE {
            let cut = (0..=MAX_NACK_MESSAGE)
                .rev()
                .find(|i| message.is_char_boundary(*i))
                .unwrap_or(0);
            message.truncate(cut);
            message.push_str("...");
        }
        tracing::warn!(conn, r#type = type_short(type_url), %nonce, "NACK: {message}");
        self.metrics.nacks[type_index(type_url)].fetch_add(1, Ordering::Relaxed);
        let nack = Nack {
            version: version.to_string(),
            nonce: nonce.to_string(),
            code: err.code,
            message,
            at_ms: unix_ms(SystemTime::now()),
        };
        self.tracker.update(conn, |p| {
            let t = p.types.entry(type_short(type_url)).or_default();
            t.nacks += 1;
            t.last_nack = Some(nack);
        });
    }

    /// The proxy holds `snap` (every type received, nothing pending or NACKed).
    pub(super) fn record_synced(&self, conn: u64, snap: &Snapshot) {
        let version = snap.version;
        let ack_ms = snap.changed_at.elapsed().as_secs_f64() * 1000.0;
        let mut newly = false;
        self.tracker.update(conn, |p| {
            if p.synced_version != Some(version) {
                p.synced_version = Some(version);
                p.synced_ack_ms = Some(ack_ms);
                newly = true;
                let now = unix_ms(SystemTime::now());
                // Every version pushed up to this one is now held (a later push supersedes).
                for h in p
                    .history
                    .iter_mut()
                    .filter(|h| h.version <= version && h.acked_at_ms.is_none())
                {
                    h.acked_at_ms = Some(now);
                }
            }
        });
        if newly && version > 0 {
            self.metrics.ack_latency.observe(ack_ms / 1000.0);
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = Connection {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            server: self.clone(),
            node: None,
            view: None,
            types: HashMap::new(),
            nonce: 0,
            tx,
        };
        tokio::spawn(drive(conn, inbound, self.snapshots.clone()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = super::delta::DeltaConnection::new(
            self.next_conn.fetch_add(1, Ordering::Relaxed),
            self.clone(),
            tx,
        );
        tokio::spawn(drive(conn, request.into_inner(), self.snapshots.clone()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Responses queued per stream ahead of the encoder. Small: with 64 KiB chunks a slow
/// proxy holds at most this many chunks in pilot's memory, however large its config.
const RESPONSE_QUEUE: usize = 4;

/// Largest response of a named type (EDS, RDS; every type under delta), in encoded bytes of
/// its resources; one resource larger than this goes alone.
pub const CHUNK_BYTES: usize = 64 << 10;

/// Splits resources into runs of at most [`CHUNK_BYTES`] (at least one resource each; an
/// empty list stays one empty response).
pub(super) fn chunks(resources: Vec<Resource>) -> Vec<Vec<Resource>> {
    let mut out: Vec<Vec<Resource>> = vec![vec![]];
    let mut size = 0;
    for r in resources {
        let len = r.any.value.len();
        if size + len > CHUNK_BYTES && !out.last().expect("never empty").is_empty() {
            out.push(vec![]);
            size = 0;
        }
        size += len;
        out.last_mut().expect("never empty").push(r);
    }
    out
}

/// Per stream and type.
#[derive(Default)]
struct TypeState {
    /// Names asked for (EDS, RDS); unused for wildcard types.
    subscribed: BTreeSet<String>,
    /// name -> content hash as last sent. A NACKed version stays here, so it is not resent
    /// until it changes (no push loop on a resource the proxy rejects).
    sent: HashMap<String, u64>,
    /// Latest nonce sent ("" before the first response).
    nonce: String,
    /// Waiting for an ACK or NACK of `nonce`.
    pending: bool,
    /// The latest response was NACKed.
    nacked: bool,
}

struct Connection {
    id: u64,
    server: AdsServer,
    node: Option<NodeInfo>,
    view: Option<View>,
    types: HashMap<&'static str, TypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

/// The stream is gone; stop.
pub(super) struct Closed;

/// What the SotW and the delta streams have in common: requests of their own type, and
/// snapshots to push once the node is known. [`drive`] runs either until the stream ends.
pub(super) trait AdsConnection: Send {
    type Request: prost::Message + Default + Send + 'static;
    fn id(&self) -> u64;
    fn server(&self) -> &AdsServer;
    fn has_node(&self) -> bool;
    fn on_request(
        &mut self,
        req: Self::Request,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    ) -> impl std::future::Future<Output = Result<(), Closed>> + Send;
    fn on_snapshot(
        &mut self,
        snap: Arc<Snapshot>,
    ) -> impl std::future::Future<Output = Result<(), Closed>> + Send;
}

pub(super) async fn drive<C: AdsConnection>(
    mut c: C,
    mut inbound: Streaming<C::Request>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if c.on_request(req, &mut snapshots).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(conn = c.id(), %status, "ADS stream ended");
                    break;
                }
            },
            changed = snapshots.changed(), if c.has_node() => {
                if changed.is_err() {
                    break;
                }
                let snap = snapshots.borrow_and_update().clone();
                if c.on_snapshot(snap).await.is_err() {
                    break;
                }
            }
        }
    }
    c.server().unregister(c.id());
}

/// The first request of a stream names the node: registers it and returns its first view;
/// `None` when the node is missing (the stream is then refused).
pub(super) fn first_node(
    server: &AdsServer,
    conn: u64,
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
) -> Option<(NodeInfo, View)> {
    let info = NodeInfo::from_node(node?);
    server.register(conn, &info);
    let snap = snapshots.borrow_and_update().clone();
    let view = snap.view(&info);
    Some((info, view))
}

/// The error sent when the first request lacks the node.
pub(super) fn no_node() -> Status {
    Status::invalid_argument("the first request on an ADS stream must carry the node")
}

impl AdsConnection for Connection {
    type Request = DiscoveryRequest;
    fn id(&self) -> u64 {
        self.id
    }
    fn server(&self) -> &AdsServer {
        &self.server
    }
    fn has_node(&self) -> bool {
        self.node.is_some()
    }

    async fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    ) -> Result<(), Closed> {
        let Some(type_url) = PUSH_ORDER.iter().copied().find(|t| *t == req.type_url) else {
            tracing::warn!(conn = self.id, type_url = %req.type_url, "request for an unknown type ignored");
            return Ok(());
        };
        if self.node.is_none() {
            let Some((info, view)) =
                first_node(&self.server, self.id, req.node.as_ref(), snapshots)
            else {
                let _ = self.tx.send(Err(no_node())).await;
                return Err(Closed);
            };
            self.view = Some(view);
            self.node = Some(info);
        }
        let ts = self.types.entry(type_url).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != ts.nonce {
            self.server
                .metrics
                .stale_requests
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(err) = &req.error_detail {
            ts.pending = false;
            ts.nacked = true;
            self.server.record_nack(
                self.id,
                type_url,
                &req.version_info,
                &req.response_nonce,
                err,
            );
            return Ok(());
        }
        let first = ts.nonce.is_empty();
        if !first {
            // ACK of the latest response.
            if ts.pending {
                ts.pending = false;
                ts.nacked = false;
                self.server
                    .record_ack(self.id, type_url, req.version_info.clone());
                self.check_synced();
            }
        }
        let ts = self.types.get_mut(type_url).expect("inserted above");
        let wildcard = View::is_wildcard(type_url);
        // Most requests are ACKs naming the same resources: nothing more to do.
        let same = req.resource_names.len() == ts.subscribed.len()
            && req.resource_names.iter().all(|n| ts.subscribed.contains(n));
        if !first && (wildcard || same) {
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let added: Vec<String> = names.difference(&ts.subscribed).cloned().collect();
        if !wildcard {
            ts.sent.retain(|n, _| names.contains(n));
        }
        ts.subscribed = names;
        let view = self.view.as_ref().expect("view is set with the node");
        let resources: Vec<Resource> = if wildcard {
            if !first {
                return Ok(());
            }
            view.all(type_url).into_iter().cloned().collect()
        } else {
            let wanted: Vec<&String> = if first {
                ts.subscribed.iter().collect()
            } else {
                added.iter().collect()
            };
            if wanted.is_empty() {
                return Ok(());
            }
            wanted
                .into_iter()
                .filter_map(|n| view.get(type_url, n))
                .cloned()
                .collect()
        };
        self.send(type_url, resources).await
    }

    /// Pushes what changed for this proxy, in make-before-break order.
    async fn on_snapshot(&mut self, snap: Arc<Snapshot>) -> Result<(), Closed> {
        let node = self
            .node
            .as_ref()
            .expect("snapshots are watched once the node is known");
        // The view is the state every response below is taken from; `send` reads it too.
        let old = self.view.take();
        let view = snap.view_from(node, old.as_ref());
        // A proxy that holds the previous snapshot needs at most what changed since.
        let changes = snap.changes_for(old.as_ref(), &view);
        self.view = Some(view);
        let mut changed_clusters: Vec<String> = Vec::new();
        for type_url in PUSH_ORDER {
            let view = self.view.as_ref().expect("set above");
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.nonce.is_empty() {
                continue;
            }
            let changed_names = changes.as_ref().map(|c| c.get(type_url));
            match changed_names {
                // Listeners kept; clusters unchanged: nothing to compare.
                Some(None) if type_url == LISTENER_TYPE => continue,
                Some(Some(n)) if n.is_empty() && changed_clusters.is_empty() => continue,
                _ => {}
            }
            let resources: Vec<Resource> = if let (Some(Some(names)), false) = (
                changed_names,
                View::is_wildcard(type_url) || self.server.full_push,
            ) {
                // Only the changed names this proxy subscribes to (and clusters CDS changed).
                let mut out: Vec<Resource> = names
                    .iter()
                    .chain(changed_clusters.iter())
                    .filter(|n| ts.subscribed.contains(*n))
                    .filter_map(|n| view.get(type_url, n))
                    .filter(|r| {
                        ts.sent.get(&r.name) != Some(&r.hash) || changed_clusters.contains(&r.name)
                    })
                    .cloned()
                    .collect();
                out.sort_by(|a, b| a.name.cmp(&b.name));
                out.dedup_by(|a, b| a.name == b.name);
                if out.is_empty() {
                    continue;
                }
                out
            } else if View::is_wildcard(type_url) {
                let all = view.all(type_url);
                let same = all.len() == ts.sent.len()
                    && all.iter().all(|r| ts.sent.get(&r.name) == Some(&r.hash));
                if same {
                    continue;
                }
                if type_url == CLUSTER_TYPE {
                    changed_clusters = all
                        .iter()
                        .filter(|r| ts.sent.get(&r.name).is_some_and(|h| *h != r.hash))
                        .map(|r| r.name.clone())
                        .collect();
                }
                all.into_iter().cloned().collect()
            } else {
                let forced: BTreeSet<&String> = if type_url == ENDPOINT_TYPE {
                    changed_clusters.iter().collect()
                } else {
                    BTreeSet::new()
                };
                let subscribed = ts.subscribed.iter().filter_map(|n| view.get(type_url, n));
                let changed: Vec<Resource> = subscribed
                    .clone()
                    .filter(|r| ts.sent.get(&r.name) != Some(&r.hash) || forced.contains(&r.name))
                    .cloned()
                    .collect();
                if changed.is_empty() {
                    continue;
                }
                if self.server.full_push && type_url == ENDPOINT_TYPE {
                    subscribed.cloned().collect()
                } else {
                    changed
                }
            };
            self.send(type_url, resources).await?;
        }
        self.check_synced();
        Ok(())
    }
}

impl Connection {
    /// Sends `resources`; EDS and RDS (named types) in responses of at most [`CHUNK_BYTES`],
    /// which bounds what each stream's encoder buffers (and keeps) to that size instead of
    /// the whole assignment set. Only the last response's ACK counts (the earlier nonces are
    /// stale by then), and it covers the earlier ones: a proxy applies responses in order.
    async fn send(
        &mut self,
        type_url: &'static str,
        resources: Vec<Resource>,
    ) -> Result<(), Closed> {
        if View::is_wildcard(type_url) {
            return self.send_one(type_url, resources).await;
        }
        for chunk in chunks(resources) {
            self.send_one(type_url, chunk).await?;
        }
        Ok(())
    }

    async fn send_one(
        &mut self,
        type_url: &'static str,
        resources: Vec<Resource>,
    ) -> Result<(), Closed> {
        let view = self.view.as_ref().expect("view is set with the node");
        let snap = &view.snapshot;
        self.nonce += 1;
        let nonce = format!("{}-{}", snap.version, self.nonce);
        let ts = self
            .types
            .get_mut(type_url)
            .expect("type state exists before a send");
        if View::is_wildcard(type_url) {
            ts.sent.clear();
        }
        for r in &resources {
            ts.sent.insert(r.name.clone(), r.hash);
        }
        ts.nonce = nonce.clone();
        ts.pending = true;
        let count = resources.len();
        let response = DiscoveryResponse {
            version_info: snap.version.to_string(),
            resources: resources.into_iter().map(|r| r.any).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let bytes = response.encoded_len() as u64;
        self.server
            .record_push(self.id, type_url, snap, &nonce, count, bytes);
        tracing::debug!(conn = self.id, r#type = type_short(type_url), %nonce, count, bytes, "push");
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    /// When clusters and listeners were both received and nothing awaits an ACK or was
    /// NACKed, the proxy holds this snapshot.
    fn check_synced(&self) {
        let received = |t: &str| self.types.get(t).is_some_and(|s| !s.nonce.is_empty());
        if received(CLUSTER_TYPE)
            && received(LISTENER_TYPE)
            && !self.types.values().any(|t| t.pending || t.nacked)
        {
            if let Some(view) = &self.view {
                self.server.record_synced(self.id, &view.snapshot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    fn res(name: &str, pad: usize) -> Resource {
        Resource::new(
            name,
            ClusterLoadAssignment {
                cluster_name: format!("{name}{}", "x".repeat(pad)),
                ..Default::default()
            },
        )
    }

    #[test]
    fn chunks_bound_response_size_and_keep_order() {
        let rs: Vec<Resource> = (0..10).map(|i| res(&format!("r{i}"), 20_000)).collect();
        let c = chunks(rs);
        assert_eq!(c.len(), 4, "3 per 64 KiB chunk");
        for piece in &c {
            let size: usize = piece.iter().map(|r| r.any.value.len()).sum();
            assert!(size <= CHUNK_BYTES);
        }
        let names: Vec<String> = c.into_iter().flatten().map(|r| r.name).collect();
        assert_eq!(names, (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>());
        // A resource larger than a chunk goes alone; an empty list is one empty response.
        assert_eq!(chunks(vec![res("big", 100_000), res("small", 1)]).len(), 2);
        assert_eq!(chunks(vec![]).len(), 1);
    }
}
