//! The ingress gateway: Istio's `bookinfo-gateway.yaml` (unchanged) served by real Envoy 1.40
//! and by meshbench proxy as gateway proxies (`router~` node ids), against the same pilot.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const GATEWAY_SERVICE: &str = "apiVersion: v1
kind: Service
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  ports: [{name: http2, port: 80, targetPort: 8080}]
";

const SERVICES: &str = "apiVersion: v1
kind: Service
metadata: {name: productpage}
spec: {ports: [{port: 9080, name: http}], selector: {app: productpage}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
";

fn entry(name: &str, app: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}}}\nspec: {{address: {}, labels: {{app: {app}}}, ports: {{http: {}}}}}\n",
        addr.ip(),
        addr.port()
    )
}

fn fixture(rel: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Status and upstream identity of one request through a gateway listener.
async fn get(listener: SocketAddr, host: &str, path: &str) -> (u16, String) {
    let mut c = Client::connect(listener).await.expect("gateway listener");
    let r = c.get(host, path).await.expect("an answer");
    (r.status, r.workload().unwrap_or_default().to_string())
}

/// RDS pushes a proxy has received.
async fn rds_pushes(api: SocketAddr, node_id: &str) -> u64 {
    proxies(api)
        .await
        .iter()
        .find(|p| p.node.id == node_id)
        .and_then(|p| p.types.get("rds"))
        .map_or(0, |t| t.pushes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_through_the_gateway_with_envoy_and_meshbench_proxy() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let productpage = start_upstream("127.0.0.1", "productpage", Behavior::Ok).await;
    let reviews = start_upstream("127.0.0.1", "reviews", Behavior::Ok).await;
    let base = [
        GATEWAY_SERVICE.to_string(),
        SERVICES.to_string(),
        entry("productpage-1", "productpage", productpage.addr),
        entry("reviews-1", "reviews", reviews.addr),
    ]
    .join("---\n");
    apply_ok(p.api, &base).await;

    let gw_labels = [("app", "istio-ingressgateway"), ("istio", "ingressgateway")];
    let envoy = start_envoy_gateway(&bin, p.xds, "gw-envoy", "istio-system", &gw_labels).await;
    let mesh = start_mesh_gateway(p.xds, "gw-mesh", "istio-system", &gw_labels).await;
    let sidecar = start_mesh_proxy(
        p.xds,
        "loadclient",
        "loadclient-0",
        &[("app", "loadclient")],
    )
    .await;
    let gateways = [
        (
            "envoy",
            envoy.node_id.clone(),
            format!("{}:8080", envoy.pod_ip),
        ),
        (
            "meshbench",
            mesh.node_id.clone(),
            format!("{}:8080", mesh.pod_ip),
        ),
    ];
    let ids: Vec<String> = gateways
        .iter()
        .map(|g| g.1.clone())
        .chain([sidecar.node_id.clone()])
        .collect();
    let apply = |yaml: String| {
        let (api, ids) = (p.api, ids.clone());
        async move {
            let v = apply_ok(api, &yaml).await.version;
            for id in &ids {
                wait_synced(api, id, v).await;
            }
        }
    };

    // Istio's own file, unchanged: its server says port 80; the listener is on 8080.
    apply(fixture(
        "istio-samples/bookinfo/networking/bookinfo-gateway.yaml",
    ))
    .await;
    for (name, _, addr) in &gateways {
        let addr: SocketAddr = addr.parse().unwrap();
        // The gateway may bind its listener a moment after the ACK.
        let start = Instant::now();
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name}: no listener on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (host, path, want) in [
            ("bookinfo.example.com", "/productpage", (200, "productpage")),
            ("203.0.113.7", "/api/v1/products/1", (200, "productpage")),
            ("bookinfo.example.com", "/reviews", (404, "")),
        ] {
            let got = get(addr, host, path).await;
            assert_eq!((got.0, got.1.as_str()), want, "{name}: {host}{path}");
        }
    }

    // A server host narrows what the gateway answers for, any port in the Host header.
    let narrowed = fixture("istio-samples/bookinfo/networking/bookinfo-gateway.yaml")
        .replace("    - \"*\"\n---", "    - \"bookinfo.example.com\"\n---");
    assert!(narrowed.contains("- \"bookinfo.example.com\""));
    apply(narrowed).await;
    for (name, _, addr) in &gateways {
        let addr: SocketAddr = addr.parse().unwrap();
        for (host, want) in [
            ("bookinfo.example.com", 200),
            ("bookinfo.example.com:80", 200),
            ("other.example.com", 404),
        ] {
            assert_eq!(
                get(addr, host, "/productpage").await.0,
                want,
                "{name}: {host}"
            );
        }
    }

    // A VirtualService moving between the mesh and the gateway changes only the proxies it
    // is moved to or from; a change bound to one side only pushes nothing to the other.
    let vs = |gateways: &str, subset_path: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  gateways: [{gateways}]\n  http:\n  - match: [{{uri: {{prefix: {subset_path}}}}}]\n    route: [{{destination: {{host: reviews}}}}]\n")
    };
    apply(fixture(
        "istio-samples/bookinfo/networking/bookinfo-gateway.yaml",
    ))
    .await;
    apply(vs("mesh", "/a")).await;
    let before: Vec<u64> = futures_rds(p.api, &ids).await;
    apply(vs("mesh", "/b")).await;
    let after = futures_rds(p.api, &ids).await;
    assert_eq!(
        after[..2],
        before[..2],
        "a mesh-only change reached the gateways"
    );
    assert!(after[2] > before[2], "the sidecar got no RDS push");
    apply(vs("bookinfo-gateway", "/b")).await;
    let moved = futures_rds(p.api, &ids).await;
    assert!(
        moved[0] > after[0] && moved[1] > after[1],
        "gateways not pushed: {after:?} -> {moved:?}"
    );
    assert!(moved[2] > after[2], "the sidecar kept its reviews routes");
    apply(vs("bookinfo-gateway", "/c")).await;
    let gateway_only = futures_rds(p.api, &ids).await;
    assert_eq!(
        gateway_only[2], moved[2],
        "a gateway-only change reached the sidecar"
    );
    assert!(gateway_only[0] > moved[0] && gateway_only[1] > moved[1]);
    for (name, _, addr) in &gateways {
        let addr: SocketAddr = addr.parse().unwrap();
        let (status, who) = get(addr, "reviews.default.svc.cluster.local", "/c/1").await;
        assert_eq!((status, who.as_str()), (200, "reviews"), "{name}");
    }

    // Nothing bound: istiod's blackhole virtual host answers 404 for everything.
    let key = "/v1/config/VirtualService/default/bookinfo";
    let (s, body) = json(p.api, "DELETE", key, "").await;
    assert_eq!(s, 200, "{body}");
    let key = "/v1/config/VirtualService/default/reviews";
    let (s, body) = json(p.api, "DELETE", key, "").await;
    assert_eq!(s, 200, "{body}");
    let v = p.pilot.version();
    for id in &ids {
        wait_synced(p.api, id, v).await;
    }
    for (name, _, addr) in &gateways {
        let addr: SocketAddr = addr.parse().unwrap();
        assert_eq!(
            get(addr, "bookinfo.example.com", "/productpage").await.0,
            404,
            "{name}"
        );
    }
    let dump = http(mesh.admin, "GET", "/config_dump", "").await.body;
    assert!(dump.contains("blackhole:80"), "{dump}");
    let dump = http(envoy.admin, "GET", "/config_dump", "").await.body;
    assert!(
        dump.contains("blackhole:80") && dump.contains("0.0.0.0_8080"),
        "envoy config dump"
    );
}

async fn futures_rds(api: SocketAddr, ids: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for id in ids {
        out.push(rds_pushes(api, id).await);
    }
    out
}
