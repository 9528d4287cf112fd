//! State-of-the-world ADS rules, per stream:
//! - a request whose `response_nonce` is not the latest sent for that type on that stream is
//!   stale and ignored (Envoy ACKs back-to-back pushes separately);
//! - a NACK (`error_detail` set) is recorded and not answered: the server resends only when the
//!   config changes again, so a bad resource cannot cause a push loop;
//! - a first request for a type (empty nonce, also after a reconnect) is answered in full;
//! - CDS and LDS responses carry every resource; EDS and RDS responses carry only the named
//!   resources that changed (incremental EDS), plus the assignment of every cluster that CDS
//!   just changed, so a warming cluster never waits for `initial_fetch_timeout`
//!   (docs/xds-notes.md, "Warming after a changed cluster").

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::stream::{chunks, too_many_names, AdsConnection, Closed, Peer, StreamCtx, MAX_NAMES};
use crate::xds::snapshot::{Snapshot, View};
use crate::xds::{type_short, Resource, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, PUSH_ORDER};

/// Per stream and type.
#[derive(Default)]
struct TypeState {
    /// Names asked for (EDS, RDS); unused for wildcard types.
    subscribed: BTreeSet<String>,
    /// name -> content hash as last sent. A NACKed version stays here, so it is not resent
    /// until it changes (no push loop on a resource the proxy rejects).
    sent: HashMap<String, u64>,
    /// Latest nonce sent ("" before the first response).
    nonce: String,
    /// Waiting for an ACK or NACK of `nonce`.
    pending: bool,
    /// The latest response was NACKed.
    nacked: bool,
}

pub struct SotwConnection {
    ctx: StreamCtx,
    peer: Peer,
    types: HashMap<&'static str, TypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
}

impl AdsConnection for SotwConnection {
    type Request = DiscoveryRequest;
    fn ctx(&self) -> &StreamCtx {
        &self.ctx
    }
    fn peer(&self) -> &Peer {
        &self.peer
    }

    async fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    ) -> Result<(), Closed> {
        let accepted = self
            .peer
            .accept(
                &self.ctx,
                &req.type_url,
                req.node.as_ref(),
                snapshots,
                &self.tx,
            )
            .await?;
        let Some(type_url) = accepted else {
            return Ok(());
        };
        if req.resource_names.len() > MAX_NAMES {
            let _ = self.tx.send(Err(too_many_names())).await;
            return Err(Closed);
        }
        let ts = self.types.entry(type_url).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != ts.nonce {
            self.ctx
                .ledger
                .metrics
                .stale_requests
                .fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let Some(err) = &req.error_detail {
            ts.pending = false;
            ts.nacked = true;
            self.ctx.ledger.record_nack(
                self.ctx.id,
                type_url,
                &req.version_info,
                &req.response_nonce,
                err,
            );
            return Ok(());
        }
        let first = ts.nonce.is_empty();
        if !first {
            // ACK of the latest response.
            if ts.pending {
                ts.pending = false;
                ts.nacked = false;
                self.ctx
                    .ledger
                    .record_ack(self.ctx.id, type_url, req.version_info.clone());
                self.check_synced();
            }
        }
        let ts = self.types.get_mut(type_url).expect("inserted above");
        let wildcard = View::is_wildcard(type_url);
        // Most requests are ACKs naming the same resources: nothing more to do.
        let same = req.resource_names.len() == ts.subscribed.len()
            && req.resource_names.iter().all(|n| ts.subscribed.contains(n));
        if !first && (wildcard || same) {
            return Ok(());
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        let added: Vec<String> = names.difference(&ts.subscribed).cloned().collect();
        if !wildcard {
            ts.sent.retain(|n, _| names.contains(n));
        }
        ts.subscribed = names;
        let view = self.peer.view.as_ref().expect("view is set with the node");
        let resources: Vec<Resource> = if wildcard {
            if !first {
                return Ok(());
            }
            view.all(type_url).into_iter().cloned().collect()
        } else {
            let wanted: Vec<&String> = if first {
                ts.subscribed.iter().collect()
            } else {
                added.iter().collect()
            };
            if wanted.is_empty() {
                return Ok(());
            }
            wanted
                .into_iter()
                .filter_map(|n| view.get(type_url, n))
                .cloned()
                .collect()
        };
        self.send(type_url, resources).await
    }

    /// Pushes what changed for this proxy, in make-before-break order.
    async fn on_snapshot(&mut self, snap: Arc<Snapshot>) -> Result<(), Closed> {
        let node = self
            .peer
            .node
            .as_ref()
            .expect("snapshots are watched once the node is known");
        // The view is the state every response below is taken from; `send` reads it too.
        let old = self.peer.view.take();
        let view = snap.view_from(node, old.as_ref());
        // A proxy that holds the previous snapshot needs at most what changed since.
        let changes = snap.changes_for(old.as_ref(), &view);
        self.peer.view = Some(view);
        let mut changed_clusters: Vec<String> = Vec::new();
        for type_url in PUSH_ORDER {
            let view = self.peer.view.as_ref().expect("set above");
            let Some(ts) = self.types.get(type_url) else {
                continue;
            };
            if ts.nonce.is_empty() {
                continue;
            }
            let changed_names = changes.as_ref().map(|c| c.get(type_url));
            match changed_names {
                // Listeners kept; clusters unchanged: nothing to compare.
                Some(None) if type_url == LISTENER_TYPE => continue,
                Some(Some(n)) if n.is_empty() && changed_clusters.is_empty() => continue,
                _ => {}
            }
            let resources: Vec<Resource> = if let (Some(Some(names)), false) = (
                changed_names,
                View::is_wildcard(type_url) || self.ctx.full_push,
            ) {
                // Only the changed names this proxy subscribes to (and clusters CDS changed).
                let mut out: Vec<Resource> = names
                    .iter()
                    .chain(changed_clusters.iter())
                    .filter(|n| ts.subscribed.contains(*n))
                    .filter_map(|n| view.get(type_url, n))
                    .filter(|r| {
                        ts.sent.get(&r.name) != Some(&r.hash) || changed_clusters.contains(&r.name)
                    })
                    .cloned()
                    .collect();
                out.sort_by(|a, b| a.name.cmp(&b.name));
                out.dedup_by(|a, b| a.name == b.name);
                if out.is_empty() {
                    continue;
                }
                out
            } else if View::is_wildcard(type_url) {
                let all = view.all(type_url);
                let same = all.len() == ts.sent.len()
                    && all.iter().all(|r| ts.sent.get(&r.name) == Some(&r.hash));
                if same {
                    continue;
                }
                if type_url == CLUSTER_TYPE {
                    changed_clusters = all
                        .iter()
                        .filter(|r| ts.sent.get(&r.name).is_some_and(|h| *h != r.hash))
                        .map(|r| r.name.clone())
                        .collect();
                }
                all.into_iter().cloned().collect()
            } else {
                let forced: BTreeSet<&String> = if type_url == ENDPOINT_TYPE {
                    changed_clusters.iter().collect()
                } else {
                    BTreeSet::new()
                };
                let subscribed = ts.subscribed.iter().filter_map(|n| view.get(type_url, n));
                let changed: Vec<Resource> = subscribed
                    .clone()
                    .filter(|r| ts.sent.get(&r.name) != Some(&r.hash) || forced.contains(&r.name))
                    .cloned()
                    .collect();
                if changed.is_empty() {
                    continue;
                }
                if self.ctx.full_push && type_url == ENDPOINT_TYPE {
                    subscribed.cloned().collect()
                } else {
                    changed
                }
            };
            self.send(type_url, resources).await?;
        }
        self.check_synced();
        Ok(())
    }
}

impl SotwConnection {
    pub fn new(ctx: StreamCtx, tx: mpsc::Sender<Result<DiscoveryResponse, Status>>) -> Self {
        SotwConnection {
            ctx,
            peer: Peer::default(),
            types: HashMap::new(),
            nonce: 0,
            tx,
        }
    }

    /// Sends `resources`; EDS and RDS (named types) in responses of at most [`CHUNK_BYTES`],
    /// which bounds what each stream's encoder buffers (and keeps) to that size instead of
    /// the whole assignment set. Only the last response's ACK counts (the earlier nonces are
    /// stale by then), and it covers the earlier ones: a proxy applies responses in order.
    async fn send(
        &mut self,
        type_url: &'static str,
        resources: Vec<Resource>,
    ) -> Result<(), Closed> {
        if View::is_wildcard(type_url) {
            return self.send_one(type_url, resources).await;
        }
        for chunk in chunks(resources) {
            self.send_one(type_url, chunk).await?;
        }
        Ok(())
    }

    async fn send_one(
        &mut self,
        type_url: &'static str,
        resources: Vec<Resource>,
    ) -> Result<(), Closed> {
        let view = self.peer.view.as_ref().expect("view is set with the node");
        let snap = &view.snapshot;
        self.nonce += 1;
        let nonce = format!("{}-{}", snap.version, self.nonce);
        let ts = self
            .types
            .get_mut(type_url)
            .expect("type state exists before a send");
        if View::is_wildcard(type_url) {
            ts.sent.clear();
        }
        for r in &resources {
            ts.sent.insert(r.name.clone(), r.hash);
        }
        ts.nonce = nonce.clone();
        ts.pending = true;
        let count = resources.len();
        let response = DiscoveryResponse {
            version_info: snap.version.to_string(),
            resources: resources.into_iter().map(|r| r.any).collect(),
            type_url: type_url.to_string(),
            nonce: nonce.clone(),
            ..Default::default()
        };
        let bytes = response.encoded_len() as u64;
        self.ctx
            .ledger
            .record_push(self.ctx.id, type_url, snap, &nonce, count, bytes);
        tracing::debug!(conn = self.ctx.id, r#type = type_short(type_url), %nonce, count, bytes, "push");
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    /// When clusters and listeners were both received and nothing awaits an ACK or was
    /// NACKed, the proxy holds this snapshot.
    fn check_synced(&self) {
        let received = |t: &str| self.types.get(t).is_some_and(|s| !s.nonce.is_empty());
        if received(CLUSTER_TYPE)
            && received(LISTENER_TYPE)
            && !self.types.values().any(|t| t.pending || t.nacked)
        {
            if let Some(view) = &self.peer.view {
                self.ctx.ledger.record_synced(self.ctx.id, &view.snapshot);
            }
        }
    }
}
