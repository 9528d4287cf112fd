//! Config ingestion as users meet it: Istio's own bookinfo files accepted as they are (or the
//! unsupported part named), istioctl-style validation errors naming file, document, field and
//! reason, a bad batch rejected whole, and a REST API that answers malformed input with 4xx.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use meshbench::model::ConfigError;
use meshbench::pilot::{self, Pilot};

fn fixture(rel: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(rel),
    )
    .unwrap()
}

async fn fresh_pilot() -> std::sync::Arc<Pilot> {
    Pilot::start(&pilot::Config::default()).unwrap()
}

#[tokio::test]
async fn istio_bookinfo_corpus_is_accepted_as_is() {
    let p = fresh_pilot().await;
    let (_, _, warnings) = p
        .apply(
            "bookinfo.yaml",
            &fixture("istio-samples/bookinfo/platform/kube/bookinfo.yaml"),
        )
        .unwrap();
    assert_eq!(
        warnings.iter().filter(|w| w.field == "kind").count(),
        4,
        "ServiceAccounts are named as skipped: {warnings:?}"
    );
    p.apply(
        "destination-rule-all.yaml",
        &fixture("istio-samples/bookinfo/networking/destination-rule-all.yaml"),
    )
    .unwrap();
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/istio-samples/bookinfo/networking");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let result = p.apply(&name, &text);
        let (_, _, warnings) = result.unwrap_or_else(|e| panic!("{name} rejected: {e:#?}"));
        // Every file, destination-rule-all-mtls.yaml included, is taken as it is.
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
        if name == "destination-rule-all-mtls.yaml" {
            let tls = p.mesh().policies["reviews.default.svc.cluster.local"]
                .traffic_policy
                .as_ref()
                .and_then(|t| t.tls);
            assert_eq!(tls, Some(meshbench::model::ClientTls::IstioMutual));
        }
    }
    // The last networking file applied wins for reviews: jason -> v2, else v3.
    let mesh = p.mesh();
    // Istio's gateway file as it is: the Gateway and the VirtualService bound to it.
    assert_eq!(mesh.gateways.len(), 1);
    assert_eq!(mesh.gateway_routes[0].gateway.1, "bookinfo-gateway");
    assert_eq!(mesh.gateway_routes[0].hosts, vec!["*".to_string()]);
    let reviews = &mesh.routes["reviews.default.svc.cluster.local"];
    assert_eq!(reviews.http.len(), 2);
}

#[tokio::test]
async fn project_fixtures_compile_together_in_rollout_order() {
    let p = fresh_pilot().await;
    for f in [
        "bookinfo/bookinfo.yaml",
        "bookinfo/destination-rule-all.yaml",
        "bookinfo/virtual-service-all-v1.yaml",
        "bookinfo/virtual-service-reviews-50-v3.yaml",
        "bookinfo/virtual-service-reviews-v3.yaml",
        "bookinfo/virtual-service-reviews-jason-v2.yaml",
        "bookinfo/virtual-service-ratings-delay.yaml",
    ] {
        p.apply(f, &fixture(f))
            .unwrap_or_else(|e| panic!("{f}: {e:#?}"));
    }
    // RouteRules and a VirtualService for the same host conflict; after removing the VS the
    // seed's rules apply.
    let err = p
        .apply(
            "rr.yaml",
            &fixture("bookinfo/route-rule-reviews-50-v3.yaml"),
        )
        .unwrap_err();
    assert!(
        err[0]
            .message
            .contains("already routed by VirtualService/default/reviews"),
        "{err:?}"
    );
    let key = meshbench::model::Key {
        kind: meshbench::model::Kind::VirtualService,
        namespace: "default".into(),
        name: "reviews".into(),
    };
    p.delete(&key).unwrap().unwrap();
    for f in [
        "bookinfo/route-rule-reviews-v1.yaml",
        "bookinfo/route-rule-reviews-50-v3.yaml",
        "bookinfo/route-rule-reviews-v3.yaml",
    ] {
        p.apply(f, &fixture(f))
            .unwrap_or_else(|e| panic!("{f}: {e:#?}"));
    }
}

const BASE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
";

fn find<'a>(errors: &'a [ConfigError], field: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.field == field)
        .unwrap_or_else(|| panic!("no error at {field}: {errors:#?}"))
}

/// Under `--strict-references` an undefined host or subset is an error like any other.
#[tokio::test]
async fn validation_names_file_document_field_and_reason() {
    let p = Pilot::start(&pilot::Config {
        strict_references: true,
        ..Default::default()
    })
    .unwrap();
    p.apply("base.yaml", BASE).unwrap();
    let bad = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match:
    - uri: {regex: '/(unclosed'}
    route:
    - destination: {host: reviews, subset: v1}
      weight: 60
    - destination: {host: reviews, subset: v9}
      weight: 30
  - route:
    - destination: {host: nowhere}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other}
spec:
  host: ghost
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other}
spec:
  host: reviews
";
    let errors = p.apply("bad.yaml", bad).unwrap_err();
    eprintln!(
        "{}",
        errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let dup = find(&errors, "metadata.name");
    assert_eq!((dup.file.as_str(), dup.document), ("bad.yaml", 3));
    assert!(dup.message.contains("duplicate name"));
    // With the duplicate removed, every semantic error is reported at once.
    let bad = bad.rsplitn(2, "---").nth(1).unwrap();
    let errors = p.apply("bad.yaml", bad).unwrap_err();
    let w = find(&errors, "spec.http[0].route");
    assert_eq!(w.document, 1);
    assert!(w.message.contains("sum to 90"), "{w}");
    assert!(find(&errors, "spec.http[0].route[1].destination.subset")
        .message
        .contains("\"v9\""));
    assert!(find(&errors, "spec.http[0].match[0].uri.regex")
        .message
        .contains("invalid regex"));
    assert!(find(&errors, "spec.http[1].route[0].destination.host")
        .message
        .contains("unknown host"));
    let ghost = find(&errors, "spec.host");
    assert_eq!(
        (ghost.document, ghost.object.as_str()),
        (2, "DestinationRule/default/other")
    );
    assert!(errors.iter().all(|e| e.file == "bad.yaml"));
}

/// By default a reference to what nothing defines yet is a warning, as `istioctl analyze`
/// reports it: the object is kept, routes name the cluster that will exist, and it takes
/// effect when the host or subset is defined (in any order).
#[tokio::test]
async fn undefined_references_are_warnings_and_take_effect_when_defined() {
    let p = fresh_pilot().await;
    p.apply("base.yaml", BASE).unwrap();
    let early = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v3}
      weight: 50
    - destination: {host: ratings}
      weight: 50
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings}
spec:
  host: ratings
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
";
    let (_, keys, warnings) = p.apply("early.yaml", early).unwrap();
    assert_eq!(keys.len(), 3);
    for (doc, field) in [
        (1, "spec.http[0].route[0].destination.subset"),
        (1, "spec.http[0].route[1].destination.host"),
        (2, "spec.host"),
        (3, "spec.hosts[0]"),
    ] {
        let w = warnings
            .iter()
            .find(|w| w.field == field && w.document == doc)
            .unwrap_or_else(|| panic!("no warning on {field}: {warnings:#?}"));
        assert!(w.message.contains("kept"), "{w}");
    }
    // Routed meanwhile to clusters that do not exist yet (proxies answer 503 there).
    let mesh = p.mesh();
    let reviews = &mesh.routes["reviews.default.svc.cluster.local"].http[0].route;
    assert_eq!(
        reviews[1].destination.host,
        "ratings.default.svc.cluster.local"
    );
    let routes = meshbench::xds::route::route_configs(&mesh);
    let rc =
        <envoy_types::pb::envoy::config::route::v3::RouteConfiguration as prost::Message>::decode(
            routes[meshbench::xds::OUTBOUND_ROUTE_NAME]
                .any
                .value
                .as_slice(),
        )
        .unwrap();
    let text = format!("{rc:?}");
    for cluster in [
        "outbound|9080|v3|reviews.default.svc.cluster.local",
        "outbound|9080||ratings.default.svc.cluster.local",
    ] {
        assert!(text.contains(cluster), "{cluster} not routed to");
    }
    assert!(!mesh
        .routes
        .contains_key("ratings.default.svc.cluster.local"));
    assert!(!mesh
        .policies
        .contains_key("ratings.default.svc.cluster.local"));

    // The host and subset appear: what was kept takes effect, with no warning left.
    let later = "apiVersion: v1
kind: Service
metadata: {name: ratings}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: ratings}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
";
    let (_, _, warnings) = p.apply("later.yaml", later).unwrap();
    assert!(warnings.is_empty(), "{warnings:#?}");
    let mesh = p.mesh();
    assert!(mesh.warnings.is_empty(), "{:#?}", mesh.warnings);
    assert!(mesh
        .routes
        .contains_key("ratings.default.svc.cluster.local"));
    let policy = &mesh.policies["ratings.default.svc.cluster.local"];
    assert!(policy.traffic_policy.is_some());

    // Deleting a host others refer to is allowed too; they fall back to warnings.
    let key = meshbench::model::Key {
        kind: meshbench::model::Kind::Service,
        namespace: "default".into(),
        name: "ratings".into(),
    };
    p.delete(&key).unwrap().unwrap();
    assert!(p.mesh().warnings.iter().any(|w| w.field == "spec.host"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_changes_nothing_and_the_api_survives_garbage() {
    let p = start_pilot(Duration::ZERO).await;
    let version = apply_ok(p.api, BASE).await.version;
    eventually(Duration::from_secs(5), || {
        (p.pilot.snapshot().version == version).then_some(())
    })
    .await
    .unwrap();
    let (_, before) = json(p.api, "GET", "/v1/config", "").await;

    // One good document and one bad one: nothing of the batch lands.
    let batch = "apiVersion: v1\nkind: Service\nmetadata: {name: ratings}\nspec: {ports: [{port: 9080, name: http}], selector: {app: ratings}}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - match: [{uri: {regex: '(('}}]\n    route:\n    - destination: {host: reviews}\n";
    let r = http(p.api, "POST", "/v1/apply?source=batch.yaml", batch).await;
    assert_eq!(r.status, 400);
    let e = &serde_json::from_str::<Errors>(&r.body).unwrap().errors[0];
    assert_eq!(
        (e.file.as_str(), e.document, e.field.as_str()),
        ("batch.yaml", 2, "spec.http[0].match[0].uri.regex")
    );
    let (_, after) = json(p.api, "GET", "/v1/config", "").await;
    assert_eq!(before, after);
    assert_eq!(p.pilot.snapshot().version, version);

    for (method, path, body, want) in [
        ("POST", "/v1/apply", "\u{0}\u{1}{{{ not yaml", 400),
        ("POST", "/v1/apply", "kind: [", 400),
        ("POST", "/v1/apply", "- 1\n- 2\n", 400),
        (
            "POST",
            "/v1/apply",
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 99999}]}\n",
            400,
        ),
        ("POST", "/v1/endpoints", "{\"add\": 7}", 400),
        (
            "POST",
            "/v1/endpoints",
            "{\"add\": [{\"name\": \"a\", \"address\": \"not-an-ip\"}]}",
            400,
        ),
        (
            "POST",
            "/v1/endpoints",
            "{\"remove\": [{\"name\": \"ghost\"}]}",
            400,
        ),
        ("DELETE", "/v1/config/Gizmo/default/x", "", 400),
        ("DELETE", "/v1/config/Service/default/ghost", "", 404),
        (
            "DELETE",
            "/v1/config/DestinationRule/default/reviews",
            "",
            200,
        ),
        ("GET", "/v1/nothing", "", 404),
    ] {
        let r = http(p.api, method, path, body).await;
        assert_eq!(r.status, want, "{method} {path}: {}", r.body);
        if want >= 400 {
            let e: Errors = serde_json::from_str(&r.body)
                .unwrap_or_else(|_| panic!("{method} {path}: not an error body: {}", r.body));
            assert!(!e.errors.is_empty(), "{method} {path}: {}", r.body);
        } else {
            let _: serde_json::Value = serde_json::from_str(&r.body)
                .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {}", r.body));
        }
    }
    // Binary garbage
    let mut c = Client::connect(p.api).await.unwrap();
    let r = c
        .request(
            "POST",
            &p.api.to_string(),
            "/v1/apply",
            &[],
            [0xffu8, 0xfe, 0x00],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let (s, _) = json(p.api, "GET", "/healthz", "").await;
    assert_eq!(s, 200);
}
