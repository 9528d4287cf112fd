//! `meshbench workload`: fake service instances. Every response carries its identity in
//! `x-meshbench-workload: SERVICE-VERSION` (how the harness counts which version served a
//! request), the identities of every workload it called in `x-meshbench-upstreams`
//! (so a client of productpage can tell which reviews version served the page), and a small
//! JSON body. Speaks HTTP/1.1 and HTTP/2 cleartext on the same port.
//!
//! Outbound calls go through the pod's sidecar, as the seed's apps do: to the sidecar's
//! outbound listener with `Host: SERVICE:PORT`, forwarding `end-user`, `x-request-id` and the
//! tracing headers. What a workload does per request is its [`Behaviour`]. For bookinfo's
//! service names the default is what istio/istio's `samples/bookinfo/src` apps do:
//! productpage calls details (3 s timeout) and then reviews (3 s timeout, two attempts);
//! reviews v2 calls ratings with a 10 s timeout and v3 with 2.5 s; v1 calls nothing. A failed
//! call degrades the answer instead of failing it: the page is still a 200, its body carries
//! the real apps' error text ("Sorry, product reviews are currently unavailable for this
//! book."), and `x-meshbench-degraded` names every service under it whose call failed,
//! including those its upstreams reported. That is why Istio's fault-injection task shows the
//! reviews-unavailable page after about 6 s.
//!
//! A second listener on POD_IP:[`CONTROL_PORT`] (the harness's, not the mesh's) takes a new
//! behaviour at run time (`PUT /behaviour`, JSON, with the run's control token as a bearer token), so a
//! scenario can make ratings slow and then fail under load.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::header::HeaderValue;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;

pub const IDENTITY_HEADER: &str = "x-meshbench-workload";
pub const UPSTREAMS_HEADER: &str = "x-meshbench-upstreams";
/// Names every service whose call failed or timed out somewhere under this response
/// (`reviews`, `ratings,reviews`): deduplicated, sorted.
pub const DEGRADED_HEADER: &str = "x-meshbench-degraded";
/// Where a workload takes a new [`Behaviour`] (on the pod IP; excluded from the mesh).
pub const CONTROL_PORT: u16 = 15098;
/// The environment variable that gives the control listener's token.
pub const CONTROL_TOKEN_ENV: &str = "MESHBENCH_CONTROL_TOKEN";
/// Headers a workload forwards on its outbound calls (as bookinfo's productpage does:
/// the user, the request id and the tracing context).
const FORWARDED: [&str; 11] = [
    "end-user",
    "x-request-id",
    "user-agent",
    "cookie",
    "authorization",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

/// One outbound call per request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// `SERVICE:PORT`, sent as the Host header to the sidecar.
    pub host: String,
    #[serde(default = "root")]
    pub path: String,
    /// Per attempt; none waits as long as the call takes.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Attempts in all (at least 1); an attempt that fails, times out or answers other than
    /// 2xx is tried again at once, as productpage does.
    #[serde(default = "one")]
    pub attempts: u32,
    /// The text the answer's body gives when this call fails.
    #[serde(default)]
    pub error_text: Option<String>,
}

fn root() -> String {
    "/".into()
}

fn one() -> u32 {
    1
}

impl Call {
    pub fn new(host: &str) -> Call {
        Call {
            host: host.into(),
            path: root(),
            timeout: None,
            attempts: 1,
            error_text: None,
        }
    }

    /// The called service's name: the Host's first DNS label.
    pub fn service(&self) -> &str {
        let h = self.host.rsplit_once(':').map_or(&*self.host, |(h, _)| h);
        h.split('.').next().unwrap_or(h)
    }

    fn error_text(&self) -> String {
        self.error_text
            .clone()
            .unwrap_or_else(|| format!("{} service is currently unavailable", self.service()))
    }

    /// `HOST:PORT[;timeout=D][;attempts=N][;path=P]`, the command line's form.
    pub fn parse(s: &str) -> Result<Call, String> {
        let mut parts = s.split(';');
        let mut c = Call::new(parts.next().unwrap_or_default().trim());
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("call {s:?}: {p:?} is not KEY=VALUE"))?;
            match k.trim() {
                "timeout" => c.timeout = Some(crate::model::parse_duration(v)?),
                "attempts" => {
                    c.attempts = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("call {s:?}: attempts must be 1 to 10"))?
                }
                "path" => c.path = v.into(),
                other => {
                    return Err(format!(
                        "call {s:?}: unknown key {other:?} (timeout, attempts, path)"
                    ))
                }
            }
        }
        c.check().map_err(|e| format!("call {s:?}: {e}"))?;
        Ok(c)
    }

    /// Refuses a call that cannot be made.
    pub fn check(&self) -> Result<(), String> {
        if self.host.is_empty() || !self.host.contains(':') {
            return Err("expected HOST:PORT first".into());
        }
        if !(1..=10).contains(&self.attempts) {
            return Err("attempts must be 1 to 10".into());
        }
        if !self.path.starts_with('/') {
            return Err("path must start with /".into());
        }
        Ok(())
    }

    /// The inverse of [`Call::parse`] (the error text is not part of the command line's form).
    pub fn to_arg(&self) -> String {
        let mut s = self.host.clone();
        if let Some(t) = self.timeout {
            s.push_str(&format!(";timeout={}ms", t.as_millis()));
        }
        if self.attempts != 1 {
            s.push_str(&format!(";attempts={}", self.attempts));
        }
        if self.path != "/" {
            s.push_str(&format!(";path={}", self.path));
        }
        s
    }
}

/// Calls one after the other (bookinfo's apps) or all at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CallMode {
    #[default]
    Sequential,
    Parallel,
}

/// What a failed call does to the answer: degrade it (200, the failure named in
/// `x-meshbench-degraded` and the body; bookinfo's apps) or fail it (502).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Degrade,
    Fail,
}

/// What a workload does per request. Changed at run time through the control listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Behaviour {
    /// Fixed latency added to every response (after the calls).
    pub latency: Duration,
    /// Uniform extra latency in [0, jitter).
    pub jitter: Duration,
    pub response_size: usize,
    /// Fraction of requests answered with `error_status` (0..=1).
    pub error_rate: f64,
    pub error_status: u16,
    pub calls: Vec<Call>,
    pub mode: CallMode,
    pub on_failure: OnFailure,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            response_size: 0,
            error_rate: 0.0,
            error_status: 500,
            calls: vec![],
            mode: CallMode::Sequential,
            on_failure: OnFailure::Degrade,
        }
    }
}

impl Behaviour {
    /// What the real app of this bookinfo service and version does (nothing for other names).
    pub fn bookinfo(service: &str, version: &str) -> Behaviour {
        Behaviour {
            calls: bookinfo_calls(service, version),
            ..Default::default()
        }
    }

    /// Refuses what cannot be served (the harness checks a scenario's behaviours with it).
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(format!(
                "error_rate {} is not a fraction between 0 and 1",
                self.error_rate
            ));
        }
        if !(200..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status {} is not an HTTP status",
                self.error_status
            ));
        }
        for c in &self.calls {
            c.check().map_err(|e| format!("call {}: {e}", c.host))?;
        }
        Ok(())
    }

    /// The command-line flags of `meshbench workload` that give this behaviour.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--latency={}us", self.latency.as_micros()),
            format!("--jitter={}us", self.jitter.as_micros()),
            format!("--response-size={}", self.response_size),
            format!("--error-rate={}", self.error_rate),
            format!("--error-status={}", self.error_status),
            format!("--mode={}", enum_arg(self.mode)),
            format!("--on-failure={}", enum_arg(self.on_failure)),
        ];
        if self.calls.is_empty() {
            a.push("--no-calls".into());
        }
        a.extend(self.calls.iter().map(|c| format!("--call={}", c.to_arg())));
        a
    }
}

fn enum_arg(v: impl clap::ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Config {
    pub service: String,
    pub version: String,
    pub pod: String,
    /// The pod's sidecar outbound listener (POD_IP:15001); calls are skipped without it
    /// (unless `direct`).
    pub sidecar: Option<SocketAddr>,
    /// Calls go to the service by name (`SERVICE:PORT`, resolved as any client would): the
    /// pod's traffic capture takes them to the sidecar (Istio's way; `mesh.capture`).
    pub direct: bool,
    pub behaviour: Behaviour,
    /// The control listener (POD_IP:15098) and the token its requests must carry.
    pub control: Option<SocketAddr>,
    #[serde(skip)]
    pub control_token: String,
}

impl Config {
    pub fn identity(&self) -> String {
        format!("{}-{}", self.service, self.version)
    }
}

/// Every workload identity a response names: the answering workload, then those it called.
pub fn identities(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    [IDENTITY_HEADER, UPSTREAMS_HEADER]
        .into_iter()
        .filter_map(|h| headers.get(h).and_then(|v| v.to_str().ok()))
        .flat_map(|v| v.split(','))
        .filter(|s| !s.is_empty())
}

/// The services a response's `x-meshbench-degraded` names.
pub fn degraded(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(DEGRADED_HEADER)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Bookinfo's call graph for a service and version, with the real apps' timeouts, attempts,
/// paths and error texts.
pub fn bookinfo_calls(service: &str, version: &str) -> Vec<Call> {
    let call = |host: &str, path: &str, timeout_ms: u64, attempts: u32, text: &str| Call {
        host: host.into(),
        path: path.into(),
        timeout: Some(Duration::from_millis(timeout_ms)),
        attempts,
        error_text: Some(text.into()),
    };
    match (service, version) {
        ("productpage", _) => vec![
            call(
                "details:9080",
                "/details/0",
                3000,
                1,
                "Sorry, product details are currently unavailable for this book.",
            ),
            call(
                "reviews:9080",
                "/reviews/0",
                3000,
                2,
                "Sorry, product reviews are currently unavailable for this book.",
            ),
        ],
        ("reviews", "v1") => vec![],
        ("reviews", v) => vec![call(
            "ratings:9080",
            "/ratings/0",
            // Black stars (v2) wait 10 s, red stars (v3) 2.5 s.
            if v == "v2" { 10_000 } else { 2_500 },
            1,
            "Ratings service is currently unavailable",
        )],
        _ => vec![],
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// Keep-alive connections to the sidecar, or per destination when calling by name.
#[derive(Default)]
struct SidecarPool {
    idle: Mutex<Vec<Sender>>,
    by_host: Mutex<std::collections::HashMap<String, Vec<Sender>>>,
}

/// Where a call's connection goes.
#[derive(Clone, Copy)]
enum Via {
    Sidecar(SocketAddr),
    /// To `SERVICE:PORT` itself (resolved by name; captured to the sidecar).
    Name,
}

/// What one call gave: the answer's status, identities and degraded services, or why it
/// failed.
struct Answer {
    status: u16,
    identities: String,
    degraded: Vec<String>,
}

impl SidecarPool {
    fn pop(&self, via: Via, host: &str) -> Option<Sender> {
        match via {
            Via::Sidecar(_) => self.idle.lock().unwrap().pop(),
            Via::Name => self.by_host.lock().unwrap().get_mut(host)?.pop(),
        }
    }

    fn push(&self, via: Via, host: &str, s: Sender) {
        match via {
            Via::Sidecar(_) => self.idle.lock().unwrap().push(s),
            Via::Name => self
                .by_host
                .lock()
                .unwrap()
                .entry(host.to_string())
                .or_default()
                .push(s),
        }
    }

    async fn sender(&self, via: Via, host: &str) -> Result<Sender, String> {
        loop {
            let s = self.pop(via, host);
            match s {
                Some(mut s) if !s.is_closed() => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                Some(_) => continue,
                None => {
                    let stream = match via {
                        Via::Sidecar(sidecar) => TcpStream::connect(sidecar)
                            .await
                            .map_err(|e| format!("{host}: connect to sidecar: {e}"))?,
                        Via::Name => TcpStream::connect(host)
                            .await
                            .map_err(|e| format!("{host}: connect: {e}"))?,
                    };
                    let _ = stream.set_nodelay(true);
                    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| format!("{host}: {e}"))?;
                    tokio::spawn(conn);
                    return Ok(s);
                }
            }
        }
    }

    /// One attempt. A connection is pooled again only after a whole answer (one given up by
    /// a timeout is dropped with this future, and closed).
    async fn attempt(
        &self,
        via: Via,
        call: &Call,
        forward: &[(&'static str, HeaderValue)],
    ) -> Result<Answer, String> {
        let host = &call.host;
        let mut sender = self.sender(via, host).await?;
        let mut req = Request::builder().uri(&call.path).header("host", host);
        for (k, v) in forward {
            req = req.header(*k, v.clone());
        }
        let req = req.body(Empty::new()).map_err(|e| format!("{host}: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let status = resp.status().as_u16();
        let identities = identities(resp.headers()).collect::<Vec<_>>().join(",");
        let degraded = degraded(resp.headers()).map(String::from).collect();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        self.push(via, host, sender);
        Ok(Answer {
            status,
            identities,
            degraded,
        })
    }

    /// A call with its attempts and per-attempt timeout: the last answer (2xx or not), or why
    /// the last attempt failed.
    async fn call(
        &self,
        via: Via,
        call: &Call,
        forward: &[(&'static str, HeaderValue)],
    ) -> Result<Answer, String> {
        let mut last = Err(format!("{}: no attempt", call.host));
        for attempt in 1..=call.attempts.max(1) {
            let r = match call.timeout {
                Some(t) => tokio::time::timeout(t, self.attempt(via, call, forward))
                    .await
                    .unwrap_or_else(|_| Err(format!("{}: timed out after {t:?}", call.host))),
                None => self.attempt(via, call, forward).await,
            };
            let done = matches!(&r, Ok(a) if (200..300).contains(&a.status));
            last = r.map_err(|e| format!("{e} (attempt {attempt} of {})", call.attempts));
            if done {
                break;
            }
        }
        last
    }
}

/// A workload's shared state: its identity and current behaviour.
struct App {
    cfg: Config,
    behaviour: RwLock<Arc<Behaviour>>,
    pool: SidecarPool,
}

/// Serves until `shutdown`; open connections are dropped with the task.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: Shutdown) -> std::io::Result<()> {
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), addr = ?listener.local_addr().ok(), "workload starting");
    let control =
        match cfg.control {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}"))
            })?),
            None => None,
        };
    let app = Arc::new(App {
        behaviour: RwLock::new(Arc::new(cfg.behaviour.clone())),
        cfg,
        pool: SidecarPool::default(),
    });
    if let Some(l) = control {
        let app = app.clone();
        tokio::spawn(serve(l, shutdown.clone(), move |req| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.control(req).await) }
        }));
    }
    serve(listener, shutdown, move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(app.handle(req).await) }
    })
    .await;
    Ok(())
}

/// Serves HTTP/1.1 and h2c on `listener` until `shutdown`.
async fn serve<F, Fut>(listener: TcpListener, shutdown: Shutdown, f: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
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
            _ = &mut stop => return,
        };
        let _ = stream.set_nodelay(true);
        let f = f.clone();
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(f))
                .await;
        });
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

impl App {
    fn behaviour(&self) -> Arc<Behaviour> {
        self.behaviour.read().unwrap().clone()
    }

    /// `GET /behaviour` answers the current behaviour; `PUT /behaviour` replaces it whole
    /// (JSON; a bad one changes nothing). Both need the run's token.
    async fn control(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if self.cfg.control_token.is_empty()
            || !crate::net::bearer_is(req.headers(), &self.cfg.control_token)
        {
            return text(StatusCode::FORBIDDEN, "control token required\n".into());
        }
        if req.uri().path() != "/behaviour" {
            return text(StatusCode::NOT_FOUND, "only /behaviour\n".into());
        }
        match *req.method() {
            hyper::Method::GET => text(
                StatusCode::OK,
                serde_json::to_string(&*self.behaviour()).unwrap_or_default(),
            ),
            hyper::Method::PUT => {
                let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("body: {e}\n")),
                };
                let b: Behaviour = match serde_json::from_slice(&body) {
                    Ok(b) => b,
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("behaviour: {e}\n")),
                };
                if let Err(e) = b.check() {
                    return text(StatusCode::BAD_REQUEST, format!("behaviour: {e}\n"));
                }
                tracing::info!(behaviour = %serde_json::to_string(&b).unwrap_or_default(), "behaviour changed");
                *self.behaviour.write().unwrap() = Arc::new(b);
                text(StatusCode::OK, "ok\n".into())
            }
            _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or PUT\n".into()),
        }
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        // Health checks (the harness's readiness probe) answer at once, as the real apps'
        // `/health` does: no calls, no latency, no injected errors.
        let b = if matches!(req.uri().path(), "/healthz" | "/health") {
            Arc::new(Behaviour::default())
        } else {
            self.behaviour()
        };
        let (delay, fail) = {
            let mut rng = rand::rng();
            let jitter = if b.jitter.is_zero() {
                Duration::ZERO
            } else {
                b.jitter.mul_f64(rng.random::<f64>())
            };
            (
                b.latency + jitter,
                b.error_rate > 0.0 && rng.random::<f64>() < b.error_rate,
            )
        };
        let forward: Vec<(&'static str, HeaderValue)> = FORWARDED
            .iter()
            .filter_map(|h| req.headers().get(*h).map(|v| (*h, v.clone())))
            .collect();
        let mut upstreams = Vec::new();
        let mut failures = Vec::new();
        let mut errors = serde_json::Map::new();
        let mut degraded: Vec<String> = Vec::new();
        let via = if self.cfg.direct {
            Some(Via::Name)
        } else {
            self.cfg.sidecar.map(Via::Sidecar)
        };
        if let Some(via) = via.filter(|_| !b.calls.is_empty()) {
            let answers = match b.mode {
                CallMode::Sequential => {
                    let mut out = Vec::with_capacity(b.calls.len());
                    for c in &b.calls {
                        out.push(self.pool.call(via, c, &forward).await);
                    }
                    out
                }
                CallMode::Parallel => {
                    futures::future::join_all(
                        b.calls.iter().map(|c| self.pool.call(via, c, &forward)),
                    )
                    .await
                }
            };
            for (c, r) in b.calls.iter().zip(answers) {
                let failure = match r {
                    Ok(a) => {
                        if !a.identities.is_empty() {
                            upstreams.push(a.identities);
                        }
                        degraded.extend(a.degraded);
                        (!(200..300).contains(&a.status))
                            .then(|| format!("{}: {}", c.host, a.status))
                    }
                    Err(e) => Some(e),
                };
                if let Some(f) = failure {
                    failures.push(f);
                    degraded.push(c.service().to_string());
                    errors.insert(c.service().to_string(), c.error_text().into());
                }
            }
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let status = if fail {
            b.error_status
        } else if !failures.is_empty() && b.on_failure == OnFailure::Fail {
            502
        } else {
            200
        };
        degraded.sort();
        degraded.dedup();
        let body = serde_json::json!({
            "service": self.cfg.service,
            "version": self.cfg.version,
            "pod": self.cfg.pod,
            "path": req.uri().path(),
            "upstreams": upstreams,
            "errors": errors,
            "failures": failures,
            "padding": "x".repeat(b.response_size),
        });
        let mut resp = Response::builder()
            .status(status)
            .header(IDENTITY_HEADER, self.cfg.identity())
            .header("content-type", "application/json");
        if !upstreams.is_empty() {
            resp = resp.header(UPSTREAMS_HEADER, upstreams.join(","));
        }
        if !degraded.is_empty() {
            resp = resp.header(DEGRADED_HEADER, degraded.join(","));
        }
        if let Some(id) = req.headers().get("x-request-id") {
            resp = resp.header("x-request-id", id.clone());
        }
        resp.body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "bad header\n".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_specs_round_trip_and_bad_ones_say_why() {
        let c = Call::parse("reviews:9080;timeout=3s;attempts=2;path=/reviews/0").unwrap();
        assert_eq!(c.service(), "reviews");
        assert_eq!(c.timeout, Some(Duration::from_secs(3)));
        assert_eq!(c.attempts, 2);
        assert_eq!(Call::parse(&c.to_arg()).unwrap(), c);
        assert_eq!(
            Call::new("ratings.default.svc.cluster.local:9080").service(),
            "ratings"
        );
        for (bad, why) in [
            ("reviews", "HOST:PORT"),
            ("reviews:9080;attempts=0", "1 to 10"),
            ("reviews:9080;timeout=forever", "duration"),
            ("reviews:9080;colour=red", "unknown key"),
            ("reviews:9080;path=x", "start with /"),
        ] {
            let e = Call::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn bookinfo_defaults_are_the_real_apps() {
        let pp = bookinfo_calls("productpage", "v1");
        assert_eq!(
            pp.iter()
                .map(|c| (c.service(), c.timeout, c.attempts))
                .collect::<Vec<_>>(),
            [
                ("details", Some(Duration::from_secs(3)), 1),
                ("reviews", Some(Duration::from_secs(3)), 2)
            ]
        );
        assert_eq!(
            bookinfo_calls("reviews", "v2")[0].timeout,
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            bookinfo_calls("reviews", "v3")[0].timeout,
            Some(Duration::from_millis(2500))
        );
        assert!(bookinfo_calls("reviews", "v1").is_empty());
        assert_eq!(Behaviour::bookinfo("details", "v1"), Behaviour::default());
    }
}
