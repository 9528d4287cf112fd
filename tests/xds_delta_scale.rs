//! Delta ADS and the scale machinery over real gRPC: real Envoy 1.40 and meshbench proxy on
//! delta ADS follow a rollout; simulated proxies (SotW and delta) show what each change costs on
//! the wire (a new service among 1,000: delta sends >= 100x fewer CDS bytes than SotW; an endpoint
//! change: only its assignment, unless pilot runs in full-push mode); NACKing proxies cause no
//! push loop; a delta client resuming with `initial_resource_versions` is sent nothing it holds.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
};
use meshbench::churn;
use meshbench::sim::{Fleet, FleetSpec};
use meshbench::xds::{XdsMode, CLUSTER_TYPE};

async fn apply(p: &TestPilot, text: &str) -> u64 {
    apply_ok(p.api, text).await.version
}

async fn endpoints(p: &TestPilot, batch: serde_json::Value) -> u64 {
    endpoints_ok(p.api, &batch.to_string()).await.version
}

fn spec(mode: XdsMode, proxies: usize) -> FleetSpec {
    FleetSpec {
        proxies,
        mode,
        ack_delay: Duration::ZERO,
        nack_fraction: 0.0,
        namespaces: vec![],
    }
}

async fn reached_all(fleet: &Fleet, v: u64) {
    let start = Instant::now();
    while fleet.sims.iter().any(|s| s.reached(v).is_none()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "version {v} never reached every simulated proxy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Bytes, resources and CDS bytes each simulated proxy received for a change of config.
async fn cost_of_change(
    fleet: &Fleet,
    change: impl std::future::Future<Output = u64>,
) -> Vec<(u64, u64, u64)> {
    let now = |s: &meshbench::sim::SimStats| {
        (
            s.bytes.load(Relaxed),
            s.resources.load(Relaxed),
            s.bytes_by_type[0].load(Relaxed),
        )
    };
    // Quiet first: nothing still in flight (the earlier sync's last chunks may still be
    // arriving on a loaded machine): wait until no byte arrives for 200 ms.
    let total = || {
        fleet
            .sims
            .iter()
            .map(|s| s.bytes.load(Relaxed))
            .sum::<u64>()
    };
    let start = std::time::Instant::now();
    let mut last = total();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = total();
        if now == last || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        last = now;
    }
    let before: Vec<_> = fleet.sims.iter().map(|s| now(s)).collect();
    let v = change.await;
    reached_all(fleet, v).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet
        .sims
        .iter()
        .zip(before)
        .map(|(s, (b, r, c))| {
            let (b2, r2, c2) = now(s);
            (b2 - b, r2 - r, c2 - c)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_costs_delta_100x_fewer_bytes_than_sotw() {
    let p = start_pilot(Duration::ZERO).await;
    let v = apply(&p, &churn::services_manifest(1000)).await;
    let sotw = Fleet::start(p.xds, &spec(XdsMode::Sotw, 1)).await.unwrap();
    let delta = Fleet::start(p.xds, &spec(XdsMode::Delta, 1)).await.unwrap();
    for f in [&sotw, &delta] {
        f.wait_ready(Duration::from_secs(30)).await.unwrap();
        reached_all(f, v).await;
    }
    let service = |name: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: churn}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 8080}}]\n")
    };
    // One new service measured on the delta proxy, another on the SotW one.
    let d = cost_of_change(&delta, apply(&p, &service("added-1"))).await;
    reached_all(&sotw, p.pilot.version()).await;
    let s = cost_of_change(&sotw, apply(&p, &service("added-2"))).await;
    let (sb, sr, scds) = s[0];
    let (db, dr, dcds) = d[0];
    eprintln!(
        "a new service among 1,000: CDS SotW {scds} B vs delta {dcds} B ({:.0}x); all types SotW {sb} B ({sr} resources) vs delta {db} B ({dr} resources) ({:.1}x: both resend the outbound route config, which names every service)",
        scds as f64 / dcds as f64,
        sb as f64 / db as f64
    );
    assert!(sr > 1000, "SotW resends every cluster: {sr} resources");
    assert!(
        dr <= 4,
        "delta sends the new cluster, its assignment and the route config: {dr}"
    );
    assert!(
        scds >= 100 * dcds,
        "CDS: SotW {scds} B vs delta {dcds} B: less than 100x"
    );
    sotw.stop().await;
    delta.stop().await;
}

/// An endpoint change sends only that service's assignment in both methods; pilot's full-push
/// mode sends every assignment (the comparison point).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_pushes_only_its_assignment() {
    for full_push in [false, true] {
        let p = start_pilot_with(meshbench::pilot::Config {
            debounce: Duration::ZERO,
            full_push,
            ..Default::default()
        })
        .await;
        apply(&p, &churn::services_manifest(50)).await;
        let add: Vec<_> = (0..500).map(|i| churn::endpoint(i, 50, true)).collect();
        let v = endpoints(&p, serde_json::json!({ "add": add })).await;
        let sotw = Fleet::start(p.xds, &spec(XdsMode::Sotw, 3)).await.unwrap();
        let delta = Fleet::start(p.xds, &spec(XdsMode::Delta, 3)).await.unwrap();
        for f in [&sotw, &delta] {
            f.wait_ready(Duration::from_secs(30)).await.unwrap();
            reached_all(f, v).await;
        }
        let expected = if full_push { 50 } else { 1 };
        let flip = serde_json::json!({"update": [churn::endpoint(7, 50, false)]});
        let s = cost_of_change(&sotw, endpoints(&p, flip)).await;
        reached_all(&delta, p.pilot.version()).await;
        let flip_back = serde_json::json!({"update": [churn::endpoint(7, 50, true)]});
        let dd = cost_of_change(&delta, endpoints(&p, flip_back)).await;
        for (method, costs) in [("SotW", &s), ("delta", &dd)] {
            let per_proxy: Vec<u64> = costs.iter().map(|x| x.1).collect();
            assert!(
                per_proxy.iter().all(|r| *r == expected),
                "full_push={full_push}: {method} proxies got {per_proxy:?} resources, expected {expected} each"
            );
        }
        eprintln!(
            "endpoint change, full_push={full_push}: SotW {} B, delta {} B per proxy",
            s[0].0, dd[0].0
        );
        sotw.stop().await;
        delta.stop().await;
    }
}

/// Proxies that NACK everything get each version once: no resend loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacking_proxies_cause_no_push_loop() {
    let p = start_pilot(Duration::ZERO).await;
    apply(&p, &churn::services_manifest(5)).await;
    let mut nack = spec(XdsMode::Sotw, 2);
    nack.nack_fraction = 1.0;
    let sotw = Fleet::start(p.xds, &nack).await.unwrap();
    nack.mode = XdsMode::Delta;
    let delta = Fleet::start(p.xds, &nack).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = apply(
        &p,
        "apiVersion: v1\nkind: Service\nmetadata: {name: one-more, namespace: churn}\nspec:\n  selector: {app: x}\n  ports: [{name: http, port: 8080}]\n",
    )
    .await;
    reached_all(&sotw, v).await;
    reached_all(&delta, v).await;
    let counts = || -> Vec<u64> {
        sotw.sims
            .iter()
            .chain(&delta.sims)
            .map(|s| s.responses.load(Relaxed))
            .collect()
    };
    // A version arrives as several responses (one per type): let the change's own
    // responses land, then a loop is what still comes a second later.
    let start = Instant::now();
    let mut after_change = counts();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = counts();
        if now == after_change || start.elapsed() > Duration::from_secs(5) {
            break;
        }
        after_change = now;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(after_change, counts(), "responses kept coming after NACKs");
    // Every response was NACKed and pilot recorded it.
    assert!(sotw
        .sims
        .iter()
        .chain(&delta.sims)
        .all(|s| s.nacks.load(Relaxed) >= 1));
    let proxies = proxies(p.api).await;
    let nacks: u64 = proxies
        .iter()
        .flat_map(|p| p.types.values())
        .map(|t| t.nacks)
        .sum();
    assert!(nacks >= 4, "pilot recorded {nacks} NACKs");
    // The simulated proxies never reach "synced" (they NACKed).
    assert!(proxies.iter().all(|p| p.synced_version.is_none()));
}

/// A delta client that reconnects with the versions it holds is sent nothing new for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_resume_sends_nothing_already_held() {
    let p = start_pilot(Duration::ZERO).await;
    let v = apply(&p, &churn::services_manifest(20)).await;
    let start = Instant::now();
    while p.pilot.snapshot().version < v {
        assert!(start.elapsed() < Duration::from_secs(10), "no snapshot");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let node = Node {
        id: meshbench::xds::node::sidecar_id("10.9.9.9", "resume-0", "default"),
        cluster: "resume".into(),
        ..Default::default()
    };
    let first = cds_once(p.xds, &node, HashMap::new()).await;
    assert_eq!(first.len(), 20, "first CDS: every cluster");
    let held: HashMap<String, String> = first.into_iter().collect();
    let again = cds_once(p.xds, &node, held.clone()).await;
    assert!(again.is_empty(), "resent on resume: {again:?}");
    // One cluster held at an old version is sent again, alone.
    let mut stale = held;
    let name = stale.keys().next().unwrap().clone();
    stale.insert(name.clone(), "0".into());
    let third = cds_once(p.xds, &node, stale).await;
    assert_eq!(
        third.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        vec![&name]
    );
}

/// Opens a delta stream, subscribes to CDS with `initial`, returns the first response's
/// (name, version) list.
async fn cds_once(
    xds: SocketAddr,
    node: &Node,
    initial: HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: CLUSTER_TYPE.into(),
        initial_resource_versions: initial,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a CDS response")
        .unwrap()
        .unwrap();
    r.resources
        .into_iter()
        .map(|x| (x.name, x.version))
        .collect()
}

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
";

fn vs_to(subset: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n")
}

/// Which reviews version answers through a sidecar's outbound listener (None until it serves).
async fn answer(pod_ip: &str) -> Option<String> {
    let mut c = Client::connect(format!("{pod_ip}:15001").parse().unwrap())
        .await
        .ok()?;
    let r = c.get("reviews:9080", "/").await.ok()?;
    (r.status == 200).then(|| r.workload().unwrap_or("").to_string())
}

async fn wait_answer(pod_ip: &str, want: &str) {
    let start = Instant::now();
    loop {
        if answer(pod_ip).await.as_deref() == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{pod_ip} never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Envoy 1.40 on delta ADS (DELTA_GRPC) and meshbench proxy with --xds-mode delta serve the
/// routes pilot sends and follow a rollout from v1 to v3; ACKs are tracked as for SotW.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_meshbench_proxy_on_delta_ads_follow_a_rollout() {
    let p = start_pilot(Duration::ZERO).await;
    let ip = unique_loopback();
    let v1 = start_workload(&ip, "reviews", "v1").await;
    let v3 = start_workload(&ip, "reviews", "v3").await;
    apply(&p, SERVICE).await;
    let mut batch = vec![];
    for (name, version, addr) in [("reviews-v1-0", "v1", v1), ("reviews-v3-0", "v3", v3)] {
        batch.push(serde_json::json!({"name": name, "address": addr.ip().to_string(), "ports": {"http": addr.port()}, "labels": {"app": "reviews", "version": version}}));
    }
    endpoints(&p, serde_json::json!({ "add": batch })).await;
    let v = apply(&p, &vs_to("v1")).await;
    let ours = start_mesh_proxy_with(
        p.xds,
        "productpage",
        "productpage-v1-0",
        &[("app", "productpage")],
        XdsMode::Delta,
    )
    .await;
    let mut pods: Vec<(String, String)> = vec![(ours.pod_ip.clone(), ours.node_id.clone())];
    let envoy = match envoy_binary() {
        Some(bin) => Some(
            start_envoy_with(
                &bin,
                p.xds,
                "productpage",
                "productpage-v1-1",
                &[("app", "productpage")],
                XdsMode::Delta,
            )
            .await,
        ),
        None => None,
    };
    if let Some(e) = &envoy {
        pods.push((e.pod_ip.clone(), e.node_id.clone()));
    }
    for (ip, node) in &pods {
        wait_synced(p.api, node, v).await;
        wait_answer(ip, "reviews-v1").await;
    }
    let v = apply(&p, &vs_to("v3")).await;
    let mut acks = BTreeMap::new();
    for (ip, node) in &pods {
        acks.insert(node.clone(), wait_synced(p.api, node, v).await);
        wait_answer(ip, "reviews-v3").await;
        // Every answer now comes from v3.
        for _ in 0..20 {
            assert_eq!(answer(ip).await.as_deref(), Some("reviews-v3"));
        }
    }
    eprintln!("delta ADS: change -> ACK per proxy {acks:?} ms");
    // The delta streams show up in pilot's status with pushes per type.
    let (_, proxies) = json(p.api, "GET", "/v1/proxies", "").await;
    assert_eq!(proxies.as_array().unwrap().len(), pods.len());
}
