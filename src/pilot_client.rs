//! Pilot's REST API from the harness's side: a small HTTP/1 client with timeouts, and
//! [`PilotApi`], whose every answer is one of the types pilot serialises (`pilot::api`). Used
//! by the runner, the backends, churn, sweep and the tests; nothing reads pilot's JSON by key.
//!
//! [`PilotApi`] remembers what it applied, so a restarted control plane can be given it again
//! (pilot keeps config in memory, as a fresh istiod re-reads it from the API server).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::de::DeserializeOwned;

use crate::model::Workload;
use crate::pilot::api::{
    self, Applied, EndpointBatch, EndpointRef, EndpointsApplied, Errors, Health, ProxyStatus,
};

/// What went wrong talking to the mesh; the runner maps these to exit codes 3 and 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unreachable, timed out, not the answer expected: exit code 3.
    #[error("{0}")]
    Environment(String),
    /// The mesh refused the scenario's config: exit code 2.
    #[error("{0}")]
    Config(String),
}

/// Default limit on one whole exchange (connect, send, read the answer). Large applies (10k
/// endpoints) take well under a second; a pilot that needs longer is stuck.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit on establishing the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A tiny HTTP/1 client: one request per connection, bounded in time.
#[derive(Clone, Copy, Debug)]
pub struct HttpClient {
    pub timeout: Duration,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            timeout: REQUEST_TIMEOUT,
        }
    }
}

impl HttpClient {
    /// One request on a fresh connection.
    pub async fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Reply, Error> {
        let err = |e: String| Error::Environment(format!("HTTP {method} {path} to {addr}: {e}"));
        let exchange = async {
            let stream =
                tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                    .map_err(|_| "connect timed out".to_string())?
                    .map_err(|e| e.to_string())?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", addr.to_string());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
                .map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| err(format!("no answer within {:?}", self.timeout)))?
            .map_err(err)
    }

    /// A request whose 200 answer is JSON of type `T`; any other status is returned with its
    /// [`Errors`] body.
    pub async fn json<T: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Result<T, (u16, Errors)>, Error> {
        let r = self.request(addr, method, path, headers, body).await?;
        if r.status == 200 {
            serde_json::from_slice(&r.body).map(Ok).map_err(|e| {
                Error::Environment(format!(
                    "{method} {path} on {addr}: unexpected answer ({e}): {}",
                    String::from_utf8_lossy(&r.body)
                ))
            })
        } else {
            let errors = serde_json::from_slice(&r.body)
                .unwrap_or_else(|_| Errors::message(String::from_utf8_lossy(&r.body).into_owned()));
            Ok(Err((r.status, errors)))
        }
    }
}

/// Pilot's REST API, typed.
#[derive(Clone, Debug)]
pub struct PilotApi {
    pub addr: SocketAddr,
    http: HttpClient,
    /// `Authorization` value for writes (`Bearer TOKEN`).
    auth: Option<String>,
    applied: Vec<(String, String)>,
}

fn refused(what: &str, status: u16, e: &Errors) -> Error {
    let lines: Vec<String> = e.errors.iter().map(|e| e.to_string()).collect();
    Error::Config(format!(
        "pilot refused {what} ({status}):\n  {}",
        lines.join("\n  ")
    ))
}

impl PilotApi {
    pub fn new(addr: SocketAddr) -> PilotApi {
        PilotApi {
            addr,
            http: HttpClient::default(),
            auth: None,
            applied: vec![],
        }
    }

    /// Sends `token` with every write (pilot's `--api-token-file` / `MESHBENCH_API_TOKEN`).
    pub fn with_token(mut self, token: Option<&str>) -> PilotApi {
        self.auth = token.map(|t| format!("Bearer {t}"));
        self
    }

    fn write_headers(&self) -> Vec<(&str, &str)> {
        self.auth
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect()
    }

    /// Applies one file's text (named by `source` in errors).
    pub async fn apply(&mut self, source: &str, text: &str) -> Result<Applied, Error> {
        let name = Path::new(source)
            .file_name()
            .map_or(source.to_string(), |n| n.to_string_lossy().into_owned());
        let path = format!("{}?source={}", api::APPLY, encode_query(&name));
        match self
            .http
            .json(self.addr, "POST", &path, &self.write_headers(), text)
            .await?
        {
            Ok(a) => {
                self.applied.push((source.to_string(), text.to_string()));
                Ok(a)
            }
            Err((status, e)) => Err(refused(source, status, &e)),
        }
    }

    /// Reads and applies files, in order.
    pub async fn apply_files(&mut self, files: &[String]) -> Result<(), Error> {
        for f in files {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Error::Config(format!("cannot read {f}: {e}")))?;
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

    /// One endpoint batch.
    pub async fn endpoints(&self, batch: &EndpointBatch) -> Result<EndpointsApplied, Error> {
        let body = serde_json::to_string(batch).expect("batches serialise");
        match self
            .http
            .json(
                self.addr,
                "POST",
                api::ENDPOINTS,
                &self.write_headers(),
                &body,
            )
            .await?
        {
            Ok(a) => Ok(a),
            Err((status, e)) => Err(refused("an endpoint batch", status, &e)),
        }
    }

    /// A certificate from pilot's CA for `namespace`'s service account `sa`.
    pub async fn certificate(&self, namespace: &str, sa: &str) -> Result<api::Certificate, Error> {
        let body = serde_json::to_string(&api::CertificateRequest {
            namespace: namespace.into(),
            service_account: sa.into(),
        })
        .expect("requests serialise");
        match self
            .http
            .json(
                self.addr,
                "POST",
                api::CERTIFICATES,
                &self.write_headers(),
                &body,
            )
            .await?
        {
            Ok(c) => Ok(c),
            Err((status, e)) => Err(refused("a certificate request", status, &e)),
        }
    }

    /// Registers workloads as endpoints, as a Kubernetes endpoints controller would.
    pub async fn register(&self, add: Vec<Workload>) -> Result<EndpointsApplied, Error> {
        self.endpoints(&EndpointBatch {
            add,
            ..Default::default()
        })
        .await
    }

    /// Removes one endpoint.
    pub async fn deregister(&self, namespace: &str, name: &str) -> Result<EndpointsApplied, Error> {
        self.endpoints(&EndpointBatch {
            remove: vec![EndpointRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            }],
            ..Default::default()
        })
        .await
    }

    /// Connected proxies, leaving out those of namespace `exclude`.
    pub async fn proxies(&self, exclude: Option<&str>) -> Result<Vec<ProxyStatus>, Error> {
        let path = match exclude {
            Some(ns) => format!("{}?exclude_namespace={}", api::PROXIES, encode_query(ns)),
            None => api::PROXIES.to_string(),
        };
        self.get(&path).await
    }

    /// The latest accepted config version.
    pub async fn version(&self) -> Result<u64, Error> {
        Ok(self.get::<Health>(api::HEALTH).await?.version)
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.http
            .json(self.addr, "GET", path, &[], "")
            .await?
            .map_err(|(status, e)| {
                Error::Environment(format!("GET {path}: {status}: {:?}", e.errors))
            })
    }

    /// Pilot's push counters from `/metrics`, summed over types.
    pub async fn counters(&self) -> Result<Counters, Error> {
        let r = self
            .http
            .request(self.addr, "GET", api::METRICS, &[], "")
            .await?;
        Ok(Counters::parse(&String::from_utf8_lossy(&r.body)))
    }
}

/// Totals of pilot's xDS counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub pushes: u64,
    pub bytes: u64,
    pub snapshots: u64,
    pub nacks: u64,
}

impl Counters {
    /// Sums each counter over its label sets in Prometheus text.
    pub fn parse(text: &str) -> Counters {
        let sum = |name: &str| -> u64 {
            text.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter(|l| l[name.len()..].starts_with(['{', ' ']))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        Counters {
            pushes: sum("meshbench_pilot_xds_pushes_total"),
            bytes: sum("meshbench_pilot_xds_bytes_sent_total"),
            snapshots: sum("meshbench_pilot_snapshots_built_total"),
            nacks: sum("meshbench_pilot_xds_nacks_total"),
        }
    }

    /// `self - earlier`, per counter (0 where a restart reset it).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            pushes: self.pushes.saturating_sub(earlier.pushes),
            bytes: self.bytes.saturating_sub(earlier.bytes),
            snapshots: self.snapshots.saturating_sub(earlier.snapshots),
            nacks: self.nacks.saturating_sub(earlier.nacks),
        }
    }
}

/// Percent-encodes a query value (names of files and namespaces).
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_types_and_ignore_lookalikes() {
        let text = "# HELP meshbench_pilot_xds_pushes_total x\nmeshbench_pilot_xds_pushes_total{type=\"cds\"} 3\nmeshbench_pilot_xds_pushes_total{type=\"eds\"} 4\nmeshbench_pilot_xds_pushes_totalx 100\nmeshbench_pilot_snapshots_built_total 2\n";
        let c = Counters::parse(text);
        assert_eq!((c.pushes, c.snapshots, c.bytes), (7, 2, 0));
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode_query("a b&c.yaml"), "a%20b%26c.yaml");
    }
}
