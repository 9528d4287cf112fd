//! What the SotW and the delta streams share: the loop that drives one stream (requests in,
//! snapshots to push), the node handshake, the response size bound, and the seam through
//! which snapshots reach the streams ([`SnapshotSource`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::{watch, Notify};
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
#[derive(Debug)]
pub struct StreamCtx {
    /// Connection number (the REST API's `connection`).
    pub id: u64,
    pub ledger: Arc<Ledger>,
    /// Send every subscribed assignment when any changed (not only the changed ones).
    pub full_push: bool,
    /// Where the stream comes from (`None` when the transport does not say).
    pub peer: Option<SocketAddr>,
    /// Over mutual TLS: the identity the client's certificate proves (empty: none). A node
    /// must be that identity (its namespace and service account).
    pub identity: Option<String>,
    /// Peers besides loopback that may claim any identity.
    pub trusted: Arc<[IpAddr]>,
    /// Holds one of the server's stream slots while the stream lives.
    pub _slot: StreamSlot,
}

/// Counts an open stream (in the server's gauge) until its context is dropped.
#[derive(Debug)]
pub struct StreamSlot(pub Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most resource names one stream may subscribe to per type (a sidecar of a 10,000-service
/// mesh needs 10,000 EDS names). Beyond it the stream is closed: subscriptions are state pilot
/// keeps per stream, and a peer must not grow it without bound.
pub const MAX_NAMES: usize = 50_000;
/// Longest node id accepted (Istio's are well under 256 bytes).
pub const MAX_NODE_ID: usize = 512;

/// The error that closes a stream whose subscriptions grew past [`MAX_NAMES`].
pub fn too_many_names() -> Status {
    Status::resource_exhausted(format!(
        "more than {MAX_NAMES} resource names subscribed on one stream and type"
    ))
}

/// The stream is gone; stop.
pub struct Closed;

/// What the SotW and the delta streams have in common: requests of their own type, and
/// snapshots to push once the node is known. [`drive`] runs either until the stream ends.
pub trait AdsConnection: Send {
    type Request: prost::Message + Default + Send + 'static;
    fn ctx(&self) -> &StreamCtx;
    fn peer(&self) -> &Peer;
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
        let replaced = c.peer().replaced.clone();
        tokio::select! {
            _ = async { replaced.expect("guarded").notified().await }, if replaced.is_some() => {
                tracing::info!(conn = c.ctx().id, "a newer stream took over this node identity; closing");
                break;
            }
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    if c.on_request(req, &mut snapshots).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(conn = c.ctx().id, %status, "ADS stream ended");
                    break;
                }
            },
            changed = snapshots.changed(), if c.peer().node.is_some() => {
                if changed.is_err() {
                    break;
                }
                let snap = snapshots.borrow_and_update().clone();
                // A registration may change who the node is: its certificate must still
                // speak for it.
                if let (Some(proven), Some(node)) = (&c.ctx().identity, &c.peer().node) {
                    if let Err(why) = snap.may_speak_for(node, proven) {
                        tracing::warn!(conn = c.ctx().id, "closing: {why}");
                        break;
                    }
                }
                if c.on_snapshot(snap).await.is_err() {
                    break;
                }
            }
        }
    }
    c.ctx().ledger.unregister(c.ctx().id);
}

/// A registered node: who it is, its first view, and the signal that a newer stream replaced it.
pub type Registered = (NodeInfo, View, Arc<Notify>);

/// Who is at the other end of a stream, once its first request said so.
#[derive(Default)]
pub struct Peer {
    pub node: Option<NodeInfo>,
    /// The node's view of the latest snapshot it was given.
    pub view: Option<View>,
    /// Fires when another stream took over this node identity.
    replaced: Option<Arc<Notify>>,
}

impl Peer {
    /// The start of every request, SotW and delta alike: the type URL must be one pilot
    /// serves (`Ok(None)`: ignored), and a stream's first request must name an acceptable node
    /// ([`first_node`]). A refusal is sent to the peer and closes the stream.
    pub async fn accept<R>(
        &mut self,
        ctx: &StreamCtx,
        type_url: &str,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
        tx: &tokio::sync::mpsc::Sender<Result<R, Status>>,
    ) -> Result<Option<&'static str>, Closed> {
        let Some(known) = crate::xds::PUSH_ORDER
            .iter()
            .copied()
            .find(|t| *t == type_url)
        else {
            tracing::warn!(conn = ctx.id, type_url = %super::ledger::peer_str(type_url, 128), "request for an unknown type ignored");
            return Ok(None);
        };
        // Secrets (private keys) go only to a proven identity (the mTLS port) or a trusted
        // peer (loopback, the harness host), as istiod serves none on its plaintext port.
        if known == crate::xds::SECRET_TYPE && ctx.identity.is_none() {
            let trusted = ctx
                .peer
                .is_none_or(|p| crate::net::is_loopback(&p) || ctx.trusted.contains(&p.ip()));
            if !trusted {
                let _ = tx
                    .send(Err(Status::permission_denied(
                        "secrets are served over mutual TLS (pilot --xds-tls-addr) only",
                    )))
                    .await;
                return Err(Closed);
            }
        }
        if self.node.is_none() {
            match first_node(ctx, node, snapshots) {
                Ok((info, view, replaced)) => {
                    self.node = Some(info);
                    self.view = Some(view);
                    self.replaced = Some(replaced);
                }
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return Err(Closed);
                }
            }
        }
        Ok(Some(known))
    }
}

/// The first request of a stream names the node. Checks it (present, a sane id, and, from an
/// untrusted peer, an IP that is the stream's source address), registers it (replacing an older
/// stream of the same identity) and returns its first view; the error closes the stream.
pub fn first_node(
    ctx: &StreamCtx,
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
) -> Result<Registered, Status> {
    let node = node.ok_or_else(|| {
        Status::invalid_argument("the first request on an ADS stream must carry the node")
    })?;
    if node.id.is_empty() || node.id.len() > MAX_NODE_ID {
        return Err(Status::invalid_argument(format!(
            "node id must have 1 to {MAX_NODE_ID} bytes"
        )));
    }
    let info = NodeInfo::from_node(node);
    if let Some(peer) = ctx.peer {
        let trusted = crate::net::is_loopback(&peer) || ctx.trusted.contains(&peer.ip());
        let claimed = info.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok());
        if !trusted && claimed != Some(peer.ip()) {
            return Err(Status::permission_denied(format!(
                "node id claims {} but the stream comes from {}",
                claimed.map_or("no pod IP".to_string(), |ip| ip.to_string()),
                peer.ip()
            )));
        }
    }
    let snap = snapshots.borrow_and_update().clone();
    if let Some(proven) = &ctx.identity {
        if let Err(why) = snap.may_speak_for(&info, proven) {
            return Err(Status::permission_denied(format!(
                "node {}: {why}",
                super::ledger::peer_str(&info.id, 128)
            )));
        }
    }
    let mut info = info;
    info.proven = ctx.identity.clone();
    let replaced = ctx.ledger.register(ctx.id, &info);
    let view = snap.view(&info);
    Ok((info, view, replaced))
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
