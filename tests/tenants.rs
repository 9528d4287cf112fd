//! Tenant isolation in the control plane: Istio's `Sidecar` (egress hosts) and `exportTo`
//! (Service annotation, VirtualService) decide what each proxy receives. Real Envoy 1.40 and
//! meshbench proxy read the same pilot; their config dumps must hold nothing of another
//! tenant, and a change in one tenant must push nothing to another's proxies.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn service(name: &str, ns: &str, annotations: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: {name}}}}}\n")
}

fn entry(name: &str, ns: &str, addr: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{address: {}, labels: {{app: {name}}}, ports: {{http: {}}}}}\n",
        addr.ip(),
        addr.port()
    )
}

fn own_namespace_only(ns: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: {ns}}}\nspec:\n  egress:\n  - hosts: [\"./*\", \"istio-system/*\"]\n")
}

/// Pushes per type a proxy has received.
async fn pushes(api: SocketAddr, node_id: &str) -> Vec<(String, u64)> {
    let all = proxies(api).await;
    let p = all
        .iter()
        .find(|p| p.node.id == node_id)
        .expect("connected");
    p.types.iter().map(|(t, s)| (t.clone(), s.pushes)).collect()
}

async fn status(outbound: SocketAddr, host: &str) -> (u16, String) {
    let mut c = Client::connect(outbound).await.unwrap();
    let r = c.get(host, "/").await.unwrap();
    (r.status, r.workload().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_receives_only_what_it_may_import() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let web = start_upstream("127.0.0.1", "web", Behavior::Ok).await;
    let api = start_upstream("127.0.0.1", "api", Behavior::Ok).await;
    let private = start_upstream("127.0.0.1", "private", Behavior::Ok).await;
    let base = [
        service("web", "tenant-a", ""),
        entry("web", "tenant-a", web.addr),
        service("api", "tenant-b", ""),
        entry("api", "tenant-b", api.addr),
        // Exported only to its own namespace: no Sidecar needed to hide it.
        service(
            "private",
            "tenant-b",
            ", annotations: {networking.istio.io/exportTo: \".\"}",
        ),
        entry("private", "tenant-b", private.addr),
        own_namespace_only("tenant-a"),
        own_namespace_only("tenant-b"),
    ]
    .join("---\n");
    apply_ok(p.api, &base).await;

    let labels = [("app", "client")];
    let envoy_a = start_envoy_in(&bin, p.xds, "client", "client-envoy", "tenant-a", &labels).await;
    let mesh_a = start_mesh_proxy_in(p.xds, "client", "client-mesh", "tenant-a", &labels).await;
    let mesh_b = start_mesh_proxy_in(p.xds, "client", "client-b", "tenant-b", &labels).await;
    // tenant-c has no Sidecar: it sees what is exported to it.
    let mesh_c = start_mesh_proxy_in(p.xds, "client", "client-c", "tenant-c", &labels).await;
    let ids = [
        &envoy_a.node_id,
        &mesh_a.node_id,
        &mesh_b.node_id,
        &mesh_c.node_id,
    ];
    let v = p.pilot.version();
    for id in ids {
        wait_synced(p.api, id, v).await;
    }

    // Config dumps: tenant-a's proxies hold no tenant-b cluster, route or endpoint.
    let envoy_dump = http(envoy_a.admin, "GET", "/config_dump?include_eds", "")
        .await
        .body;
    let mesh_dump = http(mesh_a.admin, "GET", "/config_dump", "").await.body;
    for (name, dump) in [("envoy", &envoy_dump), ("meshbench", &mesh_dump)] {
        assert!(
            dump.contains("outbound|9080||web.tenant-a.svc.cluster.local"),
            "{name}: {dump}"
        );
        assert!(
            dump.contains("web.tenant-a.svc.cluster.local:9080"),
            "{name}: no web route"
        );
        assert!(
            !dump.contains("tenant-b"),
            "{name} in tenant-a holds tenant-b config: {dump}"
        );
        for port in [api.addr.port(), private.addr.port()] {
            assert!(
                !dump.contains(&format!("\"port_value\": {port}"))
                    && !dump.contains(&format!("127.0.0.1:{port}")),
                "{name}: a tenant-b endpoint ({port}) is in tenant-a's config"
            );
        }
    }
    let b_dump = http(mesh_b.admin, "GET", "/config_dump", "").await.body;
    assert!(b_dump.contains("api.tenant-b") && b_dump.contains("private.tenant-b"));
    assert!(!b_dump.contains("tenant-a"), "{b_dump}");
    let c_dump = http(mesh_c.admin, "GET", "/config_dump", "").await.body;
    assert!(c_dump.contains("web.tenant-a") && c_dump.contains("api.tenant-b"));
    assert!(
        !c_dump.contains("private.tenant-b"),
        "exportTo . leaked: {c_dump}"
    );

    // Requests: what is not imported has no route (404), by name or by address.
    let out = |ip: &str| -> SocketAddr { format!("{ip}:15001").parse().unwrap() };
    for (name, ip) in [("envoy", &envoy_a.pod_ip), ("meshbench", &mesh_a.pod_ip)] {
        assert_eq!(
            status(out(ip), "web.tenant-a:9080").await,
            (200, "web".into()),
            "{name}"
        );
        assert_eq!(status(out(ip), "api.tenant-b:9080").await.0, 404, "{name}");
    }
    assert_eq!(
        status(out(&mesh_c.pod_ip), "api.tenant-b:9080").await,
        (200, "api".into())
    );
    assert_eq!(
        status(out(&mesh_c.pod_ip), "private.tenant-b:9080").await.0,
        404
    );
    assert_eq!(
        status(out(&mesh_b.pod_ip), "private.tenant-b:9080").await,
        (200, "private".into())
    );

    // A service added in tenant-b pushes nothing to tenant-a's proxies.
    let before_a = [
        pushes(p.api, &envoy_a.node_id).await,
        pushes(p.api, &mesh_a.node_id).await,
    ];
    let before_b = pushes(p.api, &mesh_b.node_id).await;
    let added = [
        service("api2", "tenant-b", ""),
        entry("api2", "tenant-b", api.addr),
    ]
    .join("---\n");
    let v = apply_ok(p.api, &added).await.version;
    for id in ids {
        wait_synced(p.api, id, v).await;
    }
    let after_a = [
        pushes(p.api, &envoy_a.node_id).await,
        pushes(p.api, &mesh_a.node_id).await,
    ];
    assert_eq!(
        before_a, after_a,
        "tenant-a's proxies were pushed a tenant-b change"
    );
    assert_ne!(
        before_b,
        pushes(p.api, &mesh_b.node_id).await,
        "tenant-b's proxy was not pushed"
    );

    // A VirtualService exported to its own namespace changes routing there only.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web, namespace: tenant-a}\nspec:\n  hosts: [web]\n  exportTo: [\".\"]\n  http:\n  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: web}}]\n";
    let v = apply_ok(p.api, vs).await.version;
    for id in ids {
        wait_synced(p.api, id, v).await;
    }
    for (name, ip) in [("envoy", &envoy_a.pod_ip), ("meshbench", &mesh_a.pod_ip)] {
        assert_eq!(status(out(ip), "web.tenant-a:9080").await.0, 418, "{name}");
    }
    assert_eq!(
        status(out(&mesh_c.pod_ip), "web.tenant-a:9080").await,
        (200, "web".into())
    );

    // Removing tenant-a's Sidecar widens what it imports again.
    let (s, body) = json(p.api, "DELETE", "/v1/config/Sidecar/tenant-a/default", "").await;
    assert_eq!(s, 200, "{body}");
    let v = p.pilot.version();
    for id in ids {
        wait_synced(p.api, id, v).await;
    }
    for (name, ip) in [("envoy", &envoy_a.pod_ip), ("meshbench", &mesh_a.pod_ip)] {
        assert_eq!(
            status(out(ip), "api.tenant-b:9080").await,
            (200, "api".into()),
            "{name}"
        );
    }
}
