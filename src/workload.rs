//! `meshbench workload`: a fake service instance. Every response carries its identity in
//! `x-meshbench-workload: SERVICE-VERSION` (how the harness counts which version served a
//! request) and a small JSON body naming service, version, pod and the request path.
//! Speaks HTTP/1.1 and HTTP/2 cleartext on the same port.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

pub const IDENTITY_HEADER: &str = "x-meshbench-workload";

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub service: String,
    pub version: String,
    pub pod: String,
}

impl Config {
    pub fn identity(&self) -> String {
        format!("{}-{}", self.service, self.version)
    }
}

/// Serves until `shutdown`; open connections are dropped with the task.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), addr = ?listener.local_addr().ok(), "workload starting");
    let cfg = Arc::new(cfg);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(cfg.clone(), req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    cfg: Arc<Config>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = serde_json::json!({
        "service": cfg.service,
        "version": cfg.version,
        "pod": cfg.pod,
        "path": req.uri().path(),
    });
    let mut resp = Response::builder()
        .header(IDENTITY_HEADER, cfg.identity())
        .header("content-type", "application/json");
    if let Some(id) = req.headers().get("x-request-id") {
        resp = resp.header("x-request-id", id.clone());
    }
    Ok(resp
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static headers are valid"))
}
