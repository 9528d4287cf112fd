//! The delta ADS stream (`DeltaAggregatedResources`): per-resource versions (the content
//! hash), so a change sends only the resources that changed and names the ones removed.
//!
//! Rules (docs/xds-notes.md, "Delta specifics"):
//! - CDS and LDS start as wildcard subscriptions (empty `resource_names_subscribe` or `*`);
//!   EDS and RDS subscribe by name, and subscriptions change by later requests with no nonce;
//! - `initial_resource_versions` (after a reconnect) says what the client holds: a resource it
//!   holds at the current version is not sent again;
//! - an ACK is the latest `response_nonce`; a stale nonce is ignored; a NACK (`error_detail`)
//!   is recorded and the rejected versions are not resent until they change (no push loop);
//! - when a cluster the client holds changes, its assignment is pushed unprompted (Envoy keeps
//!   the cluster warming and sends no EDS request for it).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as PbResource,
};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::stream::{chunks, too_many_names, AdsConnection, Closed, Peer, StreamCtx, MAX_NAMES};
use crate::xds::snapshot::{Snapshot, View};
use crate::xds::{type_short, Resource, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, PUSH_ORDER};

/// The version string of a resource: its content hash.
pub fn resource_version(hash: u64) -> String {
    format!("{hash:016x}")
}

/// What a delta push sends.
#[derive(Debug)]
pub struct Diff<'a> {
    /// Resources the client does not hold at their current version (or forced).
    pub send: Vec<&'a Resource>,
    /// Names the client holds that are no longer wanted or no longer exist.
    pub removed: Vec<String>,
    /// Names sent that the client held at another version.
    pub updated: HashSet<String>,
}

/// The delta between what a client should hold (`desired`) and what it holds (`known`:
/// name -> version); `forced` names are sent even when held at the current version.
pub fn diff<'a>(
    desired: &[&'a Resource],
    known: &HashMap<String, u64>,
    forced: &HashSet<String>,
) -> Diff<'a> {
    let mut updated = HashSet::new();
    let send = desired
        .iter()
        .copied()
        .filter(|r| {
            let held = known.get(&r.name);
            if held.is_some_and(|h| *h != r.hash) {
                updated.insert(r.name.clone());
            }
            held != Some(&r.hash) || forced.contains(&r.name)
        })
        .collect();
    let names: HashSet<&str> = desired.iter().map(|r| r.name.as_str()).collect();
    let removed = known
        .keys()
        .filter(|n| !names.contains(n.as_str()))
        .cloned()
        .collect();
    Diff {
        send,
        removed,
        updated,
    }
}

/// Per stream and type.
#[derive(Default)]
struct TypeState {
    /// A first request arrived.
    started: bool,
    wildcard: bool,
    /// Names subscribed to (besides the wildcard).
    subscribed: BTreeSet<String>,
    /// name -> version the client was last sent (or said it holds).
    known: HashMap<String, u64>,
    nonce: String,
    pending: bool,
    nacked: bool,
}

pub struct DeltaConnection {
    ctx: StreamCtx,
    peer: Peer,
    types: HashMap<&'static str, TypeState>,
    nonce: u64,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

impl AdsConnection for DeltaConnection {
    type Request = DeltaDiscoveryRequest;
    fn ctx(&self) -> &StreamCtx {
        &self.ctx
    }
    fn peer(&self) -> &Peer {
        &self.peer
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
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
        let ts = self.types.entry(type_url).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != ts.nonce {
                self.ctx
                    .ledger
                    .metrics
                    .stale_requests
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if let Some(err) = &req.error_detail {
                // `known` keeps the rejected versions: they are not resent until they change.
                ts.pending = false;
                ts.nacked = true;
                self.ctx
                    .ledger
                    .record_nack(self.ctx.id, type_url, "", &req.response_nonce, err);
                return Ok(());
            }
            if ts.pending {
                ts.pending = false;
                ts.nacked = false;
                let version = self
                    .peer
                    .view
                    .as_ref()
                    .map_or(String::new(), |v| v.snapshot.version.to_string());
                self.ctx.ledger.record_ack(self.ctx.id, type_url, version);
                self.check_synced();
            }
        }
        let ts = self.types.get_mut(type_url).expect("inserted above");
        if !ts.started {
            ts.started = true;
            ts.wildcard = View::is_wildcard(type_url)
                && (req.resource_names_subscribe.is_empty()
                    || req.resource_names_subscribe.iter().any(|n| n == "*"));
            for (name, version) in &req.initial_resource_versions {
                if let Ok(h) = u64::from_str_radix(version, 16) {
                    ts.known.insert(name.clone(), h);
                }
            }
        }
        for n in &req.resource_names_subscribe {
            if n == "*" {
                ts.wildcard = true;
            } else {
                ts.subscribed.insert(n.clone());
            }
        }
        if ts.subscribed.len() > MAX_NAMES || ts.known.len() > MAX_NAMES {
            let _ = self.tx.send(Err(too_many_names())).await;
            return Err(Closed);
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                ts.wildcard = false;
            } else {
                ts.subscribed.remove(n);
            }
            ts.known.remove(n);
        }
        self.push(type_url, &HashSet::new(), None).await.map(|_| ())
    }

    /// Pushes what changed for this proxy, in make-before-break order.
    async fn on_snapshot(&mut self, snap: Arc<Snapshot>) -> Result<(), Closed> {
        let node = self
            .peer
            .node
            .as_ref()
            .expect("snapshots are watched once the node is known");
        let old = self.peer.view.take();
        let view = snap.view_from(node, old.as_ref());
        // A proxy that holds the previous snapshot needs at most what changed since.
        let changes = snap.changes_for(old.as_ref(), &view);
        self.peer.view = Some(view);
        let mut changed_clusters = HashSet::new();
        for type_url in PUSH_ORDER {
            if !self.types.get(type_url).is_some_and(|t| t.started) {
                continue;
            }
            let forced = if type_url == ENDPOINT_TYPE {
                std::mem::take(&mut changed_clusters)
            } else {
                HashSet::new()
            };
            let only = match changes.as_ref().map(|c| c.get(type_url)) {
                // Listeners kept; a type the snapshot does not track (secrets) is compared.
                Some(None) if type_url == LISTENER_TYPE => continue,
                Some(Some(n)) if n.is_empty() && forced.is_empty() => continue,
                // Named types: only the changed names; CDS (wildcard) is compared whole.
                Some(Some(n)) if type_url != CLUSTER_TYPE && !self.ctx.full_push => Some(
                    n.iter()
                        .chain(forced.iter())
                        .cloned()
                        .collect::<HashSet<String>>(),
                ),
                _ => None,
            };
            let changed = self.push(type_url, &forced, only.as_ref()).await?;
            if type_url == CLUSTER_TYPE {
                changed_clusters = changed;
            }
        }
        self.check_synced();
        Ok(())
    }
}

impl DeltaConnection {
    pub fn new(
        ctx: StreamCtx,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> DeltaConnection {
        DeltaConnection {
            ctx,
            peer: Peer::default(),
            types: HashMap::new(),
            nonce: 0,
            tx,
        }
    }

    /// Sends the resources of `type_url` the client does not hold at their current version
    /// (and those in `forced`), and the names of the ones it holds that are gone. Returns the
    /// names sent that the client already held at another version.
    /// `only`: compare just these names (the snapshot says nothing else changed).
    async fn push(
        &mut self,
        type_url: &'static str,
        forced: &HashSet<String>,
        only: Option<&HashSet<String>>,
    ) -> Result<HashSet<String>, Closed> {
        let view = self.peer.view.as_ref().expect("view is set with the node");
        let ts = self.types.get_mut(type_url).expect("type state exists");
        let (
            desired,
            Diff {
                mut send,
                removed,
                updated,
            },
        ) = match only {
            Some(names) if !ts.wildcard => {
                let wanted: Vec<&String> = names
                    .iter()
                    .filter(|n| ts.subscribed.contains(*n))
                    .collect();
                let desired: Vec<&Resource> = wanted
                    .iter()
                    .filter_map(|n| view.get(type_url, n))
                    .collect();
                let mut d = diff(&desired, &HashMap::new(), &HashSet::new());
                d.send
                    .retain(|r| ts.known.get(&r.name) != Some(&r.hash) || forced.contains(&r.name));
                d.updated = d
                    .send
                    .iter()
                    .filter(|r| ts.known.contains_key(&r.name))
                    .map(|r| r.name.clone())
                    .collect();
                // Held names that vanished from the snapshot.
                d.removed = wanted
                    .iter()
                    .filter(|n| ts.known.contains_key(**n) && view.get(type_url, n).is_none())
                    .map(|n| n.to_string())
                    .collect();
                (desired, d)
            }
            _ => {
                let desired: Vec<&Resource> = if ts.wildcard {
                    view.all(type_url)
                } else {
                    ts.subscribed
                        .iter()
                        .filter_map(|n| view.get(type_url, n))
                        .collect()
                };
                let d = diff(&desired, &ts.known, forced);
                (desired, d)
            }
        };
        if self.ctx.full_push && type_url == ENDPOINT_TYPE && !send.is_empty() {
            send = desired.clone();
        }
        // The first response of a type goes out even when empty: the client waits for it.
        if send.is_empty() && removed.is_empty() && !ts.nonce.is_empty() {
            return Ok(updated);
        }
        for r in &send {
            ts.known.insert(r.name.clone(), r.hash);
        }
        for n in &removed {
            ts.known.remove(n);
        }
        let snap = view.snapshot.clone();
        ts.pending = true;
        // In responses of at most CHUNK_BYTES (see the SotW server); removals go with the first.
        let pieces = chunks(send.into_iter().cloned().collect());
        let mut removed = Some(removed);
        for piece in pieces {
            self.nonce += 1;
            let nonce = format!("{}-{}", snap.version, self.nonce);
            if let Some(ts) = self.types.get_mut(type_url) {
                ts.nonce = nonce.clone();
            }
            let count = piece.len();
            let response = DeltaDiscoveryResponse {
                system_version_info: snap.version.to_string(),
                resources: piece
                    .into_iter()
                    .map(|r| PbResource {
                        version: resource_version(r.hash),
                        name: r.name,
                        resource: Some(r.any),
                        ..Default::default()
                    })
                    .collect(),
                type_url: type_url.to_string(),
                removed_resources: removed.take().unwrap_or_default(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            let bytes = response.encoded_len() as u64;
            self.ctx
                .ledger
                .record_push(self.ctx.id, type_url, &snap, &nonce, count, bytes);
            tracing::debug!(conn = self.ctx.id, r#type = type_short(type_url), %nonce, count, bytes, "delta push");
            self.tx.send(Ok(response)).await.map_err(|_| Closed)?;
        }
        Ok(updated)
    }

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
