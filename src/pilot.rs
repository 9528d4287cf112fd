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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config;
use crate::model::{ConfigError, ConfigSet, Key, Kind, Mesh};
use crate::shutdown::Shutdown;
use crate::xds::ads::ledger::Ledger;
use crate::xds::ads::AdsServer;
use crate::xds::debounce::{Change, Debounce};
use crate::xds::snapshot::Snapshot;
use api::{Applied, Deleted, EndpointBatch, EndpointsApplied, Errors, Health};

pub const DEFAULT_XDS_ADDR: &str = "127.0.0.1:15010";
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:15080";
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
pub const DEFAULT_DEBOUNCE_MAX: Duration = Duration::from_secs(1);
/// How long open streams get to finish after shutdown is asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Largest request body the REST API reads.
const MAX_BODY: usize = 64 << 20;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub config_files: Vec<PathBuf>,
    pub debounce: Duration,
    pub debounce_max: Duration,
    /// Push every subscribed assignment when any endpoint changes (Istio before incremental
    /// EDS), as a comparison point; by default only the changed ones go out.
    pub full_push: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config_files: vec![],
            debounce: DEFAULT_DEBOUNCE,
            debounce_max: DEFAULT_DEBOUNCE_MAX,
            full_push: false,
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
}

impl Pilot {
    /// Loads the config files and starts the debounce/snapshot task. Must run inside a tokio
    /// runtime.
    pub fn start(cfg: &Config) -> Result<Arc<Pilot>, Error> {
        let mut set = ConfigSet::default();
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
        let first = Snapshot::build(
            version,
            mesh.clone(),
            Instant::now(),
            std::time::SystemTime::now(),
        );
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
        });
        let weak = Arc::downgrade(&pilot);
        let debounce = Debounce {
            quiet: cfg.debounce,
            max_delay: cfg.debounce_max,
        };
        tokio::spawn(debounce.run(rx, move |m| {
            let Some(pilot) = weak.upgrade() else { return };
            let (mesh, version) = {
                let st = pilot.state.lock().unwrap();
                (st.mesh.clone(), st.version)
            };
            let t = Instant::now();
            let prev = snap_tx.borrow().clone();
            let snap = Snapshot::build_after(&prev, version, mesh, m.first.at, m.first.at_wall);
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
        for (field, list, must_exist) in
            [("add", &batch.add, false), ("update", &batch.update, true)]
        {
            for (i, w) in list.iter().enumerate() {
                if w.entry.address.parse::<std::net::IpAddr>().is_err() {
                    errors.push(err(
                        i,
                        field,
                        format!("address {:?} is not an IP address", w.entry.address),
                    ));
                    continue;
                }
                let key = (w.namespace.clone(), w.name.clone());
                if must_exist && !exists(&present, &key) {
                    errors.push(err(
                        i,
                        field,
                        format!("no endpoint {}/{} to update", w.namespace, w.name),
                    ));
                    continue;
                }
                present.insert(key, true);
            }
        }
        for (i, r) in batch.remove.iter().enumerate() {
            let key = (r.namespace.clone(), r.name.clone());
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
            .filter(|o| matches!(o.spec, crate::model::Spec::WorkloadEntry(_)))
            .count();
        let old = &st.mesh;
        let mesh = Mesh {
            services: old.services.clone(),
            routes: old.routes.clone(),
            policies: old.policies.clone(),
            warnings: old.warnings.clone(),
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
    shutdown: Shutdown,
) -> Result<(), Error> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), xds = ?xds.local_addr().ok(), api = ?api.local_addr().ok(), "pilot starting");
    let pilot = Pilot::start(&cfg)?;
    serve(pilot, xds, api, shutdown).await
}

/// Serves an already started pilot.
pub async fn serve(
    pilot: Arc<Pilot>,
    xds: TcpListener,
    api: TcpListener,
    shutdown: Shutdown,
) -> Result<(), Error> {
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(pilot.ads().into_service())
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(xds),
            shutdown.clone().wait(),
        );
    let rest = axum::serve(api, router(pilot)).with_graceful_shutdown(shutdown.clone().wait());
    let servers = async { tokio::join!(grpc, rest) };
    // ADS streams live as long as their proxies: after the grace period, stop regardless.
    let deadline = async {
        shutdown.wait().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        (g, r) = servers => {
            g.map_err(|e| Error::Serve(format!("ADS: {e}")))?;
            r.map_err(|e| Error::Serve(format!("REST API: {e}")))?;
        }
        _ = deadline => tracing::info!("shutdown grace period over; closing open streams"),
    }
    Ok(())
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
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body is not UTF-8 text (send YAML or JSON)",
        );
    };
    let source = q.source.unwrap_or_else(|| "request".into());
    match p.apply(&source, text) {
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

async fn endpoints(State(p): State<Arc<Pilot>>, body: Bytes) -> Response {
    let batch: EndpointBatch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid endpoint batch: {e}"),
            )
        }
    };
    match p.update_endpoints(batch) {
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
        "# HELP meshbench_pilot_config_version Latest accepted config version\n# TYPE meshbench_pilot_config_version gauge\nmeshbench_pilot_config_version {}\n",
        p.version()
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
