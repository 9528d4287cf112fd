//! Upstream side of the data plane: a cluster's hosts, their connection pools, load
//! balancing, circuit breakers, outlier ejection and the counters `/clusters` and `/stats`
//! show. Pools are per cluster and host, as Envoy keeps them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::resources::{ClusterCfg, Discovery, Endpoint, Lb};
use super::workers;

pub type UpstreamBody = Full<Bytes>;

/// Per-host counters, named as Envoy's `/clusters` names them.
#[derive(Debug, Default)]
pub struct HostStats {
    pub cx_active: AtomicU64,
    pub cx_total: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub rq_active: AtomicU64,
    pub rq_total: AtomicU64,
    pub rq_success: AtomicU64,
    pub rq_error: AtomicU64,
    pub rq_timeout: AtomicU64,
}

#[derive(Debug, Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway_failure: u32,
    /// Back in the pool from then (an interval tick at or after the ejection time ran out).
    ejected_until: Option<Instant>,
    /// When it last came back (for the multiplier's decrease).
    back_at: Option<Instant>,
    /// Envoy's ejection-time multiplier: up by one per ejection, down by one per interval
    /// the host spends in the pool.
    backoff: u32,
}

/// How one attempt ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An upstream answer with this status.
    Status(u16),
    /// Connect failure or reset (as Envoy counts them without split local-origin errors: 503).
    LocalFailure,
    /// Per-try timeout (504).
    Timeout,
}

impl Outcome {
    fn code(self) -> u16 {
        match self {
            Outcome::Status(s) => s,
            Outcome::LocalFailure => 503,
            Outcome::Timeout => 504,
        }
    }
}

enum Idle {
    H1(http1::SendRequest<UpstreamBody>, u32),
    H2(http2::SendRequest<UpstreamBody>),
}

#[derive(Debug)]
pub struct Host {
    pub addr: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    /// Its transport socket match metadata, and whether connections to it use the
    /// cluster's TLS context.
    pub socket_match: std::collections::BTreeMap<String, String>,
    pub tls: bool,
    pub stats: Arc<HostStats>,
    outlier: Mutex<OutlierState>,
    /// Idle connections per worker (`workers::current()`): a request only uses connections
    /// of the thread it runs on, as Envoy keeps a pool per worker.
    idle: Mutex<Vec<Vec<IdleConn>>>,
}

/// An idle HTTP/1 connection (sender, requests served) or the shared HTTP/2 connection.
pub struct IdleConn(Idle);

impl std::fmt::Debug for IdleConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdleConn")
    }
}

impl Host {
    fn new(e: &Endpoint, stats: Arc<HostStats>, tls: bool) -> Host {
        Host {
            addr: e.addr,
            weight: e.weight,
            healthy: e.healthy,
            socket_match: e.socket_match.clone(),
            tls,
            stats,
            outlier: Mutex::default(),
            idle: Mutex::default(),
        }
    }

    /// The idle connections of the worker this runs on.
    fn with_idle<R>(&self, f: impl FnOnce(&mut Vec<IdleConn>) -> R) -> R {
        let w = workers::current();
        let mut pools = self.idle.lock().unwrap();
        if pools.len() <= w {
            pools.resize_with(w + 1, Vec::new);
        }
        f(&mut pools[w])
    }

    pub fn ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .unwrap()
            .ejected_until
            .is_some_and(|t| t > now)
    }

    pub fn health_flags(&self) -> String {
        let mut flags = Vec::new();
        if !self.healthy {
            flags.push("/failed_eds_health");
        }
        if self.ejected(Instant::now()) {
            flags.push("/failed_outlier_check");
        }
        if flags.is_empty() {
            "healthy".into()
        } else {
            flags.concat()
        }
    }
}

/// Cluster-level counters (`cluster.NAME.*` in `/stats`).
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub upstream_rq_total: AtomicU64,
    pub upstream_rq_2xx: AtomicU64,
    pub upstream_rq_3xx: AtomicU64,
    pub upstream_rq_4xx: AtomicU64,
    pub upstream_rq_5xx: AtomicU64,
    pub upstream_rq_retry: AtomicU64,
    pub upstream_rq_retry_overflow: AtomicU64,
    pub upstream_rq_timeout: AtomicU64,
    pub upstream_rq_per_try_timeout: AtomicU64,
    pub upstream_rq_pending_overflow: AtomicU64,
    pub upstream_rq_pending_total: AtomicU64,
    pub upstream_cx_total: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    /// TLS handshakes completed / failed (`ssl.handshake`, `ssl.connection_error`).
    pub ssl_handshake: AtomicU64,
    pub ssl_connection_error: AtomicU64,
    pub upstream_cx_active: AtomicU64,
    pub ejections_enforced_total: AtomicU64,
    pub ejections_overflow: AtomicU64,
    pub upstream_rq_active: AtomicU64,
}

impl ClusterStats {
    pub fn count_status(&self, status: u16) {
        let c = match status {
            200..=299 => &self.upstream_rq_2xx,
            300..=399 => &self.upstream_rq_3xx,
            400..=499 => &self.upstream_rq_4xx,
            _ => &self.upstream_rq_5xx,
        };
        c.fetch_add(1, Relaxed);
    }
}

/// A cluster at run time. Replaced whole when its config changes (old pools drain with the
/// requests that still hold them); its hosts are replaced on EDS updates.
#[derive(Debug)]
pub struct Cluster {
    pub cfg: ClusterCfg,
    hosts: RwLock<Arc<Vec<Arc<Host>>>>,
    /// Every host healthy per EDS (the pick's fast path needs no filtering then).
    all_healthy: std::sync::atomic::AtomicBool,
    /// Nanoseconds after `created` until which some host may be ejected.
    eject_horizon_ns: AtomicU64,
    created: Instant,
    pub stats: Arc<ClusterStats>,
    rr: AtomicUsize,
    /// HTTP/1: one permit per connection in use (max_connections).
    connections: Arc<Semaphore>,
    pending: AtomicU32,
    active_requests: AtomicU32,
    active_retries: AtomicU32,
    /// Where TLS connections get their client config (the proxy's secrets).
    pub tls_store: Option<Arc<super::tls::TlsStore>>,
    /// ORIGINAL_DST: a host per destination seen, made on first use (Envoy's
    /// cluster-provided hosts), each with its own connection pool.
    original: Mutex<HashMap<SocketAddr, Arc<Host>>>,
}

/// Hosts an ORIGINAL_DST cluster keeps; past this the set starts again (Envoy drops unused
/// ones every `cleanup_interval`, 5 s by default).
const ORIGINAL_DST_HOSTS: usize = 1024;

/// A circuit breaker refused the request (answered 503 with `x-envoy-overloaded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

/// Held while a request uses a cluster; releases the circuit breaker slots on drop.
#[derive(Debug)]
pub struct RequestGuard {
    cluster: Arc<Cluster>,
    pub host: Arc<Host>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.cluster.active_requests.fetch_sub(1, Relaxed);
        self.cluster.stats.upstream_rq_active.fetch_sub(1, Relaxed);
        self.host.stats.rq_active.fetch_sub(1, Relaxed);
    }
}

impl Cluster {
    pub fn new(cfg: ClusterCfg, previous: Option<&Cluster>) -> Cluster {
        let stats = previous.map(|p| p.stats.clone()).unwrap_or_default();
        let c = Cluster {
            connections: Arc::new(Semaphore::new(cfg.thresholds.max_connections as usize)),
            cfg,
            hosts: RwLock::default(),
            all_healthy: std::sync::atomic::AtomicBool::new(true),
            eject_horizon_ns: AtomicU64::new(0),
            created: Instant::now(),
            stats,
            rr: AtomicUsize::new(0),
            pending: AtomicU32::new(0),
            active_requests: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            tls_store: previous.and_then(|p| p.tls_store.clone()),
            original: Mutex::default(),
        };
        match &c.cfg.discovery {
            Discovery::Static(eps) => c.set_endpoints(eps),
            Discovery::Eds(_) => {
                // Keep serving the previous cluster's endpoints until EDS says otherwise.
                if let Some(p) = previous {
                    let eps: Vec<Endpoint> = p
                        .hosts()
                        .iter()
                        .map(|h| Endpoint {
                            addr: h.addr,
                            weight: h.weight,
                            healthy: h.healthy,
                            socket_match: h.socket_match.clone(),
                        })
                        .collect();
                    c.set_endpoints_with(&eps, &p.hosts());
                }
            }
        }
        c
    }

    pub fn hosts(&self) -> Arc<Vec<Arc<Host>>> {
        self.hosts.read().unwrap().clone()
    }

    /// Replaces the host set; unchanged addresses keep their counters.
    pub fn set_endpoints(&self, eps: &[Endpoint]) {
        let old = self.hosts();
        self.set_endpoints_with(eps, &old);
    }

    fn set_endpoints_with(&self, eps: &[Endpoint], old: &[Arc<Host>]) {
        let by_addr: HashMap<SocketAddr, &Arc<Host>> = old.iter().map(|h| (h.addr, h)).collect();
        let hosts = eps
            .iter()
            .map(|e| {
                let tls = self.cfg.tls.is_some() && self.cfg.uses_tls(&e.socket_match);
                match by_addr.get(&e.addr) {
                    Some(h) if h.weight == e.weight && h.healthy == e.healthy && h.tls == tls => {
                        (*h).clone()
                    }
                    Some(h) => Arc::new(Host::new(e, h.stats.clone(), tls)),
                    None => Arc::new(Host::new(e, Arc::default(), tls)),
                }
            })
            .collect();
        let hosts: Vec<Arc<Host>> = hosts;
        self.all_healthy
            .store(hosts.iter().all(|h| h.healthy), Relaxed);
        *self.hosts.write().unwrap() = Arc::new(hosts);
    }

    /// An ORIGINAL_DST cluster's host for destination `addr`.
    pub fn original_dst_host(&self, addr: SocketAddr) -> Arc<Host> {
        let mut hosts = self.original.lock().unwrap();
        if let Some(h) = hosts.get(&addr) {
            return h.clone();
        }
        if hosts.len() >= ORIGINAL_DST_HOSTS {
            hosts.clear();
        }
        let e = Endpoint {
            addr,
            weight: 1,
            healthy: true,
            socket_match: Default::default(),
        };
        let h = Arc::new(Host::new(&e, Arc::default(), false));
        hosts.insert(addr, h.clone());
        h
    }

    /// Picks a host by the cluster's policy among healthy, non-ejected hosts; below 50%
    /// available Envoy's panic mode routes to all hosts.
    pub fn pick(&self) -> Option<Arc<Host>> {
        let hosts = self.hosts();
        if hosts.is_empty() {
            return None;
        }
        let now = Instant::now();
        let maybe_ejected =
            (now - self.created).as_nanos() < self.eject_horizon_ns.load(Relaxed) as u128;
        if self.all_healthy.load(Relaxed) && !maybe_ejected {
            return pick(self.cfg.lb, &hosts, &self.rr).cloned();
        }
        let available: Vec<&Arc<Host>> = hosts
            .iter()
            .filter(|h| h.healthy && !h.ejected(now))
            .collect();
        // Panic mode: too few hosts left, so all of them take traffic (Envoy's
        // healthy_panic_threshold, 50% unless configured; istiod sets minHealthPercent).
        let share = 100.0 * available.len() as f64 / hosts.len() as f64;
        let candidates: Vec<&Arc<Host>> = if share < self.cfg.panic_threshold {
            hosts.iter().collect()
        } else {
            available
        };
        pick(self.cfg.lb, &candidates, &self.rr).cloned()
    }

    /// Reserves circuit-breaker capacity for one request to `host`.
    pub async fn admit(self: &Arc<Self>, host: Arc<Host>) -> Result<RequestGuard, Overflow> {
        let t = &self.cfg.thresholds;
        if self.active_requests.fetch_add(1, Relaxed) >= t.max_requests {
            self.active_requests.fetch_sub(1, Relaxed);
            self.stats
                .upstream_rq_pending_overflow
                .fetch_add(1, Relaxed);
            return Err(Overflow);
        }
        let permit = if self.cfg.http2 {
            None
        } else {
            match self.connections.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    if self.pending.fetch_add(1, Relaxed) >= t.max_pending_requests {
                        self.pending.fetch_sub(1, Relaxed);
                        self.active_requests.fetch_sub(1, Relaxed);
                        self.stats
                            .upstream_rq_pending_overflow
                            .fetch_add(1, Relaxed);
                        return Err(Overflow);
                    }
                    self.stats.upstream_rq_pending_total.fetch_add(1, Relaxed);
                    let p = self.connections.clone().acquire_owned().await;
                    self.pending.fetch_sub(1, Relaxed);
                    Some(p.expect("the semaphore is never closed"))
                }
            }
        };
        self.stats.upstream_rq_active.fetch_add(1, Relaxed);
        host.stats.rq_active.fetch_add(1, Relaxed);
        Ok(RequestGuard {
            cluster: self.clone(),
            host,
            _permit: permit,
        })
    }

    /// Takes a retry slot (max_retries); `false` when the breaker is open.
    pub fn begin_retry(&self) -> bool {
        if self.active_retries.fetch_add(1, Relaxed) >= self.cfg.thresholds.max_retries {
            self.active_retries.fetch_sub(1, Relaxed);
            self.stats.upstream_rq_retry_overflow.fetch_add(1, Relaxed);
            return false;
        }
        self.stats.upstream_rq_retry.fetch_add(1, Relaxed);
        true
    }

    pub fn end_retry(&self) {
        self.active_retries.fetch_sub(1, Relaxed);
    }

    /// Feeds one attempt's outcome to outlier detection, as Envoy's detector does without
    /// split local-origin errors: a 5xx (local failures count as 503, timeouts as 504) adds to
    /// the consecutive 5xx count, a 502/503/504 also to the consecutive gateway failures, and
    /// anything else resets both. A host reaching a threshold is ejected (with the enforcing
    /// chance) unless ejected hosts are already `max_ejection_percent` of the cluster or more;
    /// it stays out for `base_ejection_time` times its multiplier (at most
    /// `max_ejection_time`) and comes back at the next interval tick after that.
    pub fn record_outcome(&self, host: &Host, outcome: Outcome) {
        let Some(od) = &self.cfg.outlier else { return };
        let code = outcome.code();
        let now = Instant::now();
        let mut st = host.outlier.lock().unwrap();
        // Back in the pool: Envoy resets the counters when it brings a host back.
        if let Some(until) = st.ejected_until.filter(|t| *t <= now) {
            st.consecutive_5xx = 0;
            st.consecutive_gateway_failure = 0;
            st.ejected_until = None;
            st.back_at = Some(until);
        }
        if code < 500 {
            st.consecutive_5xx = 0;
            st.consecutive_gateway_failure = 0;
            return;
        }
        st.consecutive_5xx += 1;
        if matches!(code, 502..=504) {
            st.consecutive_gateway_failure += 1;
        } else {
            st.consecutive_gateway_failure = 0;
        }
        if st.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        // A threshold of 0 never fires; a gateway failure run is looked at first, as Envoy does.
        let gateway = od.consecutive_gateway_failure > 0
            && st.consecutive_gateway_failure >= od.consecutive_gateway_failure;
        let five_xx = od.consecutive_5xx > 0 && st.consecutive_5xx >= od.consecutive_5xx;
        if gateway {
            st.consecutive_gateway_failure = 0;
        }
        if five_xx {
            st.consecutive_5xx = 0;
        }
        let enforced = |pct: u32| pct >= 100 || (pct > 0 && rand::rng().random_range(0..100) < pct);
        let detected = (gateway && enforced(od.enforcing_consecutive_gateway_failure))
            || (five_xx && enforced(od.enforcing_consecutive_5xx));
        if !detected {
            return;
        }
        drop(st);
        let hosts = self.hosts();
        let ejected = hosts.iter().filter(|h| h.ejected(now)).count();
        // Envoy 1.40 ejects only if the share ejected afterwards stays within the limit (so
        // 10% of two hosts ejects none; measured against it, tests/proxy_differential.rs).
        if 100 * (ejected + 1) > od.max_ejection_percent.min(100) as usize * hosts.len() {
            self.stats.ejections_overflow.fetch_add(1, Relaxed);
            return;
        }
        let mut st = host.outlier.lock().unwrap();
        // One step down for every whole interval spent in the pool since the last ejection.
        if let Some(back) = st.back_at {
            let healthy = now.saturating_duration_since(back);
            let steps = (healthy.as_nanos() / od.interval.as_nanos().max(1)) as u32;
            st.backoff = st.backoff.saturating_sub(steps);
        }
        if od.base_ejection_time * st.backoff < od.max_ejection_time + od.base_ejection_time {
            st.backoff += 1;
        }
        let out_for = (od.base_ejection_time * st.backoff).min(od.max_ejection_time);
        // The detector looks every interval since the cluster was created.
        let due = (now + out_for).saturating_duration_since(self.created);
        let ticks = due.as_nanos().div_ceil(od.interval.as_nanos().max(1));
        let until = self.created + od.interval * ticks as u32;
        st.ejected_until = Some(until);
        self.eject_horizon_ns
            .fetch_max((until - self.created).as_nanos() as u64, Relaxed);
        self.stats.ejections_enforced_total.fetch_add(1, Relaxed);
    }

    pub fn ejections_active(&self) -> usize {
        let now = Instant::now();
        self.hosts().iter().filter(|h| h.ejected(now)).count()
    }

    /// Sends one request to `host`, reusing an idle connection when one is ready.
    pub async fn send(
        &self,
        host: &Host,
        req: http::Request<UpstreamBody>,
    ) -> Result<(http::Response<hyper::body::Incoming>, Option<IdleConn>), SendError> {
        let mut conn = self.checkout(host).await?;
        match &mut conn.0 {
            Idle::H1(sender, served) => {
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|_| SendError::Reset)?;
                *served += 1;
                let reusable = self
                    .cfg
                    .max_requests_per_connection
                    .is_none_or(|m| *served < m);
                Ok((resp, reusable.then_some(conn)))
            }
            Idle::H2(sender) => {
                let resp = sender.send_request(req).await.map_err(send_error)?;
                Ok((resp, Some(conn)))
            }
        }
    }

    /// Returns an HTTP/1 connection to the pool once its response is complete.
    pub fn checkin(&self, host: &Host, conn: IdleConn) {
        if let Idle::H1(..) = conn.0 {
            host.with_idle(|idle| idle.push(conn));
        }
    }

    async fn checkout(&self, host: &Host) -> Result<IdleConn, SendError> {
        loop {
            let c = host.with_idle(|idle| {
                if self.cfg.http2 {
                    match idle.last() {
                        Some(IdleConn(Idle::H2(s))) if !s.is_closed() => {
                            Some(IdleConn(Idle::H2(s.clone())))
                        }
                        Some(_) => {
                            idle.pop();
                            None
                        }
                        None => None,
                    }
                } else {
                    idle.pop()
                }
            });
            match c {
                Some(IdleConn(Idle::H1(mut s, n))) => {
                    if s.is_closed() {
                        continue;
                    }
                    if std::future::poll_fn(|cx| s.poll_ready(cx)).await.is_ok() {
                        return Ok(IdleConn(Idle::H1(s, n)));
                    }
                }
                Some(other) => return Ok(other),
                None => break,
            }
        }
        let conn = self.connect(host).await?;
        if let Idle::H2(s) = &conn.0 {
            host.with_idle(|idle| idle.push(IdleConn(Idle::H2(s.clone()))));
        }
        Ok(conn)
    }

    async fn connect(&self, host: &Host) -> Result<IdleConn, SendError> {
        let fail = || {
            host.stats.cx_connect_fail.fetch_add(1, Relaxed);
            self.stats.upstream_cx_connect_fail.fetch_add(1, Relaxed);
            SendError::ConnectFailure
        };
        // As in Envoy, a request waiting for a new connection is pending, so it counts against
        // max_pending_requests while the connection is being established.
        self.pending.fetch_add(1, Relaxed);
        let stream = tokio::time::timeout(
            self.cfg.connect_timeout,
            tokio::net::TcpStream::connect(host.addr),
        )
        .await;
        self.pending.fetch_sub(1, Relaxed);
        let stream = match stream {
            Ok(Ok(s)) => s,
            _ => return Err(fail()),
        };
        let _ = stream.set_nodelay(true);
        host.stats.cx_total.fetch_add(1, Relaxed);
        self.stats.upstream_cx_total.fetch_add(1, Relaxed);
        let gauge = CxGauge::new(host.stats.clone(), self.stats.clone());
        match (&self.cfg.tls, host.tls) {
            (Some(t), true) => {
                // Envoy counts a failed handshake as a connect failure
                // (`upstream_cx_connect_fail`) and the request gets 503 UF.
                let handshake = async {
                    let store = self.tls_store.as_ref().ok_or("no secrets store")?;
                    let cfg = store.client(t)?;
                    let name = rustls::pki_types::ServerName::try_from(t.sni.clone())
                        .or_else(|_| {
                            rustls::pki_types::ServerName::try_from(host.addr.ip().to_string())
                        })
                        .map_err(|e| format!("SNI {:?}: {e}", t.sni))?;
                    tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, stream)
                        .await
                        .map_err(|e| e.to_string())
                };
                let tls = match tokio::time::timeout(self.cfg.connect_timeout, handshake).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        self.stats.ssl_connection_error.fetch_add(1, Relaxed);
                        tracing::debug!(cluster = %self.cfg.name, host = %host.addr, "TLS handshake failed: {e}");
                        return Err(fail());
                    }
                    Err(_) => return Err(fail()),
                };
                self.stats.ssl_handshake.fetch_add(1, Relaxed);
                self.handshake(TokioIo::new(tls), gauge, fail).await
            }
            _ => self.handshake(TokioIo::new(stream), gauge, fail).await,
        }
    }

    async fn handshake<I>(
        &self,
        io: I,
        gauge: CxGauge,
        fail: impl Fn() -> SendError,
    ) -> Result<IdleConn, SendError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if self.cfg.http2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|_| fail())?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(gauge);
            });
            Ok(IdleConn(Idle::H2(sender)))
        } else {
            let (sender, conn) = http1::handshake(io).await.map_err(|_| fail())?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(gauge);
            });
            Ok(IdleConn(Idle::H1(sender, 0)))
        }
    }
}

/// Counts a connection as active for its lifetime.
struct CxGauge(Arc<HostStats>, Arc<ClusterStats>);
impl CxGauge {
    fn new(h: Arc<HostStats>, c: Arc<ClusterStats>) -> CxGauge {
        h.cx_active.fetch_add(1, Relaxed);
        c.upstream_cx_active.fetch_add(1, Relaxed);
        CxGauge(h, c)
    }
}
impl Drop for CxGauge {
    fn drop(&mut self) {
        self.0.cx_active.fetch_sub(1, Relaxed);
        self.1.upstream_cx_active.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    ConnectFailure,
    Reset,
    /// An HTTP/2 upstream refused the stream (REFUSED_STREAM): nothing of the request was
    /// processed.
    RefusedStream,
}

/// What a failed `send_request` was: a refused HTTP/2 stream, or any other reset.
fn send_error(e: hyper::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(h2e) = err.downcast_ref::<h2::Error>() {
            if h2e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return SendError::RefusedStream;
            }
        }
        source = err.source();
    }
    SendError::Reset
}

/// Load-balancer pick over `hosts` (non-empty). Round robin and random honour weights only
/// through repetition-free rotation, as Envoy does for equal weights; least request is
/// power-of-two-choices on active requests.
pub fn pick<'a, H: std::borrow::Borrow<Arc<Host>>>(
    lb: Lb,
    hosts: &'a [H],
    rr: &AtomicUsize,
) -> Option<&'a Arc<Host>> {
    let host = |i: usize| hosts[i].borrow();
    match hosts.len() {
        0 => None,
        1 => Some(host(0)),
        n => Some(match lb {
            Lb::RoundRobin => host(rr.fetch_add(1, Relaxed) % n),
            Lb::Random => host(rand::rng().random_range(0..n)),
            Lb::LeastRequest => {
                let mut rng = rand::rng();
                let a = host(rng.random_range(0..n));
                let b = host(rng.random_range(0..n));
                if b.stats.rq_active.load(Relaxed) < a.stats.rq_active.load(Relaxed) {
                    b
                } else {
                    a
                }
            }
        }),
    }
}

/// Envoy's retry back-off: fully jittered, base 25 ms doubling per retry, capped at 250 ms.
pub fn retry_backoff(retry: u32) -> Duration {
    let cap = Duration::from_millis(25)
        .saturating_mul(1 << retry.min(4))
        .min(Duration::from_millis(250));
    Duration::from_micros(rand::rng().random_range(0..=cap.as_micros() as u64))
}
