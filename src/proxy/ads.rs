//! The proxy's ADS client (state of the world or delta, `--xds-mode`). Subscribes as Envoy does: CDS, then EDS for the
//! EDS clusters, then LDS once clusters have endpoints, then RDS for the route names the
//! listeners use. ACKs what it applied, NACKs what it cannot apply with the reason, and keeps
//! serving the last good config when the control plane goes away, reconnecting with jittered
//! exponential back-off and resuming from the versions it holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener as PbListener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use rand::Rng;
use tokio::sync::mpsc;

use super::dataplane::sync_listeners;
use super::resources::{self, decode, Discovery, Reject, RouteSource};
use super::state::{Proxy, Received, State};
use super::upstream::Cluster;
use crate::shutdown::Shutdown;
use crate::xds::{
    node, type_short, XdsMode, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE,
};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// Runs until `shutdown`, reconnecting whenever the stream ends.
pub async fn run(proxy: Arc<Proxy>, shutdown: Shutdown) {
    let mut failures = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            r = session(&proxy) => {
                proxy.connected.store(false, Relaxed);
                proxy.xds_stats.disconnects.fetch_add(1, Relaxed);
                tracing::warn!("ADS stream to {} ended: {}; keeping the last good config", proxy.xds_target().addr, r.err().unwrap_or_else(|| "closed by server".into()));
            }
            _ = proxy.xds_reload.notified() => {
                // A reload: the new target at once, no back-off.
                proxy.connected.store(false, Relaxed);
                tracing::info!("ADS target reloaded: {}", proxy.xds_target().addr);
                failures = 0;
                continue;
            }
            _ = shutdown.clone().wait() => return,
        }
        // A session that lasted a while resets the back-off.
        failures = if started.elapsed() > BACKOFF_MAX {
            0
        } else {
            failures + 1
        };
        let cap = BACKOFF_BASE
            .saturating_mul(1 << failures.min(6))
            .min(BACKOFF_MAX);
        let wait = Duration::from_micros(
            rand::rng().random_range(cap.as_micros() as u64 / 2..=cap.as_micros() as u64),
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.clone().wait() => return,
        }
    }
}

/// Where requests go, whichever the ADS method.
enum Wire {
    Sotw(mpsc::Sender<DiscoveryRequest>),
    Delta(mpsc::Sender<DeltaDiscoveryRequest>),
}

/// One response, whichever the ADS method. For delta, CDS and LDS are merged with what is
/// held so `resources` is the full set, as SotW sends it.
struct Incoming {
    type_url: String,
    version: String,
    nonce: String,
    resources: Vec<Any>,
    /// Delta: the full set held after this response (name -> (version, resource)).
    held: Option<BTreeMap<String, (String, Any)>>,
}

struct Session<'a> {
    proxy: &'a Arc<Proxy>,
    tx: Wire,
    node_sent: bool,
    /// EDS and RDS names currently subscribed.
    eds_names: BTreeSet<String>,
    rds_names: BTreeSet<String>,
    sds_names: BTreeSet<String>,
    lds_requested: bool,
}

async fn session(proxy: &Arc<Proxy>) -> Result<(), String> {
    let target = proxy.xds_target();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.addr))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let channel = match &target.tls {
        None => endpoint.connect().await,
        Some(m) => {
            // Pilot's certificate must name istiod; ALPN h2 (gRPC).
            let pilot = crate::security::pilot_id();
            let cfg = crate::security::client_config(m, vec![pilot], vec![b"h2".to_vec()])?;
            let addr = target.addr.clone();
            let connector = tower::service_fn(move |_: http::Uri| {
                let (cfg, addr) = (cfg.clone(), addr.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect(&addr).await?;
                    tcp.set_nodelay(true)?;
                    let name =
                        rustls::pki_types::ServerName::try_from(crate::security::PILOT_DNS_NAME)
                            .expect("a DNS name");
                    let tls = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, tcp)
                        .await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
                }
            });
            endpoint.connect_with_connector(connector).await
        }
    }
    .map_err(|e| format!("connect: {e}"))?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
    let received = proxy.received.lock().unwrap().clone();
    let resuming = received.contains_key("lds");
    let held = |t: &str| received.get(type_short(t)).cloned().unwrap_or_default();
    let mode = proxy.cfg.xds_mode;
    let (sotw_tx, sotw_rx) = mpsc::channel(16);
    let (delta_tx, delta_rx) = mpsc::channel(16);
    let mut s = Session {
        proxy,
        tx: match mode {
            XdsMode::Sotw => Wire::Sotw(sotw_tx),
            XdsMode::Delta => Wire::Delta(delta_tx),
        },
        node_sent: false,
        eds_names: BTreeSet::new(),
        rds_names: BTreeSet::new(),
        sds_names: BTreeSet::new(),
        lds_requested: false,
    };
    // Resume: every type we hold (SotW: with its last accepted version and an empty nonce;
    // delta: with the version of every resource held).
    s.subscribe(CLUSTER_TYPE, &held(CLUSTER_TYPE), vec![]).await;
    if resuming {
        s.eds_names = held(ENDPOINT_TYPE).names.into_iter().collect();
        s.rds_names = held(ROUTE_TYPE).names.into_iter().collect();
        if !s.eds_names.is_empty() {
            let names = s.eds_names.iter().cloned().collect();
            s.subscribe(ENDPOINT_TYPE, &held(ENDPOINT_TYPE), names)
                .await;
        }
        s.subscribe(LISTENER_TYPE, &held(LISTENER_TYPE), vec![])
            .await;
        s.lds_requested = true;
        if !s.rds_names.is_empty() {
            let names = s.rds_names.iter().cloned().collect();
            s.subscribe(ROUTE_TYPE, &held(ROUTE_TYPE), names).await;
        }
        s.sds_names = held(SECRET_TYPE).names.into_iter().collect();
        if !s.sds_names.is_empty() {
            let names = s.sds_names.iter().cloned().collect();
            s.subscribe(SECRET_TYPE, &held(SECRET_TYPE), names).await;
        }
    }
    match mode {
        XdsMode::Sotw => {
            let mut stream = client
                .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(sotw_rx))
                .await
                .map_err(|e| format!("open stream: {e}"))?
                .into_inner();
            s.opened(resuming);
            while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
                proxy.xds_stats.responses.fetch_add(1, Relaxed);
                s.on_response(sotw_incoming(resp)).await;
            }
        }
        XdsMode::Delta => {
            let mut stream = client
                .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(delta_rx))
                .await
                .map_err(|e| format!("open delta stream: {e}"))?
                .into_inner();
            s.opened(resuming);
            while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
                proxy.xds_stats.responses.fetch_add(1, Relaxed);
                let inc = s.delta_incoming(resp);
                s.on_response(inc).await;
            }
        }
    }
    Ok(())
}

fn sotw_incoming(r: DiscoveryResponse) -> Incoming {
    Incoming {
        type_url: r.type_url,
        version: r.version_info,
        nonce: r.nonce,
        resources: r.resources,
        held: None,
    }
}

impl Session<'_> {
    fn node(&self) -> Node {
        let cfg = &self.proxy.cfg;
        Node {
            id: cfg.node_id.clone(),
            cluster: cfg.cluster.clone(),
            metadata: Some(if cfg.capture {
                node::capture_metadata(&cfg.labels, &cfg.app_ip)
            } else {
                node::metadata(&cfg.labels, &cfg.app_ip)
            }),
            user_agent_name: "meshbench".into(),
            ..Default::default()
        }
    }

    fn opened(&self, resuming: bool) {
        self.proxy.connected.store(true, Relaxed);
        self.proxy.xds_stats.connects.fetch_add(1, Relaxed);
        tracing::info!(xds = %self.proxy.xds_target().addr, mode = %self.proxy.cfg.xds_mode, resuming, "ADS stream open");
    }

    /// A first request for a type (also after a reconnect), with what is held of it.
    async fn subscribe(&mut self, type_url: &str, held: &Received, names: Vec<String>) {
        match self.tx {
            Wire::Sotw(_) => {
                self.send(type_url, &held.version_info, "", names, None)
                    .await
            }
            Wire::Delta(_) => {
                let initial = held.versions.clone().into_iter().collect();
                self.send_delta(type_url, "", names, vec![], initial, None)
                    .await
            }
        }
    }

    /// A SotW request (also the ACK/NACK of a response), or the ACK/NACK under delta.
    async fn send(
        &mut self,
        type_url: &str,
        version: &str,
        nonce: &str,
        names: Vec<String>,
        error: Option<String>,
    ) {
        let node = (!self.node_sent).then(|| self.node());
        self.node_sent = true;
        let error_detail = error.map(|message| RpcStatus {
            code: 13,
            message,
            details: vec![],
        });
        match &self.tx {
            Wire::Sotw(tx) => {
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: version.to_string(),
                        node,
                        resource_names: names,
                        type_url: type_url.to_string(),
                        response_nonce: nonce.to_string(),
                        error_detail,
                        ..Default::default()
                    })
                    .await;
            }
            Wire::Delta(tx) => {
                let _ = tx
                    .send(DeltaDiscoveryRequest {
                        node,
                        type_url: type_url.to_string(),
                        response_nonce: nonce.to_string(),
                        error_detail,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }

    /// A delta subscription change (or first request).
    async fn send_delta(
        &mut self,
        type_url: &str,
        nonce: &str,
        subscribe: Vec<String>,
        unsubscribe: Vec<String>,
        initial: HashMap<String, String>,
        error: Option<String>,
    ) {
        let node = (!self.node_sent).then(|| self.node());
        self.node_sent = true;
        if let Wire::Delta(tx) = &self.tx {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node,
                    type_url: type_url.to_string(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    initial_resource_versions: initial,
                    response_nonce: nonce.to_string(),
                    error_detail: error.map(|message| RpcStatus {
                        code: 13,
                        message,
                        details: vec![],
                    }),
                    ..Default::default()
                })
                .await;
        }
    }

    /// Merges a delta response with what is held: CDS and LDS become the full set (as SotW
    /// sends them), EDS and RDS the resources that changed.
    fn delta_incoming(&self, r: DeltaDiscoveryResponse) -> Incoming {
        let type_url = r.type_url.as_str();
        let mut held: BTreeMap<String, (String, Any)> = self
            .proxy
            .delta_held
            .lock()
            .unwrap()
            .get(type_short(type_url))
            .cloned()
            .unwrap_or_default();
        for n in &r.removed_resources {
            held.remove(n);
        }
        let mut changed = Vec::new();
        for res in r.resources {
            if let Some(any) = res.resource {
                changed.push(any.clone());
                held.insert(res.name, (res.version, any));
            }
        }
        let full = type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE;
        Incoming {
            resources: if full {
                held.values().map(|(_, a)| a.clone()).collect()
            } else {
                changed
            },
            type_url: r.type_url,
            version: r.system_version_info,
            nonce: r.nonce,
            held: Some(held),
        }
    }

    fn held(&self, type_url: &str) -> Received {
        self.proxy
            .received
            .lock()
            .unwrap()
            .get(type_short(type_url))
            .cloned()
            .unwrap_or_default()
    }

    async fn on_response(&mut self, resp: Incoming) {
        let type_url = resp.type_url.as_str();
        let result = match type_url {
            CLUSTER_TYPE => self.apply_clusters(&resp.resources),
            ENDPOINT_TYPE => self.apply_endpoints(&resp.resources),
            LISTENER_TYPE => self.apply_listeners(&resp.resources).await,
            ROUTE_TYPE => self.apply_routes(&resp.resources),
            SECRET_TYPE => self.apply_secrets(&resp.resources),
            other => Err(format!("unsupported type {other}")),
        };
        let held = self.held(type_url);
        match result {
            Ok(names) => {
                self.proxy.xds_stats.acks.fetch_add(1, Relaxed);
                let mut versions = BTreeMap::new();
                if let Some(held) = resp.held {
                    versions = held
                        .iter()
                        .map(|(n, (v, _))| (n.clone(), v.clone()))
                        .collect();
                    self.proxy
                        .delta_held
                        .lock()
                        .unwrap()
                        .insert(type_short(type_url), held);
                }
                let rec = Received {
                    version_info: resp.version.clone(),
                    nonce: resp.nonce.clone(),
                    names,
                    versions,
                    last_updated_ms: now_ms(),
                };
                self.proxy
                    .received
                    .lock()
                    .unwrap()
                    .insert(type_short(type_url), rec);
                let names = self.names(type_url);
                self.send(type_url, &resp.version, &resp.nonce, names, None)
                    .await;
            }
            Err(reason) => {
                tracing::warn!(r#type = type_short(type_url), version = %resp.version, "NACK: {reason}");
                self.proxy.xds_stats.nacks.fetch_add(1, Relaxed);
                *self.proxy.xds_stats.last_nack.lock().unwrap() = Some(reason.clone());
                let names = self.names(type_url);
                self.send(
                    type_url,
                    &held.version_info,
                    &resp.nonce,
                    names,
                    Some(reason),
                )
                .await;
            }
        }
        self.follow_up(type_url).await;
    }

    /// Subscription changes a response implies (EDS after CDS, LDS once warm, RDS after LDS).
    async fn follow_up(&mut self, type_url: &str) {
        let state = self.proxy.state();
        match type_url {
            CLUSTER_TYPE => {
                let names = state
                    .clusters
                    .values()
                    .filter_map(|c| match &c.cfg.discovery {
                        Discovery::Eds(n) => Some(n.clone()),
                        Discovery::Static(_) => None,
                    })
                    .collect();
                self.resubscribe(ENDPOINT_TYPE, names).await;
                self.resubscribe_secrets(&state).await;
                if self.eds_names.is_empty() {
                    self.request_lds().await;
                }
            }
            ENDPOINT_TYPE => self.request_lds().await,
            LISTENER_TYPE => {
                let names = state
                    .listeners
                    .values()
                    .filter_map(|l| match &l.routes {
                        RouteSource::Rds(n) => Some(n.clone()),
                        RouteSource::Inline(_) => None,
                    })
                    .collect();
                self.resubscribe(ROUTE_TYPE, names).await;
                self.resubscribe_secrets(&state).await;
                self.check_initialized(&state);
            }
            ROUTE_TYPE | SECRET_TYPE => self.check_initialized(&state),
            _ => {}
        }
    }

    /// Names subscribed for EDS or RDS (empty for the wildcard types).
    fn names(&self, type_url: &str) -> Vec<String> {
        match type_url {
            ENDPOINT_TYPE => self.eds_names.iter().cloned().collect(),
            ROUTE_TYPE => self.rds_names.iter().cloned().collect(),
            SECRET_TYPE => self.sds_names.iter().cloned().collect(),
            _ => vec![],
        }
    }

    /// Sends a subscription change for EDS or RDS when the wanted names differ.
    async fn resubscribe(&mut self, type_url: &str, names: BTreeSet<String>) {
        let current = match type_url {
            ENDPOINT_TYPE => &mut self.eds_names,
            SECRET_TYPE => &mut self.sds_names,
            _ => &mut self.rds_names,
        };
        if *current == names {
            return;
        }
        let added: Vec<String> = names.difference(current).cloned().collect();
        let removed: Vec<String> = current.difference(&names).cloned().collect();
        *current = names;
        match self.tx {
            Wire::Sotw(_) => {
                let held = self.held(type_url);
                let list = self.names(type_url);
                self.send(type_url, &held.version_info, &held.nonce, list, None)
                    .await;
            }
            Wire::Delta(_) => {
                self.send_delta(type_url, "", added, removed, HashMap::new(), None)
                    .await
            }
        }
    }

    async fn request_lds(&mut self) {
        if !self.lds_requested {
            self.lds_requested = true;
            self.subscribe(LISTENER_TYPE, &Received::default(), vec![])
                .await;
        }
    }

    /// The secrets the clusters and listeners name (SDS), subscribed as they change (when
    /// nothing names a secret any more, the subscription stays as it was).
    async fn resubscribe_secrets(&mut self, state: &State) {
        let mut names = BTreeSet::new();
        for c in state.clusters.values() {
            if let Some(t) = &c.cfg.tls {
                names.insert(t.secrets.cert.clone());
                names.insert(t.secrets.ca.clone());
            }
        }
        for l in state.listeners.values() {
            if let Some(t) = &l.tls {
                names.insert(t.secrets.cert.clone());
                names.insert(t.secrets.ca.clone());
            }
        }
        if names.is_empty() {
            return;
        }
        if self.sds_names.is_empty() {
            self.sds_names = names.clone();
            let list = names.into_iter().collect();
            self.subscribe(SECRET_TYPE, &Received::default(), list)
                .await;
        } else {
            self.resubscribe(SECRET_TYPE, names).await;
        }
    }

    fn check_initialized(&self, state: &State) {
        if self.lds_requested
            && self.rds_names.iter().all(|n| state.routes.contains_key(n))
            && self.sds_names.iter().all(|n| self.proxy.tls.has(n))
        {
            self.proxy.initialized.store(true, Relaxed);
        }
    }

    fn apply_clusters(&self, resources: &[Any]) -> Result<Vec<String>, Reject> {
        let mut cfgs = Vec::new();
        let mut errors = Vec::new();
        let mut seen = BTreeSet::new();
        for any in resources {
            match decode::<PbCluster>(any).and_then(|c| resources::cluster(&c)) {
                Ok(c) if !seen.insert(c.name.clone()) => {
                    errors.push(format!("duplicate cluster {} found", c.name))
                }
                Ok(c) => cfgs.push(c),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        let old = self.proxy.state();
        let clusters: HashMap<String, Arc<Cluster>> = cfgs
            .into_iter()
            .map(|cfg| {
                let prev = old.clusters.get(&cfg.name);
                let c = match prev {
                    Some(p) if p.cfg == cfg => p.clone(),
                    _ => {
                        let mut c = Cluster::new(cfg, prev.map(|p| p.as_ref()));
                        c.tls_store = Some(self.proxy.tls.clone());
                        Arc::new(c)
                    }
                };
                (c.cfg.name.clone(), c)
            })
            .collect();
        let names = clusters.keys().cloned().collect();
        self.proxy.set_state(State {
            listeners: old.listeners.clone(),
            routes: old.routes.clone(),
            clusters,
        });
        Ok(names)
    }

    fn apply_secrets(&self, resources: &[Any]) -> Result<Vec<String>, Reject> {
        let mut secrets = Vec::new();
        for any in resources {
            let s = decode::<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>(
                any,
            )?;
            secrets.push(super::tls::secret(&s)?);
        }
        self.proxy.tls.update(secrets)?;
        Ok(self.sds_names.iter().cloned().collect())
    }

    fn apply_endpoints(&self, resources: &[Any]) -> Result<Vec<String>, Reject> {
        let mut updates = Vec::new();
        for any in resources {
            let cla = decode::<ClusterLoadAssignment>(any)?;
            updates.push((cla.cluster_name.clone(), resources::endpoints(&cla)?));
        }
        let state = self.proxy.state();
        for (name, eps) in &updates {
            for c in state.clusters.values() {
                if matches!(&c.cfg.discovery, Discovery::Eds(n) if n == name) {
                    c.set_endpoints(eps);
                }
            }
        }
        Ok(self.eds_names.iter().cloned().collect())
    }

    async fn apply_listeners(&self, resources: &[Any]) -> Result<Vec<String>, Reject> {
        let mut listeners = HashMap::new();
        let mut names = Vec::new();
        let mut errors = Vec::new();
        for any in resources {
            match decode::<PbListener>(any)
                .and_then(|l| resources::listeners(&l, &self.proxy.rate_limits))
            {
                Ok(ls) => {
                    // The last is the listener itself; those before it, its port chains.
                    if let Some(l) = ls.last() {
                        names.push(l.name.clone());
                    }
                    for l in ls {
                        if listeners.insert(l.name.clone(), l).is_some() {
                            errors.push("duplicate listener name".to_string());
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        // Listeners must know their config before they accept: publish, then bind.
        let old = self.proxy.state();
        self.proxy.set_state(State {
            listeners: listeners.clone(),
            routes: old.routes.clone(),
            clusters: old.clusters.clone(),
        });
        if let Err(e) = sync_listeners(&self.proxy, &listeners).await {
            self.proxy.set_state(State {
                listeners: old.listeners.clone(),
                routes: old.routes.clone(),
                clusters: old.clusters.clone(),
            });
            return Err(e);
        }
        Ok(names)
    }

    fn apply_routes(&self, resources: &[Any]) -> Result<Vec<String>, Reject> {
        let state = self.proxy.state();
        let mut tables = Vec::new();
        for any in resources {
            let rc = decode::<RouteConfiguration>(any)?;
            let t = resources::route_table(&rc, &self.proxy.rate_limits)?;
            // As Envoy: a route configuration from RDS may name clusters that do not exist
            // (requests routed there get 503) unless it asks for validation.
            let validate = rc.validate_clusters.is_some_and(|v| v.value);
            if let Some(c) = t
                .clusters()
                .find(|c| validate && !state.clusters.contains_key(*c))
            {
                return Err(format!("route config {}: unknown cluster '{c}'", t.name));
            }
            tables.push(t);
        }
        let mut routes = state.routes.clone();
        routes.retain(|n, _| self.rds_names.contains(n));
        for t in tables {
            routes.insert(t.name.clone(), Arc::new(t));
        }
        self.proxy.set_state(State {
            listeners: state.listeners.clone(),
            routes,
            clusters: state.clusters.clone(),
        });
        Ok(self.rds_names.iter().cloned().collect())
    }
}
