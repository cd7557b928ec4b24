//! The clusterset: every cluster's objects, keyed as the API keys them.

use std::collections::BTreeMap;

use super::{
    ClusterId, ClusterSettings, EndpointSlice, IdentityPolicy, Namespace, NetworkPolicy, Node, Pod,
    Service,
};

/// One cluster's objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Its id.
    pub id: ClusterId,
    /// Its settings.
    pub settings: ClusterSettings,
    /// Namespaces by name (declared and implied).
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by uid.
    pub pods: BTreeMap<String, Pod>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// NetworkPolicies by (namespace, name).
    pub policies: BTreeMap<(String, String), NetworkPolicy>,
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// EndpointSlices by (namespace, name).
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    /// IdentityPolicies by (namespace, name).
    pub identity_policies: BTreeMap<(String, String), IdentityPolicy>,
}

impl Cluster {
    /// An empty cluster.
    pub fn new(id: ClusterId, settings: ClusterSettings) -> Self {
        Self {
            id,
            settings,
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            policies: BTreeMap::new(),
            services: BTreeMap::new(),
            endpoint_slices: BTreeMap::new(),
            identity_policies: BTreeMap::new(),
        }
    }

    /// The pod named `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

/// Every cluster of the set, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSet {
    /// Clusters by id.
    pub clusters: BTreeMap<ClusterId, Cluster>,
}

impl ClusterSet {
    /// All pods of all clusters.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.clusters.values().flat_map(|c| c.pods.values())
    }

    /// All namespaces of all clusters.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.clusters.values().flat_map(|c| c.namespaces.values())
    }

    /// All NetworkPolicies of all clusters.
    pub fn policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.clusters.values().flat_map(|c| c.policies.values())
    }

    /// All IdentityPolicies of all clusters.
    pub fn identity_policies(&self) -> impl Iterator<Item = &IdentityPolicy> {
        self.clusters
            .values()
            .flat_map(|c| c.identity_policies.values())
    }

    /// All nodes of all clusters.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.clusters.values().flat_map(|c| c.nodes.values())
    }
}
