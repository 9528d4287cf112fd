//! The local backend. Addresses: every run takes a loopback /24 of its own (127.A.B.0 from the
//! process id); pilot listens on .1 (15010 ADS, 15080 REST), the load client's sidecar is .8,
//! pod k has POD_IP .(10+2k) (its sidecar: 15001 outbound, targetPort inbound, 15000 admin) and
//! the pod-local app address .(11+2k). Pods come from Deployments x replicas and are
//! registered as endpoints through pilot's REST batch, as a Kubernetes endpoints controller
//! would. Every child is killed when the backend is dropped (normal end, error, Ctrl-C) and,
//! through PR_SET_PDEATHSIG, if this process dies without dropping it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::process::{Child, Command};

use super::{Error, Options};
use crate::config;
use crate::model::{Labels, Spec};
use crate::scenario::ProxyKind;
use crate::xds::bootstrap::EnvoyBootstrap;
use crate::xds::node::sidecar_id;

/// One pod: a workload and its sidecar (the load client has only a sidecar).
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub labels: Labels,
    pub pod_ip: String,
    pub app_ip: String,
    pub port: u16,
    pub node_id: String,
    workload: Option<Child>,
    sidecar: Option<Child>,
}

impl Pod {
    pub fn sidecar_pid(&self) -> Option<u32> {
        self.sidecar.as_ref().and_then(|c| c.id())
    }
    pub fn running(&self) -> bool {
        self.sidecar.is_some()
    }
}

pub struct LocalBackend {
    opts: Options,
    base: String,
    pilot: Option<Child>,
    pub pods: Vec<Pod>,
    pub client: Pod,
    /// Everything applied so far, in order, to replay when the control plane restarts.
    applied: Vec<(String, String)>,
    http: HttpClient,
}

/// Environment variable every child carries: the run id (tests look for leftovers by it).
pub const RUN_ENV: &str = "MESHBENCH_RUN";

/// The killing of children on drop is `kill_on_drop`; this adds death-of-parent.
fn command(program: &Path, run_id: &str) -> Command {
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
    pub fn pilot_api(&self) -> SocketAddr {
        format!("{}.1:15080", self.base)
            .parse()
            .expect("valid address")
    }
    pub fn pilot_xds(&self) -> SocketAddr {
        format!("{}.1:15010", self.base)
            .parse()
            .expect("valid address")
    }
    /// The load client's sidecar outbound listener: where loads and probes are sent.
    pub fn client_outbound(&self) -> SocketAddr {
        format!("{}:15001", self.client.pod_ip)
            .parse()
            .expect("valid address")
    }
    pub fn pilot_pid(&self) -> Option<u32> {
        self.pilot.as_ref().and_then(|c| c.id())
    }
    pub fn node_ids(&self) -> Vec<String> {
        self.pods
            .iter()
            .chain(std::iter::once(&self.client))
            .filter(|p| p.running())
            .map(|p| p.node_id.clone())
            .collect()
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
        let client = Pod {
            name: "loadclient-0".into(),
            namespace: "default".into(),
            service: "loadclient".into(),
            version: "v1".into(),
            labels: [("app".to_string(), "loadclient".to_string())].into(),
            pod_ip: format!("{base}.8"),
            app_ip: format!("{base}.9"),
            port: 0,
            node_id: sidecar_id(&format!("{base}.8"), "loadclient-0", "default"),
            workload: None,
            sidecar: None,
        };
        let mut b = LocalBackend {
            opts,
            base,
            pilot: None,
            pods: vec![],
            client,
            applied: vec![],
            http: HttpClient,
        };
        b.start_pilot().await?;
        let mut docs = Vec::new();
        for f in manifests.iter().chain(config) {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Error::Environment(format!("cannot read {f}: {e}")))?;
            docs.push((f.clone(), text));
        }
        for (f, text) in &docs {
            b.apply(f, text).await?;
        }
        // Pods from Deployments.
        let mut k = 0;
        for f in manifests {
            let parsed =
                config::parse_file(Path::new(f)).map_err(|e| Error::Config(format!("{}", e[0])))?;
            for o in parsed.objects {
                let Spec::Deployment(d) = &o.spec else {
                    continue;
                };
                for i in 0..d.replicas {
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
                    let pod_ip = format!("{}.{}", b.base, 10 + 2 * k);
                    let name = format!("{}-{i}", o.name);
                    b.pods.push(Pod {
                        node_id: sidecar_id(&pod_ip, &name, &o.namespace),
                        name,
                        namespace: o.namespace.clone(),
                        service,
                        version,
                        labels: d.labels.clone(),
                        app_ip: format!("{}.{}", b.base, 11 + 2 * k),
                        pod_ip,
                        port: d.container_ports.first().map_or(9080, |p| p.1),
                        workload: None,
                        sidecar: None,
                    });
                    k += 1;
                    if k >= 120 {
                        return Err(Error::Config(
                            "the local backend runs at most 120 pods".into(),
                        ));
                    }
                }
            }
        }
        for i in 0..b.pods.len() {
            b.start_pod(i).await?;
        }
        b.client.sidecar = Some(b.spawn_sidecar(&b.client)?);
        let names: Vec<usize> = (0..b.pods.len()).collect();
        b.register(&names).await?;
        for p in &b.pods {
            let app: SocketAddr = format!("{}:{}", p.app_ip, p.port)
                .parse()
                .expect("valid address");
            wait_tcp(app, Duration::from_secs(10)).await.map_err(|_| {
                Error::Environment(format!(
                    "workload of pod {} did not listen on {app}",
                    p.name
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
            &self.pilot_api().to_string(),
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
        let api = self.pilot_api();
        wait_tcp(api, Duration::from_secs(10)).await.map_err(|_| {
            Error::Environment(format!(
                "pilot did not answer on {api}; see {}/pilot.log",
                self.opts.log_dir.display()
            ))
        })?;
        Ok(())
    }

    fn spawn_sidecar(&self, p: &Pod) -> Result<Child, Error> {
        let log = log_file(&self.opts.log_dir, &format!("{}-sidecar", p.name));
        match self.opts.proxy {
            ProxyKind::Meshbench => {
                let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
                c.args([
                    "proxy",
                    "--xds",
                    &self.pilot_xds().to_string(),
                    "--node-id",
                    &p.node_id,
                    "--concurrency",
                    "1",
                    "--app-ip",
                    &p.app_ip,
                ]);
                for (k, v) in &p.labels {
                    c.args(["--label", &format!("{k}={v}")]);
                }
                c.stdout(Stdio::null()).stderr(log);
                c.spawn().map_err(|e| {
                    Error::Environment(format!("cannot start the sidecar of {}: {e}", p.name))
                })
            }
            ProxyKind::Envoy => {
                let envoy = self.opts.envoy.as_ref().ok_or_else(|| {
                    Error::Environment(
                        "Envoy not found: set MESHBENCH_ENVOY or put envoy on PATH".into(),
                    )
                })?;
                let b = EnvoyBootstrap {
                    pod_ip: p.pod_ip.clone(),
                    pod_name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service: p.service.clone(),
                    labels: p.labels.clone(),
                    app_ip: p.app_ip.clone(),
                    admin: format!("{}:15000", p.pod_ip)
                        .parse()
                        .expect("valid address"),
                    xds: self.pilot_xds(),
                };
                let path = self.opts.log_dir.join(format!("{}-envoy.json", p.name));
                std::fs::write(&path, b.to_json().to_string())
                    .map_err(|e| Error::Environment(e.to_string()))?;
                let mut c = command(envoy, &self.opts.run_id);
                c.arg("-c")
                    .arg(&path)
                    .args([
                        "--concurrency",
                        "1",
                        "--use-dynamic-base-id",
                        "--log-level",
                        "warn",
                    ])
                    .stdout(Stdio::null())
                    .stderr(log);
                c.spawn().map_err(|e| {
                    Error::Environment(format!("cannot start Envoy for {}: {e}", p.name))
                })
            }
        }
    }

    async fn start_pod(&mut self, i: usize) -> Result<(), Error> {
        let p = &self.pods[i];
        let mut c = command(&self.opts.meshbench_exe, &self.opts.run_id);
        c.args([
            "workload",
            "--service",
            &p.service,
            "--version",
            &p.version,
            "--pod",
            &p.name,
        ])
        .args([
            "--addr",
            &format!("{}:{}", p.app_ip, p.port),
            "--sidecar",
            &format!("{}:15001", p.pod_ip),
        ])
        .stdout(Stdio::null())
        .stderr(log_file(&self.opts.log_dir, &p.name));
        let workload = c.spawn().map_err(|e| {
            Error::Environment(format!("cannot start the workload of {}: {e}", p.name))
        })?;
        let sidecar = self.spawn_sidecar(p)?;
        let p = &mut self.pods[i];
        p.workload = Some(workload);
        p.sidecar = Some(sidecar);
        Ok(())
    }

    /// Registers pods as endpoints (POD_IP with their labels).
    async fn register(&self, pods: &[usize]) -> Result<(), Error> {
        let add: Vec<Value> = pods
            .iter()
            .map(|i| &self.pods[*i])
            .map(|p| json!({"name": p.name, "namespace": p.namespace, "address": p.pod_ip, "labels": p.labels}))
            .collect();
        let (status, body) = self
            .http
            .json(
                self.pilot_api(),
                "POST",
                "/v1/endpoints",
                &json!({ "add": add }).to_string(),
            )
            .await?;
        if status != 200 {
            return Err(Error::Config(format!(
                "pilot refused the pod endpoints: {body}"
            )));
        }
        Ok(())
    }

    /// Applies one file's text; returns (version, accepted_at_ms).
    pub async fn apply(&mut self, source: &str, text: &str) -> Result<(u64, f64), Error> {
        let name = Path::new(source)
            .file_name()
            .map_or(source.to_string(), |n| n.to_string_lossy().into_owned());
        let (status, body) = self
            .http
            .json(
                self.pilot_api(),
                "POST",
                &format!("/v1/apply?source={name}"),
                text,
            )
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

    /// GET /v1/proxies.
    pub async fn proxies(&self) -> Result<Value, Error> {
        Ok(self
            .http
            .json(self.pilot_api(), "GET", "/v1/proxies", "")
            .await?
            .1)
    }

    pub async fn version(&self) -> Result<u64, Error> {
        Ok(self
            .http
            .json(self.pilot_api(), "GET", "/healthz", "")
            .await?
            .1["version"]
            .as_u64()
            .unwrap_or(0))
    }

    fn find(&self, name: &str) -> Result<usize, Error> {
        self.pods
            .iter()
            .position(|p| p.name == name)
            .or_else(|| {
                self.pods
                    .iter()
                    .position(|p| p.name.strip_suffix("-0") == Some(name))
            })
            .ok_or_else(|| {
                Error::Config(format!(
                    "no pod {name:?} (pods: {})",
                    self.pods
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Kills a pod and removes its endpoint, as Kubernetes would.
    pub async fn kill_pod(&mut self, name: &str) -> Result<(), Error> {
        let i = self.find(name)?;
        let p = &mut self.pods[i];
        for mut c in [p.workload.take(), p.sidecar.take()].into_iter().flatten() {
            let _ = c.kill().await;
        }
        let body = json!({"remove": [{"name": p.name, "namespace": p.namespace}]}).to_string();
        let (status, body) = self
            .http
            .json(self.pilot_api(), "POST", "/v1/endpoints", &body)
            .await?;
        if status != 200 {
            return Err(Error::Environment(format!(
                "pilot refused to remove the endpoint: {body}"
            )));
        }
        Ok(())
    }

    pub async fn restart_pod(&mut self, name: &str) -> Result<(), Error> {
        let i = self.find(name)?;
        if self.pods[i].running() {
            self.kill_pod(name).await?;
        }
        self.start_pod(i).await?;
        let app: SocketAddr = format!("{}:{}", self.pods[i].app_ip, self.pods[i].port)
            .parse()
            .expect("valid address");
        wait_tcp(app, Duration::from_secs(10))
            .await
            .map_err(|_| Error::Environment(format!("restarted pod {name} did not listen")))?;
        self.register(&[i]).await
    }

    pub async fn stop_control_plane(&mut self) {
        if let Some(mut c) = self.pilot.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts pilot again and replays every applied document and the live pods' endpoints
    /// (pilot keeps its config in memory, as a fresh istiod re-reads it from the API server).
    pub async fn start_control_plane(&mut self) -> Result<(), Error> {
        self.start_pilot().await?;
        let applied = std::mem::take(&mut self.applied);
        for (f, text) in &applied {
            self.apply(f, text).await?;
        }
        let live: Vec<usize> = (0..self.pods.len())
            .filter(|i| self.pods[*i].running())
            .collect();
        self.register(&live).await
    }

    /// CPU and peak RSS of pilot and every sidecar now.
    pub fn resources(&self) -> (Option<u32>, BTreeMap<String, Option<u32>>) {
        let mut sidecars = BTreeMap::new();
        for p in self.pods.iter().chain(std::iter::once(&self.client)) {
            sidecars.insert(p.name.clone(), p.sidecar_pid());
        }
        (self.pilot_pid(), sidecars)
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

async fn wait_tcp(addr: SocketAddr, limit: Duration) -> Result<(), ()> {
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
        use http_body_util::{BodyExt, Full};
        let err = |e: String| Error::Environment(format!("pilot REST API at {addr}: {e}"));
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| err(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", addr.to_string())
            .body(Full::new(bytes::Bytes::copy_from_slice(body.as_bytes())))
            .map_err(|e| err(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}
