//! A tracker's stream as a subscriber checks it: every object validated, snapshot parts
//! assembled and used only once the last one arrives, deltas in strict revision order. What
//! passes is handed on whole; what fails changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::view::Change;
use super::wire::{Key, Object, WireError, pb};
use crate::model::{ClusterId, cluster::InvalidClusterId};

/// An update a subscriber cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The update has no position.
    #[error("update without a position")]
    NoPosition,
    /// The update carries neither a snapshot part nor a delta.
    #[error("update without a change")]
    NoChange,
    /// A snapshot part that does not continue the snapshot being received.
    #[error("snapshot part at {epoch}/{revision} does not continue the snapshot being received")]
    StraySnapshotPart {
        /// Its epoch.
        epoch: String,
        /// Its revision.
        revision: u64,
    },
    /// A snapshot older than the view it would replace: within an epoch revisions only grow,
    /// so this is a replay, and applying it would undo changes already applied.
    #[error("snapshot at {epoch}/{got} is older than the view at {epoch}/{have}")]
    OlderSnapshot {
        /// The epoch of both.
        epoch: String,
        /// The subscriber's revision.
        have: u64,
        /// The snapshot's revision.
        got: u64,
    },
    /// A delta while no complete snapshot has been applied.
    #[error("delta before a complete snapshot")]
    NoSnapshot,
    /// A delta that does not follow the current position.
    #[error("delta at {got_epoch}/{got} does not follow {epoch}/{have}: updates were lost")]
    Gap {
        /// The subscriber's epoch.
        epoch: String,
        /// The subscriber's revision.
        have: u64,
        /// The delta's epoch.
        got_epoch: String,
        /// The delta's revision.
        got: u64,
    },
    /// An object or key that fails validation.
    #[error("{0}")]
    Wire(#[from] WireError),
    /// A cluster status naming no valid cluster.
    #[error("cluster status: {0}")]
    Status(InvalidClusterId),
    /// A removed cluster naming no valid cluster.
    #[error("removed cluster: {0}")]
    RemovedCluster(InvalidClusterId),
}

/// What a valid update amounts to.
#[derive(Debug)]
pub enum Received {
    /// A complete snapshot: the whole view, replacing what was held.
    Snapshot {
        /// Every object.
        objects: Vec<Object>,
        /// Every cluster's status.
        clusters: Vec<(ClusterId, pb::ClusterStatus)>,
    },
    /// A delta to what is held.
    Delta(Change),
}

#[derive(Debug)]
struct Assembly {
    position: pb::Position,
    objects: Vec<Object>,
    clusters: Vec<pb::ClusterStatus>,
}

/// Where a subscriber is in the stream, and the snapshot it is receiving.
#[derive(Debug, Default)]
pub struct Sequence {
    position: Option<pb::Position>,
    assembling: Option<Assembly>,
}

fn validated_statuses(
    statuses: Vec<pb::ClusterStatus>,
) -> Result<Vec<(ClusterId, pb::ClusterStatus)>, ReplicaError> {
    statuses
        .into_iter()
        .map(|s| Ok((ClusterId::new(&s.cluster).map_err(ReplicaError::Status)?, s)))
        .collect()
}

impl Sequence {
    /// The position of the last complete update.
    pub fn position(&self) -> Option<&pb::Position> {
        self.position.as_ref()
    }

    /// Checks one update: `None` for a snapshot part that is not the last, else what the
    /// update amounts to. On error nothing moves.
    pub fn receive(&mut self, update: pb::Update) -> Result<Option<Received>, ReplicaError> {
        let position = update.position.ok_or(ReplicaError::NoPosition)?;
        match update.change.ok_or(ReplicaError::NoChange)? {
            pb::update::Change::Snapshot(part) => self.snapshot_part(position, part),
            pb::update::Change::Delta(delta) => self.delta(position, delta).map(Some),
        }
    }

    /// Gathers a snapshot part. A part that fails drops the snapshot being received: what was
    /// gathered cannot be completed without what was refused.
    fn snapshot_part(
        &mut self,
        position: pb::Position,
        part: pb::SnapshotPart,
    ) -> Result<Option<Received>, ReplicaError> {
        let outcome = self.gather(position, part);
        if outcome.is_err() {
            self.assembling = None;
        }
        outcome
    }

    fn gather(
        &mut self,
        position: pb::Position,
        part: pb::SnapshotPart,
    ) -> Result<Option<Received>, ReplicaError> {
        if let Some(current) = &self.position
            && current.epoch == position.epoch
            && position.revision < current.revision
        {
            return Err(ReplicaError::OlderSnapshot {
                epoch: position.epoch,
                have: current.revision,
                got: position.revision,
            });
        }
        let stray = || ReplicaError::StraySnapshotPart {
            epoch: position.epoch.clone(),
            revision: position.revision,
        };
        let objects = part
            .objects
            .into_iter()
            .map(Object::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let clusters = part.clusters;
        validated_statuses(clusters.clone())?;
        if part.first {
            self.assembling = Some(Assembly {
                position: position.clone(),
                objects: Vec::new(),
                clusters: Vec::new(),
            });
        }
        let assembly = self.assembling.as_mut().ok_or_else(stray)?;
        if assembly.position != position {
            // A part of another snapshot.
            return Err(stray());
        }
        assembly.objects.extend(objects);
        assembly.clusters.extend(clusters);
        if !part.last {
            return Ok(None);
        }
        let Some(done) = self.assembling.take() else {
            return Err(stray());
        };
        let clusters = validated_statuses(done.clusters)?;
        self.position = Some(done.position);
        Ok(Some(Received::Snapshot {
            objects: done.objects,
            clusters,
        }))
    }

    fn delta(
        &mut self,
        position: pb::Position,
        delta: pb::Delta,
    ) -> Result<Received, ReplicaError> {
        let current = self.position.as_ref().ok_or(ReplicaError::NoSnapshot)?;
        // `checked_add`: a revision at the top of the range is the peer's to send.
        if position.epoch != current.epoch
            || current.revision.checked_add(1) != Some(position.revision)
        {
            return Err(ReplicaError::Gap {
                epoch: current.epoch.clone(),
                have: current.revision,
                got_epoch: position.epoch,
                got: position.revision,
            });
        }
        let removed_clusters = delta
            .removed_clusters
            .iter()
            .map(|c| ClusterId::new(c).map_err(ReplicaError::RemovedCluster))
            .collect::<Result<Vec<_>, _>>()?;
        let upserts = delta
            .upserts
            .into_iter()
            .map(Object::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let deletes = delta
            .deletes
            .into_iter()
            .map(Key::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let clusters = validated_statuses(delta.clusters)?
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        self.position = Some(position);
        Ok(Received::Delta(Change {
            upserts,
            deletes,
            clusters,
            removed_clusters,
        }))
    }
}

/// The error a kept cluster's status carries while its tracker resyncs it.
const KEPT: &str = "kept from the previous view until the tracker has synced this cluster again";

/// The data of clusters a fresh snapshot shows unsynced (a restarted or cold tracker still
/// listing them) that the subscriber held complete: kept, as it was, until the cluster is
/// synced again, so that a cold tracker's empty view is never taken as the truth. The kept
/// clusters' statuses stay synced (their data is complete, if old) and age as the tracker
/// says, so they still expire past the maximum staleness; once synced again, what was kept
/// and not sent again is deleted.
#[derive(Debug, Default)]
pub struct Carry {
    kept: BTreeMap<ClusterId, BTreeSet<Key>>,
}

impl Carry {
    /// At a complete snapshot: decides which clusters to keep and returns the keys of the
    /// held objects to keep with them. A cluster is kept when the snapshot shows it unsynced
    /// and it was synced (`was_synced`) or already kept; `held` is every key held now, and
    /// the snapshot's statuses (`clusters`) are marked for the kept clusters.
    pub fn snapshot<'a>(
        &mut self,
        was_synced: impl Fn(&ClusterId) -> bool,
        held: impl Iterator<Item = &'a Key>,
        objects: &[Object],
        clusters: &mut [(ClusterId, pb::ClusterStatus)],
    ) -> BTreeSet<Key> {
        let mut kept: BTreeMap<ClusterId, BTreeSet<Key>> = BTreeMap::new();
        for (id, status) in clusters.iter_mut() {
            if !status.synced && (was_synced(id) || self.kept.contains_key(id)) {
                keep_status(status);
                kept.insert(id.clone(), BTreeSet::new());
            }
        }
        let sent: BTreeSet<Key> = objects.iter().map(Object::key).collect();
        let mut keys = BTreeSet::new();
        for key in held {
            if let Some(cluster) = kept.get_mut(&key.cluster)
                && !sent.contains(key)
            {
                cluster.insert(key.clone());
                keys.insert(key.clone());
            }
        }
        self.kept = kept;
        keys
    }

    /// Before a delta is applied: what it sends again is no longer only kept; a kept
    /// cluster's status stays synced until the tracker says it is, and then the delta also
    /// deletes what was kept and not sent again.
    pub fn delta(&mut self, change: &mut Change) {
        if self.kept.is_empty() {
            return;
        }
        for o in &change.upserts {
            let key = o.key();
            if let Some(kept) = self.kept.get_mut(&key.cluster) {
                kept.remove(&key);
            }
        }
        for k in &change.deletes {
            if let Some(kept) = self.kept.get_mut(&k.cluster) {
                kept.remove(k);
            }
        }
        for id in &change.removed_clusters {
            self.kept.remove(id);
        }
        for status in &mut change.clusters {
            let Ok(id) = ClusterId::new(&status.cluster) else {
                continue;
            };
            if !self.kept.contains_key(&id) {
                continue;
            }
            if status.synced {
                change
                    .deletes
                    .extend(self.kept.remove(&id).into_iter().flatten());
            } else {
                keep_status(status);
            }
        }
    }
}

fn keep_status(status: &mut pb::ClusterStatus) {
    status.synced = true;
    if status.error.is_empty() {
        status.error = KEPT.to_owned();
    }
}
