//! The local backend. Addresses: every run takes a loopback /24 of its own (127.A.B.0 from the
//! process id); pilot listens on .1 (15010 ADS, 15080 REST), the load client's sidecar is .8,
//! pod k has POD_IP .(10+2k) (its sidecar: 15001 outbound, targetPort inbound, 15000 admin) and
//! the pod-local app address .(11+2k). Pods come from Deployments x replicas and are
//! registered as endpoints through pilot's REST batch, as a Kubernetes endpoints controller
//! would. Every child is killed when the backend is dropped (normal end, error, Ctrl-C) and,
//! through PR_SET_PDEATHSIG, if this process dies without dropping it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{
    envoy_bootstrap, find_pod, plan_pods, sidecar_args, wait_tcp, workload_args, Error, Options,
    PilotApi, PodInfo, PodPlan, ENVOY_ARGS,
};
use crate::measure::proc_stats;
use crate::report::{ProcessCost, Resources};
use crate::scenario::{FaultStep, ProxyKind};
use crate::xds::node::sidecar_id;

/// One pod: a workload and its sidecar (the load client has only a sidecar).
#[derive(Debug)]
pub struct Pod {
    pub plan: PodPlan,
    pub pod_ip: String,
    pub app_ip: String,
    pub node_id: String,
    workload: Option<Child>,
    sidecar: Option<Child>,
}

impl super::PodInfo for Pod {
    fn pod_ip(&self) -> &str {
        &self.pod_ip
    }
    fn node_id(&self) -> &str {
        &self.node_id
    }
    fn running(&self) -> bool {
        self.sidecar.is_some()
    }
}

impl Pod {
    fn new(plan: PodPlan, pod_ip: String, app_ip: String) -> Pod {
        Pod {
            node_id: sidecar_id(&pod_ip, &plan.name, &plan.namespace),
            plan,
            pod_ip,
            app_ip,
            workload: None,
            sidecar: None,
        }
    }
    pub fn sidecar_pid(&self) -> Option<u32> {
        self.sidecar.as_ref().and_then(|c| c.id())
    }
}

pub struct LocalBackend {
    opts: Options,
    base: String,
    pilot: Option<Child>,
    pub pilot_api: PilotApi,
    pub pods: Vec<Pod>,
    pub client: Pod,
}

/// Environment variable every child carries: the run id (tests look for leftovers by it).
pub const RUN_ENV: &str = "MESHBENCH_RUN";

/// The killing of children on drop is `kill_on_drop`; this adds death-of-parent.
pub(crate) fn command(program: &Path, run_id: &str) -> Command {
    let mut c = Command::new(program);
    c.kill_on_drop(true)
        .stdin(Stdio::null())
        .env(RUN_ENV, run_id);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

impl LocalBackend {
    pub fn pilot_xds(&self) -> SocketAddr {
        format!("{}.1:15010", self.base)
            .parse()
            .expect("valid address")
    }
    pub fn pilot_pid(&self) -> Option<u32> {
        self.pilot.as_ref().and_then(|c| c.id())
    }
    /// The load client's sidecar outbound listener: where loads and probes are sent.
    pub fn client_outbound(&self) -> SocketAddr {
        format!("{}:15001", self.client.pod_ip)
            .parse()
            .expect("valid address")
    }
    /// (pod IP, node id) of every pod whose sidecar runs, the load client's included.
    pub fn running_pods(&self) -> Vec<(String, String)> {
        super::running(self.pods.iter().chain(std::iter::once(&self.client)))
    }

    /// Starts pilot, applies manifests and initial config, starts every pod and the client.
    pub async fn start(
        opts: Options,
        manifests: &[String],
        config: &[String],
    ) -> Result<LocalBackend, Error> {
        let pid = std::process::id();
        let base = format!("127.{}.{}", 30 + pid % 60, (pid / 60) % 250);
        std::fs::create_dir_all(&opts.log_dir).map_err(|e| {
            Error::Environment(format!("cannot create {}: {e}", opts.log_dir.display()))
        })?;
        let plans = plan_pods(manifests, 120)?;
        let mut b = LocalBackend {
            opts,
            pilot: None,
            pilot_api: PilotApi::new(format!("{base}.1:15080").parse().expect("valid address")),
            pods: plans
                .into_iter()
                .enumerate()
                .map(|(k, plan)| {
                    Pod::new(
                        plan,
                        format!("{base}.{}", 10 + 2 * k),
                        format!("{base}.{}", 11 + 2 * k),
                    )
                })
                .collect(),
            client: Pod::new(
                PodPlan::load_client(),
                format!("{base}.8"),
                format!("{base}.9"),
            ),
            base,
        };
        b.start_pilot().await?;
        b.pilot_api.apply_files(manifests).await?;
        b.pilot_api.apply_files(config).await?;
        for i in 0..b.pods.len() {
            b.start_pod(i).await?;
        }
        b.client.sidecar = Some(b.spawn_sidecar(&b.client)?);
        b.pilot_api
            .register(b.pods.iter().map(|p| (&p.plan, p.pod_ip.as_str())))
            .await?;
        for p in &b.pods {
            let app: SocketAddr = format!("{}:{}", p.app_ip, p.plan.port)
                .parse()
                .expect("valid address");
            wait_tcp(app, Duration::from_secs(10)).await.map_err(|_| {
                Error::Environment(format!(
                    "workload of pod {} did not listen on {app}",
                    p.plan.name
                ))
            })?;
        }
        Ok(b)
    }

    async fn start_pilot(&mut self) -> Result<(), Error> {
        let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
        c.args([
            "pilot",
            "--xds-addr",
            &self.pilot_xds().to_string(),
            "--api-addr",
            &self.pilot_api.addr.to_string(),
        ])
        .args([
            "--debounce",
            &format!("{}ms", self.opts.debounce.as_millis()),
        ])
        .stdout(Stdio::null())
        .stderr(log_file(&self.opts.log_dir, "pilot"));
        self.pilot = Some(
            c.spawn()
                .map_err(|e| Error::Environment(format!("cannot start pilot: {e}")))?,
        );
        let api = self.pilot_api.addr;
        wait_tcp(api, Duration::from_secs(10)).await.map_err(|_| {
            Error::Environment(format!(
                "pilot did not answer on {api}; see {}/pilot.log",
                self.opts.log_dir.display()
            ))
        })?;
        Ok(())
    }

    fn spawn_sidecar(&self, p: &Pod) -> Result<Child, Error> {
        let log = log_file(&self.opts.log_dir, &format!("{}-sidecar", p.plan.name));
        match self.opts.proxy {
            ProxyKind::Meshbench => {
                let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
                c.args(sidecar_args(
                    &p.plan,
                    &self.pilot_xds().to_string(),
                    &p.node_id,
                    &p.app_ip,
                    self.opts.xds,
                ));
                c.stdout(Stdio::null()).stderr(log);
                c.spawn().map_err(|e| {
                    Error::Environment(format!("cannot start the sidecar of {}: {e}", p.plan.name))
                })
            }
            ProxyKind::Envoy => {
                let envoy = self.opts.envoy.as_ref().ok_or_else(|| {
                    Error::Environment(
                        "Envoy not found: set MESHBENCH_ENVOY or put envoy on PATH".into(),
                    )
                })?;
                let b = envoy_bootstrap(
                    &p.plan,
                    &p.pod_ip,
                    &p.app_ip,
                    self.pilot_xds(),
                    self.opts.xds,
                );
                let path = self
                    .opts
                    .log_dir
                    .join(format!("{}-envoy.json", p.plan.name));
                std::fs::write(&path, b.to_json().to_string())
                    .map_err(|e| Error::Environment(e.to_string()))?;
                let mut c = command(envoy, &self.opts.run_id);
                c.arg("-c")
                    .arg(&path)
                    .args(ENVOY_ARGS)
                    .stdout(Stdio::null())
                    .stderr(log);
                c.spawn().map_err(|e| {
                    Error::Environment(format!("cannot start Envoy for {}: {e}", p.plan.name))
                })
            }
        }
    }

    async fn start_pod(&mut self, i: usize) -> Result<(), Error> {
        let p = &self.pods[i];
        let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
        c.args(workload_args(
            &p.plan,
            &format!("{}:{}", p.app_ip, p.plan.port),
            &p.pod_ip,
        ))
        .stdout(Stdio::null())
        .stderr(log_file(&self.opts.log_dir, &p.plan.name));
        let workload = c.spawn().map_err(|e| {
            Error::Environment(format!("cannot start the workload of {}: {e}", p.plan.name))
        })?;
        let sidecar = self.spawn_sidecar(p)?;
        let p = &mut self.pods[i];
        p.workload = Some(workload);
        p.sidecar = Some(sidecar);
        Ok(())
    }

    fn find(&self, name: &str) -> Result<usize, Error> {
        find_pod(self.pods.iter().map(|p| p.plan.name.as_str()), name)
    }

    pub async fn fault(&mut self, f: &FaultStep) -> Result<(), Error> {
        match f {
            FaultStep::Kill(p) => self.kill_pod(p).await,
            FaultStep::Restart(p) => self.restart_pod(p).await,
            FaultStep::Pause(p) => self.signal_pod(p, libc::SIGSTOP),
            FaultStep::Unpause(p) => self.signal_pod(p, libc::SIGCONT),
            FaultStep::Disconnect(_) | FaultStep::Reconnect(_) => Err(Error::Config(
                "network partitions need the docker backend (--backend docker)".into(),
            )),
            FaultStep::ControlPlane(a) if a == "stop" => {
                if let Some(mut c) = self.pilot.take() {
                    let _ = c.kill().await;
                }
                Ok(())
            }
            FaultStep::ControlPlane(_) => {
                self.start_pilot().await?;
                self.pilot_api.replay().await?;
                self.pilot_api
                    .register(
                        self.pods
                            .iter()
                            .filter(|p| p.running())
                            .map(|p| (&p.plan, p.pod_ip.as_str())),
                    )
                    .await
            }
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) a pod's processes; its endpoint stays, as a
    /// frozen pod's would until a health check noticed.
    fn signal_pod(&self, name: &str, sig: libc::c_int) -> Result<(), Error> {
        let p = &self.pods[self.find(name)?];
        for c in [&p.workload, &p.sidecar].into_iter().flatten() {
            if let Some(pid) = c.id() {
                // SAFETY: kill(2) on a child this backend owns and has not reaped.
                unsafe { libc::kill(pid as libc::pid_t, sig) };
            }
        }
        Ok(())
    }

    /// Kills a pod and removes its endpoint, as Kubernetes would.
    async fn kill_pod(&mut self, name: &str) -> Result<(), Error> {
        let i = self.find(name)?;
        let p = &mut self.pods[i];
        for mut c in [p.workload.take(), p.sidecar.take()].into_iter().flatten() {
            let _ = c.kill().await;
        }
        self.pilot_api.deregister(&self.pods[i].plan).await
    }

    async fn restart_pod(&mut self, name: &str) -> Result<(), Error> {
        let i = self.find(name)?;
        if self.pods[i].running() {
            self.kill_pod(name).await?;
        }
        self.start_pod(i).await?;
        let p = &self.pods[i];
        let app: SocketAddr = format!("{}:{}", p.app_ip, p.plan.port)
            .parse()
            .expect("valid address");
        wait_tcp(app, Duration::from_secs(10))
            .await
            .map_err(|_| Error::Environment(format!("restarted pod {name} did not listen")))?;
        self.pilot_api
            .register([(&p.plan, p.pod_ip.as_str())])
            .await
    }

    /// CPU and peak RSS of pilot and every sidecar now, from /proc.
    pub fn resources(&self) -> Resources {
        let cost = |name: &str, pid: Option<u32>| {
            let s = pid.and_then(proc_stats).unwrap_or_default();
            ProcessCost {
                name: name.to_string(),
                cpu_s: s.cpu_s,
                peak_rss_mb: s.peak_rss_mb,
            }
        };
        Resources {
            pilot: cost("pilot", self.pilot.as_ref().and_then(|c| c.id())),
            proxies: self
                .pods
                .iter()
                .chain(std::iter::once(&self.client))
                .map(|p| cost(&p.plan.name, p.sidecar_pid()))
                .collect(),
        }
    }
}

impl Drop for LocalBackend {
    /// Kills every child and reaps it, so no process (not even a zombie) outlives the run.
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.pilot.take().into_iter().collect();
        for p in self
            .pods
            .iter_mut()
            .chain(std::iter::once(&mut self.client))
        {
            children.extend(p.workload.take());
            children.extend(p.sidecar.take());
        }
        for c in &mut children {
            let _ = c.start_kill();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !children.is_empty() && std::time::Instant::now() < deadline {
            children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
