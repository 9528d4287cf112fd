//! `meshbench bench proxy`: direct client->upstream, client->meshbench proxy->upstream,
//! client->Envoy->upstream and client->nginx->upstream in one run, same upstream, same worker
//! thread count, HTTP/1.1 keep-alive; closed loop at 16 and 64 connections, plus a fixed-rate
//! run for added latency. Every closed-loop case is also run with wrk (when installed) right
//! after the generator, so the two instruments are compared on the same target and load.
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
    /// nginx as a lean C reference proxy (one worker, upstream keep-alive, logging off).
    pub nginx: Option<PathBuf>,
    pub meshbench_exe: PathBuf,
    /// Also measure sidecar -> sidecar with and without mutual TLS (`MtlsEntry`).
    pub mtls: bool,
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
    /// CPU microseconds the generator spent per request (the whole harness process).
    pub generator_cpu_us_per_request: Option<f64>,
    /// Open loop: the generator's p99 lateness behind the intended send time.
    pub send_lag_p99_ms: Option<f64>,
    /// wrk on the same target and load, run right after the generator (closed loop only).
    pub wrk: Option<WrkEntry>,
}

/// wrk's figures for one case and target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WrkEntry {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// CPU microseconds wrk spent per request.
    pub cpu_us_per_request: Option<f64>,
    /// The proxy's CPU seconds during the wrk run.
    pub proxy_cpu_s: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub meshbench_version: String,
    pub machine: Machine,
    pub config: Config,
    /// case -> target -> entry (`c16`, `c64`, `rate`; `direct`, `meshbench`, `envoy`, `nginx`)
    pub cases: BTreeMap<String, BTreeMap<String, Entry>>,
    /// Ratios computed from this run.
    pub ratios: BTreeMap<String, f64>,
    /// Whether the generator measures what wrk measures: closed-loop cases where both ran.
    pub generator_vs_wrk: Vec<Agreement>,
    /// `--mtls`: a client sidecar calling a server sidecar (which forwards to the upstream),
    /// plaintext and mutual TLS, pooled and with a new upstream connection per request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mtls: Vec<MtlsEntry>,
    /// mTLS over plaintext, per proxy, connection mode and case, from this run.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mtls_ratios: BTreeMap<String, f64>,
}

/// One sidecar-to-sidecar measurement: CPU and RSS are the two sidecars' together.
#[derive(Clone, Debug, Serialize)]
pub struct MtlsEntry {
    pub proxy: String,
    pub mtls: bool,
    /// A new client -> server connection per request (`maxRequestsPerConnection: 1`): what a
    /// TLS handshake costs.
    pub new_connections: bool,
    pub case: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_us_per_request: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub requests: u64,
    pub errors: u64,
}

/// The generator against wrk on one target and load, from the same run.
#[derive(Clone, Debug, Serialize)]
pub struct Agreement {
    pub case: String,
    pub target: String,
    /// generator / wrk
    pub rps_ratio: f64,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
    /// generator CPU per request / wrk CPU per request
    pub cpu_per_request_ratio: Option<f64>,
}

impl Agreement {
    /// `rps R, p50 R, p99 R, CPU per request R` (generator / wrk).
    fn summary(&self) -> String {
        let cpu = self
            .cpu_per_request_ratio
            .map_or("-".to_string(), |c| format!("{c:.2}"));
        format!(
            "rps {:.2}, p50 {:.2}, p99 {:.2}, CPU per request {cpu}",
            self.rps_ratio, self.p50_ratio, self.p99_ratio
        )
    }
}

/// A wrk latency figure (`236.00us`, `3.41ms`, `1.02s`, `1.50m`) in milliseconds.
fn wrk_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(n * scale)
}

/// Reads wrk's `--latency` output: requests per second, p50, p99 and the request count.
fn parse_wrk(text: &str) -> Option<WrkEntry> {
    let mut e = WrkEntry::default();
    let (mut rps, mut p50, mut p99, mut n) = (None, None, None, None);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => rps = v.parse().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            [count, "requests", "in", ..] => n = count.parse().ok(),
            _ => {}
        }
    }
    e.rps = rps?;
    e.p50_ms = p50?;
    e.p99_ms = p99?;
    e.requests = n?;
    Some(e)
}

/// Runs `wrk -t1 -cN --latency` against `addr` for `duration`; `None` when wrk is not
/// installed or its output has no figures. Its CPU is what this process's waited-for children
/// gained meanwhile (no other child ends during a run).
async fn wrk(addr: SocketAddr, connections: usize, duration: Duration) -> Option<WrkEntry> {
    let before = proc_stats(std::process::id());
    let out = command(Path::new("wrk"), "bench")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs().max(1)),
            "--latency",
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{addr}/"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .await
        .ok()?;
    let after = proc_stats(std::process::id());
    let mut e = parse_wrk(&String::from_utf8_lossy(&out.stdout))?;
    e.cpu_us_per_request = before
        .zip(after)
        .map(|(b, a)| (a.children_cpu_s - b.children_cpu_s) * 1e6 / e.requests.max(1) as f64);
    Some(e)
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

/// The benchmark's load: GET / with the upstream's Host over HTTP/1.1 keep-alive.
fn spec(addr: SocketAddr, connections: usize, duration: Duration, rate: Option<f64>) -> LoadSpec {
    spec_to(addr, HOST, connections, duration, rate)
}

fn spec_to(
    addr: SocketAddr,
    host: &str,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> LoadSpec {
    LoadSpec {
        target: addr,
        host: host.into(),
        path: "/".into(),
        connections,
        duration,
        rate,
        headers: vec![],
        http2: false,
        live: None,
    }
}

/// The Host every target routes on.
const HOST: &str = "upstream:9080";

async fn answers(addr: SocketAddr) -> bool {
    let r = load::run(spec(addr, 1, Duration::from_millis(30), None)).await;
    r.requests > 0 && r.status.keys().all(|s| s == "200")
}

/// nginx's configuration as a reference proxy: one worker in the foreground (one process, so
/// its CPU and RSS are read like the other proxies'), logging off, HTTP/1.1 keep-alive on both
/// sides with no request cap per connection.
fn nginx_conf(dir: &Path, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000000;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         upstream upstream {{ server {upstream}; keepalive 256; keepalive_requests 1000000000; }}\n\
         server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://upstream;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n    }}\n  }}\n}}\n"
    )
}

/// nginx from `MESHBENCH_NGINX`, else `nginx` on the PATH or in /usr/sbin (Debian's).
pub fn find_nginx() -> Option<PathBuf> {
    std::env::var_os("MESHBENCH_NGINX")
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .or_else(|| {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/sbin")])
                .map(|d| d.join("nginx"))
                .find(|p| p.is_file())
        })
}

/// A directory of this run, removed with it.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The upstream every target forwards to: a meshbench workload on a loopback address of this
/// run; killed when the returned process drops.
async fn start_upstream(exe: &Path) -> Result<(Process, SocketAddr), Error> {
    let app_ip = loopback(1);
    let app_port = free_port(&app_ip)?;
    let upstream: SocketAddr = format!("{app_ip}:{app_port}")
        .parse()
        .expect("valid address");
    let workload = spawn(
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
    Ok((workload, upstream))
}

/// `meshbench bench generator`: the generator against wrk on a simple origin (the workload,
/// no proxy, so the two clients are all that differs), alternating, `rounds` times per
/// connection count; agreement is judged on the medians.
#[derive(Clone, Debug, Serialize)]
pub struct GeneratorConfig {
    pub duration: Duration,
    pub rounds: usize,
    pub connections: Vec<usize>,
    pub meshbench_exe: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct GeneratorReport {
    pub schema_version: u32,
    pub machine: Machine,
    pub config: GeneratorConfig,
    /// `cN` -> every round's generator and wrk figures.
    pub rounds: BTreeMap<String, Vec<(Entry, WrkEntry)>>,
    /// Medians of the rounds, generator / wrk.
    pub agreement: Vec<Agreement>,
}

impl GeneratorReport {
    /// The p99 ranges of `case` over the rounds: the generator's (lowest, highest), wrk's.
    fn p99_spread(&self, case: &str) -> Option<((f64, f64), (f64, f64))> {
        let rounds = self.rounds.get(case)?;
        let range = |v: Vec<f64>| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max),
            )
        };
        Some((
            range(rounds.iter().map(|(g, _)| g.p99_ms).collect()),
            range(rounds.iter().map(|(_, w)| w.p99_ms).collect()),
        ))
    }

    /// Agreement within `tolerance` (0.2 = 20%): the medians' p50 within it of wrk's; the
    /// generator's p99 range over the rounds meets wrk's, widened by it (wrk's p99 varies by
    /// several times from one run to the next on a shared machine, so p99 agreement is judged
    /// against its repeatability); CPU per request at most `tolerance` above wrk's.
    /// Errors say which figure disagreed.
    pub fn check(&self, tolerance: f64) -> Result<(), String> {
        let mut bad = Vec::new();
        for a in &self.agreement {
            if (a.p50_ratio - 1.0).abs() > tolerance {
                bad.push(format!("{}: p50 ratio {:.2}", a.case, a.p50_ratio));
            }
            if let Some(((glo, ghi), (lo, hi))) = self.p99_spread(&a.case) {
                if ghi < lo * (1.0 - tolerance) || glo > hi * (1.0 + tolerance) {
                    bad.push(format!(
                        "{}: p99 {glo:.3}..{ghi:.3} ms, apart from wrk's {lo:.3}..{hi:.3} ms",
                        a.case
                    ));
                }
            }
            match a.cpu_per_request_ratio {
                Some(c) if c > 1.0 + tolerance => {
                    bad.push(format!("{}: CPU per request {c:.2}x wrk's", a.case))
                }
                Some(_) => {}
                None => bad.push(format!("{}: no CPU figures", a.case)),
            }
        }
        if self.agreement.is_empty() {
            bad.push("nothing measured".into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the generator disagrees with wrk beyond {:.0}%: {}",
                tolerance * 100.0,
                bad.join("; ")
            ))
        }
    }

    pub fn table(&self) -> String {
        let mut out = String::from("generator / wrk, medians of the rounds (1.00 = the same):\n");
        for a in &self.agreement {
            out.push_str(&format!("  {}: {}\n", a.case, a.summary()));
            if let Some(((glo, ghi), (lo, hi))) = self.p99_spread(&a.case) {
                out.push_str(&format!(
                    "    p99 over the rounds: generator {glo:.3}..{ghi:.3} ms, wrk {lo:.3}..{hi:.3} ms\n"
                ));
            }
        }
        out
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One generator run against `addr` (closed loop, or open at `rate`), with the generator's
/// CPU per request.
async fn generator_run(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Entry {
    let me = std::process::id();
    let before = proc_stats(me);
    let r = load::run(spec(addr, connections, duration, rate)).await;
    let after = proc_stats(me);
    Entry {
        rps: r.achieved_rps,
        p50_ms: r.latency_ms.p50,
        p99_ms: r.latency_ms.p99,
        uncorrected_p50_ms: r.uncorrected_latency_ms.p50,
        errors: r.errors,
        requests: r.requests,
        generator_cpu_us_per_request: before
            .zip(after)
            .map(|(b, a)| (a.cpu_s - b.cpu_s) * 1e6 / r.requests.max(1) as f64),
        send_lag_p99_ms: rate.map(|_| r.send_lag_ms.p99),
        ..Entry::default()
    }
}

/// Runs the generator check. Needs wrk; every process it starts ends with it.
pub async fn generator(cfg: GeneratorConfig, shutdown: Shutdown) -> Result<GeneratorReport, Error> {
    tokio::select! {
        r = run_generator(cfg) => r,
        _ = shutdown.wait() => Err(Error::Interrupted),
    }
}

async fn run_generator(cfg: GeneratorConfig) -> Result<GeneratorReport, Error> {
    let (_workload, upstream) = start_upstream(&cfg.meshbench_exe).await?;
    // Warm both clients' paths once.
    generator_run(upstream, 16, Duration::from_millis(300), None).await;
    let mut report = GeneratorReport {
        schema_version: 1,
        machine: machine(),
        config: cfg.clone(),
        rounds: BTreeMap::new(),
        agreement: Vec::new(),
    };
    for &c in &cfg.connections {
        let case = format!("c{c}");
        let mut rounds = Vec::new();
        for _ in 0..cfg.rounds.max(1) {
            let g = generator_run(upstream, c, cfg.duration, None).await;
            let w = wrk(upstream, c, cfg.duration).await.ok_or_else(|| {
                Error::Environment("wrk is not installed or printed no figures".into())
            })?;
            rounds.push((g, w));
        }
        let m = |f: &dyn Fn(&(Entry, WrkEntry)) -> f64| median(rounds.iter().map(f).collect());
        let cpu = |f: &dyn Fn(&(Entry, WrkEntry)) -> Option<f64>| {
            let v: Option<Vec<f64>> = rounds.iter().map(f).collect();
            v.map(median)
        };
        let gen_cpu = cpu(&|(g, _)| g.generator_cpu_us_per_request);
        let wrk_cpu = cpu(&|(_, w)| w.cpu_us_per_request);
        report.agreement.push(Agreement {
            case: case.clone(),
            target: "direct".into(),
            rps_ratio: m(&|(g, _)| g.rps) / m(&|(_, w)| w.rps),
            p50_ratio: m(&|(g, _)| g.p50_ms) / m(&|(_, w)| w.p50_ms),
            p99_ratio: m(&|(g, _)| g.p99_ms) / m(&|(_, w)| w.p99_ms),
            cpu_per_request_ratio: gen_cpu.zip(wrk_cpu).map(|(g, w)| g / w),
        });
        report.rounds.insert(case, rounds);
    }
    Ok(report)
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
    let (_workload, upstream) = start_upstream(exe).await?;

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
        "apiVersion: v1\nkind: Service\nmetadata: {{name: upstream}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: upstream}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: upstream-0}}\nspec: {{address: {}, labels: {{app: upstream, version: v1}}, ports: {{http: {}}}}}\n",
        upstream.ip(),
        upstream.port()
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
    let dir = RunDir(std::env::temp_dir().join(format!("meshbench-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).map_err(|e| Error::Environment(e.to_string()))?;
    let dir = &dir.0;
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
            router: false,
            capture: false,
        };
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
    let mut _nginx_child = None;
    if let Some(nginx) = &cfg.nginx {
        let ip = loopback(5);
        let listen: SocketAddr = format!("{ip}:{}", free_port(&ip)?).parse().expect("valid");
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, listen, upstream))
            .map_err(|e| Error::Environment(e.to_string()))?;
        let (conf, prefix) = (conf.display().to_string(), format!("{}/", dir.display()));
        let child = spawn(
            nginx,
            &["-p", &prefix, "-e", "stderr", "-c", &conf],
            "nginx",
        )?;
        targets.push(Target {
            name: "nginx",
            addr: listen,
            pid: child.pid(),
        });
        _nginx_child = Some(child);
    }
    for t in &targets {
        wait_for(t.name, Duration::from_secs(20), || answers(t.addr)).await?;
    }

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
        generator_vs_wrk: Vec::new(),
        mtls: Vec::new(),
        mtls_ratios: BTreeMap::new(),
    };
    for t in &targets {
        load::run(spec(t.addr, 16, cfg.warmup, None)).await;
    }
    for (case, connections, rate) in cases {
        for t in &targets {
            let before = t.pid.and_then(proc_stats);
            let mut entry = generator_run(t.addr, connections, cfg.duration, rate).await;
            let after = t.pid.and_then(proc_stats);
            entry.peak_rss_mb = after.map(|a| a.peak_rss_mb);
            entry.cpu_s = before.zip(after).map(|(b, a)| a.cpu_s - b.cpu_s);
            if rate.is_none() {
                let before = t.pid.and_then(proc_stats);
                entry.wrk = wrk(t.addr, connections, cfg.duration).await;
                let after = t.pid.and_then(proc_stats);
                if let Some(w) = &mut entry.wrk {
                    w.proxy_cpu_s = before.zip(after).map(|(b, a)| a.cpu_s - b.cpu_s);
                }
            }
            tracing::info!(
                case,
                target = t.name,
                rps = entry.rps,
                p50_ms = entry.p50_ms,
                p99_ms = entry.p99_ms,
                wrk_rps = entry.wrk.as_ref().map(|w| w.rps),
                wrk_p99_ms = entry.wrk.as_ref().map(|w| w.p99_ms),
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
    report.generator_vs_wrk = agreements(&report.cases);
    if cfg.mtls {
        let clients: Vec<(&'static str, SocketAddr, Option<u32>)> = targets
            .iter()
            .filter(|t| t.name == "meshbench" || t.name == "envoy")
            .map(|t| (t.name, t.addr, t.pid))
            .collect();
        let api = PilotApi::new(pilot.api).with_token(Some(&pilot.token));
        report.mtls = mtls_cases(&cfg, &api, xds, upstream, &clients, dir).await?;
        report.mtls_ratios = mtls_ratios(&report.mtls);
    }
    Ok(report)
}

/// Sidecar to sidecar, plaintext and mTLS: each client sidecar of the run calls a server
/// sidecar of its own kind (Envoy -> Envoy, meshbench -> meshbench) that forwards to the
/// upstream; services `{plain,mtls}-{m,e}[-new]` select the server pods, DestinationRules set
/// `tls.mode` (DISABLE / ISTIO_MUTUAL) and, for `-new`, one request per upstream connection.
async fn mtls_cases(
    cfg: &Config,
    api: &PilotApi,
    xds: SocketAddr,
    upstream: SocketAddr,
    clients: &[(&'static str, SocketAddr, Option<u32>)],
    dir: &Path,
) -> Result<Vec<MtlsEntry>, Error> {
    let exe = &cfg.meshbench_exe;
    let concurrency = cfg.concurrency.to_string();
    let mut servers: Vec<(&'static str, String, Process)> = vec![];
    for (name, ..) in clients {
        let (short, ip) = match *name {
            "meshbench" => ("m", loopback(6)),
            _ => ("e", loopback(7)),
        };
        let app = format!("server-{short}");
        let child = if *name == "meshbench" {
            let id = sidecar_id(&ip, &format!("{app}-0"), "default");
            spawn(
                exe,
                &[
                    "proxy",
                    "--xds",
                    &xds.to_string(),
                    "--node-id",
                    &id,
                    "--label",
                    &format!("app={app}"),
                    "--label",
                    "security.istio.io/tlsMode=istio",
                    "--app-ip",
                    &upstream.ip().to_string(),
                    "--admin",
                    &format!("{ip}:15000"),
                    "--concurrency",
                    &concurrency,
                ],
                "meshbench server sidecar",
            )?
        } else {
            let envoy = cfg
                .envoy
                .as_ref()
                .expect("an envoy client means an envoy binary");
            let b = EnvoyBootstrap {
                pod_ip: ip.clone(),
                pod_name: format!("{app}-0"),
                namespace: "default".into(),
                service: app.clone(),
                labels: [
                    ("app".to_string(), app.clone()),
                    ("security.istio.io/tlsMode".to_string(), "istio".to_string()),
                ]
                .into(),
                app_ip: upstream.ip().to_string(),
                admin: format!("{ip}:15000").parse().expect("valid"),
                xds,
                xds_mode: Default::default(),
                router: false,
                capture: false,
            };
            let bootstrap = dir.join("envoy-server.json");
            std::fs::write(&bootstrap, b.to_json().to_string())
                .map_err(|e| Error::Environment(e.to_string()))?;
            let bootstrap = bootstrap.display().to_string();
            spawn(
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
                "Envoy server sidecar",
            )?
        };
        servers.push((short, ip, child));
    }
    let mut docs = vec![];
    for (short, ip, _) in &servers {
        docs.push(format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: server-{short}-0}}\nspec: {{address: {ip}, labels: {{app: server-{short}, security.istio.io/tlsMode: istio}}, serviceAccount: server-{short}, ports: {{http: {}}}}}\n",
            upstream.port()
        ));
        for (tls, mode) in [("plain", "DISABLE"), ("mtls", "ISTIO_MUTUAL")] {
            for new in [false, true] {
                let name = format!("{tls}-{short}{}", if new { "-new" } else { "" });
                docs.push(format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 9080, name: http, targetPort: {}}}], selector: {{app: server-{short}}}}}\n",
                    upstream.port()
                ));
                let pool = if new {
                    ", connectionPool: {http: {maxRequestsPerConnection: 1}}"
                } else {
                    ""
                };
                docs.push(format!(
                    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\nspec: {{host: {name}, trafficPolicy: {{tls: {{mode: {mode}}}{pool}}}}}\n"
                ));
            }
        }
    }
    let mut api = api.clone();
    api.apply("bench-mtls", &docs.join("---\n"))
        .await
        .map_err(|e| Error::Environment(format!("bench mTLS mesh rejected: {e}")))?;
    let mut out = vec![];
    for ((name, addr, client_pid), (short, _, server)) in clients.iter().zip(&servers) {
        let pids: Vec<u32> = client_pid.iter().copied().chain(server.pid()).collect();
        let usage = || {
            let s: Vec<_> = pids.iter().filter_map(|p| proc_stats(*p)).collect();
            (s.len() == pids.len()).then(|| {
                (
                    s.iter().map(|x| x.cpu_s).sum::<f64>(),
                    s.iter().map(|x| x.peak_rss_mb).sum::<f64>(),
                )
            })
        };
        for new in [false, true] {
            for tls in [false, true] {
                let host = format!(
                    "{}-{short}{}:9080",
                    if tls { "mtls" } else { "plain" },
                    if new { "-new" } else { "" }
                );
                let ready = || async {
                    let r =
                        load::run(spec_to(*addr, &host, 1, Duration::from_millis(30), None)).await;
                    r.requests > 0 && r.status.keys().all(|s| s == "200")
                };
                wait_for(&format!("{name} -> {host}"), Duration::from_secs(20), ready).await?;
                load::run(spec_to(*addr, &host, 16, cfg.warmup, None)).await;
                for (case, connections, rate) in [("c16", 16, None), ("rate", 8, Some(cfg.rate))] {
                    let before = usage();
                    let r = load::run(spec_to(*addr, &host, connections, cfg.duration, rate)).await;
                    let after = usage();
                    let cpu = before.zip(after).map(|(b, a)| a.0 - b.0);
                    let e = MtlsEntry {
                        proxy: name.to_string(),
                        mtls: tls,
                        new_connections: new,
                        case: case.into(),
                        rps: r.achieved_rps,
                        p50_ms: r.latency_ms.p50,
                        p99_ms: r.latency_ms.p99,
                        cpu_us_per_request: cpu.map(|c| 1e6 * c / r.requests.max(1) as f64),
                        peak_rss_mb: after.map(|a| a.1),
                        requests: r.requests,
                        errors: r.errors,
                    };
                    tracing::info!(?e, "measured");
                    out.push(e);
                }
            }
        }
    }
    drop(servers);
    Ok(out)
}

/// mTLS / plaintext for rps, p50, p99 and CPU per request, per proxy, mode and case; and the
/// CPU a handshake adds per request (new connections: mTLS minus plaintext, microseconds).
fn mtls_ratios(entries: &[MtlsEntry]) -> BTreeMap<String, f64> {
    let mut r = BTreeMap::new();
    let find = |proxy: &str, tls: bool, new: bool, case: &str| {
        entries.iter().find(|e| {
            e.proxy == proxy && e.mtls == tls && e.new_connections == new && e.case == case
        })
    };
    for e in entries.iter().filter(|e| e.mtls) {
        let Some(p) = find(&e.proxy, false, e.new_connections, &e.case) else {
            continue;
        };
        let key = format!(
            "{}.{}.{}",
            e.case,
            e.proxy,
            if e.new_connections {
                "new_connections"
            } else {
                "pooled"
            }
        );
        r.insert(format!("{key}.mtls_rps_vs_plain"), e.rps / p.rps);
        r.insert(format!("{key}.mtls_p50_vs_plain"), e.p50_ms / p.p50_ms);
        r.insert(format!("{key}.mtls_p99_vs_plain"), e.p99_ms / p.p99_ms);
        if let (Some(a), Some(b)) = (e.cpu_us_per_request, p.cpu_us_per_request) {
            r.insert(format!("{key}.mtls_cpu_per_request_vs_plain"), a / b);
            if e.new_connections {
                r.insert(format!("{key}.handshake_cpu_us"), a - b);
            }
        }
    }
    r
}

/// The generator against wrk wherever both measured.
fn agreements(cases: &BTreeMap<String, BTreeMap<String, Entry>>) -> Vec<Agreement> {
    let mut out = Vec::new();
    for (case, entries) in cases {
        for (target, e) in entries {
            let Some(w) = &e.wrk else { continue };
            out.push(Agreement {
                case: case.clone(),
                target: target.clone(),
                rps_ratio: e.rps / w.rps,
                p50_ratio: e.p50_ms / w.p50_ms,
                p99_ratio: e.p99_ms / w.p99_ms,
                cpu_per_request_ratio: e
                    .generator_cpu_us_per_request
                    .zip(w.cpu_us_per_request)
                    .map(|(g, w)| g / w),
            });
        }
    }
    out
}

/// The proxies of a run, and the pairs compared (the first against the second).
const PROXIES: [&str; 3] = ["meshbench", "envoy", "nginx"];
const PAIRS: [(&str, &str); 3] = [
    ("meshbench", "envoy"),
    ("meshbench", "nginx"),
    ("envoy", "nginx"),
];

fn ratios(cases: &BTreeMap<String, BTreeMap<String, Entry>>) -> BTreeMap<String, f64> {
    let mut r = BTreeMap::new();
    let per_request = |e: &Entry| e.cpu_s.map(|c| c / e.requests.max(1) as f64);
    for (case, e) in cases {
        let get = |t: &str| e.get(t);
        if let Some(d) = get("direct") {
            for t in PROXIES {
                if let Some(x) = get(t) {
                    r.insert(format!("{case}.{t}_rps_vs_direct"), x.rps / d.rps);
                }
            }
        }
        for (a, b) in PAIRS {
            let (Some(m), Some(v)) = (get(a), get(b)) else {
                continue;
            };
            r.insert(format!("{case}.{a}_rps_vs_{b}"), m.rps / v.rps);
            r.insert(format!("{case}.{a}_p99_vs_{b}"), m.p99_ms / v.p99_ms);
            if let (Some(x), Some(y)) = (m.peak_rss_mb, v.peak_rss_mb) {
                r.insert(format!("{case}.{a}_rss_vs_{b}"), x / y);
            }
            if let (Some(x), Some(y)) = (per_request(m), per_request(v)) {
                r.insert(format!("{case}.{a}_cpu_per_request_vs_{b}"), x / y);
            }
            if let (Some(x), Some(y)) = (&m.wrk, &v.wrk) {
                r.insert(format!("{case}.{a}_wrk_rps_vs_{b}"), x.rps / y.rps);
                r.insert(format!("{case}.{a}_wrk_p99_vs_{b}"), x.p99_ms / y.p99_ms);
            }
        }
        if case == "rate" {
            if let Some(d) = get("direct") {
                let added = |x: &Entry| x.uncorrected_p50_ms - d.uncorrected_p50_ms;
                for t in PROXIES {
                    if let Some(x) = get(t) {
                        r.insert(format!("rate.{t}_added_p50_ms"), added(x));
                    }
                }
                for (a, b) in PAIRS {
                    if let (Some(m), Some(v)) = (get(a), get(b)) {
                        r.insert(format!("rate.{a}_added_p50_vs_{b}"), added(m) / added(v));
                    }
                }
            }
        }
    }
    r
}

/// The table printed at the end of a run: the generator's figures, wrk's beside them.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "{:<5} {:<10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7}\n",
        "case",
        "target",
        "rps",
        "p50 ms",
        "p99 ms",
        "gen us/r",
        "RSS MB",
        "wrk rps",
        "wrk p50",
        "wrk p99",
        "wrk us/r"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for (case, entries) in &report.cases {
        for t in ["direct", "meshbench", "envoy", "nginx"] {
            let Some(e) = entries.get(t) else { continue };
            let w = e.wrk.as_ref();
            out.push_str(&format!(
                "{case:<5} {t:<10} {:>8.0} {:>8.3} {:>8.3} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7}\n",
                e.rps,
                e.p50_ms,
                e.p99_ms,
                opt(e.generator_cpu_us_per_request, 1),
                opt(e.peak_rss_mb, 1),
                opt(w.map(|w| w.rps), 0),
                opt(w.map(|w| w.p50_ms), 3),
                opt(w.map(|w| w.p99_ms), 3),
                opt(w.and_then(|w| w.cpu_us_per_request), 1),
            ));
        }
    }
    if !report.generator_vs_wrk.is_empty() {
        out.push_str("generator / wrk (same target and load):\n");
        for a in &report.generator_vs_wrk {
            out.push_str(&format!("  {} {}: {}\n", a.case, a.target, a.summary()));
        }
    }
    out.push_str("ratios (one run):\n");
    for (k, v) in &report.ratios {
        out.push_str(&format!("  {k}: {v:.3}\n"));
    }
    if !report.mtls.is_empty() {
        out.push_str(&format!(
            "sidecar -> sidecar (CPU and RSS: both sidecars):\n{:<5} {:<10} {:<5} {:<7} {:>8} {:>8} {:>8} {:>9} {:>7} {:>7}\n",
            "case", "proxy", "tls", "conns", "rps", "p50 ms", "p99 ms", "cpu us/r", "RSS MB", "errors"
        ));
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for e in &report.mtls {
            out.push_str(&format!(
                "{:<5} {:<10} {:<5} {:<7} {:>8.0} {:>8.3} {:>8.3} {:>9} {:>7} {:>7}\n",
                e.case,
                e.proxy,
                if e.mtls { "mtls" } else { "plain" },
                if e.new_connections { "new" } else { "pooled" },
                e.rps,
                e.p50_ms,
                e.p99_ms,
                opt(e.cpu_us_per_request),
                opt(e.peak_rss_mb),
                e.errors
            ));
        }
        for (k, v) in &report.mtls_ratios {
            out.push_str(&format!("  {k}: {v:.3}\n"));
        }
    }
    out
}

/// A grouped bar chart (throughput per case and target) as standalone SVG.
pub fn svg(report: &Report) -> String {
    let colors = [
        ("direct", "#888888"),
        ("meshbench", "#2a7ab8"),
        ("envoy", "#c8553d"),
        ("nginx", "#3d9c5a"),
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
    let bar_w = group_w / 5.0;
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
            x0 + bar_w * 2.0,
            h - bottom + 18.0
        ));
    }
    for (i, (t, color)) in colors.iter().enumerate() {
        let x = w - 390.0 + i as f64 * 95.0;
        s.push_str(&format!("<rect x=\"{x}\" y=\"28\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{}\" y=\"37\">{t}</text>\n", x + 14.0));
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `report` as JSON at `path` and the chart beside it (`.svg`).
pub fn write(report: &Report, path: &Path) -> std::io::Result<PathBuf> {
    write_json(report, path)?;
    let svg_path = path.with_extension("svg");
    std::fs::write(&svg_path, svg(report))?;
    Ok(svg_path)
}

/// Writes `value` as pretty JSON at `path`, creating its directory.
pub fn write_json(value: &impl Serialize, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        path,
        serde_json::to_string_pretty(value).map_err(std::io::Error::other)?,
    )
}
