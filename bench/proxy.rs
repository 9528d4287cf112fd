//! Proxy hot-path pieces: route matching over a bookinfo-sized route table, and the
//! load-balancer pick. Run: `cargo bench --bench proxy`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use meshbench::proxy::resources::{self, ClusterCfg, Discovery, Endpoint, Lb, DEFAULT_THRESHOLDS};
use meshbench::proxy::upstream::{pick, Cluster};
use meshbench::xds::snapshot::Snapshot;
use prost::Message;

fn route_table(services: usize) -> resources::RouteTable {
    let mut text = String::new();
    for s in 0..services {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: svc-{s}}}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-{s}}}\nspec: {{host: svc-{s}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc-{s}}}\nspec:\n  hosts: [svc-{s}]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: svc-{s}, subset: v2}}}}]\n  - route:\n    - {{destination: {{host: svc-{s}, subset: v1}}, weight: 50}}\n    - {{destination: {{host: svc-{s}, subset: v2}}, weight: 50}}\n---\n"
        ));
    }
    let objects = meshbench::config::parse("bench.yaml", &text)
        .unwrap()
        .objects;
    let mesh = meshbench::model::compile::compile(objects.iter(), [], false).unwrap();
    let snap = Snapshot::build(1, Arc::new(mesh), Instant::now(), SystemTime::now());
    let rc = RouteConfiguration::decode(snap.routes["15001"].any.value.as_slice()).unwrap();
    resources::route_table(&rc, &Default::default()).unwrap()
}

fn bench(c: &mut Criterion) {
    let table = route_table(100);
    let mut g = c.benchmark_group("proxy");
    g.bench_function("virtual_host_lookup_100_services", |b| {
        b.iter(|| table.virtual_host(black_box("svc-57:9080")).is_some())
    });
    let vh = table.virtual_host("svc-57:9080").unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("end-user", http::HeaderValue::from_static("alice"));
    g.bench_function("route_match_header_then_default", |b| {
        b.iter(|| {
            vh.routes.iter().position(|r| {
                r.headers
                    .iter()
                    .all(|h| h.value.matches_header(black_box(&headers), &h.name))
            })
        })
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    for (name, lb) in [
        ("round_robin", Lb::RoundRobin),
        ("least_request", Lb::LeastRequest),
        ("random", Lb::Random),
    ] {
        let endpoints: Vec<Endpoint> = (0..100)
            .map(|i| Endpoint {
                addr: format!("10.0.0.{}:9080", i + 1).parse().unwrap(),
                weight: 1,
                healthy: true,
                socket_match: Default::default(),
            })
            .collect();
        let cfg = ClusterCfg {
            name: "c".into(),
            discovery: Discovery::Static(endpoints),
            lb,
            connect_timeout: std::time::Duration::from_secs(1),
            thresholds: DEFAULT_THRESHOLDS,
            outlier: None,
            panic_threshold: 50.0,
            http2: false,
            max_requests_per_connection: None,
            tls: None,
            tls_matches: vec![],
            tls_default: false,
            original_dst: false,
            bind_source: None,
        };
        let cluster = Cluster::new(cfg, None);
        g.bench_function(format!("cluster_pick_{name}_100_hosts"), |b| {
            b.iter(|| cluster.pick())
        });
        let hosts = cluster.hosts();
        let refs: Vec<_> = hosts.iter().collect();
        let rr = AtomicUsize::new(0);
        g.bench_function(format!("lb_pick_{name}_100_hosts"), |b| {
            b.iter(|| pick(lb, black_box(&refs), &rr).is_some())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
