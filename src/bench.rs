//! `meshbench bench proxy`: direct client->upstream, client->meshbench proxy->upstream and
//! client->Envoy->upstream in one run, same upstream, same worker thread count, HTTP/1.1
//! keep-alive; closed loop at 16 and 64 connections, plus a fixed-rate run for added latency.
//! Writes JSON (`reports/bench/proxy.json` by default), a table, and an SVG chart beside it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::launch::{command, PilotArgs, PilotProcess, Process};
use crate::load::{self, LoadSpec};
use crate::measure::{machine, proc_stats, Machine};
use crate::pilot_client::PilotApi;
use crate::shutdown::Shutdown;
use crate::xds::bootstrap::EnvoyBootstrap;
use crate::xds::node::sidecar_id;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub out: PathBuf,
    pub duration: Duration,
    pub warmup: Duration,
    /// Requests per second of the fixed-rate case.
    pub rate: f64,
    /// Worker threads of both proxies (Envoy's --concurrency).
    pub concurrency: usize,
    pub envoy: Option<PathBuf>,
    pub meshbench_exe: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Environment(String),
    #[error("interrupted")]
    Interrupted,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Entry {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the actual send time. At a fixed rate far below saturation this is the hop's
    /// cost; the corrected figures above also carry the generator timer's millisecond slack.
    pub uncorrected_p50_ms: f64,
    /// Peak RSS of the proxy process so far (null for direct: there is no proxy).
    pub peak_rss_mb: Option<f64>,
    /// CPU seconds the proxy process used during this case.
    pub cpu_s: Option<f64>,
    pub errors: u64,
    pub requests: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub meshbench_version: String,
    pub machine: Machine,
    pub config: Config,
    /// case -> target -> entry (`c16`, `c64`, `rate`; `direct`, `meshbench`, `envoy`)
    pub cases: BTreeMap<String, BTreeMap<String, Entry>>,
    /// Ratios computed from this run.
    pub ratios: BTreeMap<String, f64>,
    /// The generator's own ceiling: wrk (when installed) against the same upstream, same
    /// connection count, beside the generator's direct c16 figure.
    pub generator_vs_wrk: Option<GeneratorCheck>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorCheck {
    pub connections: usize,
    pub meshbench_rps: f64,
    pub wrk_rps: f64,
    /// meshbench / wrk
    pub ratio: f64,
}

/// Runs `wrk -t1 -cN` against `addr` for `duration`; requests per second, or `None` when
/// wrk is not installed or its output has no figure.
async fn wrk(addr: SocketAddr, host: &str, connections: usize, duration: Duration) -> Option<f64> {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "-H",
            &format!("Host: {host}"),
            &format!("http://{addr}/"),
        ])
        .kill_on_drop(true)
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

struct Target {
    name: &'static str,
    addr: SocketAddr,
    pid: Option<u32>,
}

/// A loopback /24 of our own: 127.N.M.0 from the pid, away from the ranges tests use.
fn loopback(host: u8) -> String {
    let pid = std::process::id();
    format!("127.{}.{}.{host}", 200 + pid % 50, (pid / 50) % 250)
}

fn free_port(ip: &str) -> Result<u16, Error> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Environment(format!("cannot bind {ip}: {e}")))
}

/// A child of this run (killed with it), output discarded.
fn spawn(exe: &Path, args: &[&str], what: &str) -> Result<Process, Error> {
    let mut c = command(exe, "bench");
    c.args(args).stderr(Stdio::null());
    Process::spawn(c, what).map_err(|e| Error::Environment(e.to_string()))
}

async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> Result<(), Error> {
    let start = tokio::time::Instant::now();
    while !f().await {
        if start.elapsed() > limit {
            return Err(Error::Environment(format!(
                "{what} did not come up within {limit:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn answers(addr: SocketAddr, host: &str) -> bool {
    let spec = LoadSpec {
        target: addr,
        host: host.into(),
        path: "/".into(),
        connections: 1,
        duration: Duration::from_millis(30),
        rate: None,
        headers: vec![],
        http2: false,
        live: None,
    };
    let r = load::run(spec).await;
    r.requests > 0 && r.status.keys().all(|s| s == "200")
}

/// Runs the comparison. Every process it starts is killed when this returns, also on error
/// and on `shutdown`.
pub async fn proxy(cfg: Config, shutdown: Shutdown) -> Result<Report, Error> {
    tokio::select! {
        r = run(cfg) => r,
        _ = shutdown.wait() => Err(Error::Interrupted),
    }
}

async fn run(cfg: Config) -> Result<Report, Error> {
    let exe = &cfg.meshbench_exe;
    let app_ip = loopback(1);
    let app_port = free_port(&app_ip)?;
    let upstream: SocketAddr = format!("{app_ip}:{app_port}")
        .parse()
        .expect("valid address");
    let _workload = spawn(
        exe,
        &[
            "workload",
            "--service",
            "upstream",
            "--version",
            "v1",
            "--addr",
            &upstream.to_string(),
        ],
        "the upstream workload",
    )?;
    wait_for("upstream", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(upstream).await.is_ok()
    })
    .await?;

    // The control plane: idle during the measured runs.
    let pilot_ip = loopback(4);
    let free = |ip: &str| -> Result<SocketAddr, Error> {
        Ok(format!("{ip}:{}", free_port(ip)?).parse().expect("valid"))
    };
    let mut args = PilotArgs::new(free(&pilot_ip)?, free(&pilot_ip)?);
    args.debounce = Duration::ZERO;
    let pilot = PilotProcess::start(exe, &args, "bench", Stdio::null())
        .await
        .map_err(|e| Error::Environment(e.to_string()))?;
    let mesh = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: upstream}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: upstream}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: upstream-0}}\nspec: {{address: {app_ip}, labels: {{app: upstream, version: v1}}, ports: {{http: {app_port}}}}}\n"
    );
    PilotApi::new(pilot.api)
        .with_token(Some(&pilot.token))
        .apply("bench", &mesh)
        .await
        .map_err(|e| Error::Environment(format!("bench mesh rejected: {e}")))?;
    let xds = pilot.xds;

    let mut targets = vec![Target {
        name: "direct",
        addr: upstream,
        pid: None,
    }];
    let mesh_ip = loopback(2);
    let mesh_id = sidecar_id(&mesh_ip, "bench-meshbench", "default");
    let concurrency = cfg.concurrency.to_string();
    let mesh_child = spawn(
        exe,
        &[
            "proxy",
            "--xds",
            &xds.to_string(),
            "--node-id",
            &mesh_id,
            "--label",
            "app=client",
            "--admin",
            &format!("{mesh_ip}:15000"),
            "--concurrency",
            &concurrency,
        ],
        "meshbench proxy",
    )?;
    targets.push(Target {
        name: "meshbench",
        addr: format!("{mesh_ip}:15001").parse().expect("valid"),
        pid: mesh_child.pid(),
    });
    let dir = std::env::temp_dir().join(format!("meshbench-bench-{}", std::process::id()));
    let mut _envoy_child = None;
    if let Some(envoy) = &cfg.envoy {
        let envoy_ip = loopback(3);
        let b = EnvoyBootstrap {
            pod_ip: envoy_ip.clone(),
            pod_name: "bench-envoy".into(),
            namespace: "default".into(),
            service: "client".into(),
            labels: [("app".to_string(), "client".to_string())].into(),
            app_ip: "127.0.0.1".into(),
            admin: format!("{envoy_ip}:15000").parse().expect("valid"),
            xds,
            xds_mode: Default::default(),
        };
        std::fs::create_dir_all(&dir).map_err(|e| Error::Environment(e.to_string()))?;
        let bootstrap = dir.join("envoy.json");
        std::fs::write(&bootstrap, b.to_json().to_string())
            .map_err(|e| Error::Environment(e.to_string()))?;
        let bootstrap = bootstrap.display().to_string();
        let child = spawn(
            envoy,
            &[
                "-c",
                &bootstrap,
                "--concurrency",
                &concurrency,
                "--use-dynamic-base-id",
                "--log-level",
                "error",
            ],
            "Envoy",
        )?;
        targets.push(Target {
            name: "envoy",
            addr: format!("{envoy_ip}:15001").parse().expect("valid"),
            pid: child.pid(),
        });
        _envoy_child = Some(child);
    }
    for t in &targets {
        wait_for(t.name, Duration::from_secs(20), || {
            answers(t.addr, "upstream:9080")
        })
        .await?;
    }
    let _ = std::fs::remove_dir_all(&dir);

    let cases: [(&str, usize, Option<f64>); 3] = [
        ("c16", 16, None),
        ("c64", 64, None),
        ("rate", 8, Some(cfg.rate)),
    ];
    let mut report = Report {
        schema_version: 1,
        meshbench_version: env!("CARGO_PKG_VERSION").into(),
        machine: machine(),
        config: cfg.clone(),
        cases: BTreeMap::new(),
        ratios: BTreeMap::new(),
        generator_vs_wrk: None,
    };
    for t in &targets {
        let spec = LoadSpec {
            target: t.addr,
            host: "upstream:9080".into(),
            path: "/".into(),
            connections: 16,
            duration: cfg.warmup,
            rate: None,
            headers: vec![],
            http2: false,
            live: None,
        };
        load::run(spec).await;
    }
    for (case, connections, rate) in cases {
        for t in &targets {
            let before = t.pid.and_then(proc_stats);
            let spec = LoadSpec {
                target: t.addr,
                host: "upstream:9080".into(),
                path: "/".into(),
                connections,
                duration: cfg.duration,
                rate,
                headers: vec![],
                http2: false,
                live: None,
            };
            let r = load::run(spec).await;
            let after = t.pid.and_then(proc_stats);
            let entry = Entry {
                rps: r.achieved_rps,
                p50_ms: r.latency_ms.p50,
                p99_ms: r.latency_ms.p99,
                uncorrected_p50_ms: r.uncorrected_latency_ms.p50,
                peak_rss_mb: after.map(|a| a.peak_rss_mb),
                cpu_s: before.zip(after).map(|(b, a)| a.cpu_s - b.cpu_s),
                errors: r.errors,
                requests: r.requests,
            };
            tracing::info!(
                case,
                target = t.name,
                rps = entry.rps,
                p50_ms = entry.p50_ms,
                p99_ms = entry.p99_ms,
                "measured"
            );
            report
                .cases
                .entry(case.to_string())
                .or_default()
                .insert(t.name.to_string(), entry);
        }
    }
    report.ratios = ratios(&report.cases);
    if let Some(wrk_rps) = wrk(upstream, "upstream:9080", 16, cfg.duration).await {
        let meshbench_rps = report
            .cases
            .get("c16")
            .and_then(|c| c.get("direct"))
            .map_or(0.0, |e| e.rps);
        report.generator_vs_wrk = Some(GeneratorCheck {
            connections: 16,
            meshbench_rps,
            wrk_rps,
            ratio: meshbench_rps / wrk_rps,
        });
    }
    Ok(report)
}

fn ratios(cases: &BTreeMap<String, BTreeMap<String, Entry>>) -> BTreeMap<String, f64> {
    let mut r = BTreeMap::new();
    for (case, e) in cases {
        let get = |t: &str| e.get(t);
        if let (Some(d), Some(m)) = (get("direct"), get("meshbench")) {
            r.insert(format!("{case}.meshbench_rps_vs_direct"), m.rps / d.rps);
        }
        if let (Some(m), Some(v)) = (get("meshbench"), get("envoy")) {
            r.insert(format!("{case}.meshbench_rps_vs_envoy"), m.rps / v.rps);
            r.insert(
                format!("{case}.meshbench_p99_vs_envoy"),
                m.p99_ms / v.p99_ms,
            );
            if let (Some(a), Some(b)) = (m.peak_rss_mb, v.peak_rss_mb) {
                r.insert(format!("{case}.meshbench_rss_vs_envoy"), a / b);
            }
            if let (Some(a), Some(b)) = (m.cpu_s, v.cpu_s) {
                r.insert(
                    format!("{case}.meshbench_cpu_per_request_vs_envoy"),
                    (a / m.requests.max(1) as f64) / (b / v.requests.max(1) as f64),
                );
            }
        }
        if case == "rate" {
            if let Some(d) = get("direct") {
                for t in ["meshbench", "envoy"] {
                    if let Some(x) = get(t) {
                        r.insert(
                            format!("rate.{t}_added_p50_ms"),
                            x.uncorrected_p50_ms - d.uncorrected_p50_ms,
                        );
                    }
                }
                if let (Some(m), Some(v)) = (get("meshbench"), get("envoy")) {
                    r.insert(
                        "rate.meshbench_added_p50_vs_envoy".into(),
                        (m.uncorrected_p50_ms - d.uncorrected_p50_ms)
                            / (v.uncorrected_p50_ms - d.uncorrected_p50_ms),
                    );
                }
            }
        }
    }
    r
}

/// The table printed at the end of a run.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<6} {:<10} {:>10} {:>9} {:>9} {:>9} {:>8}\n",
        "case", "target", "rps", "p50 ms", "p99 ms", "RSS MB", "CPU s"
    );
    for (case, entries) in &report.cases {
        for t in ["direct", "meshbench", "envoy"] {
            if let Some(e) = entries.get(t) {
                let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
                out.push_str(&format!(
                    "{case:<6} {t:<10} {:>10.0} {:>9.3} {:>9.3} {:>9} {:>8}\n",
                    e.rps,
                    e.p50_ms,
                    e.p99_ms,
                    opt(e.peak_rss_mb),
                    opt(e.cpu_s)
                ));
            }
        }
    }
    if let Some(g) = &report.generator_vs_wrk {
        out.push_str(&format!(
            "generator ceiling (direct, c{}): meshbench {:.0} rps, wrk {:.0} rps (ratio {:.2})\n",
            g.connections, g.meshbench_rps, g.wrk_rps, g.ratio
        ));
    }
    out.push_str("ratios (one run):\n");
    for (k, v) in &report.ratios {
        out.push_str(&format!("  {k}: {v:.3}\n"));
    }
    out
}

/// A grouped bar chart (throughput per case and target) as standalone SVG.
pub fn svg(report: &Report) -> String {
    let colors = [
        ("direct", "#888888"),
        ("meshbench", "#2a7ab8"),
        ("envoy", "#c8553d"),
    ];
    let cases: Vec<&String> = report.cases.keys().collect();
    let max = report
        .cases
        .values()
        .flat_map(|e| e.values())
        .map(|e| e.rps)
        .fold(1.0, f64::max);
    let (w, h, left, bottom, top) = (720.0, 360.0, 70.0, 40.0, 40.0);
    let plot_h = h - bottom - top;
    let group_w = (w - left - 20.0) / cases.len().max(1) as f64;
    let bar_w = group_w / 4.0;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s.push_str(&format!("<text x=\"{left}\" y=\"20\" font-size=\"14\">Throughput (requests/s), same upstream, {} worker thread(s)</text>\n", report.config.concurrency));
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = h - bottom - plot_h * i as f64 / 4.0;
        s.push_str(&format!("<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n", w - 20.0, left - 6.0, y + 4.0, v));
    }
    for (gi, case) in cases.iter().enumerate() {
        let x0 = left + gi as f64 * group_w + bar_w / 2.0;
        for (bi, (t, color)) in colors.iter().enumerate() {
            if let Some(e) = report.cases[*case].get(*t) {
                let bh = plot_h * e.rps / max;
                let x = x0 + bi as f64 * bar_w;
                s.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{color}\"><title>{t} {case}: {:.0} rps, p50 {:.3} ms, p99 {:.3} ms</title></rect>\n",
                    h - bottom - bh,
                    bar_w * 0.9,
                    e.rps,
                    e.p50_ms,
                    e.p99_ms
                ));
            }
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{case}</text>\n",
            x0 + bar_w * 1.5,
            h - bottom + 18.0
        ));
    }
    for (i, (t, color)) in colors.iter().enumerate() {
        let x = w - 300.0 + i as f64 * 95.0;
        s.push_str(&format!("<rect x=\"{x}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"37\">{t}</text>\n", x + 14.0));
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `report` as JSON at `path` and the chart beside it (`.svg`).
pub fn write(report: &Report, path: &Path) -> std::io::Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(report).map_err(std::io::Error::other)?,
    )?;
    let svg_path = path.with_extension("svg");
    std::fs::write(&svg_path, svg(report))?;
    Ok(svg_path)
}
