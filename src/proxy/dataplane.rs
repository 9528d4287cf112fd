//! The request path. Per request: one read of the current state, virtual host by Host,
//! first matching route, fault filter, weighted cluster choice, then attempts (LB pick,
//! circuit breakers, pooled upstream request, per-try timeout, retry with back-off) inside the
//! route timeout. Local replies use Envoy's status codes and texts so outcomes compare 1:1.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::net::TcpListener;

use super::resources::{PathMatch, Route, RouteSource, Target};
use super::upstream::{retry_backoff, Cluster, IdleConn, Overflow, RequestGuard, SendError};
use super::{HttpStats, Proxy};
use crate::shutdown::Shutdown;

/// Largest request body buffered (bodies are kept for retries).
pub const MAX_REQUEST_BODY: usize = 4 << 20;
/// Slowloris guard: a request's headers must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's default limit on request headers (60 KiB); larger is answered 431.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Response body: a local reply, or an upstream body that returns its connection to the pool
/// and releases its circuit-breaker slot when it ends.
pub enum ProxyBody {
    Local(Full<Bytes>),
    Upstream(Incoming, Option<Finish>),
}

pub struct Finish {
    cluster: Arc<Cluster>,
    guard: RequestGuard,
    conn: Option<IdleConn>,
}

impl ProxyBody {
    /// Once the upstream body is complete, its connection can serve the next request.
    fn finish_if_done(&mut self) {
        if let ProxyBody::Upstream(b, finish) = self {
            if b.is_end_stream() {
                if let Some(f) = finish.take() {
                    if let Some(conn) = f.conn {
                        f.cluster.checkin(&f.guard.host, conn);
                    }
                }
            }
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended (and never polls an empty one).
        self.finish_if_done();
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = match this {
            ProxyBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|e| match e {}),
            ProxyBody::Upstream(b, _) => Pin::new(b).poll_frame(cx),
        };
        if r.is_ready() {
            this.finish_if_done();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Local(b) => b.is_end_stream(),
            ProxyBody::Upstream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Local(b) => b.size_hint(),
            ProxyBody::Upstream(b, _) => b.size_hint(),
        }
    }
}

fn local(status: u16, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(Full::new(Bytes::from(text.to_string()))));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !text.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    r
}

fn overflow() -> Response<ProxyBody> {
    let mut r = local(
        503,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
    );
    r.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

/// Accepts connections on one listener until its own stop or the proxy's.
pub async fn serve_listener(
    proxy: Arc<Proxy>,
    name: String,
    sock: TcpListener,
    stop: Shutdown,
    all: Shutdown,
) {
    let prefix = proxy
        .state()
        .listeners
        .get(&name)
        .map(|l| l.stat_prefix.clone())
        .unwrap_or_else(|| name.clone());
    let stats = proxy.http_stats(&prefix);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192) + 4096);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let builder = Arc::new(builder);
    let stop = stop.wait();
    let all = all.wait();
    tokio::pin!(stop, all);
    loop {
        let (stream, _) = tokio::select! {
            r = sock.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(listener = %name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
            _ = &mut all => return,
        };
        let _ = stream.set_nodelay(true);
        stats.downstream_cx_total.fetch_add(1, Relaxed);
        stats.downstream_cx_active.fetch_add(1, Relaxed);
        let (proxy, name, stats, builder) =
            (proxy.clone(), name.clone(), stats.clone(), builder.clone());
        tokio::spawn(async move {
            let svc = {
                let stats = stats.clone();
                hyper::service::service_fn(move |req| {
                    let (proxy, name, stats) = (proxy.clone(), name.clone(), stats.clone());
                    async move { Ok::<_, Infallible>(handle(&proxy, &name, &stats, req).await) }
                })
            };
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            stats.downstream_cx_active.fetch_sub(1, Relaxed);
        });
    }
}

/// Handles one downstream request.
pub async fn handle(
    proxy: &Proxy,
    listener: &str,
    stats: &HttpStats,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    stats.downstream_rq_total.fetch_add(1, Relaxed);
    let resp = route_request(proxy, listener, stats, req).await;
    let c = match resp.status().as_u16() {
        200..=299 => &stats.downstream_rq_2xx,
        300..=399 => &stats.downstream_rq_3xx,
        400..=499 => &stats.downstream_rq_4xx,
        _ => &stats.downstream_rq_5xx,
    };
    c.fetch_add(1, Relaxed);
    resp
}

fn route_matches(r: &Route, req: &Request<Incoming>) -> bool {
    let path = req.uri().path();
    let ok = match &r.path {
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(p) => path == p,
        PathMatch::Regex(re) => re.is_match(path),
    };
    ok && r.headers.iter().all(|h| {
        let v = req.headers().get(&h.name).and_then(|v| v.to_str().ok());
        h.matcher.matches(v) != h.invert
    })
}

fn chance(per_million: u32) -> bool {
    per_million >= 1_000_000
        || (per_million > 0 && rand::rng().random_range(0..1_000_000) < per_million)
}

/// A random (version 4) UUID, written without intermediate strings: this runs per request.
fn request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut r: u128 = rand::rng().random();
    let mut out = [0u8; 36];
    for (i, b) in out.iter_mut().enumerate().rev() {
        *b = match i {
            8 | 13 | 18 | 23 => b'-',
            14 => b'4',
            19 => b'a',
            _ => {
                let c = HEX[(r & 0xf) as usize];
                r >>= 4;
                c
            }
        };
    }
    HeaderValue::from_bytes(&out).expect("hex and dashes are a valid header value")
}

async fn route_request(
    proxy: &Proxy,
    listener: &str,
    stats: &HttpStats,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let state = proxy.state();
    let Some(l) = state.listeners.get(listener) else {
        return local(503, "listener draining");
    };
    let table = match &l.routes {
        RouteSource::Inline(t) => t.clone(),
        RouteSource::Rds(name) => match state.routes.get(name) {
            Some(t) => t.clone(),
            None => {
                stats.no_route.fetch_add(1, Relaxed);
                return local(404, "");
            }
        },
    };
    let raw_host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    // Domains are matched lowercase; most Host headers already are, so avoid the copy.
    let lowered;
    let host = if raw_host.bytes().any(|b| b.is_ascii_uppercase()) {
        lowered = raw_host.to_ascii_lowercase();
        lowered.as_str()
    } else {
        raw_host
    };
    let Some(route) = table
        .virtual_host(host)
        .and_then(|vh| vh.routes.iter().find(|r| route_matches(r, &req)))
    else {
        stats.no_route.fetch_add(1, Relaxed);
        return local(404, "");
    };
    if !req.headers().contains_key("x-request-id") {
        req.headers_mut().insert("x-request-id", request_id());
    }
    if let Some(f) = route.fault.as_ref().or(l.default_fault.as_ref()) {
        if let Some((d, p)) = f.delay {
            if chance(p) {
                tokio::time::sleep(d).await;
            }
        }
        if let Some((status, p)) = f.abort {
            if chance(p) {
                return local(status, "fault filter abort");
            }
        }
    }
    let cluster_name = match &route.target {
        Target::Cluster(c) => c,
        Target::Weighted(list, total) => {
            let mut x = rand::rng().random_range(0..*total);
            let mut chosen = &list[0].0;
            for (c, w) in list {
                if x < *w {
                    chosen = c;
                    break;
                }
                x -= w;
            }
            chosen
        }
    };
    let Some(cluster) = state.clusters.get(cluster_name).cloned() else {
        stats.no_cluster.fetch_add(1, Relaxed);
        return local(503, "");
    };
    let timeout = route.timeout;
    let retry = route.retry.clone().unwrap_or_default();
    drop(state);
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return local(413, "payload too large")
        }
        Err(_) => return local(400, "downstream request body failed"),
    };
    let attempts = attempts(&cluster, &parts, body, &retry);
    match timeout {
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(r) => r,
            Err(_) => {
                cluster.stats.upstream_rq_timeout.fetch_add(1, Relaxed);
                local(504, "upstream request timeout")
            }
        },
        None => attempts.await,
    }
}

fn upstream_request(
    cluster: &Cluster,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Request<Full<Bytes>> {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut b = Request::builder().method(parts.method.clone());
    if cluster.cfg.http2 {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(String::from)
            })
            .unwrap_or_default();
        b = b
            .uri(format!("http://{authority}{pq}"))
            .version(http::Version::HTTP_2);
    } else {
        // Origin-form already (the usual HTTP/1 case): reuse it, no re-parse.
        b = if parts.uri.authority().is_none() {
            b.uri(parts.uri.clone())
        } else {
            b.uri(pq)
        };
    }
    let mut req = b
        .body(Full::new(body.clone()))
        .expect("parts of a valid request");
    let headers = req.headers_mut();
    for (k, v) in &parts.headers {
        if !HOP_BY_HOP.contains(&k.as_str()) && !(cluster.cfg.http2 && k == header::HOST) {
            headers.append(k.clone(), v.clone());
        }
    }
    if !cluster.cfg.http2 && !headers.contains_key(header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                headers.insert(header::HOST, v);
            }
        }
    }
    req
}

enum Failure {
    Send(SendError),
    PerTryTimeout,
}

async fn attempts(
    cluster: &Arc<Cluster>,
    parts: &http::request::Parts,
    body: Bytes,
    retry: &super::resources::RetryPolicy,
) -> Response<ProxyBody> {
    let mut retries = 0u32;
    let mut in_retry = false;
    loop {
        let Some(host) = cluster.pick() else {
            if in_retry {
                cluster.end_retry();
            }
            return local(503, "no healthy upstream");
        };
        let guard = match cluster.admit(host).await {
            Ok(g) => g,
            Err(Overflow) => {
                if in_retry {
                    cluster.end_retry();
                }
                return overflow();
            }
        };
        let host = guard.host.clone();
        cluster.stats.upstream_rq_total.fetch_add(1, Relaxed);
        host.stats.rq_total.fetch_add(1, Relaxed);
        let send = cluster.send(&host, upstream_request(cluster, parts, &body));
        let result = match retry.per_try_timeout {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r.map_err(Failure::Send),
                Err(_) => Err(Failure::PerTryTimeout),
            },
            None => send.await.map_err(Failure::Send),
        };
        if in_retry {
            cluster.end_retry();
        }
        let (retryable, fallback) = match result {
            Ok((resp, conn)) => {
                let status = resp.status().as_u16();
                cluster.stats.count_status(status);
                let failed = status >= 500;
                if failed {
                    host.stats.rq_error.fetch_add(1, Relaxed);
                } else {
                    host.stats.rq_success.fetch_add(1, Relaxed);
                }
                cluster.record_outcome(&host, failed);
                let retryable = retry.retry_status(status) && retries < retry.num_retries;
                if !(retryable && cluster.begin_retry()) {
                    let (mut rp, body) = resp.into_parts();
                    for h in HOP_BY_HOP {
                        rp.headers.remove(h);
                    }
                    let finish = Finish {
                        cluster: cluster.clone(),
                        guard,
                        conn,
                    };
                    return Response::from_parts(rp, ProxyBody::Upstream(body, Some(finish)));
                }
                (true, None)
            }
            Err(f) => {
                host.stats.rq_error.fetch_add(1, Relaxed);
                cluster.record_outcome(&host, true);
                let (retryable, reply) = match f {
                    Failure::Send(SendError::ConnectFailure) => (
                        retry.on_connect_failure || retry.on_5xx || retry.on_gateway_error,
                        (503, "upstream connect error or disconnect/reset before headers. reset reason: connection failure"),
                    ),
                    Failure::Send(SendError::Reset) => (
                        retry.on_reset || retry.on_5xx,
                        (503, "upstream connect error or disconnect/reset before headers. reset reason: connection termination"),
                    ),
                    Failure::PerTryTimeout => {
                        host.stats.rq_timeout.fetch_add(1, Relaxed);
                        cluster.stats.upstream_rq_per_try_timeout.fetch_add(1, Relaxed);
                        (retry.on_5xx || retry.on_gateway_error, (504, "upstream request timeout"))
                    }
                };
                let retryable = retryable && retries < retry.num_retries && cluster.begin_retry();
                (retryable, Some(reply))
            }
        };
        drop(guard);
        if !retryable {
            let (status, text) = fallback.unwrap_or((503, "upstream reset"));
            if status == 503 {
                cluster.stats.count_status(503);
            }
            return local(status, text);
        }
        in_retry = true;
        retries += 1;
        tokio::time::sleep(retry_backoff(retries - 1)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_uuid_v4_shaped_and_distinct() {
        let a = super::request_id();
        let b = super::request_id();
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(s.as_bytes()[14], b'4');
        assert!(s.split('-').map(str::len).eq([8, 4, 4, 4, 12]));
        assert!(s.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
