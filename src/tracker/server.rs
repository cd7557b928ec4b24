//! The tracker's gRPC service: each subscriber gets a snapshot (or, resuming, what it missed)
//! and then every delta, filtered to its policy scope. A subscriber that reads too slowly is
//! not buffered without bound: once it falls behind the shared buffer it gets a fresh
//! snapshot instead of the deltas it missed.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::subscriber::{Subscriber, SubscriberError, claimed_scope};
use super::tls::TlsFiles;
use super::view::{Change, Scope, View};
use super::wire::pb;
use crate::model::ClusterId;

/// Deltas kept for subscribers that are behind, shared by all of them.
const SHARED_BUFFER: usize = 4096;
/// A subscription request is small; anything larger is not one.
const MAX_REQUEST_BYTES: usize = 64 << 10;
/// HTTP/2 pings find a peer that vanished without closing its connection.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);
/// Updates queued for one subscriber's connection.
const SUBSCRIBER_BUFFER: usize = 64;
/// Snapshot parts stay well below tonic's 4 MiB message limit.
pub const SNAPSHOT_PART_BYTES: usize = 1 << 20;

/// The view behind the service, and the channel its deltas go out on.
#[derive(Debug, Clone)]
pub struct Tracker {
    view: Arc<RwLock<View>>,
    deltas: broadcast::Sender<Arc<pb::Update>>,
    part_bytes: usize,
    /// Subscribers are who their client certificates say (mutual TLS), not who their
    /// requests claim.
    authenticated: bool,
    owners: Arc<Mutex<Owners>>,
    /// Turns true when the server shuts down: every stream ends, so that subscribers
    /// reconnect (elsewhere, or to the restarted tracker) instead of waiting.
    closing: Option<tokio::sync::watch::Receiver<bool>>,
    stats: Arc<Stats>,
}

/// One source's way into a tracker: everything it applies is in its name.
#[derive(Debug, Clone)]
pub struct Feed {
    tracker: Tracker,
    source: Arc<str>,
}

impl Feed {
    /// Applies a change from this source (see [`Tracker::apply_from`]).
    pub fn apply(&self, change: Change) {
        self.tracker.apply_from(&self.source, change);
    }

    /// The keys of the objects of `kind` the view holds for `cluster`: what a restarted
    /// watch must reconcile its first list with.
    pub fn known(&self, kind: pb::Kind, cluster: &ClusterId) -> BTreeSet<super::wire::Key> {
        self.tracker.read(|view| view.keys(kind, cluster))
    }
}

/// What the service has done, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Subscribers being fed now.
    pub subscribers: AtomicI64,
    /// Snapshots sent (to new subscribers, to those that could not resume, to laggards).
    pub snapshots: AtomicU64,
    /// Subscribers that resumed with only what they missed.
    pub resumed: AtomicU64,
    /// Subscribers that fell behind the shared buffer.
    pub lagged: AtomicU64,
    /// Subscriptions refused (identity, scope or a malformed request).
    pub refused: AtomicU64,
    /// Objects, deletes and statuses refused because another source owns their cluster.
    pub unowned: AtomicU64,
}

/// Which source each cluster comes from: the first to name it, until it removes it.
#[derive(Debug, Default)]
struct Owners {
    by_cluster: BTreeMap<ClusterId, String>,
    /// Refusals already logged.
    refused: BTreeSet<(ClusterId, String)>,
}

impl Owners {
    /// Whether `source` may speak for `cluster`, claiming it if nobody does.
    fn admits(&mut self, source: &str, cluster: &ClusterId) -> bool {
        let owner = self
            .by_cluster
            .entry(cluster.clone())
            .or_insert_with(|| source.to_owned());
        if owner == source {
            return true;
        }
        if self.refused.insert((cluster.clone(), source.to_owned())) {
            tracing::error!(%cluster, owner = %owner, refused = %source,
                "two sources claim one cluster: the second is refused");
        }
        false
    }

    /// What of `change` comes from the owners of its clusters.
    fn filter(&mut self, source: &str, mut change: Change) -> Change {
        change
            .upserts
            .retain(|o| self.admits(source, &o.key().cluster));
        change.deletes.retain(|k| self.admits(source, &k.cluster));
        change
            .clusters
            .retain(|s| ClusterId::new(&s.cluster).is_ok_and(|id| self.admits(source, &id)));
        change.removed_clusters.retain(|id| {
            let owned = self.by_cluster.get(id).is_some_and(|o| o == source);
            if owned {
                self.by_cluster.remove(id);
                self.refused.retain(|(c, _)| c != id);
            }
            owned
        });
        change
    }
}

impl Tracker {
    /// A tracker over `view`, sending snapshots in parts of about `part_bytes`.
    pub fn new(view: View, part_bytes: usize) -> Self {
        let (deltas, _) = broadcast::channel(SHARED_BUFFER);
        Self {
            view: Arc::new(RwLock::new(view)),
            deltas,
            part_bytes,
            authenticated: false,
            owners: Arc::default(),
            closing: None,
            stats: Arc::default(),
        }
    }

    /// Applies a change from the tracker's only source and sends its delta to every
    /// subscriber.
    pub fn apply(&self, change: Change) {
        self.apply_from("", change);
    }

    /// Applies a change from `source` and sends its delta to every subscriber. A cluster
    /// belongs to the first source that names it, until that source removes it: what
    /// another source says of it is refused, and logged once.
    pub fn apply_from(&self, source: &str, change: Change) {
        let size = |c: &Change| {
            c.upserts.len() + c.deletes.len() + c.clusters.len() + c.removed_clusters.len()
        };
        let before = size(&change);
        let change = self
            .owners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(source, change);
        let refused = before - size(&change);
        if refused > 0 {
            self.stats
                .unowned
                .fetch_add(refused as u64, Ordering::Relaxed);
        }
        let update = self
            .view
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(change);
        if let Some(update) = update {
            // No subscriber is fine: the delta is in the view's log.
            let _ = self.deltas.send(update);
        }
    }

    /// The way in for the source named `source`.
    pub fn feed(&self, source: impl Into<Arc<str>>) -> Feed {
        Feed {
            tracker: self.clone(),
            source: source.into(),
        }
    }

    /// Reads the view.
    pub fn read<R>(&self, f: impl FnOnce(&View) -> R) -> R {
        f(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// What the service has done.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The current position.
    pub fn position(&self) -> pb::Position {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .position()
    }

    /// Subscribes a reader of the deltas, then reads what it starts from under the same view
    /// state: nothing is missed, and what is seen twice is recognised by its revision.
    fn start(
        &self,
        scope: &Scope,
        resume: Option<&pb::Position>,
    ) -> (
        broadcast::Receiver<Arc<pb::Update>>,
        Vec<Arc<pb::Update>>,
        u64,
    ) {
        let receiver = self.deltas.subscribe();
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let revision = view.position().revision;
        let initial = match resume.and_then(|p| view.since(p)) {
            Some(missed) => {
                self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                missed.iter().map(|u| scope.filter(u)).collect()
            }
            None => {
                self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
                view.snapshot(scope, self.part_bytes)
                    .into_iter()
                    .map(Arc::new)
                    .collect()
            }
        };
        (receiver, initial, revision)
    }

    /// Serves the gRPC service on `listener` until `shutdown` resolves: with mutual TLS when
    /// given `tls` (every subscriber is who its certificate says), else plaintext (every
    /// subscriber is who it claims).
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        tls: Option<&TlsFiles>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let mut tracker = self.clone();
        tracker.authenticated = tls.is_some();
        let (close, closing) = tokio::sync::watch::channel(false);
        tracker.closing = Some(closing);
        let shutdown = async move {
            shutdown.await;
            // Streams never end by themselves: end them, or the drain waits forever.
            let _ = close.send(true);
        };
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE))
            .http2_keepalive_timeout(Some(KEEPALIVE / 3))
            .tcp_keepalive(Some(KEEPALIVE))
            .add_service(tracker.service());
        match tls {
            // Each connection with the certificate the files hold when it comes.
            Some(tls) => {
                let tls = tls.clone();
                let incoming = super::tls::incoming(listener, move || tls.server_config());
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            None => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        }
    }

    /// The gRPC service.
    pub fn service(&self) -> pb::tracker_server::TrackerServer<Self> {
        pb::tracker_server::TrackerServer::new(self.clone())
            .max_encoding_message_size(4 * SNAPSHOT_PART_BYTES)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    /// Feeds one subscriber until it goes away.
    async fn send_updates(
        self,
        scope: Scope,
        resume: Option<pb::Position>,
        tx: mpsc::Sender<Result<pb::Update, Status>>,
    ) {
        let (mut deltas, initial, mut revision) = self.start(&scope, resume.as_ref());
        let mut pending = initial;
        loop {
            for update in pending.drain(..) {
                if tx.send(Ok((*update).clone())).await.is_err() {
                    return;
                }
            }
            let fresh = match deltas.recv().await {
                // Seen already, in the snapshot or the missed deltas this subscriber started
                // from.
                Ok(update) if update.position.as_ref().map_or(0, |p| p.revision) <= revision => {
                    false
                }
                Ok(update) if update.change.is_none() => {
                    tracing::info!(
                        ?scope,
                        "a change too large for one delta; sending a fresh snapshot"
                    );
                    true
                }
                Ok(update) => {
                    revision = update.position.as_ref().map_or(0, |p| p.revision);
                    pending.push(scope.filter(&update));
                    false
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.stats.lagged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        ?scope,
                        missed,
                        "subscriber fell behind; sending a fresh snapshot"
                    );
                    true
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if fresh {
                // The view as it now is, whole.
                let (receiver, snapshot, at) = self.start(&scope, None);
                deltas = receiver;
                revision = at;
                pending = snapshot;
            }
        }
    }
}

/// The gRPC status for a refused subscriber.
fn refusal(e: SubscriberError) -> Status {
    match e {
        SubscriberError::BadRequest { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::permission_denied(e.to_string()),
    }
}

/// The stream of updates to one subscriber.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::Update, Status>> + Send>>;

#[tonic::async_trait]
impl pb::tracker_server::Tracker for Tracker {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let certificates = request.peer_certs();
        let req = request.into_inner();
        let who = match certificates.as_deref().and_then(|c| c.first()) {
            Some(leaf) => Some(Subscriber::from_certificate(leaf).map_err(refusal)?),
            None if self.authenticated => {
                return Err(Status::unauthenticated("a client certificate is required"));
            }
            None => None,
        };
        let scope = match &who {
            Some(who) => who.authorize(&req),
            None => claimed_scope(&req),
        }
        .map_err(|e| {
            tracing::warn!(subscriber = ?who, node = ?req.node, cluster = ?req.cluster, error = %e, "subscriber refused");
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            refusal(e)
        })?;
        tracing::info!(subscriber = ?who, node = %req.node, cluster = %req.cluster, ?scope, resume = req.resume.is_some(), "subscriber");
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let feed = self.clone().send_updates(scope, req.resume, tx);
        let closing = self.closing.clone();
        let stats = self.stats.clone();
        stats.subscribers.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            match closing {
                Some(mut closing) => {
                    tokio::select! {
                        () = feed => {}
                        _ = closing.wait_for(|closed| *closed) => {}
                    }
                }
                None => feed.await,
            }
            stats.subscribers.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
