//! Listeners and their connections: binding what LDS asks for, accepting, serving HTTP/1.1
//! and h2c on each connection with the slowloris and header-size guards, and counting the
//! listener's `http.PREFIX.*` stats. Each request then goes down the layers of [`path`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::path::{self, Pooled, ProxyBody};
use super::resources::ListenerCfg;
use super::state::{HttpStats, ListenerStats, Proxy};
use crate::net::{self, Limits};
use crate::shutdown::{self, Shutdown};
use futures::StreamExt;

/// Most downstream connections one listener keeps open (Envoy has no default limit; this
/// one stays below the fd limit, see `net::Limits`).
pub const MAX_CONNECTIONS: usize = 16_384;

/// Slowloris guard: a request's headers must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's default limit on request headers (60 KiB); larger is answered 431.
pub const MAX_HEADER_BYTES: usize = 60 * 1024;

/// Binds listeners that are new or moved, stops those that are gone. Errors name the
/// listener that could not bind; nothing else changes then.
pub async fn sync_listeners(
    proxy: &Arc<Proxy>,
    wanted: &HashMap<String, ListenerCfg>,
) -> Result<(), String> {
    let current: HashMap<String, SocketAddr> = proxy
        .bound
        .lock()
        .unwrap()
        .iter()
        .map(|(n, (a, _))| (n.clone(), *a))
        .collect();
    let mut new = Vec::new();
    // A drained listener is not bound again.
    for (name, l) in wanted
        .iter()
        .filter(|(n, l)| l.bind && !proxy.is_drained(n))
    {
        if current.get(name) == Some(&l.addr) {
            continue;
        }
        // A listener moving to a new address gives up its old socket first.
        if let Some((_, t)) = proxy.bound.lock().unwrap().remove(name) {
            t.fire();
        }
        match bind(l.addr).await {
            Ok(sock) => new.push((name.clone(), l.addr, sock)),
            // Sockets bound so far for this update close when `new` drops.
            Err(e) => return Err(format!("listener {name}: cannot bind {}: {e}", l.addr)),
        }
    }
    let mut bound = proxy.bound.lock().unwrap();
    for (name, addr, sock) in new {
        let (trigger, stop) = shutdown::channel();
        tokio::spawn(serve_listener(
            proxy.clone(),
            name.clone(),
            sock,
            stop,
            proxy.shutdown.clone(),
        ));
        bound.insert(name, (addr, trigger));
    }
    bound.retain(|name, (_, t)| {
        let keep = wanted.get(name).is_some_and(|l| l.bind) && !proxy.is_drained(name);
        if !keep {
            t.fire();
        }
        keep
    });
    Ok(())
}

/// How long a bind waits for a socket this proxy is giving up.
const REBIND_WAIT: Duration = Duration::from_secs(2);

/// Binds `addr`. A listener this proxy stopped a moment ago (an update that dropped it,
/// then one that brings it back, as after a control-plane restart) closes its socket when its
/// accept loop next runs: "address in use" is tried again for a while, not NACKed at once
/// (a NACKed version is not sent again, so the listener would stay missing).
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let start = tokio::time::Instant::now();
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < REBIND_WAIT =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => return r,
        }
    }
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
    let lstats = proxy.listener_stats(&name);
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
    // Its own stop (LDS removed it) or the proxy's.
    let stop = async move {
        tokio::select! {
            _ = stop.wait() => {}
            _ = all.wait() => {}
        }
    };
    let mut conns = net::incoming(sock, Limits::new(MAX_CONNECTIONS), stop);
    while let Some(Ok(conn)) = conns.next().await {
        let _ = conn.stream.set_nodelay(true);
        let Ok(conn) = conn.detach() else { continue };
        let (p, mut name, mut stats, builder, mut lstats) = (
            proxy.clone(),
            name.clone(),
            stats.clone(),
            builder.clone(),
            lstats.clone(),
        );
        // On the least busy worker (or here, on one thread), for the connection's whole life.
        proxy.workers.dispatch(move || async move {
            if let Ok(conn) = conn.attach() {
                // A captured connection goes to the listener (and chain) of its original
                // destination; any other stays here, at no cost.
                let mut dst = None;
                if let Some((to, original)) = handoff(&p, &name, &conn.stream) {
                    let prefix = p
                        .state()
                        .listeners
                        .get(&to)
                        .map_or_else(|| to.clone(), |l| l.stat_prefix.clone());
                    stats = p.http_stats(&prefix);
                    lstats = p.listener_stats(&to);
                    name = to;
                    dst = Some(original);
                }
                // Counted where it was handed, once.
                stats.downstream_cx_total.fetch_add(1, Relaxed);
                stats.downstream_cx_active.fetch_add(1, Relaxed);
                let (tcp, no_chain) = p
                    .state()
                    .listeners
                    .get(&name)
                    .map_or((None, true), |l| (l.tcp_proxy.clone(), l.no_chain));
                if no_chain {
                    lstats.no_filter_chain_match.fetch_add(1, Relaxed);
                } else if let Some(cluster) = tcp {
                    if let Some(dst) = dst.or(conn.local) {
                        tcp_proxy(&p, &cluster, dst, conn).await;
                    }
                } else {
                    // Requests carry the original destination only when it is not this
                    // proxy (a passthrough to it would loop).
                    let original = dst.filter(|d| Some(*d) != conn.local);
                    serve(&p, &name, &stats, &builder, &lstats, conn, original).await;
                }
                stats.downstream_cx_active.fetch_sub(1, Relaxed);
            }
        });
    }
}

/// HTTP on one connection of listener `name` (TLS first when its chain has it).
async fn serve(
    p: &Arc<Proxy>,
    name: &str,
    stats: &Arc<HttpStats>,
    builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
    lstats: &ListenerStats,
    conn: net::Conn,
    original: Option<SocketAddr>,
) {
    let name = name.to_string();
    {
        {
            let tls = p
                .state()
                .listeners
                .get(&name)
                .map(|l| (l.tls.clone(), l.plaintext));
            // `Some`: a TLS connection (with the identity its client proved, if any);
            // plaintext requests carry nothing, so they pay no extension insert.
            let svc = |tls: Option<Option<Arc<str>>>| {
                let (p, name, stats) = (p.clone(), name.clone(), stats.clone());
                hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (proxy, name, stats) = (p.clone(), name.clone(), stats.clone());
                    if let Some(id) = &tls {
                        req.extensions_mut().insert(path::PeerIdentity(id.clone()));
                    }
                    if let Some(d) = original {
                        req.extensions_mut().insert(path::OriginalDst(d));
                    }
                    async move { Ok::<_, Infallible>(handle(&proxy, &name, &stats, req).await) }
                })
            };
            match tls {
                Some((Some(t), plaintext)) => {
                    match secure(&p, &lstats, conn, &t, plaintext).await {
                        Some(Accepted::Tls(s)) => {
                            let peer = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| crate::security::uri_san(c))
                                .map(Arc::from);
                            let _ = builder
                                .serve_connection(TokioIo::new(s), svc(Some(peer)))
                                .await;
                        }
                        Some(Accepted::Plain(c)) => {
                            let _ = builder.serve_connection(TokioIo::new(c), svc(None)).await;
                        }
                        None => {}
                    }
                }
                _ => {
                    let _ = builder
                        .serve_connection(TokioIo::new(conn), svc(None))
                        .await;
                }
            }
        }
    }
}

/// Where a connection of a listener with `use_original_dst` or the `original_dst` filter
/// goes: the listener of its original destination (exact address, then the wildcard address
/// on that port; else the receiving one), then that listener's chain for the destination
/// port. `None` for every other listener (no system call).
fn handoff(
    proxy: &Proxy,
    bound: &str,
    stream: &tokio::net::TcpStream,
) -> Option<(String, SocketAddr)> {
    let state = proxy.state();
    let l = state.listeners.get(bound)?;
    if !l.use_original_dst && !l.original_dst {
        return None;
    }
    let local = stream.local_addr().ok()?;
    let dst = net::original_dst(stream).unwrap_or(local);
    let mut name = bound;
    let mut target = l;
    if l.use_original_dst && dst != local {
        let wildcard = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), dst.port());
        let found = state
            .listeners
            .iter()
            .find(|(_, c)| c.addr == dst && !c.name.contains('|'))
            .or_else(|| {
                state
                    .listeners
                    .iter()
                    .find(|(_, c)| c.addr == wildcard && !c.name.contains('|'))
            });
        if let Some((n, c)) = found {
            name = n;
            target = c;
        }
    }
    if let Some(sub) = target.by_port.get(&dst.port()) {
        name = sub;
    }
    Some((name.to_string(), dst))
}

/// Envoy's `tcp_proxy`: bytes both ways between the connection and the cluster's host (for
/// ORIGINAL_DST, where the connection was going), until either side closes.
async fn tcp_proxy(proxy: &Proxy, cluster: &str, dst: SocketAddr, mut conn: net::Conn) {
    let target = {
        let state = proxy.state();
        let Some(c) = state.clusters.get(cluster) else {
            tracing::debug!("tcp_proxy: no cluster {cluster}");
            return;
        };
        if c.cfg.original_dst {
            Some((dst, c.cfg.connect_timeout, c.cfg.bind_source))
        } else {
            c.pick().map(|h| (h.addr, c.cfg.connect_timeout, None))
        }
    };
    let Some((target, timeout, bind)) = target else {
        return;
    };
    // A connection sent back to where it came from would loop forever.
    if conn.local == Some(target) {
        return;
    }
    let connect = async {
        let sock = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(ip) = bind {
            sock.bind(SocketAddr::new(ip, 0))?;
        }
        sock.connect(target).await
    };
    let Ok(Ok(mut up)) = tokio::time::timeout(timeout, connect).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut conn.stream, &mut up).await;
}

enum Accepted {
    Tls(Box<tokio_rustls::server::TlsStream<net::Conn>>),
    Plain(net::Conn),
}

/// The first TLS record's content type (handshake).
const TLS_HANDSHAKE: u8 = 0x16;

/// A listener with a TLS chain: a connection whose first byte starts a TLS handshake gets the
/// handshake (with the mesh's client-certificate check), any other gets the plaintext chain
/// if there is one, else is closed (Istio's STRICT). As Envoy's tls_inspector, it waits for
/// the client's first bytes, within the header deadline.
async fn secure(
    proxy: &Proxy,
    stats: &ListenerStats,
    conn: net::Conn,
    tls: &super::tls::DownstreamTls,
    plaintext: bool,
) -> Option<Accepted> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HEADER_READ_TIMEOUT, conn.stream.peek(&mut first)).await;
    let is_tls = match peeked {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        _ => return None,
    };
    if !is_tls {
        if !plaintext {
            stats.no_filter_chain_match.fetch_add(1, Relaxed);
        }
        return plaintext.then_some(Accepted::Plain(conn));
    }
    let cfg = match proxy.tls.server(tls) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("TLS connection refused: {e}");
            stats.ssl_connection_error.fetch_add(1, Relaxed);
            return None;
        }
    };
    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(conn);
    match tokio::time::timeout(HEADER_READ_TIMEOUT, accept).await {
        Ok(Ok(s)) => {
            stats.ssl_handshake.fetch_add(1, Relaxed);
            Some(Accepted::Tls(Box::new(s)))
        }
        _ => {
            stats.ssl_connection_error.fetch_add(1, Relaxed);
            None
        }
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
    let mut resp = path::serve(proxy.state(), listener, stats, &Pooled, req).await;
    if proxy.is_drained(listener) {
        // Draining: the client opens its next request elsewhere.
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let c = match resp.status().as_u16() {
        200..=299 => &stats.downstream_rq_2xx,
        300..=399 => &stats.downstream_rq_3xx,
        400..=499 => &stats.downstream_rq_4xx,
        _ => &stats.downstream_rq_5xx,
    };
    c.fetch_add(1, Relaxed);
    resp
}
