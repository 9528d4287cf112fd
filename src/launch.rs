//! Child processes of the harness, started one way: killed when dropped (normal end, error,
//! Ctrl-C) and, through PR_SET_PDEATHSIG, when this process dies without dropping them; each
//! carries the run id in [`RUN_ENV`]. [`PilotProcess`] is the one way a pilot process is
//! started, by the local backend, `meshbench sweep`, `meshbench bench` and the tests alike; its
//! arguments ([`PilotArgs`]) also make the docker backend's pilot container.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::pilot_client::Error;

/// Environment variable every child carries: the run id (tests look for leftovers by it).
pub const RUN_ENV: &str = "MESHBENCH_RUN";
/// How long pilot may take to answer on its REST port after starting.
pub const PILOT_START_LIMIT: Duration = Duration::from_secs(20);

/// A command whose child dies with this process (`kill_on_drop` covers the orderly paths).
pub fn command(program: &Path, run_id: &str) -> Command {
    let mut c = Command::new(program);
    c.kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
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

/// `dir/NAME.log` for a child's stderr (discarded when it cannot be created).
pub fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::File::create(dir.join(format!("{name}.log")))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// A started child; killed and reaped when dropped, so not even a zombie outlives it.
#[derive(Debug)]
pub struct Process {
    child: Child,
}

impl Process {
    pub fn spawn(mut c: Command, what: &str) -> Result<Process, Error> {
        c.spawn()
            .map(|child| Process { child })
            .map_err(|e| Error::Environment(format!("cannot start {what}: {e}")))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills and reaps it now.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends `sig` (SIGSTOP, SIGCONT) while it runs.
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on a child this handle owns and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !matches!(self.child.try_wait(), Ok(Some(_)) | Err(_))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// `meshbench pilot`'s command line.
#[derive(Clone, Debug)]
pub struct PilotArgs {
    pub xds: SocketAddr,
    pub api: SocketAddr,
    pub debounce: Duration,
    pub full_push: bool,
    pub config_files: Vec<PathBuf>,
    /// The REST token, handed over in the environment (not on the command line, where `ps`
    /// shows it).
    pub token: String,
    /// `--trusted-peer` addresses.
    pub trusted_peers: Vec<std::net::IpAddr>,
    /// The CA's private key (PEM), in the environment: pilots started with the same key
    /// share one root, so a restart keeps every issued certificate valid.
    pub ca_key: Option<String>,
    /// `--xds-tls-addr`: ADS over mutual TLS too.
    pub xds_tls: Option<SocketAddr>,
}

impl PilotArgs {
    pub fn new(xds: SocketAddr, api: SocketAddr) -> PilotArgs {
        PilotArgs {
            xds,
            api,
            debounce: crate::pilot::DEFAULT_DEBOUNCE,
            full_push: false,
            config_files: vec![],
            token: crate::pilot::new_token(),
            trusted_peers: vec![],
            ca_key: None,
            xds_tls: None,
        }
    }

    /// The environment pilot needs besides its arguments.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![(crate::pilot::TOKEN_ENV.to_string(), self.token.clone())];
        if let Some(k) = &self.ca_key {
            env.push((crate::pilot::CA_KEY_ENV.to_string(), k.clone()));
        }
        env
    }

    /// The arguments after the program name.
    pub fn to_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "pilot".to_string(),
            "--xds-addr".into(),
            self.xds.to_string(),
            "--api-addr".into(),
            self.api.to_string(),
            "--debounce".into(),
            format!("{}ms", self.debounce.as_millis()),
        ]
        .into();
        if self.full_push {
            a.push("--full-push".into());
        }
        for f in &self.config_files {
            a.push("--config".into());
            a.push(f.display().to_string());
        }
        for p in &self.trusted_peers {
            a.push("--trusted-peer".into());
            a.push(p.to_string());
        }
        if let Some(t) = self.xds_tls {
            a.push("--xds-tls-addr".into());
            a.push(t.to_string());
        }
        a
    }
}

/// A pilot child process, up once its REST port answers.
#[derive(Debug)]
pub struct PilotProcess {
    pub process: Process,
    pub xds: SocketAddr,
    pub api: SocketAddr,
    /// Its REST token.
    pub token: String,
}

impl PilotProcess {
    /// Starts `exe pilot ...` with stderr to `log` and waits until its REST port answers.
    pub async fn start(
        exe: &Path,
        args: &PilotArgs,
        run_id: &str,
        log: Stdio,
    ) -> Result<PilotProcess, Error> {
        let mut c = command(exe, run_id);
        c.args(args.to_args()).envs(args.env()).stderr(log);
        let process = Process::spawn(c, "pilot")?;
        wait_tcp(args.api, PILOT_START_LIMIT).await.map_err(|_| {
            Error::Environment(format!(
                "pilot did not answer on {} within {PILOT_START_LIMIT:?}",
                args.api
            ))
        })?;
        Ok(PilotProcess {
            process,
            xds: args.xds,
            api: args.api,
            token: args.token.clone(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
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
