//! `meshbench pilot`: the control plane. Config store (files at start, then the REST API) ->
//! validated mesh -> debounce -> snapshot -> ADS server. A batch with any error changes
//! nothing; the running mesh keeps its last good config.
//!
//! REST API (JSON; errors are `{"errors": [...]}` with file, document, object, field, message):
//! - `POST /v1/apply` (YAML or JSON, multi-document; `?source=NAME` names it in errors)
//! - `DELETE /v1/config/{kind}/{namespace}/{name}`
//! - `POST /v1/endpoints` `{"add": [Workload], "update": [Workload], "remove": [{namespace, name}]}`
//! - `GET /v1/proxies[?exclude_namespace=NS]`, `GET /v1/config`, `GET /metrics`, `GET /healthz`
//!
//! The bodies are the types in [`api`].

pub mod api;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config;
use crate::model::{ConfigError, ConfigSet, Key, Kind, Mesh, Workload};
use crate::net::{self, Limits};
use crate::shutdown::Shutdown;
use crate::xds::ads::ledger::Ledger;
use crate::xds::ads::AdsServer;
use crate::xds::debounce::{Change, Debounce};
use crate::xds::secret::Issuer;
use crate::xds::snapshot::Snapshot;
use api::{Applied, Deleted, EndpointBatch, EndpointsApplied, Errors, Health};

pub const DEFAULT_XDS_ADDR: &str = "127.0.0.1:15010";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:15080";
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
pub const DEFAULT_DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// How long open streams get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Largest request body the REST API reads (churn's 2,000-endpoint batches are ~0.3 MB).
const MAX_BODY: usize = 8 << 20;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub config_files: Vec<PathBuf>,
    pub debounce: Duration,
    pub debounce_max: Duration,
    /// Push every subscribed assignment when any endpoint changes (Istio before incremental
    /// EDS), as a comparison point; by default only the changed ones go out.
    pub full_push: bool,
    /// A reference to an undefined host or subset refuses the batch instead of warning.
    pub strict_references: bool,
    /// Token every REST write must carry (`Authorization: Bearer`); `None` leaves writes
    /// open (in-process use). The command always sets one.
    #[serde(skip)]
    pub api_token: Option<String>,
    /// Peers besides loopback that may use the REST API and claim any xDS identity (the
    /// harness host on a docker network).
    pub trusted_peers: Vec<IpAddr>,
    /// Lifetime of the workload certificates pilot's CA issues; they are issued again at
    /// half of it (istio-agent's grace ratio).
    pub cert_ttl: Duration,
    /// The CA's private key (PEM); `None`: a new one (a new root at every start).
    #[serde(skip)]
    pub ca_key: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config_files: vec![],
            debounce: DEFAULT_DEBOUNCE,
            debounce_max: DEFAULT_DEBOUNCE_MAX,
            full_push: false,
            strict_references: false,
            api_token: None,
            trusted_peers: vec![],
            cert_ttl: crate::security::DEFAULT_CERT_TTL,
            ca_key: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigError>),
    #[error("server failed: {0}")]
    Serve(String),
}

struct State_ {
    /// Wall-clock ms at which recent versions were accepted (for propagation measurements).
    accepted: std::collections::BTreeMap<u64, f64>,
    config: ConfigSet,
    /// `config` compiled: what the next snapshot is built from.
    mesh: Arc<Mesh>,
    version: u64,
}

/// The control plane's shared state.
pub struct Pilot {
    state: Mutex<State_>,
    changes: mpsc::UnboundedSender<Change>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Pushes, ACKs and NACKs per proxy, and the counters of `/metrics`.
    pub ledger: Arc<Ledger>,
    full_push: bool,
    api_token: Option<String>,
    trusted_peers: Vec<IpAddr>,
    /// The CA and its certificates (served as SDS secrets on the ADS stream).
    pub issuer: Arc<Issuer>,
    /// Rotation epoch: every proxy's certificate is issued again when it moves.
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

/// Shortest certificate lifetime accepted (rotation at half of it rebuilds a snapshot).
pub const MIN_CERT_TTL: Duration = Duration::from_secs(2);

impl Pilot {
    /// Loads the config files and starts the debounce/snapshot task. Must run inside a tokio
    /// runtime.
    pub fn start(cfg: &Config) -> Result<Arc<Pilot>, Error> {
        let mut set = ConfigSet {
            strict_references: cfg.strict_references,
            ..Default::default()
        };
        let mut mesh = Mesh::default();
        let mut warnings = Vec::new();
        let mut version = 0;
        if !cfg.config_files.is_empty() {
            let mut objects = Vec::new();
            let mut errors = Vec::new();
            for f in &cfg.config_files {
                match config::parse_file(f) {
                    Ok(p) => {
                        objects.extend(p.objects);
                        warnings.extend(p.warnings);
                    }
                    Err(e) => errors.extend(e),
                }
            }
            if !errors.is_empty() {
                return Err(Error::Config(errors));
            }
            (set, mesh) = set.with_applied(objects).map_err(Error::Config)?;
            warnings.extend(mesh.warnings.iter().cloned());
            version = 1;
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let mesh = Arc::new(mesh);
        let ledger = Arc::new(Ledger::default());
        let ca = match &cfg.ca_key {
            Some(pem) => crate::security::Ca::from_key_pem(pem)
                .map_err(|e| Error::Serve(format!("{CA_KEY_ENV}: {e}")))?,
            None => crate::security::Ca::generate().map_err(Error::Serve)?,
        };
        let cert_ttl = cfg.cert_ttl.clamp(MIN_CERT_TTL, crate::model::MAX_DURATION);
        let issuer = Arc::new(Issuer::new(ca, cert_ttl));
        let epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut first = Snapshot::build(
            version,
            mesh.clone(),
            Instant::now(),
            std::time::SystemTime::now(),
        );
        first.security = Some((issuer.clone(), 0));
        let (snap_tx, snap_rx) = watch::channel(Arc::new(first));
        let (changes, rx) = mpsc::unbounded_channel();
        let pilot = Arc::new(Pilot {
            state: Mutex::new(State_ {
                accepted: Default::default(),
                config: set,
                mesh: mesh.clone(),
                version,
            }),
            changes,
            snapshots: snap_rx,
            ledger: ledger.clone(),
            full_push: cfg.full_push,
            api_token: cfg.api_token.clone(),
            trusted_peers: cfg.trusted_peers.clone(),
            issuer: issuer.clone(),
            epoch: epoch.clone(),
        });
        // Rotation: at half the lifetime, a new epoch and a snapshot that carries it (the
        // config version stays; only secrets differ).
        {
            let weak = Arc::downgrade(&pilot);
            let epoch = epoch.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(cert_ttl / 2).await;
                    let Some(pilot) = weak.upgrade() else { return };
                    epoch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let version = pilot.state.lock().unwrap().version;
                    let _ = pilot.changes.send(Change::now(version));
                }
            });
        }
        let weak = Arc::downgrade(&pilot);
        // Bounded as the command line bounds them: a longer wait would overflow timers.
        let debounce = Debounce {
            quiet: cfg.debounce.min(crate::xds::debounce::MAX_DEBOUNCE),
            max_delay: cfg.debounce_max.min(crate::xds::debounce::MAX_DEBOUNCE),
        };
        tokio::spawn(debounce.run(rx, move |m| {
            let Some(pilot) = weak.upgrade() else { return };
            let (mesh, version) = {
                let st = pilot.state.lock().unwrap();
                (st.mesh.clone(), st.version)
            };
            let t = Instant::now();
            let prev = snap_tx.borrow().clone();
            let mut snap = Snapshot::build_after(&prev, version, mesh, m.first.at, m.first.at_wall);
            snap.security = Some((
                pilot.issuer.clone(),
                pilot.epoch.load(std::sync::atomic::Ordering::Relaxed),
            ));
            ledger
                .metrics
                .snapshot_build
                .observe(t.elapsed().as_secs_f64());
            ledger
                .metrics
                .snapshots_built
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                version,
                merged = m.merged,
                build_ms = t.elapsed().as_secs_f64() * 1e3,
                "snapshot built"
            );
            let _ = snap_tx.send(Arc::new(snap));
        }));
        Ok(pilot)
    }

    /// When config `version` was accepted (wall clock ms), while it is recent.
    pub fn accepted_at(&self, version: u64) -> Option<f64> {
        self.state.lock().unwrap().accepted.get(&version).copied()
    }

    pub fn version(&self) -> u64 {
        self.state.lock().unwrap().version
    }

    /// Validates and applies a batch of documents from `source`; returns the new version and
    /// the warnings.
    pub fn apply(
        &self,
        source: &str,
        text: &str,
    ) -> Result<(u64, Vec<Key>, Vec<ConfigError>), Vec<ConfigError>> {
        let parsed = config::parse(source, text)?;
        if parsed.objects.is_empty() && parsed.warnings.is_empty() {
            return Err(vec![ConfigError {
                file: source.to_string(),
                document: 0,
                object: String::new(),
                field: String::new(),
                message: "no documents to apply".into(),
            }]);
        }
        let keys: Vec<Key> = parsed.objects.iter().map(|o| o.key()).collect();
        let mut st = self.state.lock().unwrap();
        // Applying what is stored already changes nothing, so it makes no new version.
        let same = |o: &crate::model::Object| {
            st.config.objects.get(&o.key()).is_some_and(|s| {
                serde_json::to_value(&s.spec).ok() == serde_json::to_value(&o.spec).ok()
            })
        };
        if !parsed.objects.is_empty() && parsed.objects.iter().all(same) {
            return Ok((st.version, keys, parsed.warnings));
        }
        let (next, mesh) = st.config.with_applied(parsed.objects)?;
        let mut warnings = parsed.warnings;
        // Only this batch's warnings; stored objects' were reported when they were applied.
        let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        warnings.extend(
            mesh.warnings
                .iter()
                .filter(|w| names.contains(&w.object))
                .cloned(),
        );
        Ok((self.commit(&mut st, next, mesh), keys, warnings))
    }

    /// Deletes one object. `Ok(None)` when it does not exist.
    pub fn delete(&self, key: &Key) -> Result<Option<u64>, Vec<ConfigError>> {
        let mut st = self.state.lock().unwrap();
        match st.config.without(key)? {
            None => Ok(None),
            Some((next, mesh)) => Ok(Some(self.commit(&mut st, next, mesh))),
        }
    }

    /// Adds, updates and removes REST-registered endpoints as one batch. The batch is checked
    /// whole before anything changes; then only the workloads are rebuilt (services, routes and
    /// policies do not depend on endpoints), so a change costs O(endpoints) copies, not a
    /// recompilation of the config.
    pub fn update_endpoints(&self, batch: EndpointBatch) -> Result<u64, Vec<ConfigError>> {
        let mut st = self.state.lock().unwrap();
        let mut errors = Vec::new();
        let err = |i: usize, field: &str, message: String| ConfigError {
            file: "request".into(),
            document: 1,
            object: String::new(),
            field: format!("{field}[{i}]"),
            message,
        };
        // Check against the store as the batch would leave it, in order.
        let mut present: std::collections::HashMap<(String, String), bool> = Default::default();
        let exists = |present: &std::collections::HashMap<(String, String), bool>,
                      key: &(String, String)| {
            present
                .get(key)
                .copied()
                .unwrap_or_else(|| st.config.endpoints.contains_key(key))
        };
        let mut listed = std::collections::HashSet::new();
        let mut changes = batch.add.len() + batch.remove.len();
        for (field, list, must_exist) in
            [("add", &batch.add, false), ("update", &batch.update, true)]
        {
            for (i, w) in list.iter().enumerate() {
                if let Err(m) = check_endpoint(w) {
                    errors.push(err(i, field, m));
                    continue;
                }
                let key = (w.namespace.clone(), w.name.clone());
                if !listed.insert(key.clone()) {
                    errors.push(err(
                        i,
                        field,
                        format!(
                            "endpoint {}/{} is listed twice in this batch",
                            w.namespace, w.name
                        ),
                    ));
                    continue;
                }
                match (must_exist, exists(&present, &key)) {
                    (true, false) => {
                        errors.push(err(
                            i,
                            field,
                            format!("no endpoint {}/{} to update", w.namespace, w.name),
                        ));
                        continue;
                    }
                    (false, true) => {
                        errors.push(err(
                            i,
                            field,
                            format!(
                                "endpoint {}/{} exists already (use update to change it)",
                                w.namespace, w.name
                            ),
                        ));
                        continue;
                    }
                    _ => {}
                }
                if must_exist && st.config.endpoints.get(&key).is_none_or(|old| **old != *w) {
                    changes += 1;
                }
                present.insert(key, true);
            }
        }
        for (i, r) in batch.remove.iter().enumerate() {
            let key = (r.namespace.clone(), r.name.clone());
            if !listed.insert(key.clone()) {
                errors.push(err(
                    i,
                    "remove",
                    format!(
                        "endpoint {}/{} is listed twice in this batch",
                        r.namespace, r.name
                    ),
                ));
                continue;
            }
            if !exists(&present, &key) {
                errors.push(err(
                    i,
                    "remove",
                    format!("no endpoint {}/{} to remove", r.namespace, r.name),
                ));
            }
            present.insert(key, false);
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // Updates that change nothing make no new version.
        if changes == 0 {
            return Ok(st.version);
        }
        let mut next = std::mem::take(&mut st.config);
        for w in batch.add.into_iter().chain(batch.update) {
            next.endpoints
                .insert((w.namespace.clone(), w.name.clone()), Arc::new(w));
        }
        for r in batch.remove {
            next.endpoints.remove(&(r.namespace, r.name));
        }
        // Workloads are the WorkloadEntry objects' (first, as compiled) then the endpoints.
        let entries = next
            .objects
            .values()
            .filter(|o| {
                matches!(&o.spec, crate::model::Spec::WorkloadEntry(w) if !w.address.is_empty())
            })
            .count();
        let old = &st.mesh;
        let mesh = Mesh {
            services: old.services.clone(),
            routes: old.routes.clone(),
            policies: old.policies.clone(),
            warnings: old.warnings.clone(),
            envoy_filters: old.envoy_filters.clone(),
            gateways: old.gateways.clone(),
            gateway_routes: old.gateway_routes.clone(),
            sidecars: old.sidecars.clone(),
            peer_authentications: old.peer_authentications.clone(),
            authorization_policies: old.authorization_policies.clone(),
            workloads: old.workloads[..entries.min(old.workloads.len())]
                .iter()
                .cloned()
                .chain(next.endpoints.values().cloned())
                .collect(),
        };
        Ok(self.commit(&mut st, next, mesh))
    }

    fn commit(&self, st: &mut State_, next: ConfigSet, mesh: Mesh) -> u64 {
        st.config = next;
        st.mesh = Arc::new(mesh);
        st.version += 1;
        let change = Change::now(st.version);
        st.accepted
            .insert(st.version, crate::clock::unix_ms(change.at_wall));
        while st.accepted.len() > 1024 {
            st.accepted.pop_first();
        }
        let _ = self.changes.send(change);
        st.version
    }

    /// The newest snapshot (what proxies are being sent).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    pub fn ads(&self) -> AdsServer {
        let mut ads = AdsServer::new(Arc::new(self.snapshots.clone()), self.ledger.clone());
        ads.full_push = self.full_push;
        ads.trusted_peers = self.trusted_peers.clone();
        ads
    }

    fn config_json(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap();
        json!({
            "version": st.version,
            "objects": st.config.objects.values().collect::<Vec<_>>(),
            "endpoints": st.config.endpoints.values().collect::<Vec<_>>(),
        })
    }

    /// The compiled mesh of the current config.
    pub fn mesh(&self) -> Arc<Mesh> {
        self.state.lock().unwrap().mesh.clone()
    }
}

/// Runs the ADS server and the REST API on the given listeners until `shutdown`.
pub async fn run(
    cfg: Config,
    xds: TcpListener,
    api: TcpListener,
    xds_tls: Option<TcpListener>,
    shutdown: Shutdown,
) -> Result<(), Error> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), xds = ?xds.local_addr().ok(), api = ?api.local_addr().ok(), xds_tls = ?xds_tls.as_ref().and_then(|l| l.local_addr().ok()), "pilot starting");
    let pilot = Pilot::start(&cfg)?;
    if let Some(l) = xds_tls {
        let tls = serve_xds_tls(pilot.clone(), l, shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = tls.await {
                tracing::error!("ADS over mTLS: {e}");
            }
        });
    }
    serve(pilot, xds, api, shutdown).await
}

/// Serves ADS over mutual TLS (istiod's 15012): a client must present a certificate of the
/// mesh's root, and a stream's node must be the identity that certificate proves. Pilot's own
/// certificate names `spiffe://cluster.local/ns/istio-system/sa/istiod` and
/// `istiod.istio-system.svc`, and lives as long as a workload certificate's lifetime allows
/// (at least a year; it is issued at start).
pub async fn serve_xds_tls(
    pilot: Arc<Pilot>,
    listener: TcpListener,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let spiffe = crate::security::pilot_id();
    let issued = pilot
        .issuer
        .ca()
        .issue_with_dns(
            &spiffe,
            &[crate::security::PILOT_DNS_NAME],
            pilot.issuer.ttl.max(Duration::from_secs(365 * 24 * 3600)),
        )
        .map_err(Error::Serve)?;
    let mut cfg = crate::security::server_config(
        &crate::security::Material {
            chain_pem: issued.chain_pem.into_bytes(),
            key_pem: issued.key_pem.into_bytes(),
            roots_pem: pilot.issuer.root_pem().as_bytes().to_vec(),
        },
        true,
    )
    .map_err(Error::Serve)?;
    Arc::get_mut(&mut cfg).expect("just built").alpn_protocols = vec![b"h2".to_vec()];
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(pilot.ads().into_service())
        .serve_with_incoming_shutdown(
            crate::xds::ads::tls::incoming(
                net::incoming(
                    listener,
                    Limits::new(MAX_XDS_CONNECTIONS),
                    shutdown.clone().wait(),
                ),
                cfg,
            ),
            shutdown.wait(),
        )
        .await
        .map_err(|e| Error::Serve(format!("ADS over mTLS: {e}")))
}

/// Checks one endpoint of a batch: names Kubernetes would accept, an IP address, real ports.
fn check_endpoint(w: &Workload) -> Result<(), String> {
    let dns = |what: &str, s: &str, max: usize| -> Result<(), String> {
        let ok = !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.']);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} {s:?} must be 1 to {max} lowercase letters, digits, '-' or '.'"
            ))
        }
    };
    dns("name", &w.name, 253)?;
    dns("namespace", &w.namespace, 63)?;
    if w.entry.address.parse::<IpAddr>().is_err() {
        return Err(format!(
            "address {:?} is not an IP address",
            w.entry.address
        ));
    }
    if let Some((name, _)) = w.entry.ports.iter().find(|(_, p)| **p == 0) {
        return Err(format!("port {name:?} is 0"));
    }
    if !(1..=MAX_ENDPOINT_WEIGHT).contains(&w.entry.weight) {
        return Err(format!(
            "weight {} is outside 1..={MAX_ENDPOINT_WEIGHT}",
            w.entry.weight
        ));
    }
    Ok(())
}

/// Largest endpoint weight (Envoy's load-balancing weights must stay summable in 32 bits).
pub const MAX_ENDPOINT_WEIGHT: u32 = 1_000_000;

/// Most xDS connections pilot keeps open (each carries up to [`MAX_STREAMS_PER_CONNECTION`]).
pub const MAX_XDS_CONNECTIONS: usize = 30_000;
/// Streams one HTTP/2 connection may open at once (the simulated proxies use 50).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;
/// Most REST connections open at once.
pub const MAX_API_CONNECTIONS: usize = 256;

/// Serves an already started pilot.
pub async fn serve(
    pilot: Arc<Pilot>,
    xds: TcpListener,
    api: TcpListener,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .add_service(pilot.ads().into_service())
        .serve_with_incoming_shutdown(
            net::incoming(
                xds,
                Limits::new(MAX_XDS_CONNECTIONS),
                shutdown.clone().wait(),
            ),
            shutdown.clone().wait(),
        );
    let api_port = api.local_addr().map(|a| a.port()).unwrap_or(0);
    let guard = Arc::new(Guard {
        token: pilot.api_token.clone(),
        trusted: pilot.trusted_peers.clone(),
        port: api_port,
    });
    let rest = serve_rest(router(pilot.clone()), guard, api, shutdown.clone());
    // Memory freed by closed streams goes back to the system (glibc keeps it otherwise).
    let trim = async {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            if pilot.ledger.take_closed() {
                // SAFETY: malloc_trim only releases free heap pages.
                unsafe { libc::malloc_trim(0) };
            }
        }
    };
    let servers = async { tokio::join!(grpc, rest) };
    // ADS streams live as long as their proxies: after the grace period, stop regardless.
    let deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        (g, ()) = servers => {
            g.map_err(|e| Error::Serve(format!("ADS: {e}")))?;
        }
        _ = trim => {}
        _ = deadline => tracing::info!("shutdown grace period over; closing open streams"),
    }
    Ok(())
}

/// The REST API on its own accept loop: connection limit, first-byte and header deadlines,
/// and the peer's address handed to the [`guard`].
async fn serve_rest(router: Router, guard: Arc<Guard>, api: TcpListener, shutdown: Shutdown) {
    use futures::StreamExt;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let router = router.layer(axum::middleware::from_fn_with_state(guard, check));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(net::FIRST_BYTE_TIMEOUT);
    let builder = Arc::new(builder);
    let mut conns = net::incoming(api, Limits::new(MAX_API_CONNECTIONS), shutdown.wait());
    while let Some(Ok(conn)) = conns.next().await {
        let svc = hyper_util::service::TowerToHyperService::new(
            router
                .clone()
                .layer(axum::Extension(ConnectInfo(conn.peer))),
        );
        let builder = builder.clone();
        tokio::spawn(async move {
            let _ = builder.serve_connection(TokioIo::new(conn), svc).await;
        });
    }
}

/// Who may use the REST API, and how.
#[derive(Debug)]
struct Guard {
    /// Required as `Authorization: Bearer TOKEN` on every write; `None`: writes are open.
    token: Option<String>,
    /// Peers besides loopback (the harness host on the docker network).
    trusted: Vec<IpAddr>,
    port: u16,
}

/// The REST API's access rules, before any handler:
/// - only loopback and trusted peers (on docker: the harness, not the workloads);
/// - `Host` must name pilot (an IP literal or `localhost`, on pilot's port), and `Origin`, when
///   a browser sends one, must be that same origin: a web page cannot drive pilot (CSRF, DNS
///   rebinding);
/// - writes need the token.
async fn check(
    State(g): State<Arc<Guard>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !(net::is_loopback(&peer) || g.trusted.contains(&peer.ip())) {
        return error(
            StatusCode::FORBIDDEN,
            "pilot's REST API answers only this host (and --trusted-peer addresses)",
        );
    }
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_is_pilot(host, g.port) {
        return error(
            StatusCode::FORBIDDEN,
            &format!(
                "Host {host:?} is not pilot's address (use IP:{} or localhost:{})",
                g.port, g.port
            ),
        );
    }
    if let Some(origin) = req.headers().get(axum::http::header::ORIGIN) {
        if origin.to_str().ok() != Some(format!("http://{host}").as_str()) {
            return error(StatusCode::FORBIDDEN, "cross-origin requests are refused");
        }
    }
    let write = !matches!(
        req.method(),
        &axum::http::Method::GET | &axum::http::Method::HEAD
    );
    if let (true, Some(token)) = (write, &g.token) {
        if !net::bearer_is(req.headers(), token) {
            return error(
                StatusCode::UNAUTHORIZED,
                "writes need pilot's token: Authorization: Bearer TOKEN (pilot printed where the token file is)",
            );
        }
    }
    next.run(req).await
}

/// `IP:PORT` or `localhost:PORT` with pilot's port: names only a DNS rebinding attack cannot
/// point elsewhere.
fn host_is_pilot(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    if p.parse::<u16>().ok() != Some(port) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// Environment variable through which a harness hands pilot its REST token.
pub const TOKEN_ENV: &str = "MESHBENCH_API_TOKEN";
/// The CA's private key (PKCS#8 PEM); absent: a new key at start.
pub const CA_KEY_ENV: &str = "MESHBENCH_CA_KEY";

/// Pilot's REST token: from [`TOKEN_ENV`], else read from `file`, else generated and written
/// to `file` (mode 0600). Returns the token and the file it is in, if any.
pub fn api_token(file: &std::path::Path) -> std::io::Result<(String, Option<PathBuf>)> {
    if let Ok(t) = std::env::var(TOKEN_ENV) {
        if !t.is_empty() {
            return Ok((t, None));
        }
    }
    if let Ok(t) = std::fs::read_to_string(file) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok((t, Some(file.to_path_buf())));
        }
    }
    let t = new_token();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    writeln!(f, "{t}")?;
    Ok((t, Some(file.to_path_buf())))
}

/// 128 random bits, hex.
pub fn new_token() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// Where pilot keeps its token by default: the temp directory, named by the REST port.
pub fn default_token_file(api_port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("meshbench-pilot-{api_port}.token"))
}

pub fn router(pilot: Arc<Pilot>) -> Router {
    Router::new()
        .route(api::APPLY, post(apply))
        .route(
            "/v1/config/{kind}/{namespace}/{name}",
            delete(delete_object),
        )
        .route(
            api::CONFIG,
            get(|State(p): State<Arc<Pilot>>| async move { Json(p.config_json()) }),
        )
        .route(api::ENDPOINTS, post(endpoints))
        .route(api::CERTIFICATES, post(certificate))
        .route(
            api::PROXIES,
            get(
                |State(p): State<Arc<Pilot>>, Query(q): Query<ProxiesQuery>| async move {
                    let ns = q.exclude_namespace.unwrap_or_default();
                    Json(p.ledger.tracker.list_where(|s| s.node.namespace != ns))
                },
            ),
        )
        .route(api::METRICS, get(metrics))
        .route(
            api::HEALTH,
            get(|State(p): State<Arc<Pilot>>| async move {
                Json(Health {
                    status: "ok".into(),
                    version: p.version(),
                })
            }),
        )
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint: see the pilot module docs for the REST API",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(pilot)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(Errors::message(message))).into_response()
}

fn config_errors(status: StatusCode, errors: Vec<ConfigError>) -> Response {
    (status, Json(Errors { errors })).into_response()
}

#[derive(Deserialize)]
struct ProxiesQuery {
    /// Leave out proxies of this namespace (e.g. the simulated ones).
    exclude_namespace: Option<String>,
}

#[derive(Deserialize)]
struct ApplyQuery {
    source: Option<String>,
}

async fn apply(State(p): State<Arc<Pilot>>, Query(q): Query<ApplyQuery>, body: Bytes) -> Response {
    let Ok(text) = String::from_utf8(body.to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body is not UTF-8 text (send YAML or JSON)",
        );
    };
    let source = q.source.unwrap_or_else(|| "request".into());
    // Parsing and compiling take CPU time: off the async workers, so health checks, other
    // requests and xDS pushes go on meanwhile.
    let pilot = p.clone();
    let result = tokio::task::spawn_blocking(move || pilot.apply(&source, &text)).await;
    let Ok(result) = result else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "apply failed");
    };
    match result {
        Ok((version, keys, warnings)) => Json(Applied {
            version,
            accepted_at_ms: p.accepted_at(version),
            applied: keys.iter().map(|k| k.to_string()).collect(),
            warnings,
        })
        .into_response(),
        Err(errors) => config_errors(StatusCode::BAD_REQUEST, errors),
    }
}

async fn delete_object(
    State(p): State<Arc<Pilot>>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Response {
    let Some(kind) = Kind::parse(&kind) else {
        return error(StatusCode::BAD_REQUEST, &format!("unknown kind {kind:?}"));
    };
    let key = Key {
        kind,
        namespace,
        name,
    };
    match p.delete(&key) {
        Ok(Some(version)) => Json(Deleted {
            version,
            deleted: key.to_string(),
        })
        .into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, &format!("{key} does not exist")),
        Err(errors) => config_errors(StatusCode::CONFLICT, errors),
    }
}

/// Issues a certificate for a namespace's service account (DNS labels both).
async fn certificate(State(p): State<Arc<Pilot>>, body: Bytes) -> Response {
    let req: api::CertificateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid certificate request: {e}"),
            )
        }
    };
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !label(&req.namespace) || !label(&req.service_account) {
        return error(
            StatusCode::BAD_REQUEST,
            "namespace and serviceAccount must be DNS labels",
        );
    }
    let spiffe = crate::security::spiffe_id(&req.namespace, &req.service_account);
    let issuer = p.issuer.clone();
    let issued = tokio::task::spawn_blocking(move || {
        let i = issuer.issue(&spiffe)?;
        Ok::<_, String>((spiffe, i))
    })
    .await;
    match issued {
        Ok(Ok((spiffe, i))) => Json(api::Certificate {
            spiffe,
            chain_pem: i.chain_pem,
            key_pem: i.key_pem,
            root_pem: p.issuer.root_pem().to_string(),
            not_after_ms: crate::clock::unix_ms(i.not_after),
        })
        .into_response(),
        _ => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot issue a certificate",
        ),
    }
}

async fn endpoints(State(p): State<Arc<Pilot>>, body: Bytes) -> Response {
    let pilot = p.clone();
    let result = tokio::task::spawn_blocking(move || {
        let batch = api::parse_batch(&body).map_err(|m| {
            vec![ConfigError {
                file: "request".into(),
                document: 1,
                message: m,
                ..Default::default()
            }]
        })?;
        pilot.update_endpoints(batch)
    })
    .await;
    let Ok(result) = result else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "endpoint batch failed");
    };
    match result {
        Ok(version) => Json(EndpointsApplied {
            version,
            accepted_at_ms: p.accepted_at(version),
        })
        .into_response(),
        Err(errors) => config_errors(StatusCode::BAD_REQUEST, errors),
    }
}

async fn metrics(State(p): State<Arc<Pilot>>) -> Response {
    let mut text = p.ledger.metrics.render();
    text.push_str(&format!(
        "# HELP meshbench_pilot_config_version Latest accepted config version\n# TYPE meshbench_pilot_config_version gauge\nmeshbench_pilot_config_version {}\n# HELP meshbench_pilot_certificates_issued_total Workload certificates issued by pilot's CA\n# TYPE meshbench_pilot_certificates_issued_total counter\nmeshbench_pilot_certificates_issued_total {}\n# HELP meshbench_pilot_cert_epoch Certificate rotations so far\n# TYPE meshbench_pilot_cert_epoch gauge\nmeshbench_pilot_cert_epoch {}\n",
        p.version(),
        p.issuer.issued.load(std::sync::atomic::Ordering::Relaxed),
        p.epoch.load(std::sync::atomic::Ordering::Relaxed),
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// Binds a listener, mapping "address in use" to a clear message.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
