//! Parsing Kubernetes manifests and Istio resources (multi-document YAML or JSON) into model
//! [`Object`]s. Errors name the file, the document (1-based), the field path and the reason;
//! YAML syntax errors also give the line and column within the file.
//!
//! Accepted: v1 Service; apps/v1 (and the seed's extensions/v1beta1) Deployment;
//! networking.istio.io v1/v1beta1/v1alpha3 Gateway, VirtualService, DestinationRule,
//! ServiceEntry, WorkloadEntry; networking.istio.io/v1alpha3 EnvoyFilter (local rate limits);
//! config.istio.io/v1alpha2 RouteRule. PeerAuthentication is validated, then skipped with a
//! warning; kinds that carry nothing for the mesh (ServiceAccount, Namespace, ...) are
//! accepted and reported as warnings.

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
        match parse_object(&origin, value) {
            Ok(Some(o)) => out.objects.push(o),
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

/// The documents of `text` with each selecting Service's `spec.clusterIP` set from `ips`
/// ((namespace, name) -> IP; headless Services, `clusterIP: None`, are left alone), as one
/// JSON array: what the harness applies when it plays Kubernetes' part of giving services
/// virtual IPs (`mesh.capture`). Invalid documents give `parse`'s errors.
pub fn with_cluster_ips(
    file: &str,
    text: &str,
    ips: &std::collections::BTreeMap<(String, String), String>,
) -> Result<String, Vec<ConfigError>> {
    parse(file, text)?;
    let mut docs = Vec::new();
    for (_, mut v) in split_documents(file, text)? {
        if v.get("kind").and_then(Value::as_str) == Some("Service") {
            let name = v
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("");
            let ns = v
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(crate::model::DEFAULT_NAMESPACE);
            let headless = v.pointer("/spec/clusterIP").and_then(Value::as_str) == Some("None");
            if let (Some(ip), false) = (ips.get(&(ns.to_string(), name.to_string())), headless) {
                if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert("clusterIP".into(), Value::String(ip.clone()));
                }
            }
        }
        docs.push(v);
    }
    Ok(Value::Array(docs).to_string())
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
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The Service annotation giving its `exportTo`.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

const ISTIO_NETWORKING: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Kinds users bring along with bookinfo that carry nothing a sidecar mesh needs.
const IGNORED_KINDS: [&str; 5] = [
    "ServiceAccount",
    "Namespace",
    "ConfigMap",
    "PersistentVolumeClaim",
    "Secret",
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
            message: format!("kind {} is not used by meshbench (it simulates no accounts, namespaces, volumes or Sidecar scoping); skipped", header.kind),
        }));
    }
    if header.metadata.name.is_empty() {
        return Err(e("metadata.name", "missing name".into()));
    }
    let api = header.api_version.as_str();
    let spec_value = value.get("spec").cloned().unwrap_or(Value::Null);
    let spec = match header.kind.as_str() {
        "Service" if api == "v1" => Spec::Service(service(
            origin,
            spec_value,
            header.metadata.annotations.get(EXPORT_TO_ANNOTATION),
        )?),
        "Deployment" if matches!(api, "apps/v1" | "apps/v1beta1" | "apps/v1beta2" | "extensions/v1beta1") => {
            Spec::Deployment(deployment(origin, spec_value)?)
        }
        "VirtualService" if ISTIO_NETWORKING.contains(&api) => Spec::VirtualService(virtual_service(origin, spec_value)?),
        "DestinationRule" if ISTIO_NETWORKING.contains(&api) => Spec::DestinationRule(destination_rule(origin, spec_value)?),
        "ServiceEntry" if ISTIO_NETWORKING.contains(&api) => Spec::ServiceEntry(service_entry(origin, spec_value)?),
        "WorkloadEntry" if ISTIO_NETWORKING.contains(&api) => Spec::WorkloadEntry(workload_entry(
            origin,
            "spec",
            typed(origin, "spec", spec_value).map_err(Outcome::Errors)?,
        )?),
        "PeerAuthentication" if matches!(api, "security.istio.io/v1" | "security.istio.io/v1beta1") => {
            Spec::PeerAuthentication(peer_authentication(origin, &object_name, spec_value)?)
        }
        "AuthorizationPolicy" if matches!(api, "security.istio.io/v1" | "security.istio.io/v1beta1") => {
            Spec::AuthorizationPolicy(authorization_policy(origin, spec_value)?)
        }
        "RouteRule" if api == "config.istio.io/v1alpha2" => Spec::RouteRule(route_rule(origin, spec_value)?),
        "EnvoyFilter" if api == "networking.istio.io/v1alpha3" => Spec::EnvoyFilter(envoy_filter(origin, spec_value)?),
        "Gateway" if ISTIO_NETWORKING.contains(&api) => Spec::Gateway(gateway(origin, spec_value)?),
        "Sidecar" if ISTIO_NETWORKING.contains(&api) => Spec::Sidecar(sidecar(origin, spec_value)?),
        k if Kind::parse(k).is_some() => {
            return Err(e("apiVersion", format!("apiVersion {api:?} is not supported for kind {k}")))
        }
        k => {
            return Err(e(
                "kind",
                format!("unsupported kind {k:?}: meshbench reads Service, Deployment, Gateway, VirtualService, DestinationRule, ServiceEntry, WorkloadEntry, EnvoyFilter, RouteRule, Sidecar, PeerAuthentication and AuthorizationPolicy"),
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

fn service(origin: &Origin, v: Value, export_to: Option<&String>) -> Result<ServiceSpec, Outcome> {
    let raw: RawService = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let export_to = export_to.map(|a| a.split(',').map(|e| e.trim().to_string()).collect());
    check_export_to(
        origin,
        &format!("metadata.annotations.{EXPORT_TO_ANNOTATION}"),
        &export_to,
    )?;
    Ok(ServiceSpec {
        export_to,
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
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default)]
    containers: Vec<RawContainer>,
    service_account_name: Option<String>,
    /// The older spelling Kubernetes still reads.
    service_account: Option<String>,
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
        service_account: raw
            .template
            .spec
            .service_account_name
            .or(raw.template.spec.service_account),
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
    #[serde(default, rename = "withoutHeaders")]
    without_headers: BTreeMap<String, RawStringMatch>,
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
    headers: Option<RawHeaders>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaders {
    request: Option<RawHeaderOps>,
    response: Option<RawHeaderOps>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// Header operations, checked as Istio validates them (valid names; no `%`, which Envoy would
/// read as a formatter command).
fn header_ops(
    origin: &Origin,
    field: &str,
    raw: Option<RawHeaderOps>,
) -> Result<HeaderOps, Outcome> {
    let Some(raw) = raw else {
        return Ok(HeaderOps::default());
    };
    let names = raw
        .set
        .keys()
        .chain(raw.add.keys())
        .chain(raw.remove.iter());
    for n in names {
        if n.is_empty() || http::HeaderName::from_bytes(n.as_bytes()).is_err() {
            return Err(errs(
                origin,
                field.into(),
                format!("{n:?} is not a valid header name"),
            ));
        }
    }
    for (n, v) in raw.set.iter().chain(raw.add.iter()) {
        if http::HeaderValue::from_str(v).is_err() {
            return Err(errs(
                origin,
                format!("{field}.{n}"),
                "not a valid header value".into(),
            ));
        }
        if v.contains('%') {
            return Err(errs(
                origin,
                format!("{field}.{n}"),
                "values with % (Envoy formatter commands) are not supported".into(),
            ));
        }
    }
    Ok(HeaderOps {
        set: raw.set,
        add: raw.add,
        remove: raw.remove,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawVirtualService {
    #[serde(default)]
    hosts: Vec<String>,
    export_to: Option<Vec<String>>,
    #[serde(default)]
    gateways: Vec<String>,
    #[serde(default)]
    http: Vec<RawHttpRoute>,
    #[serde(default)]
    tcp: Vec<Value>,
    #[serde(default)]
    tls: Vec<Value>,
}

/// HTTPRoute fields Istio accepts and meshbench does not simulate: refused as "not supported"
/// (anything else is an unknown field).
const UNSUPPORTED_ROUTE_FIELDS: [&str; 8] = [
    "mirror",
    "mirrors",
    "mirrorPercentage",
    "mirrorPercent",
    "rewrite",
    "redirect",
    "directResponse",
    "corsPolicy",
];

fn http_match(origin: &Origin, field: &str, m: RawHttpMatch) -> Result<HttpMatch, Outcome> {
    if let Some(k) = m.other.keys().next() {
        return Err(errs(
            origin,
            format!("{field}.{k}"),
            format!("match on {k} is not supported (uri, headers and withoutHeaders are)"),
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
    let mut without_headers = BTreeMap::new();
    for (h, sm) in m.without_headers {
        let sm = string_match(origin, &format!("{field}.withoutHeaders.{h}"), sm)?;
        without_headers.insert(h.to_ascii_lowercase(), sm);
    }
    Ok(HttpMatch {
        uri,
        headers,
        without_headers,
    })
}

fn virtual_service(origin: &Origin, v: Value) -> Result<VirtualServiceSpec, Outcome> {
    let raw: RawVirtualService = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    check_export_to(origin, "spec.exportTo", &raw.export_to)?;
    // Hosts as Istio validates them: `*`, `*.suffix` or a DNS name (short or qualified); no
    // port, no wildcard elsewhere.
    for (i, h) in raw.hosts.iter().enumerate() {
        if !host_pattern(h) {
            return Err(errs(
                origin,
                format!("spec.hosts[{i}]"),
                format!("host {h:?} must be *, *.suffix or a DNS name (lowercase, no port)"),
            ));
        }
    }
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
        if let Some(k) = r.other.keys().next() {
            let message = if UNSUPPORTED_ROUTE_FIELDS.contains(&k.as_str()) || k == "delegate" {
                format!("{k} is not supported: meshbench does not simulate it (Istio accepts it; remove it to run here)")
            } else {
                format!("unknown field {k:?} of an HTTP route")
            };
            return Err(errs(origin, format!("{field}.{k}"), message));
        }
        let headers = r.headers.unwrap_or_default();
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
            request_headers: header_ops(
                origin,
                &format!("{field}.headers.request"),
                headers.request,
            )?,
            response_headers: header_ops(
                origin,
                &format!("{field}.headers.response"),
                headers.response,
            )?,
        });
    }
    Ok(VirtualServiceSpec {
        export_to: raw.export_to,
        hosts: raw.hosts,
        gateways: raw.gateways,
        http,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTrafficPolicy {
    load_balancer: Option<RawLoadBalancer>,
    connection_pool: Option<RawConnectionPool>,
    outlier_detection: Option<RawOutlier>,
    tls: Option<RawClientTls>,
    port_level_settings: Option<Value>,
    tunnel: Option<Value>,
    proxy_protocol: Option<Value>,
    retry_budget: Option<Value>,
}
/// DestinationRule `tls` (ClientTLSSettings).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawClientTls {
    mode: Option<String>,
    client_certificate: Option<Value>,
    private_key: Option<Value>,
    ca_certificates: Option<Value>,
    ca_crl: Option<Value>,
    credential_name: Option<Value>,
    subject_alt_names: Option<Value>,
    sni: Option<Value>,
    insecure_skip_verify: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLoadBalancer {
    simple: Option<String>,
    consistent_hash: Option<Value>,
    locality_lb_setting: Option<Value>,
    warmup_duration_secs: Option<Value>,
    warmup: Option<Value>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConnectionPool {
    #[serde(default)]
    tcp: RawTcpPool,
    #[serde(default)]
    http: RawHttpPool,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTcpPool {
    max_connections: Option<u32>,
    connect_timeout: Option<String>,
    tcp_keepalive: Option<Value>,
    max_connection_duration: Option<Value>,
    idle_timeout: Option<Value>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHttpPool {
    http1_max_pending_requests: Option<u32>,
    http2_max_requests: Option<u32>,
    max_requests_per_connection: Option<u32>,
    max_retries: Option<u32>,
    idle_timeout: Option<Value>,
    h2_upgrade_policy: Option<Value>,
    use_client_protocol: Option<Value>,
    max_concurrent_streams: Option<Value>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutlier {
    consecutive_5xx_errors: Option<u32>,
    consecutive_errors: Option<u32>,
    consecutive_gateway_errors: Option<u32>,
    interval: Option<String>,
    base_ejection_time: Option<String>,
    max_ejection_percent: Option<u32>,
    min_health_percent: Option<i32>,
    split_external_local_origin_errors: Option<Value>,
    consecutive_local_origin_failures: Option<Value>,
}

/// The first Istio field of a traffic policy that meshbench does not simulate, by path.
fn unsupported_policy_field(raw: &RawTrafficPolicy) -> Option<(&'static str, &'static str)> {
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    let lb = raw.load_balancer.as_ref();
    let tcp = raw.connection_pool.as_ref().map(|c| &c.tcp);
    let http = raw.connection_pool.as_ref().map(|c| &c.http);
    let od = raw.outlier_detection.as_ref();
    [
        (
            set(&raw.port_level_settings),
            "portLevelSettings",
            "per-port traffic policies",
        ),
        (set(&raw.tunnel), "tunnel", "tunnels"),
        (
            set(&raw.proxy_protocol),
            "proxyProtocol",
            "the PROXY protocol",
        ),
        (set(&raw.retry_budget), "retryBudget", "retry budgets"),
        (
            lb.is_some_and(|l| set(&l.consistent_hash)),
            "loadBalancer.consistentHash",
            "consistent hashing (ring hash, maglev)",
        ),
        (
            lb.is_some_and(|l| set(&l.locality_lb_setting)),
            "loadBalancer.localityLbSetting",
            "locality load balancing",
        ),
        (
            lb.is_some_and(|l| set(&l.warmup_duration_secs) || set(&l.warmup)),
            "loadBalancer.warmup",
            "slow start (warmup)",
        ),
        (
            tcp.is_some_and(|t| set(&t.tcp_keepalive)),
            "connectionPool.tcp.tcpKeepalive",
            "TCP keepalive settings",
        ),
        (
            tcp.is_some_and(|t| set(&t.max_connection_duration)),
            "connectionPool.tcp.maxConnectionDuration",
            "a connection lifetime",
        ),
        (
            tcp.is_some_and(|t| set(&t.idle_timeout)),
            "connectionPool.tcp.idleTimeout",
            "a TCP idle timeout",
        ),
        (
            http.is_some_and(|h| set(&h.idle_timeout)),
            "connectionPool.http.idleTimeout",
            "an HTTP idle timeout",
        ),
        (
            http.is_some_and(|h| set(&h.h2_upgrade_policy)),
            "connectionPool.http.h2UpgradePolicy",
            "HTTP/2 upgrades",
        ),
        (
            http.is_some_and(|h| set(&h.use_client_protocol)),
            "connectionPool.http.useClientProtocol",
            "the client's protocol upstream",
        ),
        (
            http.is_some_and(|h| set(&h.max_concurrent_streams)),
            "connectionPool.http.maxConcurrentStreams",
            "an HTTP/2 stream limit",
        ),
        (
            od.is_some_and(|o| {
                set(&o.split_external_local_origin_errors)
                    || set(&o.consecutive_local_origin_failures)
            }),
            "outlierDetection.splitExternalLocalOriginErrors",
            "split local-origin errors",
        ),
    ]
    .into_iter()
    .find(|(on, _, _)| *on)
    .map(|(_, f, what)| (f, what))
}

fn traffic_policy(
    origin: &Origin,
    field: &str,
    v: Option<Value>,
) -> Result<Option<TrafficPolicy>, Outcome> {
    let Some(v) = v else { return Ok(None) };
    let raw: RawTrafficPolicy = typed(origin, field, v).map_err(Outcome::Errors)?;
    if let Some((f, what)) = unsupported_policy_field(&raw) {
        return Err(errs(
            origin,
            format!("{field}.{f}"),
            format!("{what} is not supported: meshbench does not simulate it (Istio accepts it; remove it to run here)"),
        ));
    }
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
            consecutive_gateway_errors: o.consecutive_gateway_errors,
            min_health_percent: match o.min_health_percent {
                Some(p) if !(0..=100).contains(&p) => {
                    return Err(errs(
                        origin,
                        format!("{field}.outlierDetection.minHealthPercent"),
                        format!("{p} is not a percentage"),
                    ))
                }
                p => p.map(|p| p as u32),
            },
        }),
        None => None,
    };
    let tls = match raw.tls {
        None => None,
        Some(t) => {
            let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
            for (v, k) in [
                (&t.client_certificate, "clientCertificate"),
                (&t.private_key, "privateKey"),
                (&t.ca_certificates, "caCertificates"),
                (&t.ca_crl, "caCrl"),
                (&t.credential_name, "credentialName"),
                (&t.subject_alt_names, "subjectAltNames"),
                (&t.sni, "sni"),
                (&t.insecure_skip_verify, "insecureSkipVerify"),
            ] {
                if set(v) {
                    return Err(errs(
                        origin,
                        format!("{field}.tls.{k}"),
                        format!("{k} is not supported: meshbench runs tls.mode ISTIO_MUTUAL and DISABLE with the mesh's own certificates (Istio accepts it; remove it to run here)"),
                    ));
                }
            }
            match t.mode.as_deref().unwrap_or("DISABLE") {
                "DISABLE" => Some(ClientTls::Disable),
                "ISTIO_MUTUAL" => Some(ClientTls::IstioMutual),
                m @ ("SIMPLE" | "MUTUAL") => {
                    return Err(errs(
                        origin,
                        format!("{field}.tls.mode"),
                        format!("{m} is not supported: meshbench runs ISTIO_MUTUAL and DISABLE (TLS to hosts outside the mesh needs certificates it does not simulate)"),
                    ))
                }
                m => {
                    return Err(errs(
                        origin,
                        format!("{field}.tls.mode"),
                        format!("{m:?} is not a TLS mode (DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL)"),
                    ))
                }
            }
        }
    };
    Ok(Some(TrafficPolicy {
        load_balancer,
        connection_pool,
        outlier_detection,
        tls,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: Labels,
    traffic_policy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDestinationRule {
    host: String,
    #[serde(default)]
    subsets: Vec<RawSubset>,
    traffic_policy: Option<Value>,
    export_to: Option<Vec<String>>,
    workload_selector: Option<Value>,
}

/// `exportTo` as Istio validates it: `*`, `.`, `~` or namespace names; `*` and `~` alone;
/// no duplicates.
fn check_export_to(origin: &Origin, field: &str, export_to: &ExportTo) -> Result<(), Outcome> {
    let Some(list) = export_to else { return Ok(()) };
    let e = |m: String| Err(errs(origin, field.into(), m));
    let mut seen = std::collections::BTreeSet::new();
    for x in list {
        if !seen.insert(x) {
            return e(format!("{x:?} is listed twice"));
        }
        if !(x == "*" || x == "." || x == "~" || namespace_name(x)) {
            return e(format!("{x:?} is not *, ., ~ or a namespace name"));
        }
        if (x == "*" || x == "~") && list.len() > 1 {
            return e(format!("{x:?} cannot be combined with other entries"));
        }
    }
    Ok(())
}

fn destination_rule(origin: &Origin, v: Value) -> Result<DestinationRuleSpec, Outcome> {
    let raw: RawDestinationRule = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    check_export_to(origin, "spec.exportTo", &raw.export_to)?;
    if raw.workload_selector.is_some() {
        return Err(errs(
            origin,
            "spec.workloadSelector".into(),
            "workloadSelector is not supported: meshbench applies a DestinationRule to every client".into(),
        ));
    }
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
        export_to: raw.export_to,
        host: raw.host,
        subsets,
        traffic_policy: traffic_policy(origin, "spec.trafficPolicy", raw.traffic_policy)?,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServiceEntry {
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawServiceEntryPort>,
    #[serde(default)]
    endpoints: Vec<RawWorkloadEntry>,
    workload_selector: Option<RawWorkloadSelector>,
    resolution: Option<String>,
    /// MESH_INTERNAL / MESH_EXTERNAL: where the service runs; nothing here depends on it.
    #[allow(dead_code)]
    location: Option<String>,
    export_to: Option<Vec<String>>,
    subject_alt_names: Option<Value>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
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
    check_export_to(origin, "spec.exportTo", &raw.export_to)?;
    if raw.subject_alt_names.is_some() {
        return Err(errs(
            origin,
            "spec.subjectAltNames".into(),
            "subjectAltNames is not supported: meshbench does not simulate TLS yet".into(),
        ));
    }
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
        export_to: raw.export_to,
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
        endpoints: raw
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| workload_entry(origin, &format!("spec.endpoints[{i}]"), e))
            .collect::<Result<_, _>>()?,
        workload_selector: raw.workload_selector.map(|w| w.labels),
    })
}

/// A WorkloadEntry or ServiceEntry endpoint, in Istio's schema.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawWorkloadEntry {
    #[serde(default)]
    address: String,
    #[serde(default)]
    ports: BTreeMap<String, u32>,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    network: String,
    /// Locality-aware load balancing is not simulated; the value only has to be well-formed.
    #[serde(default)]
    locality: String,
    weight: Option<u32>,
    service_account: Option<String>,
}

/// Validates as Istio does: an address is required unless a network is named (then the entry
/// is kept without an endpoint, see `compile`); an IP address is used as it is; a DNS name is
/// valid for Istio but not supported here (no DNS is simulated).
fn workload_entry(
    origin: &Origin,
    field: &str,
    raw: RawWorkloadEntry,
) -> Result<WorkloadEntrySpec, Outcome> {
    let e = |f: &str, m: String| errs(origin, format!("{field}.{f}"), m);
    if raw.address.is_empty() {
        if raw.network.is_empty() {
            return Err(e("address", "address is required (or a network)".into()));
        }
    } else if raw.address.parse::<std::net::IpAddr>().is_err() {
        return Err(if dns_name(&raw.address) {
            e(
                "address",
                format!(
                    "address {:?} is a DNS name: not supported (meshbench resolves no names; give an IP address)",
                    raw.address
                ),
            )
        } else if raw.address.starts_with("unix://") {
            e(
                "address",
                "unix domain socket endpoints are not supported".into(),
            )
        } else {
            e(
                "address",
                format!(
                    "address {:?} is neither an IP address nor a DNS name",
                    raw.address
                ),
            )
        });
    }
    let mut ports = BTreeMap::new();
    for (name, port) in raw.ports {
        match u16::try_from(port) {
            Ok(p) if p > 0 && !name.is_empty() => {
                ports.insert(name, p);
            }
            _ if name.is_empty() => return Err(e("ports", "a port name is empty".into())),
            _ => {
                return Err(e(
                    &format!("ports.{name}"),
                    format!("port {port} must be between 1 and 65535"),
                ))
            }
        }
    }
    if raw.locality.split('/').count() > 3
        || (!raw.locality.is_empty() && raw.locality.split('/').any(str::is_empty))
    {
        return Err(e(
            "locality",
            format!(
                "locality {:?} must use region/zone/subzone form",
                raw.locality
            ),
        ));
    }
    let weight = raw.weight.unwrap_or(1);
    if weight == 0 {
        return Err(e("weight", "weight must be at least 1".into()));
    }
    Ok(WorkloadEntrySpec {
        address: raw.address,
        labels: raw.labels,
        ports,
        weight,
        healthy: true,
        service_account: raw.service_account,
    })
}

/// A namespace name (a DNS-1123 label).
fn namespace_name(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && dns_name(s)
}

/// A host as Istio's configs write it: `*`, `*.suffix` or a DNS name.
fn host_pattern(h: &str) -> bool {
    h == "*" || dns_name(h.strip_prefix("*.").unwrap_or(h))
}

/// A DNS-1123 subdomain (what Istio accepts as a host name).
fn dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

// ---- Gateway (networking.istio.io) -------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawGateway {
    #[serde(default)]
    selector: Labels,
    #[serde(default)]
    servers: Vec<RawServer>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServer {
    port: RawServerPort,
    #[serde(default)]
    hosts: Vec<String>,
    /// A label for the server; nothing depends on it.
    #[allow(dead_code)]
    name: Option<String>,
    tls: Option<Value>,
    bind: Option<String>,
    default_endpoint: Option<String>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawServerPort {
    number: u32,
    #[serde(default)]
    protocol: String,
    #[allow(dead_code)]
    name: Option<String>,
    target_port: Option<u32>,
}

/// Validated as Istio validates a Gateway; HTTP servers work, TLS and non-HTTP protocols are
/// refused as not supported.
fn gateway(origin: &Origin, v: Value) -> Result<GatewaySpec, Outcome> {
    let raw: RawGateway = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    if raw.servers.is_empty() {
        return Err(errs(
            origin,
            "spec.servers".into(),
            "a gateway needs at least one server".into(),
        ));
    }
    let mut servers = Vec::new();
    for (i, s) in raw.servers.into_iter().enumerate() {
        let f = |k: &str| format!("spec.servers[{i}].{k}");
        let not_supported = |k: &str, what: &str| {
            errs(origin, f(k), format!("{what} is not supported: meshbench simulates plaintext HTTP gateways (Istio accepts it; remove it to run here)"))
        };
        if s.tls.is_some() {
            return Err(not_supported("tls", "tls"));
        }
        if s.bind.is_some() {
            return Err(not_supported("bind", "bind"));
        }
        if s.default_endpoint.is_some() {
            return Err(not_supported("defaultEndpoint", "defaultEndpoint"));
        }
        if s.port.target_port.is_some() {
            return Err(not_supported("port.targetPort", "port.targetPort"));
        }
        let port = match u16::try_from(s.port.number) {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(errs(
                    origin,
                    f("port.number"),
                    format!("port {} must be between 1 and 65535", s.port.number),
                ))
            }
        };
        match s.port.protocol.to_ascii_uppercase().as_str() {
            "HTTP" | "HTTP2" | "GRPC" => {}
            "" => {
                return Err(errs(
                    origin,
                    f("port.protocol"),
                    "protocol is required".into(),
                ))
            }
            p @ ("HTTPS" | "TLS" | "TCP" | "MONGO" | "REDIS" | "MYSQL") => {
                return Err(not_supported("port.protocol", &format!("protocol {p}")))
            }
            p => {
                return Err(errs(
                    origin,
                    f("port.protocol"),
                    format!("unknown protocol {p:?}"),
                ))
            }
        }
        if s.hosts.is_empty() {
            return Err(errs(
                origin,
                f("hosts"),
                "a server needs at least one host".into(),
            ));
        }
        let mut hosts = Vec::new();
        for (j, h) in s.hosts.iter().enumerate() {
            let (ns, host) = h.split_once('/').unwrap_or(("*", h.as_str()));
            let ns_ok = ns == "*" || ns == "." || namespace_name(ns);
            if !ns_ok || !host_pattern(host) {
                return Err(errs(
                    origin,
                    format!("spec.servers[{i}].hosts[{j}]"),
                    format!("host {h:?} must be HOST or NAMESPACE/HOST (namespace *, . or a name; host *, *.suffix or a DNS name)"),
                ));
            }
            hosts.push((ns.to_string(), host.to_ascii_lowercase()));
        }
        servers.push(GatewayServer { port, hosts });
    }
    Ok(GatewaySpec {
        selector: raw.selector,
        servers,
    })
}

// ---- Sidecar (networking.istio.io) ------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSidecar {
    workload_selector: Option<RawWorkloadSelector>,
    #[serde(default)]
    egress: Vec<RawEgress>,
    outbound_traffic_policy: Option<RawOutboundPolicy>,
    ingress: Option<Value>,
    inbound_connection_pool: Option<Value>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEgress {
    #[serde(default)]
    hosts: Vec<String>,
    port: Option<Value>,
    bind: Option<String>,
    capture_mode: Option<String>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOutboundPolicy {
    mode: String,
    egress_proxy: Option<Value>,
}

/// A Sidecar's egress imports, validated as Istio does (`ns/host` hosts with `*`, `.`, `~` or
/// a namespace name). Ingress listeners, per-port egress, bind and capture modes are not
/// supported (meshbench's sidecars use its explicit listener layout).
fn sidecar(origin: &Origin, v: Value) -> Result<SidecarSpec, Outcome> {
    let raw: RawSidecar = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let not_supported = |f: &str| {
        errs(origin, f.into(), format!("{f} is not supported: meshbench's sidecars keep their own listener layout (Istio accepts it; remove it to run here)"))
    };
    if raw.ingress.is_some() {
        return Err(not_supported("spec.ingress"));
    }
    if raw.inbound_connection_pool.is_some() {
        return Err(not_supported("spec.inboundConnectionPool"));
    }
    if let Some(p) = &raw.outbound_traffic_policy {
        if p.egress_proxy.is_some() {
            return Err(not_supported("spec.outboundTrafficPolicy.egressProxy"));
        }
        if !matches!(p.mode.as_str(), "REGISTRY_ONLY" | "ALLOW_ANY") {
            return Err(errs(
                origin,
                "spec.outboundTrafficPolicy.mode".into(),
                "mode must be REGISTRY_ONLY or ALLOW_ANY".into(),
            ));
        }
    }
    if raw.egress.is_empty() {
        return Err(errs(
            origin,
            "spec.egress".into(),
            "a Sidecar needs at least one egress listener (meshbench reads its hosts)".into(),
        ));
    }
    let mut egress = Vec::new();
    for (i, e) in raw.egress.into_iter().enumerate() {
        for (k, set) in [
            ("port", e.port.is_some()),
            ("bind", e.bind.is_some()),
            ("captureMode", e.capture_mode.is_some()),
        ] {
            if set {
                return Err(not_supported(&format!("spec.egress[{i}].{k}")));
            }
        }
        if e.hosts.is_empty() {
            return Err(errs(
                origin,
                format!("spec.egress[{i}].hosts"),
                "an egress listener needs at least one host".into(),
            ));
        }
        for (j, h) in e.hosts.iter().enumerate() {
            let bad = || {
                errs(origin, format!("spec.egress[{i}].hosts[{j}]"), format!("host {h:?} must be NAMESPACE/HOST (namespace *, ., ~ or a name; host *, *.suffix or a DNS name)"))
            };
            let Some((ns, host)) = h.split_once('/') else {
                return Err(bad());
            };
            let ns_ok = matches!(ns, "*" | "." | "~") || namespace_name(ns);
            if !ns_ok || !host_pattern(host) {
                return Err(bad());
            }
            egress.push((ns.to_string(), host.to_ascii_lowercase()));
        }
    }
    Ok(SidecarSpec {
        selector: raw.workload_selector.map(|w| w.labels),
        egress,
    })
}

// ---- PeerAuthentication (security.istio.io) -------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerAuthentication {
    selector: Option<RawMatchLabels>,
    mtls: Option<RawMtls>,
    port_level_mtls: Option<BTreeMap<u32, RawMtls>>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawMatchLabels {
    #[serde(default)]
    match_labels: Labels,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMtls {
    #[serde(default)]
    mode: Option<String>,
}

/// Validated as Istio validates it.
fn peer_authentication(
    origin: &Origin,
    object: &str,
    v: Value,
) -> Result<PeerAuthenticationSpec, Outcome> {
    let raw: RawPeerAuthentication = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let mut errors = Vec::new();
    let mut e = |field: String, message: String| {
        errors.push(ConfigError {
            file: origin.file.clone(),
            document: origin.document,
            object: object.to_string(),
            field,
            message,
        })
    };
    let mode_ok = |m: &Option<RawMtls>| {
        m.as_ref()
            .and_then(|m| m.mode.as_deref())
            .is_none_or(|m| matches!(m, "UNSET" | "DISABLE" | "PERMISSIVE" | "STRICT"))
    };
    if !mode_ok(&raw.mtls) {
        e(
            "spec.mtls.mode".into(),
            "mode must be UNSET, DISABLE, PERMISSIVE or STRICT".into(),
        );
    }
    let selector = raw.selector.map(|s| s.match_labels).unwrap_or_default();
    for (k, v) in &selector {
        if k.is_empty() || v.contains('*') || k.contains('*') {
            e(
                format!("spec.selector.matchLabels.{k}"),
                "label keys must be non-empty and wildcards are not allowed".into(),
            );
        }
    }
    if let Some(ports) = &raw.port_level_mtls {
        if selector.is_empty() {
            e(
                "spec.portLevelMtls".into(),
                "portLevelMtls requires a workload selector".into(),
            );
        }
        if ports.is_empty() {
            e(
                "spec.portLevelMtls".into(),
                "port level mTLS, if defined, must have at least one element".into(),
            );
        }
        for (port, m) in ports {
            if *port == 0 || *port > 65535 {
                e(
                    format!("spec.portLevelMtls.{port}"),
                    "port must be in range 1..65535".into(),
                );
            }
            if !mode_ok(&Some(RawMtls {
                mode: m.mode.clone(),
            })) {
                e(
                    format!("spec.portLevelMtls.{port}.mode"),
                    "mode must be UNSET, DISABLE, PERMISSIVE or STRICT".into(),
                );
            }
        }
    }
    if !errors.is_empty() {
        return Err(Outcome::Errors(errors));
    }
    let mode = |m: &Option<RawMtls>| match m.as_ref().and_then(|m| m.mode.as_deref()) {
        Some("DISABLE") => Some(MtlsMode::Disable),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some("STRICT") => Some(MtlsMode::Strict),
        _ => None,
    };
    Ok(PeerAuthenticationSpec {
        selector: Some(selector).filter(|s| !s.is_empty()),
        mode: mode(&raw.mtls),
        ports: raw
            .port_level_mtls
            .into_iter()
            .flatten()
            .map(|(p, m)| (p as u16, mode(&Some(m))))
            .collect(),
    })
}

// ---- AuthorizationPolicy (security.istio.io) ------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthz {
    selector: Option<RawMatchLabels>,
    target_ref: Option<Value>,
    target_refs: Option<Value>,
    action: Option<String>,
    provider: Option<Value>,
    rules: Option<Vec<RawAuthzRule>>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthzRule {
    #[serde(default)]
    from: Vec<RawAuthzFrom>,
    #[serde(default)]
    to: Vec<RawAuthzTo>,
    #[serde(default)]
    when: Vec<RawAuthzWhen>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthzFrom {
    source: RawSource,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthzTo {
    operation: RawOperation,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    request_principals: Option<Value>,
    not_request_principals: Option<Value>,
    ip_blocks: Option<Value>,
    not_ip_blocks: Option<Value>,
    remote_ip_blocks: Option<Value>,
    not_remote_ip_blocks: Option<Value>,
    service_accounts: Option<Value>,
    not_service_accounts: Option<Value>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawOperation {
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    hosts: Option<Value>,
    not_hosts: Option<Value>,
}
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAuthzWhen {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

/// Validated as Istio validates it; what meshbench does not run is refused as not supported.
fn authorization_policy(origin: &Origin, v: Value) -> Result<AuthorizationPolicySpec, Outcome> {
    let raw: RawAuthz = typed(origin, "spec", v).map_err(Outcome::Errors)?;
    let e = |field: String, message: String| errs(origin, field, message);
    let unsupported = |field: String, what: &str| {
        e(
            field,
            format!(
                "{what} is not supported by meshbench (Istio accepts it; remove it to run here)"
            ),
        )
    };
    let set = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
    if set(&raw.target_ref) || set(&raw.target_refs) {
        return Err(unsupported(
            "spec.targetRef".into(),
            "targetRef (policies attached to waypoints or gateways)",
        ));
    }
    if set(&raw.provider) {
        return Err(unsupported("spec.provider".into(), "a CUSTOM provider"));
    }
    let action = match raw.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => AuthzAction::Allow,
        "DENY" => AuthzAction::Deny,
        a @ ("CUSTOM" | "AUDIT") => {
            return Err(unsupported(
                "spec.action".into(),
                &format!("the {a} action"),
            ))
        }
        a => {
            return Err(e(
                "spec.action".into(),
                format!("{a:?} is not an action (ALLOW, DENY, AUDIT, CUSTOM)"),
            ))
        }
    };
    let selector = raw
        .selector
        .map(|s| s.match_labels)
        .filter(|s| !s.is_empty());
    let values = |field: &str, is: Vec<String>, not: Vec<String>| -> Result<Values, Outcome> {
        for v in is.iter().chain(&not) {
            if v.is_empty() {
                return Err(e(field.to_string(), "empty values are not allowed".into()));
            }
            let inner = v.trim_start_matches('*').trim_end_matches('*');
            if v != "*" && (inner.contains('*') || (v.starts_with('*') && v.ends_with('*'))) {
                return Err(e(
                    field.to_string(),
                    format!("{v:?}: a wildcard may only be a prefix or a suffix"),
                ));
            }
        }
        Ok(Values { is, not })
    };
    let mut rules = Vec::new();
    for (i, r) in raw.rules.unwrap_or_default().into_iter().enumerate() {
        let f = |k: &str| format!("spec.rules[{i}].{k}");
        let mut from = Vec::new();
        for (j, s) in r.from.into_iter().enumerate() {
            let s = s.source;
            let g = |k: &str| f(&format!("from[{j}].source.{k}"));
            for (v, k, what) in [
                (
                    &s.request_principals,
                    "requestPrincipals",
                    "requestPrincipals (JWT)",
                ),
                (
                    &s.not_request_principals,
                    "notRequestPrincipals",
                    "notRequestPrincipals (JWT)",
                ),
                (&s.ip_blocks, "ipBlocks", "ipBlocks"),
                (&s.not_ip_blocks, "notIpBlocks", "notIpBlocks"),
                (&s.remote_ip_blocks, "remoteIpBlocks", "remoteIpBlocks"),
                (
                    &s.not_remote_ip_blocks,
                    "notRemoteIpBlocks",
                    "notRemoteIpBlocks",
                ),
                (
                    &s.service_accounts,
                    "serviceAccounts",
                    "serviceAccounts (use principals)",
                ),
                (
                    &s.not_service_accounts,
                    "notServiceAccounts",
                    "notServiceAccounts (use notPrincipals)",
                ),
            ] {
                if set(v) {
                    return Err(unsupported(g(k), what));
                }
            }
            let src = AuthzSource {
                principals: values(&g("principals"), s.principals, s.not_principals)?,
                namespaces: values(&g("namespaces"), s.namespaces, s.not_namespaces)?,
            };
            if src.principals.is_empty() && src.namespaces.is_empty() {
                return Err(e(
                    f(&format!("from[{j}].source")),
                    "a source must set at least one field".into(),
                ));
            }
            from.push(src);
        }
        let mut to = Vec::new();
        for (j, t) in r.to.into_iter().enumerate() {
            let o = t.operation;
            let g = |k: &str| f(&format!("to[{j}].operation.{k}"));
            if set(&o.hosts) || set(&o.not_hosts) {
                return Err(unsupported(g("hosts"), "host matching"));
            }
            for p in o.ports.iter().chain(&o.not_ports) {
                if !p.parse::<u16>().is_ok_and(|p| p > 0) {
                    return Err(e(g("ports"), format!("{p:?} is not a port")));
                }
            }
            for p in o.paths.iter().chain(&o.not_paths) {
                if p.contains('{') {
                    return Err(unsupported(g("paths"), "path templates"));
                }
            }
            let op = AuthzOperation {
                methods: values(&g("methods"), o.methods, o.not_methods)?,
                paths: values(&g("paths"), o.paths, o.not_paths)?,
                ports: values(&g("ports"), o.ports, o.not_ports)?,
            };
            if op.methods.is_empty() && op.paths.is_empty() && op.ports.is_empty() {
                return Err(e(
                    f(&format!("to[{j}].operation")),
                    "an operation must set at least one field".into(),
                ));
            }
            to.push(op);
        }
        let mut when = Vec::new();
        for (j, w) in r.when.into_iter().enumerate() {
            let g = |k: &str| f(&format!("when[{j}].{k}"));
            let header = w
                .key
                .strip_prefix("request.headers[")
                .and_then(|k| k.strip_suffix(']'))
                .filter(|k| !k.is_empty());
            if header.is_none()
                && !matches!(
                    w.key.as_str(),
                    "source.principal" | "source.namespace" | "destination.port"
                )
            {
                return Err(unsupported(
                    g("key"),
                    &format!("the condition key {:?} (meshbench runs request.headers[NAME], source.principal, source.namespace and destination.port)", w.key),
                ));
            }
            if w.values.is_empty() && w.not_values.is_empty() {
                return Err(e(
                    g("values"),
                    "a condition needs values or notValues".into(),
                ));
            }
            if w.key == "destination.port" {
                for p in w.values.iter().chain(&w.not_values) {
                    if !p.parse::<u16>().is_ok_and(|p| p > 0) {
                        return Err(e(g("values"), format!("{p:?} is not a port")));
                    }
                }
            }
            when.push(AuthzCondition {
                values: values(&g("values"), w.values, w.not_values)?,
                key: w.key,
            });
        }
        rules.push(AuthzRule { from, to, when });
    }
    Ok(AuthorizationPolicySpec {
        selector,
        action,
        rules,
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
    fn envoy_filters_other_than_local_rate_limits_are_refused_by_field() {
        let ef = |patch: &str| {
            format!("apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {{name: f}}\nspec:\n  configPatches:\n{patch}")
        };
        let limit = "        name: envoy.filters.http.local_ratelimit\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          stat_prefix: rl\n          token_bucket: {max_tokens: 1, fill_interval: 1s}\n";
        let ok = ef(&format!("  - applyTo: HTTP_FILTER\n    match: {{context: SIDECAR_OUTBOUND}}\n    patch:\n      operation: INSERT_FIRST\n      value:\n{limit}"));
        let p = parse("ef.yaml", &ok).unwrap();
        let Spec::EnvoyFilter(f) = &p.objects[0].spec else {
            panic!()
        };
        assert_eq!(f.patches[0].context, PatchContext::Outbound);
        assert_eq!(
            f.patches[0]
                .limit
                .token_bucket
                .as_ref()
                .unwrap()
                .tokens_per_fill,
            1
        );
        for (patch, field, words) in [
            ("  - applyTo: CLUSTER\n    patch: {operation: MERGE, value: {}}\n", "spec.configPatches[0].applyTo", "applyTo \"CLUSTER\" is not supported"),
            ("  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_BEFORE\n      value: {name: envoy.filters.http.lua}\n", "spec.configPatches[0].patch.value.name", "not supported"),
            ("  - applyTo: HTTP_FILTER\n    patch: {operation: REMOVE}\n", "spec.configPatches[0].patch.operation", "not supported"),
            ("  - applyTo: HTTP_FILTER\n    match: {context: GATEWAY}\n    patch: {operation: INSERT_FIRST}\n", "spec.configPatches[0].match.context", "not supported"),
            (&format!("  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_FIRST\n      value:\n{}          descriptors: []\n", limit), "spec.configPatches[0].patch.value.typed_config.descriptors", "not supported"),
            (&format!("  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_FIRST\n      value:\n{}", limit.replace("1s", "10ms")), "spec.configPatches[0].patch.value.typed_config.token_bucket.fill_interval", "50ms"),
        ] {
            let e = parse("ef.yaml", &ef(patch)).unwrap_err();
            assert_eq!(e[0].field, field, "{patch}: {}", e[0].message);
            assert!(e[0].message.contains(words), "{patch}: {}", e[0].message);
        }
    }

    #[test]
    fn unknown_fields_are_errors_in_every_kind_and_istio_fields_not_simulated_say_so() {
        let net = "apiVersion: networking.istio.io/v1";
        for (doc, field, words) in [
            (format!("{net}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: reviews, colour: red}}\n"), "spec", "unknown field"),
            (format!("{net}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: reviews, subsets: [{{name: v1, colour: red}}]}}\n"), "spec.subsets[0]", "unknown field"),
            (format!("{net}\nkind: ServiceEntry\nmetadata: {{name: s}}\nspec: {{hosts: [a.example], colour: red}}\n"), "spec", "unknown field"),
            (format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [reviews], colour: red}}\n"), "spec", "unknown field"),
            (format!("{net}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: reviews, trafficPolicy: {{loadBalancer: {{consistentHash: {{useSourceIp: true}}}}}}}}\n"), "spec.trafficPolicy.loadBalancer.consistentHash", "not supported"),
            (format!("{net}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: reviews, trafficPolicy: {{portLevelSettings: []}}}}\n"), "spec.trafficPolicy.portLevelSettings", "not supported"),
            (format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [reviews], exportTo: [., \"*\"]}}\n"), "spec.exportTo", "cannot be combined"),
            (format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [\"shop.example.com:*\"]}}\n"), "spec.hosts[0]", "no port"),
            (format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [\"a*.example.com\"]}}\n"), "spec.hosts[0]", "*.suffix"),
            (format!("{net}\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: reviews, exportTo: [Not_A_Namespace]}}\n"), "spec.exportTo", "not *, ., ~ or a namespace name"),
            (format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s, annotations: {{networking.istio.io/exportTo: \"~,.\"}}}}\nspec: {{ports: [{{port: 80}}]}}\n"), "metadata.annotations.networking.istio.io/exportTo", "cannot be combined"),
            (format!("{net}\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {{egress: [{{hosts: [reviews]}}]}}\n"), "spec.egress[0].hosts[0]", "NAMESPACE/HOST"),
            (format!("{net}\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {{egress: [{{hosts: [\"./*\"], port: {{number: 9080}}}}]}}\n"), "spec.egress[0].port", "not supported"),
            (format!("{net}\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {{egress: [{{hosts: [\"./*\"]}}], ingress: []}}\n"), "spec.ingress", "not supported"),
            (format!("{net}\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {{egress: [{{hosts: [\"./*\"]}}], outboundTrafficPolicy: {{mode: SOMETIMES}}}}\n"), "spec.outboundTrafficPolicy.mode", "REGISTRY_ONLY or ALLOW_ANY"),
            (format!("{net}\nkind: Gateway\nmetadata: {{name: g}}\nspec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 443, protocol: HTTPS}}, hosts: [\"*\"]}}]}}\n"), "spec.servers[0].port.protocol", "not supported"),
            (format!("{net}\nkind: Gateway\nmetadata: {{name: g}}\nspec: {{selector: {{istio: ingressgateway}}, servers: [{{port: {{number: 80, protocol: HTTP}}, hosts: [\"a/b/c\"]}}]}}\n"), "spec.servers[0].hosts[0]", "HOST or NAMESPACE/HOST"),
            (format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [reviews]\n  http: [{{rewrite: {{uri: /x}}, route: [{{destination: {{host: reviews}}}}]}}]\n"), "spec.http[0].rewrite", "not supported"),
        ] {
            let e = parse("f.yaml", &doc).unwrap_err();
            assert!(e[0].field.starts_with(field), "{doc}: {} {}", e[0].field, e[0].message);
            assert!(e[0].message.contains(words), "{doc}: {}", e[0].message);
        }
        for ok in [
            format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [reviews], exportTo: [\"*\"]}}\n"),
            format!("{net}\nkind: VirtualService\nmetadata: {{name: v}}\nspec: {{hosts: [reviews], exportTo: [., tenant-b]}}\n"),
            format!("{net}\nkind: Sidecar\nmetadata: {{name: s}}\nspec: {{workloadSelector: {{labels: {{app: a}}}}, egress: [{{hosts: [\"./*\", \"istio-system/*\", \"*/*.example.com\", \"~/*\"]}}], outboundTrafficPolicy: {{mode: REGISTRY_ONLY}}}}\n"),
        ] {
            assert!(parse("f.yaml", &ok).is_ok(), "{ok}");
        }
    }

    /// Istio's validation of WorkloadEntry, ServiceEntry endpoints and PeerAuthentication:
    /// what it accepts is accepted (or, when not simulated, refused as "not supported"); what
    /// it refuses is refused, naming the field.
    #[test]
    fn workload_entries_and_peer_authentication_validate_as_istio_does() {
        let we = |spec: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w}}\nspec: {spec}\n")
        };
        let pa = |spec: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p}}\nspec: {spec}\n")
        };
        let se = |spec: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s}}\nspec: {spec}\n")
        };
        for ok in [
            we("{address: 10.0.0.1, ports: {http: 8080}, locality: r/z/s, serviceAccount: sa, weight: 3}"),
            we("{network: vm-net, labels: {app: a}}"),
            se("{hosts: [a.example.com], location: MESH_EXTERNAL}"),
        ] {
            let p = parse("f.yaml", &ok).unwrap_or_else(|e| panic!("{ok}: {e:?}"));
            assert_eq!(p.objects.len(), 1, "{ok}");
        }
        for (doc, field, words) in [
            (we("{labels: {app: a}}"), "spec.address", "address is required"),
            (we("{address: vm1.example.com}"), "spec.address", "not supported"),
            (we("{address: 'not an address!'}"), "spec.address", "neither an IP address nor a DNS name"),
            (we("{address: 10.0.0.1, ports: {http: 70000}}"), "spec.ports.http", "between 1 and 65535"),
            (we("{address: 10.0.0.1, locality: r//z}"), "spec.locality", "region/zone/subzone"),
            (we("{address: 10.0.0.1, colour: red}"), "spec", "unknown field"),
            (se("{hosts: [a.example.com], ports: [{number: 80, name: http}], endpoints: [{address: db.example.com}]}"), "spec.endpoints[0].address", "not supported"),
            (pa("{mtls: {mode: STRICTER}}"), "spec.mtls.mode", "must be UNSET, DISABLE, PERMISSIVE or STRICT"),
            (pa("{portLevelMtls: {8080: {mode: DISABLE}}}"), "spec.portLevelMtls", "requires a workload selector"),
            (pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {}}"), "spec.portLevelMtls", "at least one element"),
            (pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}"), "spec.portLevelMtls.0", "1..65535"),
            (pa("{mtls: {mode: STRICT}, colour: red}"), "spec", "unknown field"),
        ] {
            let e = parse("f.yaml", &doc).unwrap_err();
            assert!(e[0].field.starts_with(field), "{doc}: {} {}", e[0].field, e[0].message);
            assert!(e[0].message.contains(words), "{doc}: {}", e[0].message);
        }
        // A valid PeerAuthentication is kept with its modes (UNSET inherits: None).
        let p = parse("f.yaml", &pa("{selector: {matchLabels: {app: a}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}, 9090: {mode: UNSET}}}")).unwrap();
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        let Spec::PeerAuthentication(spec) = &p.objects[0].spec else {
            panic!("a PeerAuthentication")
        };
        assert_eq!(spec.mode, Some(MtlsMode::Strict));
        assert_eq!(spec.ports[&8080], Some(MtlsMode::Disable));
        assert_eq!(spec.ports[&9090], None);
        assert_eq!(spec.selector.as_ref().unwrap()["app"], "a");
    }

    /// DestinationRule `tls`: ISTIO_MUTUAL and DISABLE run; SIMPLE/MUTUAL and certificate
    /// fields are refused as not supported; an unknown mode is invalid.
    #[test]
    fn destination_rule_tls_modes() {
        let dr = |tls: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: r}}\nspec: {{host: a, trafficPolicy: {{tls: {tls}}}}}\n")
        };
        for (tls, want) in [
            ("{mode: ISTIO_MUTUAL}", ClientTls::IstioMutual),
            ("{mode: DISABLE}", ClientTls::Disable),
        ] {
            let p = parse("f.yaml", &dr(tls)).unwrap();
            let Spec::DestinationRule(d) = &p.objects[0].spec else {
                panic!()
            };
            assert_eq!(d.traffic_policy.as_ref().unwrap().tls, Some(want));
        }
        for (tls, field, words) in [
            (
                "{mode: SIMPLE}",
                "spec.trafficPolicy.tls.mode",
                "not supported",
            ),
            (
                "{mode: ISTIO_MUTUAL, sni: x}",
                "spec.trafficPolicy.tls.sni",
                "not supported",
            ),
            (
                "{mode: SOMETIMES}",
                "spec.trafficPolicy.tls.mode",
                "not a TLS mode",
            ),
        ] {
            let e = parse("f.yaml", &dr(tls)).unwrap_err();
            assert_eq!(e[0].field, field);
            assert!(e[0].message.contains(words), "{}", e[0].message);
        }
    }

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

// ---- EnvoyFilter: local rate limits ------------------------------------------------------

const TYPED_STRUCT: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];
const LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const LOCAL_RATE_LIMIT_NAME: &str = "envoy.filters.http.local_ratelimit";
const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";

/// An EnvoyFilter whose patches insert `envoy.filters.http.local_ratelimit` (HTTP_FILTER,
/// INSERT_BEFORE/INSERT_FIRST) or merge its per-route config into inbound routes (HTTP_ROUTE,
/// MERGE): the shape of Istio's local rate limit task. Any other patch is refused with what
/// is not supported; nothing is ignored.
fn envoy_filter(origin: &Origin, spec: Value) -> Result<EnvoyFilterSpec, Outcome> {
    let fail = |field: String, m: String| errs(origin, field, m);
    let not_supported = |field: String, what: &str| {
        errs(
            origin,
            field,
            format!("{what} is not supported: meshbench runs EnvoyFilters that add envoy.filters.http.local_ratelimit to sidecars (HTTP_FILTER INSERT_BEFORE/INSERT_FIRST, or HTTP_ROUTE MERGE of its typed_per_filter_config on SIDECAR_INBOUND)"),
        )
    };
    let obj = spec
        .as_object()
        .ok_or_else(|| fail("spec".into(), "spec must be a mapping".into()))?;
    for k in obj.keys() {
        if !matches!(
            k.as_str(),
            "workloadSelector" | "configPatches" | "priority"
        ) {
            return Err(not_supported(format!("spec.{k}"), &format!("field {k:?}")));
        }
    }
    let selector = match obj.get("workloadSelector") {
        None | Some(Value::Null) => None,
        Some(ws) => {
            let labels = &ws["labels"];
            if ws
                .as_object()
                .is_some_and(|m| m.keys().any(|k| k != "labels"))
            {
                return Err(not_supported(
                    "spec.workloadSelector".into(),
                    "a workload selector other than labels",
                ));
            }
            Some(
                typed::<Labels>(origin, "spec.workloadSelector.labels", labels.clone())
                    .map_err(Outcome::Errors)?,
            )
        }
    };
    let patches_v = obj
        .get("configPatches")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            fail(
                "spec.configPatches".into(),
                "a list of patches is required".into(),
            )
        })?;
    let mut patches = Vec::new();
    for (i, p) in patches_v.iter().enumerate() {
        let at = |f: &str| format!("spec.configPatches[{i}].{f}");
        let apply_to = p["applyTo"].as_str().unwrap_or("");
        let m = &p["match"];
        let context = match m["context"].as_str().unwrap_or("ANY") {
            "SIDECAR_INBOUND" => PatchContext::Inbound,
            "SIDECAR_OUTBOUND" => PatchContext::Outbound,
            "ANY" => PatchContext::Any,
            other => {
                return Err(not_supported(
                    at("match.context"),
                    &format!("context {other}"),
                ))
            }
        };
        if let Some(k) = m.as_object().and_then(|o| {
            o.keys()
                .find(|k| !matches!(k.as_str(), "context" | "listener" | "routeConfiguration"))
        }) {
            return Err(not_supported(
                at(&format!("match.{k}")),
                &format!("match.{k}"),
            ));
        }
        let port = |v: &Value, f: &str| -> Result<Option<u16>, Outcome> {
            match v {
                Value::Null => Ok(None),
                v => v
                    .as_u64()
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n > 0)
                    .map(Some)
                    .ok_or_else(|| fail(at(f), "a port number 1 to 65535".into())),
            }
        };
        let operation = p["patch"]["operation"].as_str().unwrap_or("");
        let value = &p["patch"]["value"];
        let (port, route, typed_config, config_field) = match apply_to {
            "HTTP_FILTER" => {
                let l = &m["listener"];
                if let Some(k) = l.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| !matches!(k.as_str(), "portNumber" | "filterChain"))
                }) {
                    return Err(not_supported(
                        at(&format!("match.listener.{k}")),
                        &format!("match.listener.{k}"),
                    ));
                }
                let filter = &l["filterChain"]["filter"];
                if filter["name"].as_str().is_some_and(|n| n != HCM_NAME) {
                    return Err(not_supported(
                        at("match.listener.filterChain.filter.name"),
                        "a network filter other than the HTTP connection manager",
                    ));
                }
                if !matches!(operation, "INSERT_BEFORE" | "INSERT_FIRST") {
                    return Err(not_supported(
                        at("patch.operation"),
                        &format!("HTTP_FILTER operation {operation:?}"),
                    ));
                }
                if value["name"].as_str() != Some(LOCAL_RATE_LIMIT_NAME) {
                    return Err(not_supported(
                        at("patch.value.name"),
                        &format!("HTTP filter {:?}", value["name"].as_str().unwrap_or("")),
                    ));
                }
                if let Some(k) = value.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| !matches!(k.as_str(), "name" | "typed_config" | "typedConfig"))
                }) {
                    return Err(not_supported(
                        at(&format!("patch.value.{k}")),
                        &format!("filter field {k:?}"),
                    ));
                }
                let tc = if value["typed_config"].is_null() {
                    &value["typedConfig"]
                } else {
                    &value["typed_config"]
                };
                (
                    port(&l["portNumber"], "match.listener.portNumber")?,
                    None,
                    tc.clone(),
                    at("patch.value.typed_config"),
                )
            }
            "HTTP_ROUTE" => {
                if context != PatchContext::Inbound {
                    return Err(not_supported(at("match.context"), "HTTP_ROUTE patches outside SIDECAR_INBOUND (the outbound route configuration is shared by every sidecar)"));
                }
                if operation != "MERGE" {
                    return Err(not_supported(
                        at("patch.operation"),
                        &format!("HTTP_ROUTE operation {operation:?}"),
                    ));
                }
                let rc = &m["routeConfiguration"];
                if let Some(k) = rc.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| !matches!(k.as_str(), "vhost" | "portNumber"))
                }) {
                    return Err(not_supported(
                        at(&format!("match.routeConfiguration.{k}")),
                        &format!("match.routeConfiguration.{k}"),
                    ));
                }
                let vh = &rc["vhost"];
                let action = vh["route"]["action"].as_str().unwrap_or("ANY");
                if action != "ANY" && action != "ROUTE" {
                    return Err(not_supported(
                        at("match.routeConfiguration.vhost.route.action"),
                        &format!("route action {action}"),
                    ));
                }
                let route = RouteSelector {
                    vhost: vh["name"].as_str().map(String::from),
                    route: vh["route"]["name"].as_str().map(String::from),
                };
                let per_filter = value
                    .get("typed_per_filter_config")
                    .or_else(|| value.get("typedPerFilterConfig"));
                let Some(pf) = per_filter.and_then(Value::as_object) else {
                    return Err(not_supported(
                        at("patch.value"),
                        "an HTTP_ROUTE merge without typed_per_filter_config",
                    ));
                };
                if value.as_object().is_some_and(|o| o.len() > 1) {
                    return Err(not_supported(
                        at("patch.value"),
                        "route fields other than typed_per_filter_config",
                    ));
                }
                if pf.len() != 1 || !pf.contains_key(LOCAL_RATE_LIMIT_NAME) {
                    return Err(not_supported(at("patch.value.typed_per_filter_config"), "per-route config for filters other than envoy.filters.http.local_ratelimit"));
                }
                (
                    port(&rc["portNumber"], "match.routeConfiguration.portNumber")?,
                    Some(route),
                    pf[LOCAL_RATE_LIMIT_NAME].clone(),
                    at(&format!(
                        "patch.value.typed_per_filter_config.{LOCAL_RATE_LIMIT_NAME}"
                    )),
                )
            }
            other => return Err(not_supported(at("applyTo"), &format!("applyTo {other:?}"))),
        };
        if context == PatchContext::Outbound && port.is_some() {
            return Err(not_supported(at("match.listener.portNumber"), "an outbound listener port (meshbench's outbound listener on 15001 serves every port)"));
        }
        let limit = local_rate_limit(origin, &config_field, &typed_config)?;
        patches.push(RateLimitPatch {
            context,
            port,
            route,
            limit,
        });
    }
    Ok(EnvoyFilterSpec { selector, patches })
}

/// snake_case or lowerCamelCase, as Envoy's JSON reads both.
fn field<'a>(v: &'a Value, snake: &str) -> &'a Value {
    let camel: String = {
        let mut out = String::new();
        let mut up = false;
        for c in snake.chars() {
            if c == '_' {
                up = true;
            } else if up {
                out.push(c.to_ascii_uppercase());
                up = false;
            } else {
                out.push(c);
            }
        }
        out
    };
    match &v[snake] {
        Value::Null => &v[camel.as_str()],
        x => x,
    }
}

fn local_rate_limit(origin: &Origin, at: &str, tc: &Value) -> Result<LocalRateLimitSpec, Outcome> {
    let fail = |f: &str, m: String| errs(origin, format!("{at}{f}"), m);
    let ty = tc["@type"].as_str().unwrap_or("");
    let (base, v) = if TYPED_STRUCT.contains(&ty) {
        if field(tc, "type_url").as_str() != Some(LOCAL_RATE_LIMIT_TYPE) {
            return Err(fail(
                ".type_url",
                format!("expected {LOCAL_RATE_LIMIT_TYPE}"),
            ));
        }
        (".value", tc["value"].clone())
    } else if ty == LOCAL_RATE_LIMIT_TYPE {
        let mut v = tc.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("@type");
        }
        ("", v)
    } else {
        return Err(fail(
            ".@type",
            format!("expected {LOCAL_RATE_LIMIT_TYPE} or a TypedStruct holding it, got {ty:?}"),
        ));
    };
    let f = |name: &str| format!("{base}.{name}");
    const KNOWN: [&str; 12] = [
        "stat_prefix",
        "statPrefix",
        "token_bucket",
        "tokenBucket",
        "filter_enabled",
        "filterEnabled",
        "filter_enforced",
        "filterEnforced",
        "response_headers_to_add",
        "responseHeadersToAdd",
        "status",
        "@type",
    ];
    let o = v
        .as_object()
        .ok_or_else(|| fail(base, "a mapping".into()))?;
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(fail(&f(k), format!("{k} is not supported (meshbench runs stat_prefix, token_bucket, filter_enabled, filter_enforced, response_headers_to_add and status)")));
    }
    let stat_prefix = field(&v, "stat_prefix")
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| fail(&f("stat_prefix"), "stat_prefix is required, a non-empty string (quote words YAML reads as booleans, such as off)".into()))?
        .to_string();
    let token_bucket = match field(&v, "token_bucket") {
        Value::Null => None,
        tb => {
            let n = |name: &str, default: Option<u64>| -> Result<u32, Outcome> {
                match field(tb, name) {
                    Value::Null => default.map(|d| d as u32).ok_or_else(|| {
                        fail(&f(&format!("token_bucket.{name}")), "required".into())
                    }),
                    x => x
                        .as_u64()
                        .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| *n > 0)
                        .ok_or_else(|| {
                            fail(
                                &f(&format!("token_bucket.{name}")),
                                "a whole number 1 to 4294967295".into(),
                            )
                        }),
                }
            };
            let fill = field(tb, "fill_interval")
                .as_str()
                .ok_or_else(|| {
                    fail(
                        &f("token_bucket.fill_interval"),
                        "required (a duration such as 1s)".into(),
                    )
                })
                .and_then(|s| {
                    parse_duration(s).map_err(|m| fail(&f("token_bucket.fill_interval"), m))
                })?;
            if fill < std::time::Duration::from_millis(50) {
                return Err(fail(
                    &f("token_bucket.fill_interval"),
                    "must be at least 50ms (Envoy refuses shorter)".into(),
                ));
            }
            Some(TokenBucketSpec {
                max_tokens: n("max_tokens", None)?,
                tokens_per_fill: n("tokens_per_fill", Some(1))?,
                fill_interval: fill,
            })
        }
    };
    let fraction = |name: &str| -> Result<Option<(u32, u32)>, Outcome> {
        let fe = field(&v, name);
        if fe.is_null() {
            return Ok(None);
        }
        let dv = field(fe, "default_value");
        let num = field(dv, "numerator").as_u64().unwrap_or(0) as u32;
        let den = match field(dv, "denominator").as_str().unwrap_or("HUNDRED") {
            "HUNDRED" => 100,
            "TEN_THOUSAND" => 10_000,
            "MILLION" => 1_000_000,
            d => {
                return Err(fail(
                    &f(&format!("{name}.default_value.denominator")),
                    format!("{d:?}: HUNDRED, TEN_THOUSAND or MILLION"),
                ))
            }
        };
        Ok(Some((num.min(den), den)))
    };
    let mut response_headers_to_add = Vec::new();
    if let Some(list) = field(&v, "response_headers_to_add").as_array() {
        for (j, h) in list.iter().enumerate() {
            let hf = |x: &str| f(&format!("response_headers_to_add[{j}].{x}"));
            let key = h["header"]["key"]
                .as_str()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| fail(&hf("header.key"), "required".into()))?;
            let value = h["header"]["value"].as_str().unwrap_or("");
            let append = match (&h["append"], field(h, "append_action").as_str()) {
                (Value::Bool(b), _) => *b,
                (_, None | Some("APPEND_IF_EXISTS_OR_ADD")) => true,
                (_, Some("OVERWRITE_IF_EXISTS_OR_ADD")) => false,
                (_, Some(a)) => return Err(fail(&hf("append_action"), format!("{a} is not supported (APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS_OR_ADD)"))),
            };
            response_headers_to_add.push((key.to_string(), value.to_string(), append));
        }
    }
    let status = match field(&v, "status") {
        Value::Null => None,
        s => Some(
            s["code"]
                .as_u64()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| fail(&f("status.code"), "an HTTP status 400 to 599".into()))?
                as u16,
        ),
    };
    Ok(LocalRateLimitSpec {
        stat_prefix,
        token_bucket,
        filter_enabled: fraction("filter_enabled")?,
        filter_enforced: fraction("filter_enforced")?,
        response_headers_to_add,
        status,
    })
}
