//! `meshbench run`: executes a scenario on a backend, step by step, and produces the report.
//! Expectations that fail are recorded and the run goes on; the exit code says whether all
//! passed (0), one failed (1), the scenario was bad (2) or the environment was (3).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::task::JoinHandle;

use crate::backend::docker::DockerBackend;
use crate::backend::local::LocalBackend;
use crate::backend::{self, Backend, Mesh, Options};
use crate::clock::now_ms;
use crate::load::{self, Live, LoadResult, LoadSpec};
use crate::measure::proc_stats;
use crate::pilot_client::{HttpClient, PilotApi};
use crate::report::{self, Dist, Expectation, MeshCounts, Phase, PhaseLoad, Propagation, Report};
use crate::scenario::{
    BackendKind, Degraded, ExpectStep, FaultStep, ProxyKind, Scenario, Share, Step, Via,
};
use crate::shutdown::Shutdown;
use crate::sim::SIM_NAMESPACE;

/// How long a change may take to reach every proxy before the run calls the mesh stuck.
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub backend: Option<BackendKind>,
    pub proxy: Option<ProxyKind>,
    /// Overrides the scenario's `mesh.mtls`.
    pub mtls: Option<crate::scenario::MtlsSetting>,
    /// Overrides the scenario's `mesh.capture`.
    pub capture: Option<crate::scenario::CaptureMode>,
    pub out: Option<PathBuf>,
    pub quick: bool,
    /// Docker backend: leave the containers for debugging.
    pub keep: bool,
    pub meshbench_exe: PathBuf,
    pub envoy: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Environment(String),
    #[error("interrupted")]
    Interrupted,
}

impl From<backend::Error> for Error {
    fn from(e: backend::Error) -> Self {
        match e {
            backend::Error::Config(m) => Error::BadInput(m),
            backend::Error::Environment(m) => Error::Environment(m),
        }
    }
}

struct RunningLoad {
    target: String,
    /// The sidecars' counters when the load started.
    mesh_before: MeshCounts,
    live: Arc<Live>,
    task: Option<JoinHandle<LoadResult>>,
    result: Option<LoadResult>,
}

struct Runner<'a> {
    scenario: &'a Scenario,
    b: Mesh,
    loads: BTreeMap<String, RunningLoad>,
    load_order: Vec<String>,
    report: Report,
    /// Propagation measurements under way, one per apply.
    pending: Vec<JoinHandle<Propagation>>,
    /// The synthetic mesh churn steps registered.
    churn: crate::churn::Registered,
}

/// Runs `scenario`; returns the report and the directory it was written to.
pub async fn run(
    mut scenario: Scenario,
    opts: RunOptions,
    shutdown: Shutdown,
) -> Result<(Report, PathBuf), Error> {
    let backend = opts.backend.unwrap_or(scenario.backend);
    if let Some(c) = opts.capture {
        scenario.mesh.capture = c;
    }
    if backend == BackendKind::Local {
        if let Some(i) = scenario.steps.iter().position(|s| {
            matches!(
                s,
                Step::Fault(FaultStep::Disconnect(_) | FaultStep::Reconnect(_))
            )
        }) {
            return Err(Error::BadInput(format!(
                "{}:{}: fault: network partitions need the docker backend (--backend docker)",
                scenario.file.display(),
                scenario.step_lines.get(i).map_or(0, |l| l.0)
            )));
        }
        if !scenario.topology.tenants.is_empty() {
            return Err(Error::BadInput(format!(
                "{}: topology.tenants (a network per tenant) needs the docker backend (--backend docker); the local backend shares the host's network",
                scenario.file.display()
            )));
        }
        if scenario.mesh.capture == crate::scenario::CaptureMode::Iptables {
            return Err(Error::BadInput(format!(
                "{}: mesh.capture: iptables needs the docker backend (--backend docker): capture rules live in a pod's own network namespace, and local pods share the host's",
                scenario.file.display()
            )));
        }
    }
    if let Some(p) = opts.proxy {
        scenario.mesh.proxy = p;
    }
    if let Some(m) = opts.mtls {
        scenario.mesh.mtls = m;
    }

    if opts.quick {
        scenario.quick(QUICK_FACTOR);
    }
    let run_id = format!("{}-{}", unix_seconds(), std::process::id());
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("reports").join(&scenario.name).join(&run_id));
    let backend_opts = Options {
        proxy: scenario.mesh.proxy,
        debounce: scenario
            .mesh
            .debounce
            .map_or(crate::pilot::DEFAULT_DEBOUNCE, |d| d.0),
        meshbench_exe: opts.meshbench_exe.clone(),
        envoy: opts.envoy.clone(),
        log_dir: out.join("logs"),
        run_id: run_id.clone(),
        xds: scenario.mesh.xds,
        keep: opts.keep,
        tenants: scenario.topology.tenants.clone(),
        capture: scenario.mesh.capture == crate::scenario::CaptureMode::Iptables,
        agent: scenario.agent(),
    };
    // The effective scenario (defaults applied, --quick and --proxy folded in) beside the report.
    std::fs::create_dir_all(&out)
        .map_err(|e| Error::Environment(format!("cannot create {}: {e}", out.display())))?;
    let _ = std::fs::write(
        out.join("scenario.json"),
        serde_json::to_string_pretty(&scenario).unwrap_or_default(),
    );
    let started = Instant::now();
    let started_ms = now_ms();
    let work = async {
        eprintln!(
            "meshbench: {}: starting the mesh with {} sidecars on the {} backend (logs in {})",
            scenario.name,
            scenario.mesh.proxy,
            match backend {
                BackendKind::Local => "local",
                BackendKind::Docker => "docker",
            },
            out.join("logs").display()
        );
        let (manifests, config) = (&scenario.topology.manifests, &scenario.topology.config);
        let log_dir = backend_opts.log_dir.clone();
        let substrate: Box<dyn Backend> = match backend {
            BackendKind::Local => Box::new(LocalBackend::new(backend_opts)),
            BackendKind::Docker => Box::new(DockerBackend::new(backend_opts).await?),
        };
        let b = Mesh::start(
            substrate,
            log_dir,
            manifests,
            config,
            &scenario.topology.workloads,
            scenario.mesh.mtls,
        )
        .await?;
        eprintln!(
            "meshbench: {} pods up in {:.1} s; running {} steps",
            b.pods.len(),
            started.elapsed().as_secs_f64(),
            scenario.steps.len()
        );
        let (backend_name, engine) = (b.name(), b.engine());
        let mut r = Runner {
            scenario: &scenario,
            b,
            loads: BTreeMap::new(),
            load_order: vec![],
            report: Report {
                schema_version: report::SCHEMA_VERSION,
                scenario: scenario.name.clone(),
                backend: backend_name.into(),
                engine,
                proxy: scenario.mesh.proxy.to_string(),
                meshbench_version: env!("CARGO_PKG_VERSION").into(),
                commit: option_env!("MESHBENCH_COMMIT").unwrap_or("unknown").into(),
                machine: crate::measure::machine(),
                started_at_ms: started_ms,
                quick: opts.quick,
                ..Default::default()
            },
            pending: vec![],
            churn: Default::default(),
        };
        r.wait_converged(CONVERGE_LIMIT, None).await?;
        for (i, step) in scenario.steps.iter().enumerate() {
            r.step(i, step).await?;
        }
        r.finish().await
    };
    let mut report = tokio::select! {
        r = work => r?,
        _ = shutdown.wait() => return Err(Error::Interrupted),
    };
    report.duration_s = started.elapsed().as_secs_f64();
    report.passed = report.expectations.iter().all(|e| e.passed);
    report::write(&report, &out).map_err(|e| {
        Error::Environment(format!("cannot write the report to {}: {e}", out.display()))
    })?;
    Ok((report, out))
}

/// Durations under `--quick`: half, which keeps a 50/50 split check over a few hundred
/// requests statistically sound.
pub const QUICK_FACTOR: f64 = 0.5;

/// Percentage points that sampling alone moves a share of `want` percent by over `n`
/// requests, at 99.9% two-sided (3.29 standard deviations of a binomial proportion). Zero for
/// shares of 0 or 100, which a correct router never misses.
fn sampling_spread(want: f64, n: u64) -> f64 {
    let p = (want / 100.0).clamp(0.0, 1.0);
    if n == 0 {
        return 0.0;
    }
    3.29 * 100.0 * (p * (1.0 - p) / n as f64).sqrt()
}

fn unix_seconds() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{s}")
}

impl Runner<'_> {
    fn line(&self, i: usize) -> String {
        let (l, c) = self.scenario.step_lines.get(i).copied().unwrap_or((0, 0));
        format!("{}:{l}:{c}", self.scenario.file.display())
    }

    async fn step(&mut self, i: usize, step: &Step) -> Result<(), Error> {
        eprintln!(
            "meshbench: step {} ({}): {}",
            i + 1,
            self.line(i),
            describe(step)
        );
        match step {
            Step::Apply(files) => {
                for f in files.files() {
                    self.apply(&f).await?;
                }
            }
            Step::WaitConverged(d) => {
                if let Err(e) = self.wait_converged(d.0, None).await {
                    self.expect_failed(
                        i,
                        "every proxy ACKs the latest config",
                        &format!("within {:?}", d.0),
                        &e.to_string(),
                    );
                }
            }
            Step::Sleep(d) => tokio::time::sleep(d.0).await,
            Step::Load(l) => {
                let name = l.name.clone().expect("named when parsed");
                let live = Arc::new(Live::default());
                let spec = LoadSpec {
                    target: match l.via {
                        Via::Sidecar => self.b.client_outbound()?,
                        Via::Gateway => self.b.gateway()?,
                        Via::Direct => self.b.direct(&l.target)?,
                    },
                    host: l.target.clone(),
                    path: l.path.clone(),
                    connections: l.connections,
                    duration: l.duration.0,
                    rate: l.rate,
                    headers: l
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    http2: l.protocol.as_deref() == Some("http2"),
                    live: Some(live.clone()),
                };
                let mesh_before = self.mesh_counts().await;
                let task = tokio::spawn(load::run(spec));
                self.load_order.push(name.clone());
                self.loads.insert(
                    name.clone(),
                    RunningLoad {
                        target: l.target.clone(),
                        mesh_before,
                        live,
                        task: Some(task),
                        result: None,
                    },
                );
                if !l.background {
                    self.finish_load(&name).await;
                }
            }
            Step::WaitLoad(name) => self.finish_load(name).await,
            Step::Expect(e) => self.expect(i, e).await,
            Step::Fault(f) => {
                if let Some(mut ev) = self.b.fault(f).await? {
                    ev.step = i + 1;
                    eprintln!("meshbench:   {}", ev.line());
                    self.report.lifecycle.push(ev);
                }
            }
            Step::Workload(w) => self.b.set_behaviour(w).await?,
            Step::Churn(c) => {
                let name = c
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("churn-{}", self.report.churn.len() + 1));
                let pid = self.b.pilot_pid();
                let usage = move || pid.and_then(proc_stats).map(|s| (s.cpu_s, s.rss_mb));
                let xds = self.b.pilot_xds();
                let sidecar_admins = self.b.sidecar_admins();
                let mut target = crate::churn::Target {
                    pilot: self.b.pilot_mut(),
                    xds,
                    usage: &usage,
                    sidecar_admins,
                };
                let say = |m: String| eprintln!("meshbench:   {m}");
                let r = crate::churn::run(&mut target, c, &mut self.churn, name, &say).await?;
                eprintln!("meshbench:   {}", report::churn_line(&r));
                self.report.churn.push(r);
            }
        }
        Ok(())
    }

    /// The sidecars' retry, overflow, ejection and rate-limit counters, summed.
    async fn mesh_counts(&self) -> MeshCounts {
        let http = HttpClient {
            timeout: Duration::from_secs(2),
        };
        let mut m = MeshCounts::default();
        for admin in self.b.sidecar_admins() {
            if let Ok(r) = http.request(admin, "GET", "/stats", &[], "").await {
                m.add_stats(&String::from_utf8_lossy(&r.body));
            }
        }
        m
    }

    async fn finish_load(&mut self, name: &str) {
        let Some(task) = self.loads.get_mut(name).and_then(|l| l.task.take()) else {
            return;
        };
        let Ok(r) = task.await else { return };
        let after = self.mesh_counts().await;
        let Some(l) = self.loads.get_mut(name) else {
            return;
        };
        self.report.phases.push(Phase {
            name: name.to_string(),
            load: PhaseLoad {
                target: l.target.clone(),
                result: r.clone(),
            },
            mesh: after.since(&l.mesh_before),
        });
        l.result = Some(r);
    }

    async fn apply(&mut self, file: &str) -> Result<(), Error> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::BadInput(format!("cannot read {file}: {e}")))?;
        // Probes start before the change so the old rule's traffic is seen first.
        let probe = self
            .scenario
            .probe
            .clone()
            .map(|p| {
                let window = p.window.map_or(Duration::from_secs(2), |w| w.0);
                // Through the load client's sidecar; with capture, a pod of the target service
                // (its inbound is captured to its sidecar).
                let target = self
                    .b
                    .client_outbound()
                    .or_else(|_| self.b.direct(&p.target))
                    .ok()?;
                Some(tokio::spawn(probe(
                    target,
                    p.target.clone(),
                    p.path.clone(),
                    p.service.clone(),
                    window + Duration::from_millis(300),
                )))
            })
            .flatten();
        if probe.is_some() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let applied = self.b.pilot_mut().apply(file, &text).await?;
        let (version, accepted_at) = (
            applied.version,
            applied.accepted_at_ms.unwrap_or_else(now_ms),
        );
        let change = std::path::Path::new(file)
            .file_name()
            .map_or(file.to_string(), |n| n.to_string_lossy().into_owned());
        let api = self.b.pilot().clone();
        let nodes = self.b.node_ids();
        self.pending.push(tokio::spawn(async move {
            let mut p = propagation(&api, nodes, change, version, accepted_at).await;
            if let Some(probe) = probe {
                if let Ok(samples) = probe.await {
                    p.data_plane_ms =
                        data_plane_ms(&samples, accepted_at).and_then(|v| Dist::of(&[v]));
                }
            }
            p
        }));
        Ok(())
    }

    /// Waits until every running proxy has ACKed `version` (default: the latest).
    async fn wait_converged(&self, limit: Duration, version: Option<u64>) -> Result<(), Error> {
        let version = match version {
            Some(v) => v,
            None => self.b.pilot().version().await?,
        };
        Ok(self.b.wait_acked(version, limit).await?)
    }

    fn expect_failed(&mut self, step: usize, description: &str, expected: &str, measured: &str) {
        self.report.expectations.push(Expectation {
            step: step + 1,
            description: description.into(),
            expected: expected.into(),
            measured: measured.into(),
            passed: false,
        });
    }

    async fn expect(&mut self, i: usize, e: &ExpectStep) {
        let mut results: Vec<Expectation> = Vec::new();
        let mut push = |description: String, expected: String, measured: String, passed: bool| {
            results.push(Expectation {
                step: i + 1,
                description,
                expected,
                measured,
                passed,
            });
        };
        let name = e.load.clone().or_else(|| self.load_order.last().cloned());
        let window = e.window.map(|w| w.0);
        if let Some(l) = name.as_ref().and_then(|n| self.loads.get(n)) {
            let n = name.as_deref().unwrap_or("");
            let counts = match (&l.result, window) {
                (Some(r), None) => load::Counts::of(r),
                _ => l.live.totals(window),
            };
            let scope = window.map_or(format!("load {n}"), |w| format!("load {n}, last {w:?}"));
            if let Some(s) = &e.split {
                let tol = s.tolerance.unwrap_or(5.0);
                let prefix = format!("{}-", s.service);
                let total: u64 = counts
                    .versions
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .map(|(_, v)| v)
                    .sum();
                let share = |v: &str| {
                    if total == 0 {
                        0.0
                    } else {
                        100.0
                            * counts
                                .versions
                                .get(&format!("{prefix}{v}"))
                                .copied()
                                .unwrap_or(0) as f64
                            / total as f64
                    }
                };
                let mut seen: BTreeMap<String, f64> = counts
                    .versions
                    .keys()
                    .filter_map(|k| k.strip_prefix(&prefix))
                    .map(|v| (v.to_string(), share(v)))
                    .collect();
                for v in s.versions.keys() {
                    seen.entry(v.clone()).or_insert(0.0);
                }
                // The tolerance, widened to what sampling alone can move a share by (3.29
                // binomial standard deviations: a correct 50/50 split over 300 requests fails
                // one check in a thousand, not one in two hundred as with +-8 alone).
                let allowed = |want: f64| tol.max(sampling_spread(want, total));
                let passed = total > 0
                    && seen.iter().all(|(v, got)| {
                        let want = s.versions.get(v).copied().unwrap_or(0.0);
                        (got - want).abs() <= allowed(want)
                    });
                let widest = s.versions.values().map(|w| allowed(*w)).fold(tol, f64::max);
                let fmt = |m: &BTreeMap<String, f64>| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v:.1}%"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                push(
                    format!("{} split ({scope}, {total} requests)", s.service),
                    if widest > tol {
                        format!("{} (+-{tol}, +-{widest:.1} for sampling)", fmt(&s.versions))
                    } else {
                        format!("{} (+-{tol})", fmt(&s.versions))
                    },
                    fmt(&seen),
                    passed,
                );
            }
            if let Some(bound) = e.errors {
                let rate = if counts.requests == 0 {
                    0.0
                } else {
                    100.0 * counts.errors as f64 / counts.requests as f64
                };
                push(
                    format!("error rate ({scope})"),
                    bound.describe("%"),
                    format!("{rate:.3}% ({} of {})", counts.errors, counts.requests),
                    counts.requests > 0 && bound.admits(rate),
                );
            }
            let share = |n: u64| {
                if counts.requests == 0 {
                    0.0
                } else {
                    100.0 * n as f64 / counts.requests as f64
                }
            };
            let degraded: Vec<(String, Share, u64)> = match &e.degraded {
                Some(Degraded::Any(s)) => vec![("".into(), *s, counts.degraded_requests)],
                Some(Degraded::PerService(m)) => m
                    .iter()
                    .map(|(svc, s)| {
                        (
                            svc.clone(),
                            *s,
                            counts.degraded.get(svc).copied().unwrap_or(0),
                        )
                    })
                    .collect(),
                None => vec![],
            };
            for (svc, bound, n) in degraded {
                let what = if svc.is_empty() {
                    "degraded answers".to_string()
                } else {
                    format!("answers with {svc} degraded")
                };
                push(
                    format!("{what} ({scope})"),
                    bound.describe("%"),
                    format!("{:.3}% ({n} of {})", share(n), counts.requests),
                    counts.requests > 0 && bound.admits(share(n)),
                );
            }
            if let Some(bound) = &e.shed {
                push(
                    format!("shed answers, 429 and overflow 503 ({scope})"),
                    bound.describe("%"),
                    format!(
                        "{:.3}% ({} of {})",
                        share(counts.shed),
                        counts.shed,
                        counts.requests
                    ),
                    counts.requests > 0 && bound.admits(share(counts.shed)),
                );
            }
            if let Some(mb) = &e.mesh {
                let phase = self
                    .report
                    .phases
                    .iter()
                    .rev()
                    .find(|p| Some(&p.name) == name.as_ref());
                match phase {
                    Some(p) => {
                        for (what, bound, got) in [
                            ("retries", mb.retries, p.mesh.retries),
                            ("overflows", mb.overflows, p.mesh.overflows),
                            ("ejections", mb.ejections, p.mesh.ejections),
                            ("rate limited", mb.rate_limited, p.mesh.rate_limited),
                            ("RBAC denials", mb.rbac_denied, p.mesh.rbac_denied),
                        ] {
                            if let Some(b) = bound {
                                push(
                                    format!("sidecar {what} (load {n})"),
                                    b.describe(""),
                                    got.to_string(),
                                    b.admits(got),
                                );
                            }
                        }
                    }
                    None => push(
                        format!("sidecar counters (load {n})"),
                        "a finished load".into(),
                        "still running: add wait_load before this expectation".into(),
                        false,
                    ),
                }
            }
            for (lat, at_least) in [(&e.latency, false), (&e.latency_at_least, true)] {
                let Some(lat) = lat else { continue };
                match &l.result {
                    Some(r) => {
                        for (q, bound, got) in [
                            ("p50", lat.p50, r.latency_ms.p50),
                            ("p90", lat.p90, r.latency_ms.p90),
                            ("p99", lat.p99, r.latency_ms.p99),
                        ] {
                            if let Some(b) = bound {
                                let bound_ms = b.0.as_secs_f64() * 1000.0;
                                push(
                                    format!("latency {q} (load {n})"),
                                    format!(
                                        "{} {bound_ms:.1} ms",
                                        if at_least { ">=" } else { "<=" }
                                    ),
                                    format!("{got:.2} ms"),
                                    if at_least {
                                        got >= bound_ms
                                    } else {
                                        got <= bound_ms
                                    },
                                );
                            }
                        }
                    }
                    None => push(
                        format!("latency (load {n})"),
                        "a finished load".into(),
                        "still running: add wait_load before this expectation".into(),
                        false,
                    ),
                }
            }
        }
        if let Some(pb) = &e.propagation {
            let latest = self.pending.pop();
            let p = match latest {
                Some(t) => t.await.ok(),
                None => None,
            };
            match p {
                None => push(
                    "propagation".into(),
                    "an apply step before".into(),
                    "none".into(),
                    false,
                ),
                Some(p) => {
                    for (what, bound, d) in [
                        (
                            "change -> ACK p99",
                            pb.ack_p99,
                            p.ack_ms.as_ref().map(|d| d.p99),
                        ),
                        (
                            "change -> push p99",
                            pb.push_p99,
                            p.push_ms.as_ref().map(|d| d.p99),
                        ),
                        (
                            "change -> data plane",
                            pb.data_plane,
                            p.data_plane_ms.as_ref().map(|d| d.p50),
                        ),
                    ] {
                        if let Some(b) = bound {
                            let bound_ms = b.0.as_secs_f64() * 1000.0;
                            let measured =
                                d.map_or("not measured".into(), |v| format!("{v:.1} ms"));
                            push(
                                format!("{what} ({})", p.change),
                                format!("<= {bound_ms:.0} ms"),
                                measured,
                                d.is_some_and(|v| v <= bound_ms),
                            );
                        }
                    }
                    self.report.propagation.push(p);
                }
            }
        }
        for n in &e.network {
            let want = if n.reachable {
                "connects"
            } else {
                "refused or unreachable"
            };
            let (measured, passed) = match self.b.reach(&n.from, &n.to).await {
                Ok((got, addr)) => (
                    format!(
                        "{} ({addr})",
                        if got {
                            "connects"
                        } else {
                            "refused or unreachable"
                        }
                    ),
                    got == n.reachable,
                ),
                Err(err) => (format!("not probed: {err}"), false),
            };
            push(
                format!("TCP from pod {} to pod {}", n.from, n.to),
                want.into(),
                measured,
                passed,
            );
        }
        for r in &results {
            eprintln!(
                "meshbench:   [{}] {}: expected {}, measured {}",
                if r.passed { "ok" } else { "FAIL" },
                r.description,
                r.expected,
                r.measured
            );
        }
        self.report.expectations.extend(results);
    }

    async fn finish(mut self) -> Result<Report, Error> {
        let names: Vec<String> = self.load_order.clone();
        for n in names {
            self.finish_load(&n).await;
        }
        for t in self.pending.drain(..) {
            if let Ok(p) = t.await {
                self.report.propagation.push(p);
            }
        }
        self.report.propagation.sort_by_key(|p| p.version);
        self.report.resources = self.b.resources().await;
        Ok(self.report)
    }
}

fn describe(step: &Step) -> String {
    match step {
        Step::Apply(f) => format!(
            "apply {}",
            f.files()
                .iter()
                .map(|f| std::path::Path::new(f)
                    .file_name()
                    .map_or(f.clone(), |n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Step::WaitConverged(d) => format!("wait until every proxy ACKs (up to {:?})", d.0),
        Step::Load(l) => format!(
            "load {} -> {}{} for {:?}{}",
            l.name.as_deref().unwrap_or(""),
            l.target,
            l.path,
            l.duration.0,
            if l.background { " (background)" } else { "" }
        ),
        Step::Sleep(d) => format!("sleep {:?}", d.0),
        Step::Expect(_) => "expect".into(),
        Step::Fault(f) => format!("fault {f:?}"),
        Step::WaitLoad(n) => format!("wait for load {n}"),
        Step::Workload(w) => format!("workload {}", serde_json::to_string(w).unwrap_or_default()),
        Step::Churn(c) => format!(
            "churn {} endpoints in {} services, {}/s for {:?}, {} simulated proxies ({})",
            c.endpoints, c.services, c.rate, c.duration.0, c.proxies, c.xds
        ),
    }
}

/// Per-proxy push and ACK times for `version`, from pilot's history.
async fn propagation(
    api: &PilotApi,
    nodes: Vec<String>,
    change: String,
    version: u64,
    accepted_at: f64,
) -> Propagation {
    let start = Instant::now();
    let mut proxies = Vec::new();
    while start.elapsed() < CONVERGE_LIMIT {
        proxies = api.proxies(Some(SIM_NAMESPACE)).await.unwrap_or_default();
        if nodes
            .iter()
            .all(|n| crate::backend::lifecycle::synced(&proxies, n, version))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut push = Vec::new();
    let mut ack = Vec::new();
    for p in proxies.iter().filter(|p| nodes.contains(&p.node.id)) {
        // The first version at or after this change that the proxy was sent.
        if let Some(h) = p.history.iter().find(|h| h.version >= version) {
            push.push(h.pushed_at_ms - accepted_at);
            if let Some(t) = h.acked_at_ms {
                ack.push(t - accepted_at);
            }
        }
    }
    Propagation {
        change,
        version,
        proxies: ack.len(),
        push_ms: Dist::of(&push),
        ack_ms: Dist::of(&ack),
        data_plane_ms: None,
        ack_samples_ms: ack,
    }
}

/// One probe answer: when it completed (wall ms) and the versions of the probed service in it.
type ProbeSample = (f64, Vec<String>);

/// Sequential requests through the client sidecar for `window`.
async fn probe(
    target: std::net::SocketAddr,
    host: String,
    path: String,
    service: String,
    window: Duration,
) -> Vec<ProbeSample> {
    // The generator reports aggregates; probes need each answer, so they use their own loop.
    let mut out = Vec::new();
    let end = Instant::now() + window;
    let prefix = format!("{service}-");
    let stream = tokio::net::TcpStream::connect(target).await;
    let Ok(stream) = stream else { return out };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await
    else {
        return out;
    };
    tokio::spawn(conn);
    while Instant::now() < end {
        if sender.ready().await.is_err() {
            break;
        }
        let req = hyper::Request::builder()
            .uri(path.as_str())
            .header("host", host.as_str())
            .body(http_body_util::Empty::new())
            .expect("valid request");
        let Ok(resp) = sender.send_request(req).await else {
            break;
        };
        let versions = crate::workload::identities(resp.headers())
            .filter(|s| s.starts_with(&prefix))
            .map(String::from)
            .collect();
        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
        out.push((now_ms(), versions));
    }
    out
}

/// Change -> traffic following the new rule, from probes: the first answer from a version not
/// seen before the change; or, when the change only removes versions, the last answer from a
/// removed one. `None` when the probes saw no difference.
pub fn data_plane_ms(samples: &[ProbeSample], accepted_at: f64) -> Option<f64> {
    let before: std::collections::BTreeSet<&String> = samples
        .iter()
        .filter(|s| s.0 < accepted_at)
        .flat_map(|s| &s.1)
        .collect();
    let after: Vec<&ProbeSample> = samples.iter().filter(|s| s.0 >= accepted_at).collect();
    if before.is_empty() || after.is_empty() {
        return None;
    }
    if let Some(first_new) = after
        .iter()
        .find(|s| s.1.iter().any(|v| !before.contains(v)))
    {
        return Some(first_new.0 - accepted_at);
    }
    // Versions absent from the second half of the window were removed by the change.
    let tail: std::collections::BTreeSet<&String> =
        after[after.len() / 2..].iter().flat_map(|s| &s.1).collect();
    let removed: Vec<&&String> = before.iter().filter(|v| !tail.contains(**v)).collect();
    if removed.is_empty() {
        return None;
    }
    let last = after
        .iter()
        .rev()
        .find(|s| s.1.iter().any(|v| removed.contains(&&v)));
    Some(last.map_or(0.0, |s| s.0 - accepted_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: f64, v: &[&str]) -> ProbeSample {
        (t, v.iter().map(|x| x.to_string()).collect())
    }

    #[test]
    fn sampling_spread_widens_small_samples_only() {
        assert!((sampling_spread(50.0, 300) - 9.5).abs() < 0.05);
        assert!(sampling_spread(50.0, 10_000) < 2.0);
        assert_eq!(sampling_spread(100.0, 40), 0.0);
        assert_eq!(sampling_spread(0.0, 40), 0.0);
        assert_eq!(sampling_spread(50.0, 0), 0.0);
    }

    #[test]
    fn data_plane_from_probes() {
        let new_version = [
            s(1.0, &["reviews-v1"]),
            s(2.0, &["reviews-v1"]),
            s(11.0, &["reviews-v1"]),
            s(13.5, &["reviews-v3"]),
            s(14.0, &["reviews-v1"]),
        ];
        assert_eq!(data_plane_ms(&new_version, 10.0), Some(3.5));
        let removed = [
            s(1.0, &["reviews-v1"]),
            s(2.0, &["reviews-v3"]),
            s(11.0, &["reviews-v1"]),
            s(12.0, &["reviews-v3"]),
            s(13.0, &["reviews-v3"]),
            s(14.0, &["reviews-v3"]),
            s(15.0, &["reviews-v3"]),
        ];
        assert_eq!(data_plane_ms(&removed, 10.0), Some(1.0));
        let same = [s(1.0, &["reviews-v1"]), s(11.0, &["reviews-v1"])];
        assert_eq!(data_plane_ms(&same, 10.0), None);
    }
}
