//! Snapshot build cost at mesh scale: 10,000 endpoints in 100 services (two subsets each),
//! the full translation + encoding, the EDS part alone, one proxy's view (fresh, and kept
//! across an endpoint-only change), the delta diff of one changed assignment, and pilot's
//! handling of one endpoint update in a 10k registry.
//! Run: `cargo bench --bench snapshot`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use meshbench::model::compile::compile;
use meshbench::model::{Mesh, Workload, WorkloadEntrySpec};
use meshbench::xds::node::NodeInfo;
use meshbench::xds::snapshot::Snapshot;
use meshbench::xds::{cluster, endpoint};

fn mesh(services: usize, endpoints: usize) -> Mesh {
    let mut text = String::new();
    for s in 0..services {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}}}\nspec:\n  ports: [{{port: 8080, name: http}}]\n  selector: {{app: svc-{s}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc-{s}}}\nspec:\n  host: svc-{s}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n---\n"
        ));
    }
    let objects = meshbench::config::parse("bench.yaml", &text)
        .unwrap()
        .objects;
    let workloads: Vec<Workload> = (0..endpoints)
        .map(|i| Workload {
            name: format!("ep-{i}"),
            namespace: "default".into(),
            entry: WorkloadEntrySpec {
                address: format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                labels: [
                    ("app".to_string(), format!("svc-{}", i % services)),
                    ("version".to_string(), format!("v{}", 1 + i % 2)),
                ]
                .into(),
                ports: Default::default(),
                weight: 1,
                healthy: true,
                service_account: None,
            },
        })
        .collect();
    compile(objects.iter(), workloads.into_iter().map(Arc::new), false).unwrap()
}

fn bench(c: &mut Criterion) {
    let mesh = Arc::new(mesh(100, 10_000));
    let snap = Arc::new(Snapshot::build(
        1,
        mesh.clone(),
        Instant::now(),
        SystemTime::now(),
    ));
    let eds_bytes: usize = snap.endpoints.values().map(|r| r.any.value.len()).sum();
    let cds_bytes: usize = snap.clusters.iter().map(|r| r.any.value.len()).sum();
    eprintln!(
        "10k endpoints / 100 services: {} clusters ({cds_bytes} B), {} assignments ({eds_bytes} B)",
        snap.clusters.len(),
        snap.endpoints.len()
    );
    let mut g = c.benchmark_group("snapshot_10k_endpoints");
    g.sample_size(20);
    g.bench_function("full_build", |b| {
        b.iter(|| Snapshot::build(1, mesh.clone(), Instant::now(), SystemTime::now()))
    });
    g.bench_function("eds_only", |b| b.iter(|| endpoint::assignments(&mesh)));
    g.bench_function("cds_only", |b| b.iter(|| cluster::outbound_clusters(&mesh)));
    let node = NodeInfo {
        id: "sidecar~10.0.0.1~svc-1-0.default~default.svc.cluster.local".into(),
        cluster: "svc-1".into(),
        ip: Some("10.0.0.1".into()),
        pod: "svc-1-0".into(),
        namespace: "default".into(),
        labels: [("app".to_string(), "svc-1".to_string())].into(),
        app_ip: "127.0.0.1".into(),
        capture: false,
        router: false,
        proven: None,
    };
    g.bench_function("proxy_view", |b| b.iter(|| snap.view(&node)));
    let view = snap.view(&node);
    g.bench_function("proxy_view_endpoint_change", |b| {
        b.iter(|| snap.view_from(&node, Some(&view)))
    });
    // Tenant scoping: the same mesh with a Sidecar importing only the proxy's namespace
    // (every service here is in `default`, so the scope is the whole mesh's size: this is the
    // cost of working out and building one scope per snapshot, the worst case).
    let sidecar = meshbench::config::parse(
        "sidecar.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\nspec:\n  egress: [{hosts: [\"./*\"]}]\n",
    )
    .unwrap()
    .objects;
    let mut scoped = (*mesh).clone();
    scoped.sidecars = compile(sidecar.iter(), [], false).unwrap().sidecars;
    let scoped = Arc::new(scoped);
    g.bench_function("scoped_view_first_of_snapshot", |b| {
        b.iter(|| {
            let s = Arc::new(Snapshot::build(
                1,
                scoped.clone(),
                Instant::now(),
                SystemTime::now(),
            ));
            s.view(&node)
        })
    });
    let s = Arc::new(Snapshot::build(
        1,
        scoped.clone(),
        Instant::now(),
        SystemTime::now(),
    ));
    let _ = s.view(&node);
    g.bench_function("scoped_view_shared", |b| b.iter(|| s.view(&node)));
    // Delta: a client holding every assignment, one of which changed.
    let desired: Vec<&meshbench::xds::Resource> = snap.endpoints.values().collect();
    let mut known: std::collections::HashMap<String, u64> =
        desired.iter().map(|r| (r.name.clone(), r.hash)).collect();
    *known.values_mut().next().unwrap() ^= 1;
    let forced = Default::default();
    g.bench_function("delta_diff_one_change", |b| {
        b.iter(|| meshbench::xds::ads::delta::diff(&desired, &known, &forced))
    });
    g.finish();

    // Pilot: one endpoint flipped in a 10k-endpoint registry (validation, store, mesh).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let pilot = meshbench::pilot::Pilot::start(&Default::default()).unwrap();
    pilot
        .apply("s.yaml", &meshbench::churn::services_manifest(100))
        .unwrap();
    let add = (0..10_000)
        .map(|i| meshbench::churn::endpoint(i, 100, true))
        .collect();
    pilot
        .update_endpoints(EndpointBatch {
            add,
            ..Default::default()
        })
        .unwrap();
    let mut healthy = false;
    let mut g = c.benchmark_group("pilot_10k_endpoints");
    g.sample_size(30);
    g.bench_function("endpoint_update", |b| {
        b.iter(|| {
            healthy = !healthy;
            pilot
                .update_endpoints(EndpointBatch {
                    update: vec![meshbench::churn::endpoint(7, 100, healthy)],
                    ..Default::default()
                })
                .unwrap()
        })
    });
    g.finish();
}

use meshbench::pilot::api::EndpointBatch;

criterion_group!(benches, bench);
criterion_main!(benches);
