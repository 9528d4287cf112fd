//! Sidecar lifecycle faults, driven through each pod's agent (`meshbench agent`): a killed
//! proxy (the agent restarts it), a hot restart (a bootstrap change), and a Deployment's
//! rolling restart with draining, as Kubernetes and pilot-agent would do them. Processes are
//! found and signalled from this host's `/proc`, the same way for child processes (local
//! backend) and for containers (docker backend: the agent is the sidecar container's first
//! process, its proxy that process's child).

use std::time::{Duration, Instant};

use super::{serves, wait_ready, Error, Mesh, Pod, PodPlan};
use crate::pilot::api::{EndpointBatch, ProxyStatus};
use crate::pilot_client::HttpClient;
use crate::report::LifecycleEvent;

/// How long a sidecar may take to drain and exit after SIGTERM (its agent's drain period,
/// then the proxy's own exit) before the pod is removed anyway.
const DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How long every sidecar may take to ACK an endpoint removal during a rolling restart.
const ACK_LIMIT: Duration = Duration::from_secs(10);

/// Whether `node` has ACKed config `version` (or later).
pub(crate) fn synced(proxies: &[ProxyStatus], node: &str, version: u64) -> bool {
    proxies
        .iter()
        .any(|p| p.node.id == node && p.synced_version.is_some_and(|v| v >= version))
}

/// The children of process `pid` (every thread's).
pub(super) fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    let mut out: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether process `pid` has exited (gone, or a zombie not yet reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn signal(pid: u32, sig: libc::c_int, what: &str) -> Result<(), Error> {
    // SAFETY: kill(2) has no memory effects; the pid was read from /proc just before.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        return Err(Error::Environment(format!(
            "cannot signal {what} (pid {pid}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Waits until every one of `pids` has exited; false when `limit` passed first.
async fn wait_exited(pids: &[u32], limit: Duration) -> bool {
    let start = Instant::now();
    while !pids.iter().all(|&p| exited(p)) {
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Whether the agent's `/healthz/ready` says ready.
async fn agent_ready(p: &Pod) -> bool {
    let addr = super::sock(&p.addr.pod_ip, crate::agent::READINESS_PORT);
    HttpClient {
        timeout: Duration::from_secs(2),
    }
    .request(addr, "GET", "/healthz/ready", &[], "")
    .await
    .is_ok_and(|r| r.status == 200)
}

impl Mesh {
    /// A running pod by name, or a Deployment's first running pod.
    pub(super) fn find_running(&self, name: &str) -> Result<usize, Error> {
        self.pods
            .iter()
            .position(|p| p.running && p.plan.name == name)
            .or_else(|| {
                self.pods
                    .iter()
                    .position(|p| p.running && p.plan.deployment == name)
            })
            .ok_or_else(|| {
                let running: Vec<&str> = self
                    .pods
                    .iter()
                    .filter(|p| p.running)
                    .map(|p| p.plan.name.as_str())
                    .collect();
                Error::Config(format!(
                    "no running pod {name:?} (running: {})",
                    running.join(", ")
                ))
            })
    }

    /// The agent's process id of pod `i`, which must have one.
    async fn agent_pid(&self, i: usize) -> Result<u32, Error> {
        let p = &self.pods[i];
        if !self.agent {
            return Err(Error::Config(format!(
                "pod {}: its sidecar runs without an agent (mesh.agent: false)",
                p.plan.name
            )));
        }
        self.backend.sidecar_pid(p).await.ok_or_else(|| {
            Error::Environment(format!("pod {}: its sidecar is not running", p.plan.name))
        })
    }

    /// Kills pod `i`'s proxy (SIGKILL, every proxy process under its agent) and returns the
    /// milliseconds from the kill until the pod served a request through its sidecar again.
    pub(super) async fn kill_sidecar(&mut self, i: usize) -> Result<f64, Error> {
        let agent = self.agent_pid(i).await?;
        let name = self.pods[i].plan.name.clone();
        let proxies = children(agent);
        if proxies.is_empty() {
            return Err(Error::Environment(format!(
                "pod {name}: no proxy process under its agent (pid {agent})"
            )));
        }
        let start = Instant::now();
        for &pid in &proxies {
            signal(pid, libc::SIGKILL, &format!("the proxy of {name}"))?;
        }
        if !wait_exited(&proxies, Duration::from_secs(5)).await {
            return Err(Error::Environment(format!(
                "pod {name}: its proxy did not die within 5 s of SIGKILL"
            )));
        }
        while !serves(&self.pods[i], self.prober.as_ref()).await {
            if start.elapsed() > super::READY_LIMIT {
                return Err(Error::Environment(format!(
                    "pod {name}: its agent did not bring the proxy back within {:?}; see its logs in {}",
                    super::READY_LIMIT,
                    self.log_dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    }

    /// Signals pod `i`'s agent that its bootstrap changed (SIGHUP) and returns the
    /// milliseconds until the proxy's new ADS stream (Envoy's next epoch, or meshbench
    /// proxy's moved stream) had ACKed the current config and the agent said ready.
    pub(super) async fn hot_restart(&mut self, i: usize) -> Result<f64, Error> {
        let agent = self.agent_pid(i).await?;
        let p = &self.pods[i];
        let name = &p.plan.name;
        let streams = |all: &[ProxyStatus]| -> Vec<u64> {
            all.iter()
                .filter(|s| s.node.id == p.node_id)
                .map(|s| s.connection)
                .collect()
        };
        let before = streams(&self.pilot.proxies(None).await?);
        let version = self.pilot.version().await?;
        let start = Instant::now();
        signal(agent, libc::SIGHUP, &format!("the agent of {name}"))?;
        loop {
            let all = self.pilot.proxies(None).await?;
            let moved = all.iter().any(|s| {
                s.node.id == p.node_id
                    && !before.contains(&s.connection)
                    && s.synced_version.is_some_and(|v| v >= version)
            });
            if moved && agent_ready(p).await {
                return Ok(start.elapsed().as_secs_f64() * 1000.0);
            }
            if start.elapsed() > super::READY_LIMIT {
                return Err(Error::Environment(format!(
                    "pod {name}: no new ADS stream with the current config within {:?} of the hot restart (streams now {:?}, before {before:?}); see its logs in {}",
                    super::READY_LIMIT,
                    streams(&all),
                    self.log_dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Registers started pod `i` as Kubernetes lists a pod that is not ready yet: pilot knows
    /// the workload (its sidecar gets its config) but clients do not send to it; once it
    /// serves through its sidecar it is marked ready. Returns that config version.
    pub(super) async fn register_when_ready(&mut self, i: usize) -> Result<u64, Error> {
        let mut unready = self.pods[i].endpoint();
        unready.entry.healthy = false;
        self.pilot.register(vec![unready]).await?;
        wait_ready(&self.pods[i], &self.log_dir, self.prober.as_ref()).await?;
        let ready = self
            .pilot
            .endpoints(&EndpointBatch {
                update: vec![self.pods[i].endpoint()],
                ..Default::default()
            })
            .await?;
        Ok(ready.version)
    }

    /// Waits until every running sidecar has ACKed config `version` (or later).
    pub async fn wait_acked(&self, version: u64, limit: Duration) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            let proxies = self.pilot.proxies(Some(crate::sim::SIM_NAMESPACE)).await?;
            let nodes = self.node_ids();
            let behind: Vec<&String> = nodes
                .iter()
                .filter(|n| !synced(&proxies, n, version))
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if start.elapsed() > limit {
                return Err(Error::Environment(format!(
                    "{} proxies did not ACK config version {version} within {limit:?}: {behind:?}",
                    behind.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces every running pod of `deployment`, one at a time (maxSurge 1,
    /// maxUnavailable 0): the new pod starts, registers as not ready, serves, and is marked
    /// ready once it does (every sidecar ACKs that); the old pod's endpoint
    /// goes and every sidecar ACKs that; the old sidecar drains (SIGTERM to its agent) and
    /// exits; the old pod stops.
    pub(super) async fn rolling_restart(
        &mut self,
        deployment: &str,
    ) -> Result<LifecycleEvent, Error> {
        let olds: Vec<usize> = (0..self.pods.len())
            .filter(|&i| self.pods[i].running && self.pods[i].plan.deployment == deployment)
            .collect();
        if olds.is_empty() {
            return Err(Error::Config(format!(
                "rolling_restart: no running pod of Deployment {deployment:?}"
            )));
        }
        let start = Instant::now();
        let mut ev = LifecycleEvent {
            fault: "rolling_restart".into(),
            target: deployment.into(),
            ..Default::default()
        };
        for old in olds {
            // A new pod: the next free name of the Deployment, the next address.
            let taken = |n: &str| self.pods.iter().any(|p| p.plan.name == n);
            let name = (0..)
                .map(|k| format!("{deployment}-{k}"))
                .find(|n| !taken(n))
                .expect("an unbounded range has a free name");
            let plan = PodPlan {
                name: name.clone(),
                ..self.pods[old].plan.clone()
            };
            let k = self.pods.len();
            if k >= self.backend.pod_limit() {
                return Err(Error::Config(format!(
                    "rolling_restart: this backend runs at most {} pods",
                    self.backend.pod_limit()
                )));
            }
            let o = &self.pods[old];
            let mut pod = Pod::new(
                plan.clone(),
                self.backend.pod_addr(k, &plan),
                &o.control_token,
            );
            pod.xds_tls = o.xds_tls.clone();
            pod.capture = o.capture;
            pod.hosts = o.hosts.clone();
            self.backend.start_pod(&pod).await?;
            pod.running = true;
            self.pods.push(pod);
            let new = self.pods.len() - 1;
            let version = self.register_when_ready(new).await?;
            self.wait_acked(version, ACK_LIMIT).await?;
            // The old pod leaves the endpoints; once every sidecar knows, it drains.
            let removed_at = Instant::now();
            let (ns, old_name) = (
                self.pods[old].plan.namespace.clone(),
                self.pods[old].plan.name.clone(),
            );
            let applied = self.pilot.deregister(&ns, &old_name).await?;
            let agent = self.agent_pid(old).await?;
            // It is still running (and ACKs too) until it drains.
            self.wait_acked(applied.version, ACK_LIMIT).await?;
            ev.deregistered_acked_ms
                .push(removed_at.elapsed().as_secs_f64() * 1000.0);
            let drain_start = Instant::now();
            signal(agent, libc::SIGTERM, &format!("the agent of {old_name}"))?;
            if !wait_exited(&[agent], DRAIN_LIMIT).await {
                tracing::warn!("{old_name}: its sidecar did not exit within {DRAIN_LIMIT:?} of SIGTERM; removing the pod");
            }
            ev.drain_ms
                .push(drain_start.elapsed().as_secs_f64() * 1000.0);
            self.backend.stop_pod(&self.pods[old]).await;
            self.pods[old].running = false;
            ev.replaced.push(format!("{old_name} -> {name}"));
        }
        ev.ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(ev)
    }
}
