//! Local rate limiting, differential: one pilot gives Envoy 1.40 and meshbench proxy the same
//! EnvoyFilter (Istio's local rate limit task: `envoy.filters.http.local_ratelimit` inserted
//! into the inbound HTTP connection manager, and per-route config merged into the inbound
//! route), and both must refuse the same requests: burst, refill, enabled/enforced fractions,
//! per-route config, 429 body and headers, stats. The rate a sustained load gets through is
//! measured against the configured one for both.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// Both sidecars serve the `limited` service: they carry `app: limited`, so each has an
/// inbound listener on POD_IP:PORT forwarding to the test upstream on 127.0.0.1:PORT.
struct Server {
    name: &'static str,
    inbound: SocketAddr,
    admin: SocketAddr,
    node_id: String,
}

fn envoy_filter(patches: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: limit}}\nspec:\n  workloadSelector:\n    labels: {{app: limited}}\n  configPatches:\n{patches}"
    )
}

/// Istio's HTTP_FILTER patch with this LocalRateLimit value (indented YAML lines).
fn filter_patch(value: &str) -> String {
    format!(
        "  - applyTo: HTTP_FILTER\n    match:\n      context: SIDECAR_INBOUND\n      listener:\n        filterChain:\n          filter: {{name: envoy.filters.network.http_connection_manager}}\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config:\n          \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          value:\n{value}"
    )
}

const ENABLED: &str = "            filter_enabled: {runtime_key: e, default_value: {numerator: 100, denominator: HUNDRED}}\n";
const ENFORCED: &str = "            filter_enforced: {runtime_key: f, default_value: {numerator: 100, denominator: HUNDRED}}\n";

fn bucket(max: u32, per_fill: u32, fill: &str) -> String {
    format!("            token_bucket: {{max_tokens: {max}, tokens_per_fill: {per_fill}, fill_interval: {fill}}}\n")
}

async fn statuses(s: &Server, n: usize) -> Vec<u16> {
    let mut c = Client::connect(s.inbound).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(c.get("limited:9080", "/").await.unwrap().status);
    }
    out
}

async fn stat(admin: SocketAddr, name: &str) -> u64 {
    admin_stat(admin, name).await.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_and_meshbench_proxy_rate_limit_alike() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let app = start_upstream("127.0.0.1", "limited-v1", Behavior::Ok).await;
    let port = app.addr.port();
    let (s, body) = json(p.api, "POST", "/v1/apply", &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: limited}}\nspec: {{ports: [{{port: 9080, targetPort: {port}, name: http}}], selector: {{app: limited}}}}\n")).await;
    assert_eq!(s, 200, "{body}");
    let labels = [("app", "limited"), ("version", "v1")];
    let envoy = start_envoy(&bin, p.xds, "limited", "limited-envoy", &labels).await;
    let mesh = start_mesh_proxy(p.xds, "limited", "limited-mesh", &labels).await;
    let servers = [
        Server {
            name: "envoy",
            inbound: format!("{}:{port}", envoy.pod_ip).parse().unwrap(),
            admin: envoy.admin,
            node_id: envoy.node_id.clone(),
        },
        Server {
            name: "meshbench",
            inbound: format!("{}:{port}", mesh.pod_ip).parse().unwrap(),
            admin: mesh.admin,
            node_id: mesh.node_id.clone(),
        },
    ];
    let apply = |yaml: String| {
        let api = p.api;
        let ids: Vec<String> = servers.iter().map(|s| s.node_id.clone()).collect();
        async move {
            let v = apply_ok(api, &yaml).await.version;
            for id in &ids {
                wait_synced(api, id, v).await;
            }
            // A new listener config replaces the old one: give both a moment to serve it.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };

    // 1. Burst: a full bucket of 5 (refilling 5 per 10 s), enabled and enforced: 5 pass,
    // the rest get 429 `local_rate_limited` with the configured header, and no
    // x-envoy-ratelimited.
    apply(envoy_filter(&filter_patch(&format!(
        "            stat_prefix: http_local_rate_limiter\n{}{ENABLED}{ENFORCED}            response_headers_to_add:\n            - append: false\n              header: {{key: x-local-rate-limit, value: 'true'}}\n",
        bucket(5, 5, "10s")
    ))))
    .await;
    for s in &servers {
        let got = statuses(s, 8).await;
        assert_eq!(got, [200, 200, 200, 200, 200, 429, 429, 429], "{}", s.name);
        let mut c = Client::connect(s.inbound).await.unwrap();
        let r = c.get("limited:9080", "/").await.unwrap();
        assert_eq!(r.status, 429, "{}", s.name);
        assert_eq!(r.body, "local_rate_limited", "{}", s.name);
        assert_eq!(r.headers["x-local-rate-limit"], "true", "{}", s.name);
        assert!(!r.headers.contains_key("x-envoy-ratelimited"), "{}", s.name);
        let prefix = "http_local_rate_limiter.http_local_rate_limit";
        let counts = [
            stat(s.admin, &format!("{prefix}.enabled")).await,
            stat(s.admin, &format!("{prefix}.ok")).await,
            stat(s.admin, &format!("{prefix}.rate_limited")).await,
            stat(s.admin, &format!("{prefix}.enforced")).await,
        ];
        assert_eq!(
            counts,
            [9, 5, 4, 4],
            "{}: enabled, ok, rate_limited, enforced",
            s.name
        );
    }

    // 2. Refill: 10 tokens per second refill smoothly; 450 ms after draining, about 4.
    apply(envoy_filter(&filter_patch(&format!(
        "            stat_prefix: refill\n{}{ENABLED}{ENFORCED}",
        bucket(10, 10, "1s")
    ))))
    .await;
    let mut refilled = Vec::new();
    for s in &servers {
        statuses(s, 12).await;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(450)).await;
        let got = statuses(s, 10).await;
        let ok = got.iter().filter(|c| **c == 200).count();
        let waited = t.elapsed().as_secs_f64();
        assert!(
            (3..=6).contains(&ok),
            "{}: {ok} passed {waited:.2} s after draining a bucket of 10/s",
            s.name
        );
        refilled.push(ok);
    }

    // 3. Enabled but not enforced: counted as rate limited, nothing refused. 4. Neither
    // fraction given: the limiter is not consulted at all (Envoy's default is 0%).
    apply(envoy_filter(&filter_patch(&format!(
        "            stat_prefix: shadow\n{}{ENABLED}",
        bucket(2, 2, "10s")
    ))))
    .await;
    for s in &servers {
        assert!(statuses(s, 6).await.iter().all(|c| *c == 200), "{}", s.name);
        let limited = stat(s.admin, "shadow.http_local_rate_limit.rate_limited").await;
        let enforced = stat(s.admin, "shadow.http_local_rate_limit.enforced").await;
        assert_eq!(
            (limited, enforced),
            (4, 0),
            "{}: rate_limited, enforced",
            s.name
        );
    }
    apply(envoy_filter(&filter_patch(&format!(
        "            stat_prefix: unconsulted\n{}",
        bucket(1, 1, "10s")
    ))))
    .await;
    for s in &servers {
        assert!(statuses(s, 5).await.iter().all(|c| *c == 200), "{}", s.name);
        assert_eq!(
            stat(s.admin, "unconsulted.http_local_rate_limit.enabled").await,
            0,
            "{}",
            s.name
        );
    }

    // 5. Per route (Istio's second shape): the filter carries only a stat prefix; the
    // inbound route's own config limits, under its own stat prefix and status.
    apply(envoy_filter(&format!(
        "{}  - applyTo: HTTP_ROUTE\n    match:\n      context: SIDECAR_INBOUND\n      routeConfiguration:\n        vhost:\n          name: \"inbound|http|{port}\"\n          route: {{action: ANY}}\n    patch:\n      operation: MERGE\n      value:\n        typed_per_filter_config:\n          envoy.filters.http.local_ratelimit:\n            \"@type\": type.googleapis.com/udpa.type.v1.TypedStruct\n            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n            value:\n              stat_prefix: per_route\n              status: {{code: 503}}\n  {}  {}  {}",
        filter_patch("            stat_prefix: http_local_rate_limiter\n"),
        bucket(3, 3, "10s"),
        ENABLED,
        ENFORCED
    )))
    .await;
    for s in &servers {
        let got = statuses(s, 5).await;
        assert_eq!(got, [200, 200, 200, 503, 503], "{}", s.name);
        assert_eq!(
            stat(s.admin, "per_route.http_local_rate_limit.enforced").await,
            2,
            "{}",
            s.name
        );
    }

    // 6. Accuracy: 60 requests/s for 3 s against 10 per second (bucket of 10).
    apply(envoy_filter(&filter_patch(&format!(
        "            stat_prefix: accuracy\n{}{ENABLED}{ENFORCED}",
        bucket(10, 10, "1s")
    ))))
    .await;
    let mut accuracy = Vec::new();
    for s in &servers {
        let r = meshbench::load::run(meshbench::load::LoadSpec {
            target: s.inbound,
            host: "limited:9080".into(),
            path: "/".into(),
            connections: 2,
            duration: Duration::from_secs(3),
            rate: Some(60.0),
            headers: vec![],
            http2: false,
            live: None,
        })
        .await;
        let ok = r.status.get("200").copied().unwrap_or(0) as f64;
        let shed = r.status.get("429").copied().unwrap_or(0);
        assert_eq!(r.shed, shed, "{}: 429s counted as shed", s.name);
        // Allowed beyond the initial bucket, per second, against the configured 10/s.
        let allowed = (ok - 10.0) / r.duration_s;
        assert!(
            (7.0..=13.0).contains(&allowed),
            "{}: {allowed:.1}/s allowed against 10/s ({:?})",
            s.name,
            r.status
        );
        accuracy.push((s.name, allowed));
    }
    eprintln!("rate limit: refilled after 450 ms {refilled:?}; allowed rate at 60/s offered against 10/s {accuracy:?}");
}
