//! Where a scenario's mesh runs. `local` (the default) runs pilot, every pod's workload and
//! sidecar as child processes of this binary, each pod on its own loopback addresses. Docker
//! comes as its own backend.

pub mod local;

use std::path::PathBuf;

use crate::scenario::ProxyKind;

/// What a backend needs to start a mesh.
#[derive(Clone, Debug)]
pub struct Options {
    pub proxy: ProxyKind,
    pub debounce: std::time::Duration,
    pub meshbench_exe: PathBuf,
    pub envoy: Option<PathBuf>,
    /// Where processes write their logs.
    pub log_dir: PathBuf,
    /// Marks every process of the run (in its environment).
    pub run_id: String,
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
