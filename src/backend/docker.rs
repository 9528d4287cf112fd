//! The docker backend: the scenario's mesh as a kind-style cluster of containers, through
//! the engine's API (bollard; honours DOCKER_HOST, negotiates the API version).
//!
//! One user-defined bridge network per run, on a /24 of 10.213.0.0/16 picked from the process
//! id (the next one when taken), so every address is fixed for the run and a restarted or
//! reconnected pod keeps it: pilot .2 (15010 ADS, 15080 REST), the load client .8, pod k .(10+k).
//! A pod is an infra container (`meshbench pause`) that owns the network namespace and carries
//! the service's DNS aliases, plus the workload and sidecar containers joined to it with
//! `network_mode: container:<infra>` (Kubernetes pod semantics): the app listens on 127.0.0.1,
//! the sidecar on the pod address. Everything carries the label `meshbench.run=<run id>`; the
//! backend removes it all when dropped (normal end, error, Ctrl-C) unless `--keep`, and
//! `meshbench down` removes what a killed run left.

mod image;

use image::engine_error;
pub use image::IMAGE_LABEL;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig,
    NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest, NetworkingConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StatsOptionsBuilder,
};
use bollard::Docker;
use futures::StreamExt;

use super::{
    agent_args, envoy_bootstrap, sidecar_args, workload_args, workload_env, Backend, Error,
    Options, Pod, PodAddr, ENVOY_ARGS,
};
use crate::launch::{wait_tcp, PilotArgs, PILOT_START_LIMIT, RUN_ENV};
use crate::report::{ProcessCost, Resources};
use crate::scenario::ProxyKind;

/// Where a sidecar's agent writes its bootstraps in the container (Istio's own directory).
const AGENT_DIR: &str = "/etc/istio/proxy";

/// Label on every container and network of a run; its value is the run id.
pub const RUN_LABEL: &str = "meshbench.run";
const POD_LIMIT: usize = 200;

/// Connects to the engine (DOCKER_HOST or the local socket) at a version both speak; returns
/// the client and a description of the engine.
pub async fn connect() -> Result<(Docker, String), Error> {
    let unreachable = |e: bollard::errors::Error| {
        Error::Environment(format!(
            "no Docker engine answers at {} ({e}); start one or use --backend local",
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into())
        ))
    };
    let docker = Docker::connect_with_defaults().map_err(unreachable)?;
    let docker = docker.negotiate_version().await.map_err(unreachable)?;
    let v = docker.version().await.map_err(unreachable)?;
    let engine = format!(
        "Docker {} (API {})",
        v.version.unwrap_or_default(),
        v.api_version.unwrap_or_default()
    );
    Ok((docker, engine))
}

/// Removes the containers and networks of one run (`Some(id)`) or of every run (`None`);
/// returns how many of each went.
pub async fn down(docker: &Docker, run: Option<&str>) -> Result<(usize, usize), Error> {
    let label = match run {
        Some(id) => format!("{RUN_LABEL}={id}"),
        None => RUN_LABEL.to_string(),
    };
    let filters = HashMap::from([("label".to_string(), vec![label])]);
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(|e| engine_error("listing containers", e))?;
    let removals = containers.iter().filter_map(|c| c.id.as_deref()).map(|id| {
        docker.remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
    });
    let removed = futures::future::join_all(removals)
        .await
        .into_iter()
        .filter(|r| r.is_ok())
        .count();
    let networks = docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build(),
        ))
        .await
        .map_err(|e| engine_error("listing networks", e))?;
    let mut nets = 0;
    for n in networks {
        if let Some(id) = n.id {
            if docker.remove_network(&id).await.is_ok() {
                nets += 1;
            }
        }
    }
    Ok((removed, nets))
}

/// A pod's containers, in start order.
#[derive(Debug, Default)]
struct Containers {
    infra: Option<String>,
    workload: Option<String>,
    sidecar: Option<String>,
}

impl Containers {
    fn all(&self) -> impl Iterator<Item = &String> {
        [&self.infra, &self.workload, &self.sidecar]
            .into_iter()
            .flatten()
    }
}

/// How a container joins the network.
enum Net<'a> {
    /// Its own namespace on network `net`, at `ip`, with DNS aliases and /etc/hosts lines
    /// (`name:ip`; containers that join it share its hosts file).
    Own {
        net: &'a str,
        ip: &'a str,
        aliases: Vec<String>,
        hosts: Vec<String>,
    },
    /// Another container's namespace (a pod's infra container).
    Join(&'a str),
}

pub struct DockerBackend {
    docker: Docker,
    opts: Options,
    /// "Docker 20.10.24 (API 1.41)".
    engine: String,
    network: String,
    base: String,
    /// Tenant namespace -> (its network, the network's first three octets).
    tenants: Vec<(String, String, String)>,
    pilot: Option<String>,
    /// Pilot's process as this host sees it (for CPU and memory during a churn).
    pilot_pid: Option<u32>,
    /// Pod name -> its containers, with the names their logs are saved under.
    pods: HashMap<String, Containers>,
    meshbench_image: String,
    envoy_image: Option<String>,
    token: String,
    /// The CA key every pilot of the run starts with (a restarted pilot keeps the root).
    ca_key: String,
}

impl DockerBackend {
    /// Connects to the engine, builds (or finds) the images and creates the run's network.
    pub async fn new(opts: Options) -> Result<DockerBackend, Error> {
        if opts.capture {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Err(Error::Environment("mesh.capture: iptables writes each pod's rules from this host (nsenter into the pod's network namespace): run as root on the Docker engine's host".into()));
            }
            for tool in ["nsenter", "iptables-restore"] {
                let found = std::env::var_os("PATH").is_some_and(|paths| {
                    std::env::split_paths(&paths).any(|d| d.join(tool).is_file())
                });
                if !found {
                    return Err(Error::Environment(format!(
                        "mesh.capture: iptables needs {tool} on this host (Debian: apt-get install iptables util-linux)"
                    )));
                }
            }
        }
        let (docker, engine) = connect().await?;
        let image = |b: image::Built| {
            if let Some(s) = b.build_s {
                eprintln!("meshbench: built image {} in {s:.1} s", b.tag);
            }
            b.tag
        };
        let meshbench_image = image(
            image::ensure(&docker, "meshbench", &[(&opts.meshbench_exe, "/meshbench")]).await?,
        );
        let envoy_image = match opts.proxy {
            ProxyKind::Meshbench => None,
            ProxyKind::Envoy => {
                let envoy = opts.envoy_binary()?.to_path_buf();
                // With meshbench too: its agent is the sidecar container's entry point.
                let binaries: &[(&Path, &str)] =
                    &[(&envoy, "/envoy"), (&opts.meshbench_exe, "/meshbench")];
                Some(image(image::ensure(&docker, "envoy", binaries).await?))
            }
        };
        let (network, base) = create_network(&docker, &opts.run_id, "").await?;
        let mut tenants = Vec::new();
        for ns in &opts.tenants {
            match create_network(&docker, &opts.run_id, &format!("-{ns}")).await {
                Ok((net, base)) => tenants.push((ns.clone(), net, base)),
                Err(e) => {
                    // Nothing holds the networks made so far: remove them now.
                    let _ = down(&docker, Some(&opts.run_id)).await;
                    return Err(e);
                }
            }
        }
        Ok(DockerBackend {
            docker,
            opts,
            engine,
            network,
            base,
            tenants,
            pilot: None,
            pilot_pid: None,
            pods: HashMap::new(),
            meshbench_image,
            envoy_image,
            token: crate::pilot::new_token(),
            ca_key: crate::security::Ca::new_key_pem(),
        })
    }

    /// Istio's proxy_init rules in the pod's network namespace, written from this host with
    /// `nsenter` into the infra container's namespace: the images hold one binary each (no
    /// iptables), and this needs only root on the engine's host, which the capture check at
    /// start asks for.
    async fn apply_capture(&self, infra: &str, p: &Pod) -> Result<(), Error> {
        let pid = self
            .docker
            .inspect_container(infra, None)
            .await
            .map_err(|e| engine_error("inspecting a pod", e))?
            .state
            .and_then(|s| s.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::Environment(format!("pod {}: no process id", p.plan.name)))?;
        let rules = crate::capture::Rules {
            // The harness reads the sidecar's admin and drives the app's control port.
            exclude_inbound: vec![
                crate::proxy::DEFAULT_ADMIN_PORT,
                crate::workload::CONTROL_PORT,
            ],
            exclude_outbound: vec![],
        }
        .render();
        let mut child = tokio::process::Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "iptables-restore",
                "--noflush",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::Environment(format!("nsenter: {e}")))?;
        use tokio::io::AsyncWriteExt;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .await
                .map_err(|e| Error::Environment(format!("iptables-restore: {e}")))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| Error::Environment(format!("iptables-restore: {e}")))?;
        if !out.status.success() {
            return Err(Error::Environment(format!(
                "pod {}: iptables-restore in its namespace failed: {}",
                p.plan.name,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    fn pilot_ip(&self) -> String {
        format!("{}.2", self.base)
    }

    /// The network (name, base) a namespace's pods live on: its tenant network, else the
    /// run's.
    fn net_of(&self, namespace: &str) -> (&str, &str) {
        self.tenants
            .iter()
            .find(|(ns, _, _)| ns == namespace)
            .map_or((&self.network, &self.base), |(_, n, b)| (n, b))
    }

    /// Pilot's ADS address on the network of a pod of `namespace`.
    fn pilot_xds_for(&self, namespace: &str) -> SocketAddr {
        format!("{}.2:15010", self.net_of(namespace).1)
            .parse()
            .expect("valid address")
    }

    /// Connects a container to every tenant network but `own` (the one it is on), at
    /// `.{last}` of each.
    async fn join_tenant_networks(
        &self,
        container: &str,
        own: &str,
        last: &str,
        aliases: &[String],
    ) -> Result<(), Error> {
        for (ns, net, base) in self.tenants.iter().filter(|(_, n, _)| n != own) {
            self.docker
                .connect_network(
                    net,
                    NetworkConnectRequest {
                        container: container.to_string(),
                        endpoint_config: Some(EndpointSettings {
                            ipam_config: Some(EndpointIpamConfig {
                                ipv4_address: Some(format!("{base}.{last}")),
                                ..Default::default()
                            }),
                            aliases: Some(aliases.to_vec()),
                            ..Default::default()
                        }),
                    },
                )
                .await
                .map_err(|e| engine_error(&format!("joining tenant {ns}'s network"), e))?;
        }
        Ok(())
    }

    /// Creates and starts one container of the run; returns its id.
    async fn run(
        &self,
        name: &str,
        role: &str,
        image: &str,
        entrypoint: &str,
        cmd: &[String],
        net: Net<'_>,
    ) -> Result<String, Error> {
        self.run_with_env(name, role, image, entrypoint, cmd, &[], net, None)
            .await
    }

    /// As [`DockerBackend::run`], with environment variables.
    #[allow(clippy::too_many_arguments)]
    async fn run_with_env(
        &self,
        name: &str,
        role: &str,
        image: &str,
        entrypoint: &str,
        cmd: &[String],
        env: &[(String, String)],
        net: Net<'_>,
        user: Option<u32>,
    ) -> Result<String, Error> {
        let full_name = format!("mb-{}-{name}", self.opts.run_id);
        let labels = HashMap::from([
            (RUN_LABEL.to_string(), self.opts.run_id.clone()),
            ("meshbench.role".to_string(), role.to_string()),
            ("meshbench.name".to_string(), name.to_string()),
        ]);
        let mut extra_hosts = None;
        let (network_mode, networking_config, hostname) = match net {
            Net::Own {
                net,
                ip,
                aliases,
                hosts,
            } => {
                extra_hosts = Some(hosts).filter(|h| !h.is_empty());
                (
                    net.to_string(),
                    Some(NetworkingConfig {
                        endpoints_config: Some(HashMap::from([(
                            net.to_string(),
                            EndpointSettings {
                                ipam_config: Some(EndpointIpamConfig {
                                    ipv4_address: Some(ip.to_string()),
                                    ..Default::default()
                                }),
                                aliases: Some(aliases),
                                ..Default::default()
                            },
                        )])),
                    }),
                    Some(name.to_string()),
                )
            }
            Net::Join(infra) => (format!("container:{infra}"), None, None),
        };
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: Some(vec![entrypoint.to_string()]),
            cmd: Some(cmd.to_vec()),
            hostname,
            user: user.map(|u| format!("{u}:{u}")),
            env: Some(
                std::iter::once(format!("{}={}", RUN_ENV, self.opts.run_id))
                    .chain(env.iter().map(|(k, v)| format!("{k}={v}")))
                    .collect(),
            ),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(network_mode),
                extra_hosts,
                ..Default::default()
            }),
            networking_config,
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&full_name)
                        .build(),
                ),
                body,
            )
            .await
            .map_err(|e| engine_error(&format!("creating container {full_name}"), e))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| engine_error(&format!("starting container {full_name}"), e))?;
        Ok(created.id)
    }

    /// One container's CPU seconds and peak memory (its cgroup), from the engine's stats.
    async fn cost(&self, name: String, id: Option<&String>) -> ProcessCost {
        let mut c = ProcessCost {
            name,
            ..Default::default()
        };
        let Some(id) = id else { return c };
        let mut s = self.docker.stats(
            id,
            Some(
                StatsOptionsBuilder::default()
                    .stream(false)
                    .one_shot(true)
                    .build(),
            ),
        );
        if let Some(Ok(s)) = s.next().await {
            c.cpu_s = s
                .cpu_stats
                .and_then(|c| c.cpu_usage)
                .and_then(|u| u.total_usage)
                .unwrap_or(0) as f64
                / 1e9;
            c.peak_rss_mb = s
                .memory_stats
                .and_then(|m| m.max_usage.or(m.usage))
                .unwrap_or(0) as f64
                / (1024.0 * 1024.0);
        }
        c
    }
}

#[async_trait::async_trait]
impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }
    fn engine(&self) -> Option<String> {
        Some(self.engine.clone())
    }
    fn pod_limit(&self) -> usize {
        POD_LIMIT
    }
    fn capture(&self) -> bool {
        self.opts.capture
    }

    /// Service VIPs: 10.214.N.(k+1), N being the run's /24 of 10.213.0.0/16 (never routed:
    /// the pods' capture rules take every connection to them to the sidecar).
    fn service_ip(&self, k: usize) -> Option<String> {
        let n = self.base.strip_prefix("10.213.")?;
        (k < 254).then(|| format!("10.214.{n}.{}", k + 1))
    }

    fn pod_addr(&self, k: usize, plan: &super::PodPlan) -> PodAddr {
        PodAddr {
            pod_ip: format!("{}.{}", self.net_of(&plan.namespace).1, 10 + k),
            app_ip: "127.0.0.1".into(),
        }
    }
    fn client_addr(&self) -> PodAddr {
        PodAddr {
            pod_ip: format!("{}.8", self.net_of(crate::model::DEFAULT_NAMESPACE).1),
            app_ip: "127.0.0.1".into(),
        }
    }
    fn pilot_xds(&self) -> SocketAddr {
        format!("{}:15010", self.pilot_ip())
            .parse()
            .expect("valid address")
    }
    fn pilot_api(&self) -> SocketAddr {
        format!("{}:15080", self.pilot_ip())
            .parse()
            .expect("valid address")
    }
    fn api_token(&self) -> String {
        self.token.clone()
    }

    async fn start_pilot(&mut self) -> Result<(), Error> {
        let mut args = PilotArgs::new(
            "0.0.0.0:15010".parse().expect("valid"),
            "0.0.0.0:15080".parse().expect("valid"),
        );
        args.debounce = self.opts.debounce;
        args.token = self.token.clone();
        args.ca_key = Some(self.ca_key.clone());
        args.xds_tls = Some(
            format!("0.0.0.0:{}", super::XDS_TLS_PORT)
                .parse()
                .expect("valid"),
        );
        // The harness reaches the network from the host through the bridge's gateway: only
        // that address (and no workload container) may use the REST API.
        args.trusted_peers = vec![format!("{}.1", self.base).parse().expect("valid address")];
        let ip = self.pilot_ip();
        let id = self
            .run_with_env(
                "pilot",
                "pilot",
                &self.meshbench_image,
                "/meshbench",
                &args.to_args(),
                &args.env(),
                Net::Own {
                    net: &self.network,
                    ip: &ip,
                    aliases: vec!["pilot".into(), "istiod".into()],
                    hosts: vec![],
                },
                None,
            )
            .await?;
        // Pilot serves every tenant's sidecars on that tenant's network.
        let own = self.network.clone();
        self.join_tenant_networks(&id, &own, "2", &["pilot".into(), "istiod".into()])
            .await?;
        self.pilot_pid = self
            .docker
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|c| c.state?.pid)
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0 && std::path::Path::new(&format!("/proc/{p}")).exists());
        self.pilot = Some(id);
        let api = self.pilot_api();
        wait_tcp(api, PILOT_START_LIMIT).await.map_err(|_| {
            Error::Environment(format!(
                "pilot's container did not answer on {api} (is {} reachable from this host?)",
                self.network
            ))
        })
    }

    async fn stop_pilot(&mut self) {
        if let Some(id) = self.pilot.take() {
            save_logs(&self.docker, &id, self.opts.log_dir.join("pilot.log")).await;
            remove(&self.docker, &id).await;
        }
        self.pilot_pid = None;
    }

    fn pilot_pid(&self) -> Option<u32> {
        self.pilot_pid
    }

    /// An infra container that owns the pod's network namespace and DNS aliases, then the
    /// workload (unless the load client) and the sidecar joined to it.
    async fn start_pod(&mut self, p: &Pod) -> Result<(), Error> {
        let name = &p.plan.name;
        let s = &p.plan.service;
        let ns = &p.plan.namespace;
        // With capture, service names are the VIPs' (hosts file), not the pods' (DNS).
        let aliases = if self.opts.capture {
            vec![name.clone()]
        } else {
            vec![
                name.clone(),
                s.clone(),
                format!("{s}.{ns}"),
                format!("{s}.{ns}.svc.cluster.local"),
            ]
        };
        let hosts: Vec<String> = p.hosts.iter().map(|(h, ip)| format!("{h}:{ip}")).collect();
        let infra = self
            .run(
                name,
                "infra",
                &self.meshbench_image,
                "/meshbench",
                &["pause".to_string()],
                Net::Own {
                    net: self.net_of(ns).0,
                    ip: &p.addr.pod_ip,
                    aliases: aliases.clone(),
                    hosts,
                },
            )
            .await?;
        if p.capture {
            // proxy_init's job, before the app and the sidecar start.
            self.apply_capture(&infra, p).await?;
        }
        // Gateways and the load client are the mesh's entry points: they reach every tenant.
        if p.plan.gateway || p.plan.is_load_client() {
            let last = p
                .addr
                .pod_ip
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string();
            let own = self.net_of(ns).0.to_string();
            self.join_tenant_networks(&infra, &own, &last, &aliases)
                .await?;
        }
        let xds = self.pilot_xds_for(ns);
        let mut c = Containers {
            infra: Some(infra.clone()),
            ..Default::default()
        };
        if p.plan.has_app() {
            let args = workload_args(p, &format!("{}:{}", p.addr.app_ip, p.plan.port));
            c.workload = Some(
                self.run_with_env(
                    &format!("{name}-app"),
                    "workload",
                    &self.meshbench_image,
                    "/meshbench",
                    &args,
                    &workload_env(p),
                    Net::Join(&infra),
                    None,
                )
                .await?,
            );
        }
        let sidecar_name = format!("{name}-sidecar");
        c.sidecar = Some(match &self.envoy_image {
            // pilot-agent's role as the entry point: it runs the proxy as uid 1337 itself.
            image if self.opts.agent => {
                let xds = p.xds_addr(xds);
                let envoy = image.as_ref().map(|_| Path::new("/envoy"));
                let args = agent_args(
                    p,
                    &xds.to_string(),
                    self.opts.xds,
                    envoy,
                    Path::new(AGENT_DIR),
                );
                self.run_with_env(
                    &sidecar_name,
                    "sidecar",
                    image.as_ref().unwrap_or(&self.meshbench_image),
                    "/meshbench",
                    &args,
                    &p.xds_tls_env(),
                    Net::Join(&infra),
                    None,
                )
                .await?
            }
            None => {
                let xds = p.xds_addr(xds);
                let args = sidecar_args(p, &xds.to_string(), self.opts.xds);
                self.run_with_env(
                    &sidecar_name,
                    "sidecar",
                    &self.meshbench_image,
                    "/meshbench",
                    &args,
                    &p.xds_tls_env(),
                    Net::Join(&infra),
                    p.capture.then_some(crate::capture::PROXY_UID),
                )
                .await?
            }
            Some(envoy_image) => {
                let bootstrap = envoy_bootstrap(p, p.xds_addr(xds), self.opts.xds);
                let mut args = vec![
                    "--config-yaml".to_string(),
                    bootstrap.to_json_with_tls(p.xds_tls.as_ref()).to_string(),
                ];
                args.extend(ENVOY_ARGS.map(String::from));
                self.run_with_env(
                    &sidecar_name,
                    "sidecar",
                    envoy_image,
                    "/envoy",
                    &args,
                    &[],
                    Net::Join(&infra),
                    p.capture.then_some(crate::capture::PROXY_UID),
                )
                .await?
            }
        });
        self.pods.insert(name.clone(), c);
        Ok(())
    }

    async fn stop_pod(&mut self, p: &Pod) {
        if let Some(c) = self.pods.remove(&p.plan.name) {
            for id in c.all() {
                remove(&self.docker, id).await;
            }
        }
    }

    fn agent(&self) -> bool {
        self.opts.agent
    }

    /// The sidecar container's first process (its agent, or the proxy) as the host sees it.
    async fn sidecar_pid(&self, p: &Pod) -> Option<u32> {
        let id = self.pods.get(&p.plan.name)?.sidecar.as_ref()?;
        let state = self.docker.inspect_container(id, None).await.ok()?.state?;
        state
            .pid
            .filter(|pid| *pid > 0 && state.running == Some(true))
            .map(|pid| pid as u32)
    }

    async fn pause_pod(&mut self, p: &Pod, pause: bool) -> Result<(), Error> {
        let Some(c) = self.pods.get(&p.plan.name) else {
            return Ok(());
        };
        for id in c.all() {
            let r = if pause {
                self.docker.pause_container(id).await
            } else {
                self.docker.unpause_container(id).await
            };
            r.map_err(|e| {
                engine_error(
                    &format!(
                        "{} {}",
                        if pause { "pausing" } else { "unpausing" },
                        p.plan.name
                    ),
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Disconnects the pod's infra container from the run's network, or connects it again on
    /// the same address (so its endpoint and node id stay valid).
    async fn partition(&mut self, p: &Pod, cut: bool) -> Result<(), Error> {
        let infra = self
            .pods
            .get(&p.plan.name)
            .and_then(|c| c.infra.clone())
            .unwrap_or_default();
        let name = &p.plan.name;
        let network = self.net_of(&p.plan.namespace).0.to_string();
        if cut {
            self.docker
                .disconnect_network(
                    &network,
                    NetworkDisconnectRequest {
                        container: infra,
                        force: Some(true),
                    },
                )
                .await
                .map_err(|e| engine_error(&format!("disconnecting {name}"), e))
        } else {
            self.docker
                .connect_network(
                    &network,
                    NetworkConnectRequest {
                        container: infra,
                        endpoint_config: Some(EndpointSettings {
                            ipam_config: Some(EndpointIpamConfig {
                                ipv4_address: Some(p.addr.pod_ip.clone()),
                                ..Default::default()
                            }),
                            aliases: Some(vec![name.clone(), p.plan.service.clone()]),
                            ..Default::default()
                        }),
                    },
                )
                .await
                .map_err(|e| engine_error(&format!("reconnecting {name}"), e))
        }
    }

    /// Runs `meshbench netcheck` inside the pod's network namespace (an exec in its infra
    /// container).
    async fn reach(&self, from: &Pod, to: SocketAddr) -> Result<bool, Error> {
        let infra = self
            .pods
            .get(&from.plan.name)
            .and_then(|c| c.infra.clone())
            .ok_or_else(|| Error::Config(format!("pod {} is not running", from.plan.name)))?;
        let what = format!("probing {to} from {}", from.plan.name);
        let exec = self
            .docker
            .create_exec(
                &infra,
                bollard::models::ExecConfig {
                    cmd: Some(vec!["/meshbench".into(), "netcheck".into(), to.to_string()]),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| engine_error(&what, e))?;
        if let bollard::exec::StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| engine_error(&what, e))?
        {
            while output.next().await.is_some() {}
        }
        let code = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|e| engine_error(&what, e))?
            .exit_code;
        match code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            other => Err(Error::Environment(format!(
                "{what}: netcheck exited with {other:?}"
            ))),
        }
    }

    async fn resources(&self, pods: &[&Pod]) -> Resources {
        let proxies = pods.iter().map(|p| {
            self.cost(
                p.plan.name.clone(),
                self.pods.get(&p.plan.name).and_then(|c| c.sidecar.as_ref()),
            )
        });
        Resources {
            pilot: self.cost("pilot".into(), self.pilot.as_ref()).await,
            proxies: futures::future::join_all(proxies).await,
        }
    }
}

impl Drop for DockerBackend {
    /// Saves every container's output, then removes the run's containers and network (by
    /// label, so nothing is missed), on a thread of its own since drop cannot await.
    fn drop(&mut self) {
        if self.opts.keep {
            eprintln!(
                "meshbench: --keep: the run's containers stay; remove them with `meshbench down --run {}`",
                self.opts.run_id
            );
            return;
        }
        let docker = self.docker.clone();
        let run_id = self.opts.run_id.clone();
        let mut named: Vec<(String, String)> = self
            .pods
            .iter()
            .flat_map(|(pod, c)| {
                [
                    (c.workload.clone(), pod.clone()),
                    (c.sidecar.clone(), format!("{pod}-sidecar")),
                ]
            })
            .filter_map(|(id, n)| id.map(|id| (id, n)))
            .collect();
        named.extend(self.pilot.clone().map(|id| (id, "pilot".to_string())));
        let log_dir = self.opts.log_dir.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let saves = named
                    .iter()
                    .map(|(id, name)| save_logs(&docker, id, log_dir.join(format!("{name}.log"))));
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(saves))
                        .await;
                if let Err(e) = down(&docker, Some(&run_id)).await {
                    eprintln!("meshbench: cleaning up run {run_id}: {e}");
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Copies a container's output to `path`.
async fn save_logs(docker: &Docker, id: &str, path: std::path::PathBuf) {
    let mut logs = docker.logs(
        id,
        Some(
            LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    let mut text = Vec::new();
    while let Some(Ok(chunk)) = logs.next().await {
        text.extend_from_slice(&chunk.into_bytes());
    }
    let _ = std::fs::write(path, text);
}

async fn remove(docker: &Docker, id: &str) {
    let _ = docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await;
}

/// Creates a network of the run (`mb-RUN` plus `suffix`) on a free /24 of 10.213.0.0/16;
/// returns its name and the first three octets.
async fn create_network(
    docker: &Docker,
    run_id: &str,
    suffix: &str,
) -> Result<(String, String), Error> {
    let name = format!("mb-{run_id}{suffix}");
    let first = std::process::id() % 250;
    let mut last_error = None;
    // 13 is prime to 250: every /24 is tried once.
    for k in 0..250 {
        let base = format!("10.213.{}", (first + k * 13) % 250 + 1);
        let req = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("{base}.0/24")),
                    gateway: Some(format!("{base}.1")),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            labels: Some(HashMap::from([(RUN_LABEL.to_string(), run_id.to_string())])),
            ..Default::default()
        };
        match docker.create_network(req).await {
            Ok(_) => return Ok((name, base)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(engine_error(
        "creating the run's network (no free /24 in 10.213.0.0/16)",
        last_error.expect("tried at least once"),
    ))
}
