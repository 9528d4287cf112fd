//! What the SotW and the delta streams share: the loop that drives one stream (requests in,
//! snapshots to push), the node handshake, the response size bound, and the seam through
//! which snapshots reach the streams ([`SnapshotSource`]).

use std::sync::Arc;

use tokio::sync::watch;
use tonic::{Status, Streaming};

use super::ledger::Ledger;
use crate::xds::node::NodeInfo;
use crate::xds::snapshot::{Snapshot, View};
use crate::xds::Resource;

/// Where the streams get their config: a watch of versioned snapshots, from which each stream
/// derives its node's [`View`]. Pilot's debounced snapshot channel is one; a test, or a second
/// config source, can provide another.
pub trait SnapshotSource: Send + Sync + 'static {
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>>;
}

impl SnapshotSource for watch::Receiver<Arc<Snapshot>> {
    fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.clone()
    }
}

/// One stream's identity and what it reports to.
#[derive(Clone, Debug)]
pub struct StreamCtx {
    /// Connection number (the REST API's `connection`).
    pub id: u64,
    pub ledger: Arc<Ledger>,
    /// Send every subscribed assignment when any changed (not only the changed ones).
    pub full_push: bool,
}

/// The stream is gone; stop.
pub struct Closed;

/// What the SotW and the delta streams have in common: requests of their own type, and
/// snapshots to push once the node is known. [`drive`] runs either until the stream ends.
pub trait AdsConnection: Send {
    type Request: prost::Message + Default + Send + 'static;
    fn id(&self) -> u64;
    fn ledger(&self) -> &Ledger;
    fn has_node(&self) -> bool;
    fn on_request(
        &mut self,
        req: Self::Request,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    ) -> impl std::future::Future<Output = Result<(), Closed>> + Send;
    fn on_snapshot(
        &mut self,
        snap: Arc<Snapshot>,
    ) -> impl std::future::Future<Output = Result<(), Closed>> + Send;
}

pub async fn drive<C: AdsConnection>(
    mut c: C,
    mut inbound: Streaming<C::Request>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    loop {
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if c.on_request(req, &mut snapshots).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(conn = c.id(), %status, "ADS stream ended");
                    break;
                }
            },
            changed = snapshots.changed(), if c.has_node() => {
                if changed.is_err() {
                    break;
                }
                let snap = snapshots.borrow_and_update().clone();
                if c.on_snapshot(snap).await.is_err() {
                    break;
                }
            }
        }
    }
    c.ledger().unregister(c.id());
}

/// The first request of a stream names the node: registers it and returns its first view;
/// `None` when the node is missing (the stream is then refused).
pub fn first_node(
    ledger: &Ledger,
    conn: u64,
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
) -> Option<(NodeInfo, View)> {
    let info = NodeInfo::from_node(node?);
    ledger.register(conn, &info);
    let snap = snapshots.borrow_and_update().clone();
    let view = snap.view(&info);
    Some((info, view))
}

/// The error sent when the first request lacks the node.
pub fn no_node() -> Status {
    Status::invalid_argument("the first request on an ADS stream must carry the node")
}

/// Responses queued per stream ahead of the encoder. Small: with 64 KiB chunks a slow
/// proxy holds at most this many chunks in pilot's memory, however large its config.
pub const RESPONSE_QUEUE: usize = 4;

/// Largest response of a named type (EDS, RDS; every type under delta), in encoded bytes of
/// its resources; one resource larger than this goes alone.
pub const CHUNK_BYTES: usize = 64 << 10;

/// Splits resources into runs of at most [`CHUNK_BYTES`] (at least one resource each; an
/// empty list stays one empty response).
pub fn chunks(resources: Vec<Resource>) -> Vec<Vec<Resource>> {
    let mut out: Vec<Vec<Resource>> = vec![vec![]];
    let mut size = 0;
    for r in resources {
        let len = r.any.value.len();
        if size + len > CHUNK_BYTES && !out.last().expect("never empty").is_empty() {
            out.push(vec![]);
            size = 0;
        }
        size += len;
        out.last_mut().expect("never empty").push(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    fn res(name: &str, pad: usize) -> Resource {
        Resource::new(
            name,
            ClusterLoadAssignment {
                cluster_name: format!("{name}{}", "x".repeat(pad)),
                ..Default::default()
            },
        )
    }

    #[test]
    fn chunks_bound_response_size_and_keep_order() {
        let rs: Vec<Resource> = (0..10).map(|i| res(&format!("r{i}"), 20_000)).collect();
        let c = chunks(rs);
        assert_eq!(c.len(), 4, "3 per 64 KiB chunk");
        for piece in &c {
            let size: usize = piece.iter().map(|r| r.any.value.len()).sum();
            assert!(size <= CHUNK_BYTES);
        }
        let names: Vec<String> = c.into_iter().flatten().map(|r| r.name).collect();
        assert_eq!(names, (0..10).map(|i| format!("r{i}")).collect::<Vec<_>>());
        // A resource larger than a chunk goes alone; an empty list is one empty response.
        assert_eq!(chunks(vec![res("big", 100_000), res("small", 1)]).len(), 2);
        assert_eq!(chunks(vec![]).len(), 1);
    }
}
