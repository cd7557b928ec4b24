//! What of the global view concerns one node: its live pods (those that own their addresses;
//! host-network pods count as the node), the workload identities they run as, and the
//! addresses capture covers — with the difference from one view to the next, so that the
//! identity manager and the nftables sets are updated incrementally. And readiness: the node's
//! own cluster synced and a certificate for every local identity.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::identity::WorkloadId;
use crate::identity::manager::IdentityManager;
use crate::model::ClusterId;
use crate::policy::PodId;
use crate::tracker::replica::Replica;

/// The pods of one node as the view has them now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Local {
    /// The identities the node's live pods run as.
    pub identities: BTreeSet<WorkloadId>,
    /// The addresses the node's live pods own.
    pub addresses: BTreeSet<IpAddr>,
}

/// What changed between two views of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalChange {
    /// Addresses to add to capture.
    pub added: Vec<IpAddr>,
    /// Addresses to take out of capture.
    pub removed: Vec<IpAddr>,
    /// Whether the set of identities changed.
    pub identities_changed: bool,
}

impl Local {
    /// Node `node` of `cluster` in `replica`. A pod whose identity cannot be formed (its
    /// cluster's trust domain or its names invalid) gets no certificate and is logged; its
    /// addresses are still captured, so that its traffic is judged, never passed unseen.
    pub fn of(replica: &Replica, cluster: &ClusterId, node: &str) -> Self {
        let mut local = Local::default();
        let trust_domain = replica
            .engine()
            .trust_domain(cluster)
            .and_then(|td| crate::identity::id::trust_domain(&td).ok());
        for pod in replica.pods_on_node(cluster, node).filter(|p| p.owns_ips()) {
            local.addresses.extend(pod.ips.iter().copied());
            match trust_domain
                .as_ref()
                .map(|td| WorkloadId::new(td, &pod.namespace, &pod.service_account))
            {
                Some(Ok(id)) => {
                    local.identities.insert(id);
                }
                Some(Err(e)) => {
                    tracing::warn!(pod = %pod.name, namespace = %pod.namespace, error = %e, "pod without an identity");
                }
                None => {
                    tracing::warn!(%cluster, "no valid trust domain for the node's cluster");
                }
            }
        }
        local
    }

    /// What changed from `self` to `next`.
    pub fn change_to(&self, next: &Local) -> LocalChange {
        LocalChange {
            added: next
                .addresses
                .difference(&self.addresses)
                .copied()
                .collect(),
            removed: self
                .addresses
                .difference(&next.addresses)
                .copied()
                .collect(),
            identities_changed: self.identities != next.identities,
        }
    }
}

/// `Err` with the reason until the view of `cluster` is complete: nothing a node does may rest
/// on half a view.
pub fn view_complete(replica: &Replica, cluster: &ClusterId) -> Result<(), String> {
    match replica.clusters().find(|s| s.cluster == cluster.as_str()) {
        Some(s) if s.synced => Ok(()),
        Some(_) => Err(format!("cluster {cluster} is not synced yet")),
        None => Err(format!("no view of cluster {cluster} yet")),
    }
}

/// The live pod of node `node` of `cluster` that owns `ip`, if any.
pub fn local_pod(replica: &Replica, cluster: &ClusterId, node: &str, ip: IpAddr) -> Option<PodId> {
    replica
        .pods_on_node(cluster, node)
        .find(|p| p.owns_ips() && p.ips.contains(&ip))
        .and_then(|p| {
            replica
                .engine()
                .pod_by_name(cluster.as_str(), &p.namespace, &p.name)
        })
}

/// `Err` with the reason until the node may take traffic: its own cluster synced in the view
/// (a half-synced view never answers "no policy, allow") and a certificate in hand for every
/// local identity.
pub fn ready(
    replica: &Replica,
    cluster: &ClusterId,
    local: &Local,
    identities: &IdentityManager,
) -> Result<(), String> {
    view_complete(replica, cluster)?;
    let missing: Vec<String> = local
        .identities
        .iter()
        .filter(|id| identities.certificate(id).is_none())
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("no certificate yet for {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{pod_on, replica, status};
    use super::*;
    use crate::identity::manager::{Authority, AuthorityFuture, Renewal};
    use crate::tracker::view::{Change, View};

    fn c(s: &str) -> ClusterId {
        ClusterId::new(s).expect("id")
    }

    /// A pod of no particular app.
    fn pod(
        name: &str,
        node: &str,
        sa: &str,
        phase: &str,
        ip: &str,
        host: bool,
    ) -> crate::tracker::wire::Object {
        pod_on(name, node, "any", sa, phase, ip, host)
    }

    /// An authority that never answers: certificates never arrive.
    struct Silent;

    impl Authority for Silent {
        fn sign<'a>(
            &'a self,
            _: Vec<u8>,
            _: &'a WorkloadId,
            _: std::time::Duration,
        ) -> AuthorityFuture<'a> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn the_nodes_live_pods_their_identities_and_addresses() {
        let mut view = View::new("e", 100);
        view.apply(Change {
            upserts: vec![
                pod("web-1", "node-a", "web", "Running", "10.0.0.1", false),
                pod("web-2", "node-a", "web", "Pending", "10.0.0.2", false),
                pod("db-1", "node-a", "db", "Running", "10.0.0.3", false),
                pod("done", "node-a", "batch", "Succeeded", "10.0.0.4", false),
                pod("agent", "node-a", "agent", "Running", "192.168.0.1", true),
                pod("other", "node-b", "other", "Running", "10.0.1.1", false),
            ],
            clusters: vec![status(false, "prod.example")],
            ..Change::default()
        });
        let r = replica(&view);
        let local = Local::of(&r, &c("cluster-1"), "node-a");
        let ids: Vec<String> = local.identities.iter().map(ToString::to_string).collect();
        assert_eq!(
            ids,
            [
                "spiffe://prod.example/ns/demo/sa/db",
                "spiffe://prod.example/ns/demo/sa/web"
            ]
        );
        let addrs: Vec<String> = local.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);

        let manager = IdentityManager::new(std::sync::Arc::new(Silent), Renewal::default());
        let e = ready(&r, &c("cluster-1"), &local, &manager).expect_err("unsynced");
        assert_eq!(e, "cluster cluster-1 is not synced yet");

        // Synced, a pod gone and one added: the difference is what capture must change.
        let d = view
            .apply(Change {
                upserts: vec![pod("web-3", "node-a", "web", "Running", "10.0.0.5", false)],
                deletes: vec![pod("db-1", "node-a", "db", "Running", "10.0.0.3", false).key()],
                clusters: vec![status(true, "prod.example")],
                ..Change::default()
            })
            .expect("a change");
        let mut r = r;
        r.apply((*d).clone()).expect("delta");
        let next = Local::of(&r, &c("cluster-1"), "node-a");
        let change = local.change_to(&next);
        assert_eq!(change.added, ["10.0.0.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(change.removed, ["10.0.0.3".parse::<IpAddr>().expect("ip")]);
        assert!(change.identities_changed, "db left");
        let e = ready(&r, &c("cluster-1"), &next, &manager).expect_err("no certificate");
        assert_eq!(
            e,
            "no certificate yet for spiffe://prod.example/ns/demo/sa/web"
        );
        assert_eq!(
            ready(&r, &c("cluster-1"), &Local::default(), &manager),
            Ok(()),
            "a synced node with no pod of its own"
        );
        assert_eq!(
            ready(&r, &c("cluster-2"), &next, &manager),
            Err("no view of cluster cluster-2 yet".into())
        );
    }
}
