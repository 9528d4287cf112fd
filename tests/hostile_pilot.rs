//! Pilot under hostile input, each case an attack that once crashed it, exhausted it or got
//! through (the "Hardening" issue). Pilot runs as a child process where the claim is that it
//! survives; every case then checks it still answers and its config is unchanged.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use meshbench::launch::{PilotArgs, PilotProcess};
use meshbench::measure::proc_stats;
use meshbench::pilot_client::{HttpClient, PilotApi};

const MESH: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
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

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meshbench"))
}

/// A pilot child process with its log in `dir`; returns it and a client holding its token.
async fn pilot_process(dir: &TempDir, name: &str) -> (PilotProcess, PilotApi) {
    let ip = unique_loopback();
    let free = |ip: &str| -> SocketAddr {
        let l = std::net::TcpListener::bind((ip, 0)).unwrap();
        l.local_addr().unwrap()
    };
    let mut args = PilotArgs::new(free(&ip), free(&ip));
    args.debounce = Duration::ZERO;
    let log = std::fs::File::create(dir.0.join(format!("{name}.log"))).unwrap();
    let p = PilotProcess::start(exe(), &args, "hostile", Stdio::from(log))
        .await
        .expect("pilot starts");
    let api = PilotApi::new(p.api).with_token(Some(&p.token));
    (p, api)
}

/// Raw POST with pilot's token; returns (status, body).
async fn post(p: &PilotProcess, path: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {}", p.token);
    let r = HttpClient::default()
        .request(p.api, "POST", path, &[("authorization", &auth)], body)
        .await
        .expect("pilot answers");
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// Pilot answers and still holds `version`.
async fn healthy(api: &PilotApi, version: u64) {
    let v = api.version().await.expect("pilot still answers");
    assert_eq!(v, version, "the config changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_and_alias_bombs_are_refused_within_a_budget() {
    let dir = TempDir::new("hostile-yaml");
    let (p, mut api) = pilot_process(&dir, "pilot").await;
    let v = api.apply("mesh.yaml", MESH).await.unwrap().version;

    // 1,990 nested block sequences, and a 3,000-level mapping: once a stack overflow.
    let seq = format!("{}1\n", "- ".repeat(1990));
    let (status, body) = post(&p, "/v1/apply", &seq).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("depth") || body.contains("nested"), "{body}");
    let map: String = (0..3000)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let (status, body) = post(&p, "/v1/apply", &format!("{map}{}x: 1\n", " ".repeat(3000))).await;
    assert_eq!(status, 400, "{body}");
    let flow = format!("{}1{}", "{k: ".repeat(3000), "}".repeat(3000));
    let (status, body) = post(&p, "/v1/apply", &flow).await;
    assert_eq!(status, 400, "{body}");
    healthy(&api, v).await;

    // 100 small documents, each an alias bomb of 10^5 nodes: once 3.6 GB and a dead pilot.
    let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
    let many = vec![bomb; 100].join("---\n");
    assert!(many.len() < 40_000);
    let rss_before = proc_stats(p.pid().unwrap()).unwrap().rss_mb;
    let (status, body) = post(&p, "/v1/apply", &many).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("nodes") || body.contains("alias") || body.contains("budget"),
        "{body}"
    );
    healthy(&api, v).await;
    let s = proc_stats(p.pid().unwrap()).unwrap();
    eprintln!(
        "alias bombs: pilot RSS {rss_before:.0} MB before, {:.0} MB peak after",
        s.peak_rss_mb
    );
    // The whole request's budget is 500,000 nodes (about 50 MB of values).
    assert!(
        s.peak_rss_mb < rss_before + 200.0,
        "pilot grew from {rss_before:.0} to a {:.0} MB peak",
        s.peak_rss_mb
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_and_wrapping_weights_are_400s() {
    let dir = TempDir::new("hostile-values");
    let (p, mut api) = pilot_process(&dir, "pilot").await;
    let v = api.apply("mesh.yaml", MESH).await.unwrap().version;
    for field in [
        "timeout: 99999999999999999999h",
        "retries: {attempts: 2, perTryTimeout: 99999999999999999999h}",
        "fault: {delay: {fixedDelay: 99999999999999999999h, percentage: {value: 100}}}",
    ] {
        let vs = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - {field}\n    route: [{{destination: {{host: reviews, subset: v1}}}}]\n");
        let (status, body) = post(&p, "/v1/apply", &vs).await;
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body.contains("longer than"), "{field}: {body}");
    }
    // 4294967295 + 101 wraps to 100 in 32 bits.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - {destination: {host: reviews, subset: v1}, weight: 4294967295}\n    - {destination: {host: reviews, subset: v3}, weight: 101}\n";
    let (status, body) = post(&p, "/v1/apply", vs).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("sum to 4294967396"), "{body}");
    healthy(&api, v).await;

    // The same durations on the command line and in a scenario: exit 2, not a panic.
    let out = std::process::Command::new(exe())
        .args(["pilot", "--debounce", "4000000000000000h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // A scenario whose one step sleeps `d`: `meshbench run`'s output.
    let run_sleep = |d: &str| {
        let scenario = dir.0.join("s.yaml");
        let manifest =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bookinfo/bookinfo.yaml");
        std::fs::write(
            &scenario,
            format!(
                "topology:\n  manifests: [{}]\nsteps:\n  - sleep: {d}\n",
                manifest.display()
            ),
        )
        .unwrap();
        std::process::Command::new(exe())
            .args(["run", scenario.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run_sleep("99999999999999999999h");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("s.yaml:4"));
    let out = run_sleep("25h");
    assert_eq!(out.status.code(), Some(2), "a 25 h step: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsing_does_not_stall_the_other_requests() {
    let dir = TempDir::new("hostile-parse");
    let (p, api) = pilot_process(&dir, "pilot").await;
    // Large batches: many services, each a few hundred nodes of labels.
    let labels: String = (0..60).map(|i| format!("l{i}: v{i}, ")).collect();
    let batch: String = (0..1500)
        .map(|k| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{k}, labels: {{{labels}}}}}\nspec: {{ports: [{{port: 80}}], selector: {{app: s{k}}}}}\n"))
        .collect::<Vec<_>>()
        .join("---\n");
    let heavy = |b: String| {
        let p = (p.api, p.token.clone());
        async move {
            let auth = format!("Bearer {}", p.1);
            let t = Instant::now();
            let r = HttpClient::default()
                .request(p.0, "POST", "/v1/apply", &[("authorization", &auth)], &b)
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            t.elapsed()
        }
    };
    let probe = async {
        let mut worst = Duration::ZERO;
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            let t = Instant::now();
            api.version().await.unwrap();
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worst
    };
    let (a, b, worst) = tokio::join!(
        heavy(batch.clone()),
        heavy(batch.replace("name: s", "name: t")),
        probe
    );
    let longest = a.max(b);
    eprintln!("two applies took {a:?} and {b:?}; slowest health check {worst:?}");
    // The health checks ran while the parses did, not after them.
    assert!(
        worst < longest / 2,
        "a health check waited {worst:?} behind applies of {longest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_browsers_cannot_drive_pilot() {
    let dir = TempDir::new("hostile-auth");
    let (p, api) = pilot_process(&dir, "pilot").await;
    let http = HttpClient::default();
    // No token, a wrong one: 401; reads stay open on loopback.
    for auth in [None, Some("Bearer nope")] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = http
            .request(p.api, "POST", "/v1/apply", &headers, MESH)
            .await
            .unwrap();
        assert_eq!(r.status, 401, "{auth:?}");
    }
    let r = http
        .request(p.api, "GET", "/v1/proxies", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A page elsewhere posting text/plain with the right token still fails on Origin; a
    // rebound DNS name fails on Host.
    let auth = format!("Bearer {}", p.token);
    let r = http
        .request(
            p.api,
            "POST",
            "/v1/apply",
            &[
                ("authorization", &auth),
                ("origin", "http://evil.example"),
                ("content-type", "text/plain"),
            ],
            MESH,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let mut c = Client::connect(p.api).await.unwrap();
    let r = c
        .request("GET", "evil.example:80", "/v1/config", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    healthy(&api, 0).await;
    // The token's file is an option of the command.
    let out = std::process::Command::new(exe())
        .args(["pilot", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("api-token-file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_batches_are_checked_whole_and_no_ops_make_no_version() {
    let p = start_pilot(Duration::ZERO).await;
    let v = apply_ok(p.api, MESH).await.version;
    let ep = |name: &str, extra: &str| {
        format!("{{\"name\": \"{name}\", \"address\": \"10.0.0.1\", \"labels\": {{\"app\": \"reviews\"}}{extra}}}")
    };
    let v1 = endpoints_ok(p.api, &format!("{{\"add\": [{}]}}", ep("r1", "")))
        .await
        .version;
    assert_eq!(v1, v + 1);
    for (batch, why) in [
        (format!("{{\"add\": [{}]}}", ep("r1", "")), "exists already"),
        (
            format!("{{\"add\": [{}, {}]}}", ep("r2", ""), ep("r2", "")),
            "listed twice",
        ),
        (format!("{{\"add\": [{}]}}", ep("", "")), "name"),
        (
            format!("{{\"add\": [{}]}}", ep("r3", ", \"ports\": {\"http\": 0}")),
            "is 0",
        ),
        (
            format!("{{\"add\": [{}]}}", ep("r3", ", \"adress\": \"x\"")),
            "adress",
        ),
        (
            format!("{{\"add\": [{}]}}", ep("r3", ", \"weight\": 0")),
            "weight",
        ),
    ] {
        let r = http(p.api, "POST", "/v1/endpoints", &batch).await;
        assert_eq!(r.status, 400, "{batch}: {}", r.body);
        assert!(r.body.contains(why), "{batch}: {}", r.body);
    }
    assert_eq!(p.pilot.version(), v1, "a refused batch changed the version");
    // Updating an endpoint to what it is, and applying stored config again: no new version.
    let same = endpoints_ok(p.api, &format!("{{\"update\": [{}]}}", ep("r1", ""))).await;
    assert_eq!(same.version, v1);
    assert_eq!(apply_ok(p.api, MESH).await.version, v1);

    // A host conflict names the object being applied, not the one stored before it.
    let vs = |name: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews, subset: v1}}}}]\n")
    };
    apply_ok(p.api, &vs("zz-first")).await;
    let r = http(
        p.api,
        "POST",
        "/v1/apply?source=second.yaml",
        &vs("aa-second"),
    )
    .await;
    assert_eq!(r.status, 400);
    let e: Errors = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        e.errors[0].object, "VirtualService/default/aa-second",
        "{}",
        r.body
    );
    assert_eq!(e.errors[0].file, "second.yaml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_floods_and_forged_node_ids_do_not_flood_or_forge_the_log() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    };
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    let dir = TempDir::new("hostile-log");
    let (p, mut api) = pilot_process(&dir, "pilot").await;
    let applied = api.apply("mesh.yaml", MESH).await.unwrap().version;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", p.xds))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let node = Node {
        id: "sidecar~127.0.0.9~forged\nERROR fake log line.default~default.svc.cluster.local"
            .into(),
        ..Default::default()
    };
    let req = |nonce: &str, error: bool| DiscoveryRequest {
        node: Some(node.clone()),
        type_url: meshbench::xds::CLUSTER_TYPE.into(),
        response_nonce: nonce.into(),
        error_detail: error.then(|| RpcStatus {
            code: 13,
            message: format!("rejected\nERROR forged {}", "x".repeat(10_000)),
            details: vec![],
        }),
        ..Default::default()
    };
    tx.send(req("", false)).await.unwrap();
    // The NACKs must name the latest response's nonce: a push of the applied version after
    // an earlier snapshot's answer would make them stale (and uncounted).
    let mut cds = responses.message().await.unwrap().unwrap();
    while cds.version_info != applied.to_string() {
        cds = responses.message().await.unwrap().unwrap();
    }
    for _ in 0..20_000 {
        tx.send(req(&cds.nonce, true)).await.unwrap();
    }
    // All of them reach pilot (the ledger counts every NACK).
    let start = Instant::now();
    loop {
        let n: u64 = api
            .proxies(None)
            .await
            .unwrap()
            .iter()
            .flat_map(|p| p.types.values())
            .map(|t| t.nacks)
            .sum();
        if n >= 20_000 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{n} NACKs recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.0.join("pilot.log")).unwrap();
    let nack_lines = log.lines().filter(|l| l.contains("NACK")).count();
    assert!(nack_lines <= 201, "{nack_lines} NACK lines logged");
    assert!(log.len() < 1_000_000, "{} bytes of log", log.len());
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR")),
        "a peer-provided string started a log line"
    );
}
