//! Endpoint churn at scale: a synthetic mesh (services in namespace `churn`, endpoints on
//! 172.16.0.0/12) registered through pilot's REST API, simulated proxies subscribed to it, then
//! endpoints added, removed and flipped unhealthy at a set rate for a duration. Every change is
//! timestamped by pilot (accepted_at_ms) and carries the config version it produced; each
//! simulated proxy records when it first received that version and when it ACKed it, and real
//! sidecars' push/ACK times come from pilot's per-proxy history. Used by the `churn` scenario
//! step and by `meshbench sweep`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;

use crate::model::{Workload, WorkloadEntrySpec};
use crate::pilot::api::{EndpointBatch, EndpointRef, EndpointsApplied};
use crate::pilot_client::{Counters, Error, HttpClient, PilotApi};
use crate::report::{ChurnResult, Dist};
use crate::scenario::ChurnSpec;
use crate::sim::{Fleet, FleetSpec, SIM_NAMESPACE};

/// Namespace of the synthetic services and endpoints.
pub const NAMESPACE: &str = "churn";
/// Endpoints registered per REST batch while setting up.
const SETUP_BATCH: usize = 2000;

/// The synthetic services, as a Kubernetes manifest: `churn-svc-K`, port 8080, selector
/// `app: churn-svc-K`.
pub fn services_manifest(services: usize) -> String {
    (0..services)
        .map(|k| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: churn-svc-{k}, namespace: {NAMESPACE}}}\nspec:\n  selector: {{app: churn-svc-{k}}}\n  ports: [{{name: http, port: 8080}}]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Address of endpoint `i` of the synthetic mesh.
pub fn endpoint_ip(i: usize) -> String {
    format!("172.{}.{}.{}", 16 + i / 65536, (i / 256) % 256, i % 256)
}

/// Endpoint `i` of the synthetic mesh (spread round-robin over the services).
pub fn endpoint(i: usize, services: usize, healthy: bool) -> Workload {
    Workload {
        name: format!("churn-ep-{i}"),
        namespace: NAMESPACE.into(),
        entry: WorkloadEntrySpec {
            address: endpoint_ip(i),
            labels: [("app".to_string(), format!("churn-svc-{}", i % services))].into(),
            ports: Default::default(),
            weight: 1,
            healthy,
            service_account: None,
        },
    }
}

/// Where the churn reaches pilot, and how to read pilot's CPU and memory.
pub struct Target<'a> {
    pub pilot: &'a mut PilotApi,
    pub xds: SocketAddr,
    /// Pilot's (cpu_s, rss_mb) now.
    pub usage: &'a (dyn Fn() -> Option<(f64, f64)> + Sync),
    /// Admin addresses of the real sidecars (Envoy-style `/clusters?format=json`), whose
    /// endpoint tables are checked against the registry after the churn.
    pub sidecar_admins: Vec<SocketAddr>,
}

/// The synthetic mesh registered so far (kept across churn steps of one run).
#[derive(Debug, Default)]
pub struct Registered {
    pub services: usize,
    /// Endpoint index -> healthy, for the endpoints present.
    pub present: BTreeMap<usize, bool>,
    pub absent: Vec<usize>,
    /// Version after the last change.
    pub version: u64,
}

/// Registers the services and endpoints (if `reg` does not hold them already).
pub async fn setup(
    t: &mut Target<'_>,
    spec: &ChurnSpec,
    reg: &mut Registered,
) -> Result<(), Error> {
    if reg.services == spec.services && reg.present.len() + reg.absent.len() == spec.endpoints {
        return Ok(());
    }
    if reg.services != 0 {
        return Err(Error::Config(format!(
            "a run churns one synthetic mesh: {} services / {} endpoints registered already",
            reg.services,
            reg.present.len() + reg.absent.len()
        )));
    }
    reg.version = t
        .pilot
        .apply("churn-services.yaml", &services_manifest(spec.services))
        .await?
        .version;
    reg.services = spec.services;
    for start in (0..spec.endpoints).step_by(SETUP_BATCH) {
        let add = (start..(start + SETUP_BATCH).min(spec.endpoints))
            .map(|i| endpoint(i, spec.services, true))
            .collect();
        reg.version = t.pilot.register(add).await?.version;
        reg.present
            .extend((start..(start + SETUP_BATCH).min(spec.endpoints)).map(|i| (i, true)));
    }
    Ok(())
}

/// Real sidecars' history (node -> version -> (pushed, acked)), merged from /v1/proxies.
type History = HashMap<String, BTreeMap<u64, (f64, Option<f64>)>>;

async fn merge_history(pilot: &PilotApi, into: &mut History) {
    let Ok(proxies) = pilot.proxies(Some(SIM_NAMESPACE)).await else {
        return;
    };
    for p in proxies {
        let h = into.entry(p.node.id).or_default();
        for e in p.history {
            let entry = h.entry(e.version).or_insert((e.pushed_at_ms, None));
            if e.acked_at_ms.is_some() {
                entry.1 = e.acked_at_ms;
            }
        }
    }
}

/// Runs one churn: simulated proxies up, `spec.rate` changes/s for `spec.duration`, then the
/// measurements. `say` reports progress.
pub async fn run(
    t: &mut Target<'_>,
    spec: &ChurnSpec,
    reg: &mut Registered,
    name: String,
    say: &(dyn Fn(String) + Sync),
) -> Result<ChurnResult, Error> {
    let setup_start = Instant::now();
    setup(t, spec, reg).await?;
    let fleet = Fleet::start(
        t.xds,
        &FleetSpec {
            proxies: spec.proxies,
            mode: spec.xds,
            ack_delay: spec.ack_delay.map_or(Duration::ZERO, |d| d.0),
            nack_fraction: spec.nack_fraction,
            namespaces: vec![],
        },
    )
    .await
    .map_err(Error::Environment)?;
    fleet
        .wait_ready(Duration::from_secs(120))
        .await
        .map_err(Error::Environment)?;
    // Everyone holds the registered mesh before the clock starts.
    wait_reached(&fleet, reg.version, Duration::from_secs(120)).await?;
    let setup_s = setup_start.elapsed().as_secs_f64();
    say(format!(
        "{} simulated proxies ({}) hold {} endpoints in {} services after {setup_s:.1} s; churning {}/s for {:?}",
        spec.proxies, spec.xds, spec.endpoints, spec.services, spec.rate, spec.duration.0
    ));
    let counters0 = t.pilot.counters().await?;
    let usage0 = (t.usage)();
    let mut history = History::new();
    merge_history(t.pilot, &mut history).await;
    let mut peak_rss = usage0.map_or(0.0, |u| u.1);
    let mut changes: Vec<(u64, f64)> = Vec::new();
    let start = tokio::time::Instant::now();
    let end = start + spec.duration.0;
    let interval = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
    let mut next_sample = start;
    let mut next_history = start + Duration::from_secs(2);
    let mut i: u32 = 0;
    loop {
        let due = start + interval * i;
        // Bounded by the clock too: a control plane slower than the rate ends the churn on
        // time with fewer changes (achieved_rate says how many).
        if due >= end || tokio::time::Instant::now() >= end {
            break;
        }
        tokio::time::sleep_until(due).await;
        let body = next_change(reg, spec.services);
        let EndpointsApplied {
            version,
            accepted_at_ms,
        } = t.pilot.endpoints(&body).await?;
        reg.version = version;
        changes.push((version, accepted_at_ms.unwrap_or_else(crate::clock::now_ms)));
        let now = tokio::time::Instant::now();
        if now >= next_sample {
            if let Some(u) = (t.usage)() {
                peak_rss = peak_rss.max(u.1);
            }
            next_sample = now + Duration::from_millis(250);
        }
        if now >= next_history {
            merge_history(t.pilot, &mut history).await;
            next_history = now + Duration::from_secs(2);
        }
        i += 1;
    }
    let duration_s = start.elapsed().as_secs_f64();
    let missed_wait = wait_reached(&fleet, reg.version, Duration::from_secs(30)).await;
    if let Err(e) = &missed_wait {
        say(format!("warning: {e}"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    merge_history(t.pilot, &mut history).await;
    let check = check_sidecars(t, reg, spec.services).await;
    if check.1 + check.2 + check.3 > 0 {
        say(format!(
            "warning: sidecars' endpoint tables differ from the registry: {} stale, {} missing, {} with another health",
            check.1, check.2, check.3
        ));
    }
    let usage1 = (t.usage)();
    if let Some(u) = usage1 {
        peak_rss = peak_rss.max(u.1);
    }
    let counters = t.pilot.counters().await?.since(&counters0);
    // Per (change, proxy): the first version at or after the change's.
    let mut receive = Vec::with_capacity(changes.len() * spec.proxies);
    let mut ack = Vec::with_capacity(changes.len() * spec.proxies);
    let mut last = Vec::with_capacity(changes.len());
    let mut missed = 0;
    for (v, at) in &changes {
        let mut worst: Option<f64> = None;
        for s in &fleet.sims {
            match s.reached(*v) {
                Some((r, a)) => {
                    receive.push(r - at);
                    worst = Some(worst.map_or(r - at, |w: f64| w.max(r - at)));
                    if let Some(a) = a {
                        ack.push(a - at);
                    }
                }
                None => missed += 1,
            }
        }
        if let Some(w) = worst {
            last.push(w);
        }
    }
    let mut sidecar_push = Vec::new();
    let mut sidecar_ack = Vec::new();
    for h in history.values() {
        for (v, at) in &changes {
            if let Some((_, (p, a))) = h.range(*v..).next() {
                sidecar_push.push(p - at);
                if let Some(a) = a {
                    sidecar_ack.push(a - at);
                }
            }
        }
    }
    let Counters {
        pushes,
        bytes,
        snapshots,
        nacks,
    } = counters;
    let n = changes.len().max(1) as f64;
    let proxies_total = (spec.proxies + history.len()).max(1) as f64;
    let result = ChurnResult {
        name,
        xds: spec.xds.to_string(),
        proxies: spec.proxies,
        services: spec.services,
        endpoints: spec.endpoints,
        rate: spec.rate,
        duration_s,
        changes: changes.len(),
        achieved_rate: changes.len() as f64 / duration_s.max(1e-9),
        setup_s,
        receive_ms: Dist::of(&receive),
        ack_ms: Dist::of(&ack),
        last_proxy_ms: Dist::of(&last),
        missed,
        sidecar_push_ms: Dist::of(&sidecar_push),
        sidecar_ack_ms: Dist::of(&sidecar_ack),
        pushes,
        bytes,
        bytes_per_change: bytes as f64 / n,
        bytes_per_change_per_proxy: bytes as f64 / n / proxies_total,
        snapshots,
        nacks,
        pilot_cpu_s: match (usage0, usage1) {
            (Some(a), Some(b)) => b.0 - a.0,
            _ => 0.0,
        },
        pilot_peak_rss_mb: peak_rss,
        sim_responses: fleet.responses(),
        sim_bytes: fleet.bytes(),
        sidecars_checked: check.0,
        sidecar_stale_hosts: check.1,
        sidecar_missing_hosts: check.2,
        sidecar_health_mismatches: check.3,
    };
    fleet.stop().await;
    Ok(result)
}

/// Envoy's admin `/clusters?format=json`, as far as the check reads it (our proxy serves the
/// same shape).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminClusters {
    cluster_statuses: Vec<AdminCluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminCluster {
    name: String,
    host_statuses: Vec<AdminHost>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminHost {
    address: AdminAddress,
    health_status: AdminHealth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminAddress {
    socket_address: AdminSocketAddress,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminSocketAddress {
    address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AdminHealth {
    eds_health_status: String,
}

/// Waits until every real sidecar ACKed the churn's last version, then compares each one's
/// endpoint table for the churned services with the registry. Returns (sidecars checked,
/// stale hosts, missing hosts, health mismatches).
async fn check_sidecars(
    t: &Target<'_>,
    reg: &Registered,
    services: usize,
) -> (usize, usize, usize, usize) {
    if t.sidecar_admins.is_empty() {
        return (0, 0, 0, 0);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let synced = t.pilot.proxies(Some(SIM_NAMESPACE)).await.is_ok_and(|v| {
            v.iter()
                .all(|p| p.synced_version.is_some_and(|s| s >= reg.version))
        });
        if synced {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Service k -> address -> healthy, as registered now.
    let mut want: Vec<HashMap<String, bool>> = vec![HashMap::new(); services];
    for (&i, &healthy) in &reg.present {
        want[i % services].insert(endpoint_ip(i), healthy);
    }
    let (mut checked, mut stale, mut missing, mut health) = (0, 0, 0, 0);
    let http = HttpClient::default();
    for admin in &t.sidecar_admins {
        let Ok(r) = http
            .request(*admin, "GET", "/clusters?format=json", &[], "")
            .await
        else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<AdminClusters>(&r.body) else {
            continue;
        };
        if r.status != 200 {
            continue;
        }
        checked += 1;
        let suffix = format!(".{NAMESPACE}.svc.cluster.local");
        for c in v.cluster_statuses {
            let Some(k) = c
                .name
                .strip_prefix("outbound|8080||churn-svc-")
                .and_then(|r| r.strip_suffix(&suffix))
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|k| *k < services)
            else {
                continue;
            };
            let mut seen = 0;
            for h in c.host_statuses {
                let healthy = h.health_status.eds_health_status == "HEALTHY";
                match want[k].get(&h.address.socket_address.address) {
                    None => stale += 1,
                    Some(w) => {
                        seen += 1;
                        if *w != healthy {
                            health += 1;
                        }
                    }
                }
            }
            missing += want[k].len().saturating_sub(seen);
        }
    }
    (checked, stale, missing, health)
}

/// One random change: remove a present endpoint, add an absent one back, or flip health.
fn next_change(reg: &mut Registered, services: usize) -> EndpointBatch {
    let mut rng = rand::rng();
    let op = if reg.absent.is_empty() {
        rng.random_range(0..2)
    } else {
        rng.random_range(0..3)
    };
    match op {
        // Flip the health of a present endpoint.
        0 if !reg.present.is_empty() => {
            let k = rng.random_range(0..reg.present.len());
            let (&i, healthy) = reg.present.iter_mut().nth(k).expect("in range");
            *healthy = !*healthy;
            EndpointBatch {
                update: vec![endpoint(i, services, *healthy)],
                ..Default::default()
            }
        }
        // Remove a present endpoint.
        1 if !reg.present.is_empty() => {
            let k = rng.random_range(0..reg.present.len());
            let i = *reg.present.keys().nth(k).expect("in range");
            reg.present.remove(&i);
            reg.absent.push(i);
            EndpointBatch {
                remove: vec![EndpointRef {
                    namespace: NAMESPACE.into(),
                    name: format!("churn-ep-{i}"),
                }],
                ..Default::default()
            }
        }
        // Add an absent one back.
        _ => {
            let k = rng.random_range(0..reg.absent.len().max(1));
            let i = reg.absent.swap_remove(k);
            reg.present.insert(i, true);
            EndpointBatch {
                add: vec![endpoint(i, services, true)],
                ..Default::default()
            }
        }
    }
}

/// Waits until every simulated proxy received version `v` (or later).
async fn wait_reached(fleet: &Fleet, v: u64, limit: Duration) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        let behind = fleet.sims.iter().filter(|s| s.reached(v).is_none()).count();
        if behind == 0 {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(Error::Environment(format!(
                "{behind} of {} simulated proxies did not receive version {v} within {limit:?}",
                fleet.sims.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
