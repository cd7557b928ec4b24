//! The engine's state: interned clusters, namespaces, pods and policies, with the indexes a
//! decision needs, each updated incrementally.
//!
//! Costs: deciding touches only the policies that select the two pods (listed per pod) and
//! their rules; namespace selectors are precomputed as one bit per (namespace, selector).
//! A pod update costs the policies of its namespace; a policy update the pods of its
//! namespace (plus, for a new namespace selector, every namespace); a namespace update every
//! namespace selector.

mod packets;

use std::collections::HashMap;
use std::net::IpAddr;

use smallvec::SmallVec;

pub use packets::{AddrRange, Grant, PacketPolicy, PodPackets};

use super::compile::{PeerKind, PortSpan, Program, Query, Selector};
use super::decision::{
    Connection, Decision, Direction, DirectionExplanation, Endpoint, Explanation, PolicyId,
    RuleRef, Verdict, Why,
};
use super::intern::{Interner, LabelSet, Sym};
use super::store::{Shared, Slab};
use crate::model::{self, ClusterId, ClusterSet, LabelSelector, Labels, Protocol};

/// A pod, by index in the engine (valid until that pod is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodId(u32);

/// Why a pod cannot be an endpoint of a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The pod has no address of the family asked for.
    #[error("pod {pod} has no {family} address")]
    NoAddress {
        /// `cluster/namespace/name`.
        pod: String,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// The pod does not own its addresses (finished, or not addressed yet).
    #[error("pod {pod} owns no address (phase {phase})")]
    NotLive {
        /// `cluster/namespace/name`.
        pod: String,
        /// Its phase.
        phase: String,
    },
}

type ClusterIdx = u32;
type NsIdx = u32;
type PolicyIdx = u32;
type PodIdx = u32;

/// The policies selecting a pod in one direction, inline for the usual few.
type PolicyList = SmallVec<[PolicyIdx; 6]>;

#[derive(Debug)]
struct NsEntry {
    cluster: ClusterIdx,
    name: Box<str>,
    labels: LabelSet,
    /// Declared by a Namespace object (else implied by a pod or policy in it).
    declared: bool,
    pods: Vec<PodIdx>,
    policies: Vec<PolicyIdx>,
}

/// Which namespace selectors match which namespaces: one row of bits per namespace slot, in
/// one dense allocation so that a decision's lookup is a single, likely cached, load.
#[derive(Debug, Default)]
struct SelectionMatrix {
    /// Words per row.
    words: usize,
    bits: Vec<u64>,
}

impl SelectionMatrix {
    #[inline]
    fn get(&self, ns: NsIdx, sel: u32) -> bool {
        let at = ns as usize * self.words + (sel / 64) as usize;
        (sel as usize) < self.words * 64
            && self.bits.get(at).is_some_and(|w| w >> (sel % 64) & 1 == 1)
    }

    fn set(&mut self, ns: NsIdx, sel: u32, on: bool) {
        let word = (sel / 64) as usize;
        if word >= self.words {
            if !on {
                return;
            }
            // Widen every row, keeping the bits.
            let words = (word + 1).next_power_of_two();
            let rows = self.bits.len() / self.words.max(1);
            let mut bits = vec![0; rows * words];
            for r in 0..rows {
                bits[r * words..r * words + self.words]
                    .copy_from_slice(&self.bits[r * self.words..(r + 1) * self.words]);
            }
            self.words = words;
            self.bits = bits;
        }
        let at = ns as usize * self.words + word;
        if at >= self.bits.len() {
            if !on {
                return;
            }
            self.bits.resize((ns as usize + 1) * self.words, 0);
        }
        let bit = 1u64 << (sel % 64);
        if on {
            self.bits[at] |= bit;
        } else {
            self.bits[at] &= !bit;
        }
    }

    fn clear_row(&mut self, ns: NsIdx) {
        let start = ns as usize * self.words;
        if let Some(row) = self.bits.get_mut(start..start + self.words) {
            row.fill(0);
        }
    }
}

/// A pod's named ports: (name, protocol, port), the first in container order for each
/// (name, protocol).
type NamedPorts = SmallVec<[(Sym, Protocol, u16); 2]>;

/// What a decision reads of a pod: a few indices into values pods share (pods of one
/// workload have the same labels, ports and policies), so that the record is small and the
/// values stay in cache; the rest is boxed.
#[derive(Debug)]
struct PodEntry {
    ns: NsIdx,
    /// In [`Engine::label_sets`].
    labels: u32,
    /// In [`Engine::port_lists`].
    named_ports: u32,
    /// Policies selecting the pod for ingress, in [`Engine::policy_lists`].
    ingress: u32,
    /// Policies selecting the pod for egress, in [`Engine::policy_lists`].
    egress: u32,
    about: Box<PodAbout>,
}

/// The parts of a pod decisions do not read.
#[derive(Debug)]
struct PodAbout {
    cluster: ClusterIdx,
    name: Box<str>,
    ips: SmallVec<[IpAddr; 2]>,
    owns_ips: bool,
    host_network: bool,
    phase: model::PodPhase,
    node: Option<Box<str>>,
    service_account: Box<str>,
}

/// An IdentityPolicy with its selector compiled.
#[derive(Debug)]
struct IdentityEntry {
    selector: Selector,
    policy: model::IdentityPolicy,
}

/// A compiled policy: its program inline, the rest boxed, so that the policies stay in cache;
/// aligned so that a typical policy spans two cache lines, not three.
#[derive(Debug)]
#[repr(align(64))]
struct PolicyEntry {
    program: Program,
    about: Box<PolicyAbout>,
}

/// The parts of a policy decisions do not read.
#[derive(Debug)]
struct PolicyAbout {
    ns: NsIdx,
    name: Box<str>,
    selector: Selector,
    /// Namespace selectors this policy holds a reference on.
    ns_sels: Vec<u32>,
}

#[derive(Debug)]
struct NsSelEntry {
    model: LabelSelector,
    compiled: Selector,
    refs: u32,
}

/// The policy engine over every cluster of a clusterset.
#[derive(Debug, Default)]
pub struct Engine {
    interner: Interner,
    clusters: Vec<ClusterId>,
    cluster_index: HashMap<ClusterId, ClusterIdx>,
    namespaces: Slab<NsEntry>,
    ns_index: HashMap<(ClusterIdx, Box<str>), NsIdx>,
    pods: Slab<PodEntry>,
    pod_index: HashMap<(ClusterIdx, Box<str>), PodIdx>,
    policies: Slab<PolicyEntry>,
    /// Each policy's (ingress, egress) port spans, by policy index: dense and small, so that a
    /// decision skips the policies that cannot admit its port without touching them.
    policy_spans: Vec<[PortSpan; 2]>,
    policy_index: HashMap<(ClusterIdx, NsIdx, Box<str>), PolicyIdx>,
    ns_selectors: Slab<NsSelEntry>,
    label_sets: Shared<LabelSet>,
    port_lists: Shared<NamedPorts>,
    policy_lists: Shared<PolicyList>,
    selection: SelectionMatrix,
    ns_selector_index: HashMap<LabelSelector, u32>,
    /// Addresses owned by live pods; more than one owner makes an address ambiguous.
    ips: HashMap<IpAddr, SmallVec<[PodIdx; 1]>>,
    /// Clusters whose data is older than the maximum staleness, by index: their pods match no
    /// selector.
    expired: Vec<bool>,
    /// Whether any cluster is expired: decisions check no further when none is.
    any_expired: bool,
    /// InternalIP addresses of nodes, by (cluster, node name).
    nodes: HashMap<(ClusterIdx, Box<str>), SmallVec<[IpAddr; 2]>>,
    /// IdentityPolicies by namespace, then name.
    identity_policies: HashMap<NsIdx, std::collections::BTreeMap<Box<str>, IdentityEntry>>,
    /// Trust domains configured for clusters (the others' are derived from their ids).
    trust_domains: HashMap<ClusterId, String>,
}

impl Engine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine holding every object of `set`.
    pub fn from_clusterset(set: &ClusterSet) -> Self {
        let mut e = Self::new();
        for ns in set.namespaces() {
            e.upsert_namespace(ns);
        }
        for node in set.nodes() {
            e.upsert_node(node);
        }
        for pod in set.pods() {
            e.upsert_pod(pod);
        }
        for p in set.policies() {
            e.upsert_policy(p);
        }
        for p in set.identity_policies() {
            e.upsert_identity_policy(p);
        }
        for c in set.clusters.values() {
            e.set_trust_domain(&c.id, c.settings.trust_domain.as_deref());
        }
        e
    }

    /// Records the trust domain `cluster`'s settings name (`None`: derived from its id).
    pub fn set_trust_domain(&mut self, cluster: &ClusterId, trust_domain: Option<&str>) {
        match trust_domain.filter(|td| !td.is_empty()) {
            Some(td) => self.trust_domains.insert(cluster.clone(), td.to_owned()),
            None => self.trust_domains.remove(cluster),
        };
    }

    /// The trust domain of `cluster`: its settings', else derived from its id.
    pub fn trust_domain(&self, cluster: &ClusterId) -> Option<String> {
        let configured = self.trust_domains.get(cluster).map(String::as_str);
        crate::identity::trust_domain_for(cluster, configured)
            .ok()
            .map(|td| td.to_string())
    }

    /// Adds or replaces an IdentityPolicy.
    pub fn upsert_identity_policy(&mut self, p: &model::IdentityPolicy) {
        let ns = self.ns_idx(&p.cluster, &p.namespace);
        let selector = Selector::new(&p.pod_selector, &mut self.interner);
        self.identity_policies.entry(ns).or_default().insert(
            p.name.as_str().into(),
            IdentityEntry {
                selector,
                policy: p.clone(),
            },
        );
    }

    /// Removes an IdentityPolicy.
    pub fn remove_identity_policy(&mut self, cluster: &ClusterId, namespace: &str, name: &str) {
        let Some(&c) = self.cluster_index.get(cluster) else {
            return;
        };
        if let Some(&ns) = self.ns_index.get(&(c, namespace.into()))
            && let Some(policies) = self.identity_policies.get_mut(&ns)
        {
            policies.remove(name);
            self.release_ns(ns);
        }
    }

    /// The identity `pod` runs as: its service account in its cluster's trust domain.
    pub fn pod_identity(&self, pod: PodId) -> Option<crate::identity::WorkloadId> {
        let p = self.pods.get(pod.0)?;
        let ns = self.namespaces.get(p.ns)?;
        let cluster = self.clusters.get(p.about.cluster as usize)?;
        let td = crate::identity::id::trust_domain(&self.trust_domain(cluster)?).ok()?;
        crate::identity::WorkloadId::new(&td, &ns.name, &p.about.service_account).ok()
    }

    /// The identity layer for a connection to `dst` on `port` of `protocol` from a peer that
    /// proved `peer` (or nothing).
    pub fn decide_identity(
        &self,
        dst: PodId,
        port: u16,
        protocol: model::Protocol,
        peer: Option<&crate::identity::WorkloadId>,
    ) -> super::identity::IdentityDecision {
        let selecting: Vec<&model::IdentityPolicy> = self
            .pods
            .get(dst.0)
            .filter(|p| !p.about.host_network)
            .and_then(|p| {
                let labels = self.label_sets.get(p.labels)?;
                Some(
                    self.identity_policies
                        .get(&p.ns)?
                        .values()
                        .filter(|e| e.selector.matches(labels))
                        .map(|e| &e.policy)
                        .collect(),
                )
            })
            .unwrap_or_default();
        super::identity::decide(selecting.iter().copied(), peer, port, protocol, |c| {
            self.trust_domain(c)
        })
    }

    /// Number of (pods, namespaces, policies) held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.pods.len(), self.namespaces.len(), self.policies.len())
    }

    fn cluster_idx(&mut self, id: &ClusterId) -> ClusterIdx {
        if let Some(&i) = self.cluster_index.get(id) {
            return i;
        }
        let i = ClusterIdx::try_from(self.clusters.len()).expect("fewer than 2^32 clusters");
        self.clusters.push(id.clone());
        self.cluster_index.insert(id.clone(), i);
        i
    }

    /// The namespace entry for (cluster, name), implied with automatic labels if new.
    fn ns_idx(&mut self, cluster: &ClusterId, name: &str) -> NsIdx {
        let c = self.cluster_idx(cluster);
        if let Some(&i) = self.ns_index.get(&(c, name.into())) {
            return i;
        }
        let implied = model::Namespace::implied(cluster, name);
        let labels = LabelSet::new(&implied.labels, &mut self.interner);
        let i = self.namespaces.insert(NsEntry {
            cluster: c,
            name: name.into(),
            labels,
            declared: false,
            pods: Vec::new(),
            policies: Vec::new(),
        });
        self.ns_index.insert((c, name.into()), i);
        self.refresh_ns_selection(i);
        i
    }

    /// Recomputes which namespace selectors match namespace `i`.
    fn refresh_ns_selection(&mut self, i: NsIdx) {
        let Some(ns) = self.namespaces.get(i) else {
            return;
        };
        self.selection.clear_row(i);
        for (s, sel) in self.ns_selectors.iter() {
            if sel.compiled.matches(&ns.labels) {
                self.selection.set(i, s, true);
            }
        }
    }

    /// Drops namespace `i` if nothing declares or uses it.
    fn release_ns(&mut self, i: NsIdx) {
        let unused = self
            .namespaces
            .get(i)
            .is_some_and(|ns| !ns.declared && ns.pods.is_empty() && ns.policies.is_empty())
            && self.identity_policies.get(&i).is_none_or(|p| p.is_empty());
        if unused && let Some(ns) = self.namespaces.remove(i) {
            self.identity_policies.remove(&i);
            self.ns_index.remove(&(ns.cluster, ns.name));
        }
    }

    /// Adds or replaces a namespace. Its name and cluster labels are set here again from
    /// where it came from, whatever the caller passed: a forged cluster label never matches.
    pub fn upsert_namespace(&mut self, ns: &model::Namespace) {
        let i = self.ns_idx(&ns.cluster, &ns.name);
        let (labels, _) = model::labels::namespace_labels(&ns.cluster, &ns.name, ns.labels.clone());
        let labels = LabelSet::new(&labels, &mut self.interner);
        if let Some(entry) = self.namespaces.get_mut(i) {
            entry.declared = true;
            if entry.labels == labels {
                return;
            }
            entry.labels = labels;
        }
        self.refresh_ns_selection(i);
    }

    /// Removes a namespace; while pods or policies remain in it, it keeps its automatic labels.
    pub fn remove_namespace(&mut self, cluster: &ClusterId, name: &str) {
        let Some(&c) = self.cluster_index.get(cluster) else {
            return;
        };
        let Some(&i) = self.ns_index.get(&(c, name.into())) else {
            return;
        };
        let implied = model::Namespace::implied(cluster, name);
        let labels = LabelSet::new(&implied.labels, &mut self.interner);
        if let Some(entry) = self.namespaces.get_mut(i) {
            entry.declared = false;
            entry.labels = labels;
        }
        self.refresh_ns_selection(i);
        self.release_ns(i);
    }

    /// Adds or replaces a node (its addresses stand for its host-network pods).
    pub fn upsert_node(&mut self, node: &model::Node) {
        let c = self.cluster_idx(&node.cluster);
        self.nodes.insert(
            (c, node.name.as_str().into()),
            node.addresses.iter().copied().collect(),
        );
    }

    /// Removes a node.
    pub fn remove_node(&mut self, cluster: &ClusterId, name: &str) {
        if let Some(&c) = self.cluster_index.get(cluster) {
            self.nodes.remove(&(c, name.into()));
        }
    }

    /// Adds or replaces a pod, keyed by (cluster, uid).
    pub fn upsert_pod(&mut self, pod: &model::Pod) {
        let c = self.cluster_idx(&pod.cluster);
        if let Some(&old) = self.pod_index.get(&(c, pod.uid.as_str().into())) {
            self.detach_pod(old);
            self.pods.remove(old);
        }
        let ns = self.ns_idx(&pod.cluster, &pod.namespace);
        let labels = LabelSet::new(&pod.labels, &mut self.interner);
        let mut named_ports = NamedPorts::new();
        for p in &pod.ports {
            if let Some(name) = &p.name {
                let sym = self.interner.intern(name);
                if !named_ports
                    .iter()
                    .any(|&(n, pr, _)| n == sym && pr == p.protocol)
                {
                    named_ports.push((sym, p.protocol, p.port));
                }
            }
        }
        // Host-network pods are never isolated by policy.
        let (mut ingress, mut egress) = (PolicyList::new(), PolicyList::new());
        if !pod.host_network
            && let Some(nse) = self.namespaces.get(ns)
        {
            for &p in &nse.policies {
                if let Some(pol) = self.policies.get(p)
                    && pol.about.selector.matches(&labels)
                {
                    if pol.program.applies(true) {
                        ingress.push(p);
                    }
                    if pol.program.applies(false) {
                        egress.push(p);
                    }
                }
            }
            ingress.sort_unstable();
            egress.sort_unstable();
        }
        let entry = PodEntry {
            ns,
            labels: self.label_sets.acquire(labels),
            named_ports: self.port_lists.acquire(named_ports),
            ingress: self.policy_lists.acquire(ingress),
            egress: self.policy_lists.acquire(egress),
            about: Box::new(PodAbout {
                cluster: c,
                name: pod.name.as_str().into(),
                ips: pod.ips.iter().copied().collect(),
                owns_ips: pod.owns_ips(),
                host_network: pod.host_network,
                phase: pod.phase,
                node: pod.node_name.as_deref().map(Into::into),
                service_account: pod.service_account.as_str().into(),
            }),
        };
        let owned: SmallVec<[IpAddr; 2]> = if entry.about.owns_ips {
            entry.about.ips.clone()
        } else {
            SmallVec::new()
        };
        let i = self.pods.insert(entry);
        self.pod_index.insert((c, pod.uid.as_str().into()), i);
        if let Some(nse) = self.namespaces.get_mut(ns) {
            nse.pods.push(i);
        }
        for ip in owned {
            self.ips.entry(ip).or_default().push(i);
        }
    }

    /// Unlinks pod `i` from its namespace, the address index and its shared values.
    fn detach_pod(&mut self, i: PodIdx) {
        let Some(p) = self.pods.get(i) else {
            return;
        };
        let ns = p.ns;
        self.label_sets.release(p.labels);
        self.port_lists.release(p.named_ports);
        self.policy_lists.release(p.ingress);
        self.policy_lists.release(p.egress);
        for ip in p.about.ips.clone() {
            if let Some(owners) = self.ips.get_mut(&ip) {
                owners.retain(|o| *o != i);
                if owners.is_empty() {
                    self.ips.remove(&ip);
                }
            }
        }
        if let Some(nse) = self.namespaces.get_mut(ns) {
            nse.pods.retain(|&x| x != i);
        }
        self.release_ns(ns);
    }

    /// Removes the pod (cluster, uid); a later pod that reuses its address is untouched.
    pub fn remove_pod(&mut self, cluster: &ClusterId, uid: &str) {
        let Some(&c) = self.cluster_index.get(cluster) else {
            return;
        };
        if let Some(i) = self.pod_index.remove(&(c, uid.into())) {
            self.detach_pod(i);
            self.pods.remove(i);
        }
    }

    /// The id of a namespace selector equal to `sel`, taking a reference on it.
    fn acquire_ns_selector(&mut self, sel: &LabelSelector) -> u32 {
        if let Some(&s) = self.ns_selector_index.get(sel) {
            if let Some(e) = self.ns_selectors.get_mut(s) {
                e.refs += 1;
            }
            return s;
        }
        let compiled = Selector::new(sel, &mut self.interner);
        let s = self.ns_selectors.insert(NsSelEntry {
            model: sel.clone(),
            compiled,
            refs: 1,
        });
        self.ns_selector_index.insert(sel.clone(), s);
        if let Some(e) = self.ns_selectors.get(s) {
            for (i, ns) in self.namespaces.iter() {
                self.selection.set(i, s, e.compiled.matches(&ns.labels));
            }
        }
        s
    }

    fn release_ns_selector(&mut self, s: u32) {
        let Some(e) = self.ns_selectors.get_mut(s) else {
            return;
        };
        e.refs -= 1;
        if e.refs == 0
            && let Some(e) = self.ns_selectors.remove(s)
        {
            self.ns_selector_index.remove(&e.model);
        }
    }

    /// Adds or replaces a NetworkPolicy, keyed by (cluster, namespace, name).
    pub fn upsert_policy(&mut self, p: &model::NetworkPolicy) {
        let c = self.cluster_idx(&p.cluster);
        let ns = self.ns_idx(&p.cluster, &p.namespace);
        let key = (c, ns, p.name.as_str().into());
        // Namespace selectors first, in rule and peer order: the program refers to them.
        let mut ns_sels = Vec::new();
        for rule in p.ingress.iter().chain(&p.egress).flatten() {
            for peer in &rule.peers {
                if let model::Peer::Pods {
                    namespace_selector: Some(sel),
                    ..
                } = peer
                {
                    ns_sels.push(self.acquire_ns_selector(sel));
                }
            }
        }
        let entry = PolicyEntry {
            program: Program::new(p, ns, &ns_sels, &mut self.interner),
            about: Box::new(PolicyAbout {
                ns,
                name: p.name.as_str().into(),
                selector: Selector::new(&p.pod_selector, &mut self.interner),
                ns_sels,
            }),
        };
        let idx = match self.policy_index.get(&key) {
            Some(&idx) => {
                if let Some(old) = self.policies.get_mut(idx) {
                    let old = std::mem::replace(old, entry);
                    for s in old.about.ns_sels {
                        self.release_ns_selector(s);
                    }
                }
                idx
            }
            None => {
                let idx = self.policies.insert(entry);
                self.policy_index.insert(key, idx);
                if let Some(nse) = self.namespaces.get_mut(ns) {
                    nse.policies.push(idx);
                }
                idx
            }
        };
        let spans = self.policies.get(idx).map(|p| p.program.spans());
        if let Some(spans) = spans {
            if self.policy_spans.len() <= idx as usize {
                self.policy_spans
                    .resize(idx as usize + 1, Default::default());
            }
            self.policy_spans[idx as usize] = spans;
        }
        self.refresh_selection_of(idx, ns);
    }

    /// Recomputes, for every pod of namespace `ns`, whether policy `idx` selects it.
    fn refresh_selection_of(&mut self, idx: PolicyIdx, ns: NsIdx) {
        let Some(nse) = self.namespaces.get(ns) else {
            return;
        };
        for pi in nse.pods.clone() {
            let Some(pod) = self.pods.get(pi) else {
                continue;
            };
            let selected = self
                .policies
                .get(idx)
                .filter(|_| !pod.about.host_network)
                .filter(|p| {
                    self.label_sets
                        .get(pod.labels)
                        .is_some_and(|l| p.about.selector.matches(l))
                });
            let in_ingress = selected.is_some_and(|p| p.program.applies(true));
            let in_egress = selected.is_some_and(|p| p.program.applies(false));
            let (ingress, egress) = (pod.ingress, pod.egress);
            let ingress = self.with_member(ingress, idx, in_ingress);
            let egress = self.with_member(egress, idx, in_egress);
            if let Some(pod) = self.pods.get_mut(pi) {
                pod.ingress = ingress;
                pod.egress = egress;
            }
        }
    }

    /// The shared policy list `list` with `idx` in it or not; a changed list replaces (and
    /// releases) the old one.
    fn with_member(&mut self, list: u32, idx: PolicyIdx, member: bool) -> u32 {
        let Some(current) = self.policy_lists.get(list) else {
            return list;
        };
        let mut v = current.clone();
        match (v.binary_search(&idx), member) {
            (Err(at), true) => v.insert(at, idx),
            (Ok(at), false) => {
                v.remove(at);
            }
            _ => return list,
        }
        let changed = self.policy_lists.acquire(v);
        self.policy_lists.release(list);
        changed
    }

    /// Removes the NetworkPolicy (cluster, namespace, name).
    pub fn remove_policy(&mut self, cluster: &ClusterId, namespace: &str, name: &str) {
        let Some(&c) = self.cluster_index.get(cluster) else {
            return;
        };
        let Some(&ns) = self.ns_index.get(&(c, namespace.into())) else {
            return;
        };
        let Some(idx) = self.policy_index.remove(&(c, ns, name.into())) else {
            return;
        };
        let Some(old) = self.policies.remove(idx) else {
            return;
        };
        self.refresh_selection_of(idx, ns);
        for s in old.about.ns_sels {
            self.release_ns_selector(s);
        }
        if let Some(nse) = self.namespaces.get_mut(ns) {
            nse.policies.retain(|&x| x != idx);
        }
        self.release_ns(ns);
    }

    /// The pod `cluster/namespace/name`.
    pub fn pod_by_name(&self, cluster: &str, namespace: &str, name: &str) -> Option<PodId> {
        let c = *self.cluster_index.get(&ClusterId::new(cluster).ok()?)?;
        let ns = self
            .namespaces
            .get(*self.ns_index.get(&(c, namespace.into()))?)?;
        ns.pods
            .iter()
            .copied()
            .find(|&i| self.pods.get(i).is_some_and(|p| &*p.about.name == name))
            .map(PodId)
    }

    /// `cluster/namespace/name` of a pod.
    pub fn pod_name(&self, pod: PodId) -> String {
        match self.pods.get(pod.0) {
            Some(p) => format!("{}/{}", self.ns_name(p.ns), p.about.name),
            None => format!("<removed pod {}>", pod.0),
        }
    }

    fn ns_name(&self, ns: NsIdx) -> String {
        match self.namespaces.get(ns) {
            Some(n) => format!("{}/{}", self.clusters[n.cluster as usize], n.name),
            None => format!("<removed namespace {ns}>"),
        }
    }

    /// The node `pod` is scheduled on and that node's InternalIP of the family of `v6`.
    pub fn pod_node_address(&self, pod: PodId, v6: bool) -> Option<(String, IpAddr)> {
        let p = &*self.pods.get(pod.0)?.about;
        let node = p.node.as_ref()?;
        let ip = self
            .nodes
            .get(&(p.cluster, node.clone()))?
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == v6)?;
        Some((node.to_string(), ip))
    }

    /// The endpoint `pod` is on a connection of the family of `v6`: the pod itself, or for a
    /// host-network pod its node's address.
    pub fn pod_endpoint(&self, pod: PodId, v6: bool) -> Result<Endpoint, EndpointError> {
        let family = if v6 { "IPv6" } else { "IPv4" };
        let Some(p) = self.pods.get(pod.0) else {
            return Err(EndpointError::NoAddress {
                pod: self.pod_name(pod),
                family,
            });
        };
        let p = &*p.about;
        let no_address = || EndpointError::NoAddress {
            pod: self.pod_name(pod),
            family,
        };
        if p.host_network {
            let node_ips = p
                .node
                .as_ref()
                .and_then(|n| self.nodes.get(&(p.cluster, n.clone())));
            return p
                .ips
                .iter()
                .chain(node_ips.into_iter().flatten())
                .copied()
                .find(|ip| ip.is_ipv6() == v6)
                .map(Endpoint::Address)
                .ok_or_else(no_address);
        }
        if !p.owns_ips {
            if p.ips.is_empty() {
                return Err(no_address());
            }
            return Err(EndpointError::NotLive {
                pod: self.pod_name(pod),
                phase: format!("{:?}", p.phase),
            });
        }
        let ip = p
            .ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv6() == v6)
            .ok_or_else(no_address)?;
        Ok(self.address_endpoint(ip))
    }

    /// The endpoint at `ip`: its pod if exactly one live pod owns it, else an address.
    pub fn address_endpoint(&self, ip: IpAddr) -> Endpoint {
        let ip = ip.to_canonical();
        match self.ips.get(&ip).map(|o| o.as_slice()) {
            Some(&[one]) => Endpoint::Pod {
                pod: PodId(one),
                ip,
            },
            Some([_, _, ..]) => Endpoint::Ambiguous(ip),
            _ => Endpoint::Address(ip),
        }
    }

    /// The pods claiming an ambiguous address, as `cluster/namespace/name`.
    pub fn claimants(&self, ip: IpAddr) -> Vec<String> {
        let mut v: Vec<String> = self
            .ips
            .get(&ip.to_canonical())
            .into_iter()
            .flatten()
            .map(|&i| self.pod_name(PodId(i)))
            .collect();
        v.sort();
        v
    }

    /// Decides a connection: egress of the source and ingress of the destination.
    pub fn decide(&self, c: &Connection) -> Decision {
        if let (Endpoint::Pod { pod: a, .. }, Endpoint::Pod { pod: b, .. }) = (c.src, c.dst)
            && a == b
        {
            return Decision {
                egress: Direction::SelfTraffic,
                ingress: Direction::SelfTraffic,
            };
        }
        let dst_pod = match c.dst {
            Endpoint::Pod { pod, .. } => self.pods.get(pod.0),
            _ => None,
        };
        let egress = match c.src {
            Endpoint::Pod { pod, .. } => match self.pods.get(pod.0) {
                Some(p) => self.direction(p.egress, false, c.dst, dst_pod, c),
                None => Direction::NotAPod,
            },
            Endpoint::Address(_) => Direction::NotAPod,
            Endpoint::Ambiguous(_) => Direction::Ambiguous,
        };
        let ingress = match (c.dst, dst_pod) {
            (Endpoint::Pod { .. }, Some(p)) => self.direction(p.ingress, true, c.src, dst_pod, c),
            (Endpoint::Ambiguous(_), _) => Direction::Ambiguous,
            _ => Direction::NotAPod,
        };
        Decision { egress, ingress }
    }

    /// One direction: `selecting` is the shared list of the policies selecting the pod, `peer`
    /// the other end.
    #[inline]
    fn direction(
        &self,
        selecting: u32,
        ingress: bool,
        peer: Endpoint,
        dst_pod: Option<&PodEntry>,
        c: &Connection,
    ) -> Direction {
        let selecting = self
            .policy_lists
            .get(selecting)
            .map_or(&[][..], |l| l.as_slice());
        if selecting.is_empty() {
            return Direction::NotSelected;
        }
        let peer_pod = match peer {
            Endpoint::Pod { pod, .. } => self.pods.get(pod.0),
            _ => None,
        };
        let mut allowed: SmallVec<[RuleRef; 4]> = SmallVec::new();
        let q = Query {
            ingress,
            port: c.port,
            protocol: c.protocol,
            dst_ports: dst_pod
                .and_then(|d| self.port_lists.get(d.named_ports))
                .map(|p| p.as_slice()),
            peer_ip: peer.ip(),
            peer_pod: peer_pod
                .filter(|p| !self.expired_ns(p.ns))
                .and_then(|p| Some((p.ns, self.label_sets.get(p.labels)?))),
        };
        let side = usize::from(!ingress);
        for &pi in selecting {
            let admits = self
                .policy_spans
                .get(pi as usize)
                .is_some_and(|s| s[side].admits(c.port, c.protocol));
            if !admits {
                continue;
            }
            let Some(pol) = self.policies.get(pi) else {
                continue;
            };
            pol.program.admit(
                &q,
                |ns, sel| self.selection.get(ns, sel),
                |rule, peer| {
                    allowed.push(RuleRef {
                        policy: PolicyId(pi),
                        rule,
                        peer,
                    })
                },
            );
        }
        if allowed.is_empty() {
            Direction::Denied(selecting.iter().map(|&p| PolicyId(p)).collect())
        } else {
            Direction::Allowed(allowed)
        }
    }

    /// Marks a cluster's data as older than the maximum staleness (or fresh again): while
    /// expired, its pods match no selector, so allows that depend on them fail closed, while
    /// denies stay (its addresses still match ipBlocks).
    pub fn set_cluster_expired(&mut self, cluster: &ClusterId, expired: bool) {
        let c = self.cluster_idx(cluster) as usize;
        if self.expired.len() <= c {
            self.expired.resize(c + 1, false);
        }
        self.expired[c] = expired;
        self.any_expired = self.expired.iter().any(|&e| e);
    }

    /// Whether the cluster of namespace `ns` is expired.
    #[inline]
    fn expired_ns(&self, ns: NsIdx) -> bool {
        self.any_expired
            && self
                .namespaces
                .get(ns)
                .is_some_and(|n| self.expired.get(n.cluster as usize) == Some(&true))
    }

    /// The addresses of node `node` of `cluster`, as its Node object has them.
    pub fn node_addresses(&self, cluster: &ClusterId, node: &str) -> &[IpAddr] {
        self.cluster_index
            .get(cluster)
            .and_then(|&c| self.nodes.get(&(c, node.into())))
            .map_or(&[], |ips| ips.as_slice())
    }

    /// The cluster of `pod`, if it is live.
    pub fn pod_cluster(&self, pod: PodId) -> Option<&ClusterId> {
        let p = self.pods.get(pod.0)?;
        self.clusters.get(p.about.cluster as usize)
    }

    /// `cluster/namespace/name` of every NetworkPolicy, then of every IdentityPolicy, each
    /// with its kind, sorted within each kind.
    pub fn policy_list(&self) -> Vec<(&'static str, String)> {
        let mut network: Vec<String> = self
            .policies
            .iter()
            .map(|(_, p)| format!("{}/{}", self.ns_name(p.about.ns), p.about.name))
            .collect();
        network.sort();
        let mut identity: Vec<String> = self
            .identity_policies
            .iter()
            .flat_map(|(ns, entries)| {
                entries
                    .keys()
                    .map(move |name| format!("{}/{name}", self.ns_name(*ns)))
            })
            .collect();
        identity.sort();
        network
            .into_iter()
            .map(|n| ("NetworkPolicy", n))
            .chain(identity.into_iter().map(|n| ("IdentityPolicy", n)))
            .collect()
    }

    /// `cluster/namespace/name` of a policy.
    pub fn policy_name(&self, p: PolicyId) -> String {
        match self.policies.get(p.0) {
            Some(pol) => format!("{}/{}", self.ns_name(pol.about.ns), pol.about.name),
            None => format!("<removed policy {}>", p.0),
        }
    }

    /// The decision on `c` with names: what is shown and logged.
    pub fn explain(&self, c: &Connection, d: &Decision) -> Explanation {
        Explanation {
            verdict: d.verdict(),
            egress: self.explain_direction(&d.egress, false, c.src, c.dst),
            ingress: self.explain_direction(&d.ingress, true, c.dst, c.src),
        }
    }

    /// Why an allowing rule of a direction reached a pod of another cluster, if it did.
    fn cross_cluster_note(&self, r: &RuleRef, ingress: bool, peer: Endpoint) -> Option<String> {
        let Endpoint::Pod { pod, .. } = peer else {
            return None;
        };
        let peer_cluster = self.pods.get(pod.0)?.about.cluster;
        let pol = self.policies.get(r.policy.0)?;
        if self.namespaces.get(pol.about.ns)?.cluster == peer_cluster {
            return None;
        }
        let how = match pol.program.peer_kind(ingress, r.rule, r.peer)? {
            PeerKind::Every => "the rule has no peers, so it admits every cluster".to_owned(),
            PeerKind::Namespaces(sel) => {
                let names = self
                    .ns_selectors
                    .get(sel)
                    .is_some_and(|s| s.model.names_cluster());
                if names {
                    format!("peer {}'s namespaceSelector names its cluster", r.peer)
                } else {
                    format!(
                        "peer {}'s namespaceSelector names no cluster, so it matches namespaces of every cluster",
                        r.peer
                    )
                }
            }
            PeerKind::Block => format!(
                "peer {} is an ipBlock, which matches addresses of every cluster",
                r.peer
            ),
            PeerKind::Local => return None,
        };
        Some(format!(
            "{} rule {} admits {} of another cluster: {how}",
            self.policy_name(r.policy),
            r.rule,
            self.pod_name(pod)
        ))
    }

    /// One direction, whose own end is `own` and other end `peer`.
    fn explain_direction(
        &self,
        d: &Direction,
        ingress: bool,
        own: Endpoint,
        peer: Endpoint,
    ) -> DirectionExplanation {
        let mut policies = Vec::new();
        let mut rules = Vec::new();
        let mut notes = Vec::new();
        let why = match d {
            Direction::SelfTraffic => Why::SelfTraffic,
            Direction::NotAPod => Why::NotAPod,
            Direction::NotSelected => Why::NotSelected,
            Direction::Ambiguous => {
                notes.push(format!(
                    "address {} is claimed by {}: it matches none of them",
                    own.ip(),
                    self.claimants(own.ip()).join(", ")
                ));
                Why::Ambiguous
            }
            Direction::Denied(ps) => {
                policies = ps.iter().map(|&p| self.policy_name(p)).collect();
                if let Endpoint::Pod { pod, .. } = peer
                    && let Some(p) = self.pods.get(pod.0)
                    && self.expired_ns(p.ns)
                {
                    notes.push(format!(
                        "{} is of cluster {}, whose data is older than the maximum staleness: it matches no selector",
                        self.pod_name(pod),
                        self.clusters[p.about.cluster as usize]
                    ));
                }
                Why::Denied
            }
            Direction::Allowed(rs) => {
                let mut named: Vec<(String, u32, Option<String>)> = rs
                    .iter()
                    .map(|r| {
                        let note = self.cross_cluster_note(r, ingress, peer);
                        (self.policy_name(r.policy), r.rule, note)
                    })
                    .collect();
                named.sort();
                for (p, r, note) in named {
                    rules.push(format!("{p} rule {r}"));
                    policies.push(p);
                    notes.extend(note);
                }
                Why::Allowed
            }
        };
        policies.sort();
        policies.dedup();
        DirectionExplanation {
            verdict: if d.allows() {
                Verdict::Allow
            } else {
                Verdict::Deny
            },
            why,
            policies,
            rules,
            notes,
        }
    }

    /// The labels of a namespace as the engine holds them (for tests and the admin view).
    pub fn namespace_labels(&self, cluster: &ClusterId, name: &str) -> Option<Labels> {
        let c = *self.cluster_index.get(cluster)?;
        let ns = self
            .namespaces
            .get(*self.ns_index.get(&(c, name.into()))?)?;
        let resolve = |s: Sym| self.interner.resolve(s).to_owned();
        Some(
            ns.labels
                .iter()
                .map(|(k, v)| (resolve(k), resolve(v)))
                .collect(),
        )
    }
}
