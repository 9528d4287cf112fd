//! Pilot's REST API contract: the paths and every request and response body, as types. Pilot
//! serialises exactly these and the harness (`pilot_client`) deserialises exactly these, so
//! the two cannot drift apart; docs/contracts.md lists them for people.

use serde::{Deserialize, Serialize};

pub use crate::model::ConfigError;
use crate::model::Workload;
pub use crate::xds::ads::ledger::{Nack, ProxyStatus, TypeStatus, VersionTimes};

/// `POST`: YAML or JSON, multi-document; `?source=NAME` names it in errors.
pub const APPLY: &str = "/v1/apply";
/// `POST` an [`EndpointBatch`].
pub const ENDPOINTS: &str = "/v1/endpoints";
/// `GET`: `Vec<ProxyStatus>`; `?exclude_namespace=NS` leaves a namespace's proxies out.
pub const PROXIES: &str = "/v1/proxies";
/// `GET`: the stored config; `DELETE /v1/config/{kind}/{namespace}/{name}`: one object.
pub const CONFIG: &str = "/v1/config";
/// `GET`: Prometheus text.
pub const METRICS: &str = "/metrics";
/// `GET`: [`Health`].
pub const HEALTH: &str = "/healthz";
/// `POST` a [`CertificateRequest`]: a workload certificate from pilot's CA ([`Certificate`]),
/// for callers that hold the REST token (the harness's readiness prober, tools).
pub const CERTIFICATES: &str = "/v1/certificates";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CertificateRequest {
    pub namespace: String,
    pub service_account: String,
}

/// A certificate for `spiffe`, its key, and the root to trust (PEM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    pub spiffe: String,
    pub chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
    pub not_after_ms: f64,
}

/// Answer to an accepted `POST /v1/apply`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The config version this batch produced.
    pub version: u64,
    /// When it was accepted (wall clock ms): the start of every propagation measurement.
    pub accepted_at_ms: Option<f64>,
    /// `Kind/namespace/name` of every object in the batch.
    pub applied: Vec<String>,
    /// What was accepted but is not acted on.
    pub warnings: Vec<ConfigError>,
}

/// Answer to an accepted `POST /v1/endpoints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointsApplied {
    pub version: u64,
    pub accepted_at_ms: Option<f64>,
}

/// Answer to a `DELETE /v1/config/...` that removed an object.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub version: u64,
    pub deleted: String,
}

/// `GET /healthz`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    /// The latest accepted config version.
    pub version: u64,
}

/// Every refusal: 400 (invalid input), 404, 409 (a delete others depend on). Errors that are
/// not about a config document carry only `message`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Errors {
    pub errors: Vec<ConfigError>,
}

impl Errors {
    pub fn message(message: impl Into<String>) -> Errors {
        Errors {
            errors: vec![ConfigError {
                message: message.into(),
                ..Default::default()
            }],
        }
    }
}

/// `POST /v1/endpoints`: one batch, checked whole before anything changes.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointBatch {
    #[serde(default)]
    pub add: Vec<Workload>,
    #[serde(default)]
    pub update: Vec<Workload>,
    #[serde(default)]
    pub remove: Vec<EndpointRef>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointRef {
    #[serde(default = "crate::model::default_namespace")]
    pub namespace: String,
    pub name: String,
}

/// An endpoint as a batch may give it: every field `Workload` reads, and no other (a typo
/// such as `adress` is an error, not a silently defaulted field).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only to check the shape
struct StrictEndpoint {
    name: String,
    namespace: Option<String>,
    address: String,
    labels: Option<std::collections::BTreeMap<String, String>>,
    ports: Option<std::collections::BTreeMap<String, u16>>,
    weight: Option<u32>,
    healthy: Option<bool>,
    #[serde(rename = "serviceAccount", alias = "service_account")]
    service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only to check the shape
struct StrictBatch {
    #[serde(default)]
    add: Vec<StrictEndpoint>,
    #[serde(default)]
    update: Vec<StrictEndpoint>,
    #[serde(default)]
    remove: Vec<EndpointRef>,
}

/// Parses a `POST /v1/endpoints` body strictly; the error names the field path.
pub fn parse_batch(body: &[u8]) -> Result<EndpointBatch, String> {
    let strict = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize::<_, StrictBatch>(strict)
        .map_err(|e| format!("invalid endpoint batch at {}: {}", e.path(), e.inner()))?;
    serde_json::from_slice(body).map_err(|e| format!("invalid endpoint batch: {e}"))
}
