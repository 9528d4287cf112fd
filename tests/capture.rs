//! Transparent capture, for real: Istio's iptables rules (`meshbench::capture`, applied with
//! `iptables-restore`) in a network namespace of the test's own, a sidecar running as uid
//! 1337 (real Envoy 1.40, then meshbench proxy) that asked pilot for Istio's captured layout
//! (node metadata `INTERCEPTION_MODE: REDIRECT`). The "app" (this test, uid 0) calls the
//! service's virtual IP with no proxy address anywhere: the kernel redirects the connection to
//! the sidecar's `virtualOutbound`, which hands it to `0.0.0.0_9080` by its original
//! destination, routes it with route configuration `9080` and answers from the service's
//! workload; the sidecar's stats count it. A connection from uid 1337 to the same address is
//! not redirected. Needs root (a network namespace and iptables); skipped otherwise.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use meshbench::capture::{Rules, PROXY_UID};

const POD_IP: &str = "10.1.0.2";
const VIP: &str = "10.96.0.10";
/// A host outside the mesh, across the veth pair in a namespace of its own, on a service
/// port (9080): what Istio's `allow_any` route sends to `PassthroughCluster`.
const EXTERNAL_IP: &str = "10.1.0.1";

/// The calling thread moves to a new network namespace (threads, and processes started
/// from it, follow; the rest of the test binary does not): loopback up, the pod's address on
/// one end of a veth pair (the other end answers nothing) that also carries the service
/// range, and Istio's rules.
fn enter_pod_namespace(pilot_port_hint: &[u16], outside: libc::pid_t) -> Result<(), String> {
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare: {}", std::io::Error::last_os_error()));
    }
    let sh = |cmd: &str| -> Result<(), String> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("{cmd}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    };
    sh("ip link set lo up")?;
    sh(&format!(
        "ip link add mb0 type veth peer name mb1 && ip link set mb0 up && ip link set mb1 netns {outside}"
    ))?;
    sh(&format!("ip addr add {POD_IP}/24 dev mb0"))?;
    sh("ip route add 10.96.0.0/16 dev mb0")?;
    let rules = Rules {
        exclude_inbound: vec![],
        exclude_outbound: pilot_port_hint.to_vec(),
    }
    .render();
    let mut child = Command::new("iptables-restore")
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("iptables-restore: {e}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The outside host: a thread in a network namespace of its own (its id returned once the
/// namespace exists; the pod's namespace moves the veth's other end there), then, once told,
/// that end up as EXTERNAL_IP and a server on EXTERNAL_IP:9080 answering as `external`
/// (one request per connection) for the rest of the test.
fn start_outside_host() -> (libc::pid_t, std::sync::mpsc::Sender<()>) {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
        tid_tx.send(unsafe { libc::gettid() }).unwrap();
        go_rx.recv().unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip link set lo up && ip link set mb1 up && ip addr add {EXTERNAL_IP}/24 dev mb1"
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let l = std::net::TcpListener::bind((EXTERNAL_IP, 9080)).unwrap();
        for s in l.incoming().flatten() {
            use std::io::{Read, Write};
            let mut s = s;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nx-meshbench-workload: external\r\ncontent-length: 8\r\nconnection: close\r\n\r\nexternal");
        }
    });
    (tid_rx.recv().unwrap(), go_tx)
}

/// A GET with `host` to the outside host's address, as an app calling something outside
/// the mesh on a service port.
async fn call_outside(host: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("{EXTERNAL_IP}:9080").parse().unwrap();
    let mut c = tokio::time::timeout(Duration::from_secs(2), Client::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(5), c.get(host, "/status"))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((r.status, r.workload().unwrap_or_default().to_string()))
}

/// A sidecar process running as uid 1337, killed on drop.
struct Sidecar {
    admin: SocketAddr,
    node_id: String,
    child: std::process::Child,
    _dir: TempDir,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn labels() -> meshbench::model::Labels {
    [("app".to_string(), "productpage".to_string())].into()
}

fn start_sidecar(kind: &'static str, envoy: &std::path::Path, xds: SocketAddr) -> Sidecar {
    let dir = TempDir::new("capture");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let node_id =
        meshbench::xds::node::sidecar_id(POD_IP, &format!("productpage-{kind}"), "default");
    let log = std::fs::File::create(dir.0.join("sidecar.log")).unwrap();
    let mut cmd = match kind {
        "envoy" => {
            let b = meshbench::xds::bootstrap::EnvoyBootstrap {
                pod_ip: POD_IP.into(),
                pod_name: format!("productpage-{kind}"),
                namespace: "default".into(),
                service: "productpage".into(),
                labels: labels(),
                app_ip: "127.0.0.1".into(),
                admin,
                xds,
                xds_mode: Default::default(),
                router: false,
                capture: true,
            };
            let config = dir.0.join("bootstrap.json");
            std::fs::write(&config, b.to_json().to_string()).unwrap();
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
            let mut c = Command::new(envoy);
            c.arg("-c").arg(&config).args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ]);
            c
        }
        _ => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_meshbench"));
            c.args([
                "proxy",
                "--capture",
                "--concurrency",
                "1",
                "--label",
                "app=productpage",
            ])
            .args(["--xds", &xds.to_string(), "--node-id", &node_id])
            .args(["--admin", &admin.to_string(), "--cluster", "productpage"]);
            c
        }
    };
    let child = cmd
        .uid(PROXY_UID)
        .gid(PROXY_UID)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{kind} starts: {e}"));
    Sidecar {
        admin,
        node_id,
        child,
        _dir: dir,
    }
}

/// A GET to the service's virtual IP, as an app that knows only the service's name.
async fn call_service() -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("{VIP}:9080").parse().unwrap();
    let mut c = tokio::time::timeout(Duration::from_secs(2), Client::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let r = tokio::time::timeout(Duration::from_secs(5), c.get("reviews:9080", "/reviews/0"))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((r.status, r.workload().unwrap_or_default().to_string()))
}

/// A bare connection to the service's virtual IP from uid 1337 (the sidecar's user).
fn connect_as_proxy_user() -> std::process::ExitStatus {
    Command::new("timeout")
        .args(["2", "bash", "-c", &format!("exec 3<>/dev/tcp/{VIP}/9080")])
        .uid(PROXY_UID)
        .gid(PROXY_UID)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("bash runs")
}

/// productpage's app in direct mode, calling reviews by its virtual IP (no /etc/hosts of its
/// own here: the address stands in for the name a pod resolves).
async fn start_direct_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (trigger, stop) = meshbench::shutdown::channel();
    std::mem::forget(trigger);
    let mut call = meshbench::workload::Call::new(&format!("{VIP}:9080"));
    call.path = "/reviews/0".into();
    let cfg = meshbench::workload::Config {
        service: "productpage".into(),
        version: "v1".into(),
        pod: "productpage-v1-0".into(),
        direct: true,
        behaviour: meshbench::workload::Behaviour {
            calls: vec![call],
            ..Default::default()
        },
        ..Default::default()
    };
    tokio::spawn(meshbench::workload::run(cfg, l, stop));
    addr
}

async fn scenario(envoy: std::path::PathBuf) {
    let p = start_pilot(Duration::ZERO).await;
    let app = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let mesh = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{clusterIP: {VIP}, ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: productpage}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: productpage}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: reviews-v1}}\nspec: {{address: 127.0.0.1, labels: {{app: reviews, version: v1}}, ports: {{http: {}}}}}\n",
        app.addr.port()
    );
    let v = apply_ok(p.api, &mesh).await.version;
    let app_direct = start_direct_app().await;
    for kind in ["envoy", "meshbench"] {
        let s = start_sidecar(kind, &envoy, p.xds);
        wait_synced(p.api, &s.node_id, v).await;
        // Istio's names, in the sidecar's own config dump.
        let dump = http(s.admin, "GET", "/config_dump", "").await.body;
        for name in [
            "virtualOutbound",
            "virtualInbound",
            "0.0.0.0_9080",
            "PassthroughCluster",
        ] {
            assert!(
                dump.contains(&format!("\"{name}")),
                "{kind}: {name} not in the config dump"
            );
        }
        let compact: String = dump.split_whitespace().collect();
        assert!(
            compact.contains("\"route_config_name\":\"9080\"")
                || compact.contains("\"rds\":\"9080\""),
            "{kind}: no listener routes with 9080"
        );
        let stat = "http.outbound_0.0.0.0_9080.downstream_rq_total";
        let before = admin_stat(s.admin, stat).await.unwrap_or(0);
        let start = Instant::now();
        let answer = loop {
            match call_service().await {
                Ok(r) if r.0 == 200 => break r,
                r => assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "{kind}: the app's call to {VIP}:9080 got {r:?}; log: {}",
                    std::fs::read_to_string(s._dir.0.join("sidecar.log")).unwrap_or_default()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(answer, (200, "reviews-v1".to_string()), "{kind}");
        for _ in 0..4 {
            assert_eq!(call_service().await.map(|r| r.0), Ok(200), "{kind}");
        }
        // A workload in direct mode: its call to reviews is captured too.
        let mut c = Client::connect(app_direct).await.unwrap();
        let r = c.get("productpage:9080", "/productpage").await.unwrap();
        assert_eq!(r.status, 200, "{kind}: {}", r.body);
        assert_eq!(
            r.headers
                .get(meshbench::workload::UPSTREAMS_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some("reviews-v1"),
            "{kind}: productpage's call to reviews"
        );
        let counted = admin_stat(s.admin, stat).await.unwrap_or(0) - before;
        assert!(counted >= 6, "{kind}: {stat} counted {counted} of 6+ calls");
        // The sidecar's own user is not captured: its connection to the virtual IP goes
        // out as addressed (nothing answers there) and the sidecar counts nothing.
        let cx = "listener.0.0.0.0_15001.downstream_cx_total";
        let cx_before = admin_stat(s.admin, cx).await;
        let status = connect_as_proxy_user();
        assert!(
            !status.success(),
            "{kind}: uid {PROXY_UID} reached something at {VIP}:9080"
        );
        assert_eq!(
            admin_stat(s.admin, stat).await.unwrap_or(0) - before,
            counted,
            "{kind}: a uid {PROXY_UID} connection was counted"
        );
        assert_eq!(admin_stat(s.admin, cx).await, cx_before, "{kind}: {cx}");
        // A host no service claims, on a service port: the route configuration's
        // `allow_any` sends it where the app was connecting, through PassthroughCluster.
        let passthrough = "cluster.PassthroughCluster.upstream_rq_total";
        let before = admin_stat(s.admin, passthrough).await.unwrap_or(0);
        for host in ["api.example.com", "api.example.com:9080"] {
            assert_eq!(
                call_outside(host).await,
                Ok((200, "external".to_string())),
                "{kind}: {host}"
            );
        }
        assert_eq!(
            admin_stat(s.admin, passthrough).await.unwrap_or(0) - before,
            2,
            "{kind}: {passthrough}"
        );
        drop(s);
    }
}

#[test]
fn capture_sends_the_apps_calls_to_the_sidecar_and_lets_the_sidecar_user_pass() {
    let Some(envoy) = envoy_binary() else { return };
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: capture needs root (a network namespace and iptables)");
        return;
    }
    let (outside, go) = start_outside_host();
    std::thread::spawn(move || {
        enter_pod_namespace(&[], outside).expect("pod namespace");
        go.send(()).unwrap();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario(envoy));
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}
