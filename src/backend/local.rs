//! The local backend: every process a child of this one. Addresses: every run takes a loopback
//! /24 of its own (127.A.B.0 from the process id); pilot listens on .1 (15010 ADS, 15080
//! REST), the load client's sidecar is .8, pod k has POD_IP .(10+2k) (its sidecar: 15001
//! outbound, targetPort inbound, 15000 admin) and the pod-local app address .(11+2k). Every
//! child is killed when the backend is dropped (normal end, error, Ctrl-C) and, through
//! PR_SET_PDEATHSIG, if this process dies without dropping it (see `launch`).

use std::collections::HashMap;
use std::net::SocketAddr;

use super::{
    agent_args, envoy_bootstrap, sidecar_args, workload_args, workload_env, Backend, Error,
    Options, Pod, PodAddr, ENVOY_ARGS,
};
use crate::launch::{command, log_file, PilotArgs, PilotProcess, Process};
use crate::measure::proc_stats;
use crate::report::{ProcessCost, Resources};
use crate::scenario::ProxyKind;

/// One pod's processes: a workload and its sidecar (the load client has only a sidecar).
#[derive(Debug, Default)]
struct Procs {
    workload: Option<Process>,
    sidecar: Option<Process>,
}

pub struct LocalBackend {
    opts: Options,
    base: String,
    token: String,
    /// The CA key every pilot of the run starts with (a restarted pilot keeps the root).
    ca_key: String,
    pilot: Option<PilotProcess>,
    pods: HashMap<String, Procs>,
}

impl LocalBackend {
    pub fn new(opts: Options) -> LocalBackend {
        let pid = std::process::id();
        LocalBackend {
            base: format!("127.{}.{}", 30 + pid % 60, (pid / 60) % 250),
            token: crate::pilot::new_token(),
            ca_key: crate::security::Ca::new_key_pem(),
            opts,
            pilot: None,
            pods: HashMap::new(),
        }
    }

    fn addr(&self, host: usize, port: u16) -> SocketAddr {
        format!("{}.{host}:{port}", self.base)
            .parse()
            .expect("valid address")
    }

    fn spawn_sidecar(&self, p: &Pod) -> Result<Process, Error> {
        let log = log_file(&self.opts.log_dir, &format!("{}-sidecar", p.plan.name));
        let xds = p.xds_addr(self.pilot_xds());
        if self.opts.agent {
            let envoy = match self.opts.proxy {
                ProxyKind::Envoy => Some(self.opts.envoy_binary()?),
                ProxyKind::Meshbench => None,
            };
            let dir = self.opts.log_dir.join(format!("{}-agent", p.plan.name));
            let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
            c.args(agent_args(p, &xds.to_string(), self.opts.xds, envoy, &dir))
                // Not captured: the proxy keeps this process's user.
                // SAFETY: geteuid has no preconditions.
                .args(["--proxy-uid", &unsafe { libc::geteuid() }.to_string()])
                .envs(p.xds_tls_env())
                .stderr(log);
            return Process::spawn(c, &format!("the agent of {}", p.plan.name));
        }
        match self.opts.proxy {
            ProxyKind::Meshbench => {
                let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
                c.args(sidecar_args(p, &xds.to_string(), self.opts.xds))
                    .envs(p.xds_tls_env())
                    .stderr(log);
                Process::spawn(c, &format!("the sidecar of {}", p.plan.name))
            }
            ProxyKind::Envoy => {
                let envoy = self.opts.envoy_binary()?;
                let b = envoy_bootstrap(p, xds, self.opts.xds);
                let path = self
                    .opts
                    .log_dir
                    .join(format!("{}-envoy.json", p.plan.name));
                std::fs::write(&path, b.to_json_with_tls(p.xds_tls.as_ref()).to_string())
                    .map_err(|e| Error::Environment(format!("{}: {e}", path.display())))?;
                let mut c = command(envoy, &self.opts.run_id);
                c.arg("-c").arg(&path).args(ENVOY_ARGS).stderr(log);
                Process::spawn(c, &format!("Envoy for {}", p.plan.name))
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }
    fn pod_limit(&self) -> usize {
        120
    }
    fn pod_addr(&self, k: usize, _plan: &super::PodPlan) -> PodAddr {
        PodAddr {
            pod_ip: format!("{}.{}", self.base, 10 + 2 * k),
            app_ip: format!("{}.{}", self.base, 11 + 2 * k),
        }
    }
    fn client_addr(&self) -> PodAddr {
        PodAddr {
            pod_ip: format!("{}.8", self.base),
            app_ip: format!("{}.9", self.base),
        }
    }
    fn pilot_xds(&self) -> SocketAddr {
        self.addr(1, 15010)
    }
    fn pilot_api(&self) -> SocketAddr {
        self.addr(1, 15080)
    }
    fn api_token(&self) -> String {
        self.token.clone()
    }

    async fn start_pilot(&mut self) -> Result<(), Error> {
        let mut args = PilotArgs::new(self.pilot_xds(), self.pilot_api());
        args.debounce = self.opts.debounce;
        args.token = self.token.clone();
        args.ca_key = Some(self.ca_key.clone());
        args.xds_tls = Some(self.addr(1, super::XDS_TLS_PORT));
        let log = log_file(&self.opts.log_dir, "pilot");
        let p = PilotProcess::start(&self.opts.meshbench_exe, &args, &self.opts.run_id, log)
            .await
            .map_err(|e| {
                Error::Environment(format!(
                    "{e}; see {}/pilot.log",
                    self.opts.log_dir.display()
                ))
            })?;
        self.pilot = Some(p);
        Ok(())
    }

    async fn stop_pilot(&mut self) {
        if let Some(p) = self.pilot.take() {
            p.process.kill().await;
        }
    }

    fn pilot_pid(&self) -> Option<u32> {
        self.pilot.as_ref().and_then(|p| p.pid())
    }

    async fn start_pod(&mut self, p: &Pod) -> Result<(), Error> {
        let workload = if !p.plan.has_app() {
            None
        } else {
            let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
            c.args(workload_args(
                p,
                &format!("{}:{}", p.addr.app_ip, p.plan.port),
            ))
            .envs(workload_env(p))
            .stderr(log_file(&self.opts.log_dir, &p.plan.name));
            Some(Process::spawn(
                c,
                &format!("the workload of {}", p.plan.name),
            )?)
        };
        let sidecar = Some(self.spawn_sidecar(p)?);
        self.pods
            .insert(p.plan.name.clone(), Procs { workload, sidecar });
        Ok(())
    }

    async fn stop_pod(&mut self, p: &Pod) {
        if let Some(procs) = self.pods.remove(&p.plan.name) {
            for c in [procs.workload, procs.sidecar].into_iter().flatten() {
                c.kill().await;
            }
        }
    }

    fn agent(&self) -> bool {
        self.opts.agent
    }

    async fn sidecar_pid(&self, p: &Pod) -> Option<u32> {
        self.pods
            .get(&p.plan.name)
            .and_then(|c| c.sidecar.as_ref())
            .and_then(Process::pid)
    }

    /// SIGSTOP / SIGCONT to the pod's processes.
    async fn pause_pod(&mut self, p: &Pod, pause: bool) -> Result<(), Error> {
        let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        if let Some(procs) = self.pods.get(&p.plan.name) {
            for c in [&procs.workload, &procs.sidecar].into_iter().flatten() {
                c.signal(sig);
                // A sidecar's agent runs the proxy: both freeze, as a paused container's.
                for child in c.pid().map(super::lifecycle::children).unwrap_or_default() {
                    // SAFETY: kill(2) on a child of our own child, just read from /proc.
                    unsafe { libc::kill(child as libc::pid_t, sig) };
                }
            }
        }
        Ok(())
    }

    /// CPU and peak RSS from /proc.
    async fn resources(&self, pods: &[&Pod]) -> Resources {
        // A sidecar under its agent is the agent and its proxy together, as the sidecar
        // container is on the docker backend (the proxy alone: its cost after a restart).
        let cost = |name: &str, pid: Option<u32>| {
            let pids = pid
                .into_iter()
                .chain(pid.map(super::lifecycle::children).unwrap_or_default());
            let mut c = ProcessCost {
                name: name.to_string(),
                ..Default::default()
            };
            for s in pids.filter_map(proc_stats) {
                c.cpu_s += s.cpu_s;
                c.peak_rss_mb += s.peak_rss_mb;
            }
            c
        };
        let sidecar_pid = |name: &str| {
            self.pods
                .get(name)
                .and_then(|p| p.sidecar.as_ref())
                .and_then(Process::pid)
        };
        Resources {
            pilot: cost("pilot", self.pilot_pid()),
            proxies: pods
                .iter()
                .map(|p| cost(&p.plan.name, sidecar_pid(&p.plan.name)))
                .collect(),
        }
    }
}

impl Drop for LocalBackend {
    /// Kills every child at once, then reaps them (each `Process` drop waits for its own).
    fn drop(&mut self) {
        for procs in self.pods.values() {
            for c in [&procs.workload, &procs.sidecar].into_iter().flatten() {
                c.signal(libc::SIGKILL);
            }
        }
        if let Some(p) = &self.pilot {
            p.process.signal(libc::SIGKILL);
        }
    }
}
