//! report.json (docs/contracts.md, `schema_version` 1), its SVG charts (plotters), a
//! self-contained report.html, and the terminal summary. `meshbench report` re-renders the
//! charts and HTML from a report.json.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::load::LoadResult;
pub use crate::measure::Machine;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub schema_version: u32,
    pub scenario: String,
    pub backend: String,
    /// The container engine of the docker backend ("Docker 20.10.24 (API 1.41)").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub proxy: String,
    pub meshbench_version: String,
    pub commit: String,
    pub machine: Machine,
    pub started_at_ms: f64,
    pub duration_s: f64,
    pub quick: bool,
    pub phases: Vec<Phase>,
    pub propagation: Vec<Propagation>,
    pub expectations: Vec<Expectation>,
    pub resources: Resources,
    /// One entry per churn step (endpoint churn with simulated proxies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub churn: Vec<ChurnResult>,
    /// One entry per sidecar lifecycle fault (`kill_sidecar`, `hot_restart`,
    /// `rolling_restart`): what it took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lifecycle: Vec<LifecycleEvent>,
    pub passed: bool,
}

/// What a sidecar lifecycle fault took (one entry of report.json's `lifecycle`). Requests
/// lost during it are the errors of the loads running at the time (their phases).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecycleEvent {
    /// The step (1-based).
    pub step: usize,
    /// `kill_sidecar`, `hot_restart` or `rolling_restart`.
    pub fault: String,
    /// The pod (or, for a rolling restart, the Deployment).
    pub target: String,
    /// kill_sidecar: from the kill to the first request the pod served through its sidecar
    /// again. hot_restart: from the signal to the agent until it reports the next epoch and
    /// ready. rolling_restart: the whole rollout.
    pub ms: f64,
    /// Pods replaced (rolling_restart), old -> new.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replaced: Vec<String>,
    /// Per replaced pod: from its endpoint's removal until every sidecar had ACKed it (ms).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deregistered_acked_ms: Vec<f64>,
    /// Per replaced pod: how long its sidecar took to drain and exit after SIGTERM (ms).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drain_ms: Vec<f64>,
}

impl LifecycleEvent {
    /// One line for the terminal and report.txt.
    pub fn line(&self) -> String {
        let mut s = format!("{} {}: {:.0} ms", self.fault, self.target, self.ms);
        if !self.replaced.is_empty() {
            s.push_str(&format!(
                " ({}; endpoint removal ACKed by all in {} ms; drained in {} ms)",
                self.replaced.join(", "),
                join_ms(&self.deregistered_acked_ms),
                join_ms(&self.drain_ms)
            ));
        }
        s
    }
}

fn join_ms(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join("/")
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Phase {
    pub name: String,
    pub load: PhaseLoad,
    /// What the sidecars did during the phase, summed over all of them.
    #[serde(default)]
    pub mesh: MeshCounts,
}

/// Sidecar counters over a phase (from every sidecar's admin `/stats`, end minus start):
/// what the mesh did to keep answering. Other loads running at the same time count too.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshCounts {
    /// Upstream retries (`cluster.*.upstream_rq_retry`).
    pub retries: u64,
    /// Circuit-breaker overflows (`cluster.*.upstream_rq_pending_overflow`).
    pub overflows: u64,
    /// Hosts ejected by outlier detection (`cluster.*.outlier_detection.ejections_enforced_total`).
    pub ejections: u64,
    /// Requests refused by local rate limits (`*.http_local_rate_limit.enforced`).
    pub rate_limited: u64,
    /// Requests refused by authorization policies (`http.*.rbac.denied`).
    #[serde(default)]
    pub rbac_denied: u64,
    /// The retries per cluster (which hop retried), summed over the sidecars.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub retries_by_cluster: BTreeMap<String, u64>,
}

impl MeshCounts {
    /// Sums the counters of one `/stats` text.
    pub fn add_stats(&mut self, text: &str) {
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(": ") else {
                continue;
            };
            let Ok(v) = value.trim().parse::<u64>() else {
                continue;
            };
            let field = if let Some(cluster) = name.strip_prefix("cluster.") {
                if let Some(cluster) = cluster.strip_suffix(".upstream_rq_retry") {
                    if v > 0 {
                        *self
                            .retries_by_cluster
                            .entry(cluster.to_string())
                            .or_default() += v;
                    }
                    &mut self.retries
                } else if name.ends_with(".upstream_rq_pending_overflow") {
                    &mut self.overflows
                } else if name.ends_with(".outlier_detection.ejections_enforced_total") {
                    &mut self.ejections
                } else {
                    continue;
                }
            } else if name.ends_with(".http_local_rate_limit.enforced") {
                &mut self.rate_limited
            } else if name.starts_with("http.") && name.ends_with(".rbac.denied") {
                &mut self.rbac_denied
            } else {
                continue;
            };
            *field += v;
        }
    }

    pub fn since(&self, before: &MeshCounts) -> MeshCounts {
        MeshCounts {
            retries: self.retries.saturating_sub(before.retries),
            overflows: self.overflows.saturating_sub(before.overflows),
            ejections: self.ejections.saturating_sub(before.ejections),
            rate_limited: self.rate_limited.saturating_sub(before.rate_limited),
            rbac_denied: self.rbac_denied.saturating_sub(before.rbac_denied),
            retries_by_cluster: self
                .retries_by_cluster
                .iter()
                .map(|(c, n)| {
                    let was = before.retries_by_cluster.get(c).copied().unwrap_or(0);
                    (c.clone(), n.saturating_sub(was))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// A load's result as report.json carries it: what the generator measured, and where.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PhaseLoad {
    pub target: String,
    #[serde(flatten)]
    pub result: LoadResult,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Dist {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    pub fn of(values: &[f64]) -> Option<Dist> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let q = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Dist {
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: v[v.len() - 1],
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Propagation {
    /// The applied file(s).
    pub change: String,
    pub version: u64,
    pub proxies: usize,
    pub push_ms: Option<Dist>,
    pub ack_ms: Option<Dist>,
    /// Change -> first traffic that could only follow the new rule (probes); one value.
    pub data_plane_ms: Option<Dist>,
    /// Every proxy's change -> ACK, for the CDF.
    pub ack_samples_ms: Vec<f64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Expectation {
    pub step: usize,
    pub description: String,
    pub expected: String,
    pub measured: String,
    pub passed: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessCost {
    pub name: String,
    pub cpu_s: f64,
    pub peak_rss_mb: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    pub pilot: ProcessCost,
    pub proxies: Vec<ProcessCost>,
}

impl Report {
    /// Reads a report.json; the error names the file.
    pub fn read(path: &Path) -> Result<Report, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a meshbench report.json: {e}", path.display()))
    }
}

/// What a churn measured (one entry of report.json's `churn`).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct ChurnResult {
    pub name: String,
    pub xds: String,
    pub proxies: usize,
    pub services: usize,
    pub endpoints: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub changes: usize,
    pub achieved_rate: f64,
    /// Setting up: registering endpoints and the simulated proxies' first full config.
    pub setup_s: f64,
    /// Change -> simulated proxy received it, over every (change, proxy) pair.
    pub receive_ms: Option<Dist>,
    /// Change -> simulated proxy ACKed it.
    pub ack_ms: Option<Dist>,
    /// Per change, change -> the last simulated proxy received it.
    pub last_proxy_ms: Option<Dist>,
    /// (change, proxy) pairs never received before the end.
    pub missed: usize,
    /// Real sidecars (pilot's history): change -> pushed, change -> ACKed.
    pub sidecar_push_ms: Option<Dist>,
    pub sidecar_ack_ms: Option<Dist>,
    /// Pilot's counters over the churn (every proxy, real and simulated).
    pub pushes: u64,
    pub bytes: u64,
    pub bytes_per_change: f64,
    pub bytes_per_change_per_proxy: f64,
    pub snapshots: u64,
    pub nacks: u64,
    /// Pilot's CPU seconds during the churn and its largest RSS sampled then.
    pub pilot_cpu_s: f64,
    pub pilot_peak_rss_mb: f64,
    /// The simulated proxies' side: responses and bytes received.
    pub sim_responses: u64,
    pub sim_bytes: u64,
    /// Real sidecars' data plane after the churn, from their admin `/clusters`: hosts of the
    /// churned services still there after their removal (stale), registered but absent
    /// (missing), or with a health status other than the registry's.
    pub sidecars_checked: usize,
    pub sidecar_stale_hosts: usize,
    pub sidecar_missing_hosts: usize,
    pub sidecar_health_mismatches: usize,
}

/// Writes report.json, the charts and report.html into `dir`; returns the files written.
pub fn write(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let json = dir.join("report.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(report).map_err(std::io::Error::other)?,
    )?;
    let mut files = vec![json];
    files.extend(render(report, dir)?);
    Ok(files)
}

/// Charts and HTML from a report (what `meshbench report` runs).
pub fn render(report: &Report, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let charts = charts(report);
    let mut files = Vec::new();
    for (name, svg) in &charts {
        let p = dir.join(format!("{name}.svg"));
        std::fs::write(&p, svg)?;
        files.push(p);
    }
    let html = dir.join("report.html");
    std::fs::write(&html, html_page(report, &charts))?;
    files.push(html);
    Ok(files)
}

fn chart_err(e: impl std::fmt::Display) -> String {
    format!("<!-- chart failed: {e} -->")
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(42, 122, 184),
    RGBColor(200, 85, 61),
    RGBColor(90, 160, 90),
    RGBColor(150, 100, 180),
    RGBColor(220, 160, 40),
    RGBColor(120, 120, 120),
];

/// (title, x label, y label, series name -> points)
pub(crate) fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 320)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let x_max = series.values().flatten().map(|p| p.0).fold(1.0, f64::max);
            let x_min = series
                .values()
                .flatten()
                .map(|p| p.0)
                .fold(f64::INFINITY, f64::min)
                .min(x_max * 0.9)
                .max(0.0);
            let x_min = if x_min.is_finite() { x_min } else { 0.0 };
            let y_max = series
                .values()
                .flatten()
                .map(|p| p.1)
                .fold(0.0, f64::max)
                .max(1e-3)
                * 1.1;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(32)
                .y_label_area_size(56)
                .build_cartesian_2d(x_min..x_max, 0.0..y_max)?;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .light_line_style(RGBColor(235, 235, 235))
                .draw()?;
            for (i, (name, points)) in series.iter().enumerate() {
                let color = PALETTE[i % PALETTE.len()];
                chart
                    .draw_series(LineSeries::new(
                        points.iter().copied(),
                        color.stroke_width(2),
                    ))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        if let Err(e) = draw() {
            return chart_err(e);
        }
    }
    svg
}

/// The charts of a report: latency over time, throughput over time, per-version share over
/// time (the canary shift), propagation CDF.
pub fn charts(report: &Report) -> Vec<(String, String)> {
    let mut latency = BTreeMap::new();
    let mut throughput = BTreeMap::new();
    let mut shares = BTreeMap::new();
    for ph in &report.phases {
        let s = &ph.load.result.series;
        latency.insert(
            format!("{} p50", ph.name),
            s.iter().map(|x| (x.t as f64, x.p50_ms)).collect(),
        );
        latency.insert(
            format!("{} p99", ph.name),
            s.iter().map(|x| (x.t as f64, x.p99_ms)).collect(),
        );
        throughput.insert(
            ph.name.clone(),
            s.iter().map(|x| (x.t as f64, x.requests as f64)).collect(),
        );
        // Services with more than one version: their share per second.
        let mut by_service: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in ph.load.result.versions.keys() {
            if let Some((svc, _)) = v.rsplit_once('-') {
                by_service
                    .entry(svc.to_string())
                    .or_default()
                    .push(v.clone());
            }
        }
        for versions in by_service.values().filter(|v| v.len() > 1) {
            for v in versions {
                let points = s
                    .iter()
                    .map(|x| {
                        let total: u64 = versions
                            .iter()
                            .map(|k| x.versions.get(k).copied().unwrap_or(0))
                            .sum();
                        (
                            x.t as f64,
                            if total == 0 {
                                0.0
                            } else {
                                100.0 * x.versions.get(v).copied().unwrap_or(0) as f64
                                    / total as f64
                            },
                        )
                    })
                    .collect();
                shares.insert(format!("{}: {v}", ph.name), points);
            }
        }
    }
    let mut cdf = BTreeMap::new();
    let mut samples: Vec<f64> = report
        .propagation
        .iter()
        .flat_map(|p| p.ack_samples_ms.iter().copied())
        .collect();
    samples.sort_by(f64::total_cmp);
    let n = samples.len().max(1) as f64;
    cdf.insert(
        "change -> ACK".to_string(),
        samples
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, 100.0 * (i + 1) as f64 / n))
            .collect::<Vec<_>>(),
    );
    vec![
        (
            "latency".into(),
            line_chart("Latency per second (ms)", "seconds", "ms", &latency),
        ),
        (
            "throughput".into(),
            line_chart(
                "Throughput (requests per second)",
                "seconds",
                "requests/s",
                &throughput,
            ),
        ),
        (
            "versions".into(),
            line_chart(
                "Traffic share per version over time (%)",
                "seconds",
                "% of service's requests",
                &shares,
            ),
        ),
        (
            "propagation".into(),
            line_chart(
                "Propagation: change -> ACK over all proxies and changes (CDF)",
                "milliseconds",
                "% of proxies",
                &cdf,
            ),
        ),
    ]
}

/// Text for HTML: every character that could open markup or end an attribute is escaped.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One table row. Every cell goes through [`esc`]: a value read from a report (which
/// `meshbench report` takes from any file) cannot inject markup.
fn row(h: &mut String, cells: &[&dyn std::fmt::Display]) {
    h.push_str("<tr>");
    for c in cells {
        h.push_str("<td>");
        h.push_str(&esc(&c.to_string()));
        h.push_str("</td>");
    }
    h.push_str("</tr>\n");
}

/// A distribution figure with one decimal, or "-" when nothing was measured.
pub(crate) fn opt(d: &Option<Dist>, f: impl Fn(&Dist) -> f64) -> String {
    d.as_ref().map_or("-".into(), |d| format!("{:.1}", f(d)))
}

fn html_page(r: &Report, charts: &[(String, String)]) -> String {
    let status = if r.passed { "pass" } else { "fail" };
    let backend = match &r.engine {
        Some(e) => format!("{} ({e})", r.backend),
        None => r.backend.clone(),
    };
    let summary = format!(
        "backend {backend}, proxy {}, meshbench {} ({}), {} cores, {} MB; {:.1} s{}",
        r.proxy,
        r.meshbench_version,
        r.commit,
        r.machine.cores,
        r.machine.memory_mb,
        r.duration_s,
        if r.quick { " (quick)" } else { "" }
    );
    let mut h = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>meshbench: {0}</title><style>body{{font-family:sans-serif;margin:24px;max-width:1000px}}table{{border-collapse:collapse;margin:8px 0 20px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#f4f4f4}}td:first-child{{text-align:left}}.pass{{color:#2a7a2a}}.fail{{color:#b22;font-weight:bold}}</style></head><body>\n<h1>{0}: <span class=\"{1}\">{2}</span></h1>\n<p>{3}</p>\n",
        esc(&r.scenario),
        status,
        if r.passed { "PASSED" } else { "FAILED" },
        esc(&summary),
    );
    h.push_str("<h2>Phases</h2><table><tr><th>phase</th><th>target</th><th>rps</th><th>requests</th><th>errors</th><th>shed</th><th>degraded</th><th>retries</th><th>overflows</th><th>ejections</th><th>rate limited</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>versions</th></tr>\n");
    for p in &r.phases {
        let l = &p.load.result;
        let versions = l
            .versions
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let degraded = degraded_line(l);
        row(
            &mut h,
            &[
                &p.name,
                &p.load.target,
                &format!("{:.0}", l.achieved_rps),
                &l.requests,
                &l.errors,
                &l.shed,
                &degraded,
                &p.mesh.retries,
                &p.mesh.overflows,
                &p.mesh.ejections,
                &p.mesh.rate_limited,
                &format!("{:.2}", l.latency_ms.p50),
                &format!("{:.2}", l.latency_ms.p99),
                &format!("{:.2}", l.latency_ms.p999),
                &versions,
            ],
        );
    }
    h.push_str("</table><h2>Expectations</h2><table><tr><th>step</th><th>expectation</th><th>expected</th><th>measured</th><th>result</th></tr>\n");
    for e in &r.expectations {
        row(
            &mut h,
            &[
                &e.step,
                &e.description,
                &e.expected,
                &e.measured,
                &if e.passed { "pass" } else { "FAIL" },
            ],
        );
    }
    h.push_str("</table><h2>Propagation (ms)</h2><table><tr><th>change</th><th>version</th><th>proxies</th><th>push p50</th><th>push p99</th><th>ACK p50</th><th>ACK p99</th><th>ACK max</th><th>data plane</th></tr>\n");
    for p in &r.propagation {
        row(
            &mut h,
            &[
                &p.change,
                &p.version,
                &p.proxies,
                &opt(&p.push_ms, |d| d.p50),
                &opt(&p.push_ms, |d| d.p99),
                &opt(&p.ack_ms, |d| d.p50),
                &opt(&p.ack_ms, |d| d.p99),
                &opt(&p.ack_ms, |d| d.max),
                &opt(&p.data_plane_ms, |d| d.p50),
            ],
        );
    }
    if !r.churn.is_empty() {
        h.push_str("</table><h2>Endpoint churn</h2><table><tr><th>churn</th><th>ADS</th><th>simulated proxies</th><th>endpoints</th><th>changes</th><th>receive p50 ms</th><th>receive p99 ms</th><th>receive max ms</th><th>ACK p99 ms</th><th>last proxy p99 ms</th><th>sidecar ACK p99 ms</th><th>B/change</th><th>B/change/proxy</th><th>pilot CPU s</th><th>pilot peak RSS MB</th><th>missed</th><th>sidecar stale/missing</th></tr>\n");
        for c in &r.churn {
            row(
                &mut h,
                &[
                    &c.name,
                    &c.xds,
                    &c.proxies,
                    &c.endpoints,
                    &c.changes,
                    &opt(&c.receive_ms, |d| d.p50),
                    &opt(&c.receive_ms, |d| d.p99),
                    &opt(&c.receive_ms, |d| d.max),
                    &opt(&c.ack_ms, |d| d.p99),
                    &opt(&c.last_proxy_ms, |d| d.p99),
                    &opt(&c.sidecar_ack_ms, |d| d.p99),
                    &format!("{:.0}", c.bytes_per_change),
                    &format!("{:.1}", c.bytes_per_change_per_proxy),
                    &format!("{:.2}", c.pilot_cpu_s),
                    &format!("{:.0}", c.pilot_peak_rss_mb),
                    &c.missed,
                    &format!("{}/{}", c.sidecar_stale_hosts, c.sidecar_missing_hosts),
                ],
            );
        }
    }
    if !r.lifecycle.is_empty() {
        h.push_str("</table><h2>Sidecar lifecycle</h2><table><tr><th>step</th><th>fault</th><th>target</th><th>ms</th><th>replaced</th><th>removal ACKed ms</th><th>drain ms</th></tr>\n");
        for e in &r.lifecycle {
            row(
                &mut h,
                &[
                    &e.step,
                    &e.fault,
                    &e.target,
                    &format!("{:.0}", e.ms),
                    &e.replaced.join(", "),
                    &join_ms(&e.deregistered_acked_ms),
                    &join_ms(&e.drain_ms),
                ],
            );
        }
    }
    h.push_str(
        "</table><h2>Cost</h2><table><tr><th>process</th><th>CPU s</th><th>peak RSS MB</th></tr>\n",
    );
    for c in std::iter::once(&r.resources.pilot).chain(&r.resources.proxies) {
        row(
            &mut h,
            &[
                &c.name,
                &format!("{:.2}", c.cpu_s),
                &format!("{:.1}", c.peak_rss_mb),
            ],
        );
    }
    // The charts inline (one self-contained page). plotters escapes every text and attribute
    // it writes, so version names from a report cannot become markup here either.
    h.push_str("</table><h2>Charts</h2>\n");
    for (_, svg) in charts {
        h.push_str(svg);
        h.push('\n');
    }
    h.push_str("</body></html>\n");
    h
}

/// One line for a churn: propagation to the simulated proxies, bytes, pilot's cost.
pub fn churn_line(c: &ChurnResult) -> String {
    format!(
        "churn {:<8} {:>5} {:<5} proxies {:>6} endpoints {:>4} changes: receive p50 {} / p99 {} / max {} ms, ACK p99 {} ms, last proxy p99 {} ms; {:.0} B/change ({:.1} B/change/proxy), {} pushes; pilot {:.2} CPU s, {:.0} MB peak{}",
        c.name,
        c.proxies,
        c.xds,
        c.endpoints,
        c.changes,
        opt(&c.receive_ms, |d| d.p50),
        opt(&c.receive_ms, |d| d.p99),
        opt(&c.receive_ms, |d| d.max),
        opt(&c.ack_ms, |d| d.p99),
        opt(&c.last_proxy_ms, |d| d.p99),
        c.bytes_per_change,
        c.bytes_per_change_per_proxy,
        c.pushes,
        c.pilot_cpu_s,
        c.pilot_peak_rss_mb,
        if c.missed > 0 {
            format!("; {} (change, proxy) pairs missed", c.missed)
        } else {
            String::new()
        }
    )
}

/// `N (reviews: a, ratings: b)`: answers with any degraded part, then per service.
fn degraded_line(l: &crate::load::LoadResult) -> String {
    if l.degraded_requests == 0 {
        return "0".into();
    }
    let per = l
        .degraded
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{} ({per})", l.degraded_requests)
}

/// The terminal summary printed at the end of a run.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "\n{} on {}{} with {} sidecars: {}\n",
        r.scenario,
        r.backend,
        r.engine
            .as_ref()
            .map_or(String::new(), |e| format!(" ({e})")),
        r.proxy,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    for p in &r.phases {
        let l = &p.load.result;
        s.push_str(&format!(
            "  phase {:<12} {:>7.0} rps  {:>6} requests  {:>3} errors  p50 {:.2} ms  p99 {:.2} ms",
            p.name, l.achieved_rps, l.requests, l.errors, l.latency_ms.p50, l.latency_ms.p99
        ));
        if l.shed > 0 {
            s.push_str(&format!("  {} shed", l.shed));
        }
        if l.degraded_requests > 0 {
            s.push_str(&format!("  degraded {}", degraded_line(l)));
        }
        let m = &p.mesh;
        if *m != MeshCounts::default() {
            s.push_str(&format!(
                "  mesh: {} retries, {} overflows, {} ejections, {} rate limited, {} denied by RBAC",
                m.retries, m.overflows, m.ejections, m.rate_limited, m.rbac_denied
            ));
            if !m.retries_by_cluster.is_empty() {
                let by: Vec<String> = m
                    .retries_by_cluster
                    .iter()
                    .map(|(c, n)| format!("{c} {n}"))
                    .collect();
                s.push_str(&format!(" (retried at {})", by.join(", ")));
            }
        }
        s.push('\n');
    }
    for p in &r.propagation {
        s.push_str(&format!("  change v{:<3} {:<40} push p99 {} ms, ACK p50 {} / p99 {} ms over {} proxies, data plane {} ms\n", p.version, p.change, opt(&p.push_ms, |d| d.p99), opt(&p.ack_ms, |d| d.p50), opt(&p.ack_ms, |d| d.p99), p.proxies, opt(&p.data_plane_ms, |d| d.p50)));
    }
    for c in &r.churn {
        s.push_str(&format!("  {}\n", churn_line(c)));
    }
    for e in &r.lifecycle {
        s.push_str(&format!("  step {}: {}\n", e.step, e.line()));
    }
    for e in &r.expectations {
        s.push_str(&format!(
            "  [{}] step {}: {} (expected {}, measured {})\n",
            if e.passed { "ok" } else { "FAIL" },
            e.step,
            e.description,
            e.expected,
            e.measured
        ));
    }
    let proxies_rss: f64 = r.resources.proxies.iter().map(|p| p.peak_rss_mb).sum();
    s.push_str(&format!(
        "  pilot {:.2} CPU s, {:.1} MB peak; {} sidecars {:.1} MB peak in total\n",
        r.resources.pilot.cpu_s,
        r.resources.pilot.peak_rss_mb,
        r.resources.proxies.len(),
        proxies_rss
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_counted_per_cluster_across_sidecars() {
        let stats = |reviews: u64, details: u64| {
            format!(
                "cluster.outbound|9080|v1|reviews.default.svc.cluster.local.upstream_rq_retry: {reviews}\ncluster.outbound|9080||details.default.svc.cluster.local.upstream_rq_retry: {details}\ncluster.outbound|9080||details.default.svc.cluster.local.upstream_rq_pending_overflow: 3\n"
            )
        };
        let mut before = MeshCounts::default();
        before.add_stats(&stats(2, 0));
        before.add_stats(&stats(1, 0));
        let mut after = MeshCounts::default();
        after.add_stats(&stats(7, 0));
        after.add_stats(&stats(1, 4));
        let d = after.since(&before);
        assert_eq!(d.retries, 9);
        assert_eq!(d.overflows, 0);
        assert_eq!(
            d.retries_by_cluster,
            BTreeMap::from([
                (
                    "outbound|9080|v1|reviews.default.svc.cluster.local".to_string(),
                    5
                ),
                (
                    "outbound|9080||details.default.svc.cluster.local".to_string(),
                    4
                ),
            ])
        );
    }
}
