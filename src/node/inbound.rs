//! The inbound admission of a node's HBONE server: a tunnel is admitted only to a pod of this
//! node (anything else is a 400 and nothing is dialled), only from a source pod that runs as
//! the identity its peer proved (never another pod's labels on that identity's word), and only
//! when the NetworkPolicies and the identity rules allow it — all decided before any dial, on
//! a view that is complete for this node's cluster.

use std::sync::{Arc, RwLock};

use http::StatusCode;

use super::local::{local_pod, view_complete};
use crate::identity::TrustStore;
use crate::identity::verify::PeerSide;
use crate::model::{ClusterId, Protocol};
use crate::policy::{Connection, Endpoint, Verdict};
use crate::proxy::{Admission, Inbound, Peer, Refusal};
use crate::tracker::replica::Replica;

/// Decides inbound tunnels for node `node` of `cluster` on the view `view`.
#[derive(Debug, Clone)]
pub struct NodeAdmission {
    view: Arc<RwLock<Replica>>,
    cluster: ClusterId,
    node: String,
    trust: TrustStore,
}

impl NodeAdmission {
    /// Admission for `node` of `cluster`, deciding on `view`; a tunnel's connection closes once
    /// its peer is no longer trusted by `trust`.
    pub fn new(
        view: Arc<RwLock<Replica>>,
        cluster: ClusterId,
        node: &str,
        trust: TrustStore,
    ) -> Self {
        Self {
            view,
            cluster,
            node: node.to_owned(),
            trust,
        }
    }

    /// The decision for one tunnel.
    pub fn decide(&self, inbound: &Inbound) -> Result<(), Refusal> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view_complete(&view, &self.cluster).map_err(|reason| Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason,
        })?;
        let engine = view.engine();
        let to = inbound.destination;
        let local = local_pod(&view, &self.cluster, &self.node, to.ip()).ok_or_else(|| {
            Refusal::bad_request(format!("{} is not a pod of this node", to.ip()))
        })?;
        let source = engine.address_endpoint(inbound.source);
        let Endpoint::Pod { pod: from, .. } = source else {
            return Err(Refusal::forbidden(format!(
                "source {} is no single live pod",
                inbound.source
            )));
        };
        // THREATS 2: the claimed source pod must run as the proven identity.
        let runs_as = engine.pod_identity(from);
        if runs_as.as_ref() != Some(&inbound.peer) {
            return Err(Refusal::forbidden(format!(
                "source pod {} runs as {}, the peer proved {}",
                engine.pod_name(from),
                runs_as.map_or_else(|| "no identity".to_owned(), |id| id.to_string()),
                inbound.peer
            )));
        }
        let dst = engine
            .pod_endpoint(local, to.is_ipv6())
            .map_err(|e| Refusal::bad_request(e.to_string()))?;
        let connection = Connection {
            src: source,
            dst,
            port: to.port(),
            protocol: Protocol::Tcp,
        };
        let decision = engine.decide(&connection);
        if decision.verdict() != Verdict::Allow {
            let why = engine.explain(&connection, &decision);
            return Err(Refusal::forbidden(format!(
                "NetworkPolicy: egress {}; ingress {}",
                why.egress, why.ingress
            )));
        }
        let identity = engine.decide_identity(local, to.port(), Protocol::Tcp, Some(&inbound.peer));
        if !identity.audited.passes() {
            tracing::info!(peer = %inbound.peer, destination = %to, verdict = ?identity.audited, "identity rules in audit mode would deny");
        }
        if !identity.enforced.passes() {
            return Err(Refusal::forbidden(format!(
                "identity rules: {:?}",
                identity.enforced
            )));
        }
        Ok(())
    }
}

impl Admission for NodeAdmission {
    fn admit(&self, inbound: &Inbound) -> impl Future<Output = Result<(), Refusal>> + Send {
        let outcome = self.decide(inbound);
        if let Err(refusal) = &outcome {
            tracing::info!(peer = %inbound.peer, source = %inbound.source, destination = %inbound.destination, status = %refusal.status, reason = %refusal.reason, "tunnel refused");
        }
        std::future::ready(outcome)
    }

    fn revoked(&self, peer: &Peer) -> impl Future<Output = ()> + Send {
        let (trust, chain) = (self.trust.clone(), peer.chain.clone());
        async move {
            trust.until_distrusted(chain, PeerSide::Client).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{c, replica_of};
    use super::*;
    use crate::identity::{BundleSet, WorkloadId};
    use crate::model::NetworkPolicy;
    use crate::tracker::wire::Object;

    fn pod(name: &str, node: &str, app: &str, sa: &str, ip: &str) -> Object {
        super::super::fixture::pod(name, node, app, sa, "Running", ip)
    }

    /// Web (node-a) admits app=client on port 80 by NetworkPolicy, and service account
    /// `client` by identity rule.
    fn admission(synced: bool) -> NodeAdmission {
        let policy = NetworkPolicy::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "demo"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                      "ports": [{"port": 80}]}]}}))
            .expect("policy"),
            &mut Vec::new(),
        )
        .expect("valid");
        let identity = crate::model::IdentityPolicy::from_value(
            &c(),
            serde_json::json!({"apiVersion": "weft.dev/v1alpha1", "kind": "IdentityPolicy",
                "metadata": {"name": "web", "namespace": "demo"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "rules": [{"from": [{"serviceAccount": "client"}]}]}}),
        )
        .expect("identity policy");
        let replica = replica_of(
            vec![
                pod("web", "node-a", "web", "web", "10.0.0.1"),
                pod("client", "node-b", "client", "client", "10.0.0.2"),
                pod("stranger", "node-b", "stranger", "client", "10.0.0.3"),
                pod("rogue", "node-b", "client", "rogue", "10.0.0.4"),
                Object::NetworkPolicy(policy),
                Object::IdentityPolicy(identity),
            ],
            synced,
        );
        NodeAdmission::new(
            Arc::new(RwLock::new(replica)),
            c(),
            "node-a",
            TrustStore::new(BundleSet::new([]).expect("set")).expect("trust"),
        )
    }

    fn inbound(peer: &str, source: &str, destination: &str) -> Inbound {
        Inbound {
            peer: WorkloadId::parse(&format!("spiffe://cluster-1/ns/demo/sa/{peer}")).expect("id"),
            source: source.parse().expect("ip"),
            destination: destination.parse().expect("addr"),
        }
    }

    fn refused(a: &NodeAdmission, i: &Inbound) -> (u16, String) {
        let r = a.decide(i).expect_err("refused");
        (r.status.as_u16(), r.reason)
    }

    #[test]
    fn only_local_pods_from_their_own_identity_as_policy_allows() {
        let a = admission(true);
        assert_eq!(
            a.decide(&inbound("client", "10.0.0.2", "10.0.0.1:80")),
            Ok(())
        );
        // THREATS 14: a pod of another node, or no pod at all: 400, nothing dialled.
        assert_eq!(
            refused(&a, &inbound("client", "10.0.0.2", "10.0.0.2:80")).0,
            400
        );
        assert_eq!(
            refused(&a, &inbound("client", "10.0.0.2", "10.9.9.9:80")).0,
            400
        );
        // THREATS 2: the client's certificate does not speak for the rogue pod.
        let (status, reason) = refused(&a, &inbound("client", "10.0.0.4", "10.0.0.1:80"));
        assert_eq!(status, 403);
        assert!(
            reason.contains("runs as spiffe://cluster-1/ns/demo/sa/rogue"),
            "{reason}"
        );
        // An address that is no pod.
        assert_eq!(
            refused(&a, &inbound("client", "10.9.9.8", "10.0.0.1:80")).0,
            403
        );
        // NetworkPolicy: the stranger runs as `client` but is not app=client; port 81.
        let (status, reason) = refused(&a, &inbound("client", "10.0.0.3", "10.0.0.1:80"));
        assert!(
            status == 403 && reason.starts_with("NetworkPolicy"),
            "{reason}"
        );
        assert_eq!(
            refused(&a, &inbound("client", "10.0.0.2", "10.0.0.1:81")).0,
            403
        );
    }

    #[test]
    fn identity_rules_decide_after_network_policy() {
        let a = admission(true);
        // Rogue runs as `rogue` and is app=client: NetworkPolicy allows, identity rules deny.
        let (status, reason) = refused(&a, &inbound("rogue", "10.0.0.4", "10.0.0.1:80"));
        assert!(
            status == 403 && reason.starts_with("identity rules"),
            "{reason}"
        );
    }

    #[test]
    fn nothing_is_admitted_before_the_view_is_complete() {
        let a = admission(false);
        assert_eq!(
            refused(&a, &inbound("client", "10.0.0.2", "10.0.0.1:80")).0,
            503
        );
    }
}
