//! Another tracker as a source (hub and spoke): a spoke takes every cluster but its own from
//! its hub, checked as any subscriber checks the stream; its own cluster comes from its own
//! watch, which wins. While the hub is out of reach, the hub's clusters keep their last state
//! (fail static), marked disconnected and aging; past the maximum staleness they expire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::super::client::{self, ClientError, Follower, Target};
use super::super::sequence::{Carry, Received, ReplicaError, Sequence};
use super::super::server::{Feed, Tracker};
use super::super::view::Change;
use super::super::wire::{Key, Object, pb};
use crate::model::ClusterId;

/// A spoke's copy of its hub's view, applied to the spoke's tracker.
#[derive(Debug)]
pub struct Upstream {
    own: ClusterId,
    feed: Feed,
    sequence: Sequence,
    /// Clusters a cold hub shows unsynced, kept as they were until synced again.
    carry: Carry,
    /// The keys applied per cluster, so that a fresh snapshot also deletes what it lacks.
    applied: BTreeMap<ClusterId, BTreeSet<Key>>,
    /// The hub's last word on each of its clusters.
    statuses: BTreeMap<ClusterId, pb::ClusterStatus>,
    disconnected_since: Option<tokio::time::Instant>,
    error: String,
    max_staleness: Duration,
}

impl Upstream {
    /// A copy of the hub at `url` for the spoke of cluster `own`, applied to `tracker`.
    pub fn new(url: &str, own: ClusterId, tracker: Tracker, max_staleness: Duration) -> Self {
        Self {
            own,
            feed: tracker.feed(format!("upstream {url}")),
            sequence: Sequence::default(),
            carry: Carry::default(),
            applied: BTreeMap::new(),
            statuses: BTreeMap::new(),
            disconnected_since: None,
            error: String::new(),
            max_staleness,
        }
    }

    /// A fresh snapshot of the hub as a change to what was applied before.
    fn replace(
        &mut self,
        objects: Vec<Object>,
        clusters: Vec<(ClusterId, pb::ClusterStatus)>,
    ) -> Change {
        let mut change = Change::default();
        let mut keys: BTreeMap<ClusterId, BTreeSet<Key>> = BTreeMap::new();
        for o in objects {
            let key = o.key();
            if key.cluster != self.own {
                keys.entry(key.cluster.clone()).or_default().insert(key);
                change.upserts.push(o);
            }
        }
        let mut clusters: Vec<(ClusterId, pb::ClusterStatus)> = clusters
            .into_iter()
            .filter(|(id, _)| *id != self.own)
            .collect();
        let previous = &self.statuses;
        let kept = self.carry.snapshot(
            |id| previous.get(id).is_some_and(|s| s.synced),
            self.applied.values().flatten(),
            &change.upserts,
            &mut clusters,
        );
        for key in &kept {
            keys.entry(key.cluster.clone())
                .or_default()
                .insert(key.clone());
        }
        let statuses: BTreeMap<ClusterId, pb::ClusterStatus> = clusters.into_iter().collect();
        let known: BTreeSet<&ClusterId> = self.applied.keys().chain(self.statuses.keys()).collect();
        for id in known {
            let new = keys.get(id);
            if new.is_none() && !statuses.contains_key(id) {
                change.removed_clusters.push(id.clone());
                continue;
            }
            let old = self.applied.get(id).into_iter().flatten();
            change
                .deletes
                .extend(old.filter(|k| new.is_none_or(|n| !n.contains(*k))).cloned());
        }
        change.clusters = statuses.values().map(|s| self.aged(s)).collect();
        self.applied = keys;
        self.statuses = statuses;
        change
    }

    /// A delta of the hub, without the spoke's own cluster, recorded.
    fn follow_delta(&mut self, mut change: Change) -> Change {
        let own = self.own.clone();
        change.upserts.retain(|o| o.key().cluster != own);
        change.deletes.retain(|k| k.cluster != own);
        change.clusters.retain(|s| s.cluster != own.as_str());
        change.removed_clusters.retain(|id| *id != own);
        self.carry.delta(&mut change);
        for o in &change.upserts {
            let key = o.key();
            self.applied
                .entry(key.cluster.clone())
                .or_default()
                .insert(key);
        }
        for k in &change.deletes {
            if let Some(keys) = self.applied.get_mut(&k.cluster) {
                keys.remove(k);
            }
        }
        for s in &mut change.clusters {
            if let Ok(id) = ClusterId::new(&s.cluster) {
                self.statuses.insert(id, s.clone());
            }
            *s = self.aged(s);
        }
        for id in &change.removed_clusters {
            self.applied.remove(id);
            self.statuses.remove(id);
        }
        change
    }

    /// A hub's status as the spoke serves it: while the hub is out of reach, disconnected,
    /// aging, and expired past the maximum staleness.
    fn aged(&self, status: &pb::ClusterStatus) -> pb::ClusterStatus {
        let Some(since) = self.disconnected_since else {
            return status.clone();
        };
        let away = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let stale_for_ms = status.stale_for_ms.saturating_add(away);
        let limit = u64::try_from(self.max_staleness.as_millis()).unwrap_or(u64::MAX);
        pb::ClusterStatus {
            connected: false,
            stale_for_ms,
            expired: status.expired || stale_for_ms > limit,
            error: self.error.clone(),
            ..status.clone()
        }
    }

    /// Applies every hub cluster's status as the spoke now serves it.
    fn publish_statuses(&self) {
        let clusters = self.statuses.values().map(|s| self.aged(s)).collect();
        self.feed.apply(Change {
            clusters,
            ..Change::default()
        });
    }
}

impl Follower for Upstream {
    fn position(&self) -> Option<pb::Position> {
        self.sequence.position().cloned()
    }

    fn apply(&mut self, update: pb::Update) -> Result<(), ReplicaError> {
        let change = match self.sequence.receive(update)? {
            None => return Ok(()),
            Some(Received::Snapshot { objects, clusters }) => self.replace(objects, clusters),
            Some(Received::Delta(change)) => self.follow_delta(change),
        };
        self.feed.apply(change);
        Ok(())
    }

    fn connected(&mut self) {
        self.disconnected_since = None;
        self.error.clear();
        self.publish_statuses();
    }

    fn disconnected(&mut self, error: &ClientError) {
        self.disconnected_since
            .get_or_insert_with(tokio::time::Instant::now);
        self.error = error.to_string();
        self.publish_statuses();
    }
}

/// Follows the hub at `target` into `tracker` for the spoke of cluster `own` until stopped;
/// while the hub is out of reach, its clusters' statuses age every `max_staleness / 4`
/// (10 ms to 1 s).
pub async fn follow(
    target: Target,
    own: ClusterId,
    tracker: Tracker,
    max_staleness: Duration,
    retry: Duration,
) {
    let request = pb::SubscribeRequest {
        node: String::new(),
        cluster: own.to_string(),
        policy_scope: pb::PolicyScope::AllClusters.into(),
        resume: None,
    };
    let upstream = Arc::new(RwLock::new(Upstream::new(
        target.url(),
        own,
        tracker,
        max_staleness,
    )));
    let tick = (max_staleness / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let aging = async {
        loop {
            tokio::time::sleep(tick).await;
            let upstream = upstream.read().unwrap_or_else(|e| e.into_inner());
            if upstream.disconnected_since.is_some() {
                upstream.publish_statuses();
            }
        }
    };
    tokio::join!(
        client::follow(target.clone(), request, upstream.clone(), retry),
        aging
    );
}
