//! The proxy's run-time state: its config, what it currently runs on (listeners, routes,
//! clusters, swapped whole on each accepted update), what it received per xDS type, and its
//! counters. Every other part of the proxy reads from here; nothing here acts.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use super::resources::{ListenerCfg, RouteTable};
use super::upstream::Cluster;
use super::workers::Workers;
use crate::model::Labels;
use crate::shutdown::{Shutdown, Trigger};

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
    /// Token `POST /quitquitquit` needs from a non-loopback peer (none: loopback only).
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// Worker threads serving connections (Envoy's --concurrency); 1 serves them on the
    /// runtime the proxy runs on.
    pub workers: usize,
    /// ADS over mutual TLS (pilot's `--xds-tls-addr`): the certificate this proxy presents,
    /// and the root pilot's certificate must chain to (pilot must be `istiod`).
    #[serde(skip)]
    pub xds_tls: Option<crate::security::Material>,
    /// The pod's traffic reaches this proxy through iptables capture: node metadata
    /// `INTERCEPTION_MODE: REDIRECT` asks pilot for Istio's listener layout.
    pub capture: bool,
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
    /// RBAC decisions, each filter counting its own (`rbac.allowed`, `rbac.denied`).
    pub rbac_allowed: AtomicU64,
    pub rbac_denied: AtomicU64,
}

/// Per listener (Envoy's `listener.ADDRESS.*`; a listener's name here is its address):
/// TLS handshakes completed and failed, and connections no filter chain took.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub ssl_handshake: AtomicU64,
    pub ssl_connection_error: AtomicU64,
    pub no_filter_chain_match: AtomicU64,
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
    pub listener_stats: Mutex<BTreeMap<String, Arc<ListenerStats>>>,
    /// Local rate limit stats by stat prefix.
    pub rate_limits: super::ratelimit::Registry,
    pub connected: AtomicBool,
    pub initialized: AtomicBool,
    pub xds_stats: XdsStats,
    /// Accept loops of the bound listeners, by name: (address, stop trigger).
    pub(crate) bound: Mutex<HashMap<String, (SocketAddr, Trigger)>>,
    /// Fires when the proxy stops: every accept loop and stream watches it.
    pub(crate) shutdown: Shutdown,
    stop_all: Mutex<Option<Trigger>>,
    /// Where connections are served (see `workers`).
    pub(crate) workers: Workers,
    /// Secrets from SDS and the TLS configs built from them.
    pub tls: Arc<super::tls::TlsStore>,
    /// Where ADS goes (the config's, until a reload replaces it) and the signal that ends the
    /// current stream so the next one uses the new target.
    xds_target: RwLock<XdsTarget>,
    pub(crate) xds_reload: tokio::sync::Notify,
    /// `/drain_listeners` was called: the listeners it drained take no new connections
    /// (LDS does not bind them again) and their answers close their connections.
    pub draining: AtomicBool,
    pub drained: RwLock<std::collections::HashSet<String>>,
}

/// The ADS server and how to reach it.
#[derive(Clone, Debug)]
pub struct XdsTarget {
    pub addr: String,
    pub tls: Option<crate::security::Material>,
}

impl Proxy {
    /// A proxy with no config yet; `stop_all` is what `/quitquitquit` fires, `shutdown` what
    /// every task of this proxy watches.
    pub fn new(cfg: Config, shutdown: Shutdown, stop_all: Trigger) -> std::io::Result<Proxy> {
        let cfg_xds = (cfg.xds.clone(), cfg.xds_tls.clone());
        Ok(Proxy {
            workers: Workers::start(cfg.workers)?,
            cfg,
            state: RwLock::default(),
            received: Mutex::default(),
            delta_held: Mutex::default(),
            http_stats: Mutex::default(),
            listener_stats: Mutex::default(),
            rate_limits: Default::default(),
            connected: AtomicBool::new(false),
            initialized: AtomicBool::new(false),
            xds_stats: XdsStats::default(),
            bound: Mutex::default(),
            shutdown,
            stop_all: Mutex::new(Some(stop_all)),
            tls: Arc::default(),
            xds_target: RwLock::new(XdsTarget {
                addr: cfg_xds.0,
                tls: cfg_xds.1,
            }),
            xds_reload: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            drained: RwLock::default(),
        })
    }

    /// Stops accepting on every bound listener (inbound ones only: those whose stat prefix
    /// says inbound, as Envoy's traffic direction); LDS binds nothing more while draining.
    pub fn drain_listeners(&self, inbound_only: bool) {
        let state = self.state();
        let inbound = |name: &str| {
            name == crate::xds::listener::VIRTUAL_INBOUND
                || name.starts_with(&format!("{}|", crate::xds::listener::VIRTUAL_INBOUND))
                || state
                    .listeners
                    .get(name)
                    .is_some_and(|l| l.stat_prefix.starts_with("inbound"))
        };
        let names: Vec<String> = state
            .listeners
            .keys()
            .filter(|n| !inbound_only || inbound(n))
            .cloned()
            .collect();
        self.drained.write().unwrap().extend(names.iter().cloned());
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut bound = self.bound.lock().unwrap();
        for n in names {
            if let Some((_, t)) = bound.remove(&n) {
                t.fire();
            }
        }
    }

    /// Whether `listener` was drained (a cheap check until a drain begins).
    pub fn is_drained(&self, listener: &str) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
            && self.drained.read().unwrap().contains(listener)
    }

    /// Where ADS goes now.
    pub fn xds_target(&self) -> XdsTarget {
        self.xds_target.read().unwrap().clone()
    }

    /// In-process reload (the agent's hot restart for meshbench proxy): the next ADS stream
    /// goes to `target`; the current one ends at once. Listeners, connections and the config
    /// in force are kept.
    pub fn reload_xds(&self, target: XdsTarget) {
        *self.xds_target.write().unwrap() = target;
        self.xds_reload.notify_one();
    }

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

    pub fn listener_stats(&self, name: &str) -> Arc<ListenerStats> {
        self.listener_stats
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Asks the whole proxy to stop (`/quitquitquit`).
    pub fn quit(&self) {
        if let Some(t) = self.stop_all.lock().unwrap().take() {
            t.fire();
        }
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

/// Counters of the xDS client (`control_plane.*` in `/stats`).
#[derive(Debug, Default, Serialize)]
pub struct XdsStats {
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub responses: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub last_nack: Mutex<Option<String>>,
}
