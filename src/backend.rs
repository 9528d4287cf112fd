//! Where a scenario's mesh runs. A [`Backend`] knows how to start, stop, freeze and cut off
//! pilot and pods on its substrate: `local` (child processes on loopback addresses, the
//! default) or `docker` (a kind-style cluster of containers). [`Mesh`] is the one driver on
//! top: it plans pods from the manifests, starts pilot and gives it the config, starts the
//! pods, registers them as endpoints, waits until each answers through its sidecar, and turns
//! the scenario's faults into backend calls plus what Kubernetes would do (deregister a killed
//! pod, replay config into a restarted pilot). A new backend is one file implementing the
//! trait; a new pod kind is a [`PodPlan`] the driver starts like any other.

pub mod docker;
pub(crate) mod lifecycle;
pub mod local;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config;
use crate::model::{Labels, Spec, Workload, WorkloadEntrySpec};
use crate::pilot_client::{HttpClient, PilotApi};
use crate::report::{LifecycleEvent, Resources};
use crate::scenario::{FaultStep, ProxyKind, WorkloadPatch};
use crate::workload::Behaviour;
use crate::xds::bootstrap::EnvoyBootstrap;
use crate::xds::node::{router_id, sidecar_id};
use crate::xds::XdsMode;

pub use crate::pilot_client::Error;

/// What a backend needs to start a mesh.
#[derive(Clone, Debug)]
pub struct Options {
    pub proxy: ProxyKind,
    pub debounce: Duration,
    pub meshbench_exe: PathBuf,
    pub envoy: Option<PathBuf>,
    /// Where processes write their logs.
    pub log_dir: PathBuf,
    /// Marks every process (environment) or container (label) of the run.
    pub run_id: String,
    /// The sidecars' ADS method.
    pub xds: XdsMode,
    /// Leave what the run created in place (docker: for debugging; `meshbench down` removes it).
    pub keep: bool,
    /// Namespaces whose pods get a network of their own (docker only).
    pub tenants: Vec<String>,
    /// Istio's traffic capture (docker only): service VIPs, iptables in each pod, apps
    /// calling by name, sidecars as uid 1337 with the captured layout.
    pub capture: bool,
    /// Sidecars run under `meshbench agent` (pilot-agent's role), which runs the proxy.
    pub agent: bool,
}

impl Options {
    /// The Envoy binary, when the sidecars are Envoy.
    pub fn envoy_binary(&self) -> Result<&Path, Error> {
        self.envoy.as_deref().ok_or_else(|| {
            Error::Environment("Envoy not found: set MESHBENCH_ENVOY or put envoy on PATH".into())
        })
    }
}

/// One pod as a Deployment asks for it.
#[derive(Clone, Debug)]
pub struct PodPlan {
    pub name: String,
    /// The Deployment it belongs to.
    pub deployment: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub labels: Labels,
    /// The app's container port (0 for the load client, which has no app); a gateway's
    /// listener port.
    pub port: u16,
    /// A gateway pod (labelled `istio: ...`, as Istio's ingress gateway): a router proxy and
    /// no app.
    pub gateway: bool,
    /// What its app does per request (the harness changes it with `workload` steps).
    pub behaviour: Behaviour,
    /// Its Deployment's service account (its mTLS identity; `default` when none).
    pub service_account: Option<String>,
}

impl PodPlan {
    /// The load client: a sidecar with no app, where loads and probes enter the mesh.
    pub fn load_client() -> PodPlan {
        PodPlan {
            name: "loadclient-0".into(),
            deployment: "loadclient".into(),
            namespace: "default".into(),
            service: "loadclient".into(),
            version: "v1".into(),
            labels: [("app".to_string(), "loadclient".to_string())].into(),
            port: 0,
            gateway: false,
            behaviour: Behaviour::default(),
            service_account: None,
        }
    }

    /// The load client (where loads and probes enter through a sidecar).
    pub fn is_load_client(&self) -> bool {
        self.deployment == "loadclient"
    }

    /// Whether the pod runs an app beside its proxy.
    pub fn has_app(&self) -> bool {
        self.port != 0 && !self.gateway
    }

    /// Whether a scenario's workload key names this pod: its Deployment, its service (every
    /// version) or the pod itself.
    pub fn named_by(&self, key: &str) -> bool {
        self.deployment == key || self.service == key || self.name == key
    }
}

/// A pod's addresses: the pod IP (sidecar listeners, admin) and where its app listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodAddr {
    pub pod_ip: String,
    pub app_ip: String,
}

/// One pod of the mesh, as the driver tracks it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub plan: PodPlan,
    pub addr: PodAddr,
    pub node_id: String,
    /// Its sidecar runs.
    pub running: bool,
    /// The bearer token of its app's control listener (one per run).
    pub control_token: String,
    /// With mutual TLS on: the certificate its sidecar presents to pilot's mTLS xDS port
    /// (the "first certificate the harness provisions", as Kubernetes would mount a token).
    pub xds_tls: Option<crate::security::Material>,
    /// Its traffic is captured (iptables): its app calls services by name, its sidecar gets
    /// the captured layout. Gateways are never captured, as in Istio.
    pub capture: bool,
    /// Host names to resolve to service VIPs (`name`, `name.ns`, ... -> VIP), with capture.
    pub hosts: Vec<(String, String)>,
}

impl Pod {
    pub fn new(plan: PodPlan, addr: PodAddr, control_token: &str) -> Pod {
        Pod {
            node_id: if plan.gateway {
                router_id(&addr.pod_ip, &plan.name, &plan.namespace)
            } else {
                sidecar_id(&addr.pod_ip, &plan.name, &plan.namespace)
            },
            plan,
            addr,
            running: false,
            control_token: control_token.into(),
            xds_tls: None,
            capture: false,
            hosts: vec![],
        }
    }

    /// Where its sidecar reaches pilot: the mTLS port when it has a certificate.
    pub fn xds_addr(&self, plain: SocketAddr) -> SocketAddr {
        match self.xds_tls {
            Some(_) => SocketAddr::new(plain.ip(), XDS_TLS_PORT),
            None => plain,
        }
    }

    /// The environment that hands its meshbench sidecar the xDS certificate (PEM).
    pub fn xds_tls_env(&self) -> Vec<(String, String)> {
        let Some(m) = &self.xds_tls else {
            return vec![];
        };
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        vec![
            (XDS_CERT_ENV.to_string(), text(&m.chain_pem)),
            (XDS_KEY_ENV.to_string(), text(&m.key_pem)),
            (XDS_CA_ENV.to_string(), text(&m.roots_pem)),
        ]
    }

    /// Its app's control listener (POD_IP:15098).
    pub fn control(&self) -> SocketAddr {
        sock(&self.addr.pod_ip, crate::workload::CONTROL_PORT)
    }

    /// The endpoint Kubernetes would register: POD_IP with the pod's labels.
    pub fn endpoint(&self) -> Workload {
        Workload {
            name: self.plan.name.clone(),
            namespace: self.plan.namespace.clone(),
            entry: WorkloadEntrySpec {
                address: self.addr.pod_ip.clone(),
                labels: self.plan.labels.clone(),
                ports: Default::default(),
                weight: 1,
                healthy: true,
                service_account: self.plan.service_account.clone(),
            },
        }
    }

    /// Its sidecar's admin port (POD_IP:15000).
    pub fn admin(&self) -> SocketAddr {
        sock(&self.addr.pod_ip, crate::proxy::DEFAULT_ADMIN_PORT)
    }
}

fn sock(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}")
        .parse()
        .expect("backends give IP addresses")
}

/// What differs between substrates. Pods are named by [`PodPlan::name`]; the backend keeps
/// its own handles (processes, containers) under that name.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The engine behind it ("Docker 20.10.24 (API 1.41)"), if any.
    fn engine(&self) -> Option<String> {
        None
    }
    /// The most pods it runs.
    fn pod_limit(&self) -> usize;
    /// Addresses of the k-th planned pod, and of the load client.
    fn pod_addr(&self, k: usize, plan: &PodPlan) -> PodAddr;
    /// Pods' traffic is captured (`Options::capture`).
    fn capture(&self) -> bool {
        false
    }
    /// Sidecars run under `meshbench agent` (`Options::agent`).
    fn agent(&self) -> bool;
    /// The virtual IP of the run's `k`th service (capture mode), if this backend has them.
    fn service_ip(&self, _k: usize) -> Option<String> {
        None
    }
    fn client_addr(&self) -> PodAddr;
    /// Pilot's ADS and REST addresses, as the harness reaches them.
    fn pilot_xds(&self) -> SocketAddr;
    fn pilot_api(&self) -> SocketAddr;
    /// The token pilot's REST writes need (the same across pilot restarts).
    fn api_token(&self) -> String;
    /// Starts pilot and returns once its REST port answers.
    async fn start_pilot(&mut self) -> Result<(), Error>;
    async fn stop_pilot(&mut self);
    /// Pilot's process id as this host sees it (for CPU and memory).
    fn pilot_pid(&self) -> Option<u32>;
    /// Starts a pod: its app (unless the plan has no port) and its sidecar.
    async fn start_pod(&mut self, pod: &Pod) -> Result<(), Error>;
    /// Stops a pod's processes or containers.
    async fn stop_pod(&mut self, pod: &Pod);
    /// The sidecar's first process as this host sees it: its agent, or the proxy itself
    /// when there is no agent.
    async fn sidecar_pid(&self, pod: &Pod) -> Option<u32>;
    /// Freezes (`true`) or thaws a pod.
    async fn pause_pod(&mut self, pod: &Pod, pause: bool) -> Result<(), Error>;
    /// Cuts a pod off the network (`true`) or connects it again on its address.
    async fn partition(&mut self, pod: &Pod, cut: bool) -> Result<(), Error> {
        let _ = (pod, cut);
        Err(Error::Config(
            "network partitions need the docker backend (--backend docker)".into(),
        ))
    }
    /// CPU seconds and peak memory of pilot and of these pods' sidecars.
    async fn resources(&self, pods: &[&Pod]) -> Resources;
    /// Whether a TCP connection from inside pod `from` to `to` succeeds within a second.
    async fn reach(&self, from: &Pod, to: SocketAddr) -> Result<bool, Error> {
        let _ = (from, to);
        Err(Error::Config(
            "network reachability probes need the docker backend (--backend docker)".into(),
        ))
    }
}

/// How long a pod may take to answer through its sidecar after it starts.
pub const READY_LIMIT: Duration = Duration::from_secs(30);

/// The mesh a run drives, on whichever backend.
pub struct Mesh {
    backend: Box<dyn Backend>,
    pilot: PilotApi,
    pub pods: Vec<Pod>,
    pub client: Pod,
    log_dir: PathBuf,
    /// The readiness prober's certificate (identity `istio-system/meshbench-prober`), for
    /// sidecars that refuse plaintext (STRICT mTLS).
    prober: Option<crate::security::Material>,
    /// Sidecars run under their agent.
    agent: bool,
}

/// Pilot's mTLS xDS port in both backends (istiod's).
pub const XDS_TLS_PORT: u16 = 15012;
/// `meshbench proxy` reads its xDS certificate, key and root (PEM) from these when no
/// `--xds-cert` file is given.
pub const XDS_CERT_ENV: &str = "MESHBENCH_XDS_CERT";
pub const XDS_KEY_ENV: &str = "MESHBENCH_XDS_KEY";
pub const XDS_CA_ENV: &str = "MESHBENCH_XDS_CA";

/// The readiness prober's service account (in the root namespace).
pub const PROBER_SERVICE_ACCOUNT: &str = "meshbench-prober";

impl Mesh {
    /// Plans the pods, starts pilot, applies manifests then config, starts every pod and the
    /// load client, registers the pods and waits until each answers through its sidecar.
    /// `workloads` changes the apps' default behaviour (keys: Deployment, service or pod).
    pub async fn start(
        backend: Box<dyn Backend>,
        log_dir: PathBuf,
        manifests: &[String],
        config: &[String],
        workloads: &BTreeMap<String, WorkloadPatch>,
        mtls: crate::scenario::MtlsSetting,
    ) -> Result<Mesh, Error> {
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| Error::Environment(format!("cannot create {}: {e}", log_dir.display())))?;
        let mut plans = plan_pods(manifests, backend.pod_limit())?;
        for (key, patch) in workloads {
            let mut named = plans.iter_mut().filter(|p| p.named_by(key)).peekable();
            if named.peek().is_none() {
                return Err(Error::Config(format!(
                    "topology.workloads: {key:?} names no Deployment, service or pod of the manifests"
                )));
            }
            named.for_each(|p| patch.apply(&mut p.behaviour));
        }
        let token = format!("{:032x}", rand::random::<u128>());
        let mut m = Mesh {
            pilot: PilotApi::new(backend.pilot_api()).with_token(Some(&backend.api_token())),
            pods: plans
                .into_iter()
                .enumerate()
                .map(|(k, plan)| {
                    let addr = backend.pod_addr(k, &plan);
                    Pod::new(plan, addr, &token)
                })
                .collect(),
            client: Pod::new(PodPlan::load_client(), backend.client_addr(), &token),
            agent: backend.agent(),
            backend,
            log_dir,
            prober: None,
        };
        let capture = m.backend.capture();
        let mut manifest_texts: Vec<(String, String)> = Vec::new();
        if capture {
            // The harness plays Kubernetes' part: each Service gets a virtual IP of the run's
            // own range, and every captured pod resolves the service's names to it.
            let services = services_of(manifests)?;
            let mut ips = BTreeMap::new();
            let mut hosts = Vec::new();
            for (k, (ns, name)) in services.iter().enumerate() {
                let ip = m.backend.service_ip(k).ok_or_else(|| {
                    Error::Config(format!("mesh.capture: no virtual IP for service {ns}/{name} (this backend gives {k})"))
                })?;
                for h in [
                    name.clone(),
                    format!("{name}.{ns}"),
                    format!("{name}.{ns}.svc"),
                    format!("{name}.{ns}.svc.cluster.local"),
                ] {
                    hosts.push((h, ip.clone()));
                }
                ips.insert((ns.clone(), name.clone()), ip);
            }
            for p in m.pods.iter_mut().chain(std::iter::once(&mut m.client)) {
                p.capture = !p.plan.gateway;
                p.hosts = hosts.clone();
            }
            for f in manifests {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| Error::Config(format!("cannot read {f}: {e}")))?;
                let with = config::with_cluster_ips(f, &text, &ips)
                    .map_err(|e| Error::Config(format!("{}", e[0])))?;
                manifest_texts.push((f.clone(), with));
            }
        }
        m.backend.start_pilot().await?;
        m.prober = Some(m.prober_certificate().await?);
        if mtls != crate::scenario::MtlsSetting::Off {
            // Each sidecar proves its identity to pilot with a certificate of its pod's
            // service account, issued before it starts.
            for p in m.pods.iter_mut().chain(std::iter::once(&mut m.client)) {
                let sa = p.plan.service_account.as_deref().unwrap_or("default");
                let c = m.pilot.certificate(&p.plan.namespace, sa).await?;
                p.xds_tls = Some(crate::security::Material {
                    chain_pem: c.chain_pem.into_bytes(),
                    key_pem: c.key_pem.into_bytes(),
                    roots_pem: c.root_pem.into_bytes(),
                });
            }
        }
        if capture {
            for (f, text) in &manifest_texts {
                m.pilot.apply(f, text).await?;
            }
        } else {
            m.pilot.apply_files(manifests).await?;
        }
        m.pilot
            .apply("mesh.mtls", &mtls.peer_authentication())
            .await?;
        m.pilot.apply_files(config).await?;
        for i in 0..m.pods.len() {
            m.backend.start_pod(&m.pods[i]).await?;
            m.pods[i].running = true;
        }
        m.backend.start_pod(&m.client).await?;
        m.client.running = true;
        m.pilot
            .register(m.pods.iter().map(Pod::endpoint).collect())
            .await?;
        for p in &m.pods {
            wait_ready(p, &m.log_dir, m.prober.as_ref()).await?;
        }
        Ok(m)
    }

    pub fn name(&self) -> &'static str {
        self.backend.name()
    }
    pub fn engine(&self) -> Option<String> {
        self.backend.engine()
    }
    pub fn pilot(&self) -> &PilotApi {
        &self.pilot
    }
    pub fn pilot_mut(&mut self) -> &mut PilotApi {
        &mut self.pilot
    }
    pub fn pilot_xds(&self) -> SocketAddr {
        self.backend.pilot_xds()
    }
    pub fn pilot_pid(&self) -> Option<u32> {
        self.backend.pilot_pid()
    }
    /// The load client's sidecar outbound listener: where loads and probes are sent. With
    /// capture there is none to send to (apps call by name; the kernel redirects them).
    pub fn client_outbound(&self) -> Result<SocketAddr, Error> {
        if self.client.capture {
            return Err(Error::Config(
                "via: sidecar sends to the load client's sidecar as an app would in explicit mode; with mesh.capture: iptables use via: gateway or via: direct".into(),
            ));
        }
        Ok(sock(&self.client.addr.pod_ip, crate::xds::OUTBOUND_PORT))
    }

    /// The first gateway pod's listener (where `via: gateway` loads enter the mesh).
    pub fn gateway(&self) -> Result<SocketAddr, Error> {
        self.pods
            .iter()
            .find(|p| p.plan.gateway)
            .map(|p| sock(&p.addr.pod_ip, p.plan.port))
            .ok_or_else(|| {
                Error::Config(
                    "via: gateway needs a gateway pod (a Deployment labelled istio: ingressgateway, e.g. fixtures/gateway/istio-ingressgateway.yaml in topology.manifests)".into(),
                )
            })
    }

    /// A pod of the service `target` names (`service:port`), at its sidecar's inbound
    /// listener (the pod IP and the app's port): where `via: direct` sends plaintext.
    pub fn direct(&self, target: &str) -> Result<SocketAddr, Error> {
        let service = target.split(':').next().unwrap_or(target);
        let service = service.split('.').next().unwrap_or(service);
        self.pods
            .iter()
            .find(|p| !p.plan.gateway && p.plan.service == service && p.running)
            .map(|p| sock(&p.addr.pod_ip, p.plan.port))
            .ok_or_else(|| {
                Error::Config(format!(
                    "via: direct: no running pod of service {service:?} (target {target:?})"
                ))
            })
    }

    fn running(&self) -> impl Iterator<Item = &Pod> {
        self.pods
            .iter()
            .chain(std::iter::once(&self.client))
            .filter(|p| p.running)
    }
    /// Admin addresses of every running sidecar.
    pub fn sidecar_admins(&self) -> Vec<SocketAddr> {
        self.running().map(Pod::admin).collect()
    }
    /// Node ids of every running sidecar.
    pub fn node_ids(&self) -> Vec<String> {
        self.running().map(|p| p.node_id.clone()).collect()
    }

    fn find(&self, name: &str) -> Result<usize, Error> {
        find_pod(self.pods.iter().map(|p| p.plan.name.as_str()), name)
    }

    /// Whether pod `from` can open a TCP connection to pod `to` (its listener: the app's
    /// inbound port, or the admin port of a pod without one).
    pub async fn reach(&self, from: &str, to: &str) -> Result<(bool, SocketAddr), Error> {
        let (f, t) = (&self.pods[self.find(from)?], &self.pods[self.find(to)?]);
        let port = if t.plan.port == 0 {
            crate::proxy::DEFAULT_ADMIN_PORT
        } else {
            t.plan.port
        };
        let addr = sock(&t.addr.pod_ip, port);
        Ok((self.backend.reach(f, addr).await?, addr))
    }

    async fn prober_certificate(&self) -> Result<crate::security::Material, Error> {
        let c = self
            .pilot
            .certificate(crate::model::ROOT_NAMESPACE, PROBER_SERVICE_ACCOUNT)
            .await?;
        Ok(crate::security::Material {
            chain_pem: c.chain_pem.into_bytes(),
            key_pem: c.key_pem.into_bytes(),
            roots_pem: c.root_pem.into_bytes(),
        })
    }

    /// One fault step: the backend acts, the driver does what Kubernetes would. Sidecar
    /// lifecycle faults say what they took.
    pub async fn fault(&mut self, f: &FaultStep) -> Result<Option<LifecycleEvent>, Error> {
        let event = |fault: &str, target: &str, ms: f64| LifecycleEvent {
            fault: fault.into(),
            target: target.into(),
            ms,
            ..Default::default()
        };
        let done = match f {
            FaultStep::KillSidecar(name) => {
                let i = self.find_running(name)?;
                let ms = self.kill_sidecar(i).await?;
                return Ok(Some(event("kill_sidecar", &self.pods[i].plan.name, ms)));
            }
            FaultStep::HotRestart(name) => {
                let i = self.find_running(name)?;
                let ms = self.hot_restart(i).await?;
                return Ok(Some(event("hot_restart", &self.pods[i].plan.name, ms)));
            }
            FaultStep::RollingRestart(deployment) => {
                return self.rolling_restart(deployment).await.map(Some)
            }
            FaultStep::Kill(name) => {
                let i = self.find(name)?;
                self.kill_pod(i).await
            }
            FaultStep::Restart(name) => {
                let i = self.find(name)?;
                if self.pods[i].running {
                    self.kill_pod(i).await?;
                }
                self.backend.start_pod(&self.pods[i]).await?;
                self.pods[i].running = true;
                self.register_when_ready(i).await.map(|_| ())
            }
            // A frozen or cut-off pod keeps its endpoint, as until a health check noticed.
            FaultStep::Pause(name) | FaultStep::Unpause(name) => {
                let i = self.find(name)?;
                let pause = matches!(f, FaultStep::Pause(_));
                self.backend.pause_pod(&self.pods[i], pause).await
            }
            FaultStep::Disconnect(name) | FaultStep::Reconnect(name) => {
                let i = self.find(name)?;
                let cut = matches!(f, FaultStep::Disconnect(_));
                self.backend.partition(&self.pods[i], cut).await
            }
            FaultStep::ControlPlane(a) if a == "stop" => {
                self.backend.stop_pilot().await;
                Ok(())
            }
            FaultStep::ControlPlane(_) => {
                self.backend.start_pilot().await?;
                // A new pilot has a new CA (the root is not kept across restarts).
                self.prober = Some(self.prober_certificate().await?);
                self.pilot.replay().await?;
                let running: Vec<Workload> = self
                    .pods
                    .iter()
                    .filter(|p| p.running)
                    .map(Pod::endpoint)
                    .collect();
                self.pilot.register(running).await.map(|_| ())
            }
        };
        done.map(|()| None)
    }

    /// A `workload` step: each named running pod's app takes its behaviour with the patch
    /// applied (a restarted pod starts with it too).
    pub async fn set_behaviour(
        &mut self,
        patches: &BTreeMap<String, WorkloadPatch>,
    ) -> Result<(), Error> {
        for (key, patch) in patches {
            let named: Vec<usize> = (0..self.pods.len())
                .filter(|&i| self.pods[i].plan.named_by(key))
                .collect();
            if named.is_empty() {
                return Err(Error::Config(format!(
                    "workload: {key:?} names no Deployment, service or pod"
                )));
            }
            for i in named {
                patch.apply(&mut self.pods[i].plan.behaviour);
                let p = &self.pods[i];
                if !p.running {
                    continue;
                }
                let body = serde_json::to_string(&p.plan.behaviour)
                    .map_err(|e| Error::Environment(e.to_string()))?;
                let auth = format!("Bearer {}", p.control_token);
                let r = HttpClient {
                    timeout: Duration::from_secs(5),
                }
                .request(
                    p.control(),
                    "PUT",
                    "/behaviour",
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    &body,
                )
                .await?;
                if r.status != 200 {
                    return Err(Error::Environment(format!(
                        "pod {}: the app refused its new behaviour ({}): {}",
                        p.plan.name,
                        r.status,
                        String::from_utf8_lossy(&r.body).trim()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Stops a pod and removes its endpoint, as Kubernetes would.
    async fn kill_pod(&mut self, i: usize) -> Result<(), Error> {
        self.backend.stop_pod(&self.pods[i]).await;
        self.pods[i].running = false;
        let p = &self.pods[i].plan;
        self.pilot
            .deregister(&p.namespace, &p.name)
            .await
            .map(|_| ())
    }

    /// CPU seconds and peak memory of pilot and every sidecar so far.
    pub async fn resources(&self) -> Resources {
        let pods: Vec<&Pod> = self
            .pods
            .iter()
            .chain(std::iter::once(&self.client))
            .collect();
        self.backend.resources(&pods).await
    }
}

/// Waits until the pod's app answers through its sidecar's inbound listener (the response
/// carries the workload's identity header): the sidecar holds its config and the app listens.
async fn wait_ready(
    p: &Pod,
    log_dir: &Path,
    prober: Option<&crate::security::Material>,
) -> Result<(), Error> {
    let start = Instant::now();
    while !serves(p, prober).await {
        if start.elapsed() > READY_LIMIT {
            return Err(Error::Environment(format!(
                "pod {} did not answer on {}:{} through its sidecar within {READY_LIMIT:?}; see its logs in {}",
                p.plan.name,
                p.addr.pod_ip,
                p.plan.port,
                log_dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether the pod's app answers one request through its sidecar's inbound listener.
async fn serves(p: &Pod, prober: Option<&crate::security::Material>) -> bool {
    let addr = sock(&p.addr.pod_ip, p.plan.port);
    let http = HttpClient {
        timeout: Duration::from_secs(2),
    };
    // Plaintext first; a sidecar under STRICT mTLS closes that, so then mutual TLS with the
    // prober's certificate (as any caller of the mesh would).
    let answer = match http.request(addr, "GET", "/healthz", &[], "").await {
        Ok(r) => Some(r.headers),
        Err(_) => match prober {
            Some(m) => tls_healthz(addr, m).await,
            None => None,
        },
    };
    // A gateway is ready when its listener answers at all (404 with nothing bound).
    answer.is_some_and(|h| p.plan.gateway || h.contains_key(crate::workload::IDENTITY_HEADER))
}

/// `GET /healthz` over mutual TLS; the answer's headers.
async fn tls_healthz(addr: SocketAddr, m: &crate::security::Material) -> Option<http::HeaderMap> {
    let attempt = async {
        let cfg = crate::security::client_config(
            m,
            vec![],
            crate::security::ISTIO_ALPN
                .iter()
                .map(|a| a.to_vec())
                .collect(),
        )
        .ok()?;
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).ok()?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/healthz")
            .header(http::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.headers().clone())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// Pods from the manifests' Deployments x replicas, in file order.
pub fn plan_pods(manifests: &[String], limit: usize) -> Result<Vec<PodPlan>, Error> {
    let mut pods = Vec::new();
    let mut objects = Vec::new();
    for f in manifests {
        let parsed =
            config::parse_file(Path::new(f)).map_err(|e| Error::Config(format!("{}", e[0])))?;
        objects.extend(parsed.objects);
    }
    // A gateway listens where its Service sends port 80 (else its first port), as istiod
    // binds a gateway's listener on the Service's target port.
    let gateway_port = |ns: &str, labels: &Labels| -> Option<u16> {
        let ports: Vec<&crate::model::ServicePort> = objects
            .iter()
            .filter(|o| o.namespace == ns)
            .filter_map(|o| match &o.spec {
                Spec::Service(s)
                    if !s.selector.is_empty()
                        && crate::model::labels_match(&s.selector, labels) =>
                {
                    Some(s.ports.iter())
                }
                _ => None,
            })
            .flatten()
            .collect();
        ports
            .iter()
            .find(|p| p.port == 80)
            .or(ports.first())
            .and_then(|p| p.target_port.number())
    };
    for o in &objects {
        let Spec::Deployment(d) = &o.spec else {
            continue;
        };
        let service = d
            .labels
            .get("app")
            .cloned()
            .unwrap_or_else(|| o.name.clone());
        let version = d
            .labels
            .get("version")
            .cloned()
            .unwrap_or_else(|| "v1".into());
        let gateway = d.labels.contains_key("istio");
        // As Istio's injector labels a pod with a sidecar (auto mTLS reads it); gateways
        // carry no such label.
        let mut labels = d.labels.clone();
        if !gateway {
            labels.insert(
                crate::model::TLS_MODE_LABEL.to_string(),
                "istio".to_string(),
            );
        }
        for i in 0..d.replicas {
            pods.push(PodPlan {
                name: format!("{}-{i}", o.name),
                deployment: o.name.clone(),
                namespace: o.namespace.clone(),
                behaviour: Behaviour::bookinfo(&service, &version),
                service: service.clone(),
                version: version.clone(),
                labels: labels.clone(),
                service_account: d.service_account.clone(),
                port: if gateway {
                    gateway_port(&o.namespace, &d.labels)
                } else {
                    None
                }
                .or(d.container_ports.first().map(|p| p.1))
                .unwrap_or(9080),
                gateway,
            });
            if pods.len() > limit {
                return Err(Error::Config(format!(
                    "this backend runs at most {limit} pods"
                )));
            }
        }
    }
    Ok(pods)
}

/// The Services of the manifests that select pods (namespace, name), in file order.
pub fn services_of(manifests: &[String]) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    for f in manifests {
        let parsed =
            config::parse_file(Path::new(f)).map_err(|e| Error::Config(format!("{}", e[0])))?;
        for o in parsed.objects {
            if matches!(&o.spec, Spec::Service(s) if !s.selector.is_empty()) {
                out.push((o.namespace.clone(), o.name.clone()));
            }
        }
    }
    Ok(out)
}

/// Finds a pod by name, or by a Deployment's name for its first pod.
pub fn find_pod<'a>(
    names: impl Iterator<Item = &'a str> + Clone,
    name: &str,
) -> Result<usize, Error> {
    names
        .clone()
        .position(|p| p == name)
        .or_else(|| {
            names
                .clone()
                .position(|p| p.strip_suffix("-0") == Some(name))
        })
        .ok_or_else(|| {
            Error::Config(format!(
                "no pod {name:?} (pods: {})",
                names.collect::<Vec<_>>().join(", ")
            ))
        })
}

/// Arguments of `meshbench workload` for a pod whose app listens on `addr` (its control
/// token goes in the environment: [`workload_env`]).
pub(crate) fn workload_args(p: &Pod, addr: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "workload",
        "--service",
        &p.plan.service,
        "--version",
        &p.plan.version,
        "--pod",
        &p.plan.name,
        "--addr",
        addr,
        "--control",
        &p.control().to_string(),
    ]
    .map(String::from)
    .to_vec();
    if p.capture {
        a.push("--direct".into());
    } else {
        a.extend([
            "--sidecar".into(),
            format!("{}:{}", p.addr.pod_ip, crate::xds::OUTBOUND_PORT),
        ]);
    }
    a.extend(p.plan.behaviour.to_args());
    a
}

/// The environment of a pod's app.
pub(crate) fn workload_env(p: &Pod) -> Vec<(String, String)> {
    vec![(
        crate::workload::CONTROL_TOKEN_ENV.to_string(),
        p.control_token.clone(),
    )]
}

/// Arguments of `meshbench proxy` as a pod's sidecar.
pub(crate) fn sidecar_args(p: &Pod, xds: &str, mode: XdsMode) -> Vec<String> {
    let mut a: Vec<String> = [
        "proxy",
        "--xds",
        xds,
        "--node-id",
        &p.node_id,
        "--concurrency",
        "1",
        "--app-ip",
        &p.addr.app_ip,
        "--xds-mode",
        &mode.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for (k, v) in &p.plan.labels {
        a.extend(["--label".to_string(), format!("{k}={v}")]);
    }
    if p.capture {
        a.push("--capture".into());
    }
    a
}

/// How long the harness's agents drain a sidecar on SIGTERM (Istio's default is 5 s; a
/// bookinfo request takes milliseconds).
pub const AGENT_DRAIN: Duration = Duration::from_secs(1);

/// Arguments of `meshbench agent` as a pod's sidecar entry point: `envoy` is Envoy's binary
/// when the proxy is Envoy (else meshbench proxy), `dir` where it writes bootstraps.
pub(crate) fn agent_args(
    p: &Pod,
    xds: &str,
    mode: XdsMode,
    envoy: Option<&Path>,
    dir: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = ["agent", "--proxy"].map(String::from).to_vec();
    match envoy {
        Some(bin) => a.extend(["envoy".into(), "--envoy".into(), bin.display().to_string()]),
        None => a.push("meshbench".into()),
    }
    a.extend(
        [
            "--xds",
            xds,
            "--pod-ip",
            &p.addr.pod_ip,
            "--pod",
            &p.plan.name,
            "--namespace",
            &p.plan.namespace,
            "--service",
            &p.plan.service,
            "--app-ip",
            &p.addr.app_ip,
            "--xds-mode",
            &mode.to_string(),
            "--concurrency",
            "1",
            "--drain",
            &format!("{}ms", AGENT_DRAIN.as_millis()),
            "--dir",
            &dir.display().to_string(),
        ]
        .map(String::from),
    );
    for (k, v) in &p.plan.labels {
        a.extend(["--label".to_string(), format!("{k}={v}")]);
    }
    if p.capture {
        a.push("--capture".into());
    }
    if p.plan.gateway {
        a.push("--router".into());
    }
    a
}

/// Envoy's command-line flags after its config, on both backends.
pub(crate) const ENVOY_ARGS: [&str; 5] = [
    "--concurrency",
    "1",
    "--use-dynamic-base-id",
    "--log-level",
    "warn",
];

pub(crate) fn envoy_bootstrap(p: &Pod, xds: SocketAddr, mode: XdsMode) -> EnvoyBootstrap {
    EnvoyBootstrap {
        pod_ip: p.addr.pod_ip.clone(),
        pod_name: p.plan.name.clone(),
        namespace: p.plan.namespace.clone(),
        service: p.plan.service.clone(),
        labels: p.plan.labels.clone(),
        app_ip: p.addr.app_ip.clone(),
        admin: p.admin(),
        xds,
        xds_mode: mode,
        router: p.plan.gateway,
        capture: p.capture,
    }
}
