//! Where the view comes from: a clusterset directory, watched for changes (file events,
//! debounced), and Kubernetes API servers through kubeconfig files (`kubernetes`). A cluster
//! whose files fail to load keeps its last good state, with the error in its status; one that
//! never loaded is not synced, so nothing reads it as complete. Another tracker is a source too
//! (`upstream`: hub and spoke).

pub mod kubernetes;
pub mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::server::Tracker;
use super::view::Change;
use super::wire::{Key, cluster_objects, pb};
use crate::model::{Cluster, ClusterId, loader};

/// The status of a cluster that loaded.
fn loaded_status(cluster: &Cluster) -> pb::ClusterStatus {
    pb::ClusterStatus {
        cluster: cluster.id.to_string(),
        unique_id: cluster.settings.uid.clone().unwrap_or_default(),
        trust_domain: cluster.settings.trust_domain.clone().unwrap_or_default(),
        network: cluster.settings.network.clone().unwrap_or_default(),
        synced: true,
        connected: true,
        ..Default::default()
    }
}

/// A clusterset directory, and what was last loaded from each of its clusters.
#[derive(Debug)]
pub struct ClustersetSource {
    dir: PathBuf,
    /// The keys of each cluster's last good state, and its status.
    last: BTreeMap<ClusterId, (BTreeSet<Key>, pb::ClusterStatus)>,
}

impl ClustersetSource {
    /// A source reading `dir`; nothing is read until [`ClustersetSource::rescan`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last: BTreeMap::new(),
        }
    }

    /// The source's name, for the tracker's record of which source owns which cluster.
    pub fn name(&self) -> String {
        format!("clusterset {}", self.dir.display())
    }

    /// Reads the directory again and returns what changed since the last rescan. A cluster
    /// that fails to load keeps its last good state, with the error in its status; the error
    /// is returned only when the clusters cannot even be listed (and nothing changes).
    pub fn rescan(&mut self) -> Result<Change, loader::LoadError> {
        let mut change = Change::default();
        let (dirs, warnings) = loader::cluster_dirs(&self.dir)?;
        for w in warnings {
            tracing::warn!(warning = %w, "clusterset");
        }
        let present: BTreeSet<ClusterId> = dirs.iter().map(|(id, _)| id.clone()).collect();
        for gone in self
            .last
            .keys()
            .filter(|id| !present.contains(*id))
            .cloned()
            .collect::<Vec<_>>()
        {
            tracing::info!(cluster = %gone, "cluster directory removed");
            self.last.remove(&gone);
            change.removed_clusters.push(gone);
        }
        for (id, path) in dirs {
            self.rescan_cluster(id, &path, &mut change);
        }
        Ok(change)
    }

    fn rescan_cluster(&mut self, id: ClusterId, path: &Path, change: &mut Change) {
        match loader::load_cluster(id.clone(), path) {
            Ok((cluster, warnings)) => {
                for w in warnings {
                    tracing::warn!(cluster = %id, warning = %w, "clusterset");
                }
                let keys: BTreeSet<Key> = cluster_objects(&cluster).map(|o| o.key()).collect();
                if let Some((old, _)) = self.last.get(&id) {
                    change.deletes.extend(old.difference(&keys).cloned());
                }
                // Unchanged objects are recognised by the view and cost nothing downstream.
                change.upserts.extend(cluster_objects(&cluster));
                let status = loaded_status(&cluster);
                change.clusters.push(status.clone());
                self.last.insert(id, (keys, status));
            }
            Err(e) => {
                tracing::error!(cluster = %id, error = %e, "cluster failed to load; keeping its last good state");
                let (keys, mut status) = self.last.remove(&id).unwrap_or_else(|| {
                    let never = pb::ClusterStatus {
                        cluster: id.to_string(),
                        ..Default::default()
                    };
                    (BTreeSet::new(), never)
                });
                status.error = e.to_string();
                change.clusters.push(status.clone());
                self.last.insert(id, (keys, status));
            }
        }
    }
}

/// Watches `dir` and applies every change to `tracker`: file events, then a pause of
/// `debounce` without events, then one rescan. Runs until the watch itself fails.
pub async fn watch(
    mut source: ClustersetSource,
    tracker: Tracker,
    debounce: Duration,
) -> Result<(), notify::Error> {
    use notify::Watcher as _;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        // The receiver lives as long as this task; a send after it ends is moot.
        let _ = tx.send(event);
    })?;
    watcher.watch(&source.dir, notify::RecursiveMode::Recursive)?;
    while let Some(event) = rx.recv().await {
        if let Err(e) = event {
            tracing::warn!(error = %e, "clusterset watch");
        }
        // Gather the burst an editor or a ConfigMap update makes, then read once.
        while let Ok(Some(_)) = tokio::time::timeout(debounce, rx.recv()).await {}
        match source.rescan() {
            Ok(change) => tracker.apply_from(&source.name(), change),
            Err(e) => {
                tracing::error!(error = %e, "clusterset unreadable; keeping the last good state")
            }
        }
    }
    Ok(())
}
