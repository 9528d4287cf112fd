//! Parsing Kubernetes manifests and Istio resources (multi-document YAML or JSON) into model
//! [`Object`]s. Errors name the file, the document (1-based), the field path and the reason;
//! YAML syntax errors also give the line and column within the file.
//!
//! Accepted: v1 Service; apps/v1 (and the seed's extensions/v1beta1) Deployment;
//! networking.istio.io v1/v1beta1/v1alpha3 VirtualService, DestinationRule, ServiceEntry,
//! WorkloadEntry; config.istio.io/v1alpha2 RouteRule. Kinds that carry nothing for a sidecar
//! mesh (ServiceAccount, Gateway, Namespace, ...) are accepted and reported as warnings.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::model::*;

/// Deepest nesting accepted (mappings + sequences). Kubernetes and Istio objects nest about a
/// dozen levels; the bound keeps parsing, conversion and dropping far inside a thread's stack.
pub const MAX_DEPTH: usize = 64;
/// Nodes (scalars, mappings, sequences; aliases counted expanded) one input may hold across
/// all its documents: about 50 MB of parsed values at most, and 30x what applying 1,000
/// services at once needs.
pub const MAX_NODES: usize = 500_000;

/// Objects parsed from one input, plus warnings for what was accepted but not used.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub warnings: Vec<ConfigError>,
}

/// Parses `text` (YAML or JSON, one or many documents; a JSON array or a Kubernetes `List` is
/// also accepted) read from `file`. Either every document parses, or every error is returned.
pub fn parse(file: &str, text: &str) -> Result<Parsed, Vec<ConfigError>> {
    let docs = split_documents(file, text)?;
    let mut out = Parsed::default();
    let mut errors = Vec::new();
    for (document, value) in docs {
        let origin = Origin {
            file: file.to_string(),
            document,
        };
        let notes = harmless_unsupported(&origin, &value);
        match parse_object(&origin, value) {
            Ok(Some(o)) => {
                out.warnings.extend(notes.into_iter().map(|mut w| {
                    w.object = o.key().to_string();
                    w
                }));
                out.objects.push(o);
            }
            Ok(None) => {}
            Err(Outcome::Warning(w)) => out.warnings.push(w),
            Err(Outcome::Errors(e)) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads and parses a file from disk.
pub fn parse_file(path: &std::path::Path) -> Result<Parsed, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            document: 0,
            object: String::new(),
            field: String::new(),
            message: format!("cannot read file: {e}"),
        }]
    })?;
    parse(&file, &text)
}

fn doc_error(file: &str, document: usize, message: String) -> ConfigError {
    ConfigError {
        file: file.into(),
        document,
        object: String::new(),
        field: String::new(),
        message,
    }
}

/// Splits input into (document number, value) pairs. Empty documents are skipped but still
/// counted, so numbers match what an editor shows between `---` lines.
fn split_documents(file: &str, text: &str) -> Result<Vec<(usize, Value)>, Vec<ConfigError>> {
    if let Some((line, _)) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.chars().any(|c| c.is_control() && c != '\t' && c != '\r'))
    {
        return Err(vec![doc_error(
            file,
            1,
            format!(
                "line {} holds control characters: send YAML or JSON text",
                line + 1
            ),
        )]);
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| {
            vec![doc_error(
                file,
                1,
                format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )]
        })?;
        if let Err(m) = check_shape(&v, MAX_NODES) {
            return Err(vec![doc_error(file, 1, m)]);
        }
        return Ok(flatten_lists(v).into_iter().map(|v| (1, v)).collect());
    }
    // (document number, lines before the chunk's first line, text)
    let mut chunks: Vec<(usize, usize, String)> = vec![(1, 0, String::new())];
    let mut seen_anything = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("---") {
            let number = chunks.last().map_or(1, |c| c.0) + usize::from(seen_anything);
            seen_anything = true;
            // Content after `--- ` on the marker line belongs to the new document.
            let rest = line.trim_start_matches('-').trim();
            let offset = if rest.is_empty() { i + 1 } else { i };
            chunks.push((
                number,
                offset,
                if rest.is_empty() {
                    String::new()
                } else {
                    format!("{rest}\n")
                },
            ));
        } else {
            if !(line.trim().is_empty() || line.trim_start().starts_with('#')) {
                seen_anything = true;
            }
            let chunk = chunks.last_mut().expect("one chunk at least");
            chunk.2.push_str(line);
            chunk.2.push('\n');
        }
    }
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    // One budget for the whole input: documents cannot each spend a full one.
    let mut nodes_left = MAX_NODES;
    for (number, start_line, body) in chunks {
        if body
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        if nodes_left == 0 {
            errors.push(doc_error(
                file,
                number,
                format!("the input holds more than {MAX_NODES} nodes (aliases expanded); split it"),
            ));
            break;
        }
        let options = serde_saphyr::Options {
            budget: Some(serde_saphyr::Budget {
                max_depth: MAX_DEPTH,
                max_nodes: nodes_left,
                ..Default::default()
            }),
            alias_limits: serde_saphyr::options::AliasLimits {
                max_total_replayed_events: nodes_left,
                ..Default::default()
            },
            ..Default::default()
        };
        let parsed = serde_saphyr::from_str_with_options::<Value>(&body, options).and_then(|v| {
            check_shape(&v, nodes_left)
                .map(|n| (v, n))
                .map_err(serde::de::Error::custom)
        });
        let parsed = parsed.map(|(v, n)| {
            nodes_left -= n;
            v
        });
        match parsed {
            Ok(Value::Null) => errors.push(doc_error(
                file,
                number,
                "document is not a mapping (expected apiVersion, kind, metadata, spec)".into(),
            )),
            Ok(v) => docs.extend(flatten_lists(v).into_iter().map(|v| (number, v))),
            Err(e) => {
                let at = e
                    .location()
                    .map(|l| {
                        format!(
                            " at line {} column {}",
                            l.line() as usize + start_line,
                            l.column()
                        )
                    })
                    .unwrap_or_default();
                let msg = e.without_snippet().to_string();
                // A document that ran out of budget spent it: the rest of the input is not
                // read (each document would otherwise expand aliases up to the limit again).
                if msg.contains("limit exceeded")
                    || msg.contains("budget")
                    || msg.contains(&format!("more than {MAX_NODES}"))
                {
                    nodes_left = 0;
                }
                errors.push(doc_error(
                    file,
                    number,
                    format!("invalid YAML{at}: {}", msg.lines().next().unwrap_or("")),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

/// Counts `v`'s nodes without recursion; an error when there are more than `limit` or it nests
/// deeper than [`MAX_DEPTH`].
fn check_shape(v: &Value, limit: usize) -> Result<usize, String> {
    let mut stack = vec![(v, 1usize)];
    let mut nodes = 0;
    while let Some((v, depth)) = stack.pop() {
        nodes += 1;
        if nodes > limit {
            return Err(format!(
                "more than {MAX_NODES} nodes in one input (aliases expanded); split it"
            ));
        }
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|c| (c, depth + 1))),
            Value::Object(m) => stack.extend(m.values().map(|c| (c, depth + 1))),
            _ => {}
        }
    }
    Ok(nodes)
}

/// Fields meshbench accepts but does not simulate because they do not change where traffic
/// goes: mutual TLS settings and header/CORS manipulation. Reported as warnings.
fn harmless_unsupported(origin: &Origin, v: &Value) -> Vec<ConfigError> {
    let warn = |field: String, what: &str| ConfigError {
        file: origin.file.clone(),
        document: origin.document,
        object: String::new(),
        field,
        message: format!(
            "{what} is accepted but not simulated (meshbench does not model it); ignored"
        ),
    };
    let mut out = Vec::new();
    let spec = &v["spec"];
    match v["kind"].as_str() {
        Some("DestinationRule") => {
            if !spec["trafficPolicy"]["tls"].is_null() {
                out.push(warn("spec.trafficPolicy.tls".into(), "TLS settings"));
            }
            for (i, s) in spec["subsets"].as_array().into_iter().flatten().enumerate() {
                if !s["trafficPolicy"]["tls"].is_null() {
                    out.push(warn(
                        format!("spec.subsets[{i}].trafficPolicy.tls"),
                        "TLS settings",
                    ));
                }
            }
        }
        Some("VirtualService") => {
            for (i, r) in spec["http"].as_array().into_iter().flatten().enumerate() {
                for k in TOLERATED_ROUTE_FIELDS {
                    if !r[k].is_null() {
                        out.push(warn(format!("spec.http[{i}].{k}"), k));
                    }
                }
            }
        }
        _ => {}
    }
    out
}

fn flatten_lists(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        Value::Object(ref m) if m.get("kind").and_then(Value::as_str) == Some("List") => m
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        v => vec![v],
    }
}

enum Outcome {
    Warning(ConfigError),
    Errors(Vec<ConfigError>),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Meta,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Kinds users bring along with bookinfo that carry nothing a sidecar mesh needs.
const IGNORED_KINDS: [&str; 8] = [
    "ServiceAccount",
    "Gateway",
    "Namespace",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Secret",
    "PeerAuthentication",
    "Sidecar",
];

fn parse_object(origin: &Origin, value: Value) -> Result<Option<Object>, Outcome> {
    let e = |field: &str, message: String| {
        Outcome::Errors(vec![ConfigError {
            file: origin.file.clone(),
            document: origin.document,
            object: String::new(),
            field: field.into(),
            message,
        }])
    };
    if !value.is_object() {
        return Err(e(
            "",
            "a document must be a mapping with apiVersion, kind and metadata".into(),
        ));
    }
    let header: Header = typed(origin, "", value.clone()).map_err(Outcome::Errors)?;
    if header.kind.is_empty() {
        return Err(e("kind", "missing kind".into()));
    }
    let object_name = format!("{}/{}", header.kind, header.metadata.name);
    if IGNORED_KINDS.contains(&header.kind.as_str()) {
        return Err(Outcome::Warning(ConfigError {
            file: origin.file.clone(),
            document: origin.document,
            object: object_name,
            field: "kind".into(),
            message: format!("kind {} is not used by meshbench (no ingress gateways, accounts or mTLS are simulated); skipped", header.kind),
        }));
    }
    if header.metadata.name.is_empty() {
        return Err(e("metadata.name", "missing name".into()));
    }
    let api = header.api_version.as_str();
    let spec_value = value.get("spec").cloned().unwrap_or(Value::Null);
    let spec = match header.kind.as_str() {
        "Service" if api == "v1" => Spec::Service(service(origin, spec_value)?),
        "Deployment" if matches!(api, "apps/v1" | "apps/v1beta1" | "apps/v1beta2" | "extensions/v1beta1") => {
            Spec::Deployment(deployment(origin, spec_value)?)
        }
        "VirtualService" if ISTIO_NETWORKING.contains(&api) => Spec::VirtualService(virtual_service(origin, spec_value)?),
        "DestinationRule" if ISTIO_NETWORKING.contains(&api) => Spec::DestinationRule(destination_rule(origin, spec_value)?),
        "ServiceEntry" if ISTIO_NETWORKING.contains(&api) => Spec::ServiceEntry(service_entry(origin, spec_value)?),
        "WorkloadEntry" if ISTIO_NETWORKING.contains(&api) => {
            Spec::WorkloadEntry(typed(origin, "spec", spec_value).map_err(Outcome::Errors)?)
        }
        "RouteRule" if api == "config.istio.io/v1alpha2" => Spec::RouteRule(route_rule(origin, spec_value)?),
        k if Kind::parse(k).is_some() => {
            return Err(e("apiVersion", format!("apiVersion {api:?} is not supported for kind {k}")))
        }
        k => {
            return Err(e(
                "kind",
                format!("unsupported kind {k:?}: meshbench reads Service, Deployment, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry and RouteRule"),
            ))
        }
    };
    Ok(Some(Object {
        origin: origin.clone(),
        namespace: header
            .metadata
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
        name: header.metadata.name,
        spec,
    }))
}

/// Deserializes with the failing field's path in the error.
fn typed<T: DeserializeOwned>(
    origin: &Origin,
    prefix: &str,
    v: Value,
) -> Result<T, Vec<ConfigError>> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = match (prefix, path.as_str()) {
            (p, ".") => p.to_string(),
            ("", p) => p.to_string(),
            (pre, p) => format!("{pre}.{p}"),
        };
        vec![ConfigError {
            file: origin.file.clone(),
            document: origin.document,
            object: String::new(),
            field,
            message: e.into_inner().to_string(),
        }]
    })
}

fn errs(origin: &Origin, field: String, message: String) -> Outcome {
    Outcome::Errors(vec![ConfigError {
        file: origin.file.clone(),
        document: origin.document,
        object: String::new(),
        field,
        message,
    }])
}

fn duration(
    origin: &Origin,
    field: &str,
    s: &Option<String>,
) -> Result<Option<std::time::Duration>, Outcome> {
    s.as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|m| errs(origin, field.into(), m))
}

// ---- Kubernetes --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    Str(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: String,
    port: u16,
    target_port: Option<IntOrString>,
    #[serde(default)]
    protocol: Option<String>,
}

impl RawServicePort {
    fn into_model(self) -> ServicePort {
        let target_port = match self.target_port {
            Some(IntOrString::Int(n)) => TargetPort::Number(n),
            Some(IntOrString::Str(s)) => match s.parse() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s),
            },
            None => TargetPort::Number(self.port),
        };
        ServicePort {
            name: if self.name.is_empty() {
                format!("port-{}", self.port)
            } else {
                self.name
            },
            port: self.port,
            target_port,
            protocol: self.protocol.unwrap_or_else(|| "TCP".into()),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    selector: Labels,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
}

fn service(origin: &Origin, v: Value) -> Result<ServiceSpec, Outcome> {
    let raw: RawService = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    Ok(ServiceSpec {
        ports: raw
            .ports
            .into_iter()
            .map(RawServicePort::into_model)
            .collect(),
        selector: raw.selector,
        cluster_ip: raw.cluster_ip.filter(|ip| ip != "None" && !ip.is_empty()),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDeployment {
    replicas: Option<u32>,
    template: RawPodTemplate,
}
#[derive(Deserialize)]
struct RawPodTemplate {
    #[serde(default)]
    metadata: RawLabelsMeta,
    #[serde(default)]
    spec: RawPodSpec,
}
#[derive(Deserialize, Default)]
struct RawLabelsMeta {
    #[serde(default)]
    labels: Labels,
}
#[derive(Deserialize, Default)]
struct RawPodSpec {
    #[serde(default)]
    containers: Vec<RawContainer>,
}
#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    ports: Vec<RawContainerPort>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerPort {
    name: Option<String>,
    container_port: u16,
}

fn deployment(origin: &Origin, v: Value) -> Result<DeploymentSpec, Outcome> {
    let raw: RawDeployment = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    Ok(DeploymentSpec {
        replicas: raw.replicas.unwrap_or(1),
        labels: raw.template.metadata.labels,
        container_ports: raw
            .template
            .spec
            .containers
            .into_iter()
            .flat_map(|c| c.ports)
            .map(|p| (p.name, p.container_port))
            .collect(),
    })
}

// ---- Istio networking ----------------------------------------------------------------------

#[derive(Deserialize)]
struct RawStringMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

fn string_match(origin: &Origin, field: &str, m: RawStringMatch) -> Result<StringMatch, Outcome> {
    match (m.exact, m.prefix, m.regex) {
        (Some(e), None, None) => Ok(StringMatch::Exact(e)),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p)),
        (None, None, Some(r)) => Ok(StringMatch::Regex(r)),
        _ => Err(errs(
            origin,
            field.into(),
            "give exactly one of exact, prefix or regex".into(),
        )),
    }
}

#[derive(Deserialize)]
struct RawHttpMatch {
    uri: Option<RawStringMatch>,
    #[serde(default)]
    headers: BTreeMap<String, RawStringMatch>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawPortSelector {
    number: Option<u16>,
}

#[derive(Deserialize)]
struct RawDestination {
    host: String,
    subset: Option<String>,
    port: Option<RawPortSelector>,
}

#[derive(Deserialize)]
struct RawRouteDestination {
    destination: RawDestination,
    weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRetries {
    #[serde(default)]
    attempts: u32,
    per_try_timeout: Option<String>,
    retry_on: Option<String>,
}

#[derive(Deserialize)]
struct RawPercent {
    value: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDelay {
    fixed_delay: Option<String>,
    percentage: Option<RawPercent>,
    percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAbort {
    http_status: Option<u16>,
    percentage: Option<RawPercent>,
    percent: Option<f64>,
}

#[derive(Deserialize)]
struct RawFault {
    delay: Option<RawDelay>,
    abort: Option<RawAbort>,
}

/// Percentage as Istio reads it: `percentage.value`, else the deprecated integer `percent`,
/// else 100.
fn percent(p: Option<RawPercent>, old: Option<f64>) -> f64 {
    p.map(|p| p.value).or(old).unwrap_or(100.0)
}

fn fault(origin: &Origin, field: &str, f: RawFault) -> Result<Fault, Outcome> {
    let delay = match f.delay {
        Some(d) => {
            let Some(fixed) = d.fixed_delay.as_deref() else {
                return Err(errs(
                    origin,
                    format!("{field}.delay.fixedDelay"),
                    "only fixedDelay is supported".into(),
                ));
            };
            let fixed_delay = parse_duration(fixed)
                .map_err(|m| errs(origin, format!("{field}.delay.fixedDelay"), m))?;
            Some(FaultDelay {
                fixed_delay,
                percent: percent(d.percentage, d.percent),
            })
        }
        None => None,
    };
    let abort = match f.abort {
        Some(a) => {
            let Some(http_status) = a.http_status else {
                return Err(errs(
                    origin,
                    format!("{field}.abort.httpStatus"),
                    "only httpStatus aborts are supported".into(),
                ));
            };
            Some(FaultAbort {
                http_status,
                percent: percent(a.percentage, a.percent),
            })
        }
        None => None,
    };
    Ok(Fault { delay, abort })
}

#[derive(Deserialize)]
struct RawHttpRoute {
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<RawHttpMatch>,
    #[serde(default)]
    route: Vec<RawRouteDestination>,
    timeout: Option<String>,
    retries: Option<RawRetries>,
    fault: Option<RawFault>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct RawVirtualService {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<RawHttpRoute>,
    #[serde(default)]
    tcp: Vec<Value>,
    #[serde(default)]
    tls: Vec<Value>,
}

/// HTTPRoute fields meshbench does not implement change behaviour, so they are errors, not
/// silently dropped. (`headers` manipulation and `corsPolicy` do not change routing.)
const TOLERATED_ROUTE_FIELDS: [&str; 2] = ["headers", "corsPolicy"];

fn http_match(origin: &Origin, field: &str, m: RawHttpMatch) -> Result<HttpMatch, Outcome> {
    if let Some(k) = m.other.keys().next() {
        return Err(errs(
            origin,
            format!("{field}.{k}"),
            format!("match on {k} is not supported (uri and headers are)"),
        ));
    }
    let uri = m
        .uri
        .map(|u| string_match(origin, &format!("{field}.uri"), u))
        .transpose()?;
    let mut headers = BTreeMap::new();
    for (h, sm) in m.headers {
        let sm = string_match(origin, &format!("{field}.headers.{h}"), sm)?;
        headers.insert(h.to_ascii_lowercase(), sm);
    }
    Ok(HttpMatch { uri, headers })
}

fn virtual_service(origin: &Origin, v: Value) -> Result<VirtualServiceSpec, Outcome> {
    let raw: RawVirtualService = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    if !raw.tcp.is_empty() || !raw.tls.is_empty() {
        return Err(errs(
            origin,
            "spec.tcp".into(),
            "tcp and tls routes are not supported (http is)".into(),
        ));
    }
    let mut http = Vec::new();
    for (i, r) in raw.http.into_iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if let Some(k) = r
            .other
            .keys()
            .find(|k| !TOLERATED_ROUTE_FIELDS.contains(&k.as_str()))
        {
            return Err(errs(
                origin,
                format!("{field}.{k}"),
                format!("{k} is not supported by meshbench"),
            ));
        }
        let matches = r
            .matches
            .into_iter()
            .enumerate()
            .map(|(j, m)| http_match(origin, &format!("{field}.match[{j}]"), m))
            .collect::<Result<_, _>>()?;
        let retries = match r.retries {
            Some(rt) => Some(Retries {
                attempts: rt.attempts,
                per_try_timeout: duration(
                    origin,
                    &format!("{field}.retries.perTryTimeout"),
                    &rt.per_try_timeout,
                )?,
                retry_on: rt.retry_on,
            }),
            None => None,
        };
        http.push(HttpRoute {
            name: r.name,
            matches,
            route: r
                .route
                .into_iter()
                .map(|d| RouteDestination {
                    destination: Destination {
                        host: d.destination.host,
                        subset: d.destination.subset,
                        port: d.destination.port.and_then(|p| p.number),
                    },
                    weight: d.weight,
                })
                .collect(),
            timeout: duration(origin, &format!("{field}.timeout"), &r.timeout)?,
            retries,
            fault: r
                .fault
                .map(|f| fault(origin, &format!("{field}.fault"), f))
                .transpose()?,
        });
    }
    Ok(VirtualServiceSpec {
        hosts: raw.hosts,
        gateways: raw.gateways,
        http,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTrafficPolicy {
    load_balancer: Option<RawLoadBalancer>,
    connection_pool: Option<RawConnectionPool>,
    outlier_detection: Option<RawOutlier>,
}
#[derive(Deserialize)]
struct RawLoadBalancer {
    simple: Option<String>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawConnectionPool {
    #[serde(default)]
    tcp: RawTcpPool,
    #[serde(default)]
    http: RawHttpPool,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawTcpPool {
    max_connections: Option<u32>,
    connect_timeout: Option<String>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawHttpPool {
    http1_max_pending_requests: Option<u32>,
    http2_max_requests: Option<u32>,
    max_requests_per_connection: Option<u32>,
    max_retries: Option<u32>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawOutlier {
    consecutive_5xx_errors: Option<u32>,
    consecutive_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
}

fn traffic_policy(
    origin: &Origin,
    field: &str,
    v: Option<Value>,
) -> Result<Option<TrafficPolicy>, Outcome> {
    let Some(v) = v else { return Ok(None) };
    let raw: RawTrafficPolicy = typed(origin, field, v).map_err(Outcome::Errors)?;
    let load_balancer = match raw.load_balancer.and_then(|l| l.simple) {
        None => None,
        Some(s) => Some(match s.as_str() {
            "ROUND_ROBIN" => LoadBalancer::RoundRobin,
            "LEAST_CONN" | "LEAST_REQUEST" => LoadBalancer::LeastRequest,
            "RANDOM" => LoadBalancer::Random,
            other => {
                return Err(errs(
                    origin,
                    format!("{field}.loadBalancer.simple"),
                    format!(
                    "{other:?} is not supported (ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM)"
                ),
                ))
            }
        }),
    };
    let connection_pool = match raw.connection_pool {
        Some(cp) => Some(ConnectionPool {
            max_connections: cp.tcp.max_connections,
            connect_timeout: duration(
                origin,
                &format!("{field}.connectionPool.tcp.connectTimeout"),
                &cp.tcp.connect_timeout,
            )?,
            http1_max_pending_requests: cp.http.http1_max_pending_requests,
            http2_max_requests: cp.http.http2_max_requests,
            max_requests_per_connection: cp.http.max_requests_per_connection,
            max_retries: cp.http.max_retries,
        }),
        None => None,
    };
    let outlier_detection = match raw.outlier_detection {
        Some(o) => Some(OutlierDetection {
            consecutive_5xx_errors: o.consecutive_5xx_errors.or(o.consecutive_errors),
            interval: duration(
                origin,
                &format!("{field}.outlierDetection.interval"),
                &o.interval,
            )?,
            base_ejection_time: duration(
                origin,
                &format!("{field}.outlierDetection.baseEjectionTime"),
                &o.base_ejection_time,
            )?,
            max_ejection_percent: o.max_ejection_percent,
        }),
        None => None,
    };
    Ok(Some(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: Labels,
    traffic_policy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDestinationRule {
    host: String,
    #[serde(default)]
    subsets: Vec<RawSubset>,
    traffic_policy: Option<Value>,
}

fn destination_rule(origin: &Origin, v: Value) -> Result<DestinationRuleSpec, Outcome> {
    let raw: RawDestinationRule = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let mut subsets = Vec::new();
    for (i, s) in raw.subsets.into_iter().enumerate() {
        subsets.push(Subset {
            name: s.name,
            labels: s.labels,
            traffic_policy: traffic_policy(
                origin,
                &format!("spec.subsets[{i}].trafficPolicy"),
                s.traffic_policy,
            )?,
        });
    }
    Ok(DestinationRuleSpec {
        host: raw.host,
        subsets,
        traffic_policy: traffic_policy(origin, "spec.trafficPolicy", raw.traffic_policy)?,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceEntry {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServiceEntryPort>,
    #[serde(default)]
    endpoints: Vec<WorkloadEntrySpec>,
    workload_selector: Option<RawWorkloadSelector>,
    resolution: Option<String>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServiceEntryPort {
    number: u16,
    #[serde(default)]
    name: String,
    protocol: Option<String>,
    target_port: Option<u16>,
}
#[derive(Deserialize)]
struct RawWorkloadSelector {
    #[serde(default)]
    labels: Labels,
}

fn service_entry(origin: &Origin, v: Value) -> Result<ServiceEntrySpec, Outcome> {
    let raw: RawServiceEntry = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    if let Some(r) = raw.resolution.as_deref() {
        if r != "STATIC" && r != "NONE" {
            return Err(errs(
                origin,
                "spec.resolution".into(),
                format!(
                    "resolution {r} is not supported (STATIC endpoints only; no DNS is simulated)"
                ),
            ));
        }
    }
    Ok(ServiceEntrySpec {
        hosts: raw.hosts,
        addresses: raw.addresses,
        ports: raw
            .ports
            .into_iter()
            .map(|p| ServicePort {
                name: if p.name.is_empty() {
                    format!("port-{}", p.number)
                } else {
                    p.name
                },
                port: p.number,
                target_port: TargetPort::Number(p.target_port.unwrap_or(p.number)),
                protocol: p.protocol.unwrap_or_else(|| "HTTP".into()),
            })
            .collect(),
        endpoints: raw.endpoints,
        workload_selector: raw.workload_selector.map(|w| w.labels),
    })
}

// ---- The seed's RouteRule (config.istio.io/v1alpha2) ---------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRouteRule {
    destination: RawRrDestination,
    #[serde(default)]
    precedence: i32,
    #[serde(rename = "match")]
    matches: Option<RawRrMatch>,
    #[serde(default)]
    route: Vec<RawRrRoute>,
    http_req_timeout: Option<RawRrTimeout>,
    http_req_retries: Option<RawRrRetries>,
    http_fault: Option<RawFault>,
}
#[derive(Deserialize)]
struct RawRrDestination {
    name: String,
}
#[derive(Deserialize)]
struct RawRrMatch {
    request: Option<RawRrRequest>,
}
#[derive(Deserialize)]
struct RawRrRequest {
    #[serde(default)]
    headers: BTreeMap<String, RawStringMatch>,
}
#[derive(Deserialize)]
struct RawRrRoute {
    #[serde(default)]
    labels: Option<Labels>,
    weight: Option<u32>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRrTimeout {
    simple_timeout: RawRrSimpleTimeout,
}
#[derive(Deserialize)]
struct RawRrSimpleTimeout {
    timeout: String,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRrRetries {
    simple_retry: RawRrSimpleRetry,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRrSimpleRetry {
    attempts: u32,
    per_try_timeout: Option<String>,
}

fn route_rule(origin: &Origin, v: Value) -> Result<RouteRuleSpec, Outcome> {
    let raw: RawRouteRule = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let mut m = HttpMatch::default();
    if let Some(req) = raw.matches.and_then(|m| m.request) {
        for (h, sm) in req.headers {
            let field = format!("spec.match.request.headers.{h}");
            let sm = string_match(origin, &field, sm)?;
            // In v1alpha2 the pseudo-header `uri` matches the path.
            if h == "uri" {
                m.uri = Some(sm);
            } else {
                m.headers.insert(h.to_ascii_lowercase(), sm);
            }
        }
    }
    let mut route = Vec::new();
    for (i, r) in raw.route.into_iter().enumerate() {
        let Some(labels) = r.labels else {
            return Err(errs(origin, format!("spec.route[{i}].labels"), "labels must be a mapping of pod labels (check its indentation: `version: v1` belongs under `labels:`)".into()));
        };
        route.push((labels, r.weight));
    }
    let timeout = match raw.http_req_timeout {
        Some(t) => Some(parse_duration(&t.simple_timeout.timeout).map_err(|m| {
            errs(
                origin,
                "spec.httpReqTimeout.simpleTimeout.timeout".into(),
                m,
            )
        })?),
        None => None,
    };
    let retries = match raw.http_req_retries {
        Some(r) => Some(Retries {
            attempts: r.simple_retry.attempts,
            per_try_timeout: duration(
                origin,
                "spec.httpReqRetries.simpleRetry.perTryTimeout",
                &r.simple_retry.per_try_timeout,
            )?,
            retry_on: None,
        }),
        None => None,
    };
    Ok(RouteRuleSpec {
        destination: raw.destination.name,
        precedence: raw.precedence,
        matches: if m == HttpMatch::default() {
            vec![]
        } else {
            vec![m]
        },
        route,
        timeout,
        retries,
        fault: raw
            .http_fault
            .map(|f| fault(origin, "spec.httpFault", f))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_numbered_from_one() {
        let text = "---\napiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n";
        let p = parse("f.yaml", text).unwrap();
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.objects[0].origin.document, 1);
        assert_eq!(p.objects[1].origin.document, 2);
        assert_eq!(p.objects[1].name, "b");
    }

    #[test]
    fn field_path_in_type_errors() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      weight: fifty\n";
        let e = parse("vs.yaml", text).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.http[0].route[0].weight");
        assert_eq!(e[0].document, 1);
    }

    #[test]
    fn yaml_syntax_error_has_line() {
        let text = "apiVersion: v1\nkind: Service\n---\nmetadata: {name: [\n";
        let e = parse("bad.yaml", text).unwrap_err();
        assert_eq!(e[0].document, 2);
        assert!(e[0].message.contains("line"), "{}", e[0].message);
    }

    #[test]
    fn unsupported_kind_and_fields_are_named() {
        let e = parse("x.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap_err();
        assert_eq!(e[0].field, "kind");
        let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\nspec:\n  hosts: [reviews]\n  http:\n  - mirror: {host: x}\n    route:\n    - destination: {host: reviews}\n";
        let e = parse("vs.yaml", vs).unwrap_err();
        assert_eq!(e[0].field, "spec.http[0].mirror");
    }

    /// Alias bombs spread over documents: the one that runs out of the input's budget stops
    /// the parse and the rest is not expanded (100 of them once took a debug pilot 36 s of CPU).
    #[test]
    fn alias_bombs_in_many_documents_stop_at_the_first() {
        let bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n";
        let e = parse("bomb.yaml", &vec![bomb; 100].join("---\n")).unwrap_err();
        assert!(e.len() <= 2, "{} errors: {:?}", e.len(), e.last());
        // Four bombs of 111k nodes exceed the input's 500k.
        assert_eq!(e[0].document, 4);
        assert!(e[0].message.contains("limit"), "{}", e[0].message);
    }

    #[test]
    fn json_and_lists() {
        let text = r#"{"kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"ports":[{"port":9080,"name":"http"}]}}]}"#;
        let p = parse("l.json", text).unwrap();
        assert_eq!(p.objects[0].name, "a");
    }
}
