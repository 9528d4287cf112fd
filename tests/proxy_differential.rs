//! Differential routing: the same pilot drives Envoy 1.40 and meshbench proxy with the same
//! config, and a table of cases runs through both. Outcomes (which upstream, status, how many
//! upstream attempts, circuit-breaker overflow) must agree case by case.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
---
apiVersion: v1
kind: Service
metadata: {name: flaky}
spec: {ports: [{port: 9080, name: http}], selector: {app: flaky}}
---
apiVersion: v1
kind: Service
metadata: {name: slow}
spec: {ports: [{port: 9080, name: http}], selector: {app: slow}}
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec: {ports: [{port: 9080, name: http}], selector: {app: mixed}}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec: {ports: [{port: 9080, name: http}], selector: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";

fn entry(name: &str, app: &str, version: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec: {{address: {}, labels: {{app: {app}, version: {version}}}, ports: {{http: {}}}}}\n",
        addr.ip(),
        addr.port()
    )
}

fn vs(host: &str, http: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  http:\n{http}")
}

/// How early Envoy's timers may fire (see step 10).
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// What one request produced.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Outcome {
    status: u16,
    workload: String,
    overloaded: bool,
}

struct Sidecar {
    name: &'static str,
    outbound: SocketAddr,
    admin: SocketAddr,
    node_id: String,
}

/// The two sidecars under comparison, Envoy first.
fn sidecars(envoy: &Envoy, mesh: &MeshProxy) -> [Sidecar; 2] {
    let side = |name, pod_ip: &str, admin, node_id: &str| Sidecar {
        name,
        outbound: format!("{pod_ip}:15001").parse().unwrap(),
        admin,
        node_id: node_id.to_string(),
    };
    [
        side("envoy", &envoy.pod_ip, envoy.admin, &envoy.node_id),
        side("meshbench", &mesh.pod_ip, mesh.admin, &mesh.node_id),
    ]
}

async fn run_requests(
    s: &Sidecar,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> BTreeMap<Outcome, usize> {
    let mut c = Client::connect(s.outbound).await.unwrap();
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let r = c.request("GET", host, path, headers, "").await.unwrap();
        let o = Outcome {
            status: r.status,
            workload: r.workload().unwrap_or("-").to_string(),
            overloaded: r.headers.contains_key("x-envoy-overloaded"),
        };
        *out.entry(o).or_insert(0) += 1;
    }
    out
}

/// `n` requests at once, each on its own connection.
async fn run_concurrent(s: &Sidecar, host: &str, n: usize) -> BTreeMap<Outcome, usize> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = s.outbound;
        let host = host.to_string();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.unwrap();
            let r = c.get(&host, "/").await.unwrap();
            Outcome {
                status: r.status,
                workload: r.workload().unwrap_or("-").to_string(),
                overloaded: r.headers.contains_key("x-envoy-overloaded"),
            }
        }));
    }
    let mut out = BTreeMap::new();
    for t in tasks {
        *out.entry(t.await.unwrap()).or_insert(0) += 1;
    }
    out
}

fn share(m: &BTreeMap<Outcome, usize>, workload: &str) -> f64 {
    let total: usize = m.values().sum();
    m.iter()
        .filter(|(o, _)| o.workload == workload)
        .map(|(_, n)| *n)
        .sum::<usize>() as f64
        / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_meshbench_proxy_agree_case_by_case() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let v1 = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let v2 = start_upstream("127.0.0.1", "reviews-v2", Behavior::Ok).await;
    let v3 = start_upstream("127.0.0.1", "reviews-v3", Behavior::Ok).await;
    let flaky = start_upstream("127.0.0.1", "flaky-v1", Behavior::Status(503)).await;
    let slow = start_upstream(
        "127.0.0.1",
        "slow-v1",
        Behavior::Delay(Duration::from_millis(300)),
    )
    .await;
    let good = start_upstream("127.0.0.1", "mixed-good", Behavior::Ok).await;
    let bad = start_upstream("127.0.0.1", "mixed-bad", Behavior::Status(503)).await;
    let echo = start_workload("127.0.0.1", "echo", "v1").await;
    let base = [
        SERVICES.to_string(),
        entry("reviews-v1", "reviews", "v1", v1.addr),
        entry("reviews-v2", "reviews", "v2", v2.addr),
        entry("reviews-v3", "reviews", "v3", v3.addr),
        entry("flaky-1", "flaky", "v1", flaky.addr),
        entry("slow-1", "slow", "v1", slow.addr),
        entry("mixed-good", "mixed", "v1", good.addr),
        entry("mixed-bad", "mixed", "v1", bad.addr),
        entry("echo-1", "echo", "v1", echo),
    ]
    .join("---\n");
    let (s, body) = json(p.api, "POST", "/v1/apply", &base).await;
    assert_eq!(s, 200, "{body}");

    let envoy = start_envoy(
        &bin,
        p.xds,
        "productpage",
        "productpage-envoy",
        &[("app", "productpage")],
    )
    .await;
    let mesh = start_mesh_proxy(
        p.xds,
        "productpage",
        "productpage-mesh",
        &[("app", "productpage")],
    )
    .await;
    let sidecars = sidecars(&envoy, &mesh);

    let apply = |yaml: String| {
        let api = p.api;
        let ids: Vec<String> = sidecars.iter().map(|s| s.node_id.clone()).collect();
        async move {
            let v = apply_ok(api, &yaml).await.version;
            for id in &ids {
                wait_synced(api, id, v).await;
            }
        }
    };

    // 1. weights 80/20
    apply(vs("reviews", "  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 80}\n    - {destination: {host: reviews, subset: v3}, weight: 20}\n")).await;
    let mut shares = Vec::new();
    for s in &sidecars {
        let m = run_requests(s, "reviews:9080", "/", &[], 1000).await;
        assert!(m.keys().all(|o| o.status == 200), "{}: {m:?}", s.name);
        let v1_share = share(&m, "reviews-v1");
        assert!(
            (0.75..=0.85).contains(&v1_share),
            "{}: v1 share {v1_share}",
            s.name
        );
        shares.push(v1_share);
    }
    assert!(
        (shares[0] - shares[1]).abs() < 0.07,
        "weights disagree: {shares:?}"
    );

    // 2. header match, 3. exact vs prefix
    apply(vs(
        "reviews",
        "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - match: [{uri: {exact: /exact}}]\n    route: [{destination: {host: reviews, subset: v1}}]\n  - match: [{uri: {prefix: /exact}}]\n    route: [{destination: {host: reviews, subset: v3}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n",
    ))
    .await;
    for (path, headers, want) in [
        ("/", vec![("end-user", "jason")], "reviews-v2"),
        ("/", vec![("end-user", "alice")], "reviews-v1"),
        ("/exact", vec![], "reviews-v1"),
        ("/exact/more", vec![], "reviews-v3"),
        ("/exactly", vec![], "reviews-v3"),
        ("/other", vec![], "reviews-v1"),
    ] {
        let mut seen = Vec::new();
        for s in &sidecars {
            let m = run_requests(s, "reviews:9080", path, &headers, 20).await;
            let expected = BTreeMap::from([(
                Outcome {
                    status: 200,
                    workload: want.into(),
                    overloaded: false,
                },
                20,
            )]);
            assert_eq!(m, expected, "{} {path} {headers:?}", s.name);
            seen.push(m);
        }
        assert_eq!(seen[0], seen[1]);
    }

    // 3b. withoutHeaders (istiod: invert_match with treat_missing_header_as_empty), headers
    // given more than once, and a dot segment in the path (normalized before routing).
    apply(vs(
        "reviews",
        "  - match: [{headers: {end-user: {exact: jason}}}]\n    route: [{destination: {host: reviews, subset: v2}}]\n  - match: [{uri: {prefix: /admin}}]\n    route: [{destination: {host: reviews, subset: v1}}]\n  - match: [{withoutHeaders: {x-canary: {prefix: skip}}}]\n    route: [{destination: {host: reviews, subset: v3}}]\n  - route: [{destination: {host: reviews, subset: v1}}]\n",
    ))
    .await;
    // (path, headers, the version that answers)
    let cases: &[(&str, &[(&str, &str)], &str)] = &[
        ("/", &[], "reviews-v3"),
        ("/", &[("x-canary", "skip-it")], "reviews-v1"),
        ("/", &[("x-canary", "yes")], "reviews-v3"),
        // Any value matching is a match, then inverted: both orders are "with".
        (
            "/",
            &[("x-canary", "yes"), ("x-canary", "skip")],
            "reviews-v1",
        ),
        (
            "/",
            &[("x-canary", "skip"), ("x-canary", "yes")],
            "reviews-v1",
        ),
        (
            "/",
            &[("end-user", "kim"), ("end-user", "jason")],
            "reviews-v2",
        ),
        (
            "/",
            &[("end-user", "jason"), ("end-user", "kim")],
            "reviews-v2",
        ),
        ("/", &[("end-user", "jason,kim")], "reviews-v3"),
        ("/x/../admin", &[], "reviews-v1"),
    ];
    for (path, headers, want) in cases {
        let expected = BTreeMap::from([(
            Outcome {
                status: 200,
                workload: want.to_string(),
                overloaded: false,
            },
            5,
        )]);
        for s in &sidecars {
            let m = run_requests(s, "reviews:9080", path, headers, 5).await;
            assert_eq!(m, expected, "{} {path} {headers:?}", s.name);
        }
    }

    // 4. retries on a failing upstream: 1 try + 2 retries each.
    apply(vs(
        "flaky",
        "  - retries: {attempts: 2, retryOn: 5xx}\n    route: [{destination: {host: flaky}}]\n",
    ))
    .await;
    let mut attempts = Vec::new();
    for s in &sidecars {
        flaky.take_hits();
        let m = run_requests(s, "flaky:9080", "/", &[], 10).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![503],
            "{}: {m:?}",
            s.name
        );
        attempts.push(flaky.take_hits());
    }
    assert_eq!(
        attempts,
        vec![30, 30],
        "upstream attempts (envoy, meshbench)"
    );

    // 5. route timeout against a slow upstream
    apply(vs(
        "slow",
        "  - timeout: 100ms\n    route: [{destination: {host: slow}}]\n",
    ))
    .await;
    for s in &sidecars {
        let m = run_requests(s, "slow:9080", "/", &[], 3).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![504],
            "{}: {m:?}",
            s.name
        );
    }

    // 6. abort fault: no upstream reached
    apply(vs("reviews", "  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: reviews, subset: v1}}]\n")).await;
    for s in &sidecars {
        v1.take_hits();
        let m = run_requests(s, "reviews:9080", "/", &[], 10).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![418],
            "{}: {m:?}",
            s.name
        );
        assert_eq!(v1.take_hits(), 0, "{}", s.name);
    }

    // 7. circuit breaker: 1 connection + 1 pending, 8 concurrent requests to a slow upstream.
    apply(format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: slow}}\nspec:\n  host: slow\n  trafficPolicy:\n    connectionPool:\n      tcp: {{maxConnections: 1}}\n      http: {{http1MaxPendingRequests: 1}}\n",
        vs("slow", "  - route: [{destination: {host: slow}}]\n")
    ))
    .await;
    let mut results = Vec::new();
    for s in &sidecars {
        let m = run_concurrent(s, "slow:9080", 8).await;
        let ok: usize = m
            .iter()
            .filter(|(o, _)| o.status == 200)
            .map(|(_, n)| n)
            .sum();
        let overflow: usize = m
            .iter()
            .filter(|(o, _)| o.status == 503 && o.overloaded)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(ok + overflow, 8, "{}: {m:?}", s.name);
        assert!(
            overflow >= 5,
            "{}: expected overflow with 1 connection + 1 pending: {m:?}",
            s.name
        );
        results.push((ok, overflow));
        let stats = http(s.admin, "GET", "/stats", "").await.body;
        let line = stats.lines().find(|l| l.starts_with("cluster.outbound|9080||slow.default.svc.cluster.local.upstream_rq_pending_overflow:")).unwrap_or_else(|| panic!("{}: no overflow stat", s.name)).to_string();
        assert!(
            line.ends_with(&format!(" {overflow}")),
            "{}: {line} vs {overflow}",
            s.name
        );
    }
    assert!(
        results[0].0.abs_diff(results[1].0) <= 1,
        "successes differ: {results:?}"
    );

    // 8. per-try timeout with retries: 1 try + 2 retries, each cut at 50 ms, then 504.
    apply(vs("slow", "  - retries: {attempts: 2, perTryTimeout: 50ms, retryOn: 5xx}\n    route: [{destination: {host: slow}}]\n")).await;
    let mut per_try = Vec::new();
    for s in &sidecars {
        slow.take_hits();
        let m = run_requests(s, "slow:9080", "/", &[], 3).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![504],
            "{}: {m:?}",
            s.name
        );
        per_try.push(slow.take_hits());
    }
    assert_eq!(
        per_try,
        vec![9, 9],
        "upstream attempts with per-try timeouts (envoy, meshbench)"
    );

    // 9. outlier detection: the failing host is ejected after 2 consecutive 5xx.
    apply(format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: mixed}}\nspec:\n  host: mixed\n  trafficPolicy:\n    outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}\n",
        vs("mixed", "  - route: [{destination: {host: mixed}}]\n")
    ))
    .await;
    let mut ejected = Vec::new();
    for s in &sidecars {
        bad.take_hits();
        let m = run_requests(s, "mixed:9080", "/", &[], 30).await;
        let failures: usize = m
            .iter()
            .filter(|(o, _)| o.status == 503)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(failures as u64, bad.take_hits(), "{}: {m:?}", s.name);
        ejected.push(failures);
    }
    // meshbench proxy ejects on the request that makes the second consecutive 5xx. Envoy
    // counts on the worker but ejects on its main thread, and the host set reaches the worker
    // after that: on a loaded machine one more request can reach the host meanwhile (seen
    // once in six runs here as a third 5xx).
    assert!(
        (2..=3).contains(&ejected[0]) && ejected[1] == 2,
        "5xx seen before ejection (envoy, meshbench): {ejected:?}"
    );

    // 10. fixed delay fault, 11. x-request-id generated and propagated.
    apply(vs("echo", "  - fault: {delay: {fixedDelay: 150ms, percentage: {value: 100}}}\n    route: [{destination: {host: echo}}]\n")).await;
    for s in &sidecars {
        let mut c = Client::connect(s.outbound).await.unwrap();
        let t = std::time::Instant::now();
        let r = c.get("echo:9080", "/").await.unwrap();
        // Envoy arms its fault timer on a coarse clock: measured here, 7 of 60 delays of
        // 150 ms took 148.4-149.9 ms end to end (meshbench proxy: 151.6 ms at least). An
        // undelayed request takes about 1 ms, so the bound still proves the fault applies.
        assert!(
            t.elapsed() >= Duration::from_millis(150) - TIMER_SLACK,
            "{}: no delay ({:?})",
            s.name,
            t.elapsed()
        );
        assert_eq!(r.status, 200);
        let generated = r
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert_eq!(
            generated.len(),
            36,
            "{}: generated x-request-id {generated:?}",
            s.name
        );
        let r = c
            .request(
                "GET",
                "echo:9080",
                "/",
                &[("x-request-id", "given-id-1")],
                "",
            )
            .await
            .unwrap();
        assert_eq!(
            r.headers.get("x-request-id").unwrap(),
            "given-id-1",
            "{}",
            s.name
        );
    }

    // 12. weight changes under load drop no request (config changes never disturb requests
    // in flight).
    for s in &sidecars {
        let spec = meshbench::load::LoadSpec {
            target: s.outbound,
            host: "reviews:9080".into(),
            path: "/".into(),
            connections: 4,
            duration: Duration::from_millis(1500),
            rate: None,
            headers: vec![],
            http2: false,
            live: None,
        };
        let load = tokio::spawn(meshbench::load::run(spec));
        for w in [10, 90, 30, 70, 50] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            apply(vs("reviews", &format!("  - route:\n    - {{destination: {{host: reviews, subset: v1}}, weight: {w}}}\n    - {{destination: {{host: reviews, subset: v3}}, weight: {}}}\n", 100 - w))).await;
        }
        let r = load.await.unwrap();
        assert!(r.requests > 100, "{}: {r:?}", s.name);
        assert_eq!(r.errors, 0, "{}: {:?}", s.name, r.status);
    }
    // 13. HTTP/2 cleartext (prior knowledge) downstream.
    for s in &sidecars {
        let spec = meshbench::load::LoadSpec {
            target: s.outbound,
            host: "reviews:9080".into(),
            path: "/".into(),
            connections: 2,
            duration: Duration::from_millis(300),
            rate: None,
            headers: vec![],
            http2: true,
            live: None,
        };
        let r = meshbench::load::run(spec).await;
        assert!(
            r.requests > 10 && r.errors == 0,
            "{} h2c: {:?}",
            s.name,
            r.status
        );
        assert_eq!(
            r.status.keys().collect::<Vec<_>>(),
            vec!["200"],
            "{}",
            s.name
        );
    }
    // 14. A VirtualService applied before the DestinationRule that defines its subset (a
    // warning, kept): both proxies answer 503 without reaching an upstream, as Envoy does for
    // istiod's routes to a cluster that does not exist; once the subset is defined, 200.
    apply(vs(
        "reviews",
        "  - route: [{destination: {host: reviews, subset: v9}}]\n",
    ))
    .await;
    for s in &sidecars {
        v1.take_hits();
        let m = run_requests(s, "reviews:9080", "/", &[], 5).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![503],
            "{}: {m:?}",
            s.name
        );
        assert_eq!(v1.take_hits(), 0, "{}", s.name);
    }
    apply(SERVICES.replace(
        "  - {name: v3, labels: {version: v3}}\n",
        "  - {name: v3, labels: {version: v3}}\n  - {name: v9, labels: {version: v1}}\n",
    ))
    .await;
    for s in &sidecars {
        let m = run_requests(s, "reviews:9080", "/", &[], 5).await;
        assert_eq!(
            m.keys()
                .map(|o| (o.status, o.workload.as_str()))
                .collect::<Vec<_>>(),
            vec![(200, "reviews-v1")],
            "{}: {m:?}",
            s.name
        );
    }
    eprintln!("differential: weights v1 share {shares:?}; retries {attempts:?}; circuit breaker (ok, overflow) {results:?}; per-try {per_try:?}; ejection {ejected:?}");
}

/// A stat of a cluster from a sidecar's admin `/stats` (0 when absent).
async fn cluster_stat(admin: SocketAddr, cluster: &str, stat: &str) -> u64 {
    admin_stat(admin, &format!("cluster.{cluster}.{stat}"))
        .await
        .unwrap_or(0)
}

/// Istio's default retry policy (what istiod puts on every route without `retries`), as
/// Envoy and meshbench proxy apply it: a refused connection is retried on another host, a 503
/// answer is not, gRPC `unavailable` is; `attempts: 0` switches retries off; HTTP status codes
/// in `retryOn` are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_default_retry_policy_agrees() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let good = start_upstream("127.0.0.1", "pair-good", Behavior::Ok).await;
    // A port nothing listens on: connections to it are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let flaky = start_upstream("127.0.0.1", "flaky-v1", Behavior::Status(503)).await;
    let grpc = start_upstream("127.0.0.1", "grpc-v1", Behavior::Grpc(14)).await;
    let services = ["pair", "flaky", "grpc"]
        .map(|s| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {s}}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: {s}}}}}\n"))
        .join("---\n");
    let base = [
        services,
        entry("pair-good", "pair", "v1", good.addr),
        entry("pair-dead", "pair", "v1", dead),
        entry("flaky-1", "flaky", "v1", flaky.addr),
        entry("grpc-1", "grpc", "v1", grpc.addr),
    ]
    .join("---\n");
    let (s, body) = json(p.api, "POST", "/v1/apply", &base).await;
    assert_eq!(s, 200, "{body}");
    let envoy = start_envoy(&bin, p.xds, "client", "client-envoy", &[("app", "client")]).await;
    let mesh = start_mesh_proxy(p.xds, "client", "client-mesh", &[("app", "client")]).await;
    let sidecars = sidecars(&envoy, &mesh);
    let v = apply_ok(p.api, "apiVersion: v1\nkind: Service\nmetadata: {name: marker}\nspec: {ports: [{port: 9080, name: http}], selector: {app: marker}}\n").await.version;
    for s in &sidecars {
        wait_synced(p.api, &s.node_id, v).await;
    }
    let pair = "outbound|9080||pair.default.svc.cluster.local";
    let mut report = Vec::new();

    // 1. No VirtualService: every request to the pair succeeds; the ones that picked the
    // refusing host first were retried on the other host. Round robin makes that nearly all
    // of them: a retried request takes two picks (refusing host, then the other), so the
    // next request starts on the refusing host again.
    for s in &sidecars {
        good.take_hits();
        let m = run_requests(s, "pair:9080", "/", &[], 20).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![200],
            "{}: {m:?}",
            s.name
        );
        let retries = cluster_stat(s.admin, pair, "upstream_rq_retry").await;
        assert!(
            (18..=20).contains(&retries),
            "{}: {retries} retries for 20 requests over two hosts",
            s.name
        );
        assert_eq!(good.take_hits(), 20, "{}", s.name);
        report.push((s.name, "default: refused retried", retries));
    }
    // 2. A 503 answer is not retried by the default policy; 3. gRPC unavailable is (twice).
    for s in &sidecars {
        flaky.take_hits();
        let m = run_requests(s, "flaky:9080", "/", &[], 5).await;
        assert_eq!(
            m.keys().map(|o| o.status).collect::<Vec<_>>(),
            vec![503],
            "{}",
            s.name
        );
        assert_eq!(
            flaky.take_hits(),
            5,
            "{}: 503 answers are not retried by default",
            s.name
        );
        grpc.take_hits();
        run_requests(
            s,
            "grpc:9080",
            "/",
            &[("content-type", "application/grpc")],
            5,
        )
        .await;
        let hits = grpc.take_hits();
        assert_eq!(hits, 15, "{}: grpc-status 14 is retried twice", s.name);
        report.push((s.name, "grpc unavailable attempts", hits));
    }
    // 4. `attempts: 0` switches retries off: refused connections surface as 503s; 5. status
    // codes in retryOn are retried.
    let v = apply_ok(
        p.api,
        &[
            vs("pair", "  - retries: {attempts: 0}\n    route: [{destination: {host: pair}}]\n"),
            vs("flaky", "  - retries: {attempts: 3, retryOn: \"503\"}\n    route: [{destination: {host: flaky}}]\n"),
        ]
        .join("---\n"),
    )
    .await
    .version;
    for s in &sidecars {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for s in &sidecars {
        let m = run_requests(s, "pair:9080", "/", &[], 20).await;
        let failed: usize = m
            .iter()
            .filter(|(o, _)| o.status == 503)
            .map(|(_, n)| n)
            .sum();
        assert!(
            (5..=15).contains(&failed),
            "{}: {failed} of 20 failed without retries: {m:?}",
            s.name
        );
        flaky.take_hits();
        run_requests(s, "flaky:9080", "/", &[], 5).await;
        assert_eq!(
            flaky.take_hits(),
            20,
            "{}: retryOn 503 with 3 attempts",
            s.name
        );
        report.push((s.name, "attempts 0: failures", failed as u64));
    }
    eprintln!("default retry policy: {report:?}");
}

/// Outlier detection fields istiod translates: `consecutiveGatewayErrors` (enforced, while
/// 5xx counting is off), `maxEjectionPercent` as Envoy 1.40 applies it (a host is ejected
/// only if the share ejected afterwards stays within it: 1 of 3 at 50%, none of 2 at 10%),
/// and `minHealthPercent` as the panic threshold (istiod's default 0 keeps an ejected host
/// out; 60 sends to it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_fields_agree() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let bad1 = start_upstream("127.0.0.1", "trio-bad1", Behavior::Status(503)).await;
    let bad2 = start_upstream("127.0.0.1", "trio-bad2", Behavior::Status(503)).await;
    let good = start_upstream("127.0.0.1", "trio-good", Behavior::Ok).await;
    let pbad = start_upstream("127.0.0.1", "pair-bad", Behavior::Status(503)).await;
    let pgood = start_upstream("127.0.0.1", "pair-good", Behavior::Ok).await;
    let services = ["trio", "panic", "calm", "capped"]
        .map(|s| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {s}}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: {s}}}}}\n"))
        .join("---\n");
    let dr = |host: &str, od: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}}}\nspec:\n  host: {host}\n  trafficPolicy:\n    outlierDetection: {od}\n")
    };
    let base = [
        services,
        entry("trio-bad1", "trio", "v1", bad1.addr),
        entry("trio-bad2", "trio", "v1", bad2.addr),
        entry("trio-good", "trio", "v1", good.addr),
        entry("panic-bad", "panic", "v1", pbad.addr),
        entry("panic-good", "panic", "v1", pgood.addr),
        entry("calm-bad", "calm", "v1", pbad.addr),
        entry("calm-good", "calm", "v1", pgood.addr),
        entry("capped-bad", "capped", "v1", pbad.addr),
        entry("capped-good", "capped", "v1", pgood.addr),
        dr("capped", "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 10}"),
        dr("trio", "{consecutiveGatewayErrors: 1, consecutive5xxErrors: 0, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}"),
        dr("panic", "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100, minHealthPercent: 60}"),
        dr("calm", "{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}"),
    ]
    .join("---\n");
    let v = apply_ok(p.api, &base).await.version;
    let envoy = start_envoy(&bin, p.xds, "client", "client-envoy", &[("app", "client")]).await;
    let mesh = start_mesh_proxy(p.xds, "client", "client-mesh", &[("app", "client")]).await;
    let sidecars = sidecars(&envoy, &mesh);
    for s in &sidecars {
        wait_synced(p.api, &s.node_id, v).await;
    }
    let failures = |m: &BTreeMap<Outcome, usize>| -> usize {
        m.iter()
            .filter(|(o, _)| o.status == 503)
            .map(|(_, n)| n)
            .sum()
    };
    let mut seen = Vec::new();
    for s in &sidecars {
        let trio = failures(&run_requests(s, "trio:9080", "/", &[], 30).await);
        // maxEjectionPercent 10 over two hosts: ejecting one would be 50%, so none is.
        let capped = failures(&run_requests(s, "capped:9080", "/", &[], 20).await);
        // 20 requests against a pair whose bad host is ejected after one 503: with panic
        // mode at 60% it takes traffic again (half of what follows), with 0% it does not.
        let panic = failures(&run_requests(s, "panic:9080", "/", &[], 20).await);
        let calm = failures(&run_requests(s, "calm:9080", "/", &[], 20).await);
        // One bad host out after its first 503, the other keeps half of the rest (the exact
        // count depends on where round robin starts).
        assert!(
            (14..=17).contains(&trio),
            "{}: {trio} failures: one bad host of three ejected at 50% (a second would be 67%)",
            s.name
        );
        assert_eq!(
            capped, 10,
            "{}: no ejection allowed at 10% of two hosts",
            s.name
        );
        assert_eq!(calm, 1, "{}: minHealthPercent 0, no panic", s.name);
        assert!(
            (7..=12).contains(&panic),
            "{}: {panic} failures in panic mode",
            s.name
        );
        seen.push((s.name, trio, capped, panic, calm));
    }
    eprintln!("outlier fields (trio, capped, panic, calm failures): {seen:?}");
}

/// A VirtualService's `headers` (request and response `set`, `add`, `remove`) as istiod
/// translates them and Envoy applies them: the upstream sees the same request headers, the
/// client the same response headers, through both proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_header_operations_agree() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let up = start_upstream("127.0.0.1", "hdr-v1", Behavior::EchoHeaders).await;
    let base = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: hdr}\nspec: {ports: [{port: 9080, name: http}], selector: {app: hdr}}\n".to_string(),
        entry("hdr-1", "hdr", "v1", up.addr),
        vs("hdr", "  - headers:\n      request:\n        set: {x-set: one}\n        add: {x-add: two}\n        remove: [x-drop]\n      response:\n        set: {x-resp-set: three}\n        add: {x-upstream-said: extra}\n        remove: [x-remove-me]\n    route: [{destination: {host: hdr}}]\n"),
    ]
    .join("---\n");
    let v = apply_ok(p.api, &base).await.version;
    let envoy = start_envoy(&bin, p.xds, "client", "client-envoy", &[("app", "client")]).await;
    let mesh = start_mesh_proxy(p.xds, "client", "client-mesh", &[("app", "client")]).await;
    let mut seen = Vec::new();
    for s in sidecars(&envoy, &mesh) {
        let name = s.name;
        wait_synced(p.api, &s.node_id, v).await;
        let mut c = Client::connect(s.outbound).await.unwrap();
        let r = c
            .request(
                "GET",
                "hdr:9080",
                "/",
                &[
                    ("x-set", "original"),
                    ("x-add", "first"),
                    ("x-drop", "gone"),
                ],
                "",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{name}");
        let mut upstream: Vec<&str> = r.body.lines().collect();
        upstream.sort();
        assert_eq!(
            upstream,
            ["x-add: first", "x-add: two", "x-set: one"],
            "{name}: what the upstream received"
        );
        let said: Vec<&str> = r
            .headers
            .get_all("x-upstream-said")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(said, ["hi", "extra"], "{name}");
        assert_eq!(r.headers["x-resp-set"], "three", "{name}");
        assert!(!r.headers.contains_key("x-remove-me"), "{name}");
        seen.push((name, upstream.join("; ")));
    }
    eprintln!("header operations: {seen:?}");
}
