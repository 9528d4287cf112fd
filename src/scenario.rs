//! Scenario files: YAML data describing a mesh (topology, mesh options) and ordered steps.
//! Parsing is strict: unknown keys, bad durations and dangling references are errors naming
//! `file:line:column` and what was expected. Defaults are applied in one place
//! ([`Scenario::load`]); `--quick` scales every duration in one place ([`Scenario::quick`]).
//! The schema is documented in `scenarios/README.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_saphyr::Spanned;

use crate::model::parse_duration;
use crate::workload::{Behaviour, Call, CallMode, OnFailure};
use crate::xds::debounce::MAX_DEBOUNCE;
use crate::xds::XdsMode;

/// A duration written as `100ms`, `5s`, `1m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Dur(pub Duration);

/// serde-saphyr does not locate errors raised by a type's own Deserialize, so such messages
/// carry the location themselves, behind this marker, and [`Scenario::parse`] lifts it out.
const LOCATED: &str = "@at ";

/// The longest duration a scenario may give (a step, a window, a bound): one day.
pub const MAX_SCENARIO_DURATION: Duration = Duration::from_secs(24 * 3600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<String>::deserialize(d)?;
        parse_duration(&s.value)
            .and_then(|d| {
                if d > MAX_SCENARIO_DURATION {
                    Err(format!(
                        "{:?} is longer than a scenario may run (24h)",
                        s.value
                    ))
                } else {
                    Ok(d)
                }
            })
            .map(Dur)
            .map_err(|e| {
                let (l, c) = (s.referenced.line(), s.referenced.column());
                serde::de::Error::custom(format!(
                    "{LOCATED}{l}:{c} {e}; expected a duration such as 500ms, 5s or 1m"
                ))
            })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    #[default]
    Meshbench,
    Envoy,
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyKind::Meshbench => "meshbench",
            ProxyKind::Envoy => "envoy",
        })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Local,
    Docker,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    #[serde(default)]
    pub proxy: ProxyKind,
    /// Pilot's debounce quiet period (default 100ms).
    pub debounce: Option<Dur>,
    /// The sidecars' ADS method: sotw (default) or delta.
    #[serde(default)]
    pub xds: XdsMode,
    /// Mutual TLS between the sidecars, as a mesh-wide PeerAuthentication in the root
    /// namespace: off (default: plaintext, the figures stay comparable with earlier runs),
    /// permissive (Istio's default: mutual TLS between sidecars, plaintext accepted) or
    /// strict (mutual TLS only).
    #[serde(default)]
    pub mtls: MtlsSetting,
    /// How apps reach their sidecars: explicit (default: apps send to the sidecar's 15001
    /// with the service as Host) or iptables (Istio's way, docker backend only: each service
    /// gets a virtual IP, apps call `SERVICE:PORT` by name and the pod's iptables rules take
    /// the connections to the sidecar; sidecars get Istio's captured listener layout).
    #[serde(default)]
    pub capture: CaptureMode,
    /// Run every sidecar under `meshbench agent` (pilot-agent's role: bootstrap, restarts,
    /// hot restarts, readiness on 15021, drain on termination). Default: on with
    /// `capture: iptables` and when a step needs it (`kill_sidecar`, `hot_restart`,
    /// `rolling_restart`), off otherwise (the sidecar process is the proxy itself).
    #[serde(default)]
    pub agent: Option<bool>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    #[default]
    Explicit,
    Iptables,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsSetting {
    #[default]
    Off,
    Permissive,
    Strict,
}

impl MtlsSetting {
    /// The mesh-wide PeerAuthentication that sets it.
    pub fn peer_authentication(self) -> String {
        let mode = match self {
            MtlsSetting::Off => "DISABLE",
            MtlsSetting::Permissive => "PERMISSIVE",
            MtlsSetting::Strict => "STRICT",
        };
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {}}}\nspec: {{mtls: {{mode: {mode}}}}}\n", crate::model::ROOT_NAMESPACE)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Kubernetes manifests (Services, Deployments); pods come from Deployments x replicas.
    pub manifests: Vec<String>,
    /// Istio config applied before the first step.
    #[serde(default)]
    pub config: Vec<String>,
    /// Workload behaviour by Deployment name, service (every version) or pod name, on top of
    /// the default (bookinfo's real apps for bookinfo's names; an echo otherwise).
    #[serde(default)]
    pub workloads: BTreeMap<String, WorkloadPatch>,
    /// Namespaces isolated in the network: on the docker backend each gets a bridge network
    /// of its own (pilot, gateways and the load client join them all); another tenant's pods
    /// are unreachable even by address.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// Changes to a workload's [`Behaviour`]: what is given replaces that field, the rest stays.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadPatch {
    /// Added to every response, after the calls.
    pub latency: Option<Dur>,
    /// Uniform extra latency in [0, jitter).
    pub jitter: Option<Dur>,
    pub response_size: Option<usize>,
    /// Fraction of requests answered with `error_status`.
    pub error_rate: Option<f64>,
    pub error_status: Option<u16>,
    /// Replaces the calls (an empty list calls nothing).
    pub calls: Option<Vec<CallSpec>>,
    pub mode: Option<CallMode>,
    pub on_failure: Option<OnFailure>,
}

/// One outbound call of a workload, as a scenario writes it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// `service:port`
    pub host: String,
    #[serde(default = "root")]
    pub path: String,
    /// Per attempt (default: none).
    pub timeout: Option<Dur>,
    /// Attempts in all (default 1).
    #[serde(default = "one")]
    pub attempts: u32,
}

fn one() -> u32 {
    1
}

impl WorkloadPatch {
    pub fn apply(&self, b: &mut Behaviour) {
        if let Some(d) = self.latency {
            b.latency = d.0;
        }
        if let Some(d) = self.jitter {
            b.jitter = d.0;
        }
        if let Some(n) = self.response_size {
            b.response_size = n;
        }
        if let Some(r) = self.error_rate {
            b.error_rate = r;
        }
        if let Some(s) = self.error_status {
            b.error_status = s;
        }
        if let Some(calls) = &self.calls {
            b.calls = calls
                .iter()
                .map(|c| Call {
                    host: c.host.clone(),
                    path: c.path.clone(),
                    timeout: c.timeout.map(|d| d.0),
                    attempts: c.attempts,
                    error_text: None,
                })
                .collect();
        }
        if let Some(m) = self.mode {
            b.mode = m;
        }
        if let Some(f) = self.on_failure {
            b.on_failure = f;
        }
    }

    /// Whether the patch can be applied: a bad fraction, status or call is refused here.
    fn check(&self) -> Result<(), String> {
        let mut b = Behaviour::default();
        self.apply(&mut b);
        b.check()
    }
}

/// Probing for data-plane propagation: after every `apply`, requests through the client
/// sidecar show when traffic follows the new rule.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// `service:port` the probes ask for.
    pub target: String,
    #[serde(default = "root")]
    pub path: String,
    /// The service whose versions the rule changes (counted from identity headers).
    pub service: String,
    /// How long to probe after each change (default 2s).
    pub window: Option<Dur>,
}

fn root() -> String {
    "/".into()
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn files(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadStep {
    /// Name used by `expect` and `wait_load` (default `load-N`).
    pub name: Option<String>,
    /// The Host header: `service:port` through the client sidecar, or a host a Gateway
    /// serves (`bookinfo.example.com`) with `via: gateway`.
    pub target: String,
    /// Where the load enters the mesh: the load client's sidecar (default) or the ingress
    /// gateway pod, on the listener its Service's port maps to.
    #[serde(default)]
    pub via: Via,
    #[serde(default = "root")]
    pub path: String,
    /// Requests per second (open loop); omit for closed-loop max throughput.
    pub rate: Option<f64>,
    #[serde(default = "four")]
    pub connections: usize,
    pub duration: Dur,
    /// Run while the following steps execute (a rollout under traffic).
    #[serde(default)]
    pub background: bool,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `http1` (default, keep-alive) or `http2` (h2c, prior knowledge).
    pub protocol: Option<String>,
}

fn four() -> usize {
    4
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    #[default]
    Sidecar,
    Gateway,
    /// Straight to the first pod of the target service, on its target port, in plaintext and
    /// with no identity: what a workload outside the mesh (or an attacker who knows the
    /// address) does. Under STRICT mTLS it must be refused.
    Direct,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub service: String,
    /// version -> percent
    pub versions: BTreeMap<String, f64>,
    /// Percentage points either way (default 5).
    pub tolerance: Option<f64>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub p50: Option<Dur>,
    pub p90: Option<Dur>,
    pub p99: Option<Dur>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PropagationBound {
    /// Bound on the p99 over proxies of change -> ACK for the latest apply.
    pub ack_p99: Option<Dur>,
    pub push_p99: Option<Dur>,
    pub data_plane: Option<Dur>,
}

/// A bound on a measured value: a number is the most allowed; `{min, max}` bounds it either
/// way.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Bound<T> {
    Max(T),
    Range(BoundRange<T>),
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoundRange<T> {
    pub min: Option<T>,
    pub max: Option<T>,
}

/// A share of a load's answers, in percent.
pub type Share = Bound<f64>;
/// A count of events.
pub type Count = Bound<u64>;

impl<T: PartialOrd + Copy + fmt::Display> Bound<T> {
    fn limits(&self) -> (Option<T>, Option<T>) {
        match *self {
            Bound::Max(m) => (None, Some(m)),
            Bound::Range(r) => (r.min, r.max),
        }
    }

    pub fn admits(&self, v: T) -> bool {
        let (lo, hi) = self.limits();
        lo.is_none_or(|m| v >= m) && hi.is_none_or(|m| v <= m)
    }

    /// `<= 5%`, `>= 1`, `25% to 60%`: the bound with `unit` after each number.
    pub fn describe(&self, unit: &str) -> String {
        match self.limits() {
            (Some(a), Some(b)) => format!("{a}{unit} to {b}{unit}"),
            (Some(a), None) => format!(">= {a}{unit}"),
            (None, Some(b)) => format!("<= {b}{unit}"),
            (None, None) => "any".into(),
        }
    }
}

impl Share {
    fn check(&self) -> Result<(), String> {
        let (lo, hi) = self.limits();
        let pct = |v: Option<f64>| v.is_none_or(|v| (0.0..=100.0).contains(&v));
        if !pct(lo) || !pct(hi) || lo.zip(hi).is_some_and(|(a, b)| a > b) {
            return Err(format!(
                "{}: percentages between 0 and 100, min <= max",
                self.describe("%")
            ));
        }
        Ok(())
    }
}

/// Bounds on the sidecars' counters over a load (report.json `phases[].mesh`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshBounds {
    pub retries: Option<Count>,
    pub overflows: Option<Count>,
    pub ejections: Option<Count>,
    pub rate_limited: Option<Count>,
    /// Requests the sidecars' authorization policies refused (`http.*.rbac.denied`).
    pub rbac_denied: Option<Count>,
}

/// Degraded answers: over all services, or per service.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Degraded {
    Any(Share),
    PerService(BTreeMap<String, Share>),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectStep {
    /// Which load the expectation reads (default: the latest started).
    pub load: Option<String>,
    /// Only the last `window` of the load (for a running background load).
    pub window: Option<Dur>,
    pub split: Option<Split>,
    /// Error rate in percent: a number is the largest (0 = not one failed request);
    /// `{min: 100}` says every request must fail (an attack that must be refused).
    pub errors: Option<Share>,
    /// Share of answers that were degraded (a number: at most that percent of all answers),
    /// or per service (`{reviews: 0}`: reviews was never missing from an answer).
    pub degraded: Option<Degraded>,
    /// Share of answers the mesh shed (429 rate limited, overflow 503 with
    /// `x-envoy-overloaded`), in percent.
    pub shed: Option<Share>,
    /// What the sidecars did during a finished load (counts summed over every sidecar).
    pub mesh: Option<MeshBounds>,
    /// Upper bounds on the load's latency percentiles.
    pub latency: Option<Latency>,
    /// Lower bounds (a timeout or a delay that must show: Istio's fault-injection task
    /// answers after about 6 s).
    pub latency_at_least: Option<Latency>,
    pub propagation: Option<PropagationBound>,
    /// TCP reachability between pods (docker backend): a probe from inside pod `from` to pod
    /// `to`'s listener must connect (`reachable: true`) or fail (`false`).
    #[serde(default)]
    pub network: Vec<Reach>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reach {
    pub from: String,
    pub to: String,
    pub reachable: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum FaultStep {
    /// Kill a pod (by pod name, or a Deployment's first pod): its processes stop and its
    /// endpoint is removed, as Kubernetes would.
    Kill(String),
    /// Kill a pod and start it again on the same addresses.
    Restart(String),
    /// Freeze a pod (docker: pause its containers; local: SIGSTOP); its endpoint stays.
    Pause(String),
    /// Thaw a paused pod.
    Unpause(String),
    /// Cut a pod off the network (docker only); its endpoint stays.
    Disconnect(String),
    /// Connect a cut-off pod again, on its old address (docker only).
    Reconnect(String),
    /// `stop` or `start` the control plane.
    ControlPlane(String),
    /// Kill a pod's proxy process (SIGKILL) and leave the rest to its agent, which starts it
    /// again; the report gives the time from the kill to the first request the pod serves
    /// through its sidecar again.
    KillSidecar(String),
    /// A bootstrap change: the pod's agent writes the next `envoy-revN.json` and hot-restarts
    /// Envoy with the next restart epoch (meshbench proxy reloads in process). No request
    /// should fail.
    HotRestart(String),
    /// Replace a Deployment's pods one at a time as Kubernetes' rolling update does with
    /// maxSurge 1, maxUnavailable 0: a new pod (new name, new address) starts and becomes
    /// ready, the old pod's endpoint is removed and every sidecar has ACKed that, then the old
    /// sidecar drains (its agent's SIGTERM) and the pod stops. No request should fail.
    RollingRestart(String),
}

impl FaultStep {
    /// Whether the fault acts on sidecar agents.
    pub fn needs_agent(&self) -> bool {
        matches!(
            self,
            FaultStep::KillSidecar(_) | FaultStep::HotRestart(_) | FaultStep::RollingRestart(_)
        )
    }
}

/// An endpoint churn with simulated proxies (`churn` step; run by `churn::run`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChurnSpec {
    /// Label in the report (default churn-N).
    pub name: Option<String>,
    pub services: usize,
    pub endpoints: usize,
    /// Changes per second (each one endpoint added, removed or flipped).
    pub rate: f64,
    pub duration: Dur,
    /// Simulated proxies subscribed during the churn.
    #[serde(default)]
    pub proxies: usize,
    #[serde(default)]
    pub xds: XdsMode,
    #[serde(default)]
    pub ack_delay: Option<Dur>,
    #[serde(default)]
    pub nack_fraction: f64,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Step {
    Apply(OneOrMany),
    WaitConverged(Dur),
    Load(LoadStep),
    Sleep(Dur),
    Expect(ExpectStep),
    Fault(FaultStep),
    WaitLoad(String),
    /// Endpoint churn with simulated proxies (see `churn`).
    Churn(ChurnSpec),
    /// Changes running workloads' behaviour (keys as `topology.workloads`).
    Workload(BTreeMap<String, WorkloadPatch>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    #[serde(default)]
    backend: BackendKind,
    mesh: Option<Mesh>,
    topology: Topology,
    probe: Option<Probe>,
    steps: Vec<Spanned<Step>>,
}

/// A validated scenario with paths resolved against the scenario file's folder.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    pub name: String,
    pub file: PathBuf,
    pub backend: BackendKind,
    pub mesh: Mesh,
    pub topology: Topology,
    pub probe: Option<Probe>,
    pub steps: Vec<Step>,
    /// Where each step starts in the file (line, column), for messages.
    #[serde(skip)]
    pub step_lines: Vec<(u64, u64)>,
}

/// A scenario problem, located in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for Error {}

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, Error> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: file.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Scenario::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Scenario, Error> {
        let file = path.display().to_string();
        let raw: RawScenario = serde_saphyr::from_str(text).map_err(|e| {
            let (mut line, mut column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let msg = e.without_snippet().to_string();
            // serde-saphyr appends the location to the message; keep the first line only.
            let mut msg = msg.lines().next().unwrap_or("").to_string();
            if let Some(i) = msg.find(LOCATED) {
                let rest = &msg[i + LOCATED.len()..];
                if let Some((at, text)) = rest.split_once(' ') {
                    if let Some((l, c)) = at.split_once(':') {
                        line = l.parse().unwrap_or(line);
                        column = c.parse().unwrap_or(column);
                    }
                    msg = format!("{}{}", &msg[..i], text);
                }
            }
            // An unknown key is reported where its mapping starts; point at the key itself.
            if let Some((l, c)) = unknown_key_position(text, &msg, line) {
                (line, column) = (l, c);
            }
            Error {
                file: file.clone(),
                line,
                column,
                message: msg,
            }
        })?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let step_lines: Vec<(u64, u64)> = raw
            .steps
            .iter()
            .map(|s| (s.referenced.line(), s.referenced.column()))
            .collect();
        let steps: Vec<Step> = raw.steps.into_iter().map(|s| s.value).collect();
        let at = |i: usize, message: String| Error {
            file: file.clone(),
            line: step_lines[i].0,
            column: step_lines[i].1,
            message,
        };
        let resolve = |f: &str| dir.join(f).display().to_string();
        let check_file = |f: &str| -> Result<String, String> {
            let p = resolve(f);
            if Path::new(&p).is_file() {
                Ok(p)
            } else {
                Err(format!("file {f:?} not found (paths are relative to the scenario file, resolved to {p})"))
            }
        };
        let top = |message: String| Error {
            file: file.clone(),
            line: 1,
            column: 1,
            message,
        };
        let mut topology = raw.topology.clone();
        topology.manifests = topology
            .manifests
            .iter()
            .map(|f| check_file(f).map_err(|m| top(format!("topology.manifests: {m}"))))
            .collect::<Result<_, _>>()?;
        topology.config = topology
            .config
            .iter()
            .map(|f| check_file(f).map_err(|m| top(format!("topology.config: {m}"))))
            .collect::<Result<_, _>>()?;
        if raw
            .mesh
            .as_ref()
            .and_then(|m| m.debounce)
            .is_some_and(|d| d.0 > MAX_DEBOUNCE)
        {
            return Err(top(format!(
                "mesh.debounce: at most {}s (pilot refuses longer)",
                MAX_DEBOUNCE.as_secs()
            )));
        }
        for (name, w) in &topology.workloads {
            w.check()
                .map_err(|m| top(format!("topology.workloads.{name}: {m}")))?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &topology.tenants {
            let label = !t.is_empty()
                && t.len() <= 63
                && t.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !t.starts_with('-')
                && !t.ends_with('-');
            if !label {
                return Err(top(format!(
                    "topology.tenants: {t:?} is not a namespace name (lowercase letters, digits and '-')"
                )));
            }
            if !seen.insert(t) {
                return Err(top(format!("topology.tenants: {t:?} is listed twice")));
            }
        }
        if topology.manifests.is_empty() {
            return Err(top(
                "topology.manifests: at least one manifest file is needed".into(),
            ));
        }
        let mut loads: Vec<String> = Vec::new();
        let mut resolved = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let step = match step {
                Step::Apply(files) => Step::Apply(OneOrMany::Many(
                    files
                        .files()
                        .iter()
                        .map(|f| check_file(f).map_err(|m| at(i, format!("apply: {m}"))))
                        .collect::<Result<_, _>>()?,
                )),
                Step::Load(mut l) => {
                    let name = l
                        .name
                        .clone()
                        .unwrap_or_else(|| format!("load-{}", loads.len() + 1));
                    if loads.contains(&name) {
                        return Err(at(i, format!("load: name {name:?} is used twice")));
                    }
                    if l.via == Via::Sidecar && !l.target.contains(':') {
                        return Err(at(
                            i,
                            format!("load.target: {:?} must be service:port", l.target),
                        ));
                    }
                    if l.protocol.as_deref().is_some_and(|p| p != "http1") {
                        return Err(at(
                            i,
                            "load.protocol: only http1 is supported by the generator so far".into(),
                        ));
                    }
                    if l.connections == 0 || l.rate.is_some_and(|r| r <= 0.0) {
                        return Err(at(i, "load: connections and rate must be positive".into()));
                    }
                    l.name = Some(name.clone());
                    loads.push(name);
                    Step::Load(l)
                }
                Step::Expect(e) => {
                    if let Some(name) = &e.load {
                        if !loads.contains(name) {
                            return Err(at(i, format!("expect.load: no load named {name:?} before this step (loads so far: {loads:?})")));
                        }
                    } else if (e.split.is_some()
                        || e.errors.is_some()
                        || e.latency.is_some()
                        || e.latency_at_least.is_some()
                        || e.degraded.is_some()
                        || e.shed.is_some()
                        || e.mesh.is_some())
                        && loads.is_empty()
                    {
                        return Err(at(
                            i,
                            "expect: a traffic expectation needs a load step before it".into(),
                        ));
                    }
                    if e.split.is_none()
                        && e.errors.is_none()
                        && e.latency.is_none()
                        && e.latency_at_least.is_none()
                        && e.propagation.is_none()
                        && e.degraded.is_none()
                        && e.shed.is_none()
                        && e.mesh.is_none()
                        && e.network.is_empty()
                    {
                        return Err(at(
                            i,
                            "expect: give at least one of split, errors, latency, latency_at_least, propagation, degraded, shed, mesh, network"
                                .into(),
                        ));
                    }
                    let shares = e
                        .shed
                        .iter()
                        .map(|s| ("shed", s))
                        .chain(e.errors.iter().map(|s| ("errors", s)))
                        .chain(match &e.degraded {
                            Some(Degraded::Any(s)) => vec![("degraded", s)],
                            Some(Degraded::PerService(m)) => {
                                m.values().map(|s| ("degraded", s)).collect()
                            }
                            None => vec![],
                        });
                    for (what, s) in shares {
                        s.check()
                            .map_err(|m| at(i, format!("expect.{what}: {m}")))?;
                    }
                    if let Some(s) = &e.split {
                        let sum: f64 = s.versions.values().sum();
                        if (sum - 100.0).abs() > 0.01 {
                            return Err(at(
                                i,
                                format!("expect.split.versions: percentages sum to {sum}, not 100"),
                            ));
                        }
                    }
                    Step::Expect(e)
                }
                Step::WaitLoad(name) => {
                    if !loads.contains(&name) {
                        return Err(at(
                            i,
                            format!("wait_load: no load named {name:?} before this step"),
                        ));
                    }
                    Step::WaitLoad(name)
                }
                Step::Churn(c) => {
                    let bad = if c.services == 0 || c.endpoints < c.services {
                        Some("churn: services must be at least 1 and endpoints at least services")
                    } else if c.rate <= 0.0 || c.rate > 10_000.0 {
                        Some("churn.rate: changes per second in (0, 10000]")
                    } else if !(0.0..=1.0).contains(&c.nack_fraction) {
                        Some("churn.nack_fraction: a fraction in [0, 1]")
                    } else if c.proxies > 20_000 {
                        Some("churn.proxies: at most 20000 simulated proxies")
                    } else {
                        None
                    };
                    if let Some(m) = bad {
                        return Err(at(i, m.into()));
                    }
                    Step::Churn(c)
                }
                Step::Workload(w) => {
                    if w.is_empty() {
                        return Err(at(i, "workload: name at least one workload".into()));
                    }
                    for (name, p) in &w {
                        p.check()
                            .map_err(|m| at(i, format!("workload.{name}: {m}")))?;
                    }
                    Step::Workload(w)
                }
                Step::Fault(f)
                    if f.needs_agent()
                        && raw.mesh.as_ref().and_then(|m| m.agent) == Some(false) =>
                {
                    let kind = match f {
                        FaultStep::KillSidecar(_) => "kill_sidecar",
                        FaultStep::HotRestart(_) => "hot_restart",
                        _ => "rolling_restart",
                    };
                    return Err(at(
                        i,
                        format!("fault.{kind}: acts on the sidecars' agent, and mesh.agent is false (remove it or set it true)"),
                    ));
                }
                Step::Fault(FaultStep::ControlPlane(a)) if a != "stop" && a != "start" => {
                    return Err(at(
                        i,
                        format!("fault.control_plane: expected stop or start, got {a:?}"),
                    ));
                }
                other => other,
            };
            resolved.push(step);
        }
        let name = raw.name.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "scenario".into())
        });
        Ok(Scenario {
            name,
            file: path.to_path_buf(),
            backend: raw.backend,
            mesh: raw.mesh.unwrap_or(Mesh {
                proxy: ProxyKind::Meshbench,
                debounce: None,
                xds: Default::default(),
                mtls: Default::default(),
                capture: Default::default(),
                agent: None,
            }),
            topology,
            probe: raw.probe,
            steps: resolved,
            step_lines,
        })
    }

    /// Whether sidecars run under `meshbench agent`: `mesh.agent` when set, else with
    /// capture or when a fault step needs it.
    pub fn agent(&self) -> bool {
        self.mesh.agent.unwrap_or_else(|| {
            self.mesh.capture == CaptureMode::Iptables
                || self
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::Fault(f) if f.needs_agent()))
        })
    }

    /// Shortens every duration (loads, sleeps, windows, probe windows) by `factor`, for CI.
    pub fn quick(&mut self, factor: f64) {
        let scale = |d: &mut Dur| d.0 = d.0.mul_f64(factor);
        for s in &mut self.steps {
            match s {
                Step::Load(l) => scale(&mut l.duration),
                Step::Sleep(d) => scale(d),
                // A reduced churn: a tenth of the proxies and endpoints.
                Step::Churn(c) => {
                    scale(&mut c.duration);
                    c.proxies = c.proxies.div_ceil(10);
                    c.endpoints = (c.endpoints / 10).max(c.services);
                }
                Step::Expect(e) => {
                    if let Some(w) = &mut e.window {
                        scale(w);
                    }
                }
                _ => {}
            }
        }
        if let Some(Some(w)) = self.probe.as_mut().map(|p| p.window.as_mut()) {
            scale(w);
        }
    }
}

/// Where the key named in an "unknown field `KEY`" message is, at or after line `from` (1-based):
/// the first line holding `KEY:` as a key (also after `- ` or `{`).
fn unknown_key_position(text: &str, msg: &str, from: u64) -> Option<(u64, u64)> {
    let key = msg.split("unknown field `").nth(1)?.split('`').next()?;
    let pattern = format!("{key}:");
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1) as usize)
        .find_map(|(i, l)| {
            let col = l.find(&pattern)?;
            let before = l[..col].trim_end();
            let is_key = before.is_empty()
                || before.ends_with('-')
                || before.ends_with('{')
                || before.ends_with(',');
            is_key.then_some((i as u64 + 1, col as u64 + 1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, Error> {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        Scenario::parse(&dir.join("t.yaml"), text)
    }

    const TOP: &str = "topology:\n  manifests: [../fixtures/bookinfo/bookinfo.yaml]\n";

    #[test]
    fn unknown_keys_are_located() {
        let e = parse(&format!(
            "{TOP}steps:\n  - sleep: 1s\n  - lod:\n      target: productpage:9080\n"
        ))
        .unwrap_err();
        assert_eq!((e.line, e.column), (5, 5), "{e}");
        assert!(e.message.contains("lod"), "{e}");
    }

    #[test]
    fn unknown_top_level_keys_are_located_on_their_line() {
        let e = parse(&format!("name: x\n{TOP}stepz:\n  - sleep: 1s\n")).unwrap_err();
        assert_eq!((e.line, e.column), (4, 1), "{e}");
        assert!(e.message.contains("stepz"), "{e}");
        let e = parse(&format!(
            "{TOP}steps:\n  - load: {{target: p:9080, duratoin: 1s}}\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("duratoin"), "{e}");
    }

    #[test]
    fn lifecycle_faults_turn_the_agent_on_unless_it_is_off() {
        let s = parse(&format!(
            "{TOP}steps:\n  - fault: {{kill_sidecar: details-v1}}\n"
        ))
        .unwrap();
        assert!(s.agent());
        let s = parse(&format!("{TOP}steps:\n  - fault: {{kill: details-v1}}\n")).unwrap();
        assert!(!s.agent());
        let s = parse(&format!(
            "mesh: {{capture: iptables}}\n{TOP}steps:\n  - sleep: 1s\n"
        ))
        .unwrap();
        assert!(
            s.agent(),
            "capture runs sidecars under the agent, as Istio does"
        );
        let e = parse(&format!(
            "mesh: {{agent: false}}\n{TOP}steps:\n  - sleep: 1s\n  - fault: {{rolling_restart: reviews-v1}}\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(
            e.message.contains("fault.rolling_restart")
                && e.message.contains("mesh.agent is false"),
            "{e}"
        );
    }

    #[test]
    fn bad_durations_are_located() {
        let e = parse(&format!("{TOP}steps:\n  - sleep: 5 seconds\n")).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("expected a duration"), "{e}");
    }

    #[test]
    fn dangling_references_are_located() {
        let e = parse(&format!(
            "{TOP}steps:\n  - sleep: 1s\n  - expect: {{load: traffic, errors: 0}}\n"
        ))
        .unwrap_err();
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("no load named \"traffic\""), "{e}");
        let e = parse(&format!("{TOP}steps:\n  - apply: nope.yaml\n")).unwrap_err();
        assert_eq!(e.line, 4, "{e}");
        assert!(e.message.contains("not found"), "{e}");
    }

    #[test]
    fn quick_scales_durations() {
        let mut s = parse(&format!("{TOP}steps:\n  - load: {{target: productpage:9080, duration: 40s, background: true}}\n  - sleep: 10s\n")).unwrap();
        s.quick(0.5);
        assert!(matches!(&s.steps[0], Step::Load(l) if l.duration.0 == Duration::from_secs(20)));
        assert!(matches!(&s.steps[1], Step::Sleep(d) if d.0 == Duration::from_secs(5)));
    }
}
