//! `meshbench bench scoping`: what tenant scoping (Istio's `Sidecar`) saves. A mesh of
//! `services` services spread over `tenants` namespaces, with `endpoints` endpoints each, and
//! `proxies` simulated sidecars spread over the same namespaces; measured once with every
//! proxy seeing the whole mesh and once with a Sidecar per tenant importing its own namespace
//! (`./*`, `istio-system/*`), for SotW and delta, each against a fresh pilot process:
//! - bytes per proxy on the initial sync;
//! - per service added in tenant 0 (a Service and its endpoints) and per endpoint added to a
//!   tenant-0 service: bytes sent in all, to tenant 0's proxies and to the others, and how many
//!   proxies were touched;
//! - pilot's CPU per change and its peak RSS;
//! - the RSS of a real meshbench proxy (and of Envoy, when found) in tenant 0.
//!
//! Writes `scoping.json` and `scoping.md` in the output directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::Serialize;

use crate::launch::{command, log_file, PilotArgs, PilotProcess, Process};
use crate::measure::{machine, proc_stats, Machine};
use crate::model::{Workload, WorkloadEntrySpec};
use crate::pilot_client::{Error, PilotApi};
use crate::sim::{Fleet, FleetSpec};
use crate::xds::bootstrap::EnvoyBootstrap;
use crate::xds::node::sidecar_id;
use crate::xds::XdsMode;

#[derive(Clone, Debug)]
pub struct Config {
    pub services: usize,
    pub tenants: usize,
    pub endpoints: usize,
    pub proxies: usize,
    /// Service adds and endpoint changes measured per case.
    pub changes: usize,
    pub meshbench_exe: PathBuf,
    pub envoy: Option<PathBuf>,
    pub out: PathBuf,
}

/// What one kind of change cost, per change (means over the changes).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChangeCost {
    pub changes: usize,
    pub bytes_total: f64,
    pub bytes_own_tenant: f64,
    pub bytes_other_tenants: f64,
    pub proxies_touched: f64,
    pub other_tenant_proxies_touched: f64,
    pub pilot_cpu_ms: f64,
    /// Bytes in all per type (`cds`, `eds`, `lds`, `rds`).
    pub bytes_by_type: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SidecarRss {
    pub proxy: String,
    pub rss_mb: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub scoped: bool,
    pub xds: XdsMode,
    /// Bytes each proxy received until it held the whole config.
    pub initial_bytes_per_proxy_mean: f64,
    pub initial_bytes_per_proxy_max: u64,
    pub initial_bytes_total: u64,
    pub service_add: ChangeCost,
    pub endpoint_add: ChangeCost,
    pub pilot_peak_rss_mb: f64,
    pub pilot_cpu_setup_s: f64,
    pub sidecars: Vec<SidecarRss>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub services: usize,
    pub tenants: usize,
    pub endpoints_per_service: usize,
    pub proxies: usize,
    pub machine: Machine,
    pub cases: Vec<Case>,
}

fn tenant(k: usize, tenants: usize) -> String {
    format!("tenant-{}", k % tenants)
}

fn services_manifest(from: usize, to: usize, tenants: usize) -> String {
    (from..to)
        .map(|k| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{k}, namespace: {}}}\nspec:\n  selector: {{app: svc-{k}}}\n  ports: [{{name: http, port: 8080}}]\n",
                tenant(k, tenants)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn sidecars_manifest(tenants: usize) -> String {
    (0..tenants)
        .map(|t| {
            format!("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: tenant-{t}}}\nspec:\n  egress:\n  - hosts: [\"./*\", \"istio-system/*\"]\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Endpoint `i` of service `k`.
fn endpoint(k: usize, i: usize, tenants: usize) -> Workload {
    Workload {
        name: format!("svc-{k}-ep-{i}"),
        namespace: tenant(k, tenants),
        entry: WorkloadEntrySpec {
            address: format!("172.{}.{}.{}", 16 + k / 256 % 16, k % 256, 1 + i % 250),
            labels: [("app".to_string(), format!("svc-{k}"))].into(),
            ports: Default::default(),
            weight: 1,
            healthy: true,
            service_account: None,
        },
    }
}

/// Bytes each simulated proxy has received so far.
fn bytes(fleet: &Fleet) -> Vec<u64> {
    fleet.sims.iter().map(|s| s.bytes.load(Relaxed)).collect()
}

/// Bytes per proxy, and per type over every proxy (in `PUSH_ORDER`), received so far.
struct Sample(Vec<u64>, [u64; 5]);

fn sample(fleet: &Fleet) -> Sample {
    let mut types = [0; 5];
    for s in &fleet.sims {
        for (o, b) in types.iter_mut().zip(&s.bytes_by_type) {
            *o += b.load(Relaxed);
        }
    }
    Sample(bytes(fleet), types)
}

/// Waits until every proxy of tenant 0 received `version` (or later), then until no proxy
/// receives anything for `quiet` (what other tenants get, if anything, has arrived).
async fn settle(
    fleet: &Fleet,
    tenant0: &[usize],
    version: u64,
    quiet: Duration,
) -> Result<(), Error> {
    let start = tokio::time::Instant::now();
    while !tenant0
        .iter()
        .all(|&i| fleet.sims[i].reached(version).is_some())
    {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Environment(format!(
                "tenant 0's proxies did not all receive version {version} within 60 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut last = fleet.bytes();
    loop {
        tokio::time::sleep(quiet).await;
        let now = fleet.bytes();
        if now == last {
            return Ok(());
        }
        last = now;
    }
}

/// Accumulates one change's per-proxy byte deltas.
fn account(cost: &mut ChangeCost, before: &Sample, after: &Sample, tenants: usize, cpu_s: f64) {
    for ((t, b), a) in crate::xds::PUSH_ORDER.iter().zip(before.1).zip(after.1) {
        *cost
            .bytes_by_type
            .entry(crate::xds::type_short(t).to_string())
            .or_default() += (a - b) as f64;
    }
    for (i, (b, a)) in before.0.iter().zip(&after.0).enumerate() {
        let d = (a - b) as f64;
        cost.bytes_total += d;
        if i % tenants == 0 {
            cost.bytes_own_tenant += d;
        } else {
            cost.bytes_other_tenants += d;
            if d > 0.0 {
                cost.other_tenant_proxies_touched += 1.0;
            }
        }
        if d > 0.0 {
            cost.proxies_touched += 1.0;
        }
    }
    cost.pilot_cpu_ms += cpu_s * 1000.0;
    cost.changes += 1;
}

fn mean(mut c: ChangeCost) -> ChangeCost {
    let n = c.changes.max(1) as f64;
    for v in [
        &mut c.bytes_total,
        &mut c.bytes_own_tenant,
        &mut c.bytes_other_tenants,
        &mut c.proxies_touched,
        &mut c.other_tenant_proxies_touched,
        &mut c.pilot_cpu_ms,
    ] {
        *v /= n;
    }
    for v in c.bytes_by_type.values_mut() {
        *v /= n;
    }
    c
}

fn loopback(k: u8) -> String {
    let pid = std::process::id();
    format!("127.{}.{}.{k}", 150 + pid % 50, (pid / 50) % 250)
}

/// A real meshbench proxy and (when found) Envoy as sidecars in tenant 0; returns them once
/// pilot has them synced to `version`, with their RSS.
async fn real_sidecars(
    cfg: &Config,
    pilot: &PilotApi,
    xds: std::net::SocketAddr,
    version: u64,
    case: usize,
) -> Result<(Vec<Process>, Vec<(String, u32, String)>), Error> {
    let mut procs = Vec::new();
    let mut ids = Vec::new();
    let ip = loopback(10 + 2 * case as u8);
    let node = sidecar_id(&ip, "real-mesh", "tenant-0");
    let mut c = command(&cfg.meshbench_exe, "scoping");
    c.args([
        "proxy",
        "--xds",
        &xds.to_string(),
        "--node-id",
        &node,
        "--label",
        "app=client",
        "--concurrency",
        "1",
    ])
    .stderr(log_file(&cfg.out, &format!("proxy-{case}")));
    let p = Process::spawn(c, "meshbench proxy")?;
    ids.push(("meshbench".to_string(), p.pid().unwrap_or(0), node));
    procs.push(p);
    if let Some(envoy) = &cfg.envoy {
        let ip = loopback(11 + 2 * case as u8);
        let b = EnvoyBootstrap {
            pod_ip: ip.clone(),
            pod_name: "real-envoy".into(),
            namespace: "tenant-0".into(),
            service: "client".into(),
            labels: [("app".to_string(), "client".to_string())].into(),
            app_ip: "127.0.0.1".into(),
            admin: format!("{ip}:15000").parse().expect("valid"),
            xds,
            xds_mode: Default::default(),
            router: false,
            capture: false,
        };
        let path = cfg.out.join(format!("envoy-{case}.json"));
        std::fs::write(&path, b.to_json().to_string())
            .map_err(|e| Error::Environment(format!("{}: {e}", path.display())))?;
        let mut c = command(envoy, "scoping");
        c.arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "--log-level",
                "error",
            ])
            .stderr(log_file(&cfg.out, &format!("envoy-{case}")));
        let p = Process::spawn(c, "Envoy")?;
        ids.push(("envoy".to_string(), p.pid().unwrap_or(0), b.node_id()));
        procs.push(p);
    }
    let start = tokio::time::Instant::now();
    loop {
        let synced = pilot.proxies(None).await.map(|list| {
            ids.iter().all(|(_, _, id)| {
                list.iter()
                    .any(|p| &p.node.id == id && p.synced_version.is_some_and(|v| v >= version))
            })
        });
        if synced.unwrap_or(false) {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(Error::Environment(
                "the real sidecars did not sync within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((procs, ids))
}

async fn run_case(cfg: &Config, scoped: bool, xds: XdsMode, case: usize) -> Result<Case, Error> {
    let pid = std::process::id();
    let ip = format!(
        "127.{}.{}.{}",
        100 + pid % 50,
        (pid / 50) % 250,
        1 + case % 250
    );
    let args = PilotArgs::new(
        format!("{ip}:15010").parse().expect("valid"),
        format!("{ip}:15080").parse().expect("valid"),
    );
    let pilot_proc = PilotProcess::start(
        &cfg.meshbench_exe,
        &args,
        "scoping",
        log_file(&cfg.out, &format!("pilot-{case}")),
    )
    .await?;
    let pilot_pid = pilot_proc.pid().unwrap_or(0);
    let cpu = || proc_stats(pilot_pid).map_or(0.0, |s| s.cpu_s);
    let mut pilot = PilotApi::new(pilot_proc.api).with_token(Some(&pilot_proc.token));
    let mut version = pilot
        .apply(
            "services.yaml",
            &services_manifest(0, cfg.services, cfg.tenants),
        )
        .await?
        .version;
    if scoped {
        version = pilot
            .apply("sidecars.yaml", &sidecars_manifest(cfg.tenants))
            .await?
            .version;
    }
    let all: Vec<Workload> = (0..cfg.services)
        .flat_map(|k| (0..cfg.endpoints).map(move |i| (k, i)))
        .map(|(k, i)| endpoint(k, i, cfg.tenants))
        .collect();
    for chunk in all.chunks(2000) {
        version = pilot.register(chunk.to_vec()).await?.version;
    }
    let namespaces: Vec<String> = (0..cfg.tenants).map(|t| format!("tenant-{t}")).collect();
    let fleet = Fleet::start(
        pilot_proc.xds,
        &FleetSpec {
            proxies: cfg.proxies,
            mode: xds,
            ack_delay: Duration::ZERO,
            nack_fraction: 0.0,
            namespaces,
        },
    )
    .await
    .map_err(Error::Environment)?;
    fleet
        .wait_ready(Duration::from_secs(120))
        .await
        .map_err(Error::Environment)?;
    let tenant0: Vec<usize> = (0..cfg.proxies).step_by(cfg.tenants).collect();
    let quiet = Duration::from_millis(500);
    settle(&fleet, &tenant0, version, quiet).await?;
    let initial = bytes(&fleet);
    let setup_cpu = cpu();
    let (_procs, real) = real_sidecars(cfg, &pilot, pilot_proc.xds, version, case).await?;
    let sidecars = real
        .iter()
        .map(|(name, pid, _)| SidecarRss {
            proxy: name.clone(),
            rss_mb: proc_stats(*pid).map_or(0.0, |s| s.rss_mb),
        })
        .collect();

    let mut service_add = ChangeCost::default();
    for j in 0..cfg.changes {
        let k = cfg.services + j * cfg.tenants; // a tenant-0 service
        let before = sample(&fleet);
        let cpu0 = cpu();
        pilot
            .apply(
                &format!("svc-{k}.yaml"),
                &services_manifest(k, k + 1, cfg.tenants),
            )
            .await?;
        let eps = (0..cfg.endpoints)
            .map(|i| endpoint(k, i, cfg.tenants))
            .collect();
        let v = pilot.register(eps).await?.version;
        settle(&fleet, &tenant0, v, quiet).await?;
        account(
            &mut service_add,
            &before,
            &sample(&fleet),
            cfg.tenants,
            cpu() - cpu0,
        );
    }
    let mut endpoint_add = ChangeCost::default();
    for j in 0..cfg.changes {
        let before = sample(&fleet);
        let cpu0 = cpu();
        let v = pilot
            .register(vec![endpoint(0, cfg.endpoints + j, cfg.tenants)])
            .await?
            .version;
        settle(&fleet, &tenant0, v, quiet).await?;
        account(
            &mut endpoint_add,
            &before,
            &sample(&fleet),
            cfg.tenants,
            cpu() - cpu0,
        );
    }
    let pilot_peak_rss_mb = proc_stats(pilot_pid).map_or(0.0, |s| s.peak_rss_mb);
    fleet.stop().await;
    Ok(Case {
        scoped,
        xds,
        initial_bytes_per_proxy_mean: initial.iter().sum::<u64>() as f64
            / initial.len().max(1) as f64,
        initial_bytes_per_proxy_max: initial.iter().copied().max().unwrap_or(0),
        initial_bytes_total: initial.iter().sum(),
        service_add: mean(service_add),
        endpoint_add: mean(endpoint_add),
        pilot_peak_rss_mb,
        pilot_cpu_setup_s: setup_cpu,
        sidecars,
    })
}

/// Runs every case (unscoped and scoped, SotW and delta) and writes the report.
pub async fn run(cfg: Config, say: impl Fn(&str)) -> Result<Report, Error> {
    std::fs::create_dir_all(&cfg.out)
        .map_err(|e| Error::Environment(format!("{}: {e}", cfg.out.display())))?;
    let mut cases = Vec::new();
    for (i, (scoped, xds)) in [
        (false, XdsMode::Sotw),
        (true, XdsMode::Sotw),
        (false, XdsMode::Delta),
        (true, XdsMode::Delta),
    ]
    .into_iter()
    .enumerate()
    {
        say(&format!(
            "{} services in {} tenants, {} proxies, {xds}, {}",
            cfg.services,
            cfg.tenants,
            cfg.proxies,
            if scoped {
                "a Sidecar per tenant"
            } else {
                "no scoping"
            }
        ));
        cases.push(run_case(&cfg, scoped, xds, i).await?);
    }
    let report = Report {
        services: cfg.services,
        tenants: cfg.tenants,
        endpoints_per_service: cfg.endpoints,
        proxies: cfg.proxies,
        machine: machine(),
        cases,
    };
    write(&report, &cfg.out)?;
    Ok(report)
}

/// The report as a Markdown table, with the unscoped/scoped ratios per ADS method.
pub fn table(r: &Report) -> String {
    let mut t = format!(
        "{} services in {} tenants ({} endpoints each), {} simulated proxies\n\n| xds | scoping | initial bytes/proxy | service add: bytes total | own tenant | other tenants | proxies touched (other tenants) | pilot ms | endpoint add: bytes total | proxies touched (other tenants) | pilot ms | pilot peak RSS MB | sidecar RSS MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        r.services, r.tenants, r.endpoints_per_service, r.proxies
    );
    for c in &r.cases {
        t += &format!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} ({:.0}) | {:.1} | {:.0} | {:.0} ({:.0}) | {:.1} | {:.1} | {} |\n",
            c.xds,
            if c.scoped { "Sidecar per tenant" } else { "none" },
            c.initial_bytes_per_proxy_mean,
            c.service_add.bytes_total,
            c.service_add.bytes_own_tenant,
            c.service_add.bytes_other_tenants,
            c.service_add.proxies_touched,
            c.service_add.other_tenant_proxies_touched,
            c.service_add.pilot_cpu_ms,
            c.endpoint_add.bytes_total,
            c.endpoint_add.proxies_touched,
            c.endpoint_add.other_tenant_proxies_touched,
            c.endpoint_add.pilot_cpu_ms,
            c.pilot_peak_rss_mb,
            c.sidecars
                .iter()
                .map(|s| format!("{} {:.1}", s.proxy, s.rss_mb))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    t += "\nbytes per service add by type (all proxies):\n\n";
    for c in &r.cases {
        t += &format!(
            "- {} {}: {}\n",
            c.xds,
            if c.scoped {
                "Sidecar per tenant"
            } else {
                "no scoping"
            },
            c.service_add
                .bytes_by_type
                .iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    t += "\nunscoped / scoped, same ADS method:\n\n";
    for xds in [XdsMode::Sotw, XdsMode::Delta] {
        let find = |scoped| r.cases.iter().find(|c| c.xds == xds && c.scoped == scoped);
        if let (Some(u), Some(s)) = (find(false), find(true)) {
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.1}x", a / b)
                } else {
                    "inf".into()
                }
            };
            t += &format!(
                "- {xds}: initial bytes per proxy {}, bytes per service add {}, per endpoint add {}\n",
                ratio(u.initial_bytes_per_proxy_mean, s.initial_bytes_per_proxy_mean),
                ratio(u.service_add.bytes_total, s.service_add.bytes_total),
                ratio(u.endpoint_add.bytes_total, s.endpoint_add.bytes_total),
            );
        }
    }
    t
}

fn write(r: &Report, dir: &Path) -> Result<(), Error> {
    let e = |e: std::io::Error| Error::Environment(format!("{}: {e}", dir.display()));
    std::fs::write(
        dir.join("scoping.json"),
        serde_json::to_string_pretty(r).unwrap_or_default(),
    )
    .map_err(e)?;
    std::fs::write(dir.join("scoping.md"), table(r)).map_err(e)
}
