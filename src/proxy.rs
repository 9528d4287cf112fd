//! `meshbench proxy`: a sidecar that behaves like Envoy for the xDS subset meshbench's
//! control plane produces, and costs less. An ADS client (`ads`) turns pushed resources into
//! run-time state (`resources` at the edge, `upstream` for clusters and pools); listeners
//! come and go as LDS says; every request reads the current state once (`dataplane`); an
//! Envoy-style admin port (`admin`) shows clusters, stats and the config received.
//!
//! Config changes never drop in-flight requests: a request holds the state it started with
//! (its cluster and pool stay alive until it ends), removed listeners stop accepting but
//! finish their connections, and control-plane loss keeps the last good config.

pub mod admin;
pub mod ads;
pub mod dataplane;
pub mod resources;
pub mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;

use crate::model::Labels;
use crate::shutdown::{self, Shutdown, Trigger};
use resources::{ListenerCfg, RouteTable};
use upstream::Cluster;

pub const DEFAULT_ADMIN_PORT: u16 = 15000;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// ADS server address (host:port).
    pub xds: String,
    pub node_id: String,
    /// node.cluster: the app's service name.
    pub cluster: String,
    pub labels: Labels,
    pub app_ip: String,
    pub admin: SocketAddr,
    /// State of the world (default) or delta ADS.
    pub xds_mode: crate::xds::XdsMode,
}

/// Per listener stat prefix: `http.PREFIX.*`.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub downstream_cx_total: AtomicU64,
    pub downstream_cx_active: AtomicU64,
    pub downstream_rq_total: AtomicU64,
    pub downstream_rq_2xx: AtomicU64,
    pub downstream_rq_3xx: AtomicU64,
    pub downstream_rq_4xx: AtomicU64,
    pub downstream_rq_5xx: AtomicU64,
    pub no_route: AtomicU64,
    pub no_cluster: AtomicU64,
}

/// What the proxy currently runs on.
#[derive(Debug, Default)]
pub struct State {
    pub listeners: HashMap<String, ListenerCfg>,
    pub routes: HashMap<String, Arc<RouteTable>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
}

/// Last accepted version per type, for `/config_dump` and for resuming after a reconnect.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Received {
    pub version_info: String,
    pub nonce: String,
    /// Names of the resources held (subscribed names for EDS/RDS).
    pub names: Vec<String>,
    /// Delta: the version of every resource held (sent back on a reconnect).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    pub last_updated_ms: f64,
}

pub struct Proxy {
    pub cfg: Config,
    state: RwLock<Arc<State>>,
    pub received: Mutex<BTreeMap<&'static str, Received>>,
    /// Delta: every resource held per type, to rebuild the full CDS/LDS set from changes.
    pub delta_held: Mutex<
        std::collections::HashMap<
            &'static str,
            BTreeMap<String, (String, envoy_types::pb::google::protobuf::Any)>,
        >,
    >,
    pub http_stats: Mutex<BTreeMap<String, Arc<HttpStats>>>,
    pub connected: AtomicBool,
    pub initialized: AtomicBool,
    pub xds_stats: ads::XdsStats,
    /// Accept loops of the bound listeners, by name: (address, stop trigger).
    bound: Mutex<HashMap<String, (SocketAddr, Trigger)>>,
    shutdown: Shutdown,
    stop_all: Mutex<Option<Trigger>>,
}

impl Proxy {
    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap().clone()
    }

    pub fn set_state(&self, s: State) {
        *self.state.write().unwrap() = Arc::new(s);
    }

    pub fn http_stats(&self, prefix: &str) -> Arc<HttpStats> {
        self.http_stats
            .lock()
            .unwrap()
            .entry(prefix.to_string())
            .or_default()
            .clone()
    }

    /// Asks the whole proxy to stop (`/quitquitquit`).
    pub fn quit(&self) {
        if let Some(t) = self.stop_all.lock().unwrap().take() {
            t.fire();
        }
    }

    /// Binds listeners that are new or moved, stops those that are gone. Errors name the
    /// listener that could not bind; nothing else changes then.
    pub async fn sync_listeners(
        self: &Arc<Self>,
        wanted: &HashMap<String, ListenerCfg>,
    ) -> Result<(), String> {
        let current: HashMap<String, SocketAddr> = self
            .bound
            .lock()
            .unwrap()
            .iter()
            .map(|(n, (a, _))| (n.clone(), *a))
            .collect();
        let mut new = Vec::new();
        for (name, l) in wanted {
            if current.get(name) == Some(&l.addr) {
                continue;
            }
            // A listener moving to a new address gives up its old socket first.
            if let Some((_, t)) = self.bound.lock().unwrap().remove(name) {
                t.fire();
            }
            match TcpListener::bind(l.addr).await {
                Ok(sock) => new.push((name.clone(), l.addr, sock)),
                // Sockets bound so far for this update close when `new` drops.
                Err(e) => return Err(format!("listener {name}: cannot bind {}: {e}", l.addr)),
            }
        }
        let mut bound = self.bound.lock().unwrap();
        for (name, addr, sock) in new {
            let (trigger, stop) = shutdown::channel();
            tokio::spawn(dataplane::serve_listener(
                self.clone(),
                name.clone(),
                sock,
                stop,
                self.shutdown.clone(),
            ));
            bound.insert(name, (addr, trigger));
        }
        bound.retain(|name, (_, t)| {
            let keep = wanted.contains_key(name);
            if !keep {
                t.fire();
            }
            keep
        });
        Ok(())
    }

    pub fn bound_listeners(&self) -> Vec<(String, SocketAddr)> {
        self.bound
            .lock()
            .unwrap()
            .iter()
            .map(|(n, (a, _))| (n.clone(), *a))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
}

/// The admin address DESIGN.md gives a sidecar: POD_IP:15000 from the node id, else loopback.
pub fn default_admin(node_id: &str) -> SocketAddr {
    let ip = node_id
        .split('~')
        .nth(1)
        .and_then(|ip| ip.parse().ok())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, DEFAULT_ADMIN_PORT)
}

/// Runs the proxy until `shutdown` (or `/quitquitquit`). `admin` is the bound admin socket.
pub async fn run(cfg: Config, admin: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "proxy starting");
    let (stop_all, all_stopped) = shutdown::channel();
    let (inner_trigger, inner) = shutdown::channel();
    let proxy = Arc::new(Proxy {
        cfg,
        state: RwLock::default(),
        received: Mutex::default(),
        delta_held: Mutex::default(),
        http_stats: Mutex::default(),
        connected: AtomicBool::new(false),
        initialized: AtomicBool::new(false),
        xds_stats: ads::XdsStats::default(),
        bound: Mutex::default(),
        shutdown: inner.clone(),
        stop_all: Mutex::new(Some(stop_all)),
    });
    let ads_task = tokio::spawn(ads::run(proxy.clone(), inner.clone()));
    let admin_task = tokio::spawn(admin::serve(proxy.clone(), admin, inner.clone()));
    tokio::select! {
        _ = shutdown.wait() => {}
        _ = all_stopped.wait() => {}
    }
    inner_trigger.fire();
    for (_, (_, t)) in proxy.bound.lock().unwrap().drain() {
        t.fire();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = ads_task.await;
        let _ = admin_task.await;
    })
    .await;
    Ok(())
}
