//! Real Envoy 1.40 driven by meshbench pilot: weighted routing, a rollout to 100% v1, ACK
//! tracking and config_dump, with endpoints from WorkloadEntries, from the REST endpoint batch,
//! and with the seed's RouteRule.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
";

const DR: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
";

fn vs(weights: &[(&str, u32)]) -> String {
    let mut s = String::from("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n");
    for (subset, w) in weights {
        s.push_str(&format!(
            "    - destination: {{host: reviews, subset: {subset}}}\n      weight: {w}\n"
        ));
    }
    s
}

fn workload_entry(name: &str, version: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec:\n  address: {}\n  labels: {{app: reviews, version: {version}}}\n  ports: {{http: {}}}\n",
        addr.ip(),
        addr.port()
    )
}

async fn apply(p: &TestPilot, docs: &[&str]) -> u64 {
    apply_ok(p.api, &docs.join("---\n")).await.version
}

/// Sends `n` requests through Envoy's outbound listener; counts responses per workload identity.
async fn split(envoy: &Envoy, n: usize) -> BTreeMap<String, usize> {
    let mut c = Client::connect(format!("{}:15001", envoy.pod_ip).parse().unwrap())
        .await
        .unwrap();
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let r = c.get("reviews:9080", "/reviews/0").await.unwrap();
        assert_eq!(r.status, 200, "body: {}", r.body);
        *counts
            .entry(r.workload().unwrap_or("none").to_string())
            .or_insert(0) += 1;
    }
    counts
}

/// Waits until Envoy's outbound listener answers 200 for reviews.
async fn wait_serving(envoy: &Envoy) {
    let addr: SocketAddr = format!("{}:15001", envoy.pod_ip).parse().unwrap();
    let start = Instant::now();
    loop {
        if let Ok(mut c) = Client::connect(addr).await {
            if let Ok(r) = c.get("reviews:9080", "/").await {
                if r.status == 200 {
                    return;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Envoy never served reviews"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn in_band(counts: &BTreeMap<String, usize>, id: &str, lo: usize, hi: usize) {
    let n = counts.get(id).copied().unwrap_or(0);
    assert!(
        (lo..=hi).contains(&n),
        "{id}: {n} not within {lo}..={hi}: {counts:?}"
    );
}

/// Common flow once endpoints are registered: 50/50 split, config_dump, rollout to v1.
async fn canary_flow(
    p: &TestPilot,
    envoy: &Envoy,
    v_split: u64,
    to_v1: impl std::future::Future<Output = u64>,
) {
    let ack_ms = wait_synced(p.api, &envoy.node_id, v_split).await;
    wait_serving(envoy).await;
    let counts = split(envoy, 1000).await;
    in_band(&counts, "reviews-v1", 450, 550);
    in_band(&counts, "reviews-v3", 450, 550);
    eprintln!("50/50 split through Envoy: {counts:?} (initial config ACKed {ack_ms:.1} ms after the change)");

    let dump = http(envoy.admin, "GET", "/config_dump", "").await.body;
    assert!(
        dump.contains("weighted_clusters"),
        "no weighted_clusters in config_dump"
    );
    assert!(dump.contains("outbound|9080|v1|reviews.default.svc.cluster.local"));
    assert!(dump.contains("outbound|9080|v3|reviews.default.svc.cluster.local"));

    let t0 = Instant::now();
    let v_all = to_v1.await;
    let ack_ms = wait_synced(p.api, &envoy.node_id, v_all).await;
    eprintln!(
        "PUSH LATENCY change -> Envoy ACK: {ack_ms:.2} ms (pilot), {:.2} ms seen by the test",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let counts = split(envoy, 300).await;
    assert_eq!(
        counts.get("reviews-v1").copied(),
        Some(300),
        "after 100% v1: {counts:?}"
    );

    // Every type Envoy was pushed is ACKed at the version it was pushed.
    let proxies = proxies(p.api).await;
    let me = proxies.iter().find(|x| x.node.id == envoy.node_id).unwrap();
    for (t, st) in &me.types {
        assert_eq!(
            st.acked_version, st.pushed_version,
            "{t} not ACKed: {st:#?}"
        );
        assert!(st.last_nack.is_none(), "{t} NACKed: {st:#?}");
    }
    assert_eq!(me.types["rds"].acked_version, Some(v_all.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_virtual_service_with_workload_entries() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let v1 = start_workload("127.0.0.1", "reviews", "v1").await;
    let v3 = start_workload("127.0.0.1", "reviews", "v3").await;
    let version = apply(
        &p,
        &[
            SERVICE,
            DR,
            &workload_entry("reviews-v1", "v1", v1),
            &workload_entry("reviews-v3", "v3", v3),
            &vs(&[("v1", 50), ("v3", 50)]),
        ],
    )
    .await;
    let envoy = start_envoy(
        &bin,
        p.xds,
        "productpage",
        "productpage-v1-0",
        &[("app", "productpage"), ("version", "v1")],
    )
    .await;
    canary_flow(&p, &envoy, version, apply(&p, &[&vs(&[("v1", 100)])])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_endpoints_registered_through_the_rest_batch() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::from_millis(10)).await;
    let v1 = start_workload("127.0.0.1", "reviews", "v1").await;
    let v3 = start_workload("127.0.0.1", "reviews", "v3").await;
    apply(&p, &[SERVICE, DR, &vs(&[("v1", 50), ("v3", 50)])]).await;
    let batch = serde_json::json!({"add": [
        {"name": "reviews-v1-0", "namespace": "default", "address": "127.0.0.1", "labels": {"app": "reviews", "version": "v1"}, "ports": {"http": v1.port()}},
        {"name": "reviews-v3-0", "namespace": "default", "address": "127.0.0.1", "labels": {"app": "reviews", "version": "v3"}, "ports": {"http": v3.port()}},
    ]});
    let version = endpoints_ok(p.api, &batch.to_string()).await.version;
    let envoy = start_envoy(
        &bin,
        p.xds,
        "productpage",
        "productpage-v1-0",
        &[("app", "productpage"), ("version", "v1")],
    )
    .await;
    canary_flow(&p, &envoy, version, apply(&p, &[&vs(&[("v1", 100)])])).await;

    // Removing the v1 endpoint (EDS only) moves all traffic to the remaining instance... which
    // v1-only routing cannot reach, so route to v3 first, then remove v1.
    let v = apply(&p, &[&vs(&[("v3", 100)])]).await;
    wait_synced(p.api, &envoy.node_id, v).await;
    let v = endpoints_ok(p.api, r#"{"remove": [{"name": "reviews-v1-0"}]}"#)
        .await
        .version;
    wait_synced(p.api, &envoy.node_id, v).await;
    let clusters = http(envoy.admin, "GET", "/clusters", "").await.body;
    let v1_hosts = clusters
        .lines()
        .filter(|l| l.starts_with("outbound|9080|v1|reviews") && l.contains("::cx_active::"))
        .count();
    assert_eq!(v1_hosts, 0, "v1 endpoint still in Envoy:\n{clusters}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_seeds_route_rule() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let v1 = start_workload("127.0.0.1", "reviews", "v1").await;
    let v3 = start_workload("127.0.0.1", "reviews", "v3").await;
    let rr = |body: &str| {
        format!("apiVersion: config.istio.io/v1alpha2\nkind: RouteRule\nmetadata: {{name: reviews-default, namespace: default}}\nspec:\n  destination: {{name: reviews}}\n  precedence: 1\n  route:\n{body}")
    };
    let half = rr(
        "  - labels: {version: v1}\n    weight: 50\n  - labels: {version: v3}\n    weight: 50\n",
    );
    let all_v1 = rr("  - labels: {version: v1}\n");
    let version = apply(
        &p,
        &[
            SERVICE,
            &workload_entry("reviews-v1", "v1", v1),
            &workload_entry("reviews-v3", "v3", v3),
            &half,
        ],
    )
    .await;
    let envoy = start_envoy(
        &bin,
        p.xds,
        "productpage",
        "productpage-v1-0",
        &[("app", "productpage")],
    )
    .await;
    let ack_ms = wait_synced(p.api, &envoy.node_id, version).await;
    wait_serving(&envoy).await;
    let counts = split(&envoy, 1000).await;
    in_band(&counts, "reviews-v1", 450, 550);
    in_band(&counts, "reviews-v3", 450, 550);
    eprintln!("RouteRule 50/50 through Envoy: {counts:?} (ACK {ack_ms:.1} ms)");
    let dump = http(envoy.admin, "GET", "/config_dump", "").await.body;
    assert!(
        dump.contains("outbound|9080|version=v3|reviews.default.svc.cluster.local"),
        "synthesised subset cluster missing"
    );
    let v = apply(&p, &[&all_v1]).await;
    wait_synced(p.api, &envoy.node_id, v).await;
    let counts = split(&envoy, 200).await;
    assert_eq!(counts.get("reviews-v1").copied(), Some(200), "{counts:?}");
}
