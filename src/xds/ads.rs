//! The ADS server: Envoy's `AggregatedDiscoveryService` over gRPC (tonic), state of the world
//! and delta, one task per stream. Split by job:
//! - [`stream`]: the loop every stream runs, the node handshake, response chunking, and the
//!   [`SnapshotSource`] seam through which config reaches the streams;
//! - [`sotw`] and [`delta`]: the protocol rules of each variant (nonces, ACK/NACK, what to send);
//! - [`ledger`]: pushes, ACKs and NACKs per proxy (the REST API's `/v1/proxies`, propagation);
//! - [`metrics`]: counters and histograms for `/metrics`.
//!
//! Nothing here knows the mesh: streams see resources, names, hashes and versions only.

pub mod delta;
pub mod ledger;
pub mod metrics;
pub mod sotw;
pub mod stream;
pub mod tls;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use delta::DeltaConnection;
use ledger::Ledger;
use sotw::SotwConnection;
use stream::{drive, SnapshotSource, StreamCtx, StreamSlot, RESPONSE_QUEUE};

/// Largest request message accepted on a stream (Envoy's requests are small: 10,000 EDS names
/// are about 0.6 MB).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Most ADS streams open at once, over all connections (a sweep simulates up to 20,000).
pub const MAX_STREAMS: usize = 25_000;

/// The ADS service. Cloning shares everything.
#[derive(Clone)]
pub struct AdsServer {
    source: Arc<dyn SnapshotSource>,
    pub ledger: Arc<Ledger>,
    next_conn: Arc<AtomicU64>,
    open_streams: Arc<AtomicUsize>,
    /// Send every subscribed assignment when any changed (not only the changed ones).
    pub full_push: bool,
    /// Peers besides loopback that may claim any node identity (the harness host).
    pub trusted_peers: Vec<IpAddr>,
}

impl AdsServer {
    pub fn new(source: Arc<dyn SnapshotSource>, ledger: Arc<Ledger>) -> AdsServer {
        AdsServer {
            source,
            ledger,
            next_conn: Arc::new(AtomicU64::new(1)),
            open_streams: Arc::new(AtomicUsize::new(0)),
            full_push: false,
            trusted_peers: vec![],
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// A context for a new stream from `peer`, or RESOURCE_EXHAUSTED at [`MAX_STREAMS`].
    fn stream_ctx<T>(&self, request: &Request<T>) -> Result<StreamCtx, Status> {
        let open = self.open_streams.fetch_add(1, Ordering::Relaxed);
        let slot = StreamSlot(self.open_streams.clone());
        if open >= MAX_STREAMS {
            return Err(Status::resource_exhausted(format!(
                "pilot serves at most {MAX_STREAMS} ADS streams"
            )));
        }
        Ok(StreamCtx {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            ledger: self.ledger.clone(),
            full_push: self.full_push,
            peer: request.remote_addr().or_else(|| {
                request
                    .extensions()
                    .get::<tls::XdsConnectInfo>()
                    .map(|c| c.remote_addr)
            }),
            identity: request
                .extensions()
                .get::<tls::XdsConnectInfo>()
                .map(|c| c.identity.clone().unwrap_or_default()),
            trusted: self.trusted_peers.clone().into(),
            _slot: slot,
        })
    }
}

/// Connections from `net::incoming` tell tonic their addresses (`Request::remote_addr`).
impl tonic::transport::server::Connected for crate::net::Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.local,
            remote_addr: Some(self.peer),
        }
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let ctx = self.stream_ctx(&request)?;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = SotwConnection::new(ctx, tx);
        tokio::spawn(drive(conn, request.into_inner(), self.source.watch()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let ctx = self.stream_ctx(&request)?;
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = DeltaConnection::new(ctx, tx);
        tokio::spawn(drive(conn, request.into_inner(), self.source.watch()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
