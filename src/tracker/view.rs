//! The tracker's view: every object of every cluster at a revision, and the recent deltas, so
//! that a subscriber gets a snapshot (in parts) and then deltas, and one that reconnects gets
//! only what it missed. Deltas are built once and shared by every subscriber of a scope.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use prost::Message as _;

use super::wire::{Key, Object, pb};
use crate::model::ClusterId;

/// A change from a source: objects added or replaced, objects gone, cluster statuses.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Objects added or replaced.
    pub upserts: Vec<Object>,
    /// Objects deleted.
    pub deletes: Vec<Key>,
    /// Cluster statuses that changed.
    pub clusters: Vec<pb::ClusterStatus>,
    /// Clusters that left, with all their objects.
    pub removed_clusters: Vec<ClusterId>,
}

/// Whose policies a subscriber receives (everything else goes to everyone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The policies of this cluster only: a node agent's, since policies are local.
    Cluster(ClusterId),
    /// Every cluster's policies (`weft policy check --tracker`).
    AllClusters,
}

impl Scope {
    fn admits_key(&self, kind: pb::Kind, cluster: &str) -> bool {
        match self {
            Scope::AllClusters => true,
            // Policies of both kinds are local: a node agent gets its own cluster's.
            Scope::Cluster(own) => {
                !matches!(kind, pb::Kind::NetworkPolicy | pb::Kind::IdentityPolicy)
                    || cluster == own.as_str()
            }
        }
    }

    fn admits(&self, o: &pb::Object) -> bool {
        match &o.object {
            Some(pb::object::Object::NetworkPolicy(p)) => {
                self.admits_key(pb::Kind::NetworkPolicy, &p.cluster)
            }
            Some(pb::object::Object::IdentityPolicy(p)) => {
                self.admits_key(pb::Kind::IdentityPolicy, &p.cluster)
            }
            _ => true,
        }
    }

    /// The update as this scope sees it: shared when nothing is left out.
    pub fn filter(&self, update: &Arc<pb::Update>) -> Arc<pb::Update> {
        let Some(pb::update::Change::Delta(d)) = &update.change else {
            return update.clone();
        };
        let keeps_key = |k: &pb::ObjectKey| {
            self.admits_key(pb::Kind::try_from(k.kind).unwrap_or_default(), &k.cluster)
        };
        if d.upserts.iter().all(|o| self.admits(o)) && d.deletes.iter().all(keeps_key) {
            return update.clone();
        }
        Arc::new(pb::Update {
            position: update.position.clone(),
            change: Some(pb::update::Change::Delta(pb::Delta {
                upserts: d
                    .upserts
                    .iter()
                    .filter(|o| self.admits(o))
                    .cloned()
                    .collect(),
                deletes: d.deletes.iter().filter(|k| keeps_key(k)).cloned().collect(),
                clusters: d.clusters.clone(),
                removed_clusters: d.removed_clusters.clone(),
            })),
        })
    }
}

/// Every object at a revision, and the deltas that led there.
#[derive(Debug)]
pub struct View {
    epoch: String,
    revision: u64,
    objects: BTreeMap<Key, pb::Object>,
    /// How many objects of each kind each cluster has.
    counts: BTreeMap<(ClusterId, pb::Kind), usize>,
    clusters: BTreeMap<ClusterId, pb::ClusterStatus>,
    /// The most recent deltas, oldest first.
    log: VecDeque<(usize, Arc<pb::Update>)>,
    /// Changes (objects upserted or deleted, statuses) held in `log`.
    logged: usize,
    /// The most changes `log` holds.
    history: usize,
    /// The largest delta sent as one: a larger one would pass the message limit.
    max_delta_bytes: usize,
}

/// The largest delta sent as one by default, well below tonic's 4 MiB message limit.
pub const MAX_DELTA_BYTES: usize = 2 << 20;

impl View {
    /// An empty view of a new epoch, keeping the deltas of the last `history` changes
    /// (objects and statuses) for resumption. A delta larger than that is not kept: whoever
    /// is behind it takes a snapshot, which is no larger.
    pub fn new(epoch: impl Into<String>, history: usize) -> Self {
        Self {
            epoch: epoch.into(),
            revision: 0,
            objects: BTreeMap::new(),
            counts: BTreeMap::new(),
            clusters: BTreeMap::new(),
            log: VecDeque::new(),
            logged: 0,
            history,
            max_delta_bytes: MAX_DELTA_BYTES,
        }
    }

    /// The same view with deltas larger than `bytes` (encoded) not sent as deltas.
    pub fn with_max_delta_bytes(mut self, bytes: usize) -> Self {
        self.max_delta_bytes = bytes;
        self
    }

    /// The current position.
    pub fn position(&self) -> pb::Position {
        pb::Position {
            epoch: self.epoch.clone(),
            revision: self.revision,
        }
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the view holds no object.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The keys of the objects of `kind` that `cluster` has.
    pub fn keys(&self, kind: pb::Kind, cluster: &ClusterId) -> std::collections::BTreeSet<Key> {
        let from = Key {
            kind,
            cluster: cluster.clone(),
            namespace: String::new(),
            name: String::new(),
        };
        self.objects
            .range(from..)
            .map(|(k, _)| k)
            .take_while(|k| k.kind == kind && k.cluster == *cluster)
            .cloned()
            .collect()
    }

    /// How many objects of each kind each cluster has (kinds with none left out).
    pub fn counts(&self) -> impl Iterator<Item = (&ClusterId, pb::Kind, usize)> {
        self.counts.iter().map(|((c, k), n)| (c, *k, *n))
    }

    /// The status of every cluster.
    pub fn clusters(&self) -> impl Iterator<Item = &pb::ClusterStatus> {
        self.clusters.values()
    }

    /// Applies a change; returns the delta to send, or `None` when nothing changed. A delta
    /// too large to send as one comes back without its change: a subscriber takes a fresh
    /// snapshot instead (splitting it could show a half-applied change, say a policy removed
    /// before its replacement arrives), and it is not kept for resumption.
    pub fn apply(&mut self, change: Change) -> Option<Arc<pb::Update>> {
        let mut delta = pb::Delta::default();
        for cluster in change.removed_clusters {
            let before = self.objects.len();
            self.objects.retain(|k, _| k.cluster != cluster);
            self.counts.retain(|(c, _), _| *c != cluster);
            let had_status = self.clusters.remove(&cluster).is_some();
            if had_status || before != self.objects.len() {
                delta.removed_clusters.push(cluster.to_string());
            }
        }
        for o in change.upserts {
            let wire = pb::Object::from(&o);
            let key = o.key();
            if self.objects.get(&key) != Some(&wire) {
                let counted = (key.cluster.clone(), key.kind);
                if self.objects.insert(key, wire.clone()).is_none() {
                    *self.counts.entry(counted).or_default() += 1;
                }
                delta.upserts.push(wire);
            }
        }
        for key in change.deletes {
            if self.objects.remove(&key).is_some() {
                let counted = (key.cluster.clone(), key.kind);
                if let Some(n) = self.counts.get_mut(&counted) {
                    *n -= 1;
                    if *n == 0 {
                        self.counts.remove(&counted);
                    }
                }
                delta.deletes.push(pb::ObjectKey::from(&key));
            }
        }
        for status in change.clusters {
            let Ok(id) = ClusterId::new(&status.cluster) else {
                continue;
            };
            if self.clusters.get(&id) != Some(&status) {
                self.clusters.insert(id, status.clone());
                delta.clusters.push(status);
            }
        }
        if delta == pb::Delta::default() {
            return None;
        }
        self.revision += 1;
        let changes = delta.upserts.len()
            + delta.deletes.len()
            + delta.clusters.len()
            + delta.removed_clusters.len();
        let update = Arc::new(pb::Update {
            position: Some(self.position()),
            change: Some(pb::update::Change::Delta(delta)),
        });
        let oversized = update.encoded_len() > self.max_delta_bytes;
        if oversized {
            self.log.clear();
            self.logged = 0;
            return Some(Arc::new(pb::Update {
                position: update.position.clone(),
                change: None,
            }));
        }
        if changes > self.history {
            self.log.clear();
            self.logged = 0;
        } else {
            self.log.push_back((changes, update.clone()));
            self.logged += changes;
            while self.logged > self.history {
                match self.log.pop_front() {
                    Some((n, _)) => self.logged -= n,
                    None => break,
                }
            }
        }
        Some(update)
    }

    /// The view as `scope` sees it, in parts of at most about `max_part_bytes` encoded (a
    /// single object larger than that gets a part of its own); all parts carry the current
    /// position, the first the cluster statuses.
    pub fn snapshot(&self, scope: &Scope, max_part_bytes: usize) -> Vec<pb::Update> {
        let part = |first, objects, clusters| pb::Update {
            position: Some(self.position()),
            change: Some(pb::update::Change::Snapshot(pb::SnapshotPart {
                first,
                last: false,
                objects,
                clusters,
            })),
        };
        let mut parts = Vec::new();
        let mut objects = Vec::new();
        let mut size = 0;
        let mut clusters: Vec<pb::ClusterStatus> = self.clusters.values().cloned().collect();
        for o in self.objects.values().filter(|o| scope.admits(o)) {
            let len = o.encoded_len();
            if !objects.is_empty() && size + len > max_part_bytes {
                parts.push(part(
                    parts.is_empty(),
                    std::mem::take(&mut objects),
                    std::mem::take(&mut clusters),
                ));
                size = 0;
            }
            size += len;
            objects.push(o.clone());
        }
        parts.push(part(parts.is_empty(), objects, clusters));
        if let Some(pb::update::Change::Snapshot(last)) =
            parts.last_mut().and_then(|p| p.change.as_mut())
        {
            last.last = true;
        }
        parts
    }

    /// The deltas after `from`, if this view still holds them all (same epoch, not older
    /// than its log); `None` means the subscriber needs a snapshot.
    pub fn since(&self, from: &pb::Position) -> Option<Vec<Arc<pb::Update>>> {
        if from.epoch != self.epoch || from.revision > self.revision {
            return None;
        }
        let missed = (self.revision - from.revision) as usize;
        if missed > self.log.len() {
            return None;
        }
        Some(
            self.log
                .iter()
                .skip(self.log.len() - missed)
                .map(|(_, u)| u.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Namespace, NetworkPolicy, Pod};

    fn c(id: &str) -> ClusterId {
        ClusterId::new(id).expect("cluster id")
    }

    fn pod(cluster: &str, name: &str, ip: &str) -> Object {
        Object::Pod(
            Pod::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a", "uid": format!("{cluster}-{name}")},
                    "status": {"phase": "Running", "podIP": ip}}))
                .expect("pod"),
            )
            .expect("valid"),
        )
    }

    fn policy(cluster: &str, name: &str) -> Object {
        Object::NetworkPolicy(
            NetworkPolicy::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a"}, "spec": {"podSelector": {}}}))
                .expect("policy"),
                &mut Vec::new(),
            )
            .expect("valid"),
        )
    }

    fn upserts(objects: Vec<Object>) -> Change {
        Change {
            upserts: objects,
            ..Change::default()
        }
    }

    fn delta(u: &pb::Update) -> &pb::Delta {
        match &u.change {
            Some(pb::update::Change::Delta(d)) => d,
            other => panic!("not a delta: {other:?}"),
        }
    }

    #[test]
    fn revisions_count_real_changes_only() {
        let mut v = View::new("e1", 10);
        let first = v
            .apply(upserts(vec![pod("c1", "a", "10.0.0.1")]))
            .expect("a change");
        assert_eq!(
            first.position,
            Some(pb::Position {
                epoch: "e1".into(),
                revision: 1
            })
        );
        assert!(
            v.apply(upserts(vec![pod("c1", "a", "10.0.0.1")])).is_none(),
            "same object"
        );
        let moved = v
            .apply(upserts(vec![pod("c1", "a", "10.0.0.2")]))
            .expect("a change");
        assert_eq!(delta(&moved).upserts.len(), 1);
        let key = pod("c1", "a", "").key();
        assert!(
            v.apply(Change {
                deletes: vec![key.clone()],
                ..Change::default()
            })
            .is_some()
        );
        assert!(
            v.apply(Change {
                deletes: vec![key],
                ..Change::default()
            })
            .is_none(),
            "gone already"
        );
        assert_eq!(v.position().revision, 3);
        assert!(v.is_empty());
    }

    #[test]
    fn a_delta_larger_than_the_history_is_not_kept() {
        let mut v = View::new("e1", 3);
        v.apply(upserts(
            (0..10)
                .map(|i| pod("c1", &format!("p{i}"), "10.0.0.1"))
                .collect(),
        ));
        v.apply(upserts(vec![pod("c1", "x", "10.0.0.2")]));
        let at = |revision| pb::Position {
            epoch: "e1".into(),
            revision,
        };
        assert_eq!(v.since(&at(1)).map(|d| d.len()), Some(1));
        assert!(
            v.since(&at(0)).is_none(),
            "behind the large delta: a snapshot"
        );
    }

    #[test]
    fn resumption_gives_what_was_missed_or_asks_for_a_snapshot() {
        let mut v = View::new("e1", 2);
        for i in 0..4 {
            v.apply(upserts(vec![pod("c1", &format!("p{i}"), "10.0.0.1")]));
        }
        let at = |revision| pb::Position {
            epoch: "e1".into(),
            revision,
        };
        assert_eq!(v.since(&at(4)).map(|d| d.len()), Some(0));
        let missed = v.since(&at(2)).expect("held");
        assert_eq!(
            missed
                .iter()
                .map(|u| u.position.as_ref().map(|p| p.revision))
                .collect::<Vec<_>>(),
            [Some(3), Some(4)]
        );
        assert!(v.since(&at(1)).is_none(), "older than the log");
        assert!(
            v.since(&at(5)).is_none(),
            "ahead of the view: another tracker's history"
        );
        assert!(
            v.since(&pb::Position {
                epoch: "e0".into(),
                revision: 4
            })
            .is_none(),
            "another epoch"
        );
    }

    #[test]
    fn snapshots_come_in_bounded_parts_and_filter_policies_by_scope() {
        let mut v = View::new("e1", 10);
        let mut objects: Vec<Object> = (0..100)
            .map(|i| pod("c1", &format!("p{i}"), "10.0.0.1"))
            .collect();
        objects.push(policy("c1", "mine"));
        objects.push(policy("c2", "theirs"));
        v.apply(upserts(objects));
        let own = Scope::Cluster(c("c1"));
        let parts = v.snapshot(&own, 1000);
        assert!(parts.len() > 3, "{} parts", parts.len());
        let mut seen = 0;
        for (i, p) in parts.iter().enumerate() {
            assert!(
                p.encoded_len() < 1200,
                "part {i} is {} bytes",
                p.encoded_len()
            );
            let Some(pb::update::Change::Snapshot(s)) = &p.change else {
                panic!("a snapshot part")
            };
            assert_eq!((s.first, s.last), (i == 0, i + 1 == parts.len()));
            seen += s.objects.len();
        }
        assert_eq!(seen, 101, "every pod and only the subscriber's own policy");
        let all = Scope::AllClusters;
        let total: usize = v
            .snapshot(&all, usize::MAX)
            .iter()
            .map(|p| match &p.change {
                Some(pb::update::Change::Snapshot(s)) => s.objects.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(total, 102);
        let empty = View::new("e2", 1).snapshot(&own, 1000);
        assert_eq!(empty.len(), 1, "an empty view is one part, first and last");
    }

    #[test]
    fn deltas_are_shared_unless_a_scope_leaves_something_out() {
        let mut v = View::new("e1", 10);
        let pods = v
            .apply(upserts(vec![pod("c2", "x", "10.0.0.9")]))
            .expect("a change");
        let own = Scope::Cluster(c("c1"));
        assert!(Arc::ptr_eq(&own.filter(&pods), &pods));
        let theirs = v
            .apply(upserts(vec![policy("c2", "p"), pod("c2", "y", "10.0.0.8")]))
            .expect("a change");
        let filtered = own.filter(&theirs);
        assert_eq!(
            delta(&filtered).upserts.len(),
            1,
            "their policy is not a node's business"
        );
        let gone = v
            .apply(Change {
                deletes: vec![policy("c2", "p").key()],
                ..Change::default()
            })
            .expect("a change");
        assert!(delta(&own.filter(&gone)).deletes.is_empty());
    }

    #[test]
    fn a_removed_cluster_leaves_with_everything_it_had() {
        let mut v = View::new("e1", 10);
        let ns = Namespace::implied(&c("c2"), "a");
        v.apply(Change {
            upserts: vec![
                pod("c1", "a", "10.0.0.1"),
                pod("c2", "b", "10.0.0.2"),
                Object::Namespace(ns),
            ],
            clusters: vec![pb::ClusterStatus {
                cluster: "c2".into(),
                synced: true,
                ..Default::default()
            }],
            ..Change::default()
        });
        let u = v
            .apply(Change {
                removed_clusters: vec![c("c2")],
                ..Change::default()
            })
            .expect("a change");
        assert_eq!(delta(&u).removed_clusters, ["c2"]);
        assert_eq!(v.len(), 1);
        assert_eq!(v.clusters().count(), 0);
        assert!(
            v.apply(Change {
                removed_clusters: vec![c("c2")],
                ..Change::default()
            })
            .is_none()
        );
    }
}
