//! meshbench proxy under trouble: the control plane killed and restarted (serving continues on
//! the last good config, then resumes), and malformed or hostile HTTP (garbage request lines,
//! oversized headers, slowloris-style partial requests) answered with 4xx or a close while
//! other connections carry on.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;

use meshbench::launch::{PilotArgs, PilotProcess};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Pilot as a child process (the library's one way to start it), on port `api`.
async fn spawn_pilot(xds: u16, api: u16, config: &std::path::Path) -> PilotProcess {
    let mut args = PilotArgs::new(
        format!("127.0.0.1:{xds}").parse().unwrap(),
        format!("127.0.0.1:{api}").parse().unwrap(),
    );
    args.debounce = Duration::ZERO;
    args.config_files = vec![config.to_path_buf()];
    PilotProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_meshbench")),
        &args,
        "test",
        Stdio::null(),
    )
    .await
    .expect("pilot starts")
}

fn mesh_yaml(v1: SocketAddr, v3: SocketAddr, subset: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: r1}}\nspec: {{address: {}, labels: {{app: reviews, version: v1}}, ports: {{http: {}}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: r3}}\nspec: {{address: {}, labels: {{app: reviews, version: v3}}, ports: {{http: {}}}}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews}}\nspec: {{host: reviews, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v3, labels: {{version: v3}}}}]}}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{{destination: {{host: reviews, subset: {subset}}}}}]\n",
        v1.ip(),
        v1.port(),
        v3.ip(),
        v3.port()
    )
}

async fn all_from(outbound: SocketAddr, n: usize) -> Vec<String> {
    let mut c = Client::connect(outbound).await.unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = c.get("reviews:9080", "/").await.unwrap();
        out.push(format!("{} {}", r.status, r.workload().unwrap_or("-")));
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_keeps_serving_through_a_pilot_restart_and_resumes() {
    let v1 = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let v3 = start_upstream("127.0.0.1", "reviews-v3", Behavior::Ok).await;
    let dir = TempDir::new("restart");
    let config = dir.0.join("mesh.yaml");
    std::fs::write(&config, mesh_yaml(v1.addr, v3.addr, "v1")).unwrap();
    let (xds_port, api_port) = (free_port(), free_port());
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let pilot = spawn_pilot(xds_port, api_port, &config).await;
    let proxy = start_mesh_proxy(
        format!("127.0.0.1:{xds_port}").parse().unwrap(),
        "productpage",
        "productpage-0",
        &[("app", "productpage")],
    )
    .await;
    let outbound: SocketAddr = format!("{}:15001", proxy.pod_ip).parse().unwrap();
    wait_synced(api, &proxy.node_id, 1).await;
    assert_eq!(all_from(outbound, 20).await, vec!["200 reviews-v1"]);

    drop(pilot); // SIGKILL
    let start = Instant::now();
    loop {
        if admin_stat(proxy.admin, "control_plane.connected_state").await == Some(0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "proxy never noticed the control plane loss"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last good config keeps serving while the control plane is gone.
    assert_eq!(all_from(outbound, 50).await, vec!["200 reviews-v1"]);

    let pilot = spawn_pilot(xds_port, api_port, &config).await;
    wait_synced(api, &proxy.node_id, 1).await;
    assert_eq!(
        admin_stat(proxy.admin, "control_plane.connected_state").await,
        Some(1)
    );
    let v = apply_as(api, Some(&pilot.token), &mesh_yaml(v1.addr, v3.addr, "v3"))
        .await
        .version;
    wait_synced(api, &proxy.node_id, v).await;
    assert_eq!(all_from(outbound, 20).await, vec!["200 reviews-v3"]);
    assert!(admin_stat(proxy.admin, "control_plane.update_rejected").await == Some(0));
}

/// With worker threads (Envoy's model: each connection on one worker, pools per worker),
/// concurrent connections are all served, and a config change reaches every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_workers_serves_every_connection_and_follows_changes() {
    let v1 = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let v3 = start_upstream("127.0.0.1", "reviews-v3", Behavior::Ok).await;
    let dir = TempDir::new("workers");
    let config = dir.0.join("mesh.yaml");
    std::fs::write(&config, mesh_yaml(v1.addr, v3.addr, "v1")).unwrap();
    let (xds_port, api_port) = (free_port(), free_port());
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let pilot = spawn_pilot(xds_port, api_port, &config).await;
    let proxy = start_mesh_proxy_threads(
        format!("127.0.0.1:{xds_port}").parse().unwrap(),
        "productpage",
        "productpage-0",
        &[("app", "productpage")],
        meshbench::xds::XdsMode::Sotw,
        3,
    )
    .await;
    let outbound: SocketAddr = format!("{}:15001", proxy.pod_ip).parse().unwrap();
    wait_synced(api, &proxy.node_id, 1).await;
    let every = |version: &'static str| async move {
        let conns: Vec<_> = (0..6)
            .map(|_| tokio::spawn(all_from(outbound, 30)))
            .collect();
        for c in conns {
            assert_eq!(c.await.unwrap(), vec![format!("200 reviews-{version}")]);
        }
    };
    every("v1").await;
    let v = apply_as(api, Some(&pilot.token), &mesh_yaml(v1.addr, v3.addr, "v3"))
        .await
        .version;
    wait_synced(api, &proxy.node_id, v).await;
    every("v3").await;
    // Every connection was counted once, whichever worker served it.
    let stats = http(proxy.admin, "GET", "/stats", "").await.body;
    let accepted: u64 = stats
        .lines()
        .filter(|l| l.starts_with("http.") && l.contains(".downstream_cx_total: "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(accepted, 12, "{stats}");
    assert_eq!(v1.hits.load(std::sync::atomic::Ordering::Relaxed), 180);
    assert_eq!(v3.hits.load(std::sync::atomic::Ordering::Relaxed), 180);
}

/// Sends raw bytes on a fresh connection; returns what came back and whether the proxy
/// closed the connection within 2 s.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), closed)
}

/// A 4xx answer, or the connection closed (HTTP/2 sends GOAWAY first).
fn rejected((reply, closed): &(String, bool)) -> bool {
    reply.starts_with("HTTP/1.1 4") || (*closed && !reply.starts_with("HTTP/1.1 2"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_4xx_or_close_and_others_are_unaffected() {
    let p = start_pilot(Duration::ZERO).await;
    let v1 = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let v3 = start_upstream("127.0.0.1", "reviews-v3", Behavior::Ok).await;
    let version = apply_ok(p.api, &mesh_yaml(v1.addr, v3.addr, "v1"))
        .await
        .version;
    let proxy = start_mesh_proxy(
        p.xds,
        "productpage",
        "productpage-0",
        &[("app", "productpage")],
    )
    .await;
    let outbound: SocketAddr = format!("{}:15001", proxy.pod_ip).parse().unwrap();
    wait_synced(p.api, &proxy.node_id, version).await;

    // Slowloris: many connections holding half-sent headers.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(outbound).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nX-Slow: ")
            .await
            .unwrap();
        held.push(s);
    }
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: reviews:9080\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let long_path = format!(
        "GET /{} HTTP/1.1\r\nHost: reviews:9080\r\n\r\n",
        "p".repeat(200 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage request line", b"\x00\x01\x02 NOT HTTP AT ALL\r\n\r\n".to_vec()),
        ("bad method", b"G@T / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n".to_vec()),
        ("bad version", b"GET / HTTP/7.3\r\nHost: reviews:9080\r\n\r\n".to_vec()),
        ("header without colon", b"GET / HTTP/1.1\r\nHost reviews\r\n\r\n".to_vec()),
        ("oversized header", big_header.into_bytes()),
        ("oversized request line", long_path.into_bytes()),
        ("conflicting lengths", b"POST / HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello".to_vec()),
        ("bad chunk", b"POST / HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n".to_vec()),
        ("h2 preface then garbage", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec()),
    ];
    for (name, bytes) in &cases {
        let reply = raw(outbound, bytes).await;
        assert!(
            rejected(&reply),
            "{name}: {:?}",
            &reply.0[..reply.0.len().min(200)]
        );
        // Other connections are unaffected, including during the slowloris hold.
        let mut c = Client::connect(outbound).await.unwrap();
        let r = c.get("reviews:9080", "/").await.unwrap();
        assert_eq!(r.status, 200, "after {name}");
    }
    // An unknown host is a 404 (no route), as Envoy answers it.
    let mut c = Client::connect(outbound).await.unwrap();
    assert_eq!(c.get("nowhere:1", "/").await.unwrap().status, 404);
    drop(held);
    let (s, _) = (http(proxy.admin, "GET", "/ready", "").await.status, ());
    assert_eq!(s, 200);
}

/// A listener dropped by one update and brought back by the next (what a restarted control
/// plane does while it replays config: its first snapshot has no services) is bound again
/// and ACKed, not NACKed with "address in use" while the old socket is still closing (a
/// NACKed version is never sent again, so the listener would have stayed missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_dropped_and_brought_back_at_once_is_bound_again() {
    let p = start_pilot(Duration::ZERO).await;
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: back}\nspec: {ports: [{port: 9080, name: http}], selector: {app: back}}\n";
    let v = apply_ok(p.api, service).await.version;
    let proxy = start_mesh_proxy(p.xds, "back", "back-0", &[("app", "back")]).await;
    wait_synced(p.api, &proxy.node_id, v).await;
    let inbound: SocketAddr = format!("{}:9080", proxy.pod_ip).parse().unwrap();
    for round in 0..5 {
        assert!(
            tokio::net::TcpStream::connect(inbound).await.is_ok(),
            "round {round}"
        );
        let r = http(p.api, "DELETE", "/v1/config/Service/default/back", "").await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = apply_ok(p.api, service).await.version;
        wait_synced(p.api, &proxy.node_id, v).await;
    }
    assert!(tokio::net::TcpStream::connect(inbound).await.is_ok());
}
