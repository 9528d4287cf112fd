//! Where a scenario's mesh runs. `local` (the default) runs pilot, every pod's workload and
//! sidecar as child processes of this binary, each pod on its own loopback addresses. `docker`
//! runs the same mesh as a kind-style cluster of containers (one network namespace per pod).
//! Both plan pods the same way and drive pilot through the same REST client; [`Mesh`] is what
//! the runner holds.

pub mod docker;
pub mod local;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config;
use crate::model::{Labels, Spec};
use crate::report::Resources;
use crate::scenario::{FaultStep, ProxyKind};
use crate::xds::bootstrap::EnvoyBootstrap;
use crate::xds::XdsMode;

/// What a backend needs to start a mesh.
#[derive(Clone, Debug)]
pub struct Options {
    pub proxy: ProxyKind,
    pub debounce: std::time::Duration,
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
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Backend unreachable, binary missing, port taken: exit code 3.
    #[error("{0}")]
    Environment(String),
    /// The mesh rejected the scenario's config: exit code 2.
    #[error("{0}")]
    Config(String),
}

/// One pod as a Deployment asks for it; backends give it addresses.
#[derive(Clone, Debug)]
pub struct PodPlan {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub labels: Labels,
    /// The app's container port (0 for the load client, which has no app).
    pub port: u16,
}

impl PodPlan {
    /// The load client: a sidecar with no app, where loads and probes enter the mesh.
    pub fn load_client() -> PodPlan {
        PodPlan {
            name: "loadclient-0".into(),
            namespace: "default".into(),
            service: "loadclient".into(),
            version: "v1".into(),
            labels: [("app".to_string(), "loadclient".to_string())].into(),
            port: 0,
        }
    }
}

/// What the harness reads of a pod on any backend.
pub trait PodInfo {
    fn pod_ip(&self) -> &str;
    fn node_id(&self) -> &str;
    /// Its sidecar runs.
    fn running(&self) -> bool;
}

/// (pod IP, node id) of the pods whose sidecar runs.
pub fn running<'a, P: PodInfo + 'a>(pods: impl Iterator<Item = &'a P>) -> Vec<(String, String)> {
    pods.filter(|p| p.running())
        .map(|p| (p.pod_ip().to_string(), p.node_id().to_string()))
        .collect()
}

/// Pods from the manifests' Deployments x replicas, in file order.
pub fn plan_pods(manifests: &[String], limit: usize) -> Result<Vec<PodPlan>, Error> {
    let mut pods = Vec::new();
    for f in manifests {
        let parsed =
            config::parse_file(Path::new(f)).map_err(|e| Error::Config(format!("{}", e[0])))?;
        for o in parsed.objects {
            let Spec::Deployment(d) = &o.spec else {
                continue;
            };
            for i in 0..d.replicas {
                pods.push(PodPlan {
                    name: format!("{}-{i}", o.name),
                    namespace: o.namespace.clone(),
                    service: d
                        .labels
                        .get("app")
                        .cloned()
                        .unwrap_or_else(|| o.name.clone()),
                    version: d
                        .labels
                        .get("version")
                        .cloned()
                        .unwrap_or_else(|| "v1".into()),
                    labels: d.labels.clone(),
                    port: d.container_ports.first().map_or(9080, |p| p.1),
                });
                if pods.len() > limit {
                    return Err(Error::Config(format!(
                        "this backend runs at most {limit} pods"
                    )));
                }
            }
        }
    }
    Ok(pods)
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

/// Pilot's REST API as the backends use it; remembers what was applied so a restarted
/// control plane can be given it again (pilot keeps config in memory, as a fresh istiod
/// re-reads it from the API server).
#[derive(Clone, Debug)]
pub struct PilotApi {
    pub addr: SocketAddr,
    applied: Vec<(String, String)>,
}

impl PilotApi {
    pub fn new(addr: SocketAddr) -> PilotApi {
        PilotApi {
            addr,
            applied: vec![],
        }
    }

    /// Applies one file's text; returns (version, accepted_at_ms).
    pub async fn apply(&mut self, source: &str, text: &str) -> Result<(u64, f64), Error> {
        let name = Path::new(source)
            .file_name()
            .map_or(source.to_string(), |n| n.to_string_lossy().into_owned());
        let (status, body) = HttpClient
            .json(self.addr, "POST", &format!("/v1/apply?source={name}"), text)
            .await?;
        if status != 200 {
            let errors: Vec<String> = body["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    format!(
                        "{}: document {}: {}: {}",
                        e["file"].as_str().unwrap_or(""),
                        e["document"],
                        e["field"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    )
                })
                .collect();
            return Err(Error::Config(format!(
                "pilot rejected {source}:\n  {}",
                errors.join("\n  ")
            )));
        }
        self.applied.push((source.to_string(), text.to_string()));
        Ok((
            body["version"].as_u64().unwrap_or(0),
            body["accepted_at_ms"].as_f64().unwrap_or(0.0),
        ))
    }

    /// Reads and applies files (manifests, then config).
    pub async fn apply_files(&mut self, files: &[String]) -> Result<(), Error> {
        for f in files {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Error::Environment(format!("cannot read {f}: {e}")))?;
            self.apply(f, &text).await?;
        }
        Ok(())
    }

    /// Gives a restarted pilot everything applied so far, in order.
    pub async fn replay(&mut self) -> Result<(), Error> {
        for (f, text) in std::mem::take(&mut self.applied) {
            self.apply(&f, &text).await?;
        }
        Ok(())
    }

    /// Registers pods as endpoints (their POD_IP with their labels), as a Kubernetes
    /// endpoints controller would.
    pub async fn register<'a>(
        &self,
        pods: impl IntoIterator<Item = (&'a PodPlan, &'a str)>,
    ) -> Result<(), Error> {
        let add: Vec<Value> = pods
            .into_iter()
            .map(|(p, ip)| json!({"name": p.name, "namespace": p.namespace, "address": ip, "labels": p.labels}))
            .collect();
        self.endpoints(json!({ "add": add })).await
    }

    /// Removes a pod's endpoint.
    pub async fn deregister(&self, p: &PodPlan) -> Result<(), Error> {
        self.endpoints(json!({"remove": [{"name": p.name, "namespace": p.namespace}]}))
            .await
    }

    async fn endpoints(&self, batch: Value) -> Result<(), Error> {
        let (status, body) = HttpClient
            .json(self.addr, "POST", "/v1/endpoints", &batch.to_string())
            .await?;
        if status != 200 {
            return Err(Error::Config(format!(
                "pilot refused an endpoint batch: {body}"
            )));
        }
        Ok(())
    }

    /// GET /v1/proxies, without the simulated proxies.
    pub async fn proxies(&self) -> Result<Value, Error> {
        Ok(HttpClient.json(self.addr, "GET", PROXIES_PATH, "").await?.1)
    }

    /// The latest config version.
    pub async fn version(&self) -> Result<u64, Error> {
        Ok(
            HttpClient.json(self.addr, "GET", "/healthz", "").await?.1["version"]
                .as_u64()
                .unwrap_or(0),
        )
    }
}

/// The REST path listing the real sidecars (simulated proxies left out).
pub const PROXIES_PATH: &str = "/v1/proxies?exclude_namespace=meshbench-sim";

/// The mesh a run drives, on whichever backend.
pub enum Mesh {
    Local(local::LocalBackend),
    Docker(Box<docker::DockerBackend>),
}

impl Mesh {
    pub fn name(&self) -> &'static str {
        match self {
            Mesh::Local(_) => "local",
            Mesh::Docker(_) => "docker",
        }
    }
    /// The engine behind the backend ("Docker 20.10.24, API 1.41"), if any.
    pub fn engine(&self) -> Option<String> {
        match self {
            Mesh::Local(_) => None,
            Mesh::Docker(d) => Some(d.engine.clone()),
        }
    }
    pub fn pods(&self) -> usize {
        match self {
            Mesh::Local(b) => b.pods.len(),
            Mesh::Docker(d) => d.pods.len(),
        }
    }
    pub fn pilot(&self) -> &PilotApi {
        match self {
            Mesh::Local(b) => &b.pilot_api,
            Mesh::Docker(d) => &d.pilot_api,
        }
    }
    pub fn pilot_mut(&mut self) -> &mut PilotApi {
        match self {
            Mesh::Local(b) => &mut b.pilot_api,
            Mesh::Docker(d) => &mut d.pilot_api,
        }
    }
    /// The load client's sidecar outbound listener: where loads and probes are sent.
    pub fn client_outbound(&self) -> SocketAddr {
        match self {
            Mesh::Local(b) => b.client_outbound(),
            Mesh::Docker(d) => d.client_outbound(),
        }
    }
    /// Pilot's ADS address (for simulated proxies).
    pub fn pilot_xds(&self) -> SocketAddr {
        match self {
            Mesh::Local(b) => b.pilot_xds(),
            Mesh::Docker(d) => d.pilot_xds(),
        }
    }
    /// Pilot's process id as this host sees it (docker: the container's init process).
    pub fn pilot_pid(&self) -> Option<u32> {
        match self {
            Mesh::Local(b) => b.pilot_pid(),
            Mesh::Docker(d) => d.pilot_pid,
        }
    }
    fn running_pods(&self) -> Vec<(String, String)> {
        match self {
            Mesh::Local(b) => b.running_pods(),
            Mesh::Docker(d) => d.running_pods(),
        }
    }
    /// Admin addresses (POD_IP:15000) of every running sidecar.
    pub fn sidecar_admins(&self) -> Vec<SocketAddr> {
        self.running_pods()
            .iter()
            .filter_map(|(ip, _)| format!("{ip}:15000").parse().ok())
            .collect()
    }
    /// Node ids of every running sidecar.
    pub fn node_ids(&self) -> Vec<String> {
        self.running_pods().into_iter().map(|(_, n)| n).collect()
    }

    pub async fn fault(&mut self, f: &FaultStep) -> Result<(), Error> {
        match self {
            Mesh::Local(b) => b.fault(f).await,
            Mesh::Docker(d) => d.fault(f).await,
        }
    }

    /// CPU seconds and peak memory of pilot and every sidecar so far.
    pub async fn resources(&self) -> Resources {
        match self {
            Mesh::Local(b) => b.resources(),
            Mesh::Docker(d) => d.resources().await,
        }
    }
}

/// Arguments of `meshbench workload` for a pod whose app listens on `addr`.
pub(crate) fn workload_args(p: &PodPlan, addr: &str, pod_ip: &str) -> Vec<String> {
    [
        "workload",
        "--service",
        &p.service,
        "--version",
        &p.version,
        "--pod",
        &p.name,
        "--addr",
        addr,
        "--sidecar",
        &format!("{pod_ip}:15001"),
    ]
    .map(String::from)
    .to_vec()
}

/// Arguments of `meshbench proxy` as a pod's sidecar.
pub(crate) fn sidecar_args(
    p: &PodPlan,
    xds: &str,
    node_id: &str,
    app_ip: &str,
    mode: XdsMode,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "proxy",
        "--xds",
        xds,
        "--node-id",
        node_id,
        "--concurrency",
        "1",
        "--app-ip",
        app_ip,
        "--xds-mode",
        &mode.to_string(),
    ]
    .map(String::from)
    .to_vec();
    for (k, v) in &p.labels {
        a.extend(["--label".to_string(), format!("{k}={v}")]);
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

pub(crate) fn envoy_bootstrap(
    p: &PodPlan,
    pod_ip: &str,
    app_ip: &str,
    xds: SocketAddr,
    mode: XdsMode,
) -> EnvoyBootstrap {
    EnvoyBootstrap {
        pod_ip: pod_ip.to_string(),
        pod_name: p.name.clone(),
        namespace: p.namespace.clone(),
        service: p.service.clone(),
        labels: p.labels.clone(),
        app_ip: app_ip.to_string(),
        admin: format!("{pod_ip}:15000").parse().expect("valid address"),
        xds,
        xds_mode: mode,
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_tcp(addr: SocketAddr, limit: Duration) -> Result<(), ()> {
    let start = tokio::time::Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if start.elapsed() > limit {
            return Err(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A tiny JSON-over-HTTP client for pilot's REST API.
#[derive(Clone, Copy, Debug)]
pub struct HttpClient;

impl HttpClient {
    pub async fn json(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, Value), Error> {
        let (status, _, bytes) = self.request(addr, method, path, &[], body).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One request on a fresh connection; returns status, headers and body.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<(u16, http::HeaderMap, bytes::Bytes), Error> {
        use http_body_util::{BodyExt, Full};
        let err = |e: String| Error::Environment(format!("HTTP to {addr}: {e}"));
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(bytes::Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok((status, headers, bytes))
    }
}
