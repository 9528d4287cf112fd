//! The `meshbench` binary: parses the command line and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshbench::{model, pilot, proxy, shutdown, workload, xds};

/// Exit codes shared by every command (docs/contracts.md).
const EXIT_FAILED: u8 = 1;
const EXIT_BAD_INPUT: u8 = 2;
const EXIT_ENVIRONMENT: u8 = 3;

#[derive(Parser)]
#[command(
    name = "meshbench",
    version,
    about = "A service mesh on one machine, measured"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Control plane: config store + REST API + xDS v3 ADS server (Istio Pilot's role).
    Pilot {
        /// ADS gRPC listen address.
        #[arg(long, default_value = pilot::DEFAULT_XDS_ADDR)]
        xds_addr: SocketAddr,
        /// REST API listen address (/v1/apply, /v1/proxies, /metrics, ...).
        #[arg(long, default_value = pilot::DEFAULT_API_ADDR)]
        api_addr: SocketAddr,
        /// Also serve ADS over mutual TLS here (istiod's 15012): clients present a certificate
        /// of pilot's CA, and a node must be the identity its certificate proves.
        #[arg(long)]
        xds_tls_addr: Option<SocketAddr>,
        /// Kubernetes/Istio YAML or JSON files to load at start (repeatable). Any error stops the start.
        #[arg(long = "config")]
        config: Vec<PathBuf>,
        /// Quiet period before a config change is pushed (e.g. 100ms; 0 pushes at once).
        #[arg(long, default_value = "100ms", value_parser = parse_debounce)]
        debounce: Duration,
        /// Longest a change waits while further changes keep arriving.
        #[arg(long, default_value = "1s", value_parser = parse_debounce)]
        debounce_max: Duration,
        /// On an endpoint change push every subscribed assignment, not only the changed ones
        /// (Istio before incremental EDS; a comparison point).
        #[arg(long)]
        full_push: bool,
        /// Refuse a batch that names a host or subset nothing defines (by default that is a
        /// warning, as `istioctl analyze` reports it, and the object takes effect when the
        /// host appears).
        #[arg(long)]
        strict_references: bool,
        /// Lifetime of the workload certificates pilot's CA issues (SDS); each is issued
        /// again at half of it. At least 2s.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        cert_ttl: Duration,
        /// File holding the token REST writes need (`Authorization: Bearer TOKEN`); created
        /// with a new token when absent. Default: meshbench-pilot-PORT.token in the temp
        /// directory. MESHBENCH_API_TOKEN, when set, gives the token instead.
        #[arg(long)]
        api_token_file: Option<PathBuf>,
        /// An address besides loopback that may use the REST API and claim any xDS identity
        /// (the harness host on a container network; repeatable).
        #[arg(long = "trusted-peer")]
        trusted_peers: Vec<std::net::IpAddr>,
    },
    /// Sidecar proxy: ADS client + HTTP data plane + Envoy-style admin port (listeners come from LDS).
    Proxy {
        /// ADS server address (host:port).
        #[arg(long, required_unless_present = "bootstrap")]
        xds: Option<String>,
        /// Node id, Istio's form: sidecar~POD_IP~POD.NS~NS.svc.cluster.local
        #[arg(long, required_unless_present = "bootstrap")]
        node_id: Option<String>,
        /// Take node, admin address, xDS address and certificate from this Envoy bootstrap
        /// (as `meshbench agent` writes it) instead of the flags; SIGHUP re-reads it and moves
        /// ADS to a new address or certificate in process (the agent's hot restart).
        #[arg(long, conflicts_with_all = ["xds", "node_id", "admin", "labels", "cluster", "capture", "xds_cert"])]
        bootstrap: Option<PathBuf>,
        /// Admin listen address (default POD_IP:15000).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Pod labels, sent as node.metadata.LABELS (repeatable k=v).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// node.cluster: the app's service name (default: the `app` label).
        #[arg(long)]
        cluster: Option<String>,
        /// Pod-local address the app listens on, sent as node.metadata.APP_IP.
        #[arg(long, default_value = xds::node::DEFAULT_APP_IP)]
        app_ip: String,
        /// Worker threads serving connections, each on its own single-threaded runtime beside
        /// the main thread (xDS, admin, accept), as Envoy's --concurrency; default: one per
        /// core. With 1, everything runs on one thread.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: Option<u16>,
        /// ADS method: sotw (state of the world) or delta.
        #[arg(long, value_enum, default_value = "sotw")]
        xds_mode: XdsModeArg,
        /// The pod's traffic reaches this proxy through iptables capture (Istio's rules,
        /// `meshbench capture-rules`): ask pilot for Istio's listener layout (node metadata
        /// INTERCEPTION_MODE=REDIRECT: virtualOutbound on 15001, virtualInbound on 15006).
        #[arg(long)]
        capture: bool,
        /// ADS over mutual TLS (pilot's --xds-tls-addr): this proxy's certificate chain
        /// (PEM file); needs --xds-key and --xds-ca.
        #[arg(long, requires_all = ["xds_key", "xds_ca"])]
        xds_cert: Option<PathBuf>,
        #[arg(long, requires = "xds_cert")]
        xds_key: Option<PathBuf>,
        /// The root pilot's certificate must chain to (PEM file).
        #[arg(long, requires = "xds_cert")]
        xds_ca: Option<PathBuf>,
    },
    /// pilot-agent's role, a sidecar container's entry point: writes the proxy's bootstrap
    /// from the pod's identity, runs Envoy or meshbench proxy (as uid 1337 when root),
    /// restarts it when it dies, serves /healthz/ready on 15021, hot-restarts it on SIGHUP
    /// (a bootstrap change: Envoy with the next --restart-epoch; meshbench proxy in process)
    /// and drains it on SIGTERM.
    Agent {
        /// The proxy: envoy (found as MESHBENCH_ENVOY or on PATH, or --envoy) or meshbench.
        #[arg(long, value_enum, default_value = "meshbench")]
        proxy: AgentProxyArg,
        /// Envoy's binary (default: MESHBENCH_ENVOY, else envoy on PATH).
        #[arg(long)]
        envoy: Option<PathBuf>,
        /// ADS server address (ip:port).
        #[arg(long)]
        xds: SocketAddr,
        /// The pod's IP (the node id's).
        #[arg(long)]
        pod_ip: String,
        /// The pod's name.
        #[arg(long)]
        pod: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Pod labels (repeatable k=v), sent as node.metadata.LABELS.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// node.cluster: the app's service name (default: the `app` label).
        #[arg(long)]
        service: Option<String>,
        /// Pod-local address the app listens on.
        #[arg(long, default_value = xds::node::DEFAULT_APP_IP)]
        app_ip: String,
        /// The pod's traffic is captured (Istio's listener layout).
        #[arg(long)]
        capture: bool,
        /// A gateway (node type `router`) rather than a sidecar.
        #[arg(long)]
        router: bool,
        /// The proxy's admin address (default POD_IP:15000).
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Readiness (/healthz/ready) and agent stats (/stats) address (default POD_IP:15021).
        #[arg(long)]
        readiness: Option<SocketAddr>,
        /// How long a drain lasts (SIGTERM; Envoy's --drain-time-s on hot restarts).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain: Duration,
        /// Where the bootstraps (envoy-revN.json) go.
        #[arg(long, default_value = "/tmp/meshbench-agent")]
        dir: PathBuf,
        /// The proxy's user and group (default 1337 when the agent runs as root, else the
        /// agent's own).
        #[arg(long)]
        proxy_uid: Option<u32>,
        /// ADS over mutual TLS: certificate chain, key and root PEM files (re-read on SIGHUP).
        #[arg(long, requires_all = ["xds_key", "xds_ca"])]
        xds_cert: Option<PathBuf>,
        #[arg(long, requires = "xds_cert")]
        xds_key: Option<PathBuf>,
        #[arg(long, requires = "xds_cert")]
        xds_ca: Option<PathBuf>,
        /// ADS method: sotw or delta.
        #[arg(long, value_enum, default_value = "sotw")]
        xds_mode: XdsModeArg,
        /// The proxy's worker threads.
        #[arg(long, default_value_t = 1)]
        concurrency: u16,
    },
    /// Print the iptables rules (for `iptables-restore --noflush`) that capture a pod's
    /// traffic as Istio's proxy_init does: inbound TCP to 15006, outbound TCP to 15001,
    /// except the sidecar's own (uid/gid 1337), the app's loopback traffic and excluded ports.
    CaptureRules {
        /// Inbound port not to capture (repeatable), besides Istio's 15008/15090/15021/15020.
        #[arg(long = "exclude-inbound")]
        exclude_inbound: Vec<u16>,
        /// Outbound destination port not to capture (repeatable).
        #[arg(long = "exclude-outbound")]
        exclude_outbound: Vec<u16>,
    },
    /// Fake workload: answers every request with its identity (x-meshbench-workload: SERVICE-VERSION).
    Workload {
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "v1")]
        version: String,
        /// Listen address (the pod-local app address).
        #[arg(long)]
        addr: SocketAddr,
        /// Pod name reported in responses (default SERVICE-VERSION).
        #[arg(long)]
        pod: Option<String>,
        /// The pod's sidecar outbound listener (POD_IP:15001); outbound calls go through it.
        #[arg(long)]
        sidecar: Option<SocketAddr>,
        /// Call services by name (`SERVICE:PORT`) instead of through --sidecar: the pod's
        /// traffic capture (iptables, `meshbench capture-rules`) takes the calls to the sidecar.
        #[arg(long, conflicts_with = "sidecar")]
        direct: bool,
        /// A call per request: HOST:PORT[;timeout=D][;attempts=N][;path=P] (repeatable;
        /// default: what bookinfo's real app of this service and version calls).
        #[arg(long = "call", value_parser = workload::Call::parse)]
        calls: Vec<workload::Call>,
        /// Call nothing (instead of bookinfo's default calls).
        #[arg(long, conflicts_with = "calls")]
        no_calls: bool,
        /// Calls one after the other (as bookinfo's apps) or all at once.
        #[arg(long, value_enum, default_value_t = workload::CallMode::Sequential)]
        mode: workload::CallMode,
        /// A failed call degrades the answer (200, named in x-meshbench-degraded) or fails it (502).
        #[arg(long, value_enum, default_value_t = workload::OnFailure::Degrade)]
        on_failure: workload::OnFailure,
        /// Fixed latency added to every response.
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        latency: Duration,
        /// Uniform extra latency in [0, JITTER).
        #[arg(long, default_value = "0", value_parser = parse_duration)]
        jitter: Duration,
        /// Padding bytes in each response body.
        #[arg(long, default_value_t = 0)]
        response_size: usize,
        /// Fraction of requests answered with --error-status (0..1).
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        #[arg(long, default_value_t = 500)]
        error_status: u16,
        /// Control listener (PUT /behaviour); needs MESHBENCH_CONTROL_TOKEN as its bearer token.
        #[arg(long)]
        control: Option<SocketAddr>,
    },
    /// Runs a scenario: stands up the mesh, drives its steps, writes report.json, charts and
    /// report.html (default reports/<scenario>/<run-id>/).
    Run {
        scenario: PathBuf,
        #[arg(long, value_enum)]
        backend: Option<BackendArg>,
        #[arg(long, value_enum)]
        proxy: Option<ProxyArg>,
        /// Mutual TLS between the sidecars, overriding the scenario's `mesh.mtls`.
        #[arg(long, value_enum)]
        mtls: Option<MtlsArg>,
        /// How apps reach their sidecars, overriding the scenario's `mesh.capture`: explicit,
        /// or iptables (Istio's capture; docker backend, run as root).
        #[arg(long, value_enum)]
        capture: Option<CaptureArg>,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Shorten every duration (for CI).
        #[arg(long)]
        quick: bool,
        /// Docker backend: leave the run's containers and network for debugging
        /// (`meshbench down` removes them).
        #[arg(long)]
        keep: bool,
    },
    /// Capacity planning: an endpoint churn for every point of a matrix (proxies x endpoints x
    /// churn rate x debounce x ADS method), each against a fresh pilot; writes sweep.json,
    /// sweep.md (table and fitted cost model) and SVG curves (default reports/sweep/<name>/<id>/).
    Sweep {
        sweep: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// A tenth of the proxies and endpoints, half the time (for CI).
        #[arg(long)]
        quick: bool,
    },
    /// Removes the containers and networks a docker-backend run left (labelled meshbench.run).
    Down {
        /// The run id (the report directory's name).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        run: Option<String>,
        /// Every run's leftovers.
        #[arg(long)]
        all: bool,
    },
    /// A pod's infra container: holds the network namespace and waits for a signal.
    #[command(hide = true)]
    Pause,
    /// Tries one TCP connection: exit 0 when it connects within the timeout, 1 when not (the
    /// docker backend runs it inside a pod to show what the pod can reach).
    #[command(hide = true)]
    Netcheck {
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "1s", value_parser = parse_debounce)]
        timeout: Duration,
    },
    /// Compares a report with a baseline; exit 1 on a regression beyond tolerance.
    Gate {
        #[arg(long)]
        baseline: PathBuf,
        #[arg(long)]
        current: PathBuf,
        /// METRIC=PCT (throughput, latency_p50, latency_p99, error_rate (points), propagation_ack_p99).
        #[arg(long = "tolerance", value_parser = parse_tolerance)]
        tolerances: Vec<(String, f64)>,
    },
    /// Re-renders charts and report.html from a report.json.
    Report {
        report: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks: `bench proxy` compares direct, meshbench proxy and Envoy in one run.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Prints an Envoy bootstrap (JSON) that makes Envoy a meshbench sidecar of a pod.
    Bootstrap {
        /// Pod IP: listeners bind here; the node id carries it.
        #[arg(long)]
        pod_ip: String,
        #[arg(long)]
        pod_name: String,
        #[arg(long, default_value = model::DEFAULT_NAMESPACE)]
        namespace: String,
        /// node.cluster: the app's service name.
        #[arg(long)]
        service: String,
        /// Pod labels, sent as node.metadata.LABELS (repeatable k=v).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Pod-local address the app listens on (inbound cluster endpoint).
        #[arg(long, default_value = xds::node::DEFAULT_APP_IP)]
        app_ip: String,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        #[arg(long, default_value = pilot::DEFAULT_XDS_ADDR)]
        xds: SocketAddr,
        /// ADS method: sotw (GRPC) or delta (DELTA_GRPC).
        #[arg(long, value_enum, default_value = "sotw")]
        xds_mode: XdsModeArg,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The load generator on its own, as wrk is used: closed loop over N keep-alive HTTP/1.1
    /// connections (or a fixed rate with --rate); prints the result as JSON.
    Load {
        /// Target address (IP:PORT).
        target: SocketAddr,
        #[arg(short = 'c', long, default_value_t = 16)]
        connections: usize,
        #[arg(short = 'd', long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Requests per second (open loop); closed loop when absent.
        #[arg(long)]
        rate: Option<f64>,
        /// Host header.
        #[arg(long, default_value = "upstream:9080")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// Direct vs meshbench proxy vs Envoy (same upstream, same worker count, HTTP/1.1
    /// keep-alive): closed loop at 16 and 64 connections and a fixed-rate run.
    Proxy {
        /// JSON output; the SVG chart is written beside it.
        #[arg(long, default_value = "reports/bench/proxy.json")]
        out: PathBuf,
        /// Length of each measured run.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// Requests per second of the fixed-rate case.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Worker threads for both proxies.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Short runs (1 s each) for smoke tests.
        #[arg(long)]
        quick: bool,
        /// Also sidecar -> sidecar, plaintext vs mutual TLS, pooled and with a new
        /// connection per request (the handshake's cost).
        #[arg(long)]
        mtls: bool,
    },
    /// What tenant scoping saves: N services in T tenant namespaces and P simulated proxies,
    /// with no scoping and with a Sidecar per tenant, SotW and delta (a fresh pilot each):
    /// initial bytes per proxy, bytes and proxies touched per service add and endpoint add,
    /// pilot CPU per change and peak RSS, real sidecars' RSS. Writes scoping.json and .md.
    Scoping {
        #[arg(long, default_value = "reports/bench/scoping")]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        services: usize,
        #[arg(long, default_value_t = 10)]
        tenants: usize,
        /// Endpoints per service.
        #[arg(long, default_value_t = 2)]
        endpoints: usize,
        #[arg(long, default_value_t = 1000)]
        proxies: usize,
        /// Service adds and endpoint adds measured per case.
        #[arg(long, default_value_t = 5)]
        changes: usize,
        /// A tenth of the services and proxies, two changes (a smoke test).
        #[arg(long)]
        quick: bool,
    },
    /// The generator against wrk on a simple origin (a workload, no proxy), alternating runs;
    /// exit 1 unless the medians agree: p50 and p99 within --tolerance percent, CPU per
    /// request at most --tolerance percent above wrk's. Needs wrk.
    Generator {
        /// JSON output.
        #[arg(long, default_value = "reports/bench/generator.json")]
        out: PathBuf,
        /// Length of each run.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
        /// Runs per client and connection count.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Percent.
        #[arg(long, default_value_t = 20.0)]
        tolerance: f64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BackendArg {
    Local,
    Docker,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AgentProxyArg {
    Envoy,
    Meshbench,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum XdsModeArg {
    Sotw,
    Delta,
}

impl From<XdsModeArg> for xds::XdsMode {
    fn from(m: XdsModeArg) -> Self {
        match m {
            XdsModeArg::Sotw => xds::XdsMode::Sotw,
            XdsModeArg::Delta => xds::XdsMode::Delta,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MtlsArg {
    Off,
    Permissive,
    Strict,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CaptureArg {
    Explicit,
    Iptables,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProxyArg {
    Meshbench,
    Envoy,
}

fn parse_tolerance(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not METRIC=PCT"))?;
    if !meshbench::gate::default_tolerances().contains_key(k) {
        return Err(format!(
            "unknown metric {k:?}; one of {:?}",
            meshbench::gate::default_tolerances()
                .keys()
                .collect::<Vec<_>>()
        ));
    }
    Ok((
        k.to_string(),
        v.trim_end_matches('%')
            .parse()
            .map_err(|_| format!("{v:?} is not a number"))?,
    ))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    model::parse_duration(s)
}

fn parse_debounce(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    // A change must reach the proxies within minutes (Istio's default maximum is 10 s).
    let max = meshbench::xds::debounce::MAX_DEBOUNCE;
    if d > max {
        return Err(format!("{s} is longer than {}s", max.as_secs()));
    }
    Ok(d)
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not k=v"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The proxy's main thread (xDS, admin, accept) is a single-threaded runtime; its workers
    // have their own (proxy::workers), like Envoy's event loops: no cross-thread wake-ups on
    // the request path. Fake workloads are small pods: one thread each, leaving the cores to
    // what is measured.
    let mut builder = match &cli.command {
        Command::Proxy { .. }
        | Command::Workload { .. }
        | Command::Pause
        | Command::CaptureRules { .. }
        | Command::Agent { .. }
        | Command::Netcheck { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ENVIRONMENT);
        }
    };
    rt.block_on(run(cli.command))
}

async fn run(cmd: Command) -> ExitCode {
    let (trigger, stop) = shutdown::channel();
    shutdown::on_signals(trigger);
    match cmd {
        Command::Pilot {
            xds_addr,
            api_addr,
            xds_tls_addr,
            config,
            debounce,
            debounce_max,
            full_push,
            strict_references,
            cert_ttl,
            api_token_file,
            trusted_peers,
        } => {
            let (xds, api) = match tokio::try_join!(pilot::bind(xds_addr), pilot::bind(api_addr)) {
                Ok(l) => l,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            let port = api.local_addr().map_or(api_addr.port(), |a| a.port());
            let file = api_token_file.unwrap_or_else(|| pilot::default_token_file(port));
            let token = match pilot::api_token(&file) {
                Ok((token, Some(f))) => {
                    eprintln!(
                        "meshbench pilot: REST writes need \"Authorization: Bearer {token}\" (the token is in {})",
                        f.display()
                    );
                    token
                }
                Ok((token, None)) => token,
                Err(e) => {
                    return fail(
                        EXIT_ENVIRONMENT,
                        &format!("cannot write the API token to {}: {e}", file.display()),
                    )
                }
            };
            let cfg = pilot::Config {
                config_files: config,
                debounce,
                debounce_max,
                full_push,
                strict_references,
                api_token: Some(token),
                trusted_peers,
                cert_ttl,
                ca_key: std::env::var(pilot::CA_KEY_ENV)
                    .ok()
                    .filter(|k| !k.is_empty()),
            };
            let xds_tls = match xds_tls_addr {
                Some(a) => match pilot::bind(a).await {
                    Ok(l) => Some(l),
                    Err(e) => return fail(EXIT_ENVIRONMENT, &e),
                },
                None => None,
            };
            match pilot::run(cfg, xds, api, xds_tls, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ pilot::Error::Config(_)) => fail(EXIT_BAD_INPUT, &e),
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Proxy {
            xds,
            node_id,
            bootstrap,
            admin,
            labels,
            cluster,
            app_ip,
            concurrency,
            xds_mode,
            capture,
            xds_cert,
            xds_key,
            xds_ca,
        } => {
            let workers = concurrency.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            );
            if let Some(path) = bootstrap {
                let cfg = match proxy::config_from_bootstrap(&path, workers) {
                    Ok(c) => c,
                    Err(e) => return fail(EXIT_BAD_INPUT, &e),
                };
                let sock = match pilot::bind(cfg.admin).await {
                    Ok(l) => l,
                    Err(e) => return fail(EXIT_ENVIRONMENT, &e),
                };
                return match proxy::run_with_bootstrap(cfg, sock, stop, Some(path)).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => fail(EXIT_ENVIRONMENT, &e),
                };
            }
            let (Some(xds), Some(node_id)) = (xds, node_id) else {
                return fail(
                    EXIT_BAD_INPUT,
                    &"--xds and --node-id are required without --bootstrap",
                );
            };
            let xds_tls = match (xds_cert, xds_key, xds_ca) {
                (Some(c), Some(k), Some(a)) => {
                    let read = |p: &PathBuf| {
                        std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
                    };
                    match (read(&c), read(&k), read(&a)) {
                        (Ok(chain_pem), Ok(key_pem), Ok(roots_pem)) => {
                            Some(meshbench::security::Material {
                                chain_pem,
                                key_pem,
                                roots_pem,
                            })
                        }
                        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => {
                            return fail(EXIT_BAD_INPUT, &e)
                        }
                    }
                }
                // The harness hands the PEM over in the environment.
                _ => xds_tls_from_env(),
            };
            let labels: model::Labels = labels.into_iter().collect();
            let admin = admin.unwrap_or_else(|| proxy::default_admin(&node_id));
            let cluster = cluster
                .or_else(|| labels.get("app").cloned())
                .unwrap_or_default();
            let sock = match pilot::bind(admin).await {
                Ok(l) => l,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            let cfg = proxy::Config {
                xds,
                node_id,
                cluster,
                labels,
                app_ip,
                admin,
                xds_mode: xds_mode.into(),
                admin_token: std::env::var(proxy::admin::ADMIN_TOKEN_ENV)
                    .ok()
                    .filter(|t| !t.is_empty()),
                workers,
                xds_tls,
                capture,
            };
            match proxy::run(cfg, sock, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Agent {
            proxy: kind,
            envoy,
            xds,
            pod_ip,
            pod,
            namespace,
            labels,
            service,
            app_ip,
            capture,
            router,
            admin,
            readiness,
            drain,
            dir,
            proxy_uid,
            xds_cert,
            xds_key,
            xds_ca,
            xds_mode,
            concurrency,
        } => {
            let kind = match kind {
                AgentProxyArg::Envoy => match envoy.or_else(xds::bootstrap::find_envoy) {
                    Some(p) => meshbench::agent::Kind::Envoy(p),
                    None => return fail(
                        EXIT_ENVIRONMENT,
                        &"Envoy not found: set MESHBENCH_ENVOY, put envoy on PATH or give --envoy",
                    ),
                },
                AgentProxyArg::Meshbench => match std::env::current_exe() {
                    Ok(p) => meshbench::agent::Kind::Meshbench(p),
                    Err(e) => return fail(EXIT_ENVIRONMENT, &e),
                },
            };
            let ip: std::net::IpAddr = match pod_ip.parse() {
                Ok(ip) => ip,
                Err(_) => {
                    return fail(
                        EXIT_BAD_INPUT,
                        &format!("--pod-ip {pod_ip:?} is not an IP address"),
                    )
                }
            };
            let labels: model::Labels = labels.into_iter().collect();
            let readiness =
                readiness.unwrap_or_else(|| SocketAddr::new(ip, meshbench::agent::READINESS_PORT));
            let bootstrap = xds::bootstrap::EnvoyBootstrap {
                pod_ip: pod_ip.clone(),
                pod_name: pod,
                namespace,
                service: service
                    .or_else(|| labels.get("app").cloned())
                    .unwrap_or_default(),
                labels,
                app_ip,
                admin: admin.unwrap_or_else(|| SocketAddr::new(ip, proxy::DEFAULT_ADMIN_PORT)),
                xds,
                xds_mode: xds_mode.into(),
                router,
                capture,
            };
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            let cfg = meshbench::agent::Config {
                kind,
                bootstrap,
                tls: match (xds_cert, xds_key, xds_ca) {
                    (Some(c), Some(k), Some(a)) => Some(meshbench::agent::Tls::Files([c, k, a])),
                    _ => xds_tls_from_env().map(meshbench::agent::Tls::Inline),
                },
                dir,
                drain,
                uid: proxy_uid
                    .or(root.then_some(meshbench::capture::PROXY_UID))
                    .filter(|u| *u != 0 || !root),
                concurrency,
            };
            let sock = match pilot::bind(readiness).await {
                Ok(l) => l,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            match meshbench::agent::run(cfg, sock, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::CaptureRules {
            exclude_inbound,
            exclude_outbound,
        } => {
            print!(
                "{}",
                meshbench::capture::Rules {
                    exclude_inbound,
                    exclude_outbound,
                }
                .render()
            );
            ExitCode::SUCCESS
        }
        Command::Workload {
            service,
            version,
            addr,
            pod,
            sidecar,
            direct,
            calls,
            no_calls,
            mode,
            on_failure,
            latency,
            jitter,
            response_size,
            error_rate,
            error_status,
            control,
        } => {
            let listener = match pilot::bind(addr).await {
                Ok(l) => l,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            let calls = if calls.is_empty() && !no_calls {
                workload::bookinfo_calls(&service, &version)
            } else {
                calls
            };
            let behaviour = workload::Behaviour {
                latency,
                jitter,
                response_size,
                error_rate,
                error_status,
                calls,
                mode,
                on_failure,
            };
            if let Err(e) = behaviour.check() {
                return fail(EXIT_BAD_INPUT, &e);
            }
            let control_token = std::env::var(workload::CONTROL_TOKEN_ENV).unwrap_or_default();
            if control.is_some() && control_token.is_empty() {
                return fail(
                    EXIT_BAD_INPUT,
                    &format!("--control needs {}", workload::CONTROL_TOKEN_ENV),
                );
            }
            let pod = pod.unwrap_or_else(|| format!("{service}-{version}"));
            let cfg = workload::Config {
                service,
                version,
                pod,
                sidecar,
                direct,
                behaviour,
                control,
                control_token,
            };
            match workload::run(cfg, listener, stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Run {
            scenario,
            backend,
            proxy,
            mtls,
            capture,
            out,
            quick,
            keep,
        } => {
            let sc = match meshbench::scenario::Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => return fail(EXIT_BAD_INPUT, &e),
            };
            let Ok(exe) = std::env::current_exe() else {
                return fail(EXIT_ENVIRONMENT, &"cannot find the meshbench executable");
            };
            let opts = meshbench::run::RunOptions {
                backend: backend.map(|b| match b {
                    BackendArg::Local => meshbench::scenario::BackendKind::Local,
                    BackendArg::Docker => meshbench::scenario::BackendKind::Docker,
                }),
                proxy: proxy.map(|p| match p {
                    ProxyArg::Meshbench => meshbench::scenario::ProxyKind::Meshbench,
                    ProxyArg::Envoy => meshbench::scenario::ProxyKind::Envoy,
                }),
                mtls: mtls.map(|m| match m {
                    MtlsArg::Off => meshbench::scenario::MtlsSetting::Off,
                    MtlsArg::Permissive => meshbench::scenario::MtlsSetting::Permissive,
                    MtlsArg::Strict => meshbench::scenario::MtlsSetting::Strict,
                }),
                capture: capture.map(|c| match c {
                    CaptureArg::Explicit => meshbench::scenario::CaptureMode::Explicit,
                    CaptureArg::Iptables => meshbench::scenario::CaptureMode::Iptables,
                }),
                out,
                quick,
                keep,
                meshbench_exe: exe,
                envoy: xds::bootstrap::find_envoy(),
            };
            match meshbench::run::run(sc, opts, stop).await {
                Ok((report, dir)) => {
                    print!("{}", meshbench::report::summary(&report));
                    println!("  report: {}", dir.join("report.html").display());
                    if report.passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(EXIT_FAILED)
                    }
                }
                Err(e @ meshbench::run::Error::BadInput(_)) => fail(EXIT_BAD_INPUT, &e),
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Down { run, all: _ } => {
            let docker = match meshbench::backend::docker::connect().await {
                Ok((d, _)) => d,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            match meshbench::backend::docker::down(&docker, run.as_deref()).await {
                Ok((containers, networks)) => {
                    println!("removed {containers} containers and {networks} networks");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Pause => {
            stop.wait().await;
            ExitCode::SUCCESS
        }
        Command::Netcheck { addr, timeout } => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_)) => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            }
        }
        Command::Sweep { sweep, out, quick } => {
            let spec = match meshbench::sweep::SweepSpec::load(&sweep) {
                Ok(s) => s,
                Err(e) => return fail(EXIT_BAD_INPUT, &e),
            };
            let Ok(exe) = std::env::current_exe() else {
                return fail(EXIT_ENVIRONMENT, &"cannot find the meshbench executable");
            };
            let opts = meshbench::sweep::SweepOptions {
                out,
                quick,
                meshbench_exe: exe,
            };
            let work = meshbench::sweep::run(spec, &sweep, opts);
            tokio::select! {
                r = work => match r {
                    Ok((report, dir)) => {
                        print!("{}", meshbench::sweep::table(&report));
                        println!("\nwrote {}", dir.display());
                        ExitCode::SUCCESS
                    }
                    Err(e @ meshbench::backend::Error::Config(_)) => fail(EXIT_BAD_INPUT, &e),
                    Err(e) => fail(EXIT_ENVIRONMENT, &e),
                },
                _ = stop.wait() => fail(EXIT_ENVIRONMENT, &"interrupted"),
            }
        }
        Command::Gate {
            baseline,
            current,
            tolerances,
        } => {
            let read = meshbench::report::Report::read;
            let (b, c) = match (read(&baseline), read(&current)) {
                (Ok(b), Ok(c)) => (b, c),
                (Err(e), _) | (_, Err(e)) => return fail(EXIT_BAD_INPUT, &e),
            };
            let mut tol = meshbench::gate::default_tolerances();
            tol.extend(tolerances);
            match meshbench::gate::compare(&b, &c, &tol) {
                Ok(rows) => {
                    print!("{}", meshbench::gate::table(&rows));
                    if rows.iter().any(|r| r.regressed) {
                        println!("gate: REGRESSED");
                        ExitCode::from(EXIT_FAILED)
                    } else {
                        println!("gate: ok");
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(EXIT_BAD_INPUT, &e),
            }
        }
        Command::Report { report, out } => {
            let r = match meshbench::report::Report::read(&report) {
                Ok(r) => r,
                Err(e) => return fail(EXIT_BAD_INPUT, &e),
            };
            let dir = out.unwrap_or_else(|| report.parent().map(PathBuf::from).unwrap_or_default());
            match meshbench::report::render(&r, &dir) {
                Ok(files) => {
                    for f in files {
                        println!("wrote {}", f.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Bench {
            what:
                BenchCommand::Generator {
                    out,
                    duration,
                    rounds,
                    tolerance,
                },
        } => {
            let Ok(exe) = std::env::current_exe() else {
                return fail(EXIT_ENVIRONMENT, &"cannot find the meshbench executable");
            };
            let cfg = meshbench::bench::GeneratorConfig {
                duration,
                rounds,
                connections: vec![16, 64],
                meshbench_exe: exe,
            };
            let report = match meshbench::bench::generator(cfg, stop).await {
                Ok(r) => r,
                Err(e) => return fail(EXIT_ENVIRONMENT, &e),
            };
            print!("{}", report.table());
            if let Err(e) = meshbench::bench::write_json(&report, &out) {
                return fail(EXIT_ENVIRONMENT, &e);
            }
            match report.check(tolerance / 100.0) {
                Ok(()) => {
                    println!("the generator agrees with wrk within {tolerance}%");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_FAILED, &e),
            }
        }
        Command::Bench {
            what:
                BenchCommand::Load {
                    target,
                    connections,
                    duration,
                    rate,
                    host,
                    path,
                },
        } => {
            let spec = meshbench::load::LoadSpec {
                target,
                host,
                path,
                connections,
                duration,
                rate,
                headers: vec![],
                http2: false,
                live: None,
            };
            let mut r = tokio::select! {
                r = meshbench::load::run(spec) => r,
                _ = stop.wait() => return ExitCode::from(EXIT_ENVIRONMENT),
            };
            r.series.clear();
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Command::Bench {
            what:
                BenchCommand::Proxy {
                    out,
                    duration,
                    rate,
                    concurrency,
                    quick,
                    mtls,
                },
        } => {
            let Ok(exe) = std::env::current_exe() else {
                return fail(EXIT_ENVIRONMENT, &"cannot find the meshbench executable");
            };
            let envoy = xds::bootstrap::find_envoy();
            if envoy.is_none() {
                eprintln!("warning: Envoy not found (set MESHBENCH_ENVOY); comparing direct and meshbench only");
            }
            let cfg = meshbench::bench::Config {
                out: out.clone(),
                duration: if quick {
                    Duration::from_secs(1)
                } else {
                    duration
                },
                warmup: if quick {
                    Duration::from_millis(300)
                } else {
                    Duration::from_secs(1)
                },
                rate,
                concurrency,
                envoy,
                nginx: meshbench::bench::find_nginx(),
                meshbench_exe: exe,
                mtls,
            };
            if cfg.nginx.is_none() {
                eprintln!("warning: nginx not found (set MESHBENCH_NGINX); no nginx reference");
            }
            match meshbench::bench::proxy(cfg, stop).await {
                Ok(report) => {
                    print!("{}", meshbench::bench::table(&report));
                    if let Err(e) = meshbench::bench::write(&report, &out) {
                        return fail(EXIT_ENVIRONMENT, &e);
                    }
                    println!("wrote {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(EXIT_ENVIRONMENT, &e),
            }
        }
        Command::Bench {
            what:
                BenchCommand::Scoping {
                    out,
                    services,
                    tenants,
                    endpoints,
                    proxies,
                    changes,
                    quick,
                },
        } => {
            let Ok(exe) = std::env::current_exe() else {
                return fail(EXIT_ENVIRONMENT, &"cannot find the meshbench executable");
            };
            if tenants == 0 || services < tenants || proxies < tenants {
                return fail(
                    EXIT_BAD_INPUT,
                    &"--tenants must be at least 1 and at most --services and --proxies",
                );
            }
            let cfg = meshbench::scoping::Config {
                services: if quick { services / 10 } else { services }.max(tenants),
                tenants,
                endpoints,
                proxies: if quick { proxies / 10 } else { proxies }.max(tenants),
                changes: if quick { 2 } else { changes.max(1) },
                meshbench_exe: exe,
                envoy: xds::bootstrap::find_envoy(),
                out: out.clone(),
            };
            let work = meshbench::scoping::run(cfg, |m| eprintln!("meshbench: bench scoping: {m}"));
            tokio::select! {
                r = work => match r {
                    Ok(report) => {
                        print!("{}", meshbench::scoping::table(&report));
                        println!("wrote {}", out.join("scoping.json").display());
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(EXIT_ENVIRONMENT, &e),
                },
                _ = stop.wait() => fail(EXIT_ENVIRONMENT, &"interrupted"),
            }
        }
        Command::Bootstrap {
            pod_ip,
            pod_name,
            namespace,
            service,
            labels,
            app_ip,
            admin,
            xds,
            xds_mode,
        } => {
            let b = xds::bootstrap::EnvoyBootstrap {
                pod_ip,
                pod_name,
                namespace,
                service,
                labels: labels.into_iter().collect(),
                app_ip,
                admin,
                xds,
                xds_mode: xds_mode.into(),
                router: false,
                capture: false,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&b.to_json()).expect("JSON values serialize")
            );
            ExitCode::SUCCESS
        }
    }
}

fn fail(code: u8, e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(code)
}

/// The xDS certificate the harness hands a sidecar in the environment (PEM), if any.
fn xds_tls_from_env() -> Option<meshbench::security::Material> {
    match (
        std::env::var(meshbench::backend::XDS_CERT_ENV),
        std::env::var(meshbench::backend::XDS_KEY_ENV),
        std::env::var(meshbench::backend::XDS_CA_ENV),
    ) {
        (Ok(c), Ok(k), Ok(a)) if !c.is_empty() => Some(meshbench::security::Material {
            chain_pem: c.into_bytes(),
            key_pem: k.into_bytes(),
            roots_pem: a.into_bytes(),
        }),
        _ => None,
    }
}
