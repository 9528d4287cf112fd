//! The xDS server, the servers' accept loops, the proxy's admin port and report.html under
//! attack (the "Hardening" issue): bounded subscriptions, one stream per identity, identities
//! bound to source addresses, idle connections closed, no spinning at the fd limit, no markup
//! injected into reports.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    DiscoveryRequest,
};
use meshbench::measure::proc_stats;
use meshbench::xds::{node, CLUSTER_TYPE, ENDPOINT_TYPE};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const MESH: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
";

fn node(ip: &str, pod: &str) -> Node {
    Node {
        id: node::sidecar_id(ip, pod, "default"),
        cluster: "test".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_subscriptions_are_bounded_per_stream() {
    let p = start_pilot(Duration::ZERO).await;
    apply_ok(p.api, MESH).await;
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", p.xds))
        .await
        .unwrap()
        .max_encoding_message_size(8 << 20);
    let (tx, rx) = mpsc::channel(4);
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let n = node("127.0.0.9", "subscriber");
    // 40 requests of 100,000 names each (once 541 MB on one stream).
    let sender = tokio::spawn(async move {
        for k in 0..40 {
            let names = (0..100_000)
                .map(|i| format!("outbound|80||s{k}-{i}.x"))
                .collect();
            let req = DeltaDiscoveryRequest {
                node: Some(n.clone()),
                type_url: ENDPOINT_TYPE.into(),
                resource_names_subscribe: names,
                ..Default::default()
            };
            if tx.send(req).await.is_err() {
                return k;
            }
        }
        40
    });
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(20), responses.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(Err(status)) => break status,
            other => panic!("the stream was not closed: {other:?}"),
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    let sent = sender.await.unwrap();
    assert!(sent < 40, "pilot took all {sent} requests");
    // The stream is gone from the ledger.
    eventually(Duration::from_secs(5), || {
        p.pilot.ledger.tracker.list().is_empty().then_some(())
    })
    .await
    .expect("the closed stream left the ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_with_the_same_identity_replaces_the_first() {
    let p = start_pilot(Duration::ZERO).await;
    apply_ok(p.api, MESH).await;
    let open = |id: Node| async move {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", p.xds))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        tx.send(DiscoveryRequest {
            node: Some(id),
            type_url: CLUSTER_TYPE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        responses.message().await.unwrap().unwrap();
        (tx, responses)
    };
    let (_tx1, mut first) = open(node("127.0.0.9", "twin")).await;
    let (_tx2, _second) = open(node("127.0.0.9", "twin")).await;
    // The first stream is closed and only one proxy is listed.
    let end = tokio::time::timeout(Duration::from_secs(5), first.message())
        .await
        .expect("the first stream ends");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    let listed = proxies(p.api).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(
        p.pilot
            .ledger
            .metrics
            .connected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// One HTTP/1 request to `to` from source address `from`; its status.
async fn request_from(from: IpAddr, to: SocketAddr, method: &str, path: &str) -> u16 {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((from, 0).into()).unwrap();
    let stream = sock.connect(to).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", to.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap().status().as_u16()
}

/// A local address that is not loopback (the docker bridge's, a NIC's), if this host has one.
fn non_loopback_ip() -> Option<IpAddr> {
    let out = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_are_bound_to_source_addresses_and_rest_to_this_host() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("skipped: no non-loopback address on this host");
        return;
    };
    // Pilot on every interface, as in a container; a peer from `ip` is not loopback.
    let p = start_pilot_with_listeners("0.0.0.0:0", "0.0.0.0:0").await;
    let xds: SocketAddr = (ip, p.xds.port()).into();
    let api: SocketAddr = (ip, p.api.port()).into();
    let try_node = |claimed: &str| {
        let n = node(claimed, "claimant");
        async move {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
                .unwrap()
                .local_address(Some(ip))
                .connect()
                .await
                .unwrap();
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let (tx, rx) = mpsc::channel(4);
            let mut responses = client
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            tx.send(DiscoveryRequest {
                node: Some(n),
                type_url: CLUSTER_TYPE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            responses.message().await
        }
    };
    let posing = try_node("10.99.0.7").await;
    let err = posing.expect_err("a stream posing as another pod's IP is refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let own = try_node(&ip.to_string()).await;
    assert!(matches!(own, Ok(Some(_))), "its own IP is served: {own:?}");

    // The REST API refuses that peer entirely (workload containers on a docker network).
    let r = request_from(ip, api, "GET", "/v1/proxies").await;
    assert_eq!(r, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_the_fd_limit_does_not_spin() {
    // Pilot with 200 descriptors; 260 connections that never speak.
    let dir = TempDir::new("hostile-fd");
    let ip = unique_loopback();
    let port = |ip: &str| {
        std::net::TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (xds, api) = (port(&ip), port(&ip));
    let token = meshbench::pilot::new_token();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 200 && exec {} pilot --xds-addr {xds} --api-addr {api}",
            env!("CARGO_BIN_EXE_meshbench")
        ))
        .env(meshbench::pilot::TOKEN_ENV, &token)
        .stderr(std::fs::File::create(dir.0.join("pilot.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    meshbench::launch::wait_tcp(api, Duration::from_secs(10))
        .await
        .unwrap();
    let pid = child.id().unwrap();
    let mut idle = Vec::new();
    for k in 0..260 {
        let target = if k % 2 == 0 { xds } else { api };
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(target),
        )
        .await
        {
            idle.push(s);
        }
    }
    // No spinning while the descriptors are used up.
    let cpu0 = proc_stats(pid).unwrap().cpu_s;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = proc_stats(pid).unwrap().cpu_s - cpu0;
    assert!(cpu < 1.0, "pilot used {cpu:.2} CPU s in 3 s while idle");
    // The silent connections are closed after the first-byte deadline; pilot serves again.
    let start = Instant::now();
    let mut closed = 0;
    for mut s in idle {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 100, "only {closed} idle connections were closed");
    let v = meshbench::pilot_client::PilotApi::new(api).version().await;
    assert!(
        v.is_ok(),
        "pilot does not answer after {:?}: {v:?}",
        start.elapsed()
    );
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_listeners_and_admin_close_silent_connections_and_guard_quit() {
    let p = start_pilot(Duration::ZERO).await;
    apply_ok(p.api, MESH).await;
    let proxy = start_mesh_proxy(
        p.xds,
        "productpage",
        "productpage-0",
        &[("app", "productpage")],
    )
    .await;
    let outbound: SocketAddr = format!("{}:15001", proxy.pod_ip).parse().unwrap();
    eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(outbound).ok()
    })
    .await
    .expect("outbound listener bound");
    let mut silent = Vec::new();
    for target in [outbound, proxy.admin] {
        silent.push(tokio::net::TcpStream::connect(target).await.unwrap());
    }
    for mut s in silent {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "still open: {r:?}");
    }
    // A node id with a wildcard IP gives no wildcard admin address.
    assert_eq!(
        meshbench::proxy::default_admin(&node::sidecar_id("0.0.0.0", "x", "default")),
        "127.0.0.1:15000".parse().unwrap()
    );
    // quitquitquit from a non-loopback peer without the token is refused (a second proxy
    // with its admin port on that address).
    if let Some(ip) = non_loopback_ip() {
        let admin = start_mesh_proxy_on(p.xds, &ip.to_string()).await;
        assert_eq!(request_from(ip, admin, "POST", "/quitquitquit").await, 403);
    }
}

#[test]
fn report_html_escapes_what_a_report_json_says() {
    let dir = TempDir::new("hostile-report");
    let mut report = meshbench::report::Report {
        scenario: "s<script>alert(1)</script>".into(),
        backend: "<script>alert(2)</script>".into(),
        proxy: "<img src=x onerror=alert(3)>".into(),
        meshbench_version: "\"><script>alert(4)</script>".into(),
        ..Default::default()
    };
    let mut phase = meshbench::report::Phase {
        name: "<script>alert(6)</script>".into(),
        ..Default::default()
    };
    phase
        .load
        .result
        .versions
        .insert("reviews-<script>alert(7)</script>".into(), 5);
    let mut second = meshbench::load::Second::default();
    second
        .versions
        .insert("reviews-<script>alert(8)</script>".into(), 5);
    second.requests = 5;
    phase.load.result.series.push(second);
    report.phases.push(phase);
    report.churn.push(meshbench::report::ChurnResult {
        xds: "<script>alert(5)</script>".into(),
        ..Default::default()
    });
    let path = dir.0.join("report.json");
    std::fs::write(&path, serde_json::to_string(&report).unwrap()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbench"))
        .args(["report", path.to_str().unwrap(), "--out"])
        .arg(dir.0.join("out"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let html = std::fs::read_to_string(dir.0.join("out/report.html")).unwrap();
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(html.contains("&lt;script&gt;alert(5)"));
    assert!(html.contains("<svg"), "charts are inline");
}
