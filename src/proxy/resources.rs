//! Envoy protos -> the proxy's own config types, at the edge. Everything the data plane acts
//! on is checked here; a field that would change behaviour and is not supported is an error
//! (the response is NACKed with that message), never silently ignored.
//!
//! Supported subset (also in README "meshbench proxy: supported xDS"):
//! - Listener: socket address, one filter chain holding one HTTP connection manager.
//! - HCM: RDS over ADS or an inline route config; http_filters local_ratelimit (token bucket,
//!   enabled/enforced fractions, status, response headers; also per route), fault, router.
//! - Route: match prefix / path / safe_regex plus headers (exact, prefix, suffix, contains,
//!   safe_regex, present, invert); route to a cluster or weighted_clusters; timeout;
//!   retry_policy (retry_on, num_retries, per_try_timeout, retriable_status_codes, the
//!   previous_hosts predicate); per-route fault (abort with HTTP status, fixed delay;
//!   percentages) and local rate limit.
//! - Cluster: EDS over ADS or STATIC; lb_policy ROUND_ROBIN, LEAST_REQUEST, RANDOM;
//!   circuit_breakers default-priority thresholds; outlier_detection consecutive 5xx and
//!   gateway failures; healthy_panic_threshold;
//!   HTTP/1.1 or HTTP/2 upstream; max_requests_per_connection.
//! - ClusterLoadAssignment: socket-address endpoints with weight and health status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3 as common_fault;
use envoy_types::pb::envoy::extensions::filters::http::fault::v3 as fault;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as upstream_http;
use envoy_types::pb::envoy::r#type::v3 as types;
use envoy_types::pb::google::protobuf;
use prost::Name;

use super::proto::regex;
pub use super::proto::{decode, Reject, StrMatch, ValueMatch};
use super::ratelimit::{self, LocalRateLimit, TokenBucket};
use crate::xds::{FAULT_FILTER, HCM_FILTER, LOCAL_RATE_LIMIT_FILTER, ROUTER_FILTER};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3 as local_ratelimit;

const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";
const LOCAL_RATE_LIMIT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
const RBAC_FILTER: &str = "envoy.filters.http.rbac";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const SOCKET_MATCH_KEY: &str = "envoy.transport_socket_match";

/// A protobuf duration, clamped to [0, `MAX_DURATION`] (timers downstream add it to now).
fn duration(d: &protobuf::Duration) -> Duration {
    Duration::new(
        d.seconds.max(0) as u64,
        d.nanos.clamp(0, 999_999_999) as u32,
    )
    .min(crate::model::MAX_DURATION)
}

/// A proportion in parts per million.
fn per_million(p: &Option<types::FractionalPercent>) -> u32 {
    let Some(p) = p else { return 1_000_000 };
    let scale = match types::fractional_percent::DenominatorType::try_from(p.denominator) {
        Ok(types::fractional_percent::DenominatorType::Hundred) => 10_000,
        Ok(types::fractional_percent::DenominatorType::TenThousand) => 100,
        _ => 1,
    };
    (p.numerator as u64 * scale).min(1_000_000) as u32
}

// ---- Listeners -------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum RouteSource {
    Rds(String),
    Inline(Arc<RouteTable>),
}

#[derive(Clone, Debug)]
pub struct ListenerCfg {
    pub name: String,
    pub addr: SocketAddr,
    pub stat_prefix: String,
    pub routes: RouteSource,
    /// Filter-level fault config, used where a route has none.
    pub default_fault: Option<Fault>,
    /// The local rate limit filter's own config (a route's replaces it); the filter comes
    /// before the fault filter. `None`: no such filter, so per-route configs do nothing.
    pub rate_limit: Option<Arc<LocalRateLimit>>,
    pub has_rate_limit_filter: bool,
    /// The TLS chain's context: a connection that starts with a TLS handshake gets it.
    pub tls: Option<super::tls::DownstreamTls>,
    /// Whether a plaintext connection has a chain (false under Istio's STRICT).
    pub plaintext: bool,
    /// RBAC filters, in order (before the rate limit and fault filters).
    pub rbac: Vec<Arc<super::rbac::Rbac>>,
    /// Path rewrites before the filters and routing (`normalize_path` and the like).
    pub path: super::normalize::PathOptions,
    /// Bound to its address (`bind_to_port`, default true); an unbound listener receives
    /// what a `use_original_dst` listener hands it.
    pub bind: bool,
    /// Hands each connection to the listener of its original destination (iptables capture).
    pub use_original_dst: bool,
    /// The `original_dst` listener filter: chains are chosen by the original destination.
    pub original_dst: bool,
    /// Chains matched by `destination_port`, each run as a listener of its own (named
    /// `NAME|PORT`, unbound).
    pub by_port: HashMap<u16, String>,
    /// A `tcp_proxy` chain (no HTTP): the cluster its connections go to.
    pub tcp_proxy: Option<String>,
    /// No chain takes what arrives here (only port-matched chains): connections are closed,
    /// as Envoy closes a connection no filter chain matches.
    pub no_chain: bool,
}

const TLS_INSPECTOR: &str = "envoy.filters.listener.tls_inspector";
use crate::xds::{ORIGINAL_DST_FILTER, TCP_PROXY_FILTER};
const ORIGINAL_DST_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
const TCP_PROXY_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const TLS_INSPECTOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";

/// The listener filters meshbench runs: `tls_inspector` and `original_dst`; returns
/// whether each is there.
fn listener_filters(l: &listener::Listener) -> Result<(bool, bool), Reject> {
    let err = |m: &str| format!("listener {}: {m}", l.name);
    let (mut inspector, mut original_dst) = (false, false);
    for f in &l.listener_filters {
        let type_url = match &f.config_type {
            Some(listener::listener_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        if f.filter_disabled.is_some() {
            return Err(err("listener filter conditions are not supported"));
        }
        if f.name == TLS_INSPECTOR || type_url == TLS_INSPECTOR_TYPE {
            inspector = true;
        } else if f.name == ORIGINAL_DST_FILTER || type_url == ORIGINAL_DST_TYPE {
            original_dst = true;
        } else {
            return Err(err(&format!(
                "listener filter {} is not supported (only {TLS_INSPECTOR} and {ORIGINAL_DST_FILTER})",
                f.name
            )));
        }
    }
    Ok((inspector, original_dst))
}

/// A group of chains as meshbench runs them (a listener's, or those of one destination port):
/// one chain, or a TLS and a plaintext chain told apart by `transport_protocol` (`tls` /
/// `raw_buffer`, which needs the tls_inspector), all with the same network filters. Returns
/// the filters' chain, the TLS context, and whether plaintext connections are served.
fn chains<'a>(
    name: &str,
    group: &[&'a listener::FilterChain],
    inspector: bool,
) -> Result<
    (
        &'a listener::FilterChain,
        Option<super::tls::DownstreamTls>,
        bool,
    ),
    Reject,
> {
    use super::tls::Socket;
    let err = |m: &str| format!("listener {name}: {m}");
    if group.is_empty() || group.len() > 2 {
        return Err(err(
            "one filter chain, or a TLS and a plaintext chain, per destination port is supported",
        ));
    }
    let mut tls = None;
    let mut plaintext = false;
    for chain in group {
        let transport = match &chain.filter_chain_match {
            None => None,
            Some(m) => {
                let only_transport = listener::FilterChainMatch {
                    transport_protocol: m.transport_protocol.clone(),
                    destination_port: m.destination_port.clone(),
                    ..Default::default()
                };
                if *m != only_transport {
                    return Err(err(
                        "filter chain matches on destination_port and transport_protocol only are supported",
                    ));
                }
                match m.transport_protocol.as_str() {
                    "" => None,
                    t @ ("tls" | "raw_buffer") => {
                        if !inspector {
                            return Err(err(&format!(
                                "a chain matching transport_protocol {t} needs the {TLS_INSPECTOR} listener filter"
                            )));
                        }
                        Some(t)
                    }
                    t => return Err(err(&format!("unknown transport_protocol {t:?}"))),
                }
            }
        };
        let socket = match &chain.transport_socket {
            None => Socket::Plaintext,
            Some(ts) => super::tls::downstream(ts).map_err(|e| err(&e))?,
        };
        match (socket, transport) {
            (Socket::Tls(_), Some("raw_buffer")) | (Socket::Plaintext, Some("tls")) => {
                return Err(err(
                    "a chain's transport socket must fit its transport_protocol match",
                ))
            }
            (Socket::Tls(t), _) => {
                if tls.replace(t).is_some() {
                    return Err(err("more than one TLS chain"));
                }
            }
            (Socket::Plaintext, _) => {
                if plaintext {
                    return Err(err("more than one plaintext chain"));
                }
                plaintext = true;
            }
        }
        if chain.filters != group[0].filters {
            return Err(err(
                "filter chains with different network filters are not supported",
            ));
        }
    }
    Ok((group[0], tls, plaintext))
}

/// A listener as meshbench runs it: the listener itself and, for chains matched by
/// destination port, one unbound listener per port (`NAME|PORT`) that the listener hands
/// those connections to.
pub fn listeners(
    l: &listener::Listener,
    stats: &ratelimit::Registry,
) -> Result<Vec<ListenerCfg>, Reject> {
    let addr = match l.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(core::address::Address::SocketAddress(sa)) => socket_addr(sa)?,
        _ => {
            return Err(format!(
                "listener {}: only socket addresses are supported",
                l.name
            ))
        }
    };
    if l.default_filter_chain.is_some() {
        return Err(format!(
            "listener {}: default_filter_chain is not supported (give a chain without a match)",
            l.name
        ));
    }
    let (inspector, original_dst) = listener_filters(l)?;
    let mut groups: std::collections::BTreeMap<Option<u16>, Vec<&listener::FilterChain>> =
        Default::default();
    for c in &l.filter_chains {
        let port = match c
            .filter_chain_match
            .as_ref()
            .and_then(|m| m.destination_port.as_ref())
        {
            None => None,
            Some(p) if p.value > 0 && p.value <= 65535 => Some(p.value as u16),
            Some(p) => {
                return Err(format!(
                    "listener {}: destination_port {} is not a port",
                    l.name, p.value
                ))
            }
        };
        groups.entry(port).or_default().push(c);
    }
    if groups.is_empty() {
        return Err(format!("listener {}: no filter chain", l.name));
    }
    let mut out = Vec::new();
    let mut by_port = HashMap::new();
    for (port, group) in &groups {
        let Some(port) = port else { continue };
        let name = format!("{}|{port}", l.name);
        let mut sub = chain_group(
            &name,
            SocketAddr::new(addr.ip(), *port),
            group,
            inspector,
            stats,
        )?;
        sub.bind = false;
        by_port.insert(*port, name);
        out.push(sub);
    }
    let mut main = match groups.get(&None) {
        Some(group) => chain_group(&l.name, addr, group, inspector, stats)?,
        // Only port-matched chains: other connections find no chain and are closed.
        None => ListenerCfg {
            no_chain: true,
            ..ListenerCfg::closed(&l.name, addr)
        },
    };
    main.bind = l.bind_to_port.as_ref().is_none_or(|b| b.value);
    main.use_original_dst = l.use_original_dst.as_ref().is_some_and(|b| b.value);
    main.original_dst = original_dst;
    main.by_port = by_port;
    out.push(main);
    Ok(out)
}

impl ListenerCfg {
    /// A listener with no chain for what it receives (connections are closed).
    fn closed(name: &str, addr: SocketAddr) -> ListenerCfg {
        ListenerCfg {
            name: name.into(),
            addr,
            stat_prefix: name.into(),
            routes: RouteSource::Inline(Arc::new(RouteTable::default())),
            default_fault: None,
            rate_limit: None,
            has_rate_limit_filter: false,
            tls: None,
            plaintext: false,
            rbac: vec![],
            path: Default::default(),
            bind: true,
            use_original_dst: false,
            original_dst: false,
            by_port: HashMap::new(),
            tcp_proxy: None,
            no_chain: false,
        }
    }
}

/// A `tcp_proxy` network filter's cluster.
fn tcp_proxy_cluster(name: &str, any: &protobuf::Any) -> Result<String, Reject> {
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
        tcp_proxy::ClusterSpecifier, TcpProxy,
    };
    let t: TcpProxy = decode(any)?;
    match t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) if !c.is_empty() => Ok(c),
        _ => Err(format!(
            "listener {name}: tcp_proxy: only a single cluster is supported (no weighted clusters)"
        )),
    }
}

/// One group of chains (a listener's own, or one destination port's): an HTTP connection
/// manager, or a `tcp_proxy`.
fn chain_group(
    name: &str,
    addr: SocketAddr,
    group: &[&listener::FilterChain],
    inspector: bool,
    stats: &ratelimit::Registry,
) -> Result<ListenerCfg, Reject> {
    let (chain, tls, plaintext) = chains(name, group, inspector)?;
    let [filter] = chain.filters.as_slice() else {
        return Err(format!(
            "listener {}: exactly one network filter (the HTTP connection manager or tcp_proxy) is supported",
            name
        ));
    };
    let any = match &filter.config_type {
        Some(listener::filter::ConfigType::TypedConfig(a)) => a,
        _ => {
            return Err(format!(
                "listener {}: network filter {} has no typed_config",
                name, filter.name
            ))
        }
    };
    if filter.name == TCP_PROXY_FILTER || any.type_url == TCP_PROXY_TYPE {
        if tls.is_some() {
            return Err(format!(
                "listener {}: tcp_proxy behind TLS is not supported",
                name
            ));
        }
        return Ok(ListenerCfg {
            tcp_proxy: Some(tcp_proxy_cluster(name, any)?),
            plaintext: true,
            ..ListenerCfg::closed(name, addr)
        });
    }
    if filter.name != HCM_FILTER && any.type_url != hcm::HttpConnectionManager::type_url() {
        return Err(format!(
            "listener {}: unsupported network filter {}",
            name, filter.name
        ));
    }
    let m: hcm::HttpConnectionManager = decode(any)?;
    let path = path_options(&m).map_err(|e| format!("listener {}: {e}", name))?;
    let mut default_fault = None;
    let mut rate_limit = None;
    let mut has_rate_limit_filter = false;
    let mut seen_fault = false;
    let mut rbac = Vec::new();
    for (i, f) in m.http_filters.iter().enumerate() {
        let last = i + 1 == m.http_filters.len();
        let type_url = match &f.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
            _ => "",
        };
        match (f.name.as_str(), type_url) {
            (ROUTER_FILTER, _) | (_, ROUTER_TYPE) if last => {}
            (ROUTER_FILTER, _) | (_, ROUTER_TYPE) => {
                return Err(format!(
                    "listener {}: the router filter must be the last HTTP filter",
                    name
                ))
            }
            (RBAC_FILTER, _) | (_, RBAC_TYPE) => {
                if has_rate_limit_filter || seen_fault {
                    return Err(format!(
                        "listener {}: RBAC filters must come before the rate limit and fault filters",
                        name
                    ));
                }
                if let Some(hcm::http_filter::ConfigType::TypedConfig(a)) = &f.config_type {
                    let pb = decode::<
                        envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac,
                    >(a)?;
                    if let Some(r) =
                        super::rbac::rbac(&pb).map_err(|e| format!("listener {}: {e}", name))?
                    {
                        rbac.push(Arc::new(r));
                    }
                }
            }
            (LOCAL_RATE_LIMIT_FILTER, _) | (_, LOCAL_RATE_LIMIT_TYPE) => {
                if has_rate_limit_filter || seen_fault {
                    return Err(format!("listener {}: one local rate limit filter, before the fault filter, is supported", name));
                }
                has_rate_limit_filter = true;
                if let Some(hcm::http_filter::ConfigType::TypedConfig(a)) = &f.config_type {
                    let pb = decode::<local_ratelimit::LocalRateLimit>(a)?;
                    rate_limit = Some(
                        local_rate_limit(&pb, stats)
                            .map_err(|e| format!("listener {}: local rate limit: {e}", name))?,
                    );
                }
            }
            (FAULT_FILTER, _) | (_, FAULT_TYPE) => {
                seen_fault = true;
                if let Some(hcm::http_filter::ConfigType::TypedConfig(a)) = &f.config_type {
                    let fc = fault_config(&decode::<fault::HttpFault>(a)?)?;
                    default_fault = Some(fc).filter(|f| f.abort.is_some() || f.delay.is_some());
                }
            }
            (name, _) => return Err(format!("listener {}: unsupported HTTP filter {name}", name)),
        }
    }
    if m.http_filters.is_empty() {
        return Err(format!("listener {}: the HTTP connection manager has no filters (requests would hang); add the router", name));
    }
    let routes = match &m.route_specifier {
        Some(hcm::http_connection_manager::RouteSpecifier::Rds(rds)) => {
            let ads = matches!(
                rds.config_source
                    .as_ref()
                    .and_then(|c| c.config_source_specifier.as_ref()),
                Some(core::config_source::ConfigSourceSpecifier::Ads(_))
            );
            if !ads {
                return Err(format!("listener {}: RDS must come over ADS", name));
            }
            RouteSource::Rds(rds.route_config_name.clone())
        }
        Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            RouteSource::Inline(Arc::new(route_table(rc, stats)?))
        }
        _ => {
            return Err(format!(
                "listener {}: the HTTP connection manager needs RDS or an inline route config",
                name
            ))
        }
    };
    Ok(ListenerCfg {
        name: name.to_string(),
        addr,
        stat_prefix: m.stat_prefix.clone(),
        routes,
        default_fault,
        rate_limit,
        has_rate_limit_filter,
        tls,
        plaintext,
        rbac,
        path,
        ..ListenerCfg::closed(name, addr)
    })
}

/// `normalize_path`, `merge_slashes` and `path_with_escaped_slashes_action` (Envoy's defaults
/// when unset: none of them).
fn path_options(m: &hcm::HttpConnectionManager) -> Result<super::normalize::PathOptions, Reject> {
    use super::normalize::EscapedSlashes;
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as A;
    let escaped_slashes = match A::try_from(m.path_with_escaped_slashes_action) {
        Ok(A::ImplementationSpecificDefault | A::KeepUnchanged) => EscapedSlashes::Keep,
        Ok(A::RejectRequest) => EscapedSlashes::Reject,
        Ok(A::UnescapeAndForward) => EscapedSlashes::Unescape,
        _ => {
            return Err("path_with_escaped_slashes_action: KEEP_UNCHANGED, REJECT_REQUEST and UNESCAPE_AND_FORWARD are supported (not UNESCAPE_AND_REDIRECT)".into())
        }
    };
    Ok(super::normalize::PathOptions {
        normalize: m.normalize_path.as_ref().is_some_and(|b| b.value),
        merge_slashes: m.merge_slashes,
        escaped_slashes,
    })
}

/// Headers to add: (name, value, append). `append_action` APPEND_IF_EXISTS_OR_ADD (the
/// default) appends, OVERWRITE_IF_EXISTS_OR_ADD replaces; the deprecated `append` wins when
/// set. Values with `%` (formatter commands) are refused.
#[allow(deprecated)] // `append` is deprecated but still sent (Istio's examples use it)
fn header_options(list: &[core::HeaderValueOption]) -> Result<Vec<HeaderAdd>, Reject> {
    let mut out = Vec::new();
    for h in list {
        let hv = h.header.as_ref().ok_or("a header is required")?;
        let name = http::HeaderName::from_bytes(hv.key.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", hv.key))?;
        let raw = if hv.raw_value.is_empty() {
            hv.value.as_bytes()
        } else {
            hv.raw_value.as_slice()
        };
        if raw.contains(&b'%') {
            return Err(format!(
                "header {:?}: formatter commands (%...%) are not supported",
                hv.key
            ));
        }
        let value = http::HeaderValue::from_bytes(raw)
            .map_err(|_| format!("invalid value for header {:?}", hv.key))?;
        let append = match (&h.append, h.append_action) {
            (Some(a), _) => a.value,
            (None, 0) => true,
            (None, 2) => false,
            (None, other) => {
                return Err(format!(
                    "append_action {other} is not supported (APPEND_IF_EXISTS_OR_ADD, OVERWRITE_IF_EXISTS_OR_ADD)"
                ))
            }
        };
        out.push((name, value, append));
    }
    Ok(out)
}

/// A header to add: (name, value, append instead of replace).
pub type HeaderAdd = (http::HeaderName, http::HeaderValue, bool);

/// A route's header operations: removals first, then additions (Envoy's order).
#[derive(Clone, Debug, Default)]
pub struct HeaderOps {
    pub remove: Vec<http::HeaderName>,
    pub add: Vec<HeaderAdd>,
}

impl HeaderOps {
    fn of(add: &[core::HeaderValueOption], remove: &[String]) -> Result<HeaderOps, Reject> {
        Ok(HeaderOps {
            remove: remove
                .iter()
                .map(|n| {
                    http::HeaderName::from_bytes(n.as_bytes())
                        .map_err(|_| format!("invalid header name {n:?}"))
                })
                .collect::<Result<_, _>>()?,
            add: header_options(add)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (k, v, append) in &self.add {
            if *append {
                headers.append(k.clone(), v.clone());
            } else {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Envoy's local rate limit config, as far as meshbench proxy runs it; the rest is refused.
fn local_rate_limit(
    p: &local_ratelimit::LocalRateLimit,
    stats: &ratelimit::Registry,
) -> Result<Arc<LocalRateLimit>, Reject> {
    if !p.descriptors.is_empty()
        || !p.rate_limits.is_empty()
        || p.local_cluster_rate_limit.is_some()
        || p.always_consume_default_token_bucket.is_some()
        || p.max_dynamic_descriptors.is_some()
    {
        return Err("descriptors and rate_limits are not supported (only the token bucket)".into());
    }
    if p.enable_x_ratelimit_headers != 0
        || !p.request_headers_to_add_when_not_enforced.is_empty()
        || p.local_rate_limit_per_downstream_connection
        || p.rate_limited_as_resource_exhausted
        || p.stage != 0
    {
        return Err("x-ratelimit headers, headers when not enforced, per-connection buckets, gRPC status and stages are not supported".into());
    }
    if p.stat_prefix.is_empty() {
        return Err("stat_prefix is required".into());
    }
    let bucket = match &p.token_bucket {
        None => None,
        Some(tb) => {
            let fill = tb.fill_interval.as_ref().map(duration).unwrap_or_default();
            if fill < Duration::from_millis(50) {
                return Err("token_bucket.fill_interval must be at least 50ms".into());
            }
            if tb.max_tokens == 0 {
                return Err("token_bucket.max_tokens must be at least 1".into());
            }
            let per_fill = tb.tokens_per_fill.as_ref().map_or(1, |v| v.value);
            if per_fill == 0 {
                return Err("token_bucket.tokens_per_fill must be at least 1".into());
            }
            Some(TokenBucket::new(tb.max_tokens, per_fill, fill))
        }
    };
    // A fraction that is not given is 0%: the filter is neither consulted nor enforced.
    let fraction = |f: &Option<core::RuntimeFractionalPercent>| {
        f.as_ref()
            .filter(|f| f.default_value.is_some())
            .map_or(0, |f| per_million(&f.default_value))
    };
    let status = match &p.status {
        None => 429,
        Some(s) if (400..=599).contains(&s.code) => s.code as u16,
        Some(s) => return Err(format!("status {} must be 400 to 599", s.code)),
    };
    let response_headers = header_options(&p.response_headers_to_add)
        .map_err(|e| format!("response_headers_to_add: {e}"))?;
    Ok(Arc::new(LocalRateLimit {
        stats: stats.get(&p.stat_prefix),
        stat_prefix: p.stat_prefix.clone(),
        bucket,
        enabled_ppm: fraction(&p.filter_enabled),
        enforced_ppm: fraction(&p.filter_enforced),
        status,
        response_headers,
    }))
}

fn socket_addr(sa: &core::SocketAddress) -> Result<SocketAddr, Reject> {
    let port = match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => p as u16,
        _ => return Err("named ports are not supported".into()),
    };
    let ip: std::net::IpAddr = sa
        .address
        .parse()
        .map_err(|_| format!("address {:?} is not an IP address", sa.address))?;
    Ok(SocketAddr::new(ip, port))
}

// ---- Routes ----------------------------------------------------------------------------------

#[derive(Debug, Default)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// lowercase domain -> virtual host index
    exact: HashMap<String, usize>,
    /// `*.suffix` domains (suffix, index), longest first
    suffixes: Vec<(String, usize)>,
    /// `prefix*` domains (prefix, index), longest first (`host:*` matches any port)
    prefixes: Vec<(String, usize)>,
    wildcard: Option<usize>,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub target: Target,
    /// `None` means no timeout (Envoy's 0s).
    pub timeout: Option<Duration>,
    /// Shared so a request takes it without copying (it holds lists).
    pub retry: Option<Arc<RetryPolicy>>,
    pub fault: Option<Fault>,
    /// This route's local rate limit config (replaces the listener's).
    pub rate_limit: Option<Arc<LocalRateLimit>>,
    pub request_headers: Arc<HeaderOps>,
    pub response_headers: Arc<HeaderOps>,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub enum Target {
    Cluster(String),
    /// (cluster, weight), total weight
    Weighted(Vec<(String, u32)>, u32),
    /// A direct response: status and body (istiod's gateway blackhole is a 404).
    Direct(u16, String),
}

impl Target {
    pub fn clusters(&self) -> Vec<&str> {
        match self {
            Target::Cluster(c) => vec![c],
            Target::Weighted(w, _) => w.iter().map(|(c, _)| c.as_str()).collect(),
            Target::Direct(..) => vec![],
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RetryPolicy {
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    /// 5xx: any 5xx response, connect failure, reset or per-try timeout.
    pub on_5xx: bool,
    /// gateway-error: 502, 503, 504 responses.
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_retriable_4xx: bool,
    /// refused-stream: an HTTP/2 upstream's REFUSED_STREAM reset.
    pub on_refused_stream: bool,
    /// retriable-status-codes (the codes count only with this condition).
    pub on_retriable_status_codes: bool,
    pub retriable_status_codes: Vec<u16>,
    /// gRPC conditions (cancelled 1, deadline-exceeded 4, resource-exhausted 8, internal 13,
    /// unavailable 14): the `grpc-status` of a response's headers.
    pub grpc_statuses: Vec<u32>,
    /// `envoy.retry_host_predicates.previous_hosts`: a retry avoids hosts already tried.
    pub previous_hosts: bool,
    /// How many times host selection is redone to find a host the predicate accepts (then
    /// the last pick is used); Envoy's default is 1.
    pub host_selection_max_attempts: u32,
}

impl RetryPolicy {
    /// Whether an upstream answer with `status` and `headers` is retried under the policy.
    pub fn retry_response(&self, status: u16, headers: &http::HeaderMap) -> bool {
        (self.on_5xx && status >= 500)
            || (self.on_gateway_error && matches!(status, 502..=504))
            || (self.on_retriable_4xx && status == 409)
            || (self.on_retriable_status_codes && self.retriable_status_codes.contains(&status))
            || (!self.grpc_statuses.is_empty()
                && headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u32>().ok())
                    .is_some_and(|g| self.grpc_statuses.contains(&g)))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fault {
    /// (delay, parts per million)
    pub delay: Option<(Duration, u32)>,
    /// (status, parts per million)
    pub abort: Option<(u16, u32)>,
}

fn fault_config(f: &fault::HttpFault) -> Result<Fault, Reject> {
    let delay = match &f.delay {
        Some(d) => match &d.fault_delay_secifier {
            Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(fd)) => {
                Some((duration(fd), per_million(&d.percentage)))
            }
            _ => return Err("fault delay: only fixed_delay is supported".into()),
        },
        None => None,
    };
    let abort = match &f.abort {
        Some(a) => match a.error_type {
            Some(fault::fault_abort::ErrorType::HttpStatus(s)) if (200..600).contains(&s) => {
                Some((s as u16, per_million(&a.percentage)))
            }
            _ => return Err("fault abort: only http_status aborts (200-599) are supported".into()),
        },
        None => None,
    };
    if !f.headers.is_empty()
        || f.max_active_faults.is_some()
        || !f.upstream_cluster.is_empty()
        || !f.downstream_nodes.is_empty()
    {
        return Err(
            "fault: header, node, cluster and max-active conditions are not supported".into(),
        );
    }
    Ok(Fault { delay, abort })
}

pub fn route_table(
    rc: &route::RouteConfiguration,
    stats: &ratelimit::Registry,
) -> Result<RouteTable, Reject> {
    let mut t = RouteTable {
        name: rc.name.clone(),
        virtual_hosts: vec![],
        exact: HashMap::new(),
        suffixes: vec![],
        prefixes: vec![],
        wildcard: None,
    };
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            let dup = if d == "*" {
                t.wildcard.replace(i).is_some()
            } else if let Some(suffix) = d.strip_prefix('*') {
                let dup = t.suffixes.iter().any(|(s, _)| s == suffix);
                t.suffixes.push((suffix.to_string(), i));
                dup
            } else if let Some(prefix) = d.strip_suffix('*') {
                let dup = t.prefixes.iter().any(|(s, _)| s == prefix);
                t.prefixes.push((prefix.to_string(), i));
                dup
            } else if d.contains('*') {
                return Err(format!(
                    "route config {}: domain {d:?} has a wildcard that is neither a prefix nor a suffix",
                    rc.name
                ));
            } else {
                t.exact.insert(d.clone(), i).is_some()
            };
            if dup {
                return Err(format!(
                    "route config {}: domain {d:?} appears in more than one virtual host",
                    rc.name
                ));
            }
        }
        let mut routes = Vec::new();
        for r in &vh.routes {
            routes.push(convert_route(r, stats).map_err(|e| {
                format!(
                    "route config {}, virtual host {}, route {:?}: {e}",
                    rc.name, vh.name, r.name
                )
            })?);
        }
        if vh.retry_policy.is_some() || !vh.typed_per_filter_config.is_empty() {
            return Err(format!("route config {}, virtual host {}: virtual-host-level retry and filter config are not supported", rc.name, vh.name));
        }
        t.virtual_hosts.push(VirtualHost {
            name: vh.name.clone(),
            routes,
        });
    }
    t.suffixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    t.prefixes.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
    Ok(t)
}

impl RouteTable {
    /// Envoy's order: exact domain, then the longest `*suffix`, then the longest `prefix*`,
    /// then `*` (a wildcard matches at least one character). `host` is lowercase.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let i = self
            .exact
            .get(host)
            .copied()
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(s, _)| host.len() > s.len() && host.ends_with(s.as_str()))
                    .map(|(_, i)| *i)
            })
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| host.len() > p.len() && host.starts_with(p.as_str()))
                    .map(|(_, i)| *i)
            })
            .or(self.wildcard)?;
        Some(&self.virtual_hosts[i])
    }

    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.virtual_hosts
            .iter()
            .flat_map(|v| v.routes.iter())
            .flat_map(|r| r.target.clusters())
    }
}

/// A header matcher (route matches, RBAC).
#[allow(deprecated)] // the deprecated header matchers are still sent by control planes
pub(crate) fn header_matcher(h: &route::HeaderMatcher) -> Result<HeaderMatch, Reject> {
    let value = ValueMatch::of(h)?;
    let name = http::HeaderName::from_bytes(h.name.as_bytes())
        .map_err(|_| format!("invalid header name {:?}", h.name))?;
    Ok(HeaderMatch { name, value })
}

#[allow(deprecated)] // the deprecated header matchers and fields are still sent by control planes
fn convert_route(r: &route::Route, stats: &ratelimit::Registry) -> Result<Route, Reject> {
    use route::route_match::PathSpecifier;
    let m = r.r#match.as_ref().ok_or("route has no match")?;
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value)
        || !m.query_parameters.is_empty()
        || m.grpc.is_some()
        || m.runtime_fraction.is_some()
        || !m.cookies.is_empty()
    {
        return Err("only path and header matches are supported".into());
    }
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => PathMatch::Regex(regex(re)?),
        _ => {
            return Err("unsupported path match (prefix, path and safe_regex are supported)".into())
        }
    };
    let headers = m
        .headers
        .iter()
        .map(header_matcher)
        .collect::<Result<Vec<_>, _>>()?;
    let action = match &r.action {
        Some(route::route::Action::Route(a)) => a,
        Some(route::route::Action::Redirect(_)) => {
            return Err("redirect routes are not supported".into())
        }
        Some(route::route::Action::DirectResponse(d)) => {
            return direct_route(r, path, headers, d);
        }
        _ => return Err("unsupported route action".into()),
    };
    if !action.prefix_rewrite.is_empty()
        || action.regex_rewrite.is_some()
        || action.host_rewrite_specifier.is_some()
        || !action.hash_policy.is_empty()
        || !action.request_mirror_policies.is_empty()
        || action.cors.is_some()
    {
        return Err("rewrites, hash policies, mirroring and CORS are not supported".into());
    }
    let request_headers = HeaderOps::of(&r.request_headers_to_add, &r.request_headers_to_remove)
        .map_err(|e| format!("request headers: {e}"))?;
    let response_headers = HeaderOps::of(&r.response_headers_to_add, &r.response_headers_to_remove)
        .map_err(|e| format!("response headers: {e}"))?;
    use route::route_action::ClusterSpecifier;
    let target = match &action.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => Target::Cluster(c.clone()),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            let list: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.as_ref().map_or(0, |w| w.value)))
                .collect();
            let total: u32 = list.iter().map(|(_, w)| w).sum();
            if total == 0 {
                return Err(
                    "Sum of weights in the weighted_cluster must be greater than 0.".into(),
                );
            }
            Target::Weighted(list, total)
        }
        _ => {
            return Err(
                "unsupported cluster specifier (cluster and weighted_clusters are supported)"
                    .into(),
            )
        }
    };
    let timeout = match &action.timeout {
        None => Some(Duration::from_secs(15)), // Envoy's default route timeout
        Some(d) => Some(duration(d)).filter(|d| !d.is_zero()),
    };
    let retry = action
        .retry_policy
        .as_ref()
        .map(retry_policy)
        .transpose()?
        .map(Arc::new);
    let mut fault = None;
    let mut rate_limit = None;
    for (name, any) in &r.typed_per_filter_config {
        match name.as_str() {
            FAULT_FILTER => fault = Some(fault_config(&decode::<fault::HttpFault>(any)?)?),
            LOCAL_RATE_LIMIT_FILTER => {
                let pb = decode::<local_ratelimit::LocalRateLimit>(any)?;
                rate_limit = Some(
                    local_rate_limit(&pb, stats).map_err(|e| format!("local rate limit: {e}"))?,
                );
            }
            _ => return Err(format!("per-route config for unsupported filter {name}")),
        }
    }
    Ok(Route {
        name: r.name.clone(),
        path,
        headers,
        target,
        timeout,
        retry,
        fault,
        rate_limit,
        request_headers: Arc::new(request_headers),
        response_headers: Arc::new(response_headers),
    })
}

/// A route answering by itself, as Envoy's `direct_response` (inline bodies only).
fn direct_route(
    r: &route::Route,
    path: PathMatch,
    headers: Vec<HeaderMatch>,
    d: &route::DirectResponseAction,
) -> Result<Route, Reject> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    if !(200..600).contains(&d.status) {
        return Err(format!(
            "direct_response status {} is not within [200, 600)",
            d.status
        ));
    }
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => String::new(),
        Some(Specifier::InlineString(s)) => s.clone(),
        Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(_) => {
            return Err(
                "direct_response bodies from files or the environment are not supported".into(),
            )
        }
    };
    if d.body_format.is_some() || !r.typed_per_filter_config.is_empty() {
        return Err(
            "direct_response with a body format or per-filter config is not supported".into(),
        );
    }
    Ok(Route {
        name: r.name.clone(),
        path,
        headers,
        target: Target::Direct(d.status as u16, body),
        timeout: None,
        retry: None,
        fault: None,
        rate_limit: None,
        request_headers: Arc::default(),
        response_headers: Arc::new(
            HeaderOps::of(&r.response_headers_to_add, &r.response_headers_to_remove)
                .map_err(|e| format!("response headers: {e}"))?,
        ),
    })
}

/// The retry policy translation, for the request path's unit tests.
#[cfg(test)]
pub(crate) fn retry_policy_for_test(p: &route::RetryPolicy) -> Result<RetryPolicy, Reject> {
    retry_policy(p)
}

const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

fn retry_policy(p: &route::RetryPolicy) -> Result<RetryPolicy, Reject> {
    let mut rp = RetryPolicy {
        num_retries: p.num_retries.as_ref().map_or(1, |n| n.value),
        per_try_timeout: p
            .per_try_timeout
            .as_ref()
            .map(duration)
            .filter(|d| !d.is_zero()),
        retriable_status_codes: p.retriable_status_codes.iter().map(|c| *c as u16).collect(),
        host_selection_max_attempts: if p.host_selection_retry_max_attempts > 0 {
            p.host_selection_retry_max_attempts.min(100) as u32
        } else {
            1
        },
        ..Default::default()
    };
    for token in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        match token {
            "5xx" => rp.on_5xx = true,
            "gateway-error" => rp.on_gateway_error = true,
            "connect-failure" => rp.on_connect_failure = true,
            "reset" | "reset-before-request" => rp.on_reset = true,
            "retriable-4xx" => rp.on_retriable_4xx = true,
            "refused-stream" => rp.on_refused_stream = true,
            "retriable-status-codes" => rp.on_retriable_status_codes = true,
            "cancelled" => rp.grpc_statuses.push(1),
            "deadline-exceeded" => rp.grpc_statuses.push(4),
            "resource-exhausted" => rp.grpc_statuses.push(8),
            "internal" => rp.grpc_statuses.push(13),
            "unavailable" => rp.grpc_statuses.push(14),
            other => return Err(format!("unsupported retry_on condition {other:?}")),
        }
    }
    for pred in &p.retry_host_predicate {
        // The typed config's type names the extension; the name alone is the older form.
        let type_url = match &pred.config_type {
            Some(route::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => {
                a.type_url.as_str()
            }
            None => "",
        };
        match (pred.name.as_str(), type_url) {
            (_, PREVIOUS_HOSTS_TYPE) | ("envoy.retry_host_predicates.previous_hosts", "") => {
                rp.previous_hosts = true
            }
            (name, t) => {
                return Err(format!(
                    "unsupported retry host predicate {name:?} ({t:?}); only previous_hosts"
                ))
            }
        }
    }
    if p.retry_priority.is_some()
        || !p.retriable_headers.is_empty()
        || !p.retriable_request_headers.is_empty()
    {
        return Err("retry priorities and header conditions are not supported".into());
    }
    Ok(rp)
}

// ---- Clusters and endpoints --------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

/// Envoy's default circuit breaker thresholds.
pub const DEFAULT_THRESHOLDS: Thresholds = Thresholds {
    max_connections: 1024,
    max_pending_requests: 1024,
    max_requests: 1024,
    max_retries: 3,
};

#[derive(Clone, Debug, PartialEq)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 answers or local failures (connect, reset, timeout).
    pub consecutive_gateway_failure: u32,
    /// Percent chance that a detected outlier is ejected (Envoy: 100 for 5xx, 0 for
    /// gateway failures unless configured).
    pub enforcing_consecutive_5xx: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    /// Envoy's defaults.
    fn default() -> Self {
        Outlier {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    /// Its `envoy.transport_socket_match` metadata (string values).
    pub socket_match: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Discovery {
    Eds(String),
    Static(Vec<Endpoint>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClusterCfg {
    pub name: String,
    pub discovery: Discovery,
    pub lb: Lb,
    pub connect_timeout: Duration,
    pub thresholds: Thresholds,
    pub outlier: Option<Outlier>,
    /// Percent of available hosts below which every host is used (panic mode).
    pub panic_threshold: f64,
    pub http2: bool,
    pub max_requests_per_connection: Option<u32>,
    /// The cluster's TLS context, when any of its sockets uses one.
    pub tls: Option<super::tls::UpstreamTls>,
    /// `transport_socket_matches`: (metadata to match, TLS or not), first match wins; else
    /// `tls_default`.
    pub tls_matches: Vec<(std::collections::BTreeMap<String, String>, bool)>,
    pub tls_default: bool,
    /// ORIGINAL_DST: no endpoints; a `tcp_proxy` connection goes to its original destination.
    pub original_dst: bool,
    /// `upstream_bind_config.source_address` (ORIGINAL_DST clusters): connections come from it.
    pub bind_source: Option<std::net::IpAddr>,
}

impl ClusterCfg {
    /// Whether connections to an endpoint with this metadata use TLS.
    pub fn uses_tls(&self, md: &std::collections::BTreeMap<String, String>) -> bool {
        self.tls_matches
            .iter()
            .find(|(m, _)| m.iter().all(|(k, v)| md.get(k) == Some(v)))
            .map_or(self.tls_default, |(_, t)| *t)
    }
}

/// String fields of a Struct (other values refuse the match).
fn string_fields(
    s: &protobuf::Struct,
) -> Result<std::collections::BTreeMap<String, String>, Reject> {
    s.fields
        .iter()
        .map(|(k, v)| match &v.kind {
            Some(protobuf::value::Kind::StringValue(x)) => Ok((k.clone(), x.clone())),
            _ => Err(format!("metadata {k}: only string values are supported")),
        })
        .collect()
}

/// The cluster's transport: its TLS context (one, shared by every TLS socket), the matches
/// and the default.
type ClusterTransport = (
    Option<super::tls::UpstreamTls>,
    Vec<(std::collections::BTreeMap<String, String>, bool)>,
    bool,
);

fn cluster_transport(c: &cluster::Cluster) -> Result<ClusterTransport, Reject> {
    use super::tls::Socket;
    let err = |m: &str| format!("cluster {}: {m}", c.name);
    let mut ctx: Option<super::tls::UpstreamTls> = None;
    let mut is_tls = |ts: &core::TransportSocket| -> Result<bool, Reject> {
        match super::tls::upstream(ts).map_err(|e| err(&e))? {
            Socket::Plaintext => Ok(false),
            Socket::Tls(t) => {
                if ctx.as_ref().is_some_and(|c| *c != t) {
                    return Err(err(
                        "transport sockets with different TLS contexts are not supported",
                    ));
                }
                ctx = Some(t);
                Ok(true)
            }
        }
    };
    let default = match &c.transport_socket {
        Some(ts) => is_tls(ts)?,
        None => false,
    };
    let mut matches = Vec::new();
    for m in &c.transport_socket_matches {
        let socket = m
            .transport_socket
            .as_ref()
            .ok_or_else(|| err(&format!("transport socket match {} has no socket", m.name)))?;
        let md = m
            .r#match
            .as_ref()
            .map(string_fields)
            .transpose()?
            .unwrap_or_default();
        matches.push((md, is_tls(socket)?));
    }
    Ok((ctx, matches, default))
}

#[allow(deprecated)] // max_requests_per_connection on the Cluster is still honoured
pub fn cluster(c: &cluster::Cluster) -> Result<ClusterCfg, Reject> {
    use cluster::cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy};
    let err = |m: &str| format!("cluster {}: {m}", c.name);
    let discovery = match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32 => {
            let eds = c
                .eds_cluster_config
                .as_ref()
                .ok_or_else(|| err("cannot create an EDS cluster without an EDS config"))?;
            let ads = matches!(
                eds.eds_config
                    .as_ref()
                    .and_then(|s| s.config_source_specifier.as_ref()),
                Some(core::config_source::ConfigSourceSpecifier::Ads(_))
            );
            if !ads {
                return Err(err("EDS must come over ADS"));
            }
            Discovery::Eds(if eds.service_name.is_empty() {
                c.name.clone()
            } else {
                eds.service_name.clone()
            })
        }
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Static as i32 => {
            let cla = c
                .load_assignment
                .as_ref()
                .ok_or_else(|| err("a STATIC cluster needs a load_assignment"))?;
            Discovery::Static(endpoints(cla)?)
        }
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::OriginalDst as i32 => {
            if c.lb_policy != LbPolicy::ClusterProvided as i32 {
                return Err(err(
                    "an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED",
                ));
            }
            if c.load_assignment.is_some() || c.lb_config.is_some() {
                return Err(err(
                    "an ORIGINAL_DST cluster takes no load_assignment; original_dst_lb_config is not supported",
                ));
            }
            Discovery::Static(vec![])
        }
        _ => {
            return Err(err(
                "only EDS, STATIC and ORIGINAL_DST clusters are supported",
            ))
        }
    };
    let original_dst = c.cluster_discovery_type
        == Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32,
        ));
    let lb = match LbPolicy::try_from(c.lb_policy) {
        Ok(LbPolicy::ClusterProvided) if original_dst => Lb::RoundRobin,
        Ok(LbPolicy::RoundRobin) => Lb::RoundRobin,
        Ok(LbPolicy::LeastRequest) => Lb::LeastRequest,
        Ok(LbPolicy::Random) => Lb::Random,
        _ => {
            return Err(err(
                "unsupported lb_policy (ROUND_ROBIN, LEAST_REQUEST and RANDOM are supported)",
            ))
        }
    };
    let (tls, tls_matches, tls_default) = cluster_transport(c)?;
    // An ORIGINAL_DST cluster may say where its connections come from (istiod's inbound
    // passthrough binds 127.0.0.6); nothing else of a bind config is run.
    let bind_source = match &c.upstream_bind_config {
        Some(b) if original_dst => {
            let only_source = core::BindConfig {
                source_address: b.source_address.clone(),
                ..Default::default()
            };
            let sa = b
                .source_address
                .as_ref()
                .filter(|_| *b == only_source)
                .ok_or_else(|| err("upstream_bind_config: only source_address is supported"))?;
            Some(socket_addr(sa)?.ip())
        }
        _ => None,
    };
    if !c.health_checks.is_empty()
        || c.lb_subset_config.is_some()
        || c.load_balancing_policy.is_some()
        || (c.upstream_bind_config.is_some() && !original_dst)
    {
        return Err(err(
            "health checks, subset LB, load_balancing_policy and bind config are not supported",
        ));
    }
    let mut thresholds = DEFAULT_THRESHOLDS;
    if let Some(cb) = &c.circuit_breakers {
        for t in &cb.thresholds {
            if t.priority != core::RoutingPriority::Default as i32 {
                continue; // high-priority routes do not exist here
            }
            let v = |o: &Option<protobuf::UInt32Value>, d| o.as_ref().map_or(d, |v| v.value);
            thresholds = Thresholds {
                max_connections: v(&t.max_connections, 1024),
                max_pending_requests: v(&t.max_pending_requests, 1024),
                max_requests: v(&t.max_requests, 1024),
                max_retries: v(&t.max_retries, 3),
            };
        }
    }
    let outlier = match &c.outlier_detection {
        None => None,
        Some(o) => {
            if o.split_external_local_origin_errors
                || o.enforcing_success_rate
                    .as_ref()
                    .is_some_and(|v| v.value > 0)
                || o.enforcing_failure_percentage
                    .as_ref()
                    .is_some_and(|v| v.value > 0)
                || o.enforcing_failure_percentage_local_origin
                    .as_ref()
                    .is_some_and(|v| v.value > 0)
            {
                return Err(err("outlier detection: only consecutive 5xx and gateway failures are supported (no success rate, failure percentage or split local-origin errors)"));
            }
            let d = Outlier::default();
            let n = |v: &Option<protobuf::UInt32Value>, default: u32| {
                v.as_ref().map_or(default, |v| v.value)
            };
            let t = |v: &Option<protobuf::Duration>, default: Duration| {
                v.as_ref().map_or(default, duration)
            };
            let interval = t(&o.interval, d.interval);
            if interval.is_zero() {
                return Err(err("outlier detection: interval must be above 0"));
            }
            Some(Outlier {
                consecutive_5xx: n(&o.consecutive_5xx, d.consecutive_5xx),
                consecutive_gateway_failure: n(
                    &o.consecutive_gateway_failure,
                    d.consecutive_gateway_failure,
                ),
                enforcing_consecutive_5xx: n(
                    &o.enforcing_consecutive_5xx,
                    d.enforcing_consecutive_5xx,
                ),
                enforcing_consecutive_gateway_failure: n(
                    &o.enforcing_consecutive_gateway_failure,
                    d.enforcing_consecutive_gateway_failure,
                ),
                interval,
                base_ejection_time: t(&o.base_ejection_time, d.base_ejection_time),
                max_ejection_time: t(&o.max_ejection_time, d.max_ejection_time),
                max_ejection_percent: n(&o.max_ejection_percent, d.max_ejection_percent),
            })
        }
    };
    // Below this share of available hosts the load balancer uses them all (Envoy: 50%).
    let panic_threshold = c
        .common_lb_config
        .as_ref()
        .and_then(|l| l.healthy_panic_threshold.as_ref())
        .map_or(50.0, |p| p.value.clamp(0.0, 100.0));
    let mut http2 = false;
    let mut max_requests_per_connection = c.max_requests_per_connection.as_ref().map(|v| v.value);
    for (k, any) in &c.typed_extension_protocol_options {
        if k != HTTP_OPTIONS_KEY {
            return Err(err(&format!("unsupported protocol options {k}")));
        }
        let o: upstream_http::HttpProtocolOptions = decode(any)?;
        use upstream_http::http_protocol_options::{
            explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
        };
        match &o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                http2 = matches!(
                    e.protocol_config,
                    Some(ProtocolConfig::Http2ProtocolOptions(_))
                )
            }
            None => {}
            Some(_) => {
                return Err(err(
                    "only explicit HTTP/1.1 or HTTP/2 upstream protocol options are supported",
                ))
            }
        }
        if let Some(n) = o
            .common_http_protocol_options
            .as_ref()
            .and_then(|c| c.max_requests_per_connection.as_ref())
        {
            max_requests_per_connection = Some(n.value);
        }
    }
    Ok(ClusterCfg {
        name: c.name.clone(),
        discovery,
        lb,
        connect_timeout: c
            .connect_timeout
            .as_ref()
            .map_or(Duration::from_secs(5), duration),
        thresholds,
        outlier,
        panic_threshold,
        http2,
        max_requests_per_connection: max_requests_per_connection.filter(|n| *n > 0),
        tls,
        tls_matches,
        tls_default,
        original_dst,
        bind_source,
    })
}

pub fn endpoints(cla: &endpoint::ClusterLoadAssignment) -> Result<Vec<Endpoint>, Reject> {
    let mut out = Vec::new();
    for loc in &cla.endpoints {
        for e in &loc.lb_endpoints {
            let ep = match &e.host_identifier {
                Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
                _ => {
                    return Err(format!(
                        "{}: only inline endpoints are supported",
                        cla.cluster_name
                    ))
                }
            };
            let addr = match ep.address.as_ref().and_then(|a| a.address.as_ref()) {
                Some(core::address::Address::SocketAddress(sa)) => {
                    socket_addr(sa).map_err(|e| format!("{}: {e}", cla.cluster_name))?
                }
                _ => {
                    return Err(format!(
                        "{}: only socket addresses are supported",
                        cla.cluster_name
                    ))
                }
            };
            let healthy = matches!(
                core::HealthStatus::try_from(e.health_status),
                Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) | Err(_)
            );
            let socket_match = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get(SOCKET_MATCH_KEY))
                .map(string_fields)
                .transpose()
                .map_err(|m| format!("{}: {m}", cla.cluster_name))?
                .unwrap_or_default();
            out.push(Endpoint {
                addr,
                weight: e
                    .load_balancing_weight
                    .as_ref()
                    .map_or(1, |w| w.value.max(1)),
                healthy,
                socket_match,
            });
        }
    }
    Ok(out)
}
