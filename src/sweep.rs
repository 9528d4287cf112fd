//! `meshbench sweep`: capacity planning. Runs an endpoint churn (see [`crate::churn`]) for every
//! point of a matrix (simulated proxies x endpoints x churn rate x debounce x ADS method x
//! full push), each against a fresh pilot process, and writes sweep.json, a table (sweep.md),
//! scaling curves (SVG) and a fitted linear cost model per group of points, with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::churn::{self, Registered};
use crate::launch::{log_file, PilotArgs, PilotProcess};
use crate::measure::proc_stats;
use crate::pilot_client::{Error, PilotApi};
use crate::report::opt;
use crate::report::ChurnResult;
use crate::scenario::ChurnSpec;
use crate::scenario::Dur;
use crate::xds::XdsMode;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    pub name: Option<String>,
    /// Services the endpoints are spread over (default 100).
    #[serde(default = "default_services")]
    pub services: usize,
    /// Churn time per point.
    pub duration: Dur,
    pub matrix: Matrix,
}

fn default_services() -> usize {
    100
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Matrix {
    pub proxies: Vec<usize>,
    pub endpoints: Vec<usize>,
    /// Changes per second.
    pub rate: Vec<f64>,
    #[serde(default = "default_debounce")]
    pub debounce: Vec<Dur>,
    #[serde(default = "default_xds")]
    pub xds: Vec<XdsMode>,
    #[serde(default = "default_full_push")]
    pub full_push: Vec<bool>,
}

fn default_debounce() -> Vec<Dur> {
    vec![Dur(crate::pilot::DEFAULT_DEBOUNCE)]
}
fn default_xds() -> Vec<XdsMode> {
    vec![XdsMode::Sotw]
}
fn default_full_push() -> Vec<bool> {
    vec![false]
}

/// One point of the matrix and what its churn measured.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Point {
    pub proxies: usize,
    pub endpoints: usize,
    pub rate: f64,
    pub debounce_ms: f64,
    pub xds: XdsMode,
    pub full_push: bool,
    /// Pilot's peak RSS over its whole life (setup included), from VmHWM.
    pub pilot_hwm_mb: f64,
    pub churn: ChurnResult,
}

impl Point {
    /// Everything but proxies and endpoints: the points of one group share a cost model.
    fn group(&self) -> String {
        format!(
            "{}{} rate {}/s debounce {}ms",
            self.xds,
            if self.full_push { " full-push" } else { "" },
            self.rate,
            self.debounce_ms
        )
    }
    fn metric(&self, m: Metric) -> Option<f64> {
        let c = &self.churn;
        match m {
            Metric::ReceiveP99 => c.receive_ms.as_ref().map(|d| d.p99),
            Metric::BytesPerChange => Some(c.bytes_per_change),
            Metric::BytesPerChangePerProxy => Some(c.bytes_per_change_per_proxy),
            Metric::CpuMsPerChange => {
                (c.changes > 0).then(|| c.pilot_cpu_s * 1000.0 / c.changes as f64)
            }
            Metric::PilotRss => Some(self.pilot_hwm_mb),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Metric {
    ReceiveP99,
    BytesPerChange,
    BytesPerChangePerProxy,
    CpuMsPerChange,
    PilotRss,
}

impl Metric {
    /// What the cost model fits. Bytes are fitted per proxy: a push's bytes are proxies x
    /// bytes per proxy, which a sum of terms cannot model.
    const FITTED: [Metric; 4] = [
        Metric::ReceiveP99,
        Metric::BytesPerChangePerProxy,
        Metric::CpuMsPerChange,
        Metric::PilotRss,
    ];
    fn name(self) -> &'static str {
        match self {
            Metric::ReceiveP99 => "p99 change->proxy (ms)",
            Metric::BytesPerChange => "bytes pushed per change",
            Metric::BytesPerChangePerProxy => "bytes per change per proxy",
            Metric::CpuMsPerChange => "pilot CPU ms per change",
            Metric::PilotRss => "pilot peak RSS (MB)",
        }
    }
}

/// y = a + b * (proxies / 1000) + c * (endpoints / 1000), least squares over one group.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fit {
    pub group: String,
    pub metric: String,
    pub intercept: f64,
    pub per_1k_proxies: f64,
    pub per_1k_endpoints: f64,
    pub points: usize,
    pub r2: f64,
    /// Largest |fit - measured| / measured over the group's points (in-sample).
    pub max_rel_error: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepReport {
    pub schema_version: u32,
    pub name: String,
    pub quick: bool,
    pub services: usize,
    pub duration_s: f64,
    pub machine: crate::report::Machine,
    pub points: Vec<Point>,
    pub fits: Vec<Fit>,
}

#[derive(Clone, Debug)]
pub struct SweepOptions {
    pub out: Option<PathBuf>,
    pub quick: bool,
    pub meshbench_exe: PathBuf,
}

impl SweepSpec {
    pub fn load(path: &Path) -> Result<SweepSpec, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let spec: SweepSpec = serde_saphyr::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let m = &spec.matrix;
        let bad = if m.proxies.is_empty()
            || m.endpoints.is_empty()
            || m.rate.is_empty()
            || m.debounce.is_empty()
            || m.xds.is_empty()
            || m.full_push.is_empty()
        {
            Some("matrix: every dimension needs at least one value")
        } else if spec.services == 0 || m.endpoints.iter().any(|e| *e < spec.services) {
            Some("matrix.endpoints: at least `services` endpoints per point")
        } else if m.rate.iter().any(|r| *r <= 0.0) {
            Some("matrix.rate: changes per second above 0")
        } else {
            None
        };
        match bad {
            Some(m) => Err(Error::Config(format!("{}: {m}", path.display()))),
            None => Ok(spec),
        }
    }

    /// A reduced sweep for CI: a tenth of the proxies and endpoints, half the time.
    pub fn quick(&mut self) {
        self.duration = Dur(self.duration.0 / 2);
        for p in &mut self.matrix.proxies {
            *p = p.div_ceil(10);
        }
        for e in &mut self.matrix.endpoints {
            *e = (*e / 10).max(self.services);
        }
        self.matrix.proxies.dedup();
        self.matrix.endpoints.dedup();
    }
}

/// Runs every point; writes the outputs to the directory returned.
pub async fn run(
    mut spec: SweepSpec,
    file: &Path,
    opts: SweepOptions,
) -> Result<(SweepReport, PathBuf), Error> {
    if opts.quick {
        spec.quick();
    }
    let name = spec.name.clone().unwrap_or_else(|| {
        file.file_stem()
            .map_or("sweep".into(), |s| s.to_string_lossy().into_owned())
    });
    let out = opts.out.clone().unwrap_or_else(|| {
        PathBuf::from("reports/sweep").join(&name).join(format!(
            "{}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            std::process::id()
        ))
    });
    std::fs::create_dir_all(&out)
        .map_err(|e| Error::Environment(format!("cannot create {}: {e}", out.display())))?;
    let m = &spec.matrix;
    let mut grid = Vec::new();
    for &xds in &m.xds {
        for &full_push in &m.full_push {
            for debounce in &m.debounce {
                for &rate in &m.rate {
                    for &endpoints in &m.endpoints {
                        for &proxies in &m.proxies {
                            grid.push((proxies, endpoints, rate, debounce.0, xds, full_push));
                        }
                    }
                }
            }
        }
    }
    let mut points = Vec::new();
    for (k, (proxies, endpoints, rate, debounce, xds, full_push)) in grid.iter().enumerate() {
        eprintln!(
            "meshbench sweep: point {}/{}: {proxies} {xds} proxies, {endpoints} endpoints, {rate}/s, debounce {debounce:?}{}",
            k + 1,
            grid.len(),
            if *full_push { ", full push" } else { "" }
        );
        let pilot = start_pilot(&opts.meshbench_exe, *debounce, *full_push, &out, k).await?;
        let churn_spec = ChurnSpec {
            name: Some(format!("point-{}", k + 1)),
            services: spec.services,
            endpoints: *endpoints,
            rate: *rate,
            duration: spec.duration,
            proxies: *proxies,
            xds: *xds,
            ack_delay: None,
            nack_fraction: 0.0,
        };
        let pid = pilot.pid();
        let usage = move || pid.and_then(proc_stats).map(|s| (s.cpu_s, s.rss_mb));
        let mut api = PilotApi::new(pilot.api).with_token(Some(&pilot.token));
        let mut target = churn::Target {
            pilot: &mut api,
            xds: pilot.xds,
            usage: &usage,
            sidecar_admins: vec![],
        };
        let say = |m: String| eprintln!("meshbench sweep:   {m}");
        let result = churn::run(
            &mut target,
            &churn_spec,
            &mut Registered::default(),
            format!("point-{}", k + 1),
            &say,
        )
        .await?;
        let hwm = pid.and_then(proc_stats).map_or(0.0, |s| s.peak_rss_mb);
        eprintln!("meshbench sweep:   {}", crate::report::churn_line(&result));
        drop(pilot);
        points.push(Point {
            proxies: *proxies,
            endpoints: *endpoints,
            rate: *rate,
            debounce_ms: debounce.as_secs_f64() * 1000.0,
            xds: *xds,
            full_push: *full_push,
            pilot_hwm_mb: hwm,
            churn: result,
        });
    }
    let report = SweepReport {
        schema_version: 1,
        name,
        quick: opts.quick,
        services: spec.services,
        duration_s: spec.duration.0.as_secs_f64(),
        machine: crate::measure::machine(),
        fits: fits(&points),
        points,
    };
    write(&report, &out)
        .map_err(|e| Error::Environment(format!("cannot write to {}: {e}", out.display())))?;
    Ok((report, out))
}

/// A fresh pilot for point `k`, on a loopback address of its own.
async fn start_pilot(
    exe: &Path,
    debounce: Duration,
    full_push: bool,
    out: &Path,
    k: usize,
) -> Result<PilotProcess, Error> {
    let pid = std::process::id();
    let ip = format!("127.{}.{}.{}", 30 + pid % 60, (pid / 60) % 250, 1 + k % 250);
    let mut args = PilotArgs::new(
        format!("{ip}:15010").parse().expect("valid address"),
        format!("{ip}:15080").parse().expect("valid address"),
    );
    args.debounce = debounce;
    args.full_push = full_push;
    PilotProcess::start(
        exe,
        &args,
        "sweep",
        log_file(out, &format!("pilot-{}", k + 1)),
    )
    .await
}

/// Least-squares fits per group and metric; a term is left out when its variable does not
/// vary in the group.
fn fits(points: &[Point]) -> Vec<Fit> {
    let mut groups: BTreeMap<String, Vec<&Point>> = BTreeMap::new();
    for p in points {
        groups.entry(p.group()).or_default().push(p);
    }
    let mut out = Vec::new();
    for (group, ps) in groups {
        for metric in Metric::FITTED {
            let rows: Vec<(f64, f64, f64)> = ps
                .iter()
                .filter_map(|p| {
                    p.metric(metric)
                        .map(|y| (p.proxies as f64 / 1000.0, p.endpoints as f64 / 1000.0, y))
                })
                .collect();
            if let Some(f) = fit(&rows) {
                out.push(Fit {
                    group: group.clone(),
                    metric: metric.name().into(),
                    ..f
                });
            }
        }
    }
    out
}

/// Fits y = a + b x1 + c x2 over `rows` (x1, x2, y); `None` with fewer points than terms.
fn fit(rows: &[(f64, f64, f64)]) -> Option<Fit> {
    let varies = |f: fn(&(f64, f64, f64)) -> f64| {
        rows.iter().map(f).any(|v| (v - f(&rows[0])).abs() > 1e-12)
    };
    if rows.is_empty() {
        return None;
    }
    let use_p = varies(|r| r.0);
    let use_e = varies(|r| r.1);
    // A group whose points differ in neither variable has nothing to fit.
    if !use_p && !use_e {
        return None;
    }
    let cols: Vec<Box<dyn Fn(&(f64, f64, f64)) -> f64>> = {
        let mut c: Vec<Box<dyn Fn(&(f64, f64, f64)) -> f64>> = vec![Box::new(|_| 1.0)];
        if use_p {
            c.push(Box::new(|r| r.0));
        }
        if use_e {
            c.push(Box::new(|r| r.1));
        }
        c
    };
    let n = cols.len();
    if rows.len() < n {
        return None;
    }
    // Normal equations (X'X) beta = X'y, solved by Gaussian elimination.
    let mut a = vec![vec![0.0; n + 1]; n];
    for r in rows {
        let x: Vec<f64> = cols.iter().map(|c| c(r)).collect();
        for i in 0..n {
            for j in 0..n {
                a[i][j] += x[i] * x[j];
            }
            a[i][n] += x[i] * r.2;
        }
    }
    for i in 0..n {
        let piv = (i..n).max_by(|x, y| a[*x][i].abs().total_cmp(&a[*y][i].abs()))?;
        a.swap(i, piv);
        if a[i][i].abs() < 1e-12 {
            return None;
        }
        for k in 0..n {
            if k != i {
                let f = a[k][i] / a[i][i];
                for j in i..=n {
                    a[k][j] -= f * a[i][j];
                }
            }
        }
    }
    let beta: Vec<f64> = (0..n).map(|i| a[i][n] / a[i][i]).collect();
    let predict =
        |r: &(f64, f64, f64)| -> f64 { cols.iter().zip(&beta).map(|(c, b)| c(r) * b).sum() };
    let mean = rows.iter().map(|r| r.2).sum::<f64>() / rows.len() as f64;
    let ss_tot: f64 = rows.iter().map(|r| (r.2 - mean).powi(2)).sum();
    let ss_res: f64 = rows.iter().map(|r| (r.2 - predict(r)).powi(2)).sum();
    let max_rel_error = rows
        .iter()
        .filter(|r| r.2.abs() > 1e-9)
        .map(|r| ((predict(r) - r.2) / r.2).abs())
        .fold(0.0, f64::max);
    let mut it = beta.into_iter();
    let intercept = it.next().unwrap_or(0.0);
    let per_1k_proxies = if use_p { it.next().unwrap_or(0.0) } else { 0.0 };
    let per_1k_endpoints = if use_e { it.next().unwrap_or(0.0) } else { 0.0 };
    Some(Fit {
        group: String::new(),
        metric: String::new(),
        intercept,
        per_1k_proxies,
        per_1k_endpoints,
        points: rows.len(),
        r2: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            1.0
        },
        max_rel_error,
    })
}

/// The table of points and fits (Markdown).
pub fn table(r: &SweepReport) -> String {
    let mut s = format!(
        "# {}{}\n\n{} services, {:.0} s of churn per point, {} cores\n\n| ADS | full push | debounce ms | rate/s | proxies | endpoints | changes | p50 ms | p99 ms | max ms | last proxy p99 ms | B/change | B/change/proxy | pilot CPU s | CPU ms/change | pilot peak RSS MB | missed |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        r.name,
        if r.quick { " (quick)" } else { "" },
        r.services,
        r.duration_s,
        r.machine.cores
    );
    for p in &r.points {
        let c = &p.churn;
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.0} | {} |\n",
            p.xds,
            p.full_push,
            p.debounce_ms,
            p.rate,
            p.proxies,
            p.endpoints,
            c.changes,
            opt(&c.receive_ms, |d| d.p50),
            opt(&c.receive_ms, |d| d.p99),
            opt(&c.receive_ms, |d| d.max),
            opt(&c.last_proxy_ms, |d| d.p99),
            c.bytes_per_change,
            c.bytes_per_change_per_proxy,
            c.pilot_cpu_s,
            p.metric(Metric::CpuMsPerChange).unwrap_or(0.0),
            p.pilot_hwm_mb,
            c.missed
        ));
    }
    s.push_str("\n## Cost model: y = a + b x (proxies / 1000) + c x (endpoints / 1000)\n\n| group | metric | a | b per 1k proxies | c per 1k endpoints | points | R² | max rel. error |\n|---|---|---|---|---|---|---|---|\n");
    for f in &r.fits {
        s.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.3} | {:.1}% |\n",
            f.group,
            f.metric,
            f.intercept,
            f.per_1k_proxies,
            f.per_1k_endpoints,
            f.points,
            f.r2,
            f.max_rel_error * 100.0
        ));
    }
    s
}

/// Curves: p99 propagation vs proxies; pilot CPU and RSS vs endpoints; bytes per change vs
/// proxies (SotW vs delta, incremental vs full push).
pub fn charts(r: &SweepReport) -> Vec<(String, String)> {
    let series = |x: fn(&Point) -> f64, y: fn(&Point) -> Option<f64>, key: fn(&Point) -> String| {
        let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for p in &r.points {
            if let Some(v) = y(p) {
                m.entry(key(p)).or_default().push((x(p), v));
            }
        }
        for v in m.values_mut() {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        m
    };
    let by_proxies_key = |p: &Point| {
        format!(
            "{} {} ep {}/s {}ms",
            p.group_short(),
            p.endpoints,
            p.rate,
            p.debounce_ms
        )
    };
    let by_endpoints_key = |p: &Point| {
        format!(
            "{} {} proxies {}/s {}ms",
            p.group_short(),
            p.proxies,
            p.rate,
            p.debounce_ms
        )
    };
    vec![
        (
            "propagation.svg".into(),
            crate::report::line_chart(
                "p99 change -> simulated proxy vs proxies",
                "simulated proxies",
                "ms",
                &series(
                    |p| p.proxies as f64,
                    |p| p.metric(Metric::ReceiveP99),
                    by_proxies_key,
                ),
            ),
        ),
        (
            "pilot-cpu.svg".into(),
            crate::report::line_chart(
                "pilot CPU per change vs endpoints",
                "endpoints",
                "CPU ms per change",
                &series(
                    |p| p.endpoints as f64,
                    |p| p.metric(Metric::CpuMsPerChange),
                    by_endpoints_key,
                ),
            ),
        ),
        (
            "pilot-rss.svg".into(),
            crate::report::line_chart(
                "pilot peak RSS vs endpoints",
                "endpoints",
                "MB",
                &series(
                    |p| p.endpoints as f64,
                    |p| p.metric(Metric::PilotRss),
                    by_endpoints_key,
                ),
            ),
        ),
        (
            "bytes.svg".into(),
            crate::report::line_chart(
                "bytes pushed per change vs proxies (SotW vs delta)",
                "simulated proxies",
                "bytes per change",
                &series(
                    |p| p.proxies as f64,
                    |p| p.metric(Metric::BytesPerChange),
                    by_proxies_key,
                ),
            ),
        ),
    ]
}

impl Point {
    fn group_short(&self) -> String {
        format!("{}{}", self.xds, if self.full_push { "+full" } else { "" })
    }
}

fn write(r: &SweepReport, dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        dir.join("sweep.json"),
        serde_json::to_string_pretty(r).map_err(std::io::Error::other)?,
    )?;
    std::fs::write(dir.join("sweep.md"), table(r))?;
    for (name, svg) in charts(r) {
        std::fs::write(dir.join(name), svg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_linear_model() {
        // y = 5 + 20 P + 3 E, exactly.
        let rows: Vec<(f64, f64, f64)> =
            [(0.1, 1.0), (0.5, 1.0), (1.0, 1.0), (0.1, 10.0), (1.0, 10.0)]
                .iter()
                .map(|(p, e)| (*p, *e, 5.0 + 20.0 * p + 3.0 * e))
                .collect();
        let f = fit(&rows).unwrap();
        assert!((f.intercept - 5.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_1k_proxies - 20.0).abs() < 1e-6, "{f:?}");
        assert!((f.per_1k_endpoints - 3.0).abs() < 1e-6, "{f:?}");
        assert!((f.r2 - 1.0).abs() < 1e-9 && f.max_rel_error < 1e-9);
        // One varying variable: the other term is left out.
        let f = fit(&[(0.1, 1.0, 2.0), (0.2, 1.0, 4.0)]).unwrap();
        assert!((f.per_1k_proxies - 20.0).abs() < 1e-6 && f.per_1k_endpoints == 0.0);
        // Too few points for the terms, or nothing varies.
        assert!(fit(&[]).is_none());
        assert!(fit(&[(1.0, 10.0, 5.0)]).is_none());
    }
}
