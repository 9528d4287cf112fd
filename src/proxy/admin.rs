//! The Envoy-style admin port: `/clusters` (Envoy's text format, `?format=json`),
//! `/config_dump`, `/stats`, `/stats/prometheus`, `/ready`, `/server_info`, `/listeners`,
//! `/quitquitquit`.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::resources::{Discovery, Lb, PathMatch, RouteSource, Target};
use super::state::Proxy;
use crate::net::{self, Limits};
use crate::shutdown::Shutdown;
use std::net::SocketAddr;

/// Most admin connections open at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// Environment variable carrying the token `POST /quitquitquit` needs from other hosts.
pub const ADMIN_TOKEN_ENV: &str = "MESHBENCH_ADMIN_TOKEN";

pub async fn serve(proxy: Arc<Proxy>, sock: TcpListener, shutdown: Shutdown) {
    use futures::StreamExt;
    let started = Instant::now();
    let mut conns = net::incoming(sock, Limits::new(MAX_ADMIN_CONNECTIONS), shutdown.wait());
    while let Some(Ok(conn)) = conns.next().await {
        let proxy = proxy.clone();
        let peer = conn.peer;
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(handle(&proxy, started, peer, req)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), svc)
                .await;
        });
    }
}

/// `/quitquitquit` stops the proxy: only from this host, or with the admin token.
fn may_quit(proxy: &Proxy, peer: SocketAddr, req: &Request<hyper::body::Incoming>) -> bool {
    if net::is_loopback(&peer) {
        return true;
    }
    proxy
        .cfg
        .admin_token
        .as_deref()
        .is_some_and(|token| net::bearer_is(req.headers(), token))
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn handle(
    proxy: &Proxy,
    started: Instant,
    peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let json_format = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "format=json"));
    match (req.method(), req.uri().path()) {
        (_, "/clusters") if json_format => reply(StatusCode::OK, "application/json", clusters_json(proxy).to_string()),
        (_, "/clusters") => reply(StatusCode::OK, "text/plain", clusters_text(proxy)),
        (_, "/config_dump") => reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&config_dump(proxy)).unwrap_or_default()),
        (_, "/stats/prometheus") => reply(StatusCode::OK, "text/plain; version=0.0.4", prometheus(proxy)),
        (_, "/stats") if json_format => {
            let stats: Vec<Value> = stats(proxy).into_iter().map(|s| json!({"name": s.name, "value": s.value})).collect();
            reply(StatusCode::OK, "application/json", json!({ "stats": stats }).to_string())
        }
        (_, "/stats") => {
            let mut out = String::new();
            for s in stats(proxy) {
                let _ = writeln!(out, "{}: {}", s.name, s.value);
            }
            reply(StatusCode::OK, "text/plain", out)
        }
        (_, "/ready") if proxy.initialized.load(Relaxed) => reply(StatusCode::OK, "text/plain", "LIVE\n".into()),
        (_, "/ready") => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "PRE_INITIALIZING\n".into()),
        (_, "/server_info") => {
            let state = if proxy.initialized.load(Relaxed) { "LIVE" } else { "PRE_INITIALIZING" };
            let info = json!({
                "version": format!("meshbench/{}", env!("CARGO_PKG_VERSION")),
                "state": state,
                "uptime_current_epoch": format!("{}s", started.elapsed().as_secs()),
                "node": {"id": proxy.cfg.node_id, "cluster": proxy.cfg.cluster, "metadata": {"LABELS": proxy.cfg.labels}},
            });
            reply(StatusCode::OK, "application/json", info.to_string())
        }
        (_, "/listeners") => {
            let mut out = String::new();
            for (name, addr) in proxy.bound_listeners() {
                let _ = writeln!(out, "{name}::{addr}");
            }
            reply(StatusCode::OK, "text/plain", out)
        }
        (&Method::POST, "/quitquitquit") if !may_quit(proxy, peer, &req) => reply(StatusCode::FORBIDDEN, "text/plain", "quitquitquit needs a loopback peer or the admin token\n".into()),
        (&Method::POST, "/quitquitquit") => {
            proxy.quit();
            reply(StatusCode::OK, "text/plain", "OK\n".into())
        }
        (_, "/quitquitquit") => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "This endpoint requires POST\n".into()),
        // As Envoy's: stop accepting (every listener, or only inbound ones with
        // `inboundonly`); connections already open are served, and answers close them.
        (&Method::POST, "/drain_listeners") if !may_quit(proxy, peer, &req) => reply(StatusCode::FORBIDDEN, "text/plain", "drain_listeners needs a loopback peer or the admin token\n".into()),
        (&Method::POST, "/drain_listeners") => {
            let inbound_only = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "inboundonly"));
            proxy.drain_listeners(inbound_only);
            reply(StatusCode::OK, "text/plain", "OK\n".into())
        }
        (_, "/drain_listeners") => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "This endpoint requires POST\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "invalid path; see /clusters, /config_dump, /stats, /stats/prometheus, /ready, /server_info, /listeners, /quitquitquit\n".into()),
    }
}

fn clusters_text(proxy: &Proxy) -> String {
    let state = proxy.state();
    let mut names: Vec<&String> = state.clusters.keys().collect();
    names.sort();
    let mut out = String::new();
    for name in names {
        let c = &state.clusters[name];
        let t = c.cfg.thresholds;
        let _ = writeln!(out, "{name}::observability_name::{name}");
        for prio in ["default_priority", "high_priority"] {
            let _ = writeln!(
                out,
                "{name}::{prio}::max_connections::{}",
                t.max_connections
            );
            let _ = writeln!(
                out,
                "{name}::{prio}::max_pending_requests::{}",
                t.max_pending_requests
            );
            let _ = writeln!(out, "{name}::{prio}::max_requests::{}", t.max_requests);
            let _ = writeln!(out, "{name}::{prio}::max_retries::{}", t.max_retries);
        }
        let _ = writeln!(out, "{name}::added_via_api::true");
        for h in c.hosts().iter() {
            let a = h.addr;
            let s = &h.stats;
            for (k, v) in [
                ("cx_active", &s.cx_active),
                ("cx_connect_fail", &s.cx_connect_fail),
                ("cx_total", &s.cx_total),
                ("rq_active", &s.rq_active),
                ("rq_error", &s.rq_error),
                ("rq_success", &s.rq_success),
                ("rq_timeout", &s.rq_timeout),
                ("rq_total", &s.rq_total),
            ] {
                let _ = writeln!(out, "{name}::{a}::{k}::{}", v.load(Relaxed));
            }
            let _ = writeln!(out, "{name}::{a}::hostname::");
            let _ = writeln!(out, "{name}::{a}::health_flags::{}", h.health_flags());
            let _ = writeln!(out, "{name}::{a}::weight::{}", h.weight);
            for k in ["region", "zone", "sub_zone"] {
                let _ = writeln!(out, "{name}::{a}::{k}::");
            }
            let _ = writeln!(out, "{name}::{a}::canary::false");
            let _ = writeln!(out, "{name}::{a}::priority::0");
            let _ = writeln!(out, "{name}::{a}::success_rate::-1");
            let _ = writeln!(out, "{name}::{a}::local_origin_success_rate::-1");
        }
    }
    out
}

fn clusters_json(proxy: &Proxy) -> Value {
    let state = proxy.state();
    let mut statuses: Vec<Value> = state
        .clusters
        .iter()
        .map(|(name, c)| {
            let t = c.cfg.thresholds;
            let hosts: Vec<Value> = c
                .hosts()
                .iter()
                .map(|h| {
                    let s = &h.stats;
                    let stat = |n: &str, v: &AtomicU64| json!({"name": n, "value": v.load(Relaxed).to_string()});
                    json!({
                        "address": {"socket_address": {"address": h.addr.ip().to_string(), "port_value": h.addr.port()}},
                        "stats": [stat("cx_active", &s.cx_active), stat("cx_connect_fail", &s.cx_connect_fail), stat("cx_total", &s.cx_total),
                                  stat("rq_active", &s.rq_active), stat("rq_error", &s.rq_error), stat("rq_success", &s.rq_success),
                                  stat("rq_timeout", &s.rq_timeout), stat("rq_total", &s.rq_total)],
                        "health_status": {
                            "eds_health_status": if h.healthy { "HEALTHY" } else { "UNHEALTHY" },
                            "failed_outlier_check": h.ejected(tokio::time::Instant::now()),
                        },
                        "weight": h.weight,
                    })
                })
                .collect();
            json!({
                "name": name,
                "observability_name": name,
                "added_via_api": true,
                "circuit_breakers": {"thresholds": [
                    {"max_connections": t.max_connections, "max_pending_requests": t.max_pending_requests, "max_requests": t.max_requests, "max_retries": t.max_retries},
                ]},
                "host_statuses": hosts,
            })
        })
        .collect();
    statuses.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({ "cluster_statuses": statuses })
}

fn config_dump(proxy: &Proxy) -> Value {
    let state = proxy.state();
    let received = proxy.received.lock().unwrap().clone();
    let meta = |t: &str| {
        received
            .get(t)
            .map(|r| json!({"version_info": r.version_info, "last_updated_ms": r.last_updated_ms}))
            .unwrap_or(Value::Null)
    };
    let mut clusters: Vec<Value> = state
        .clusters
        .values()
        .map(|c| {
            let cfg = &c.cfg;
            json!({
                "name": cfg.name,
                "type": match &cfg.discovery { Discovery::Eds(_) => "EDS", Discovery::Static(_) => "STATIC" },
                "eds_service_name": match &cfg.discovery { Discovery::Eds(n) => Some(n), Discovery::Static(_) => None },
                "lb_policy": match cfg.lb { Lb::RoundRobin => "ROUND_ROBIN", Lb::LeastRequest => "LEAST_REQUEST", Lb::Random => "RANDOM" },
                "connect_timeout_ms": cfg.connect_timeout.as_millis() as u64,
                "circuit_breakers": {"max_connections": cfg.thresholds.max_connections, "max_pending_requests": cfg.thresholds.max_pending_requests,
                                     "max_requests": cfg.thresholds.max_requests, "max_retries": cfg.thresholds.max_retries},
                "outlier_detection": cfg.outlier.as_ref().map(|o| json!({"consecutive_5xx": o.consecutive_5xx, "base_ejection_time_ms": o.base_ejection_time.as_millis() as u64, "max_ejection_percent": o.max_ejection_percent})),
                "http2": cfg.http2,
                "endpoints": c.hosts().iter().map(|h| json!({"address": h.addr.to_string(), "weight": h.weight, "healthy": h.healthy})).collect::<Vec<_>>(),
            })
        })
        .collect();
    clusters.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let route_json = |t: &super::resources::RouteTable| {
        json!({
            "name": t.name,
            "virtual_hosts": t.virtual_hosts.iter().map(|vh| json!({
                "name": vh.name,
                "routes": vh.routes.iter().map(|r| json!({
                    "name": r.name,
                    "match": match &r.path { PathMatch::Prefix(p) => json!({"prefix": p}), PathMatch::Exact(p) => json!({"path": p}), PathMatch::Regex(re) => json!({"safe_regex": re.as_str()}) },
                    "headers": r.headers.iter().map(|h| json!({"name": h.name.as_str(), "match": format!("{:?}", h.value.matcher), "invert": h.value.invert, "treat_missing_header_as_empty": h.value.missing_as_empty})).collect::<Vec<_>>(),
                    "route": match &r.target {
                        Target::Cluster(c) => json!({"cluster": c}),
                        Target::Weighted(w, _) => json!({"weighted_clusters": {"clusters": w.iter().map(|(n, w)| json!({"name": n, "weight": w})).collect::<Vec<_>>()}}),
                        Target::Direct(status, body) => json!({"direct_response": {"status": status, "body": body}}),
                    },
                    "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                    "retry_policy": r.retry.as_ref().map(|p| json!({"num_retries": p.num_retries, "per_try_timeout_ms": p.per_try_timeout.map(|t| t.as_millis() as u64)})),
                    "fault": r.fault.as_ref().map(|f| format!("{f:?}")),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    };
    let mut routes: Vec<Value> = state.routes.values().map(|t| route_json(t)).collect();
    routes.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut listeners: Vec<Value> = state
        .listeners
        .values()
        .map(|l| {
            json!({
                "name": l.name,
                "address": l.addr.to_string(),
                "stat_prefix": l.stat_prefix,
                "bind_to_port": l.bind,
                "use_original_dst": l.use_original_dst,
                "original_dst_filter": l.original_dst,
                "tcp_proxy": l.tcp_proxy,
                "rds": match &l.routes { RouteSource::Rds(n) => Some(n.clone()), RouteSource::Inline(_) => None },
                "route_config": match &l.routes { RouteSource::Inline(t) => Some(route_json(t)), RouteSource::Rds(_) => None },
            })
        })
        .collect();
    listeners.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    json!({
        "node": {"id": proxy.cfg.node_id, "cluster": proxy.cfg.cluster},
        "configs": [
            {"@type": "meshbench.admin.ClustersConfigDump", "cds": meta("cds"), "eds": meta("eds"), "dynamic_active_clusters": clusters},
            {"@type": "meshbench.admin.ListenersConfigDump", "lds": meta("lds"), "dynamic_listeners": listeners},
            {"@type": "meshbench.admin.RoutesConfigDump", "rds": meta("rds"), "dynamic_route_configs": routes},
            {"@type": "meshbench.admin.SecretsConfigDump", "sds": meta("sds"), "dynamic_active_secrets": proxy.tls.summary().into_iter().map(|(n, t)| json!({"name": n, "type": t})).collect::<Vec<_>>()},
        ],
    })
}

pub struct Stat {
    /// Envoy's dotted name, e.g. `cluster.NAME.upstream_rq_total`.
    pub name: String,
    /// Prometheus family and labels.
    prom: String,
    labels: String,
    pub value: u64,
}

fn stat(name: String, prom: &str, labels: String, value: u64) -> Stat {
    Stat {
        name,
        prom: format!("envoy_{prom}"),
        labels,
        value,
    }
}

pub fn stats(proxy: &Proxy) -> Vec<Stat> {
    let mut out = Vec::new();
    let state = proxy.state();
    let mut names: Vec<&String> = state.clusters.keys().collect();
    names.sort();
    for name in names {
        let c = &state.clusters[name];
        let s = &c.stats;
        let labels = format!("envoy_cluster_name=\"{name}\"");
        let mut add = |k: &str, v: u64| {
            out.push(stat(
                format!("cluster.{name}.{k}"),
                &format!("cluster_{}", k.replace('.', "_")),
                labels.clone(),
                v,
            ))
        };
        for (k, v) in [
            ("upstream_rq_total", &s.upstream_rq_total),
            ("upstream_rq_2xx", &s.upstream_rq_2xx),
            ("upstream_rq_3xx", &s.upstream_rq_3xx),
            ("upstream_rq_4xx", &s.upstream_rq_4xx),
            ("upstream_rq_5xx", &s.upstream_rq_5xx),
            ("upstream_rq_active", &s.upstream_rq_active),
            ("upstream_rq_retry", &s.upstream_rq_retry),
            ("upstream_rq_retry_overflow", &s.upstream_rq_retry_overflow),
            ("upstream_rq_timeout", &s.upstream_rq_timeout),
            (
                "upstream_rq_per_try_timeout",
                &s.upstream_rq_per_try_timeout,
            ),
            (
                "upstream_rq_pending_overflow",
                &s.upstream_rq_pending_overflow,
            ),
            ("upstream_rq_pending_total", &s.upstream_rq_pending_total),
            ("upstream_cx_total", &s.upstream_cx_total),
            ("upstream_cx_active", &s.upstream_cx_active),
            ("upstream_cx_connect_fail", &s.upstream_cx_connect_fail),
            ("ssl.handshake", &s.ssl_handshake),
            ("ssl.connection_error", &s.ssl_connection_error),
            (
                "outlier_detection.ejections_enforced_total",
                &s.ejections_enforced_total,
            ),
            (
                "outlier_detection.ejections_overflow",
                &s.ejections_overflow,
            ),
        ] {
            add(k, v.load(Relaxed));
        }
        let hosts = c.hosts();
        add(
            "outlier_detection.ejections_active",
            c.ejections_active() as u64,
        );
        add("membership_total", hosts.len() as u64);
        add(
            "membership_healthy",
            hosts.iter().filter(|h| h.healthy).count() as u64,
        );
    }
    for (prefix, s) in proxy.http_stats.lock().unwrap().iter() {
        let labels = format!("envoy_http_conn_manager_prefix=\"{prefix}\"");
        for (k, v) in [
            ("downstream_cx_total", &s.downstream_cx_total),
            ("downstream_cx_active", &s.downstream_cx_active),
            ("downstream_rq_total", &s.downstream_rq_total),
            ("downstream_rq_2xx", &s.downstream_rq_2xx),
            ("downstream_rq_3xx", &s.downstream_rq_3xx),
            ("downstream_rq_4xx", &s.downstream_rq_4xx),
            ("downstream_rq_5xx", &s.downstream_rq_5xx),
            ("no_route", &s.no_route),
            ("no_cluster", &s.no_cluster),
            ("rbac.allowed", &s.rbac_allowed),
            ("rbac.denied", &s.rbac_denied),
        ] {
            out.push(stat(
                format!("http.{prefix}.{k}"),
                &format!("http_{k}"),
                labels.clone(),
                v.load(Relaxed),
            ));
        }
    }
    for (name, s) in proxy.listener_stats.lock().unwrap().iter() {
        let labels = format!("envoy_listener_address=\"{name}\"");
        for (k, v) in [
            ("ssl.handshake", &s.ssl_handshake),
            ("ssl.connection_error", &s.ssl_connection_error),
            ("no_filter_chain_match", &s.no_filter_chain_match),
        ] {
            out.push(stat(
                format!("listener.{name}.{k}"),
                &format!("listener_{}", k.replace('.', "_")),
                labels.clone(),
                v.load(Relaxed),
            ));
        }
    }
    for (prefix, s) in proxy.rate_limits.all() {
        let labels = format!("envoy_local_rate_limit_prefix=\"{prefix}\"");
        for (k, v) in s.counters() {
            out.push(stat(
                format!("{prefix}.http_local_rate_limit.{k}"),
                &format!("http_local_rate_limit_{k}"),
                labels.clone(),
                v,
            ));
        }
    }
    let x = &proxy.xds_stats;
    out.push(stat(
        "control_plane.connected_state".into(),
        "control_plane_connected_state",
        String::new(),
        proxy.connected.load(Relaxed) as u64,
    ));
    for (k, v) in [
        ("update_success", &x.acks),
        ("update_rejected", &x.nacks),
        ("update_attempt", &x.responses),
    ] {
        out.push(stat(
            format!("control_plane.{k}"),
            &format!("control_plane_{k}"),
            String::new(),
            v.load(Relaxed),
        ));
    }
    out.push(stat(
        "cluster_manager.active_clusters".into(),
        "cluster_manager_active_clusters",
        String::new(),
        state.clusters.len() as u64,
    ));
    out.push(stat(
        "listener_manager.total_listeners_active".into(),
        "listener_manager_total_listeners_active",
        String::new(),
        proxy.bound_listeners().len() as u64,
    ));
    out
}

fn prometheus(proxy: &Proxy) -> String {
    let mut out = String::new();
    let mut last = String::new();
    let mut all = stats(proxy);
    all.sort_by(|a, b| a.prom.cmp(&b.prom));
    for s in all {
        if s.prom != last {
            let _ = writeln!(out, "# TYPE {} counter", s.prom);
            last = s.prom.clone();
        }
        if s.labels.is_empty() {
            let _ = writeln!(out, "{} {}", s.prom, s.value);
        } else {
            let _ = writeln!(out, "{}{{{}}} {}", s.prom, s.labels, s.value);
        }
    }
    out
}
