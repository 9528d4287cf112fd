//! `meshbench workload`: fake service instances. Every response carries its identity in
//! `x-meshbench-workload: SERVICE-VERSION` (how the harness counts which version served a
//! request), the identities of every workload it called in `x-meshbench-upstreams`
//! (so a client of productpage can tell which reviews version served the page), and a small
//! JSON body. Speaks HTTP/1.1 and HTTP/2 cleartext on the same port.
//!
//! Outbound calls go through the pod's sidecar, as the seed's apps do: to the sidecar's
//! outbound listener with `Host: SERVICE:PORT`, in parallel, forwarding `end-user` and
//! `x-request-id`. Bookinfo's call graph is the default for bookinfo service names
//! (productpage -> details, reviews; reviews v2/v3 -> ratings; reviews v1 calls nothing).
//! A failed call makes the caller answer 502, so failures deep in the mesh reach the client.
//! Knobs for generic workloads: fixed latency plus uniform jitter, response size, error rate
//! and status, fan-out list.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;

pub const IDENTITY_HEADER: &str = "x-meshbench-workload";
pub const UPSTREAMS_HEADER: &str = "x-meshbench-upstreams";
/// Headers a workload forwards on its outbound calls (Istio's bookinfo forwards these).
const FORWARDED: [&str; 2] = ["end-user", "x-request-id"];

#[derive(Clone, Debug, Default, Serialize)]
pub struct Config {
    pub service: String,
    pub version: String,
    pub pod: String,
    /// The pod's sidecar outbound listener (POD_IP:15001); calls are skipped without it.
    pub sidecar: Option<SocketAddr>,
    /// Services called per request, as `host:port` (the Host header sent to the sidecar).
    pub calls: Vec<String>,
    pub latency: Duration,
    /// Uniform extra latency in [0, jitter).
    pub jitter: Duration,
    pub response_size: usize,
    /// Fraction of requests answered with `error_status` (0..=1).
    pub error_rate: f64,
    pub error_status: u16,
}

impl Config {
    pub fn identity(&self) -> String {
        format!("{}-{}", self.service, self.version)
    }
}

/// Every workload identity a response names: the answering workload, then those it called.
pub fn identities(headers: &hyper::HeaderMap) -> impl Iterator<Item = &str> {
    [IDENTITY_HEADER, UPSTREAMS_HEADER]
        .into_iter()
        .filter_map(|h| headers.get(h).and_then(|v| v.to_str().ok()))
        .flat_map(|v| v.split(','))
        .filter(|s| !s.is_empty())
}

/// Bookinfo's call graph for a service and version (the seed's topology).
pub fn bookinfo_calls(service: &str, version: &str) -> Vec<String> {
    match (service, version) {
        ("productpage", _) => vec!["details:9080".into(), "reviews:9080".into()],
        ("reviews", "v1") => vec![],
        ("reviews", _) => vec!["ratings:9080".into()],
        _ => vec![],
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Keep-alive connections to the sidecar.
#[derive(Default)]
struct SidecarPool {
    idle: Mutex<Vec<Sender>>,
}

impl SidecarPool {
    async fn call(
        &self,
        sidecar: SocketAddr,
        host: &str,
        forward: &[(&'static str, hyper::header::HeaderValue)],
    ) -> Result<(u16, String), String> {
        let mut sender = loop {
            let s = self.idle.lock().unwrap().pop();
            match s {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        break s;
                    }
                }
                Some(_) => continue,
                None => {
                    let stream = TcpStream::connect(sidecar)
                        .await
                        .map_err(|e| format!("{host}: connect to sidecar: {e}"))?;
                    let _ = stream.set_nodelay(true);
                    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("{host}: {e}"))?;
                    tokio::spawn(conn);
                    break s;
                }
            }
        };
        let mut req = Request::builder().uri("/").header("host", host);
        for (k, v) in forward {
            req = req.header(*k, v.clone());
        }
        let resp = sender
            .send_request(req.body(Empty::new()).expect("valid request"))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let status = resp.status().as_u16();
        let ids = identities(resp.headers()).collect::<Vec<_>>().join(",");
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        self.idle.lock().unwrap().push(sender);
        Ok((status, ids))
    }
}

/// Serves until `shutdown`; open connections are dropped with the task.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), addr = ?listener.local_addr().ok(), "workload starting");
    let cfg = Arc::new(cfg);
    let pool = Arc::new(SidecarPool::default());
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let (cfg, pool) = (cfg.clone(), pool.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(cfg.clone(), pool.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    cfg: Arc<Config>,
    pool: Arc<SidecarPool>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (delay, fail) = {
        let mut rng = rand::rng();
        let jitter = if cfg.jitter.is_zero() {
            Duration::ZERO
        } else {
            cfg.jitter.mul_f64(rng.random::<f64>())
        };
        (
            cfg.latency + jitter,
            cfg.error_rate > 0.0 && rng.random::<f64>() < cfg.error_rate,
        )
    };
    let forward: Vec<(&'static str, hyper::header::HeaderValue)> = FORWARDED
        .iter()
        .filter_map(|h| req.headers().get(*h).map(|v| (*h, v.clone())))
        .collect();
    let mut upstreams = Vec::new();
    let mut failures = Vec::new();
    if let Some(sidecar) = cfg.sidecar {
        let calls = cfg
            .calls
            .iter()
            .map(|host| pool.call(sidecar, host, &forward));
        for (host, r) in cfg.calls.iter().zip(futures::future::join_all(calls).await) {
            match r {
                Ok((status, ids)) => {
                    if !ids.is_empty() {
                        upstreams.push(ids);
                    }
                    if status >= 400 {
                        failures.push(format!("{host}: {status}"));
                    }
                }
                Err(e) => failures.push(e),
            }
        }
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = if fail {
        cfg.error_status
    } else if !failures.is_empty() {
        502
    } else {
        200
    };
    let body = serde_json::json!({
        "service": cfg.service,
        "version": cfg.version,
        "pod": cfg.pod,
        "path": req.uri().path(),
        "upstreams": upstreams,
        "failures": failures,
        "padding": "x".repeat(cfg.response_size),
    });
    let mut resp = Response::builder()
        .status(status)
        .header(IDENTITY_HEADER, cfg.identity())
        .header("content-type", "application/json");
    if !upstreams.is_empty() {
        resp = resp.header(UPSTREAMS_HEADER, upstreams.join(","));
    }
    if let Some(id) = req.headers().get("x-request-id") {
        resp = resp.header("x-request-id", id.clone());
    }
    Ok(resp
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static headers are valid"))
}
