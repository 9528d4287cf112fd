//! The ADS protocol rules, checked with a raw xDS client over real gRPC: NACKs are recorded
//! and not answered with a resend loop, stale nonces are ignored, reconnects get everything.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshbench::xds::{node, CLUSTER_TYPE, ENDPOINT_TYPE};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const MESH: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1}
spec: {address: 127.0.0.1, labels: {app: reviews}, ports: {http: 1}}
";

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
    node: Node,
}

async fn connect(p: &TestPilot, id: &str) -> Stream {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", p.xds))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let rx = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let node = Node {
        id: node::sidecar_id("127.0.0.9", id, "default"),
        cluster: "test".into(),
        metadata: Some(node::metadata(&Default::default(), "127.0.0.1")),
        ..Default::default()
    };
    Stream { tx, rx, node }
}

impl Stream {
    async fn send(
        &self,
        type_url: &str,
        version: &str,
        nonce: &str,
        names: &[&str],
        error: Option<&str>,
    ) {
        self.tx
            .send(DiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: type_url.into(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                error_detail: error.map(|m| RpcStatus {
                    code: 13,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("a response within 10 s")
            .unwrap()
            .unwrap()
    }

    /// Nothing arrives within `d` (a bounded check that no resend happens).
    async fn quiet(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!(
                "unexpected response: {:?}",
                m.map(|r| r.map(|r| (r.type_url, r.nonce)))
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_recorded_and_not_answered_with_a_resend_loop() {
    let p = start_pilot(Duration::ZERO).await;
    let version = apply_ok(p.api, MESH).await.version;
    // Wait for the snapshot to carry the config.
    eventually(Duration::from_secs(5), || {
        (p.pilot.snapshot().version == version).then_some(())
    })
    .await
    .unwrap();

    let mut st = connect(&p, "nacker").await;
    st.send(CLUSTER_TYPE, "", "", &[], None).await;
    let cds = st.recv().await;
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert_eq!(cds.version_info, version.to_string());
    assert!(!cds.resources.is_empty());

    st.send(
        CLUSTER_TYPE,
        "",
        &cds.nonce,
        &[],
        Some("test: cluster rejected on purpose"),
    )
    .await;
    st.quiet(Duration::from_millis(500)).await;

    let cds_status = |proxies: Vec<ProxyStatus>| {
        let me = proxies
            .into_iter()
            .find(|x| x.node.pod == "nacker")
            .unwrap();
        me.types["cds"].clone()
    };
    let me = cds_status(proxies(p.api).await);
    assert_eq!(me.nacks, 1);
    let nack = me.last_nack.as_ref().unwrap();
    assert_eq!(nack.message, "test: cluster rejected on purpose");
    assert_eq!(nack.nonce, cds.nonce);
    assert!(me.acked_version.is_none());
    let metrics = http(p.api, "GET", "/metrics", "").await.body;
    assert!(
        metrics.contains("meshbench_pilot_xds_nacks_total{type=\"cds\"} 1"),
        "{metrics}"
    );

    // A new config is pushed once, and its ACK is recorded.
    let v2 = apply_ok(p.api, "apiVersion: v1\nkind: Service\nmetadata: {name: ratings}\nspec: {ports: [{port: 9080, name: http}], selector: {app: ratings}}\n").await.version;
    let cds2 = st.recv().await;
    assert_eq!(cds2.version_info, v2.to_string());
    assert!(cds2.resources.len() > cds.resources.len());
    st.send(CLUSTER_TYPE, &cds2.version_info, &cds2.nonce, &[], None)
        .await;
    st.quiet(Duration::from_millis(300)).await;
    let me = cds_status(proxies(p.api).await);
    assert_eq!(me.acked_version, Some(v2.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_nonces_are_ignored_and_eds_is_incremental() {
    let p = start_pilot(Duration::ZERO).await;
    let version = apply_ok(p.api, MESH).await.version;
    eventually(Duration::from_secs(5), || {
        (p.pilot.snapshot().version == version).then_some(())
    })
    .await
    .unwrap();
    let mut st = connect(&p, "eds").await;
    let cluster = "outbound|9080||reviews.default.svc.cluster.local";
    st.send(CLUSTER_TYPE, "", "", &[], None).await;
    let cds = st.recv().await;
    st.send(ENDPOINT_TYPE, "", "", &[cluster], None).await;
    let eds = st.recv().await;
    assert_eq!(eds.resources.len(), 1);
    st.send(CLUSTER_TYPE, &cds.version_info, &cds.nonce, &[], None)
        .await;
    st.send(
        ENDPOINT_TYPE,
        &eds.version_info,
        &eds.nonce,
        &[cluster],
        None,
    )
    .await;

    // Both ACKs are in before the change (else the EDS ACK may arrive after the next push
    // and count as stale too).
    let start = std::time::Instant::now();
    loop {
        let acked = proxies(p.api).await.into_iter().any(|x| {
            x.node.pod == "eds"
                && x.types.get("eds").and_then(|t| t.acked_version.clone())
                    == Some(eds.version_info.clone())
                && x.types.get("cds").and_then(|t| t.acked_version.clone())
                    == Some(cds.version_info.clone())
        });
        if acked {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "ACKs not recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // An endpoint change: only EDS is pushed, CDS is unchanged.
    let batch = r#"{"add": [{"name": "r2", "address": "127.0.0.2", "labels": {"app": "reviews"}, "ports": {"http": 2}}]}"#;
    let (s, _) = json(p.api, "POST", "/v1/endpoints", batch).await;
    assert_eq!(s, 200);
    let eds2 = st.recv().await;
    assert_eq!(eds2.type_url, ENDPOINT_TYPE);
    assert_eq!(eds2.resources.len(), 1);
    // A request carrying the old nonce is stale: no answer, and the proxy stays unsynced.
    st.send(
        ENDPOINT_TYPE,
        &eds.version_info,
        &eds.nonce,
        &[cluster],
        None,
    )
    .await;
    st.quiet(Duration::from_millis(300)).await;
    let metrics = http(p.api, "GET", "/metrics", "").await.body;
    assert!(
        metrics.contains("meshbench_pilot_xds_stale_requests_total 1"),
        "{metrics}"
    );
    st.send(
        ENDPOINT_TYPE,
        &eds2.version_info,
        &eds2.nonce,
        &[cluster],
        None,
    )
    .await;
    st.quiet(Duration::from_millis(200)).await;

    // A reconnect (empty nonce, last accepted version) is answered in full.
    drop(st);
    let mut st = connect(&p, "eds").await;
    st.send(CLUSTER_TYPE, &eds2.version_info, "", &[], None)
        .await;
    let again = st.recv().await;
    assert_eq!(again.resources.len(), cds.resources.len());
}
