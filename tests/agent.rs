//! `meshbench agent` with real Envoy 1.40 and with meshbench proxy: readiness on its port,
//! the proxy restarted after it is killed (the gap measured), a hot restart under load (Envoy:
//! the next restart epoch takes the sockets over; meshbench proxy: in process) with no failed
//! request, and a drain on SIGTERM after which nothing it started is left.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The agent's child processes (the proxies it runs).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split_whitespace().nth(2).is_some_and(|st| st == "Z"))
}

struct Agent {
    child: Child,
    ready: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    dir: TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        for c in children(self.child.id()) {
            // SAFETY: a signal to a process this test started (through the agent).
            unsafe { libc::kill(c as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(kind: &str, xds: SocketAddr) -> Agent {
    let dir = TempDir::new("agent");
    let ip = unique_loopback();
    let ready: SocketAddr = format!("{ip}:15021").parse().unwrap();
    let log = std::fs::File::create(dir.0.join("agent.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_meshbench"))
        .args(["agent", "--proxy", kind, "--xds", &xds.to_string()])
        .args(["--pod-ip", &ip, "--pod", &format!("productpage-{kind}")])
        .args(["--label", "app=productpage", "--drain", "1s"])
        .arg("--dir")
        .arg(dir.0.join("agent"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("meshbench agent starts");
    Agent {
        child,
        ready,
        outbound: format!("{ip}:15001").parse().unwrap(),
        admin: format!("{ip}:15000").parse().unwrap(),
        dir,
    }
}

async fn ready(a: &Agent) -> u16 {
    let Ok(mut c) = Client::connect(a.ready).await else {
        return 0;
    };
    c.get("agent", "/healthz/ready")
        .await
        .map_or(0, |r| r.status)
}

async fn agent_stat(a: &Agent, name: &str) -> u64 {
    let Ok(mut c) = Client::connect(a.ready).await else {
        return 0;
    };
    let body = c
        .get("agent", "/stats")
        .await
        .map(|r| r.body)
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One request through the sidecar on a connection of its own: answered by reviews?
async fn through(a: &Agent) -> bool {
    let Ok(mut c) = Client::connect(a.outbound).await else {
        return false;
    };
    matches!(c.get("reviews:9080", "/").await, Ok(r) if r.status == 200 && r.workload() == Some("reviews-v1"))
}

async fn until(
    limit: Duration,
    what: &str,
    a: &Agent,
    mut f: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "{what} within {limit:?}; agent log: {}",
            std::fs::read_to_string(a.dir.0.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

async fn exercise(kind: &str) {
    let p = start_pilot(Duration::ZERO).await;
    let app = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    apply_ok(
        p.api,
        &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: reviews-v1}}\nspec: {{address: 127.0.0.1, labels: {{app: reviews, version: v1}}, ports: {{http: {}}}}}\n", app.addr.port()),
    )
    .await;
    let a = start_agent(kind, p.xds);
    until(Duration::from_secs(20), "ready", &a, async || {
        ready(&a).await == 200
    })
    .await;
    until(Duration::from_secs(10), "served", &a, async || {
        through(&a).await
    })
    .await;

    // The proxy dies: the agent starts it again.
    let pids = children(a.child.id());
    assert_eq!(pids.len(), 1, "{kind}: one proxy under the agent: {pids:?}");
    // SAFETY: a signal to the proxy this test's agent started.
    unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) };
    let killed = Instant::now();
    until(
        Duration::from_secs(15),
        "served again after a kill",
        &a,
        async || through(&a).await,
    )
    .await;
    let gap = killed.elapsed();
    eprintln!(
        "{kind}: killed proxy -> first request served again: {} ms",
        gap.as_millis()
    );
    assert_eq!(agent_stat(&a, "agent.restarts").await, 1, "{kind}");
    until(Duration::from_secs(10), "ready again", &a, async || {
        ready(&a).await == 200
    })
    .await;

    // A hot restart under load: not one request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, outbound) = (stop.clone(), ok.clone(), failed.clone(), a.outbound);
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let served = match Client::connect(outbound).await {
                    Ok(mut c) => {
                        // A few requests per connection, then a new one.
                        let mut all = true;
                        for _ in 0..5 {
                            all &= matches!(c.get("reviews:9080", "/").await, Ok(r) if r.status == 200);
                        }
                        all
                    }
                    Err(_) => false,
                };
                if served {
                    ok.fetch_add(1, Relaxed)
                } else {
                    failed.fetch_add(1, Relaxed)
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: a signal to the agent this test started.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_secs(if kind == "envoy" { 4 } else { 2 })).await;
    stop.store(true, Relaxed);
    load.await.unwrap();
    let (ok, failed) = (ok.load(Relaxed), failed.load(Relaxed));
    eprintln!(
        "{kind}: hot restart under load: {ok} connections of 5 requests served, {failed} failed"
    );
    assert!(ok > 20, "{kind}: too little load ({ok})");
    assert_eq!(
        failed, 0,
        "{kind}: connections with a failed request across the hot restart"
    );
    assert_eq!(agent_stat(&a, "agent.hot_restarts").await, 1, "{kind}");
    if kind == "meshbench" {
        // In process: the proxy moved its ADS stream (its log goes to the agent's).
        let log = || std::fs::read_to_string(a.dir.0.join("agent.log")).unwrap_or_default();
        until(
            Duration::from_secs(5),
            "meshbench proxy reloaded its ADS target",
            &a,
            async || log().contains("ADS target reloaded"),
        )
        .await;
    }
    if kind == "envoy" {
        // The new epoch owns the admin socket once the parent is gone.
        let epoch = async || {
            let Ok(mut c) = Client::connect(a.admin).await else {
                return false;
            };
            c.get("admin", "/server_info")
                .await
                .is_ok_and(|r| r.body.contains("\"restart_epoch\": 1"))
        };
        until(
            Duration::from_secs(15),
            "Envoy at restart epoch 1",
            &a,
            epoch,
        )
        .await;
    }
    assert!(through(&a).await, "{kind}: served after the hot restart");

    // SIGTERM: drain, then everything the agent started is gone.
    let proxies = children(a.child.id());
    // SAFETY: a signal to the agent this test started.
    unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let mut agent = a;
    loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            assert!(status.success(), "{kind}: the agent exited with {status}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{kind}: the agent did not stop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{kind}: no drain period"
    );
    for pid in proxies {
        assert!(!alive(pid), "{kind}: proxy {pid} outlived its agent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_restarts_hot_restarts_and_drains_envoy() {
    // The agent finds Envoy as everything here does: MESHBENCH_ENVOY.
    if envoy_binary().is_none() {
        return;
    }
    exercise("envoy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_runs_restarts_hot_restarts_and_drains_meshbench_proxy() {
    exercise("meshbench").await;
}
