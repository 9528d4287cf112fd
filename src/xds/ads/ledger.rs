//! The ledger of pushes, ACKs and NACKs per connected proxy: what `GET /v1/proxies` shows,
//! what propagation is measured from, and where the counters of `/metrics` are fed. The SotW
//! and delta streams report every response sent and every ACK/NACK received here (the role of
//! go-control-plane's stream callbacks); nothing here knows the protocol's rules.
//!
//! The status types are the REST API's contract: pilot serialises them and the harness's
//! `pilot_client` deserialises the very same types.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::SystemTime;
use tokio::sync::Notify;

use serde::{Deserialize, Serialize};

use super::metrics::{type_index, Metrics};
use crate::clock::unix_ms;
use crate::xds::node::NodeInfo;
use crate::xds::snapshot::Snapshot;
use crate::xds::type_short;

/// Longest NACK message kept (Envoy can embed a dump of the whole response).
const MAX_NACK_MESSAGE: usize = 1024;

/// What the REST API shows for one proxy and type.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Nack {
    pub version: String,
    pub nonce: String,
    pub code: i32,
    pub message: String,
    pub at_ms: f64,
}

/// One connected proxy, as `GET /v1/proxies` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    pub connection: u64,
    pub node: NodeInfo,
    pub connected_at_ms: f64,
    /// The newest config version whose pushes this proxy has all ACKed.
    pub synced_version: Option<u64>,
    /// Milliseconds from the change being accepted to that last ACK.
    pub synced_ack_ms: Option<f64>,
    /// By short type name (`cds`, `eds`, `lds`, `rds`).
    pub types: BTreeMap<String, TypeStatus>,
    /// The latest snapshot versions this proxy was sent, with when the first response of each
    /// went out and when the proxy had ACKed all of it (wall clock ms); for propagation.
    pub history: std::collections::VecDeque<VersionTimes>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionTimes {
    pub version: u64,
    pub pushed_at_ms: f64,
    pub acked_at_ms: Option<f64>,
}

/// Versions kept in each proxy's history.
pub const HISTORY: usize = 256;

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

/// The tracker and the metrics, shared by every stream of one ADS server.
#[derive(Debug, Default)]
pub struct Ledger {
    pub tracker: Tracker,
    pub metrics: Metrics,
    /// Node id -> (the stream that holds it, its "replaced" signal).
    holders: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    /// A stream closed since the last [`Ledger::take_closed`].
    closed: AtomicBool,
}

/// A peer-provided string as it may appear in a log line: control characters escaped (no
/// forged lines), at most `max` characters.
pub fn peer_str(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).flat_map(char::escape_debug).collect();
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

/// Whether the `n`-th NACK of a type on one stream is logged: the first, then every
/// hundredth, so a NACK loop cannot flood the log (the ledger counts every one).
fn log_nack(n: u64) -> bool {
    n <= 1 || n % 100 == 0
}

fn type_status<'a>(p: &'a mut ProxyStatus, type_url: &str) -> &'a mut TypeStatus {
    let short = type_short(type_url);
    if !p.types.contains_key(short) {
        p.types.insert(short.to_string(), TypeStatus::default());
    }
    p.types.get_mut(short).expect("inserted above")
}

impl Ledger {
    /// Registers the proxy of stream `conn`. A stream already holding the same node id is
    /// replaced: it leaves the tracker now and its signal (returned to it when it registered)
    /// fires, so one identity is never served or counted twice.
    pub fn register(&self, conn: u64, info: &NodeInfo) -> Arc<Notify> {
        tracing::info!(conn, node = %peer_str(&info.id, 256), "proxy connected");
        let replaced = Arc::new(Notify::new());
        let old = self
            .holders
            .lock()
            .unwrap()
            .insert(info.id.clone(), (conn, replaced.clone()));
        if let Some((old_conn, signal)) = old {
            tracing::info!(
                conn,
                old_conn,
                "stream replaces an older one with the same node id"
            );
            self.unregister(old_conn);
            signal.notify_one();
        }
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
        replaced
    }

    pub fn unregister(&self, conn: u64) {
        let removed = self.tracker.proxies.lock().unwrap().remove(&conn);
        if let Some(p) = removed {
            self.metrics.connected.fetch_sub(1, Ordering::Relaxed);
            let mut holders = self.holders.lock().unwrap();
            if holders.get(&p.node.id).is_some_and(|(c, _)| *c == conn) {
                holders.remove(&p.node.id);
            }
        }
        self.closed.store(true, Ordering::Relaxed);
    }

    /// Whether a stream closed since the last call.
    pub fn take_closed(&self) -> bool {
        self.closed.swap(false, Ordering::Relaxed)
    }

    pub fn record_push(
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
            let t = type_status(p, type_url);
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

    pub fn record_ack(&self, conn: u64, type_url: &str, version: String) {
        self.tracker.update(conn, |p| {
            let t = type_status(p, type_url);
            t.acked_version = Some(version);
            t.acked_at_ms = Some(unix_ms(SystemTime::now()));
        });
    }

    /// Records a NACK (message truncated: Envoy can embed the whole response in it).
    pub fn record_nack(
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
        self.metrics.nacks[type_index(type_url)].fetch_add(1, Ordering::Relaxed);
        let nack = Nack {
            version: version.to_string(),
            nonce: nonce.to_string(),
            code: err.code,
            message,
            at_ms: unix_ms(SystemTime::now()),
        };
        // One lock: count it and keep it; the log line (rarely) is written after.
        let mut logged = None;
        self.tracker.update(conn, |p| {
            let t = type_status(p, type_url);
            t.nacks += 1;
            if log_nack(t.nacks) {
                logged = Some((t.nacks, peer_str(&nack.message, 512)));
            }
            t.last_nack = Some(nack);
        });
        if let Some((count, message)) = logged {
            tracing::warn!(
                conn,
                r#type = type_short(type_url),
                nonce = %peer_str(nonce, 64),
                nacks = count,
                "NACK: {message}"
            );
        }
    }

    /// The proxy holds `snap` (every type received, nothing pending or NACKed).
    pub fn record_synced(&self, conn: u64, snap: &Snapshot) {
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
