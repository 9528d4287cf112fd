//! `meshbench proxy`: a sidecar that behaves like Envoy for the xDS subset meshbench's
//! control plane produces, and costs less. An ADS client (`ads`) turns pushed resources into
//! run-time state (`resources` at the edge, `upstream` for clusters and pools); listeners
//! come and go as LDS says; every request reads the current state once (`dataplane`); an
//! Envoy-style admin port (`admin`) shows clusters, stats and the config received.
//!
//! Config changes never drop in-flight requests: a request holds the state it started with
//! (its cluster and pool stay alive until it ends), removed listeners stop accepting but
//! finish their connections, and control-plane loss keeps the last good config.

//!
//! Modules, inside out: `resources` (protos -> config), `upstream` (clusters, pools, LB,
//! breakers, outlier detection), `path` (the request path as layers), `dataplane` (listeners
//! and their connections), `workers` (the threads connections live on), `state` (what the
//! proxy runs on), `ads` (the xDS client), `admin`.

pub mod admin;
pub mod ads;
pub mod dataplane;
pub mod normalize;
pub mod path;
pub mod proto;
pub mod ratelimit;
pub mod rbac;
pub mod resources;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod workers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::shutdown::{self, Shutdown};
pub use state::{Config, HttpStats, Proxy, Received, State};

pub const DEFAULT_ADMIN_PORT: u16 = 15000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
    #[error("cannot start the worker threads: {0}")]
    Workers(std::io::Error),
}

/// The admin address a sidecar gets (docs/contracts.md): POD_IP:15000 from the node id, else
/// loopback. Never a wildcard address: a node id cannot open the admin port to every network.
pub fn default_admin(node_id: &str) -> SocketAddr {
    let ip = node_id
        .split('~')
        .nth(1)
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified() && !ip.is_multicast())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    SocketAddr::new(ip, DEFAULT_ADMIN_PORT)
}

/// A proxy's config from a bootstrap the agent wrote (`meshbench proxy --bootstrap`).
pub fn config_from_bootstrap(path: &std::path::Path, workers: usize) -> Result<Config, String> {
    let p = read_bootstrap(path)?;
    Ok(Config {
        xds: p.xds.to_string(),
        node_id: p.node_id,
        cluster: p.cluster,
        labels: p.labels,
        app_ip: p.app_ip,
        admin: p.admin,
        xds_mode: p.xds_mode,
        admin_token: std::env::var(admin::ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty()),
        workers,
        xds_tls: p.tls,
        capture: p.capture,
    })
}

fn read_bootstrap(path: &std::path::Path) -> Result<crate::xds::bootstrap::Parsed, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    crate::xds::bootstrap::parse(&v).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs the proxy until `shutdown` (or `/quitquitquit`). `admin` is the bound admin socket.
pub async fn run(cfg: Config, admin: TcpListener, shutdown: Shutdown) -> Result<(), Error> {
    run_with_bootstrap(cfg, admin, shutdown, None).await
}

/// As [`run`]; with the bootstrap file it came from, SIGHUP reloads it in process (the
/// agent's hot restart for meshbench proxy): a new xDS address or certificate takes effect on
/// a new ADS stream while listeners, connections and the config in force stay.
pub async fn run_with_bootstrap(
    cfg: Config,
    admin: TcpListener,
    shutdown: Shutdown,
    bootstrap: Option<std::path::PathBuf>,
) -> Result<(), Error> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "proxy starting");
    let (stop_all, all_stopped) = shutdown::channel();
    let (inner_trigger, inner) = shutdown::channel();
    let proxy = Arc::new(Proxy::new(cfg, inner.clone(), stop_all).map_err(Error::Workers)?);
    if let Some(path) = bootstrap {
        let (proxy, stop) = (proxy.clone(), inner.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => {}
                    _ = stop.clone().wait() => return,
                }
                match read_bootstrap(&path) {
                    Ok(p) => proxy.reload_xds(state::XdsTarget {
                        addr: p.xds.to_string(),
                        tls: p.tls,
                    }),
                    Err(e) => tracing::warn!("SIGHUP: {e}; keeping the current bootstrap"),
                }
            }
        });
    }
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
    proxy.workers.stop();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = ads_task.await;
        let _ = admin_task.await;
    })
    .await;
    Ok(())
}
