//! `meshbench agent`: pilot-agent's role, as a sidecar container's entry point. It writes the
//! proxy's bootstrap from the pod's identity (`envoy-revN.json` in its directory), starts the
//! proxy (Envoy or meshbench proxy) as uid 1337 when it runs as root (so capture rules let the
//! proxy's own traffic pass), restarts it with back-off when it dies, serves readiness on
//! 15021 (`/healthz/ready`: the proxy's admin `/ready` says LIVE, which both proxies say once
//! their first config is in), and drains on SIGTERM (`POST /drain_listeners?inboundonly` on
//! the proxy's admin, a drain period, then SIGTERM to the proxy).
//!
//! SIGHUP is a bootstrap change (new certificates from the files given, the xDS address):
//! for Envoy the agent writes `envoy-rev{N+1}.json` and starts Envoy with
//! `--restart-epoch N+1`, which takes the listening sockets over from its parent and tells it
//! to drain (`--drain-time-s`) and exit (`--parent-shutdown-time-s`), as the seed describes
//! pilot-agent doing for TLS changes. For meshbench proxy the same outcome by its own means:
//! the proxy re-reads its bootstrap on SIGHUP and moves its ADS stream in process, keeping its
//! listeners and connections.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;
use crate::xds::bootstrap::EnvoyBootstrap;

/// Istio's readiness port (pilot-agent's `/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// Istio's default `terminationDrainDuration`.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Which proxy the agent runs, and its binary.
#[derive(Clone, Debug)]
pub enum Kind {
    Envoy(PathBuf),
    /// The meshbench binary (`meshbench proxy --bootstrap`).
    Meshbench(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub kind: Kind,
    /// The pod's identity, the proxy's admin address and where xDS is.
    pub bootstrap: EnvoyBootstrap,
    /// The xDS certificate (chain, key, root), if ADS runs over mutual TLS.
    pub tls: Option<Tls>,
    /// Where the bootstraps go.
    pub dir: PathBuf,
    pub drain: Duration,
    /// The user (and group) the proxy runs as; `None` keeps the agent's.
    pub uid: Option<u32>,
    pub concurrency: u16,
}

/// Where the agent's xDS certificate comes from.
#[derive(Clone, Debug)]
pub enum Tls {
    /// Files, read at start and again on SIGHUP (a rotated certificate).
    Files([PathBuf; 3]),
    /// Given once (the harness hands it over in the environment).
    Inline(crate::security::Material),
}

/// What the agent has done, for `/stats` on the readiness port.
#[derive(Debug, Default)]
pub struct Stats {
    pub starts: AtomicU64,
    /// Starts after the proxy died.
    pub restarts: AtomicU64,
    pub hot_restarts: AtomicU64,
    pub epoch: AtomicU64,
    pub draining: AtomicBool,
}

/// Writes `name` in `dir` (the agent's own directory, which the proxy's user cannot write)
/// readable by the proxy's user only (it may hold a private key): created afresh with mode
/// 0600 without following links, given to the user by its descriptor, then renamed in place.
fn write_private(dir: &Path, name: &str, text: &str, uid: Option<u32>) -> Result<PathBuf, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    if let Some(u) = uid {
        std::os::unix::fs::fchown(&f, Some(u), Some(u))
            .map_err(|e| format!("cannot give {} to uid {u}: {e}", tmp.display()))?;
    }
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A directory of ours: created (0755) if missing, refused if it is a link or someone else's.
fn own_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
    {
        return Err(format!("{}: {e}", dir.display()));
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me {
        return Err(format!(
            "{} is not a directory of this user (a link, or owned by uid {}): choose another --dir",
            dir.display(),
            m.uid()
        ));
    }
    Ok(())
}

fn read_material(files: &[PathBuf; 3]) -> Result<crate::security::Material, String> {
    let read =
        |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    Ok(crate::security::Material {
        chain_pem: read(&files[0])?,
        key_pem: read(&files[1])?,
        roots_pem: read(&files[2])?,
    })
}

/// The bootstrap of restart epoch `epoch`, written as `envoy-rev{epoch}.json` (and, for
/// meshbench proxy, as `bootstrap.json`, the file it re-reads on SIGHUP).
fn write_bootstrap(cfg: &Config, epoch: u64) -> Result<PathBuf, String> {
    let material = match &cfg.tls {
        Some(Tls::Files(f)) => Some(read_material(f)?),
        Some(Tls::Inline(m)) => Some(m.clone()),
        None => None,
    };
    let text = cfg
        .bootstrap
        .to_json_with_tls(material.as_ref())
        .to_string();
    let rev = write_private(&cfg.dir, &format!("envoy-rev{epoch}.json"), &text, cfg.uid)?;
    match cfg.kind {
        Kind::Envoy(_) => Ok(rev),
        Kind::Meshbench(_) => write_private(&cfg.dir, "bootstrap.json", &text, cfg.uid),
    }
}

fn spawn(cfg: &Config, epoch: u64, path: &Path) -> Result<tokio::process::Child, String> {
    let mut cmd = match &cfg.kind {
        Kind::Envoy(bin) => {
            let mut c = tokio::process::Command::new(bin);
            let drain = cfg.drain.as_secs().max(1);
            c.arg("-c")
                .arg(path)
                .args(["--restart-epoch", &epoch.to_string()])
                .args(["--drain-time-s", &drain.to_string()])
                .args(["--parent-shutdown-time-s", &(drain + 5).to_string()])
                .args(["--concurrency", &cfg.concurrency.to_string()])
                .args(["--log-level", "warn"]);
            // Parent and child share a base id: chosen at epoch 0, read back after (Envoy,
            // as the proxy's user, writes it in a directory of its own).
            let base = cfg.dir.join("proxy").join("base-id");
            match std::fs::read_to_string(&base).ok().filter(|_| epoch > 0) {
                Some(id) => {
                    c.args(["--base-id", id.trim()]);
                }
                None => {
                    c.arg("--use-dynamic-base-id")
                        .arg("--base-id-path")
                        .arg(&base);
                }
            }
            c
        }
        Kind::Meshbench(bin) => {
            let mut c = tokio::process::Command::new(bin);
            c.arg("proxy")
                .arg("--bootstrap")
                .arg(path)
                .args(["--concurrency", &cfg.concurrency.to_string()]);
            c
        }
    };
    if let Some(u) = cfg.uid {
        cmd.uid(u).gid(u);
    }
    // The proxy dies with the agent, also when the agent is killed (SIGKILL leaves no time to
    // stop it): as a container's processes die with its first one.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the proxy: {e}"))
}

/// Runs until `shutdown` (SIGTERM): the proxy, its restarts and hot restarts, readiness on
/// `readiness`, then the drain.
pub async fn run(cfg: Config, readiness: TcpListener, shutdown: Shutdown) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    own_dir(&cfg.dir)?;
    let proxy_dir = cfg.dir.join("proxy");
    own_dir(&proxy_dir)?;
    if let Some(u) = cfg.uid {
        // Envoy (as the proxy's user) writes its base id there; nothing else is.
        std::os::unix::fs::chown(&proxy_dir, Some(u), Some(u))
            .map_err(|e| format!("cannot give {} to uid {u}: {e}", proxy_dir.display()))?;
    }
    let stats = Arc::new(Stats::default());
    let admin = cfg.bootstrap.admin;
    tokio::spawn(serve_readiness(
        readiness,
        admin,
        stats.clone(),
        shutdown.clone(),
    ));
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;
    let mut epoch = 0u64;
    let mut child = spawn(&cfg, epoch, &write_bootstrap(&cfg, epoch)?)?;
    stats.starts.fetch_add(1, Relaxed);
    let mut started = Instant::now();
    let mut backoff = BACKOFF_FIRST;
    // Envoy parents draining after a hot restart (they exit by themselves); reaped each tick.
    let mut parents: Vec<tokio::process::Child> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        parents.retain_mut(|p| matches!(p.try_wait(), Ok(None)));
        tokio::select! {
            status = child.wait() => {
                tracing::warn!("proxy exited ({status:?}); restarting in {backoff:?}");
                if started.elapsed() > BACKOFF_MAX {
                    backoff = BACKOFF_FIRST;
                }
                // Start again until it starts (a failed start waits longer each time).
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.clone().wait() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    // A dead proxy leaves no parent to take sockets from: epoch 0 with a
                    // new base id (parents still draining keep theirs).
                    let _ = std::fs::remove_file(cfg.dir.join("proxy").join("base-id"));
                    match write_bootstrap(&cfg, 0).and_then(|p| spawn(&cfg, 0, &p)) {
                        Ok(c) => {
                            child = c;
                            epoch = 0;
                            break;
                        }
                        Err(e) => tracing::warn!("{e}; trying again in {backoff:?}"),
                    }
                }
                stats.epoch.store(epoch, Relaxed);
                stats.starts.fetch_add(1, Relaxed);
                stats.restarts.fetch_add(1, Relaxed);
                started = Instant::now();
            }
            _ = hup.recv() => {
                if matches!(cfg.kind, Kind::Envoy(_)) && !parents.is_empty() {
                    // Envoy takes one parent at a time.
                    tracing::warn!("SIGHUP during a hot restart: ignored (the parent is still draining)");
                    continue;
                }
                let next = epoch + 1;
                let path = match write_bootstrap(&cfg, next) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("SIGHUP: {e}; keeping the running proxy");
                        continue;
                    }
                };
                match &cfg.kind {
                    Kind::Envoy(_) => match spawn(&cfg, next, &path) {
                        Ok(c) => {
                            tracing::info!("hot restart: epoch {next}");
                            parents.push(std::mem::replace(&mut child, c));
                            stats.starts.fetch_add(1, Relaxed);
                            started = Instant::now();
                        }
                        Err(e) => {
                            tracing::warn!("hot restart: {e}; keeping the running proxy");
                            continue;
                        }
                    },
                    Kind::Meshbench(_) => {
                        tracing::info!("reload: bootstrap rev {next}");
                        if let Some(pid) = child.id() {
                            // SAFETY: a signal to our own child.
                            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
                        }
                    }
                }
                epoch = next;
                stats.epoch.store(epoch, Relaxed);
                stats.hot_restarts.fetch_add(1, Relaxed);
            }
            _ = tick.tick() => {}
            _ = shutdown.clone().wait() => break,
        }
    }
    // Drain as pilot-agent does: inbound listeners stop taking connections, answers close
    // theirs, then the proxy is told to stop.
    stats.draining.store(true, Relaxed);
    let _ = admin_request(admin, "POST", "/drain_listeners?inboundonly&graceful").await;
    tokio::time::sleep(cfg.drain).await;
    for c in std::iter::once(&mut child).chain(parents.iter_mut()) {
        if let Some(pid) = c.id() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for c in std::iter::once(&mut child).chain(parents.iter_mut()) {
        if tokio::time::timeout(Duration::from_secs(5), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
    }
    Ok(())
}

/// One request to the proxy's admin port: the status and body.
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let go = async {
        let stream = TcpStream::connect(admin).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", admin.to_string())
            .body(Empty::<Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), go)
        .await
        .ok()
        .flatten()
}

/// `/healthz/ready` (200 when the proxy's admin says LIVE and the agent is not draining) and
/// `/stats` (the agent's counts) on the readiness port.
async fn serve_readiness(l: TcpListener, admin: SocketAddr, stats: Arc<Stats>, stop: Shutdown) {
    let mut conns = crate::net::incoming(l, crate::net::Limits::new(256), stop.wait());
    use futures::StreamExt;
    while let Some(Ok(conn)) = conns.next().await {
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let stats = stats.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                        "/healthz/ready" => {
                            let live = !stats.draining.load(Relaxed)
                                && matches!(admin_request(admin, "GET", "/ready").await, Some((200, _)));
                            if live {
                                (200, String::new())
                            } else {
                                (503, "proxy not ready\n".to_string())
                            }
                        }
                        "/stats" => (
                            200,
                            format!(
                                "agent.starts: {}\nagent.restarts: {}\nagent.hot_restarts: {}\nagent.epoch: {}\n",
                                stats.starts.load(Relaxed),
                                stats.restarts.load(Relaxed),
                                stats.hot_restarts.load(Relaxed),
                                stats.epoch.load(Relaxed)
                            ),
                        ),
                        _ => (404, "try /healthz/ready or /stats\n".to_string()),
                    };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(body)))
                                .expect("a valid response"),
                        )
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(conn.stream), svc)
                .await;
        });
    }
}
