//! meshbench: a service mesh on one machine (control plane, sidecars, fake workloads) and the
//! harness that measures it. See ARCHITECTURE.md for processes, ports and data flow.

pub mod agent;
pub mod backend;
pub mod bench;
pub mod capture;
pub mod churn;
pub mod clock;
pub mod config;
pub mod gate;
pub mod launch;
pub mod load;
pub mod measure;
pub mod model;
pub mod net;
pub mod pilot;
pub mod pilot_client;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod scoping;
pub mod security;
pub mod shutdown;
pub mod sim;
pub mod sweep;
pub mod workload;
pub mod xds;
