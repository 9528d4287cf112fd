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

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
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
use stream::{drive, SnapshotSource, StreamCtx, RESPONSE_QUEUE};

/// Largest request message accepted on a stream.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The ADS service. Cloning shares everything.
#[derive(Clone)]
pub struct AdsServer {
    source: Arc<dyn SnapshotSource>,
    pub ledger: Arc<Ledger>,
    next_conn: Arc<AtomicU64>,
    /// Send every subscribed assignment when any changed (not only the changed ones).
    pub full_push: bool,
}

impl AdsServer {
    pub fn new(source: Arc<dyn SnapshotSource>, ledger: Arc<Ledger>) -> AdsServer {
        AdsServer {
            source,
            ledger,
            next_conn: Arc::new(AtomicU64::new(1)),
            full_push: false,
        }
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn stream_ctx(&self) -> StreamCtx {
        StreamCtx {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            ledger: self.ledger.clone(),
            full_push: self.full_push,
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
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = SotwConnection::new(self.stream_ctx(), tx);
        tokio::spawn(drive(conn, request.into_inner(), self.source.watch()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let (tx, rx) = mpsc::channel(RESPONSE_QUEUE);
        let conn = DeltaConnection::new(self.stream_ctx(), tx);
        tokio::spawn(drive(conn, request.into_inner(), self.source.watch()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
