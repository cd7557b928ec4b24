//! A subscriber's replica of the tracker's view: the stream checked by [`Sequence`] (every
//! object validated, a snapshot used only once its last part arrives, positions following one
//! another, not even a snapshot going back within an epoch), then applied to the policy engine incrementally. An update that fails is not
//! applied at all: the last good state stays. Services and EndpointSlices are kept beside the
//! engine, indexed for the data plane (a ClusterIP resolved to the slices of its Service).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

pub use super::sequence::ReplicaError;
use super::sequence::{Carry, Received, Sequence};
use super::wire::{Key, Object, pb};
use crate::model::{ClusterId, EndpointSlice, Pod, Protocol, Service};
use crate::policy::Engine;

/// The replica, with its engine.
#[derive(Debug, Default)]
pub struct Replica {
    objects: BTreeMap<Key, Object>,
    clusters: BTreeMap<ClusterId, pb::ClusterStatus>,
    engine: Engine,
    /// The uids of each node's pods by cluster, node name, namespace and service account:
    /// what the CA asks on every call, kept as the objects change rather than found by a
    /// scan.
    pods_by_node: PodsByNode,
    /// Services by ClusterIP and slices by Service: what the outbound path asks on every
    /// connection to a ClusterIP.
    services: ServiceIndex,
    sequence: Sequence,
    /// Clusters a cold tracker shows unsynced, kept as they were until synced again.
    carry: Carry,
    /// Since when the tracker has been out of reach (fail static meanwhile).
    disconnected_since: Option<tokio::time::Instant>,
}

fn upsert(engine: &mut Engine, o: &Object) {
    match o {
        Object::Namespace(n) => engine.upsert_namespace(n),
        Object::Pod(p) => engine.upsert_pod(p),
        Object::Node(n) => engine.upsert_node(n),
        Object::NetworkPolicy(p) => engine.upsert_policy(p),
        Object::IdentityPolicy(p) => engine.upsert_identity_policy(p),
        // Services and slices are for the data plane (the replica's own index); the policy
        // engine judges the endpoints they resolve to.
        Object::Service(_) | Object::EndpointSlice(_) => {}
    }
}

fn remove(engine: &mut Engine, k: &Key) {
    match k.kind {
        pb::Kind::Namespace => engine.remove_namespace(&k.cluster, &k.name),
        pb::Kind::Pod => engine.remove_pod(&k.cluster, &k.name),
        pb::Kind::Node => engine.remove_node(&k.cluster, &k.name),
        pb::Kind::NetworkPolicy => engine.remove_policy(&k.cluster, &k.namespace, &k.name),
        pb::Kind::IdentityPolicy => {
            engine.remove_identity_policy(&k.cluster, &k.namespace, &k.name)
        }
        pb::Kind::Service | pb::Kind::EndpointSlice | pb::Kind::Unspecified => {}
    }
}

/// Pod uids by cluster, node, and (namespace, service account).
type PodsByNode = HashMap<ClusterId, HashMap<String, BTreeMap<(String, String), BTreeSet<String>>>>;

/// Adds `o`, if it is a pod on a node, to the index of pods by node.
fn index(by_node: &mut PodsByNode, o: &Object) {
    if let Object::Pod(p) = o
        && let Some(node) = &p.node_name
    {
        by_node
            .entry(p.cluster.clone())
            .or_default()
            .entry(node.clone())
            .or_default()
            .entry((p.namespace.clone(), p.service_account.clone()))
            .or_default()
            .insert(p.uid.clone());
    }
}

/// Removes `o`, if it is a pod on a node, from the index of pods by node, leaving no empty
/// entry behind.
fn unindex(by_node: &mut PodsByNode, o: &Object) {
    let Object::Pod(p) = o else { return };
    let Some(node) = &p.node_name else { return };
    let Some(nodes) = by_node.get_mut(&p.cluster) else {
        return;
    };
    let Some(accounts) = nodes.get_mut(node) else {
        return;
    };
    let account = (p.namespace.clone(), p.service_account.clone());
    if let Some(uids) = accounts.get_mut(&account) {
        uids.remove(&p.uid);
        if uids.is_empty() {
            accounts.remove(&account);
        }
    }
    if accounts.is_empty() {
        nodes.remove(node);
    }
    if nodes.is_empty() {
        by_node.remove(&p.cluster);
    }
}

/// Services by their ClusterIP addresses and EndpointSlices by the Service they serve (keys
/// into the replica's objects). Sets of keys, not single keys: two objects may claim the same
/// entry for a moment (a delta applies its upserts before its deletes), and removing one must
/// not drop the other's entry.
#[derive(Debug, Default)]
struct ServiceIndex {
    /// Service keys by cluster, ClusterIP and port, and protocol.
    by_address: HashMap<(ClusterId, SocketAddr, Protocol), BTreeSet<Key>>,
    /// Slice keys by the key of the Service named in their `kubernetes.io/service-name` label
    /// (a slice may arrive before its Service).
    slices: HashMap<Key, BTreeSet<Key>>,
}

/// The key a Service named `name` of `namespace` in `cluster` has.
fn service_key(cluster: &ClusterId, namespace: &str, name: &str) -> Key {
    Key {
        kind: pb::Kind::Service,
        cluster: cluster.clone(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

/// The entries a Service has in the index: every ClusterIP with every port. A headless
/// Service has no ClusterIP, hence none.
fn service_addresses(s: &Service) -> impl Iterator<Item = (ClusterId, SocketAddr, Protocol)> + '_ {
    s.cluster_ips.iter().flat_map(move |ip| {
        s.ports
            .iter()
            .map(move |p| (s.cluster.clone(), SocketAddr::new(*ip, p.port), p.protocol))
    })
}

impl ServiceIndex {
    /// Adds `o`, if it is a Service or a slice of one.
    fn add(&mut self, o: &Object) {
        match o {
            Object::Service(s) => {
                let key = o.key();
                for entry in service_addresses(s) {
                    let keys = self.by_address.entry(entry.clone()).or_default();
                    if keys.iter().any(|k| k != &key) {
                        // The API server allocates a ClusterIP once; a clash is a transient
                        // or a faulty source. Resolution takes the first in key order.
                        tracing::warn!(service = %key, address = %entry.1, others = keys.len(),
                            "another Service claims the same ClusterIP and port");
                    }
                    keys.insert(key.clone());
                }
            }
            Object::EndpointSlice(e) => {
                // A slice that names no Service serves none: nothing resolves to it.
                if let Some(service) = &e.service {
                    self.slices
                        .entry(service_key(&e.cluster, &e.namespace, service))
                        .or_default()
                        .insert(o.key());
                }
            }
            _ => {}
        }
    }

    /// Removes `o`, if it is a Service or a slice of one, leaving no empty entry behind.
    fn remove(&mut self, o: &Object) {
        match o {
            Object::Service(s) => {
                let key = o.key();
                for entry in service_addresses(s) {
                    if let Some(keys) = self.by_address.get_mut(&entry) {
                        keys.remove(&key);
                        if keys.is_empty() {
                            self.by_address.remove(&entry);
                        }
                    }
                }
            }
            Object::EndpointSlice(e) => {
                let Some(service) = &e.service else { return };
                let owner = service_key(&e.cluster, &e.namespace, service);
                if let Some(keys) = self.slices.get_mut(&owner) {
                    keys.remove(&o.key());
                    if keys.is_empty() {
                        self.slices.remove(&owner);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Replica {
    /// An empty replica, not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine over the replica's objects.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The pods of `cluster` scheduled on `node`, whatever their phase.
    pub fn pods_on_node<'a>(
        &'a self,
        cluster: &'a ClusterId,
        node: &str,
    ) -> impl Iterator<Item = &'a Pod> + 'a {
        let uids = self
            .pods_by_node
            .get(cluster)
            .and_then(|nodes| nodes.get(node))
            .into_iter()
            .flat_map(|accounts| accounts.values().flatten());
        self.pods(cluster, uids)
    }

    /// The pods of `cluster` scheduled on `node` with service account `account` of
    /// `namespace`, whatever their phase.
    pub fn pods_with_account<'a>(
        &'a self,
        cluster: &'a ClusterId,
        node: &str,
        namespace: &str,
        account: &str,
    ) -> impl Iterator<Item = &'a Pod> + 'a {
        let uids = self
            .pods_by_node
            .get(cluster)
            .and_then(|nodes| nodes.get(node))
            .and_then(|accounts| accounts.get(&(namespace.to_owned(), account.to_owned())))
            .into_iter()
            .flatten();
        self.pods(cluster, uids)
    }

    /// The pods of `cluster` with these uids.
    fn pods<'a>(
        &'a self,
        cluster: &'a ClusterId,
        uids: impl Iterator<Item = &'a String> + 'a,
    ) -> impl Iterator<Item = &'a Pod> + 'a {
        uids.filter_map(move |uid| {
            let key = Key {
                kind: pb::Kind::Pod,
                cluster: cluster.clone(),
                namespace: String::new(),
                name: uid.clone(),
            };
            match self.objects.get(&key) {
                Some(Object::Pod(p)) => Some(p),
                _ => None,
            }
        })
    }

    /// The Service of `cluster` with a ClusterIP and port `address` for `protocol`, if any
    /// (headless Services have none).
    pub fn service_at(
        &self,
        cluster: &ClusterId,
        address: SocketAddr,
        protocol: Protocol,
    ) -> Option<&Service> {
        self.services
            .by_address
            .get(&(cluster.clone(), address, protocol))?
            .iter()
            .find_map(|k| match self.objects.get(k) {
                Some(Object::Service(s)) => Some(s),
                _ => None,
            })
    }

    /// The EndpointSlices of `service`, in key order.
    pub fn endpoint_slices<'a>(
        &'a self,
        service: &Service,
    ) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.services
            .slices
            .get(&service_key(
                &service.cluster,
                &service.namespace,
                &service.name,
            ))
            .into_iter()
            .flatten()
            .filter_map(|k| match self.objects.get(k) {
                Some(Object::EndpointSlice(e)) => Some(e),
                _ => None,
            })
    }

    /// Removes the object at `k`, from the engine and the indexes too.
    fn remove_object(&mut self, k: &Key) {
        remove(&mut self.engine, k);
        if let Some(old) = self.objects.remove(k) {
            unindex(&mut self.pods_by_node, &old);
            self.services.remove(&old);
        }
    }

    /// The position of the last update applied (`None` before a complete snapshot).
    pub fn position(&self) -> Option<&pb::Position> {
        self.sequence.position()
    }

    /// Clusters whose data is not a complete view yet.
    pub fn unsynced(&self) -> Vec<ClusterId> {
        self.clusters
            .iter()
            .filter(|(_, s)| !s.synced)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A complete snapshot is applied and every cluster is synced: an answer from this
    /// replica is not a guess from half a view.
    pub fn ready(&self) -> bool {
        self.position().is_some() && !self.clusters.is_empty() && self.unsynced().is_empty()
    }

    /// Records whether the tracker is reachable: while it is not, the last state stays and
    /// ages.
    pub fn set_connected(&mut self, connected: bool) {
        if connected {
            self.disconnected_since = None;
        } else {
            self.disconnected_since
                .get_or_insert_with(tokio::time::Instant::now);
        }
    }

    /// How long the view has gone without its tracker (`None` while connected).
    pub fn stale_for(&self) -> Option<std::time::Duration> {
        self.disconnected_since.map(|since| since.elapsed())
    }

    /// The status of every cluster.
    pub fn clusters(&self) -> impl Iterator<Item = &pb::ClusterStatus> {
        self.clusters.values()
    }

    /// Applies one update; on error nothing of it is applied.
    pub fn apply(&mut self, update: pb::Update) -> Result<(), ReplicaError> {
        match self.sequence.receive(update)? {
            None => {}
            Some(Received::Snapshot {
                mut objects,
                mut clusters,
            }) => {
                let previous = &self.clusters;
                let kept = self.carry.snapshot(
                    |id| previous.get(id).is_some_and(|s| s.synced),
                    self.objects.keys(),
                    &objects,
                    &mut clusters,
                );
                objects.extend(kept.iter().filter_map(|k| self.objects.get(k).cloned()));
                self.replace(objects, clusters);
            }
            Some(Received::Delta(mut change)) => {
                self.carry.delta(&mut change);
                for cluster in change.removed_clusters {
                    let gone: Vec<Key> = self
                        .objects
                        .keys()
                        .filter(|k| k.cluster == cluster)
                        .cloned()
                        .collect();
                    for k in gone {
                        self.remove_object(&k);
                    }
                    self.clusters.remove(&cluster);
                }
                for o in change.upserts {
                    upsert(&mut self.engine, &o);
                    let key = o.key();
                    if let Some(old) = self.objects.get(&key) {
                        unindex(&mut self.pods_by_node, old);
                        self.services.remove(old);
                    }
                    index(&mut self.pods_by_node, &o);
                    self.services.add(&o);
                    self.objects.insert(key, o);
                }
                for k in change.deletes {
                    self.remove_object(&k);
                }
                for status in change.clusters {
                    // The sequence checked every status's cluster id.
                    if let Ok(id) = ClusterId::new(&status.cluster) {
                        self.engine.set_cluster_expired(&id, status.expired);
                        self.engine
                            .set_trust_domain(&id, Some(status.trust_domain.as_str()));
                        self.clusters.insert(id, status);
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete snapshot replaces everything: a fresh engine, built in the order a
    /// clusterset builds one (namespaces first, policies last).
    fn replace(&mut self, objects: Vec<Object>, clusters: Vec<(ClusterId, pb::ClusterStatus)>) {
        let mut engine = Engine::new();
        let mut ordered: Vec<&Object> = objects.iter().collect();
        ordered.sort_by_key(|o| match o {
            Object::Namespace(_) => 0,
            Object::Node(_) => 1,
            Object::Pod(_) => 2,
            _ => 3,
        });
        for o in ordered {
            upsert(&mut engine, o);
        }
        for (id, status) in &clusters {
            engine.set_cluster_expired(id, status.expired);
            engine.set_trust_domain(id, Some(status.trust_domain.as_str()));
        }
        self.engine = engine;
        self.pods_by_node.clear();
        self.services = ServiceIndex::default();
        for o in &objects {
            index(&mut self.pods_by_node, o);
            self.services.add(o);
        }
        self.objects = objects.into_iter().map(|o| (o.key(), o)).collect();
        self.clusters = clusters.into_iter().collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Pod, Protocol};
    use crate::policy::{Connection, Verdict};
    use crate::tracker::view::{Change, Scope, View};
    use crate::tracker::wire::WireError;

    fn c(id: &str) -> ClusterId {
        ClusterId::new(id).expect("cluster id")
    }

    fn pod(cluster: &str, name: &str, ip: &str, app: &str) -> Object {
        Object::Pod(
            Pod::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a", "uid": format!("{cluster}-{name}"), "labels": {"app": app}},
                    "status": {"phase": "Running", "podIP": ip}}))
                .expect("pod"),
            )
            .expect("valid"),
        )
    }

    fn deny_all(cluster: &str) -> Object {
        Object::NetworkPolicy(
            crate::model::NetworkPolicy::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "deny", "namespace": "a"}, "spec": {"podSelector": {}}}))
                .expect("policy"),
                &mut Vec::new(),
            )
            .expect("valid"),
        )
    }

    /// Applies a deny-all policy in c1 to `view` and its delta to `replica`.
    fn deny_all_in(view: &mut View, replica: &mut Replica) {
        let d = view
            .apply(Change {
                upserts: vec![deny_all("c1")],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
    }

    fn synced(cluster: &str, synced: bool) -> pb::ClusterStatus {
        pb::ClusterStatus {
            cluster: cluster.into(),
            synced,
            connected: true,
            ..Default::default()
        }
    }

    fn verdict(r: &Replica, from: &str, to: &str) -> Verdict {
        let e = r.engine();
        let conn = Connection {
            src: e.address_endpoint(from.parse().expect("ip")),
            dst: e.address_endpoint(to.parse().expect("ip")),
            port: 80,
            protocol: Protocol::Tcp,
        };
        e.decide(&conn).verdict()
    }

    fn scope() -> Scope {
        Scope::AllClusters
    }

    /// A view with two pods of c1 and their cluster synced, and a replica fed its snapshot.
    fn fed() -> (View, Replica) {
        let mut view = View::new("e1", 100);
        view.apply(Change {
            upserts: vec![
                pod("c1", "a", "10.0.0.1", "a"),
                pod("c1", "b", "10.0.0.2", "b"),
            ],
            clusters: vec![synced("c1", true)],
            ..Change::default()
        });
        let mut replica = Replica::new();
        for part in view.snapshot(&scope(), 200) {
            replica.apply(part).expect("snapshot part");
        }
        (view, replica)
    }

    /// Pod `name` of c-cluster `cluster` (uid `cluster-name`), on `node` if any.
    fn pod_on(cluster: &str, name: &str, node: Option<&str>) -> Object {
        Object::Pod(
            Pod::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a", "uid": format!("{cluster}-{name}")},
                    "spec": {"nodeName": node, "containers": []},
                    "status": {"phase": "Running"}}))
                .expect("pod"),
            )
            .expect("valid"),
        )
    }

    fn on_node(r: &Replica, cluster: &str, node: &str) -> Vec<String> {
        let mut names: Vec<String> = r
            .pods_on_node(&c(cluster), node)
            .map(|p| p.name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn pods_are_indexed_by_cluster_and_node_as_they_change() {
        let mut view = View::new("e1", 100);
        view.apply(Change {
            upserts: vec![
                pod_on("c1", "a", Some("n1")),
                pod_on("c1", "b", Some("n1")),
                pod_on("c1", "c", None),
                pod_on("c2", "a", Some("n1")),
            ],
            clusters: vec![synced("c1", true), synced("c2", true)],
            ..Change::default()
        });
        let mut replica = Replica::new();
        for p in view.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        assert_eq!(on_node(&replica, "c1", "n1"), ["a", "b"]);
        assert_eq!(on_node(&replica, "c2", "n1"), ["a"]);
        assert!(on_node(&replica, "c1", "n2").is_empty());
        assert!(on_node(&replica, "c3", "n1").is_empty());
        let step = |view: &mut View, replica: &mut Replica, change: Change| {
            let d = view.apply(change).expect("a change");
            replica.apply((*d).clone()).expect("delta");
        };
        // Scheduled, moved (a pod re-created under the same uid, as a tracker may relay), gone.
        step(
            &mut view,
            &mut replica,
            Change {
                upserts: vec![pod_on("c1", "c", Some("n2")), pod_on("c1", "a", Some("n2"))],
                deletes: vec![pod_on("c1", "b", None).key()],
                ..Change::default()
            },
        );
        assert!(on_node(&replica, "c1", "n1").is_empty());
        assert_eq!(on_node(&replica, "c1", "n2"), ["a", "c"]);
        let with =
            |r: &Replica, ns: &str, sa: &str| r.pods_with_account(&c("c1"), "n2", ns, sa).count();
        assert_eq!(with(&replica, "a", "default"), 2);
        assert_eq!(with(&replica, "a", "other"), 0);
        assert_eq!(with(&replica, "b", "default"), 0);
        let mut pending = pod_on("c1", "c", Some("n2"));
        if let Object::Pod(p) = &mut pending {
            p.phase = crate::model::PodPhase::Pending;
        }
        step(
            &mut view,
            &mut replica,
            Change {
                upserts: vec![pending],
                ..Change::default()
            },
        );
        assert_eq!(
            on_node(&replica, "c1", "n2"),
            ["a", "c"],
            "an update in place"
        );
        step(
            &mut view,
            &mut replica,
            Change {
                removed_clusters: vec![c("c2")],
                ..Change::default()
            },
        );
        assert!(on_node(&replica, "c2", "n1").is_empty());
        assert!(
            !replica.pods_by_node.contains_key(&c("c2")),
            "no empty entries left"
        );
        // A fresh snapshot replaces the index with the view's.
        let mut fresh = View::new("e2", 100);
        fresh.apply(Change {
            upserts: vec![pod_on("c1", "z", Some("n1"))],
            clusters: vec![synced("c1", true)],
            ..Change::default()
        });
        for p in fresh.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        assert_eq!(on_node(&replica, "c1", "n1"), ["z"]);
        assert!(on_node(&replica, "c1", "n2").is_empty());
    }

    #[test]
    fn a_snapshot_in_parts_then_deltas() {
        let (mut view, mut replica) = fed();
        assert!(replica.ready());
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Allow);
        deny_all_in(&mut view, &mut replica);
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Deny);
        assert_eq!(replica.position(), Some(&view.position()));
        let d = view
            .apply(Change {
                deletes: vec![deny_all("c1").key()],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Allow);
    }

    #[test]
    fn an_incomplete_snapshot_is_never_used() {
        let (mut view, _) = fed();
        view.apply(Change {
            upserts: vec![deny_all("c1")],
            ..Change::default()
        });
        let parts = view.snapshot(&scope(), 1);
        assert!(parts.len() >= 3);
        let mut replica = Replica::new();
        for p in &parts[..parts.len() - 1] {
            replica.apply(p.clone()).expect("part");
            assert!(!replica.ready(), "half a snapshot is not a view");
            assert_eq!(replica.engine().counts(), (0, 0, 0));
        }
        // A new snapshot starts over; a stray part of the old one is refused.
        let mut replica = Replica::new();
        replica.apply(parts[0].clone()).expect("first part");
        let mut other = parts[1].clone();
        other.position = Some(pb::Position {
            epoch: "e9".into(),
            revision: 1,
        });
        assert!(matches!(
            replica.apply(other),
            Err(ReplicaError::StraySnapshotPart { .. })
        ));
        assert!(matches!(
            replica.apply(parts[1].clone()),
            Err(ReplicaError::StraySnapshotPart { .. })
        ));
    }

    #[test]
    fn unsynced_clusters_keep_the_replica_not_ready() {
        let mut view = View::new("e1", 10);
        view.apply(Change {
            upserts: vec![pod("c1", "a", "10.0.0.1", "a")],
            clusters: vec![synced("c1", true), synced("c2", false)],
            ..Change::default()
        });
        let mut replica = Replica::new();
        for p in view.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        assert!(!replica.ready());
        assert_eq!(replica.unsynced(), vec![c("c2")]);
        let d = view
            .apply(Change {
                clusters: vec![synced("c2", true)],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        assert!(replica.ready());
    }

    #[test]
    fn lost_and_bad_updates_change_nothing() {
        let (mut view, mut replica) = fed();
        let skipped = view
            .apply(Change {
                upserts: vec![deny_all("c1")],
                ..Change::default()
            })
            .expect("a change");
        let next = view
            .apply(Change {
                upserts: vec![pod("c1", "c", "10.0.0.3", "c")],
                ..Change::default()
            })
            .expect("a change");
        let before = replica.position().cloned();
        assert!(matches!(
            replica.apply((*next).clone()),
            Err(ReplicaError::Gap { .. })
        ));
        assert_eq!(replica.position().cloned(), before);
        // A delta with one bad object among good ones: none of it is applied.
        let mut bad = (*skipped).clone();
        if let Some(pb::update::Change::Delta(d)) = &mut bad.change {
            let mut broken = pb::Object::from(&pod("c1", "z", "10.0.0.9", "z"));
            if let Some(pb::object::Object::Pod(p)) = &mut broken.object {
                p.ips = vec!["not-an-ip".into()];
            }
            d.upserts.push(broken);
        }
        assert!(matches!(replica.apply(bad), Err(ReplicaError::Wire(_))));
        assert_eq!(
            verdict(&replica, "10.0.0.1", "10.0.0.2"),
            Verdict::Allow,
            "the policy was not applied"
        );
        assert_eq!(replica.position().cloned(), before);
        replica
            .apply((*skipped).clone())
            .expect("the real one applies");
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Deny);
        let mut fresh = Replica::new();
        assert_eq!(fresh.apply((*next).clone()), Err(ReplicaError::NoSnapshot));
        assert_eq!(
            fresh.apply(pb::Update::default()),
            Err(ReplicaError::NoPosition)
        );
    }

    #[test]
    fn a_removed_cluster_leaves_the_engine() {
        let mut view = View::new("e1", 10);
        view.apply(Change {
            upserts: vec![
                pod("c1", "a", "10.0.0.1", "a"),
                pod("c2", "b", "10.0.0.2", "b"),
            ],
            clusters: vec![synced("c1", true), synced("c2", true)],
            ..Change::default()
        });
        let mut replica = Replica::new();
        for p in view.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        assert_eq!(replica.engine().counts().0, 2);
        let d = view
            .apply(Change {
                removed_clusters: vec![c("c2")],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        assert_eq!(replica.engine().counts().0, 1);
        assert_eq!(replica.clusters().count(), 1);
    }

    /// The snapshot parts of `view`, at most `bytes` each.
    fn parts(view: &View, bytes: usize) -> Vec<pb::Update> {
        view.snapshot(&scope(), bytes)
    }

    fn with_position(mut u: pb::Update, epoch: &str, revision: u64) -> pb::Update {
        u.position = Some(pb::Position {
            epoch: epoch.into(),
            revision,
        });
        u
    }

    #[test]
    fn a_revision_at_the_top_of_the_range_is_a_gap_not_an_overflow() {
        let (view, _) = fed();
        let mut replica = Replica::new();
        for p in parts(&view, 1 << 20) {
            replica
                .apply(with_position(p, "e1", u64::MAX))
                .expect("part");
        }
        let delta = pb::Update {
            position: Some(pb::Position {
                epoch: "e1".into(),
                revision: 0,
            }),
            change: Some(pb::update::Change::Delta(pb::Delta::default())),
        };
        let e = replica.apply(delta).expect_err("wraps around");
        assert!(
            matches!(
                e,
                ReplicaError::Gap {
                    have: u64::MAX,
                    got: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(replica.position().map(|p| p.revision), Some(u64::MAX));
    }

    #[test]
    fn a_bad_part_drops_the_snapshot_being_received() {
        let (mut view, _) = fed();
        view.apply(Change {
            upserts: vec![deny_all("c1")],
            ..Change::default()
        });
        let parts = parts(&view, 1);
        assert!(parts.len() >= 3);
        let mut replica = Replica::new();
        replica.apply(parts[0].clone()).expect("first part");
        // The second part with an object that fails validation: had the rest completed the
        // snapshot, the view would lack what that part carried (here perhaps the deny-all).
        let mut bad = parts[1].clone();
        if let Some(pb::update::Change::Snapshot(s)) = &mut bad.change {
            s.objects.push(pb::Object { object: None });
        }
        assert_eq!(
            replica.apply(bad),
            Err(ReplicaError::Wire(WireError::Empty))
        );
        for p in &parts[1..] {
            assert!(matches!(
                replica.apply(p.clone()),
                Err(ReplicaError::StraySnapshotPart { .. })
            ));
        }
        assert_eq!(replica.position(), None);
        assert_eq!(replica.engine().counts(), (0, 0, 0));
        // The snapshot sent again from its first part is whole.
        for p in parts {
            replica.apply(p).expect("part");
        }
        assert!(replica.ready());
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Deny);
    }

    #[test]
    fn an_older_snapshot_of_the_same_epoch_is_refused() {
        let (mut view, mut replica) = fed();
        let stale = parts(&view, 1 << 20);
        deny_all_in(&mut view, &mut replica);
        let e = replica
            .apply(stale[0].clone())
            .expect_err("a replay of the view before the deny-all");
        assert_eq!(
            e.to_string(),
            "snapshot at e1/1 is older than the view at e1/2"
        );
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Deny);
        // The same revision (a subscriber that fell behind) and another epoch (a restarted
        // tracker, which counts from zero again) both replace the view.
        for p in parts(&view, 1 << 20) {
            replica.apply(p).expect("same revision");
        }
        for p in stale {
            replica.apply(with_position(p, "e2", 1)).expect("new epoch");
        }
        assert_eq!(verdict(&replica, "10.0.0.1", "10.0.0.2"), Verdict::Allow);
    }

    #[test]
    fn a_cold_trackers_unsynced_cluster_is_kept_as_it_was_until_synced_again() {
        let (_, mut replica) = fed();
        let has = |r: &Replica, ip: &str| {
            matches!(
                r.engine().address_endpoint(ip.parse().expect("ip")),
                crate::policy::Endpoint::Pod { .. }
            )
        };
        // A restarted tracker: c1 listed in part (pod a only), not synced yet; c2 never was.
        let mut cold = View::new("e2", 100);
        let mut stale = synced("c1", false);
        stale.connected = false;
        stale.stale_for_ms = 1200;
        cold.apply(Change {
            upserts: vec![
                pod("c1", "a", "10.0.0.1", "a"),
                pod("c2", "x", "10.0.9.1", "x"),
            ],
            clusters: vec![stale, synced("c2", false)],
            ..Change::default()
        });
        for part in cold.snapshot(&scope(), 1 << 20) {
            replica.apply(part).expect("snapshot part");
        }
        assert!(has(&replica, "10.0.0.2"), "pod b kept");
        let c1 = replica
            .clusters()
            .find(|s| s.cluster == "c1")
            .cloned()
            .expect("c1");
        assert!(
            c1.synced && !c1.connected && c1.stale_for_ms == 1200,
            "{c1:?}"
        );
        assert!(c1.error.contains("kept from the previous view"), "{c1:?}");
        assert_eq!(replica.unsynced(), vec![c("c2")], "c2 was never complete");

        // Still resyncing: the status stays synced, ages, and may expire as the tracker says.
        let mut expired = synced("c1", false);
        expired.expired = true;
        let d = cold
            .apply(Change {
                upserts: vec![pod("c1", "c", "10.0.0.3", "c")],
                clusters: vec![expired],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        let c1 = replica
            .clusters()
            .find(|s| s.cluster == "c1")
            .cloned()
            .expect("c1");
        assert!(c1.synced && c1.expired, "{c1:?}");
        assert!(has(&replica, "10.0.0.2") && has(&replica, "10.0.0.3"));

        // Synced again: what was kept and not sent again (pod b) goes.
        let d = cold
            .apply(Change {
                clusters: vec![synced("c1", true), synced("c2", true)],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        assert!(!has(&replica, "10.0.0.2"), "pod b deleted once c1 synced");
        assert!(has(&replica, "10.0.0.1") && has(&replica, "10.0.0.3"));
        assert!(replica.ready());
        assert!(
            replica.clusters().all(|s| s.error.is_empty()),
            "fresh statuses"
        );
    }

    /// Service `name` of c-cluster `cluster`, namespace a, at `ip`:80.
    fn service(cluster: &str, name: &str, ip: &str) -> Object {
        Object::Service(
            Service::from_api(
                &c(cluster),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a"},
                    "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
                .expect("service"),
            )
            .expect("valid"),
        )
    }

    /// Slice `name` of c1, namespace a, of Service `service`, one endpoint at `ip`:80.
    fn slice(name: &str, service: &str, ip: &str) -> Object {
        Object::EndpointSlice(
            EndpointSlice::from_api(
                &c("c1"),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "a",
                                 "labels": {crate::model::service::SERVICE_NAME_LABEL: service}},
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [ip]}], "ports": [{"port": 80}]}))
                .expect("slice"),
            )
            .expect("valid"),
        )
    }

    /// The name of the Service of `cluster` at `address`, TCP.
    fn service_at(r: &Replica, cluster: &str, address: &str) -> Option<String> {
        r.service_at(&c(cluster), address.parse().expect("addr"), Protocol::Tcp)
            .map(|s| s.name.clone())
    }

    /// The slices of Service `name` of c1, namespace a, by name.
    fn slices_of(r: &Replica, name: &str) -> Vec<String> {
        let Object::Service(s) = service("c1", name, "10.96.0.1") else {
            unreachable!()
        };
        r.endpoint_slices(&s).map(|e| e.name.clone()).collect()
    }

    #[test]
    fn services_and_slices_are_indexed_as_they_change() {
        let mut view = View::new("e1", 100);
        view.apply(Change {
            upserts: vec![
                service("c1", "web", "10.96.0.10"),
                service("c2", "web", "10.96.0.10"),
                service("c1", "headless", "None"),
                slice("web-a", "web", "10.0.0.1"),
                slice("web-b", "web", "10.0.0.2"),
                // A slice before its Service: indexed all the same.
                slice("db-a", "db", "10.0.0.3"),
            ],
            clusters: vec![synced("c1", true), synced("c2", true)],
            ..Change::default()
        });
        let mut replica = Replica::new();
        for p in view.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        let step = |view: &mut View, replica: &mut Replica, change: Change| {
            let d = view.apply(change).expect("a change");
            replica.apply((*d).clone()).expect("delta");
        };
        assert_eq!(
            service_at(&replica, "c1", "10.96.0.10:80").as_deref(),
            Some("web")
        );
        assert_eq!(service_at(&replica, "c1", "10.96.0.10:81"), None);
        assert_eq!(
            replica
                .service_at(
                    &c("c1"),
                    "10.96.0.10:80".parse().expect("addr"),
                    Protocol::Udp
                )
                .map(|s| &s.name),
            None
        );
        assert_eq!(slices_of(&replica, "web"), ["web-a", "web-b"]);
        assert_eq!(slices_of(&replica, "db"), ["db-a"]);
        // The Service moves to another address; a slice moves to another Service; one goes.
        step(
            &mut view,
            &mut replica,
            Change {
                upserts: vec![
                    service("c1", "web", "10.96.0.20"),
                    service("c1", "db", "10.96.0.30"),
                    slice("web-b", "db", "10.0.0.2"),
                ],
                deletes: vec![slice("web-a", "web", "10.0.0.1").key()],
                ..Change::default()
            },
        );
        assert_eq!(service_at(&replica, "c1", "10.96.0.10:80"), None);
        assert_eq!(
            service_at(&replica, "c1", "10.96.0.20:80").as_deref(),
            Some("web")
        );
        assert_eq!(
            service_at(&replica, "c1", "10.96.0.30:80").as_deref(),
            Some("db")
        );
        assert!(slices_of(&replica, "web").is_empty());
        assert_eq!(slices_of(&replica, "db"), ["db-a", "web-b"]);
        // A second Service claiming an address (a delta applies upserts before deletes):
        // removing one leaves the other's entry.
        step(
            &mut view,
            &mut replica,
            Change {
                upserts: vec![service("c1", "web2", "10.96.0.20")],
                deletes: vec![service("c1", "web", "10.96.0.20").key()],
                ..Change::default()
            },
        );
        assert_eq!(
            service_at(&replica, "c1", "10.96.0.20:80").as_deref(),
            Some("web2")
        );
        // A cluster that leaves takes its Services with it.
        step(
            &mut view,
            &mut replica,
            Change {
                removed_clusters: vec![c("c2")],
                ..Change::default()
            },
        );
        assert_eq!(service_at(&replica, "c2", "10.96.0.10:80"), None);
        assert_eq!(replica.services.by_address.len(), 2, "web2 and db only");
        // A fresh snapshot replaces the index with the view's.
        let mut fresh = View::new("e2", 100);
        fresh.apply(Change {
            upserts: vec![
                service("c1", "api", "10.96.0.40"),
                slice("api-a", "api", "10.0.0.4"),
            ],
            clusters: vec![synced("c1", true)],
            ..Change::default()
        });
        for p in fresh.snapshot(&scope(), 1000) {
            replica.apply(p).expect("part");
        }
        assert_eq!(service_at(&replica, "c1", "10.96.0.20:80"), None);
        assert_eq!(service_at(&replica, "c1", "10.96.0.30:80"), None);
        assert!(slices_of(&replica, "db").is_empty());
        assert_eq!(slices_of(&replica, "api"), ["api-a"]);
        assert_eq!(replica.services.by_address.len(), 1);
        assert_eq!(replica.services.slices.len(), 1);
        // Deleting what is left leaves no empty entry behind.
        step(
            &mut fresh,
            &mut replica,
            Change {
                deletes: vec![
                    service("c1", "api", "10.96.0.40").key(),
                    slice("api-a", "api", "10.0.0.4").key(),
                ],
                ..Change::default()
            },
        );
        assert!(replica.services.by_address.is_empty() && replica.services.slices.is_empty());
    }

    #[test]
    fn a_malformed_slice_is_refused_and_the_index_stays() {
        let (mut view, mut replica) = fed();
        let d = view
            .apply(Change {
                upserts: vec![
                    service("c1", "web", "10.96.0.10"),
                    slice("web-a", "web", "10.0.0.1"),
                ],
                ..Change::default()
            })
            .expect("a change");
        replica.apply((*d).clone()).expect("delta");
        let mut bad = (*view
            .apply(Change {
                deletes: vec![slice("web-a", "web", "10.0.0.1").key()],
                ..Change::default()
            })
            .expect("a change"))
        .clone();
        if let Some(pb::update::Change::Delta(d)) = &mut bad.change {
            let mut broken = pb::Object::from(&slice("web-b", "web", "10.0.0.2"));
            if let Some(pb::object::Object::EndpointSlice(e)) = &mut broken.object {
                e.endpoints[0].addresses = vec!["fd00::1".into()];
            }
            d.upserts.push(broken);
        }
        assert!(matches!(replica.apply(bad), Err(ReplicaError::Wire(_))));
        assert_eq!(
            slices_of(&replica, "web"),
            ["web-a"],
            "nothing of it applied"
        );
    }
}
