//! Kubernetes API servers as sources, through kubeconfig files: every context of every file
//! in a directory is a cluster, watched with kube-rs watchers (list, then watch; relist on
//! 410 Gone; backoff on errors) for the kinds the view holds. A cluster is synced once every
//! kind's initial list completed; the files are watched, so a cluster added, changed or
//! removed starts, restarts or stops its watchers without a restart of the tracker.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::kube::api::{Api, Resource};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::WatchStreamExt as _;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::super::server::Tracker;
use super::super::view::Change;
use super::super::wire::{Key, Object, pb};
use crate::model::{
    ClusterId, EndpointSlice, LabelSelector, Namespace, NetworkPolicy, Node, ObjectError, Pod,
    Service,
};

/// The kinds watched per cluster; it is synced when all have listed.
const KINDS: usize = 6;

/// One cluster's status, shared by its watchers.
#[derive(Debug)]
struct ClusterState {
    status: pb::ClusterStatus,
    listed: BTreeSet<pb::Kind>,
    /// Since when the API server has not been reachable.
    disconnected_since: Option<tokio::time::Instant>,
    /// How long its last state is served before its pods stop matching selectors.
    max_staleness: Duration,
}

impl ClusterState {
    /// Updates the status and sends it if it changed (the view ignores repeats).
    fn update(state: &Mutex<Self>, tracker: &Tracker, f: impl FnOnce(&mut Self)) {
        let status = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
            s.status.synced = s.listed.len() == KINDS;
            // Fail static while disconnected, for at most the maximum staleness.
            let now = tokio::time::Instant::now();
            let since = if s.status.connected {
                s.disconnected_since = None;
                now
            } else {
                *s.disconnected_since.get_or_insert(now)
            };
            let stale = now.duration_since(since);
            s.status.stale_for_ms = u64::try_from(stale.as_millis()).unwrap_or(u64::MAX);
            s.status.expired = stale > s.max_staleness;
            s.status.clone()
        };
        tracker.apply(Change {
            clusters: vec![status],
            ..Change::default()
        });
    }
}

fn unix_seconds_ms() -> i64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Whole seconds: a status that changed on every event would double the stream.
    i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000)
}

/// The key of an API object of `kind` (pods by uid).
fn key_of(kind: pb::Kind, cluster: &ClusterId, meta: &ObjectMeta) -> Key {
    let name = if kind == pb::Kind::Pod {
        meta.uid.clone()
    } else {
        meta.name.clone()
    };
    let namespaced = matches!(
        kind,
        pb::Kind::Service | pb::Kind::EndpointSlice | pb::Kind::NetworkPolicy
    );
    Key {
        kind,
        cluster: cluster.clone(),
        namespace: if namespaced {
            meta.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        },
        name: name.unwrap_or_default(),
    }
}

/// What every watcher of one cluster shares.
#[derive(Clone)]
struct ClusterWatch {
    id: ClusterId,
    client: ::kube::Client,
    tracker: Tracker,
    state: Arc<Mutex<ClusterState>>,
}

/// Watches one kind of one cluster until the task is stopped.
async fn watch_kind<K>(
    w: ClusterWatch,
    kind: pb::Kind,
    convert: fn(&ClusterId, &K) -> Result<Object, ObjectError>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let ClusterWatch {
        id,
        client,
        tracker,
        state,
    } = w;
    let api: Api<K> = Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut known: BTreeSet<Key> = BTreeSet::new();
    let mut relist: Option<(Vec<Object>, BTreeSet<Key>)> = None;
    let object = |o: &K| match convert(&id, o) {
        Ok(Object::Namespace(ns)) if ns.name == "kube-system" => {
            // Its UID identifies the cluster for good, whatever it is called.
            ClusterState::update(&state, &tracker, |s| s.status.unique_id = ns.uid.clone());
            Some(Object::Namespace(ns))
        }
        Ok(object) => Some(object),
        Err(e) => {
            // The API server accepted it, weft cannot use it: say so loudly; the cluster's
            // status carries it too.
            tracing::error!(cluster = %id, error = %e, "object refused");
            ClusterState::update(&state, &tracker, |s| s.status.error = e.to_string());
            // Skipping a policy would widen access: it stands in as deny-all for its namespace.
            (kind == pb::Kind::NetworkPolicy).then(|| deny_all(&id, o.meta()))
        }
    };
    while let Some(event) = stream.next().await {
        let mut change = Change::default();
        match event {
            Ok(Event::Init) => relist = Some(Default::default()),
            Ok(Event::InitApply(o)) => {
                if let (Some((objects, keys)), Some(o)) = (relist.as_mut(), object(&o)) {
                    keys.insert(o.key());
                    objects.push(o);
                }
            }
            Ok(Event::InitDone) => {
                // The relist replaces what was known: what is not in it was deleted meanwhile.
                let (objects, keys) = relist.take().unwrap_or_default();
                change.deletes = known.difference(&keys).cloned().collect();
                change.upserts = objects;
                known = keys;
                tracker.apply(std::mem::take(&mut change));
                ClusterState::update(&state, &tracker, |s| {
                    s.listed.insert(kind);
                    s.status.connected = true;
                    s.status.last_event_unix_ms = unix_seconds_ms();
                });
            }
            Ok(Event::Apply(o)) => {
                if let Some(o) = object(&o) {
                    known.insert(o.key());
                    change.upserts.push(o);
                }
            }
            Ok(Event::Delete(o)) => {
                let key = key_of(kind, &id, o.meta());
                known.remove(&key);
                change.deletes.push(key);
            }
            Err(e) => {
                tracing::warn!(cluster = %id, ?kind, error = %e, "watch");
                ClusterState::update(&state, &tracker, |s| {
                    s.status.connected = false;
                    s.status.error = e.to_string();
                });
            }
        }
        if !(change.upserts.is_empty() && change.deletes.is_empty()) {
            tracker.apply(change);
            ClusterState::update(&state, &tracker, |s| {
                s.status.connected = true;
                s.status.last_event_unix_ms = unix_seconds_ms();
            });
        }
    }
}

/// A policy that selects every pod of its namespace and allows nothing, in both directions.
fn deny_all(id: &ClusterId, meta: &ObjectMeta) -> Object {
    Object::NetworkPolicy(NetworkPolicy {
        cluster: id.clone(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        pod_selector: LabelSelector::default(),
        ingress: Some(Vec::new()),
        egress: Some(Vec::new()),
    })
}

fn namespace(id: &ClusterId, o: &core::Namespace) -> Result<Object, ObjectError> {
    let (ns, corrections) = Namespace::from_api(id, o)?;
    for c in corrections {
        tracing::warn!(cluster = %id, namespace = %ns.name, label = c.label, claimed = %c.claimed, "forged cluster label corrected");
    }
    Ok(Object::Namespace(ns))
}

fn policy(id: &ClusterId, o: &net::NetworkPolicy) -> Result<Object, ObjectError> {
    let mut warnings = Vec::new();
    let p = NetworkPolicy::from_api(id, o, &mut warnings)?;
    for w in warnings {
        tracing::warn!(cluster = %id, policy = %p.name, warning = %w, "policy");
    }
    Ok(Object::NetworkPolicy(p))
}

/// Watches every kind of one cluster until stopped; while its API server is unreachable its
/// status counts the staleness, and past `max_staleness` marks it expired.
pub fn watch_cluster(
    id: ClusterId,
    client: ::kube::Client,
    tracker: Tracker,
    max_staleness: Duration,
) -> JoinHandle<()> {
    let state = Arc::new(Mutex::new(ClusterState {
        status: pb::ClusterStatus {
            cluster: id.to_string(),
            ..Default::default()
        },
        listed: BTreeSet::new(),
        disconnected_since: None,
        max_staleness,
    }));
    ClusterState::update(&state, &tracker, |_| {});
    tokio::spawn(async move {
        let w = ClusterWatch {
            id: id.clone(),
            client: client.clone(),
            tracker: tracker.clone(),
            state: state.clone(),
        };
        let (s, t) = (&state, &tracker);
        tokio::join!(
            watch_kind::<core::Namespace>(w.clone(), pb::Kind::Namespace, namespace),
            watch_kind::<core::Pod>(w.clone(), pb::Kind::Pod, |id, o| {
                Ok(Object::Pod(Pod::from_api(id, o)?))
            }),
            watch_kind::<core::Node>(w.clone(), pb::Kind::Node, |id, o| {
                Ok(Object::Node(Node::from_api(id, o)?))
            }),
            watch_kind::<core::Service>(w.clone(), pb::Kind::Service, |id, o| {
                Ok(Object::Service(Service::from_api(id, o)?))
            }),
            watch_kind::<discovery::EndpointSlice>(w.clone(), pb::Kind::EndpointSlice, |id, o| {
                Ok(Object::EndpointSlice(EndpointSlice::from_api(id, o)?))
            }),
            watch_kind::<net::NetworkPolicy>(w.clone(), pb::Kind::NetworkPolicy, policy),
            async {
                // While disconnected, staleness grows with no event to say so: count it, and
                // ask the API server whether it answers again (a resumed watch with no change
                // to deliver would not tell).
                let tick =
                    (max_staleness / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
                let probe: Api<core::Namespace> = Api::all(client.clone());
                loop {
                    tokio::time::sleep(tick).await;
                    let disconnected = s
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .disconnected_since
                        .is_some();
                    if disconnected {
                        let answers = probe
                            .list_metadata(&::kube::api::ListParams::default().limit(1))
                            .await
                            .is_ok();
                        ClusterState::update(s, t, |state| {
                            if answers {
                                state.status.connected = true;
                                state.status.error.clear();
                            }
                        });
                    }
                }
            },
        );
    })
}

/// A cluster found in a kubeconfig file.
#[derive(Debug, Clone)]
struct Found {
    file: PathBuf,
    context: String,
    kubeconfig: Kubeconfig,
    /// The file's contents: a change (rotated credentials, a new server) restarts the
    /// cluster's watchers.
    contents: Vec<u8>,
}

impl PartialEq for Found {
    fn eq(&self, other: &Self) -> bool {
        (&self.file, &self.context, &self.contents)
            == (&other.file, &other.context, &other.contents)
    }
}

/// The clusters of the kubeconfig files in `dir`, by id. A context whose name is not a valid
/// cluster id and has no mapping, a file that does not parse, or two contexts claiming one
/// id are reported and left out.
fn scan(dir: &Path, names: &BTreeMap<String, ClusterId>) -> BTreeMap<ClusterId, Found> {
    let mut found: BTreeMap<ClusterId, Found> = BTreeMap::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| Some(e.ok()?.path())).collect(),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "kubeconfig directory unreadable");
            return found;
        }
    };
    files.sort();
    for file in files {
        let hidden = file
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || !file.is_file() {
            continue;
        }
        let parsed = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|contents| {
                let text = String::from_utf8_lossy(&contents).into_owned();
                Kubeconfig::from_yaml(&text)
                    .map(|k| (k, contents))
                    .map_err(|e| e.to_string())
            });
        let (kubeconfig, contents) = match parsed {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "kubeconfig refused");
                continue;
            }
        };
        for ctx in &kubeconfig.contexts {
            let id = match names.get(&ctx.name) {
                Some(id) => id.clone(),
                None => match ClusterId::new(&ctx.name) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::error!(file = %file.display(), context = %ctx.name, error = %e,
                            "context name is no cluster id: map it with --cluster-name CONTEXT=ID");
                        continue;
                    }
                },
            };
            if let Some(first) = found.get(&id) {
                tracing::error!(cluster = %id, context = %ctx.name, file = %file.display(),
                    first = %first.file.display(), "two contexts claim one cluster id; the second is refused");
                continue;
            }
            found.insert(
                id,
                Found {
                    file: file.clone(),
                    context: ctx.name.clone(),
                    kubeconfig: kubeconfig.clone(),
                    contents: contents.clone(),
                },
            );
        }
    }
    found
}

/// The cluster ids the kubeconfig files of `dir` name (to refuse a second source of one).
pub fn cluster_ids(dir: &Path, names: &BTreeMap<String, ClusterId>) -> BTreeSet<ClusterId> {
    scan(dir, names).into_keys().collect()
}

async fn client(found: &Found) -> Result<::kube::Client, String> {
    let options = KubeConfigOptions {
        context: Some(found.context.clone()),
        ..Default::default()
    };
    let mut config = ::kube::Config::from_custom_kubeconfig(found.kubeconfig.clone(), &options)
        .await
        .map_err(|e| e.to_string())?;
    config.connect_timeout = Some(Duration::from_secs(5));
    ::kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// Watches the kubeconfig files of `dir` and the clusters they name, applying everything to
/// `tracker`, until the directory watch fails. `names` maps context names to cluster ids.
pub async fn watch_kubeconfigs(
    dir: PathBuf,
    names: BTreeMap<String, ClusterId>,
    tracker: Tracker,
    debounce: Duration,
    max_staleness: Duration,
) -> Result<(), notify::Error> {
    use notify::Watcher as _;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watch = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })?;
    watch.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let mut running: BTreeMap<ClusterId, (Found, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let wanted = scan(&dir, &names);
        let mut change = Change::default();
        running.retain(|id, (found, task)| {
            let keep = wanted.get(id) == Some(found);
            if !keep {
                task.abort();
                if !wanted.contains_key(id) {
                    tracing::info!(cluster = %id, "cluster left the kubeconfig directory");
                    change.removed_clusters.push(id.clone());
                }
            }
            keep
        });
        tracker.apply(change);
        for (id, found) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            match client(&found).await {
                Ok(c) => {
                    tracing::info!(cluster = %id, context = %found.context, file = %found.file.display(), "watching cluster");
                    let task = watch_cluster(id.clone(), c, tracker.clone(), max_staleness);
                    running.insert(id, (found, task));
                }
                Err(e) => {
                    tracing::error!(cluster = %id, file = %found.file.display(), error = %e, "cluster client");
                    tracker.apply(Change {
                        clusters: vec![pb::ClusterStatus {
                            cluster: id.to_string(),
                            error: e,
                            ..Default::default()
                        }],
                        ..Change::default()
                    });
                }
            }
        }
        let Some(event) = rx.recv().await else {
            break;
        };
        if let Err(e) = event {
            tracing::warn!(error = %e, "kubeconfig directory watch");
        }
        while let Ok(Some(_)) = tokio::time::timeout(debounce, rx.recv()).await {}
    }
    for (_, (_, task)) in running {
        task.abort();
    }
    Ok(())
}
