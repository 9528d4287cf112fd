//! The load generator: closed loop (N keep-alive connections, each sending its next request
//! when the previous answer arrives) and open loop (a constant rate, latency measured from the
//! intended send time so coordinated omission is corrected; the uncorrected figure beside it).
//! HdrHistogram percentiles, status codes, per-version counts from the workload identity
//! header, and a per-second series. Bounded: every run stops by itself after its duration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::workload::{degraded, identities};

pub mod h1;

#[derive(Clone, Debug, Serialize)]
pub struct LoadSpec {
    pub target: SocketAddr,
    /// Host header (the service, e.g. `reviews:9080`).
    pub host: String,
    pub path: String,
    pub connections: usize,
    pub duration: Duration,
    /// `None`: closed loop at max throughput; `Some(rps)`: open loop at that rate.
    pub rate: Option<f64>,
    pub headers: Vec<(String, String)>,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[serde(default)]
    pub http2: bool,
    /// Running totals readable while the load runs (for windowed expectations).
    #[serde(skip)]
    pub live: Option<Arc<Live>>,
}

/// Counts of one slice of time.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub errors: u64,
    pub versions: BTreeMap<String, u64>,
    /// Answers that named a degraded service.
    pub degraded_requests: u64,
    /// Per service, answers that named it degraded.
    pub degraded: BTreeMap<String, u64>,
    /// 429s and overflow 503s.
    pub shed: u64,
}

impl Counts {
    /// The totals of a finished load.
    pub fn of(r: &LoadResult) -> Counts {
        Counts {
            requests: r.requests,
            errors: r.errors,
            versions: r.versions.clone(),
            degraded_requests: r.degraded_requests,
            degraded: r.degraded.clone(),
            shed: r.shed,
        }
    }

    fn add(&mut self, a: &Answered) {
        self.requests += 1;
        self.errors += u64::from(a.failed());
        self.shed += u64::from(a.shed);
        self.degraded_requests += u64::from(!a.degraded.is_empty());
        for v in &a.versions {
            count(&mut self.versions, v);
        }
        for d in &a.degraded {
            count(&mut self.degraded, d);
        }
    }

    fn merge(&mut self, c: &Counts) {
        self.requests += c.requests;
        self.errors += c.errors;
        self.shed += c.shed;
        self.degraded_requests += c.degraded_requests;
        for (k, v) in &c.versions {
            *self.versions.entry(k.clone()).or_insert(0) += v;
        }
        for (k, v) in &c.degraded {
            *self.degraded.entry(k.clone()).or_insert(0) += v;
        }
    }
}

/// What one request gave: its status (`None`: a transport failure) and what the answer's
/// headers said.
#[derive(Debug, Default)]
struct Answered {
    status: Option<u16>,
    versions: Vec<String>,
    degraded: Vec<String>,
    shed: bool,
}

impl Answered {
    fn of(a: Option<h1::Answer>) -> Answered {
        match a {
            Some(a) => Answered {
                status: Some(a.status),
                versions: a.versions,
                degraded: a.degraded,
                shed: a.shed,
            },
            None => Answered::default(),
        }
    }

    /// A transport failure or a 5xx.
    fn failed(&self) -> bool {
        self.status.is_none_or(|s| s >= 500)
    }
}

/// Per-100-ms counts of a running load.
#[derive(Debug)]
pub struct Live {
    start: std::time::Instant,
    slots: Mutex<BTreeMap<u64, Counts>>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            start: std::time::Instant::now(),
            slots: Mutex::default(),
        }
    }
}

impl Live {
    fn record(&self, a: &Answered) {
        let slot = self.start.elapsed().as_millis() as u64 / 100;
        self.slots.lock().unwrap().entry(slot).or_default().add(a);
    }

    /// Totals over the last `window` (everything so far when `None`).
    pub fn totals(&self, window: Option<Duration>) -> Counts {
        let now = self.start.elapsed().as_millis() as u64 / 100;
        let from = window.map_or(0, |w| now.saturating_sub(w.as_millis() as u64 / 100));
        let mut out = Counts::default();
        for (_, c) in self.slots.lock().unwrap().range(from..) {
            out.merge(c);
        }
        out
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Second {
    pub t: u64,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub versions: BTreeMap<String, u64>,
    pub degraded: u64,
    pub shed: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadResult {
    pub target_rps: Option<f64>,
    pub achieved_rps: f64,
    pub duration_s: f64,
    pub requests: u64,
    /// Transport failures and non-2xx/3xx/4xx answers (5xx).
    pub errors: u64,
    pub status: BTreeMap<String, u64>,
    pub versions: BTreeMap<String, u64>,
    /// Answers whose `x-meshbench-degraded` named a service (a 200 with part of it missing).
    pub degraded_requests: u64,
    /// Per service: answers that named it degraded.
    pub degraded: BTreeMap<String, u64>,
    /// Answers the mesh refused to protect itself: 429 (rate limited) and overflow 503s
    /// (`x-envoy-overloaded`).
    pub shed: u64,
    /// From the intended send time (open loop); same as uncorrected for a closed loop.
    pub latency_ms: Percentiles,
    pub uncorrected_latency_ms: Percentiles,
    /// Open loop: how late requests left after their intended send time (the generator's own
    /// slack; a saturated target shows here as well, since a busy connection sends late).
    pub send_lag_ms: Percentiles,
    pub series: Vec<Second>,
}

struct Shard {
    corrected: Histogram<u64>,
    uncorrected: Histogram<u64>,
    lag: Histogram<u64>,
    status: BTreeMap<u16, u64>,
    transport_errors: u64,
    counts: Counts,
    per_second: BTreeMap<u64, (Histogram<u64>, Counts)>,
}

/// Counts `v` without a new key string when it is already there (the common case).
fn count(m: &mut BTreeMap<String, u64>, v: &str) {
    match m.get_mut(v) {
        Some(n) => *n += 1,
        None => {
            m.insert(v.to_string(), 1);
        }
    }
}

fn hist() -> Histogram<u64> {
    // 1 us .. 60 s, 3 significant digits
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds are valid")
}

impl Shard {
    fn new() -> Shard {
        Shard {
            corrected: hist(),
            uncorrected: hist(),
            lag: hist(),
            status: BTreeMap::new(),
            transport_errors: 0,
            counts: Counts::default(),
            per_second: BTreeMap::new(),
        }
    }

    fn record(&mut self, second: u64, corrected: Duration, uncorrected: Duration, a: &Answered) {
        let c = corrected.as_micros().clamp(1, 60_000_000) as u64;
        let u = uncorrected.as_micros().clamp(1, 60_000_000) as u64;
        let _ = self.corrected.record(c);
        let _ = self.uncorrected.record(u);
        let sec = self
            .per_second
            .entry(second)
            .or_insert_with(|| (hist(), Counts::default()));
        let _ = sec.0.record(c);
        sec.1.add(a);
        self.counts.add(a);
        match a.status {
            Some(s) => *self.status.entry(s).or_insert(0) += 1,
            None => self.transport_errors += 1,
        }
    }
}

/// One client connection: HTTP/1.1 keep-alive (the generator's own client, [`h1`]), or
/// HTTP/2 with prior knowledge (h2c, on hyper).
enum Sender {
    H1(h1::Conn),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    fn usable(&self) -> bool {
        match self {
            Sender::H1(c) => c.reusable(),
            Sender::H2(s) => !s.is_closed(),
        }
    }
}

async fn connect(addr: SocketAddr, http2: bool) -> Option<Sender> {
    if !http2 {
        return h1::Conn::connect(addr).await.ok().map(Sender::H1);
    }
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .ok()?;
    tokio::spawn(conn);
    Some(Sender::H2(sender))
}

/// What one connection sends: for HTTP/1.1 the request's bytes, serialized once (`None` when
/// the spec's host, path or headers cannot be sent: every send then fails).
enum Request {
    H1(Option<Vec<u8>>),
    H2,
}

impl Request {
    fn of(spec: &LoadSpec) -> Request {
        if spec.http2 {
            Request::H2
        } else {
            Request::H1(h1::request(&spec.host, &spec.path, &spec.headers))
        }
    }
}

/// One request: status and every workload identity the response names (the answering
/// workload and those it called); `None` on a transport failure (the connection is then
/// replaced).
async fn send(sender: &mut Option<Sender>, spec: &LoadSpec, req: &Request) -> Option<h1::Answer> {
    if sender.as_ref().is_none_or(|s| !s.usable()) {
        *sender = connect(spec.target, spec.http2).await;
    }
    let r = match (sender.as_mut()?, req) {
        (Sender::H1(c), Request::H1(bytes)) => c.round_trip(bytes.as_deref()?).await.ok(),
        (Sender::H2(s), _) => send_h2(s, spec).await,
        (Sender::H1(_), Request::H2) => None,
    };
    if r.is_none() {
        *sender = None;
    }
    r
}

async fn send_h2(
    s: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    spec: &LoadSpec,
) -> Option<h1::Answer> {
    s.ready().await.ok()?;
    // h2 carries the service in :authority.
    let mut req = hyper::Request::builder()
        .uri(format!("http://{}{}", spec.host, spec.path))
        .version(hyper::Version::HTTP_2);
    for (k, v) in &spec.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = s.send_request(req.body(Empty::new()).ok()?).await.ok()?;
    let h = resp.headers();
    let answer = h1::Answer {
        status: resp.status().as_u16(),
        versions: identities(h).map(String::from).collect(),
        degraded: degraded(h).map(String::from).collect(),
        shed: resp.status() == 429 || h.contains_key("x-envoy-overloaded"),
    };
    resp.into_body().collect().await.ok()?;
    Some(answer)
}

/// Client threads of the generator. One thread with its own single-threaded runtime keeps every
/// wake-up on one core (as wrk -t1 does), leaving the other core to the system under test.
pub const DEFAULT_THREADS: usize = 1;

/// Runs one load phase to completion.
pub async fn run(spec: LoadSpec) -> LoadResult {
    let start = Instant::now() + Duration::from_millis(20);
    let conns = spec.connections.max(1);
    let threads = DEFAULT_THREADS.min(conns);
    // Open loop: one pacer thread wakes each connection at its slots.
    let slots: Vec<Arc<tokio::sync::Notify>> = (0..conns).map(|_| Arc::default()).collect();
    let _pacer = spec
        .rate
        .map(|rps| Pacer::start(start, spec.duration, rps, slots.clone()));
    let mut joins = Vec::new();
    for th in 0..threads {
        let spec = spec.clone();
        let slots = slots.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("load-{th}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the load thread");
                let shards = rt.block_on(async move {
                    let tasks: Vec<_> = (th..conns)
                        .step_by(threads)
                        .map(|k| {
                            let slot = slots[k].clone();
                            tokio::spawn(connection_loop(spec.clone(), k, conns, start, slot))
                        })
                        .collect();
                    let mut out = Vec::new();
                    for t in tasks {
                        if let Ok(s) = t.await {
                            out.push(s);
                        }
                    }
                    out
                });
                let _ = tx.send(shards);
            })
            .expect("spawn a load thread");
        joins.push(rx);
    }
    let mut shards = Vec::new();
    for j in joins {
        shards.extend(j.await.unwrap_or_default());
    }
    merge(&spec, shards)
}

/// The open loop's clock. Tokio's timer rounds every deadline up to the next millisecond, so
/// a request due at t would leave at up to t + 1 ms and the corrected latency would carry that
/// slack. The pacer thread sleeps with the kernel's high-resolution timer (tens of
/// microseconds late at most) and wakes the connection whose slot is due; a connection still
/// busy at its slot finds the wake-up waiting and sends at once. Stops at the phase's end, or
/// when dropped.
struct Pacer {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Pacer {
    fn start(
        start: Instant,
        duration: Duration,
        rps: f64,
        slots: Vec<Arc<tokio::sync::Notify>>,
    ) -> Pacer {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (start, end) = (start.into_std(), (start + duration).into_std());
        let spawned = std::thread::Builder::new()
            .name("load-pacer".into())
            .spawn(move || {
                let mut i = 0u64;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    let due = start + Duration::from_secs_f64(i as f64 / rps);
                    if due >= end {
                        break;
                    }
                    let now = std::time::Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    slots[(i % slots.len() as u64) as usize].notify_one();
                    i += 1;
                }
            });
        // Without the thread each connection still keeps its slots on tokio's timer.
        if let Err(e) = spawned {
            tracing::warn!("no pacer thread ({e}): open-loop sends may be up to 1 ms late");
        }
        Pacer { stop }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long a request may stay open past the phase's end (or its send) before it is given up.
pub const REQUEST_GRACE: Duration = Duration::from_secs(10);

/// How much later than its slot a connection waits on tokio's own timer if the pacer's wake-up
/// does not come (it always should).
const PACER_FALLBACK: Duration = Duration::from_millis(5);

/// Connection `k` of `conns`: sends its share of requests until the end of the phase.
async fn connection_loop(
    spec: LoadSpec,
    k: usize,
    conns: usize,
    start: Instant,
    slot: Arc<tokio::sync::Notify>,
) -> Shard {
    let end = start + spec.duration;
    let mut shard = Shard::new();
    let req = Request::of(&spec);
    if let Request::H1(None) = req {
        // Nothing can be sent: one transport error says so, no connection is tried.
        tracing::warn!(host = %spec.host, path = %spec.path, "request cannot be sent as HTTP/1.1");
        shard.record(0, Duration::ZERO, Duration::ZERO, &Answered::default());
        return shard;
    }
    let mut sender = connect(spec.target, spec.http2).await;
    tokio::time::sleep_until(start).await;
    let mut i = k as u64;
    loop {
        let intended = match spec.rate {
            Some(rps) => start + Duration::from_secs_f64(i as f64 / rps),
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        // A slot already due is sent at once; otherwise the pacer wakes this connection at
        // it (a wake-up left from a slot that was already due is skipped).
        while intended > Instant::now() {
            let _ = tokio::time::timeout_at(intended + PACER_FALLBACK, slot.notified()).await;
        }
        let sent = Instant::now();
        // Bounded even against a frozen or cut-off peer: a request still open REQUEST_GRACE
        // after its send (or after the phase's end) counts as a transport error and its
        // connection is dropped.
        let r = match tokio::time::timeout_at(
            end.max(sent) + REQUEST_GRACE,
            send(&mut sender, &spec, &req),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                sender = None;
                None
            }
        };
        let done = Instant::now();
        let second = done.saturating_duration_since(start).as_secs();
        let answered = Answered::of(r);
        if let Some(live) = &spec.live {
            live.record(&answered);
        }
        let _ = shard
            .lag
            .record((sent - intended).as_micros().clamp(1, 60_000_000) as u64);
        shard.record(second, done - intended, done - sent, &answered);
        i += conns as u64;
    }
    shard
}

fn merge(spec: &LoadSpec, shards: Vec<Shard>) -> LoadResult {
    let mut all = Shard::new();
    for s in shards {
        all.corrected.add(&s.corrected).expect("same bounds");
        all.uncorrected.add(&s.uncorrected).expect("same bounds");
        all.lag.add(&s.lag).expect("same bounds");
        all.transport_errors += s.transport_errors;
        all.counts.merge(&s.counts);
        for (k, v) in s.status {
            *all.status.entry(k).or_insert(0) += v;
        }
        for (sec, (h, c)) in s.per_second {
            let entry = all
                .per_second
                .entry(sec)
                .or_insert_with(|| (hist(), Counts::default()));
            entry.0.add(&h).expect("same bounds");
            entry.1.merge(&c);
        }
    }
    let elapsed = spec.duration.as_secs_f64();
    let requests = all.corrected.len();
    let mut status: BTreeMap<String, u64> = all
        .status
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    if all.transport_errors > 0 {
        status.insert("transport_error".into(), all.transport_errors);
    }
    LoadResult {
        target_rps: spec.rate,
        achieved_rps: requests as f64 / elapsed,
        duration_s: elapsed,
        requests,
        errors: all.counts.errors,
        status,
        versions: all.counts.versions,
        degraded_requests: all.counts.degraded_requests,
        degraded: all.counts.degraded,
        shed: all.counts.shed,
        latency_ms: Percentiles::of(&all.corrected),
        uncorrected_latency_ms: Percentiles::of(&all.uncorrected),
        send_lag_ms: if spec.rate.is_some() {
            Percentiles::of(&all.lag)
        } else {
            Percentiles::default()
        },
        series: all
            .per_second
            .into_iter()
            .map(|(t, (h, c))| Second {
                t,
                requests: h.len(),
                errors: c.errors,
                p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
                p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
                versions: c.versions,
                degraded: c.degraded_requests,
                shed: c.shed,
            })
            .collect(),
    }
}
