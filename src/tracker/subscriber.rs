//! Who a subscriber is and what it may ask for. With mutual TLS, who it is comes from the
//! SPIFFE id of its client certificate, never from what its request claims:
//!
//! - `spiffe://TD/weft/cluster/CLUSTER/node/NODE`: a node agent, which gets its own cluster's
//!   policies only (policies are local);
//! - `spiffe://TD/weft/cluster/CLUSTER/nodes`: any node agent of the cluster, the same: one
//!   certificate that a DaemonSet mounts on every node (what a node gets does not depend on
//!   which node it is; what proves a node to the CA is its own token);
//! - `spiffe://TD/weft/cluster/CLUSTER/ca`: the cluster's CA, which gets its own cluster's
//!   policies only, as a node does;
//! - `spiffe://TD/weft/cluster/CLUSTER/tracker`: a spoke tracker, which gets the whole view;
//! - `spiffe://TD/weft/admin/NAME`: an operator's tool (`weft policy check --tracker`), which
//!   gets the whole view.
//!
//! Without TLS (`--insecure`) the request's claims are all there is.

use spiffe::SpiffeId;

use super::view::Scope;
use super::wire::pb;
use crate::model::ClusterId;

/// Why a subscriber is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscriberError {
    /// The client certificate carries no usable SPIFFE id.
    #[error("client certificate: {0}")]
    Certificate(String),
    /// The SPIFFE id names no kind of subscriber weft knows.
    #[error(
        "client certificate {id}: not a weft subscriber (expected /weft/cluster/CLUSTER/node/NODE, /weft/cluster/CLUSTER/nodes, /weft/cluster/CLUSTER/ca, /weft/cluster/CLUSTER/tracker or /weft/admin/NAME)"
    )]
    UnknownIdentity {
        /// The SPIFFE id.
        id: String,
    },
    /// A part of the SPIFFE id is not valid.
    #[error("client certificate {id}: {error}")]
    BadIdentity {
        /// The SPIFFE id.
        id: String,
        /// Why.
        error: String,
    },
    /// The request claims to be someone the certificate does not say.
    #[error("{who} may not subscribe as {field} {claimed:?}")]
    Impersonation {
        /// Who the certificate says.
        who: String,
        /// The claimed field (`node` or `cluster`).
        field: &'static str,
        /// What the request claims.
        claimed: String,
    },
    /// The subscriber may not see what it asks for.
    #[error("{who} may not ask for {what}")]
    Forbidden {
        /// Who the certificate says.
        who: String,
        /// What it asked for.
        what: &'static str,
    },
    /// The request itself is malformed.
    #[error("{field}: {error}")]
    BadRequest {
        /// The field.
        field: &'static str,
        /// Why.
        error: String,
    },
}

/// A subscriber as its certificate proves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscriber {
    /// A node agent of a cluster.
    Node {
        /// Its cluster.
        cluster: ClusterId,
        /// Its node's name, or `None` for any node agent of the cluster.
        node: Option<String>,
    },
    /// The CA of a cluster.
    Ca {
        /// Its cluster.
        cluster: ClusterId,
    },
    /// A spoke tracker of a cluster.
    Tracker {
        /// Its cluster.
        cluster: ClusterId,
    },
    /// An operator's tool.
    Admin {
        /// Its name.
        name: String,
    },
}

impl std::fmt::Display for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subscriber::Node {
                cluster,
                node: Some(node),
            } => write!(f, "node {node} of cluster {cluster}"),
            Subscriber::Node {
                cluster,
                node: None,
            } => write!(f, "a node agent of cluster {cluster}"),
            Subscriber::Ca { cluster } => write!(f, "the CA of cluster {cluster}"),
            Subscriber::Tracker { cluster } => write!(f, "the tracker of cluster {cluster}"),
            Subscriber::Admin { name } => write!(f, "admin {name}"),
        }
    }
}

/// A node name: a DNS subdomain, as Kubernetes requires.
pub(crate) fn node_name(name: &str) -> Result<(), String> {
    crate::model::labels::validate_dns_subdomain(name)
        .map_err(|_| format!("{name:?} is not a valid node name (a lowercase DNS subdomain)"))
}

impl Subscriber {
    /// The subscriber a SPIFFE id names.
    pub fn from_spiffe_id(id: &SpiffeId) -> Result<Self, SubscriberError> {
        let bad = |error: String| SubscriberError::BadIdentity {
            id: id.to_string(),
            error,
        };
        let cluster = |s: &str| ClusterId::new(s).map_err(|e| bad(format!("cluster: {e}")));
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        match segments.as_slice() {
            ["weft", "cluster", c, "node", node] => {
                node_name(node).map_err(bad)?;
                Ok(Subscriber::Node {
                    cluster: cluster(c)?,
                    node: Some((*node).to_owned()),
                })
            }
            ["weft", "cluster", c, "nodes"] => Ok(Subscriber::Node {
                cluster: cluster(c)?,
                node: None,
            }),
            ["weft", "cluster", c, "ca"] => Ok(Subscriber::Ca {
                cluster: cluster(c)?,
            }),
            ["weft", "cluster", c, "tracker"] => Ok(Subscriber::Tracker {
                cluster: cluster(c)?,
            }),
            ["weft", "admin", name] => Ok(Subscriber::Admin {
                name: (*name).to_owned(),
            }),
            _ => Err(SubscriberError::UnknownIdentity { id: id.to_string() }),
        }
    }

    /// The subscriber a client certificate (DER, already verified by TLS) names: exactly one
    /// SPIFFE id in its URI SANs.
    pub fn from_certificate(der: &[u8]) -> Result<Self, SubscriberError> {
        let id = spiffe::cert::spiffe_id_from_der(der)
            .map_err(|e| SubscriberError::Certificate(e.to_string()))?;
        Self::from_spiffe_id(&id)
    }

    /// What this subscriber gets for `request`: a node agent its own cluster's policies only,
    /// and only as itself (any node of its cluster for the cluster-wide identity); a tracker or
    /// an admin whatever scope it asks for.
    pub fn authorize(&self, request: &pb::SubscribeRequest) -> Result<Scope, SubscriberError> {
        let asked = policy_scope(request)?;
        let impersonation = |field, claimed: &str| SubscriberError::Impersonation {
            who: self.to_string(),
            field,
            claimed: claimed.to_owned(),
        };
        match self {
            Subscriber::Node { cluster, node } => {
                if node
                    .as_ref()
                    .is_some_and(|node| !request.node.is_empty() && request.node != *node)
                {
                    return Err(impersonation("node", &request.node));
                }
                self.own_cluster(cluster, request, asked)
            }
            // A CA is no node.
            Subscriber::Ca { cluster } => {
                if !request.node.is_empty() {
                    return Err(impersonation("node", &request.node));
                }
                self.own_cluster(cluster, request, asked)
            }
            Subscriber::Tracker { cluster } => {
                if !request.cluster.is_empty() && request.cluster != cluster.as_str() {
                    return Err(impersonation("cluster", &request.cluster));
                }
                scope_as_claimed(request, asked)
            }
            Subscriber::Admin { .. } => scope_as_claimed(request, asked),
        }
    }
}

impl Subscriber {
    /// The scope of a subscriber of `cluster` that gets its own cluster's policies only, if
    /// `request` claims no other cluster and asks for no more.
    fn own_cluster(
        &self,
        cluster: &ClusterId,
        request: &pb::SubscribeRequest,
        asked: pb::PolicyScope,
    ) -> Result<Scope, SubscriberError> {
        if !request.cluster.is_empty() && request.cluster != cluster.as_str() {
            return Err(SubscriberError::Impersonation {
                who: self.to_string(),
                field: "cluster",
                claimed: request.cluster.clone(),
            });
        }
        if asked == pb::PolicyScope::AllClusters {
            return Err(SubscriberError::Forbidden {
                who: self.to_string(),
                what: "the policies of every cluster",
            });
        }
        Ok(Scope::Cluster(cluster.clone()))
    }
}

/// The request's policy scope, once its claims are well formed (a node name, a cluster id,
/// each possibly empty), whatever the scope.
fn policy_scope(request: &pb::SubscribeRequest) -> Result<pb::PolicyScope, SubscriberError> {
    if !request.node.is_empty() {
        node_name(&request.node).map_err(|error| SubscriberError::BadRequest {
            field: "node",
            error,
        })?;
    }
    if !request.cluster.is_empty() {
        ClusterId::new(&request.cluster).map_err(|e| SubscriberError::BadRequest {
            field: "cluster",
            error: e.to_string(),
        })?;
    }
    pb::PolicyScope::try_from(request.policy_scope).map_err(|_| SubscriberError::BadRequest {
        field: "policy_scope",
        error: format!("unknown value {}", request.policy_scope),
    })
}

fn scope_as_claimed(
    request: &pb::SubscribeRequest,
    asked: pb::PolicyScope,
) -> Result<Scope, SubscriberError> {
    match asked {
        pb::PolicyScope::AllClusters => Ok(Scope::AllClusters),
        pb::PolicyScope::OwnCluster => ClusterId::new(&request.cluster)
            .map(Scope::Cluster)
            .map_err(|e| SubscriberError::BadRequest {
                field: "cluster",
                error: e.to_string(),
            }),
    }
}

/// The scope of an unauthenticated subscriber (plaintext): what its request claims.
pub fn claimed_scope(request: &pb::SubscribeRequest) -> Result<Scope, SubscriberError> {
    scope_as_claimed(request, policy_scope(request)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Result<Subscriber, SubscriberError> {
        Subscriber::from_spiffe_id(&SpiffeId::new(s).expect("spiffe id"))
    }

    fn request(node: &str, cluster: &str, scope: pb::PolicyScope) -> pb::SubscribeRequest {
        pb::SubscribeRequest {
            node: node.into(),
            cluster: cluster.into(),
            policy_scope: scope.into(),
            resume: None,
        }
    }

    #[test]
    fn identities_from_spiffe_ids() {
        assert_eq!(
            id("spiffe://c1.weft/weft/cluster/cluster-1/node/node-a"),
            Ok(Subscriber::Node {
                cluster: ClusterId::new("cluster-1").expect("id"),
                node: Some("node-a".into())
            })
        );
        assert_eq!(
            id("spiffe://c1.weft/weft/cluster/cluster-1/nodes"),
            Ok(Subscriber::Node {
                cluster: ClusterId::new("cluster-1").expect("id"),
                node: None
            })
        );
        assert!(matches!(
            id("spiffe://c1.weft/weft/cluster/cluster-1/tracker"),
            Ok(Subscriber::Tracker { .. })
        ));
        assert!(matches!(
            id("spiffe://c1.weft/weft/admin/alice"),
            Ok(Subscriber::Admin { .. })
        ));
        for unknown in [
            "spiffe://c1.weft/ns/default/sa/web",
            "spiffe://c1.weft/weft/cluster/cluster-1/node",
            "spiffe://c1.weft/weft/cluster/cluster-1/node/a/b",
            "spiffe://c1.weft/weft/cluster/cluster-1/nodes/a",
            "spiffe://c1.weft",
        ] {
            assert!(
                matches!(id(unknown), Err(SubscriberError::UnknownIdentity { .. })),
                "{unknown}"
            );
        }
        for bad in [
            "spiffe://c1.weft/weft/cluster/-c1/node/a",
            "spiffe://c1.weft/weft/cluster/c1/node/-a",
            "spiffe://c1.weft/weft/cluster/c1/node/A",
        ] {
            let e = id(bad).expect_err(bad);
            assert!(matches!(e, SubscriberError::BadIdentity { .. }), "{bad}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn a_node_gets_its_own_cluster_only_and_only_as_itself() {
        let node = id("spiffe://c1.weft/weft/cluster/cluster-1/node/node-a").expect("node");
        let own = Scope::Cluster(ClusterId::new("cluster-1").expect("id"));
        use pb::PolicyScope::{AllClusters, OwnCluster};
        assert_eq!(
            node.authorize(&request("", "", OwnCluster)),
            Ok(own.clone())
        );
        assert_eq!(
            node.authorize(&request("node-a", "cluster-1", OwnCluster)),
            Ok(own)
        );
        let e = node
            .authorize(&request("node-b", "cluster-1", OwnCluster))
            .expect_err("another node");
        assert_eq!(
            e.to_string(),
            "node node-a of cluster cluster-1 may not subscribe as node \"node-b\""
        );
        assert!(matches!(
            node.authorize(&request("node-a", "cluster-2", OwnCluster)),
            Err(SubscriberError::Impersonation {
                field: "cluster",
                ..
            })
        ));
        assert!(matches!(
            node.authorize(&request("", "", AllClusters)),
            Err(SubscriberError::Forbidden { .. })
        ));
        let mut unknown = request("", "", OwnCluster);
        unknown.policy_scope = 7;
        assert!(matches!(
            node.authorize(&unknown),
            Err(SubscriberError::BadRequest {
                field: "policy_scope",
                ..
            })
        ));
    }

    #[test]
    fn the_cluster_wide_agent_identity_is_any_node_of_its_cluster_and_no_more() {
        use pb::PolicyScope::{AllClusters, OwnCluster};
        let agents = id("spiffe://c1.weft/weft/cluster/cluster-1/nodes").expect("agents");
        let own = Scope::Cluster(ClusterId::new("cluster-1").expect("id"));
        for node in ["", "node-a", "node-b"] {
            assert_eq!(
                agents.authorize(&request(node, "cluster-1", OwnCluster)),
                Ok(own.clone()),
                "{node}"
            );
        }
        let e = agents
            .authorize(&request("node-a", "cluster-2", OwnCluster))
            .expect_err("another cluster");
        assert_eq!(
            e.to_string(),
            "a node agent of cluster cluster-1 may not subscribe as cluster \"cluster-2\""
        );
        assert!(matches!(
            agents.authorize(&request("node-a", "", AllClusters)),
            Err(SubscriberError::Forbidden { .. })
        ));
        assert!(matches!(
            agents.authorize(&request("Node_A", "", OwnCluster)),
            Err(SubscriberError::BadRequest { field: "node", .. })
        ));
    }

    #[test]
    fn a_ca_gets_its_own_cluster_and_is_no_node() {
        use pb::PolicyScope::{AllClusters, OwnCluster};
        let ca = id("spiffe://c1.weft/weft/cluster/cluster-1/ca").expect("ca");
        assert_eq!(ca.to_string(), "the CA of cluster cluster-1");
        assert_eq!(
            ca.authorize(&request("", "cluster-1", OwnCluster)),
            Ok(Scope::Cluster(ClusterId::new("cluster-1").expect("id")))
        );
        assert!(matches!(
            ca.authorize(&request("node-a", "cluster-1", OwnCluster)),
            Err(SubscriberError::Impersonation { field: "node", .. })
        ));
        assert!(matches!(
            ca.authorize(&request("", "cluster-2", OwnCluster)),
            Err(SubscriberError::Impersonation {
                field: "cluster",
                ..
            })
        ));
        assert!(matches!(
            ca.authorize(&request("", "", AllClusters)),
            Err(SubscriberError::Forbidden { .. })
        ));
    }

    #[test]
    fn trackers_and_admins_choose_their_scope() {
        use pb::PolicyScope::{AllClusters, OwnCluster};
        let spoke = id("spiffe://c2.weft/weft/cluster/cluster-2/tracker").expect("spoke");
        assert_eq!(
            spoke.authorize(&request("", "", AllClusters)),
            Ok(Scope::AllClusters)
        );
        assert!(matches!(
            spoke.authorize(&request("", "cluster-1", AllClusters)),
            Err(SubscriberError::Impersonation { .. })
        ));
        let admin = id("spiffe://c1.weft/weft/admin/alice").expect("admin");
        assert_eq!(
            admin.authorize(&request("", "cluster-2", OwnCluster)),
            Ok(Scope::Cluster(ClusterId::new("cluster-2").expect("id")))
        );
        assert!(matches!(
            claimed_scope(&request("", "Not A Cluster", OwnCluster)),
            Err(SubscriberError::BadRequest {
                field: "cluster",
                ..
            })
        ));
        // Claims are checked whatever the scope, also by whom they cannot fool.
        for (node, cluster, field) in [
            ("a\nforged log line", "", "node"),
            ("", "c1\u{0}", "cluster"),
        ] {
            for who in [&admin, &spoke] {
                assert!(matches!(
                    who.authorize(&request(node, cluster, AllClusters)),
                    Err(SubscriberError::BadRequest { field: f, .. }) if f == field
                ));
            }
            assert!(matches!(
                claimed_scope(&request(node, cluster, AllClusters)),
                Err(SubscriberError::BadRequest { field: f, .. }) if f == field
            ));
        }
    }
}
