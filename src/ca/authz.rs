//! Whether a node may have a certificate for an identity, decided on the global view: the
//! identity must be of this CA's trust domain and the service account of a Running pod of
//! this CA's cluster scheduled on that node. The same namespace and service account in another
//! cluster, or on another node, does not count; neither does a pod gone from the view. A view
//! not yet whole (not every cluster synced) decides nothing.

use std::sync::{Arc, RwLock};

use spiffe::TrustDomain;

use crate::identity::WorkloadId;
use crate::model::{ClusterId, PodPhase};
use crate::tracker::replica::Replica;

/// Why a node may not have a certificate for an identity.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    /// The view is not whole yet: nothing is decided on half a view.
    #[error("the view of the clusters is not complete yet ({0}); try again")]
    NotReady(String),
    /// The identity is of another trust domain.
    #[error("{id} is not of this CA's trust domain {trust_domain}")]
    TrustDomain {
        /// The identity.
        id: String,
        /// This CA's.
        trust_domain: String,
    },
    /// No Running pod of this cluster on the node has the identity.
    #[error("node {node} of cluster {cluster} runs no pod with service account {id}")]
    NoPod {
        /// The node.
        node: String,
        /// This CA's cluster.
        cluster: String,
        /// The identity.
        id: String,
    },
}

/// The pod that entitles a node to an identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entitled {
    /// Its name.
    pub pod: String,
    /// Its uid.
    pub uid: String,
}

/// Decides, for this CA's cluster and trust domain, on a view kept by the tracker client.
#[derive(Debug, Clone)]
pub struct Authorizer {
    cluster: ClusterId,
    trust_domain: TrustDomain,
    view: Arc<RwLock<Replica>>,
}

impl Authorizer {
    /// Decides for `cluster`, whose identities are in `trust_domain`, on `view`.
    pub fn new(cluster: ClusterId, trust_domain: TrustDomain, view: Arc<RwLock<Replica>>) -> Self {
        Self {
            cluster,
            trust_domain,
            view,
        }
    }

    /// This CA's cluster.
    pub fn cluster(&self) -> &ClusterId {
        &self.cluster
    }

    /// `Err` with the reason while the view is not complete enough to decide on.
    pub fn ready(&self) -> Result<(), String> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        if view.ready() {
            return Ok(());
        }
        let unsynced: Vec<String> = view.unsynced().iter().map(|c| c.to_string()).collect();
        Err(if unsynced.is_empty() {
            "no complete snapshot from the tracker".into()
        } else {
            format!("clusters {} not synced", unsynced.join(", "))
        })
    }

    /// A Running pod of this cluster on `node` whose service account is `id`, if any.
    pub fn authorize(&self, node: &str, id: &WorkloadId) -> Result<Entitled, AuthzError> {
        if id.trust_domain() != self.trust_domain.as_str() {
            return Err(AuthzError::TrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        self.ready().map_err(AuthzError::NotReady)?;
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.pods_with_account(&self.cluster, node, id.namespace(), id.service_account())
            .find(|p| p.phase == PodPhase::Running)
            .map(|p| Entitled {
                pod: p.name.clone(),
                uid: p.uid.clone(),
            })
            .ok_or_else(|| AuthzError::NoPod {
                node: node.to_owned(),
                cluster: self.cluster.to_string(),
                id: id.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pod;
    use crate::tracker::view::{Change, Scope, View};
    use crate::tracker::wire::{Object, pb};

    fn pod(cluster: &str, name: &str, node: &str, sa: &str, phase: &str) -> Object {
        let cluster = ClusterId::new(cluster).expect("cluster");
        Object::Pod(
            Pod::from_api(
                &cluster,
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name, "namespace": "demo", "uid": format!("{cluster}-{name}")},
                    "spec": {"nodeName": node, "serviceAccountName": sa, "containers": []},
                    "status": {"phase": phase}}))
                .expect("pod"),
            )
            .expect("valid"),
        )
    }

    fn status(cluster: &str, synced: bool) -> pb::ClusterStatus {
        pb::ClusterStatus {
            cluster: cluster.into(),
            synced,
            connected: true,
            ..Default::default()
        }
    }

    fn authorizer(upserts: Vec<Object>, clusters: Vec<pb::ClusterStatus>) -> Authorizer {
        let mut view = View::new("e1", 10);
        view.apply(Change {
            upserts,
            clusters,
            ..Change::default()
        });
        let mut replica = Replica::new();
        for p in view.snapshot(&Scope::AllClusters, 1 << 20) {
            replica.apply(p).expect("part");
        }
        Authorizer::new(
            ClusterId::new("c1").expect("cluster"),
            TrustDomain::new("c1.weft").expect("td"),
            Arc::new(RwLock::new(replica)),
        )
    }

    fn id(s: &str) -> WorkloadId {
        WorkloadId::parse(s).expect("id")
    }

    #[test]
    fn only_a_running_pod_of_this_cluster_on_the_node_entitles_it() {
        let a = authorizer(
            vec![
                pod("c1", "web-1", "n1", "web", "Running"),
                pod("c1", "db-1", "n2", "db", "Running"),
                pod("c1", "job-1", "n1", "job", "Succeeded"),
                pod("c1", "new-1", "n1", "new", "Pending"),
                pod("c2", "api-1", "n1", "api", "Running"),
            ],
            vec![status("c1", true), status("c2", true)],
        );
        assert_eq!(
            a.authorize("n1", &id("spiffe://c1.weft/ns/demo/sa/web")),
            Ok(Entitled {
                pod: "web-1".into(),
                uid: "c1-web-1".into()
            })
        );
        for (node, asked) in [
            ("n1", "spiffe://c1.weft/ns/demo/sa/db"),  // on another node
            ("n1", "spiffe://c1.weft/ns/demo/sa/job"), // finished
            ("n1", "spiffe://c1.weft/ns/demo/sa/new"), // not running yet
            ("n1", "spiffe://c1.weft/ns/demo/sa/api"), // in the other cluster
            ("n1", "spiffe://c1.weft/ns/other/sa/web"), // another namespace
            ("n3", "spiffe://c1.weft/ns/demo/sa/web"), // a node with no pods
        ] {
            assert!(
                matches!(a.authorize(node, &id(asked)), Err(AuthzError::NoPod { .. })),
                "{node} {asked}"
            );
        }
        assert!(matches!(
            a.authorize("n1", &id("spiffe://c2.weft/ns/demo/sa/web")),
            Err(AuthzError::TrustDomain { .. })
        ));
    }

    #[test]
    fn half_a_view_decides_nothing() {
        let a = authorizer(
            vec![pod("c1", "web-1", "n1", "web", "Running")],
            vec![status("c1", true), status("c2", false)],
        );
        let e = a
            .authorize("n1", &id("spiffe://c1.weft/ns/demo/sa/web"))
            .expect_err("c2 not synced");
        assert_eq!(
            e.to_string(),
            "the view of the clusters is not complete yet (clusters c2 not synced); try again"
        );
        let empty = Authorizer::new(
            ClusterId::new("c1").expect("cluster"),
            TrustDomain::new("c1.weft").expect("td"),
            Arc::default(),
        );
        assert!(matches!(
            empty.authorize("n1", &id("spiffe://c1.weft/ns/demo/sa/web")),
            Err(AuthzError::NotReady(_))
        ));
    }
}
