//! meshbench proxy NACKs what it cannot apply, with a precise error_detail, and keeps serving
//! its last good config. A small scripted ADS server (real gRPC) feeds it good resources
//! (translated by meshbench's own xds layer), then broken ones.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::{cluster::LbPolicy, Cluster};
use envoy_types::pb::envoy::config::listener::v3::{filter::ConfigType, Listener};
use envoy_types::pb::envoy::config::route::v3::{route_match::PathSpecifier, RouteConfiguration};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use meshbench::xds::node::NodeInfo;
use meshbench::xds::snapshot::Snapshot;
use meshbench::xds::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// Resources per type, and every request received.
#[derive(Clone)]
struct Script {
    resources: Arc<Mutex<HashMap<String, (u64, Vec<Any>)>>>,
    requests: Arc<Mutex<Vec<DiscoveryRequest>>>,
    pushes: broadcast::Sender<String>,
    snapshot: Arc<Snapshot>,
}

impl Script {
    fn set(&self, type_url: &str, resources: Vec<Any>) {
        let mut m = self.resources.lock().unwrap();
        let version = m.get(type_url).map_or(1, |(v, _)| v + 1);
        m.insert(type_url.to_string(), (version, resources));
        drop(m);
        let _ = self.pushes.send(type_url.to_string());
    }

    fn get(&self, type_url: &str) -> Vec<Any> {
        self.resources
            .lock()
            .unwrap()
            .get(type_url)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Script {
    type StreamAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let script = self.clone();
        let mut pushes = self.pushes.subscribe();
        tokio::spawn(async move {
            let mut nonce = 0;
            let send = |type_url: String, nonce: u64| {
                let (version, resources) = script
                    .resources
                    .lock()
                    .unwrap()
                    .get(&type_url)
                    .cloned()
                    .unwrap_or((0, vec![]));
                DiscoveryResponse {
                    version_info: version.to_string(),
                    resources,
                    type_url,
                    nonce: nonce.to_string(),
                    ..Default::default()
                }
            };
            loop {
                tokio::select! {
                    req = inbound.message() => {
                        let Ok(Some(req)) = req else { return };
                        if let Some(node) = &req.node {
                            // Listeners depend on the proxy's identity: build them now.
                            let view = script.snapshot.view(&NodeInfo::from_node(node));
                            let mut m = script.resources.lock().unwrap();
                            m.entry(LISTENER_TYPE.into()).or_insert((1, view.listeners.iter().map(|r| r.any.clone()).collect()));
                            m.entry(CLUSTER_TYPE.into()).or_insert((1, view.all(CLUSTER_TYPE).into_iter().map(|r| r.any.clone()).collect()));
                        }
                        let first = req.response_nonce.is_empty();
                        let t = req.type_url.clone();
                        script.requests.lock().unwrap().push(req);
                        if first {
                            nonce += 1;
                            if tx.send(Ok(send(t, nonce))).await.is_err() { return }
                        }
                    }
                    t = pushes.recv() => {
                        let Ok(t) = t else { return };
                        nonce += 1;
                        if tx.send(Ok(send(t, nonce))).await.is_err() { return }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("scripted server speaks SotW"))
    }
}

fn reencode<T: Message + Default>(any: &Any, f: impl FnOnce(&mut T)) -> Any {
    let mut m = T::decode(any.value.as_slice()).unwrap();
    f(&mut m);
    Any {
        type_url: any.type_url.clone(),
        value: m.encode_to_vec(),
    }
}

impl Script {
    /// Waits for the NACK of the latest `type_url` push; returns (version_info, message).
    async fn nack(&self, type_url: &str) -> (String, String) {
        let start = Instant::now();
        loop {
            let found = self
                .requests
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|r| r.type_url == type_url && r.error_detail.is_some())
                .map(|r| {
                    (
                        r.version_info.clone(),
                        r.error_detail.as_ref().unwrap().message.clone(),
                    )
                });
            if let Some(f) = found {
                self.requests.lock().unwrap().clear();
                return f;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no NACK for {type_url}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resources_are_nacked_precisely_and_the_last_good_config_serves() {
    let up = start_upstream("127.0.0.1", "reviews-v1", Behavior::Ok).await;
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{ports: [{{port: 9080, name: http}}], selector: {{app: reviews}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: r1}}\nspec: {{address: 127.0.0.1, labels: {{app: reviews}}, ports: {{http: {}}}}}\n",
        up.addr.port()
    );
    let objects = meshbench::config::parse("t.yaml", &yaml).unwrap().objects;
    let mesh = meshbench::model::compile::compile(objects.iter(), [], false).unwrap();
    let snapshot = Arc::new(Snapshot::build(
        1,
        Arc::new(mesh),
        std::time::Instant::now(),
        SystemTime::now(),
    ));
    let (pushes, _) = broadcast::channel(16);
    let script = Script {
        resources: Arc::default(),
        requests: Arc::default(),
        pushes,
        snapshot: snapshot.clone(),
    };
    script.set(
        ENDPOINT_TYPE,
        snapshot.endpoints.values().map(|r| r.any.clone()).collect(),
    );
    script.set(
        ROUTE_TYPE,
        // The explicit layout's one route configuration (the per-port ones are for captured
        // sidecars).
        snapshot
            .routes
            .get(meshbench::xds::OUTBOUND_ROUTE_NAME)
            .map(|r| r.any.clone())
            .into_iter()
            .collect(),
    );
    let sock = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = sock.local_addr().unwrap();
    let svc = AggregatedDiscoveryServiceServer::new(script.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(sock)),
    );

    let proxy = start_mesh_proxy(
        xds,
        "productpage",
        "productpage-0",
        &[("app", "productpage")],
    )
    .await;
    let outbound: SocketAddr = format!("{}:15001", proxy.pod_ip).parse().unwrap();
    let serves = || async {
        let mut c = Client::connect(outbound).await.unwrap();
        c.get("reviews:9080", "/").await.unwrap().status
    };
    eventually(Duration::from_secs(10), || {
        std::net::TcpStream::connect(outbound).ok()
    })
    .await
    .expect("outbound listener bound");
    let start = Instant::now();
    while serves().await != 200 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    script.requests.lock().unwrap().clear();

    let good_rds = script.get(ROUTE_TYPE);
    let good_lds = script.get(LISTENER_TYPE);
    let good_cds = script.get(CLUSTER_TYPE);

    // Bad regex in a route.
    script.set(
        ROUTE_TYPE,
        vec![reencode::<RouteConfiguration>(&good_rds[0], |rc| {
            rc.virtual_hosts[0].routes[0]
                .r#match
                .as_mut()
                .unwrap()
                .path_specifier = Some(PathSpecifier::SafeRegex(RegexMatcher {
                regex: "/(unclosed".into(),
                ..Default::default()
            }));
        })],
    );
    let (version, msg) = script.nack(ROUTE_TYPE).await;
    assert!(
        msg.contains("invalid regex") && msg.contains("/(unclosed"),
        "{msg}"
    );
    assert_eq!(version, "1", "NACK carries the last accepted version");
    assert_eq!(serves().await, 200);

    // A route to a cluster that does not exist, in a configuration that asks for validation.
    let to_nowhere = |validate: bool| {
        reencode::<RouteConfiguration>(&good_rds[0], |rc| {
            if let Some(envoy_types::pb::envoy::config::route::v3::route::Action::Route(a)) =
                &mut rc.virtual_hosts[0].routes[0].action
            {
                a.cluster_specifier = Some(envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier::Cluster("nope".into()));
            }
            rc.validate_clusters =
                Some(envoy_types::pb::google::protobuf::BoolValue { value: validate });
        })
    };
    script.set(ROUTE_TYPE, vec![to_nowhere(true)]);
    let (_, msg) = script.nack(ROUTE_TYPE).await;
    assert!(msg.contains("unknown cluster 'nope'"), "{msg}");
    assert_eq!(serves().await, 200);
    // Without validation (RDS's default) it is accepted, and the route answers 503 as Envoy's.
    let until = |want: u16| async move {
        let start = Instant::now();
        while serves().await != want {
            assert!(start.elapsed() < Duration::from_secs(10), "never {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    script.set(ROUTE_TYPE, vec![to_nowhere(false)]);
    until(503).await;
    script.set(ROUTE_TYPE, good_rds.clone());
    until(200).await;
    script.requests.lock().unwrap().clear();

    // An HTTP filter it does not implement.
    script.set(LISTENER_TYPE, good_lds.iter().map(|l| reencode::<Listener>(l, |l| {
        let Some(ConfigType::TypedConfig(any)) = &mut l.filter_chains[0].filters[0].config_type else { panic!() };
        *any = reencode::<HttpConnectionManager>(any, |m| {
            m.http_filters.insert(0, HttpFilter { name: "envoy.filters.http.lua".into(), config_type: Some(http_filter::ConfigType::TypedConfig(Any { type_url: "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua".into(), value: vec![] })), ..Default::default() });
        });
    })).collect());
    let (_, msg) = script.nack(LISTENER_TYPE).await;
    assert!(
        msg.contains("unsupported HTTP filter envoy.filters.http.lua"),
        "{msg}"
    );
    assert_eq!(serves().await, 200);

    // A load balancer it does not implement, and a duplicate cluster.
    script.set(
        CLUSTER_TYPE,
        good_cds
            .iter()
            .map(|c| reencode::<Cluster>(c, |c| c.lb_policy = LbPolicy::RingHash as i32))
            .collect(),
    );
    let (_, msg) = script.nack(CLUSTER_TYPE).await;
    assert!(msg.contains("unsupported lb_policy"), "{msg}");
    let mut dup = good_cds.clone();
    dup.push(good_cds[0].clone());
    script.set(CLUSTER_TYPE, dup);
    let (_, msg) = script.nack(CLUSTER_TYPE).await;
    assert!(msg.contains("duplicate cluster"), "{msg}");
    assert_eq!(serves().await, 200);

    // Good config again is ACKed.
    script.set(ROUTE_TYPE, good_rds);
    let start = Instant::now();
    loop {
        let acked =
            script.requests.lock().unwrap().iter().any(|r| {
                r.type_url == ROUTE_TYPE && r.error_detail.is_none() && r.version_info == "6"
            });
        if acked {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "good RDS not ACKed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = http(proxy.admin, "GET", "/stats", "").await.body;
    assert!(
        stats.contains("control_plane.update_rejected: 5"),
        "{stats}"
    );
}
