//! Mutual TLS between sidecars with certificates from pilot's CA (SDS over ADS): real Envoy
//! 1.40 and meshbench proxy as clients and as servers, in all four pairings, against one
//! pilot. Istio's default (no PeerAuthentication: PERMISSIVE, auto mTLS to endpoints with a
//! sidecar), STRICT (plaintext refused), DestinationRule `tls.mode` DISABLE and ISTIO_MUTUAL.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// A sidecar of either kind.
struct Side {
    kind: &'static str,
    admin: SocketAddr,
    pod_ip: String,
    node_id: String,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn sidecar(
    kind: &'static str,
    bin: &std::path::PathBuf,
    xds: SocketAddr,
    app: &str,
    tls_label: bool,
) -> Side {
    let mut labels = vec![("app", app)];
    if tls_label {
        labels.push(("security.istio.io/tlsMode", "istio"));
    }
    let pod = format!("{app}-0");
    match kind {
        "envoy" => {
            let e = start_envoy(bin, xds, app, &pod, &labels).await;
            Side {
                kind,
                admin: e.admin,
                pod_ip: e.pod_ip.clone(),
                node_id: e.node_id.clone(),
                _keep: Box::new(e),
            }
        }
        _ => {
            let m = start_mesh_proxy(xds, app, &pod, &labels).await;
            Side {
                kind,
                admin: m.admin,
                pod_ip: m.pod_ip.clone(),
                node_id: m.node_id.clone(),
                _keep: Box::new(m),
            }
        }
    }
}

/// One request through `client`'s outbound listener to `host:9080` on a fresh connection:
/// the status and the answering workload, or the error.
async fn call(client: &Side, host: &str) -> Result<(u16, String), String> {
    let addr: SocketAddr = format!("{}:15001", client.pod_ip).parse().unwrap();
    let mut c = Client::connect(addr).await.map_err(|e| e.to_string())?;
    let r = c
        .get(&format!("{host}:9080"), "/")
        .await
        .map_err(|e| e.to_string())?;
    Ok((r.status, r.workload().unwrap_or_default().to_string()))
}

/// Calls until the answer is `want` (listeners bind and clusters warm a moment after the ACK).
async fn until(client: &Side, host: &str, want: u16) -> (u16, String) {
    let start = Instant::now();
    loop {
        let r = call(client, host).await;
        if let Ok((s, w)) = &r {
            if *s == want {
                return (*s, w.clone());
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} client -> {host}: wanted {want}, got {r:?}",
            client.kind
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plaintext request straight to a server sidecar's inbound listener (no identity).
async fn plaintext(addr: SocketAddr, host: &str) -> Result<u16, String> {
    let mut c = Client::connect(addr).await.map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), c.get(host, "/"))
        .await
        .map_err(|_| "timeout".to_string())?
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

fn services(ports: &[(&str, u16)]) -> String {
    ports
        .iter()
        .map(|(name, port)| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{ports: [{{port: 9080, name: http, targetPort: {port}}}], selector: {{app: {name}}}}}\n")
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn peer_authentication(mode: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: istio-system}}\nspec: {{mtls: {{mode: {mode}}}}}\n")
}

fn destination_rule(host: &str, mode: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}}}\nspec: {{host: {host}, trafficPolicy: {{tls: {{mode: {mode}}}}}}}\n")
}

/// Services `reviews-e` and `reviews-m`, each with its app behind a server sidecar (Envoy,
/// meshbench proxy) labelled with the sidecar mark: (sidecar, service, app port), and the apps.
async fn two_servers(
    p: &TestPilot,
    bin: &std::path::PathBuf,
) -> ([(Side, &'static str, u16); 2], [Upstream; 2]) {
    let app_e = start_upstream("127.0.0.1", "reviews-e", Behavior::Ok).await;
    let app_m = start_upstream("127.0.0.1", "reviews-m", Behavior::Ok).await;
    apply_ok(
        p.api,
        &services(&[
            ("reviews-e", app_e.addr.port()),
            ("reviews-m", app_m.addr.port()),
        ]),
    )
    .await;
    let servers = [
        (
            sidecar("envoy", bin, p.xds, "reviews-e", true).await,
            "reviews-e",
            app_e.addr.port(),
        ),
        (
            sidecar("meshbench", bin, p.xds, "reviews-m", true).await,
            "reviews-m",
            app_m.addr.port(),
        ),
    ];
    (servers, [app_e, app_m])
}

/// Registers the servers' pods as their services' endpoints (sidecar-labelled, no service
/// account).
async fn register(p: &TestPilot, servers: &[(Side, &'static str, u16)]) {
    let adds: Vec<String> = servers
        .iter()
        .map(|(s, app, _)| format!(r#"{{"name": "{app}-0", "address": "{}", "labels": {{"app": "{app}", "security.istio.io/tlsMode": "istio"}}}}"#, s.pod_ip))
        .collect();
    endpoints_ok(p.api, &format!(r#"{{"add": [{}]}}"#, adds.join(","))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_between_envoy_and_meshbench_proxy_in_every_pairing() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let (servers, _apps) = two_servers(&p, &bin).await;
    let adds: Vec<String> = servers
        .iter()
        .map(|(s, app, _)| {
            format!(r#"{{"name": "{app}-0", "namespace": "default", "address": "{}", "labels": {{"app": "{app}", "security.istio.io/tlsMode": "istio"}}, "serviceAccount": "bookinfo-{app}"}}"#, s.pod_ip)
        })
        .collect();
    let v = endpoints_ok(p.api, &format!(r#"{{"add": [{}]}}"#, adds.join(",")))
        .await
        .version;
    let clients = [
        sidecar("envoy", &bin, p.xds, "client-e", false).await,
        sidecar("meshbench", &bin, p.xds, "client-m", false).await,
    ];
    let everyone: Vec<&Side> = clients.iter().chain(servers.iter().map(|s| &s.0)).collect();
    for s in &everyone {
        wait_synced(p.api, &s.node_id, v).await;
    }
    let inbound = |(s, _, port): &(Side, &str, u16)| -> SocketAddr {
        format!("{}:{port}", s.pod_ip).parse().unwrap()
    };
    let handshakes = |s: &Side, stat: String| {
        let admin = s.admin;
        async move { admin_stat(admin, &stat).await.unwrap_or(0) }
    };
    let cluster_stat =
        |app: &str| format!("cluster.outbound|9080||{app}.default.svc.cluster.local.ssl.handshake");

    // Istio's default: PERMISSIVE servers, auto mTLS from the clients (the endpoints carry the
    // sidecar label): every pairing answers, each over a TLS handshake on both ends.
    for c in &clients {
        for (server, app, _) in &servers {
            let (status, who) = until(c, app, 200).await;
            assert_eq!(
                (status, who.as_str()),
                (200, *app),
                "{} -> {}",
                c.kind,
                server.kind
            );
            assert!(
                handshakes(c, cluster_stat(app)).await >= 1,
                "{} client made no TLS handshake to {} server",
                c.kind,
                server.kind
            );
        }
    }
    for s in &servers {
        let stat = format!(
            "listener.{}.ssl.handshake",
            inbound(s).to_string().replace(':', "_")
        );
        assert!(
            handshakes(&s.0, stat.clone()).await >= 2,
            "{} server: {stat} below 2 (one per client)",
            s.0.kind
        );
        // PERMISSIVE also takes plaintext.
        assert_eq!(
            plaintext(inbound(s), s.1).await,
            Ok(200),
            "{} server",
            s.0.kind
        );
    }

    // STRICT: plaintext is refused by both servers; the sidecars still talk, over mTLS.
    let v = apply_ok(p.api, &peer_authentication("STRICT"))
        .await
        .version;
    for s in &everyone {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for s in &servers {
        let start = Instant::now();
        loop {
            // The new chains apply to connections accepted after the update.
            match plaintext(inbound(s), s.1).await {
                Err(_) => break,
                Ok(status) => assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{} server still answers plaintext under STRICT ({status})",
                    s.0.kind
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for c in &clients {
        for (_, app, _) in &servers {
            assert_eq!(
                call(c, app).await.map(|r| r.0),
                Ok(200),
                "{} -> {app}",
                c.kind
            );
        }
    }

    // A DestinationRule that turns TLS off makes the clients send plaintext: refused (503).
    let v = apply_ok(
        p.api,
        &[
            destination_rule("reviews-e", "DISABLE"),
            destination_rule("reviews-m", "DISABLE"),
        ]
        .join("---\n"),
    )
    .await
    .version;
    for s in &everyone {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for c in &clients {
        for (_, app, _) in &servers {
            until(c, app, 503).await;
        }
    }

    // ISTIO_MUTUAL (Istio's destination-rule-all-mtls.yaml): mutual TLS again, for every
    // endpoint whatever its labels.
    let v = apply_ok(
        p.api,
        &[
            destination_rule("reviews-e", "ISTIO_MUTUAL"),
            destination_rule("reviews-m", "ISTIO_MUTUAL"),
        ]
        .join("---\n"),
    )
    .await
    .version;
    for s in &everyone {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for c in &clients {
        for (server, app, _) in &servers {
            let before = handshakes(c, cluster_stat(app)).await;
            until(c, app, 200).await;
            assert!(
                handshakes(c, cluster_stat(app)).await > before,
                "{} -> {}: ISTIO_MUTUAL made no new handshake",
                c.kind,
                server.kind
            );
        }
    }
}

/// One request through `client`'s outbound listener: the status.
async fn send(
    client: &Side,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> u16 {
    let addr: SocketAddr = format!("{}:15001", client.pod_ip).parse().unwrap();
    let mut c = Client::connect(addr).await.expect("outbound listener");
    c.request(method, &format!("{host}:9080"), path, headers, "")
        .await
        .map(|r| r.status)
        .unwrap_or(0)
}

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
    to: [{operation: {methods: [GET], paths: [/api/*, /exact]}}]
  - from: [{source: {namespaces: [default]}}]
    to: [{operation: {methods: [POST]}}]
    when: [{key: 'request.headers[x-token]', values: [let-me-in]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-deny}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/api/admin/*]}}]
  - from: [{source: {notPrincipals: [cluster.local/ns/default/sa/sleep]}}]
    to: [{operation: {paths: [/api/secret]}}]
";

/// AuthorizationPolicies (ALLOW and DENY; principals, namespaces, methods, paths, header
/// conditions, negations) allow and deny the same requests on an Envoy server sidecar and on
/// a meshbench one, for callers of two identities and for a caller with none; the servers'
/// `rbac.allowed` / `rbac.denied` counts agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_policies_agree_between_envoy_and_meshbench_proxy() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let (servers, _apps) = two_servers(&p, &bin).await;
    // Callers: Envoy as `sleep`, meshbench proxy as `other`.
    let clients = [
        (
            sidecar("envoy", &bin, p.xds, "client-e", false).await,
            "sleep",
        ),
        (
            sidecar("meshbench", &bin, p.xds, "client-m", false).await,
            "other",
        ),
    ];
    let mut adds: Vec<String> = servers
        .iter()
        .map(|(s, app, _)| format!(r#"{{"name": "{app}-0", "address": "{}", "labels": {{"app": "{app}", "security.istio.io/tlsMode": "istio"}}, "serviceAccount": "bookinfo-{app}"}}"#, s.pod_ip))
        .collect();
    adds.extend(clients.iter().map(|(c, sa)| {
        format!(r#"{{"name": "{sa}-0", "address": "{}", "labels": {{"app": "{sa}"}}, "serviceAccount": "{sa}"}}"#, c.pod_ip)
    }));
    endpoints_ok(p.api, &format!(r#"{{"add": [{}]}}"#, adds.join(","))).await;
    let v = apply_ok(p.api, POLICIES).await.version;
    let everyone: Vec<&Side> = clients
        .iter()
        .map(|c| &c.0)
        .chain(servers.iter().map(|s| &s.0))
        .collect();
    for s in &everyone {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for (c, _) in &clients {
        for (_, app, _) in &servers {
            // Warm: clusters and listeners ready, certificates in place.
            let start = Instant::now();
            while send(c, app, "GET", "/api/items", &[]).await == 0
                || send(c, app, "POST", "/x", &[("x-token", "let-me-in")]).await != 200
            {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "{} -> {app} never ready",
                    c.kind
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let before: Vec<(u64, u64)> = {
        let mut v = vec![];
        for (s, _, port) in &servers {
            v.push((
                admin_stat(s.admin, &format!("http.inbound_{port}.rbac.allowed"))
                    .await
                    .unwrap_or(0),
                admin_stat(s.admin, &format!("http.inbound_{port}.rbac.denied"))
                    .await
                    .unwrap_or(0),
            ));
        }
        v
    };
    // (method, path, headers, expected status for sleep, for other)
    let cases: [(&str, &str, &[(&str, &str)], u16, u16); 8] = [
        ("GET", "/api/items", &[], 200, 403),
        ("GET", "/exact", &[], 200, 403),
        ("GET", "/exact/more", &[], 403, 403),
        ("GET", "/api/admin/users", &[], 403, 403),
        ("POST", "/api/items", &[("x-token", "let-me-in")], 200, 200),
        ("POST", "/api/items", &[("x-token", "nope")], 403, 403),
        ("GET", "/api/secret", &[], 200, 403),
        ("DELETE", "/exact", &[], 403, 403),
    ];
    for (c, sa) in &clients {
        for (server, app, _) in &servers {
            for (method, path, headers, want_sleep, want_other) in &cases {
                let want = if *sa == "sleep" {
                    *want_sleep
                } else {
                    *want_other
                };
                let got = send(c, app, method, path, headers).await;
                assert_eq!(
                    got, want,
                    "{sa} via {} -> {} server: {method} {path} {headers:?}",
                    c.kind, server.kind
                );
            }
        }
    }
    // No identity: plaintext straight to the server (PERMISSIVE takes it; RBAC does not).
    for (s, app, port) in &servers {
        let addr: SocketAddr = format!("{}:{port}", s.pod_ip).parse().unwrap();
        let mut c = Client::connect(addr).await.unwrap();
        let r = c.get(app, "/api/items").await.unwrap();
        assert_eq!(r.status, 403, "{} server, no identity", s.kind);
        assert_eq!(r.body, "RBAC: access denied", "{} server", s.kind);
    }
    let mut counts = vec![];
    for ((s, _, port), (a0, d0)) in servers.iter().zip(before) {
        let a = admin_stat(s.admin, &format!("http.inbound_{port}.rbac.allowed"))
            .await
            .unwrap_or(0);
        let d = admin_stat(s.admin, &format!("http.inbound_{port}.rbac.denied"))
            .await
            .unwrap_or(0);
        counts.push((a - a0, d - d0));
    }
    assert_eq!(
        counts[0], counts[1],
        "rbac.allowed/denied deltas, Envoy vs meshbench server"
    );
    // Every 403 above was one RBAC denial (the plaintext caller's too).
    let refused = cases
        .iter()
        .map(|c| (c.3 == 403) as u64 + (c.4 == 403) as u64)
        .sum::<u64>()
        + 1;
    assert_eq!(counts[0].1, refused, "{counts:?}");
}

/// One request written byte for byte (paths and header values a client library would not
/// send), plaintext straight to `addr` on a connection of its own: the status and the
/// request target the app received (empty when none did).
async fn raw(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &[u8])]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("inbound listener");
    let mut req =
        format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n").into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(format!("{k}: ").as_bytes());
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    s.write_all(&req).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let prefix = format!("{UPSTREAM_PATH_HEADER}: ");
    let upstream = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].to_string())
        .unwrap_or_default();
    (status, upstream)
}

const PATH_POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: [/admin, /admin/*]}}]
  - when: [{key: 'request.headers[x-tag]', values: [blocked, 'pre*']}]
";

/// What a policy sees is what Envoy sees: paths normalized first (istiod's `normalize_path`:
/// dot segments, `%2E`, backslashes, escaped unreserved characters; escaped slashes kept), so
/// `/public/../admin` cannot slip past a DENY on `/admin`, and the app receives the normalized
/// path; a repeated header matches when any of its values does; a header value that is not
/// UTF-8 is matched by its bytes. Both servers answer each request alike, and as expected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_sees_paths_and_headers_as_envoy_does() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let (servers, _apps) = two_servers(&p, &bin).await;
    register(&p, &servers).await;
    let v = apply_ok(p.api, PATH_POLICIES).await.version;
    for (s, _, _) in &servers {
        wait_synced(p.api, &s.node_id, v).await;
    }
    let inbound = |(s, _, port): &(Side, &str, u16)| -> SocketAddr {
        format!("{}:{port}", s.pod_ip).parse().unwrap()
    };
    for s in &servers {
        let start = Instant::now();
        while raw(inbound(s), s.1, "/admin", &[]).await.0 != 403 {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{} server: no RBAC",
                s.0.kind
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // (path, headers, status, the path the app receives)
    let cases: &[(&str, &[(&str, &[u8])], u16, &str)] = &[
        ("/admin/x", &[], 403, ""),
        ("/public/../admin/x", &[], 403, ""),
        ("/public/%2e%2E/admin/x", &[], 403, ""),
        ("/%61dmin/x", &[], 403, ""),
        ("/public\\..\\admin", &[], 403, ""),
        ("/public/..%2fadmin/x", &[], 200, "/public/..%2fadmin/x"),
        ("/public/./x?q=/../admin", &[], 200, "/public/x?q=/../admin"),
        ("/a/b/..", &[], 200, "/a/"),
        ("/a/%7Eb/%2F", &[], 200, "/a/~b/%2F"),
        ("/a{b}|c", &[], 200, "/a%7Bb%7D%7Cc"),
        ("/ok", &[("x-tag", b"blocked")], 403, ""),
        // A repeated header matches when any of its values does; commas do not split.
        (
            "/ok",
            &[("x-tag", b"blocked"), ("x-tag", b"other")],
            403,
            "",
        ),
        (
            "/ok",
            &[("x-tag", b"other"), ("x-tag", b"blocked")],
            403,
            "",
        ),
        ("/ok", &[("x-tag", b"a"), ("x-tag", b"pre1")], 403, ""),
        (
            "/ok",
            &[("x-tag", b"a"), ("x-tag", b"blockedx")],
            200,
            "/ok",
        ),
        ("/ok", &[("x-tag", b"blocked,other")], 200, "/ok"),
        ("/ok", &[("x-tag", b" blocked ")], 403, ""),
        ("/ok", &[("x-tag", b"pre\xe9")], 403, ""),
        ("/ok", &[("x-tag", b"caf\xe9")], 200, "/ok"),
    ];
    for s in &servers {
        for (path, headers, status, upstream) in cases {
            assert_eq!(
                raw(inbound(s), s.1, path, headers).await,
                (*status, upstream.to_string()),
                "{} server: GET {path} {headers:?}",
                s.0.kind
            );
        }
    }
    // Characters a path may not hold as they are: whatever Envoy does, meshbench does.
    for path in [
        "/a\"b^c",
        "/caf%C3%A9",
        "/a/%zz/../b",
        "//a//../b",
        "/a[b]c'!$&()*+,;=:@",
        "/A/%2a/%7e",
        "/a%2",
        "/a/.//b",
    ] {
        let e = raw(inbound(&servers[0]), servers[0].1, path, &[]).await;
        let m = raw(inbound(&servers[1]), servers[1].1, path, &[]).await;
        assert_eq!(e, m, "GET {path}: Envoy then meshbench proxy");
    }
}

/// Auto mTLS leaves plaintext to a workload whose PeerAuthentication turns mTLS off, at the
/// workload level (Envoy's server) or for its port under a STRICT workload mode (meshbench's
/// server), as istiod does by dropping the endpoints' `tlsMode` metadata: both clients reach
/// both servers, and their cluster makes no TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mtls_sends_plaintext_where_a_workload_turns_mtls_off() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let (servers, _apps) = two_servers(&p, &bin).await;
    register(&p, &servers).await;
    let m_port = servers[1].2;
    let v = apply_ok(
        p.api,
        &format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: e-off}}\nspec: {{selector: {{matchLabels: {{app: reviews-e}}}}, mtls: {{mode: DISABLE}}}}\n---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: m-port-off}}\nspec: {{selector: {{matchLabels: {{app: reviews-m}}}}, mtls: {{mode: STRICT}}, portLevelMtls: {{{m_port}: {{mode: DISABLE}}}}}}\n"),
    )
    .await
    .version;
    let clients = [
        sidecar("envoy", &bin, p.xds, "client-e", false).await,
        sidecar("meshbench", &bin, p.xds, "client-m", false).await,
    ];
    for s in clients.iter().chain(servers.iter().map(|s| &s.0)) {
        wait_synced(p.api, &s.node_id, v).await;
    }
    for c in &clients {
        for (server, app, _) in &servers {
            let (status, who) = until(c, app, 200).await;
            assert_eq!(
                (status, who.as_str()),
                (200, *app),
                "{} -> {}",
                c.kind,
                server.kind
            );
            let stat =
                format!("cluster.outbound|9080||{app}.default.svc.cluster.local.ssl.handshake");
            assert_eq!(
                admin_stat(c.admin, &stat).await.unwrap_or(0),
                0,
                "{} client -> {} server: TLS where mTLS is off",
                c.kind,
                server.kind
            );
        }
    }
}

/// Certificates that live 4 s, rotated every 2 s, under load through both pairings (Envoy
/// client -> meshbench server, meshbench client -> Envoy server), with a new upstream TLS
/// connection every 5 requests: not one request fails across the rotations, and every proxy
/// received new secrets. Without rotation every handshake after 4 s would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load_loses_no_request() {
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot_with(meshbench::pilot::Config {
        debounce: Duration::ZERO,
        cert_ttl: Duration::from_secs(4),
        ..Default::default()
    })
    .await;
    let app_e = start_upstream("127.0.0.1", "reviews-e", Behavior::Ok).await;
    let app_m = start_upstream("127.0.0.1", "reviews-m", Behavior::Ok).await;
    let pool = |host: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {host}}}\nspec: {{host: {host}, trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}, connectionPool: {{http: {{maxRequestsPerConnection: 5}}}}}}}}\n")
    };
    apply_ok(
        p.api,
        &[
            services(&[
                ("reviews-e", app_e.addr.port()),
                ("reviews-m", app_m.addr.port()),
            ]),
            pool("reviews-e"),
            pool("reviews-m"),
            peer_authentication("STRICT"),
        ]
        .join("---\n"),
    )
    .await;
    let server_e = sidecar("envoy", &bin, p.xds, "reviews-e", true).await;
    let server_m = sidecar("meshbench", &bin, p.xds, "reviews-m", true).await;
    let client_e = sidecar("envoy", &bin, p.xds, "client-e", false).await;
    let client_m = sidecar("meshbench", &bin, p.xds, "client-m", false).await;
    let adds: Vec<String> = [(&server_e, "reviews-e"), (&server_m, "reviews-m")]
        .iter()
        .map(|(s, app)| format!(r#"{{"name": "{app}-0", "address": "{}", "labels": {{"app": "{app}", "security.istio.io/tlsMode": "istio"}}, "serviceAccount": "{app}"}}"#, s.pod_ip))
        .collect();
    let v = endpoints_ok(p.api, &format!(r#"{{"add": [{}]}}"#, adds.join(",")))
        .await
        .version;
    for s in [&server_e, &server_m, &client_e, &client_m] {
        wait_synced(p.api, &s.node_id, v).await;
    }
    // Envoy -> meshbench and meshbench -> Envoy.
    let pairs = [(&client_e, "reviews-m"), (&client_m, "reviews-e")];
    for (c, app) in pairs {
        until(c, app, 200).await;
    }
    let sds_pushes = |id: String| {
        let api = p.api;
        async move {
            proxies(api)
                .await
                .iter()
                .find(|x| x.node.id == id)
                .and_then(|x| x.types.get("sds"))
                .map_or(0, |t| t.pushes)
        }
    };
    let before: Vec<u64> = {
        let mut v = vec![];
        for s in [&server_e, &server_m, &client_e, &client_m] {
            v.push(sds_pushes(s.node_id.clone()).await);
        }
        v
    };
    // ~100 requests/s per pairing for 9 s (over two lifetimes of a certificate).
    let mut tasks = vec![];
    for (c, app) in pairs {
        let addr: SocketAddr = format!("{}:15001", c.pod_ip).parse().unwrap();
        let (kind, app) = (c.kind, app.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = Client::connect(addr).await.unwrap();
            let (mut ok, mut failed) = (0u32, vec![]);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(9) {
                match conn.get(&format!("{app}:9080"), "/").await {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} at {:?}", r.status, start.elapsed())),
                    Err(e) => {
                        failed.push(format!("{e} at {:?}", start.elapsed()));
                        conn = Client::connect(addr).await.unwrap();
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (kind, app, ok, failed)
        }));
    }
    for t in tasks {
        let (kind, app, ok, failed) = t.await.unwrap();
        assert!(
            failed.is_empty(),
            "{kind} -> {app}: {} failed of {}: {failed:?}",
            failed.len(),
            ok as usize + failed.len()
        );
        assert!(ok > 300, "{kind} -> {app}: only {ok} requests");
    }
    let metrics = http(p.api, "GET", "/metrics", "").await.body;
    let epoch: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("meshbench_pilot_cert_epoch "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(epoch >= 4, "rotations: {epoch}");
    for (s, b) in [&server_e, &server_m, &client_e, &client_m]
        .iter()
        .zip(before)
    {
        let after = sds_pushes(s.node_id.clone()).await;
        assert!(
            after >= b + 4,
            "{} {}: SDS pushes {b} -> {after}",
            s.kind,
            s.node_id
        );
    }
}

/// ADS over mutual TLS (pilot's `--xds-tls-addr`, istiod's 15012): meshbench proxy and Envoy
/// present certificates from pilot's CA and get their config; a proxy whose certificate is
/// another identity than the pod it claims is refused and never configured; a plaintext
/// client gets nothing from the TLS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_over_mutual_tls_binds_each_node_to_its_certificate() {
    use meshbench::pilot_client::PilotApi;
    let Some(bin) = envoy_binary() else { return };
    let p = start_pilot(Duration::ZERO).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = l.local_addr().unwrap();
    let (_stop_tls, stop) = meshbench::shutdown::channel();
    tokio::spawn(meshbench::pilot::serve_xds_tls(p.pilot.clone(), l, stop));
    let api = PilotApi::new(p.api);
    let cert = |sa: &'static str| {
        let api = api.clone();
        async move {
            let c = api.certificate("default", sa).await.unwrap();
            meshbench::security::Material {
                chain_pem: c.chain_pem.into_bytes(),
                key_pem: c.key_pem.into_bytes(),
                roots_pem: c.root_pem.into_bytes(),
            }
        }
    };
    let (reviews, other) = (cert("bookinfo-reviews").await, cert("other").await);
    apply_ok(p.api, &services(&[("reviews", 9080)])).await;
    let labels = [("app", "reviews")];
    let start = |pod: &'static str, m: meshbench::security::Material| async move {
        let ip = unique_loopback();
        let id = meshbench::xds::node::sidecar_id(&ip, pod, "default");
        let proxy = start_mesh_proxy_tls(
            tls_addr,
            "reviews",
            id.clone(),
            ip.clone(),
            &labels,
            Default::default(),
            1,
            Some(m),
        )
        .await;
        (proxy, ip, id)
    };
    let (_mesh, m_ip, m_id) = start("reviews-m-0", reviews.clone()).await;
    let (_impostor, x_ip, x_id) = start("reviews-x-0", other).await;
    let envoy = start_envoy_tls(
        &bin,
        tls_addr,
        "reviews",
        "reviews-e-0",
        "default",
        &labels,
        Default::default(),
        false,
        Some(&reviews),
    )
    .await;
    // Every pod runs as bookinfo-reviews; the impostor's certificate says `other`.
    let adds: Vec<String> = [("reviews-m-0", &m_ip), ("reviews-e-0", &envoy.pod_ip), ("reviews-x-0", &x_ip)]
        .iter()
        .map(|(n, ip)| format!(r#"{{"name": "{n}", "address": "{ip}", "labels": {{"app": "reviews"}}, "serviceAccount": "bookinfo-reviews"}}"#))
        .collect();
    let v = endpoints_ok(p.api, &format!(r#"{{"add": [{}]}}"#, adds.join(",")))
        .await
        .version;
    wait_synced(p.api, &m_id, v).await;
    wait_synced(p.api, &envoy.node_id, v).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let listed: Vec<String> = proxies(p.api)
        .await
        .into_iter()
        .map(|s| s.node.id)
        .collect();
    assert!(
        !listed.contains(&x_id),
        "the impostor was served: {listed:?}"
    );
    // Plaintext gRPC to the TLS port: no answer.
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let plain = tokio::time::timeout(Duration::from_secs(3), async {
        let mut c = AggregatedDiscoveryServiceClient::connect(format!("http://{tls_addr}"))
            .await
            .ok()?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(Default::default()).await.ok()?;
        let mut s = c
            .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .ok()?
            .into_inner();
        s.message().await.ok()?
    })
    .await;
    assert!(
        !matches!(plain, Ok(Some(_))),
        "a plaintext client got a response"
    );
}
