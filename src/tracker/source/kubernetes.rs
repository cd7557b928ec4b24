//! Kubernetes API servers as sources, through kubeconfig files: every context of every file
//! in a directory is a cluster, watched with kube-rs watchers (list, then watch; relist on
//! 410 Gone; backoff on errors) for the kinds the view holds. A cluster is synced once every
//! kind's initial list completed; the files are watched, so a cluster added, changed or
//! removed starts, restarts or stops its watchers without a restart of the tracker. A
//! cluster's id is resolved before it is watched: its own KEP-2149 `ClusterProperty`, else
//! the context's `--cluster-name` mapping, else the context name. The cluster the tracker
//! runs in can also be reached as a pod reaches it (`--in-cluster`): by the address the kubelet
//! gives every pod, with no DNS, which a node's agents may still be holding.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Resource};
use ::kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use ::kube::runtime::WatchStreamExt as _;
use ::kube::runtime::watcher::{self, Event};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;

use super::super::server::{Feed, Tracker};
use super::super::view::Change;
use super::super::wire::{Key, Object, pb};
use crate::model::cluster::InvalidClusterId;
use crate::model::{
    ClusterId, EndpointSlice, LabelSelector, Namespace, NetworkPolicy, Node, ObjectError, Pod,
    Service,
};

/// The kinds watched per cluster; it is synced when all have listed.
const KINDS: usize = 7;

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
    fn update(state: &Mutex<Self>, tracker: &Feed, f: impl FnOnce(&mut Self)) {
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
        pb::Kind::Service
            | pb::Kind::EndpointSlice
            | pb::Kind::NetworkPolicy
            | pb::Kind::IdentityPolicy
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
    tracker: Feed,
    state: Arc<Mutex<ClusterState>>,
}

/// Watches one kind of one cluster until the task is stopped.
async fn watch_kind<K>(
    w: ClusterWatch,
    api: Api<K>,
    kind: pb::Kind,
    convert: fn(&ClusterId, &K) -> Result<Object, ObjectError>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let ClusterWatch { id, tracker, state } = w;
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    // What the view already holds of this kind (from watchers this one replaces): the first
    // list deletes what is gone, or a pod deleted while the watchers restarted would stay.
    let mut known: BTreeSet<Key> = tracker.known(kind, &id);
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
            match kind {
                pb::Kind::NetworkPolicy => Some(deny_all(&id, o.meta())),
                pb::Kind::IdentityPolicy => Some(deny_all_identities(&id, o.meta())),
                _ => None,
            }
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
            Err(watcher::Error::InitialListFailed(::kube::Error::Api(status)))
                if kind == pb::Kind::IdentityPolicy && status.code == 404 =>
            {
                // weft's resource is not installed in this cluster: it has none, and the
                // watcher keeps asking, so that one installed later is followed.
                tracing::debug!(cluster = %id, "no IdentityPolicy resource in this cluster");
                ClusterState::update(&state, &tracker, |s| {
                    s.listed.insert(kind);
                });
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

/// An IdentityPolicy that selects every pod of its namespace and admits no identity.
fn deny_all_identities(id: &ClusterId, meta: &ObjectMeta) -> Object {
    Object::IdentityPolicy(crate::model::IdentityPolicy {
        cluster: id.clone(),
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        pod_selector: LabelSelector::default(),
        mode: crate::model::Mode::Enforce,
        rules: Vec::new(),
    })
}

fn identity_policy(id: &ClusterId, o: &::kube::api::DynamicObject) -> Result<Object, ObjectError> {
    let value = serde_json::to_value(o).map_err(|e| ObjectError {
        kind: "IdentityPolicy",
        name: o.metadata.name.clone().unwrap_or_default(),
        field: crate::model::FieldError::new("", e.to_string()),
    })?;
    Ok(Object::IdentityPolicy(
        crate::model::IdentityPolicy::from_value(id, value)?,
    ))
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
    tracker: Feed,
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
            tracker: tracker.clone(),
            state: state.clone(),
        };
        let (s, t) = (&state, &tracker);
        tokio::join!(
            watch_kind::<core::Namespace>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::Namespace,
                namespace
            ),
            watch_kind::<core::Pod>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::Pod,
                |id, o| { Ok(Object::Pod(Pod::from_api(id, o)?)) }
            ),
            watch_kind::<core::Node>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::Node,
                |id, o| { Ok(Object::Node(Node::from_api(id, o)?)) }
            ),
            watch_kind::<core::Service>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::Service,
                |id, o| { Ok(Object::Service(Service::from_api(id, o)?)) }
            ),
            watch_kind::<discovery::EndpointSlice>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::EndpointSlice,
                |id, o| { Ok(Object::EndpointSlice(EndpointSlice::from_api(id, o)?)) }
            ),
            watch_kind::<net::NetworkPolicy>(
                w.clone(),
                Api::all(client.clone()),
                pb::Kind::NetworkPolicy,
                policy
            ),
            watch_kind::<::kube::api::DynamicObject>(
                w.clone(),
                Api::all_with(
                    client.clone(),
                    &::kube::api::ApiResource::from_gvk_with_plural(
                        &::kube::api::GroupVersionKind::gvk(
                            "weft.dev",
                            "v1alpha1",
                            "IdentityPolicy"
                        ),
                        "identitypolicies",
                    ),
                ),
                pb::Kind::IdentityPolicy,
                identity_policy,
            ),
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

/// The context of the cluster a tracker runs in, reached as a pod reaches it.
pub const IN_CLUSTER_CONTEXT: &str = "in-cluster";

/// Where a pod finds its ServiceAccount's token and its cluster's CA.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why the cluster this process runs in cannot be reached as a pod reaches it.
#[derive(Debug, thiserror::Error)]
#[error("--in-cluster: {0} is not set (not running in a Kubernetes pod?)")]
pub struct NotInCluster(&'static str);

/// A kubeconfig for the API server at `host`:`port` (the `kubernetes` Service's address, which
/// the kubelet gives every pod: no DNS) with the ServiceAccount token and CA of `account_dir`,
/// the token read again as the kubelet renews it; its one context is [`IN_CLUSTER_CONTEXT`].
pub fn in_cluster_kubeconfig(host: &str, port: &str, account_dir: &Path) -> Kubeconfig {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    use ::kube::config::{AuthInfo, Cluster, Context, NamedAuthInfo, NamedCluster, NamedContext};
    let file = |name: &str| Some(account_dir.join(name).to_string_lossy().into_owned());
    let name = IN_CLUSTER_CONTEXT.to_owned();
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: Some(Cluster {
                server: Some(format!("https://{host}:{port}")),
                certificate_authority: file("ca.crt"),
                ..Default::default()
            }),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.clone(),
            auth_info: Some(AuthInfo {
                token_file: file("token"),
                ..Default::default()
            }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: Some(Context {
                cluster: name.clone(),
                user: Some(name.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        current_context: Some(name),
        ..Default::default()
    }
}

/// [`in_cluster_kubeconfig`] for the pod this process runs in: the address from
/// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`, its ServiceAccount's files in
/// [`SERVICE_ACCOUNT_DIR`].
pub fn in_cluster() -> Result<Kubeconfig, NotInCluster> {
    let var = |name: &'static str| {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or(NotInCluster(name))
    };
    Ok(in_cluster_kubeconfig(
        &var("KUBERNETES_SERVICE_HOST")?,
        &var("KUBERNETES_SERVICE_PORT")?,
        Path::new(SERVICE_ACCOUNT_DIR),
    ))
}

/// The KEP-2149 `ClusterProperty` whose `spec.value` is a cluster's own id.
const CLUSTER_ID_PROPERTY: &str = "cluster.clusterset.k8s.io";

/// Why a kubeconfig context is not watched as a cluster (yet).
#[derive(Debug, thiserror::Error)]
enum SourceError {
    /// The file cannot be read.
    #[error("{file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file is no kubeconfig.
    #[error("{file}: {source}")]
    Kubeconfig {
        file: PathBuf,
        source: KubeconfigError,
    },
    /// The context cannot be used (a missing user, bad certificate data).
    #[error("{file}, context {context}: {source}")]
    Context {
        file: PathBuf,
        context: String,
        source: KubeconfigError,
    },
    /// The context's client cannot be built.
    #[error("context {context}: {source}")]
    Client {
        context: String,
        source: ::kube::Error,
    },
    /// The cluster's `ClusterProperty` cannot be read (unreachable, refused): retried.
    #[error("resolving cluster id of context {context}: {source}")]
    Lookup {
        context: String,
        source: ::kube::Error,
    },
    /// The API server did not answer the `ClusterProperty` lookup in time: retried.
    #[error("resolving cluster id of context {context}: no answer within {after:?}")]
    LookupTimeout { context: String, after: Duration },
    /// The cluster's `ClusterProperty` names no valid cluster id.
    #[error(
        "resolving cluster id of context {context}: ClusterProperty {CLUSTER_ID_PROPERTY} says {value:?}: {source}"
    )]
    BadProperty {
        context: String,
        value: String,
        source: InvalidClusterId,
    },
    /// Nothing names the cluster: no `ClusterProperty`, no mapping, an invalid context name.
    #[error(
        "resolving cluster id of context {context}: no ClusterProperty {CLUSTER_ID_PROPERTY}, and the context name is no cluster id: map it with --cluster-name CONTEXT=ID ({source})"
    )]
    Unnamed {
        context: String,
        source: InvalidClusterId,
    },
}

/// `e` with the causes its message leaves out: kube's "client error (SendRequest)" does not
/// say whether the connection was refused or the TLS handshake failed.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !message.contains(&said) {
            message = format!("{message}: {said}");
        }
        cause = c.source();
    }
    message
}

/// A context found in a kubeconfig file: where a cluster comes from.
#[derive(Debug, Clone)]
struct Found {
    file: PathBuf,
    context: String,
    kubeconfig: Kubeconfig,
    /// The file's contents: a change (rotated credentials, a new server) restarts the
    /// cluster's watchers.
    contents: Vec<u8>,
    /// Its id unless its API server names one: its `--cluster-name` mapping, else its name.
    fallback: Result<ClusterId, InvalidClusterId>,
}

impl PartialEq for Found {
    fn eq(&self, other: &Self) -> bool {
        (&self.file, &self.context, &self.contents)
            == (&other.file, &other.context, &other.contents)
    }
}

/// A context, named by its file and its name.
type Source = (PathBuf, String);

impl Found {
    fn source(&self) -> Source {
        (self.file.clone(), self.context.clone())
    }
}

/// Every context of the kubeconfig files in `dir`, in file and context order. A file that
/// does not parse is reported and left out.
/// The contexts to watch: the in-cluster one, if any, and every context of the files of `dir`.
fn scan(
    dir: Option<&Path>,
    in_cluster: Option<&Kubeconfig>,
    names: &BTreeMap<String, ClusterId>,
) -> Vec<Found> {
    let mut found: Vec<Found> = in_cluster
        .iter()
        .map(|kubeconfig| Found {
            file: PathBuf::from("(in-cluster)"),
            context: IN_CLUSTER_CONTEXT.to_owned(),
            kubeconfig: (*kubeconfig).clone(),
            contents: Vec::new(),
            fallback: match names.get(IN_CLUSTER_CONTEXT) {
                Some(id) => Ok(id.clone()),
                None => ClusterId::new(IN_CLUSTER_CONTEXT),
            },
        })
        .collect();
    let Some(dir) = dir else {
        return found;
    };
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
            .map_err(|source| SourceError::Read {
                file: file.clone(),
                source,
            })
            .and_then(|contents| {
                let text = String::from_utf8_lossy(&contents).into_owned();
                Kubeconfig::from_yaml(&text)
                    .map(|k| (k, contents))
                    .map_err(|source| SourceError::Kubeconfig {
                        file: file.clone(),
                        source,
                    })
            });
        let (kubeconfig, contents) = match parsed {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "kubeconfig refused");
                continue;
            }
        };
        for ctx in &kubeconfig.contexts {
            let fallback = match names.get(&ctx.name) {
                Some(id) => Ok(id.clone()),
                None => ClusterId::new(&ctx.name),
            };
            found.push(Found {
                file: file.clone(),
                context: ctx.name.clone(),
                kubeconfig: kubeconfig.clone(),
                contents: contents.clone(),
                fallback,
            });
        }
    }
    found
}

/// The cluster ids the kubeconfig files of `dir` and the in-cluster context claim without
/// asking their API servers (each context's mapping, else its name), to refuse a second source
/// of one at start. A cluster's own `ClusterProperty` may name another id once it is reached:
/// that is checked then.
pub fn cluster_ids(
    dir: Option<&Path>,
    in_cluster: Option<&Kubeconfig>,
    names: &BTreeMap<String, ClusterId>,
) -> BTreeSet<ClusterId> {
    scan(dir, in_cluster, names)
        .into_iter()
        .filter_map(|f| f.fallback.ok())
        .collect()
}

async fn client(found: &Found) -> Result<::kube::Client, SourceError> {
    let options = KubeConfigOptions {
        context: Some(found.context.clone()),
        ..Default::default()
    };
    let mut config = ::kube::Config::from_custom_kubeconfig(found.kubeconfig.clone(), &options)
        .await
        .map_err(|source| SourceError::Context {
            file: found.file.clone(),
            context: found.context.clone(),
            source,
        })?;
    config.connect_timeout = Some(Duration::from_secs(5));
    ::kube::Client::try_from(config).map_err(|source| SourceError::Client {
        context: found.context.clone(),
        source,
    })
}

/// How long the `ClusterProperty` lookup waits for an answer before it is retried.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The id of the cluster behind `client`, in order: its own `ClusterProperty`, the context's
/// mapping, the context's name.
async fn resolve(client: &::kube::Client, found: &Found) -> Result<ClusterId, SourceError> {
    let gvk = GroupVersionKind::gvk("about.k8s.io", "v1alpha1", "ClusterProperty");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "clusterproperties");
    let properties: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    // A hung API server would hold the lookup for kube's read timeout (minutes).
    let answer = tokio::time::timeout(LOOKUP_TIMEOUT, properties.get(CLUSTER_ID_PROPERTY))
        .await
        .map_err(|_| SourceError::LookupTimeout {
            context: found.context.clone(),
            after: LOOKUP_TIMEOUT,
        })?;
    match answer {
        Ok(property) => {
            let value = property
                .data
                .pointer("/spec/value")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            ClusterId::new(value).map_err(|source| SourceError::BadProperty {
                context: found.context.clone(),
                value: value.to_owned(),
                source,
            })
        }
        // No such object, or no such kind: a server without the CRD may answer in plain
        // text, which kube does not read as NotFound.
        Err(::kube::Error::Api(status)) if status.is_not_found() || status.code == 404 => found
            .fallback
            .clone()
            .map_err(|source| SourceError::Unnamed {
                context: found.context.clone(),
                source,
            }),
        Err(source) => Err(SourceError::Lookup {
            context: found.context.clone(),
            source,
        }),
    }
}

/// What a context's resolution tells the loop of [`watch_kubeconfigs`].
struct Report {
    source: Source,
    run: u64,
    outcome: Result<(ClusterId, ::kube::Client), SourceError>,
}

/// Builds the context's client and resolves its cluster id, retrying with backoff until it
/// has one; each failure is reported too. A client that cannot be built waits for the file
/// to change.
fn spawn_resolve(
    found: Found,
    run: u64,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let report = |outcome| Report {
            source: found.source(),
            run,
            outcome,
        };
        let client = match client(&found).await {
            Ok(c) => c,
            Err(e) => {
                let _ = reports.send(report(Err(e)));
                return;
            }
        };
        let mut backoff = watcher::DefaultBackoff::default();
        loop {
            let outcome = resolve(&client, &found).await;
            let resolved = outcome.is_ok();
            let outcome = outcome.map(|id| (id, client.clone()));
            // The loop gone means the tracker is stopping.
            if reports.send(report(outcome)).is_err() || resolved {
                return;
            }
            let pause = backoff.next().unwrap_or(Duration::from_secs(30));
            tokio::time::sleep(pause).await;
        }
    })
}

/// How far a context is.
#[derive(Debug)]
enum Phase {
    /// Resolving its cluster id.
    Resolving(JoinHandle<()>),
    /// Watching its cluster.
    Watching(ClusterId, JoinHandle<()>),
    /// Its cluster id is another context's: it waits for that one to leave.
    Refused(ClusterId),
}

/// The id a resolving context holds a place under: a status saying why it is not watched,
/// or its previous run's watchers, which keep the cluster's state and status true (fresh, or
/// stale and in time expired) until this run replaces them.
#[derive(Debug)]
struct Placeholder {
    id: ClusterId,
    previous: Option<JoinHandle<()>>,
}

impl Placeholder {
    /// Stops the previous run's watchers; returns the id.
    fn end(self) -> ClusterId {
        if let Some(task) = self.previous {
            task.abort();
        }
        self.id
    }
}

/// A context of the directory and what it does.
#[derive(Debug)]
struct Context {
    found: Found,
    /// Which run of the context a report is from (a changed file starts a new one).
    run: u64,
    phase: Phase,
    /// Goes if the context resolves to another id.
    placeholder: Option<Placeholder>,
}

/// Every context of the kubeconfig directory, and which holds which cluster id.
struct Contexts {
    by_source: BTreeMap<Source, Context>,
    next_run: u64,
    reports: tokio::sync::mpsc::UnboundedSender<Report>,
    tracker: Feed,
    max_staleness: Duration,
}

impl Contexts {
    /// Starts what is new or changed, stops what changed or left.
    fn rescan(&mut self, wanted: Vec<Found>) {
        let wanted: BTreeMap<Source, Found> = wanted.into_iter().map(|f| (f.source(), f)).collect();
        let changed: Vec<Source> = self
            .by_source
            .iter()
            .filter(|(source, c)| wanted.get(*source) != Some(&c.found))
            .map(|(source, _)| source.clone())
            .collect();
        let mut change = Change::default();
        let mut kept = BTreeMap::new();
        for source in changed {
            let Some(old) = self.by_source.remove(&source) else {
                continue;
            };
            let held = match old.phase {
                Phase::Resolving(task) => {
                    task.abort();
                    old.placeholder
                }
                Phase::Watching(id, task) => Some(Placeholder {
                    id,
                    previous: Some(task),
                }),
                Phase::Refused(_) => None,
            };
            match held {
                // A changed file: the cluster keeps its watchers until the new run resolves.
                Some(held) if wanted.contains_key(&source) => {
                    kept.insert(source, held);
                }
                Some(held) => {
                    let id = held.end();
                    tracing::info!(cluster = %id, file = %source.0.display(), context = %source.1,
                        "cluster left the kubeconfig directory");
                    change.removed_clusters.push(id);
                }
                None => {}
            }
        }
        let released = change.removed_clusters.clone();
        self.tracker.apply(change);
        for (source, found) in wanted {
            if !self.by_source.contains_key(&source) {
                let placeholder = kept.remove(&source);
                self.start(found, placeholder);
            }
        }
        self.wake(&released);
    }

    fn start(&mut self, found: Found, placeholder: Option<Placeholder>) {
        let run = self.next_run;
        self.next_run += 1;
        let task = spawn_resolve(found.clone(), run, self.reports.clone());
        let source = found.source();
        self.by_source.insert(
            source.clone(),
            Context {
                found,
                run,
                phase: Phase::Resolving(task),
                placeholder,
            },
        );
        // Until its API server answers, the cluster is there, unsynced: a view with one
        // cluster synced and another still resolving is not complete.
        self.hold_place(&source, String::new());
    }

    /// Restarts the contexts refused for one of `ids`, now free.
    fn wake(&mut self, ids: &[ClusterId]) {
        let refused: Vec<Found> = self
            .by_source
            .values()
            .filter(|c| matches!(&c.phase, Phase::Refused(id) if ids.contains(id)))
            .map(|c| c.found.clone())
            .collect();
        for found in refused {
            self.start(found, None);
        }
    }

    /// The context that watches `id` or holds a place under it.
    fn holder(&self, id: &ClusterId) -> Option<&Context> {
        self.by_source.values().find(|c| match &c.phase {
            Phase::Watching(watched, _) => watched == id,
            _ => c.placeholder.as_ref().is_some_and(|p| p.id == *id),
        })
    }

    fn report(&mut self, report: Report) {
        let current = self
            .by_source
            .get(&report.source)
            .is_some_and(|c| c.run == report.run && matches!(c.phase, Phase::Resolving(_)));
        if !current {
            // From a run stopped since.
            return;
        }
        match report.outcome {
            Ok((id, client)) => self.claim(report.source, id, client),
            Err(e) => self.unresolved(&report.source, &e),
        }
    }

    /// A context has no id for now: said as its status (see [`Contexts::hold_place`]).
    fn unresolved(&mut self, source: &Source, e: &SourceError) {
        let (file, context) = (source.0.display(), &source.1);
        let error = with_causes(e);
        match e {
            SourceError::Lookup { .. } | SourceError::LookupTimeout { .. } => {
                tracing::warn!(%file, %context, %error, "cluster id unresolved; retrying")
            }
            _ => tracing::error!(%file, %context, %error, "cluster id unresolved"),
        }
        self.hold_place(source, error);
    }

    /// Unless its previous run's watchers still say how the cluster is, a context that has no
    /// id yet has its cluster said under its fallback id, unsynced (with `error`, if any), so
    /// nothing reads the view as complete meanwhile.
    fn hold_place(&mut self, source: &Source, error: String) {
        let Some(c) = self.by_source.get(source) else {
            return;
        };
        let id = match &c.placeholder {
            Some(Placeholder {
                previous: Some(_), ..
            }) => return,
            Some(p) => p.id.clone(),
            None => match &c.found.fallback {
                Ok(id) => id.clone(),
                Err(_) => return,
            },
        };
        if self
            .holder(&id)
            .is_some_and(|h| h.found.source() != *source)
        {
            // Another context's cluster: its status is not this one's to say.
            return;
        }
        if let Some(c) = self.by_source.get_mut(source) {
            c.placeholder = Some(Placeholder {
                id: id.clone(),
                previous: None,
            });
        }
        self.tracker.apply(Change {
            clusters: vec![pb::ClusterStatus {
                cluster: id.to_string(),
                error,
                ..Default::default()
            }],
            ..Change::default()
        });
    }

    /// A context resolved to `id`: it watches the cluster unless another context does.
    fn claim(&mut self, source: Source, id: ClusterId, client: ::kube::Client) {
        let (file, context) = (source.0.display(), &source.1);
        let mut change = Change::default();
        let first = self
            .by_source
            .values()
            .find(|c| matches!(&c.phase, Phase::Watching(watched, _) if *watched == id));
        if let Some(first) = first {
            tracing::error!(cluster = %id, %context, %file, first_context = %first.found.context,
                first_file = %first.found.file.display(),
                "two contexts claim one cluster id; the second is refused");
            if let Some(c) = self.by_source.get_mut(&source) {
                c.phase = Phase::Refused(id.clone());
                change
                    .removed_clusters
                    .extend(c.placeholder.take().map(Placeholder::end));
            }
        } else {
            // Another context's placeholder under this id goes, with whatever state it kept.
            for c in self.by_source.values_mut() {
                let theirs = c.placeholder.as_ref().is_some_and(|p| p.id == id);
                if c.found.source() != source && theirs {
                    change
                        .removed_clusters
                        .extend(c.placeholder.take().map(Placeholder::end));
                }
            }
            let Some(c) = self.by_source.get_mut(&source) else {
                return;
            };
            // This context's own placeholder goes: under another id with its state; under
            // this id, its previous run's state stays for the new watchers' relists to replace.
            if let Some(old) = c.placeholder.take().map(Placeholder::end)
                && old != id
            {
                tracing::info!(cluster = %id, provisional = %old, %context, "cluster id resolved");
                change.removed_clusters.push(old);
            }
            tracing::info!(cluster = %id, %context, %file, "watching cluster");
            let task = watch_cluster(id.clone(), client, self.tracker.clone(), self.max_staleness);
            c.phase = Phase::Watching(id.clone(), task);
        }
        let released: Vec<ClusterId> = change
            .removed_clusters
            .iter()
            .filter(|r| **r != id)
            .cloned()
            .collect();
        self.tracker.apply(change);
        self.wake(&released);
    }

    fn stop(self) {
        for c in self.by_source.into_values() {
            if let Phase::Resolving(task) | Phase::Watching(_, task) = c.phase {
                task.abort();
            }
            if let Some(p) = c.placeholder {
                p.end();
            }
        }
    }
}

/// Watches the kubeconfig files of `dir` and the clusters they name, and the cluster of the
/// `in_cluster` kubeconfig, applying everything to `tracker`, until the directory watch fails
/// (without a directory, for ever). Each context's cluster id is resolved once its
/// client exists and before it is watched: the cluster's own `ClusterProperty`
/// `cluster.clusterset.k8s.io`, else its mapping in `names`, else the context name; until
/// then it is in the view unsynced under the mapping or the context name (if that is a valid
/// id), so the view is not complete while a context is still being resolved. Two contexts
/// resolving to one id: the second is refused.
pub async fn watch_kubeconfigs(
    dir: Option<PathBuf>,
    in_cluster: Option<Kubeconfig>,
    names: BTreeMap<String, ClusterId>,
    tracker: Tracker,
    debounce: Duration,
    max_staleness: Duration,
) -> Result<(), notify::Error> {
    let feed = match &dir {
        Some(dir) => format!("kubeconfig {}", dir.display()),
        None => IN_CLUSTER_CONTEXT.to_owned(),
    };
    let tracker = tracker.feed(feed);
    use notify::Watcher as _;
    let (tx, mut files) = tokio::sync::mpsc::unbounded_channel();
    // Without a directory nothing sends, and the sender is kept so that nothing ends either.
    let (_watch, _unwatched) = match &dir {
        Some(dir) => {
            let mut watch = notify::recommended_watcher(move |event| {
                let _ = tx.send(event);
            })?;
            watch.watch(dir, notify::RecursiveMode::NonRecursive)?;
            (Some(watch), None)
        }
        None => (None, Some(tx)),
    };
    let (reports, mut reported) = tokio::sync::mpsc::unbounded_channel();
    let mut contexts = Contexts {
        by_source: BTreeMap::new(),
        next_run: 0,
        reports,
        tracker,
        max_staleness,
    };
    contexts.rescan(scan(dir.as_deref(), in_cluster.as_ref(), &names));
    loop {
        tokio::select! {
            event = files.recv() => {
                let Some(event) = event else {
                    break;
                };
                if let Err(e) = event {
                    tracing::warn!(error = %e, "kubeconfig directory watch");
                }
                while let Ok(Some(_)) = tokio::time::timeout(debounce, files.recv()).await {}
                contexts.rescan(scan(dir.as_deref(), in_cluster.as_ref(), &names));
            }
            Some(report) = reported.recv() => contexts.report(report),
        }
    }
    contexts.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("client error")]
    struct Terse(#[source] std::io::Error);

    #[test]
    fn in_cluster_reaches_the_address_the_kubelet_gives_with_the_pods_own_files() {
        let dir = Path::new("/var/run/secrets/kubernetes.io/serviceaccount");
        for (host, server) in [
            ("10.96.0.1", "https://10.96.0.1:443"),
            ("fd00:96::1", "https://[fd00:96::1]:443"),
        ] {
            let k = in_cluster_kubeconfig(host, "443", dir);
            let found = scan(None, Some(&k), &BTreeMap::new());
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].context, IN_CLUSTER_CONTEXT);
            let cluster = k.clusters[0].cluster.clone().expect("cluster");
            assert_eq!(cluster.server.as_deref(), Some(server));
            assert_eq!(
                cluster.certificate_authority.as_deref(),
                Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
            );
            let user = k.auth_infos[0].auth_info.clone().expect("user");
            assert_eq!(
                user.token_file.as_deref(),
                Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
            );
            assert_eq!(k.current_context.as_deref(), Some(IN_CLUSTER_CONTEXT));
        }
        let names = BTreeMap::from([(
            IN_CLUSTER_CONTEXT.to_owned(),
            ClusterId::new("cluster-7").expect("id"),
        )]);
        let k = in_cluster_kubeconfig("10.96.0.1", "443", dir);
        assert_eq!(
            cluster_ids(None, Some(&k), &names),
            BTreeSet::from([ClusterId::new("cluster-7").expect("id")])
        );
    }

    #[test]
    fn causes_are_said_once() {
        let terse = Terse(std::io::Error::other("connection refused"));
        assert_eq!(with_causes(&terse), "client error: connection refused");
        let said = SourceError::Read {
            file: "k.yaml".into(),
            source: std::io::Error::other("gone"),
        };
        assert_eq!(with_causes(&said), "k.yaml: gone");
    }
}
