//! The inbound admission of a node's HBONE server: a tunnel is admitted only to a pod of this
//! node (anything else is a 400 and nothing is dialled), only from a source pod that runs as
//! the identity its peer proved (never another pod's labels on that identity's word), and only
//! when the NetworkPolicies and the identity rules allow it — all decided before any dial, on
//! a view that is complete for this node's cluster.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use http::StatusCode;

use super::connections::{Connections, Recheck};
use super::decision::{Decision, Denial, Direction, Layer};
use super::local::{local_pod, view_complete};
use super::metrics::{CloseCause, Metrics};
use crate::identity::verify::PeerSide;
use crate::identity::{TrustStore, WorkloadId};
use crate::model::{ClusterId, Protocol};
use crate::policy::identity::IdentityVerdict;
use crate::policy::{Connection, Endpoint, Engine, PodId, Verdict};
use crate::proxy::{Admission, Inbound, Peer, Refusal, TunnelEnd};
use crate::tracker::replica::Replica;

/// Decides inbound tunnels for node `node` of `cluster` on the view `view`.
#[derive(Debug, Clone)]
pub struct NodeAdmission {
    view: Arc<RwLock<Replica>>,
    cluster: ClusterId,
    node: String,
    trust: TrustStore,
    metrics: Option<Arc<Metrics>>,
    connections: Option<Connections>,
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
            metrics: None,
            connections: None,
        }
    }

    /// This admission, tracking the tunnels it admits in `connections` so that they close
    /// once no longer allowed.
    pub fn with_connections(mut self, connections: Connections) -> Self {
        self.connections = Some(connections);
        self
    }

    /// This admission, counting its decisions in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The decision for one tunnel, with the status a refusal answers.
    pub fn judge(&self, inbound: &Inbound) -> (Decision, StatusCode) {
        let source = SocketAddr::new(inbound.source, 0);
        let mut decision = Decision::new(Direction::Inbound, source, inbound.destination);
        decision.source_identity = Some(inbound.peer.to_string());
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let outcome = self.check_tunnel(&view, inbound, &mut decision);
        let status = match outcome {
            Ok(()) => StatusCode::OK,
            Err(status) => status,
        };
        (decision, status)
    }

    /// The decision for one tunnel.
    pub fn decide(&self, inbound: &Inbound) -> Result<(), Refusal> {
        match self.judge(inbound) {
            (d, _) if d.allowed => Ok(()),
            (d, status) => Err(Refusal {
                status,
                reason: d.reason,
            }),
        }
    }

    /// The decision for a plaintext connection from `source` (no identity) to `destination`.
    pub fn judge_plaintext(&self, source: SocketAddr, destination: SocketAddr) -> Decision {
        let mut decision = Decision::new(Direction::Plaintext, source, destination);
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        if let Err(reason) = view_complete(&view, &self.cluster) {
            return decision.denied(Layer::View, Denial::NotReady, reason);
        }
        let engine = view.engine();
        let Some(local) = local_pod(&view, &self.cluster, &self.node, destination.ip()) else {
            return decision.denied(
                Layer::Admission,
                Denial::NotLocal,
                format!("{} is not a pod of this node", destination.ip()),
            );
        };
        let from = engine.address_endpoint(source.ip());
        if let Endpoint::Pod { pod, .. } = from {
            decision.source_pod = Some(engine.pod_name(pod));
            // A meshed pod's traffic is captured at its own node and arrives through a
            // tunnel; plaintext in its name is spoofed or went around capture (THREATS 24).
            if meshed_identity(engine, pod, source.is_ipv6()).is_some() {
                return decision.denied(
                    Layer::Admission,
                    Denial::Impersonation,
                    format!(
                        "plaintext from meshed pod {}: its traffic comes through a tunnel",
                        engine.pod_name(pod)
                    ),
                );
            }
        }
        self.judge_policies(&view, local, from, destination, None, decision)
    }

    fn check_tunnel(
        &self,
        view: &Replica,
        inbound: &Inbound,
        decision: &mut Decision,
    ) -> Result<(), StatusCode> {
        fn settle(
            decision: &mut Decision,
            (layer, denial): (Layer, Denial),
            reason: String,
            status: StatusCode,
        ) -> Result<(), StatusCode> {
            *decision = decision.clone().denied(layer, denial, reason);
            Err(status)
        }
        const NOT_LOCAL: (Layer, Denial) = (Layer::Admission, Denial::NotLocal);
        const IMPERSONATION: (Layer, Denial) = (Layer::Admission, Denial::Impersonation);
        if let Err(reason) = view_complete(view, &self.cluster) {
            return settle(
                decision,
                (Layer::View, Denial::NotReady),
                reason,
                StatusCode::SERVICE_UNAVAILABLE,
            );
        }
        let engine = view.engine();
        let to = inbound.destination;
        // The connection presented the certificate of the pod it was addressed to: it carries
        // tunnels to that pod only.
        if to.ip() != inbound.arrived_at.ip() {
            let reason = format!(
                "tunnel to {} on a connection to {}",
                to.ip(),
                inbound.arrived_at.ip()
            );
            return settle(decision, NOT_LOCAL, reason, StatusCode::BAD_REQUEST);
        }
        let Some(local) = local_pod(view, &self.cluster, &self.node, to.ip()) else {
            let reason = format!("{} is not a pod of this node", to.ip());
            return settle(decision, NOT_LOCAL, reason, StatusCode::BAD_REQUEST);
        };
        let source = engine.address_endpoint(inbound.source);
        let Endpoint::Pod { pod: from, .. } = source else {
            let reason = format!("source {} is no single live pod", inbound.source);
            let unknown = (Layer::Admission, Denial::UnknownSource);
            return settle(decision, unknown, reason, StatusCode::FORBIDDEN);
        };
        decision.source_pod = Some(engine.pod_name(from));
        // THREATS 2: the claimed source pod must run as the proven identity.
        let runs_as = engine.pod_identity(from);
        if runs_as.as_ref() != Some(&inbound.peer) {
            let reason = format!(
                "source pod {} runs as {}, the peer proved {}",
                engine.pod_name(from),
                runs_as.map_or_else(|| "no identity".to_owned(), |id| id.to_string()),
                inbound.peer
            );
            return settle(decision, IMPERSONATION, reason, StatusCode::FORBIDDEN);
        }
        let judged = self.judge_policies(
            view,
            local,
            source,
            to,
            Some(&inbound.peer),
            decision.clone(),
        );
        let allowed = judged.allowed;
        *decision = judged;
        if allowed {
            Ok(())
        } else if decision.layer == Layer::Admission {
            Err(StatusCode::BAD_REQUEST)
        } else {
            Err(StatusCode::FORBIDDEN)
        }
    }

    /// NetworkPolicy, then the identity rules, for `source` → local pod `local` at `to`.
    fn judge_policies(
        &self,
        view: &Replica,
        local: PodId,
        source: Endpoint,
        to: SocketAddr,
        peer: Option<&WorkloadId>,
        mut decision: Decision,
    ) -> Decision {
        let engine = view.engine();
        decision.destination_pod = Some(engine.pod_name(local));
        decision.destination_identity = engine.pod_identity(local).map(|id| id.to_string());
        let dst = match engine.pod_endpoint(local, to.is_ipv6()) {
            Ok(dst) => dst,
            Err(e) => return decision.denied(Layer::Admission, Denial::NotLocal, e.to_string()),
        };
        let connection = Connection {
            src: source,
            dst,
            port: to.port(),
            protocol: Protocol::Tcp,
        };
        let verdict = engine.decide(&connection);
        let why = engine.explain(&connection, &verdict);
        let reason = format!("egress {}; ingress {}", why.egress, why.ingress);
        if verdict.verdict() != Verdict::Allow {
            let side = if verdict.egress.allows() {
                Denial::Ingress
            } else {
                Denial::Egress
            };
            return decision.denied(Layer::NetworkPolicy, side, reason);
        }
        let identity = engine.decide_identity(local, to.port(), Protocol::Tcp, peer);
        if let IdentityVerdict::Denied { policies } = &identity.audited {
            decision.audit = Some(format!(
                "identity rules in Audit mode ({}) would deny",
                policies.join(", ")
            ));
        }
        match identity.enforced {
            IdentityVerdict::NotSelected => decision.allowed_by(Layer::NetworkPolicy, reason),
            IdentityVerdict::Allowed { policy, rule } => decision.allowed_by(
                Layer::Identity,
                format!("{reason}; identity allowed by {policy} rule {rule}"),
            ),
            IdentityVerdict::Denied { policies } => decision.denied(
                Layer::Identity,
                if peer.is_some() {
                    Denial::Identity
                } else {
                    Denial::NoIdentity
                },
                format!(
                    "identity rules: {} admit no {}",
                    policies.join(", "),
                    peer.map_or_else(
                        || "peer without an identity".to_owned(),
                        ToString::to_string
                    )
                ),
            ),
        }
    }
}

/// The identity pod `pod` proves on its tunnels, if it is meshed: it has an identity, and a
/// node with an address of the family (`v6`) whose agent captures its traffic.
pub fn meshed_identity(engine: &Engine, pod: PodId, v6: bool) -> Option<WorkloadId> {
    engine.pod_node_address(pod, v6)?;
    engine.pod_identity(pod)
}

impl Admission for NodeAdmission {
    fn malformed(&self, _peer: &Peer, refusal: &Refusal) {
        if let Some(metrics) = &self.metrics {
            metrics.malformed(refusal.status);
        }
    }

    fn admit(&self, inbound: &Inbound) -> impl Future<Output = Result<(), Refusal>> + Send {
        let (decision, status) = self.judge(inbound);
        decision.record(self.metrics.as_deref());
        std::future::ready(if decision.allowed {
            Ok(())
        } else {
            Err(Refusal {
                status,
                reason: decision.reason,
            })
        })
    }

    fn carried(&self, inbound: &Inbound) -> impl Future<Output = ()> + Send + 'static {
        let tracked = self
            .connections
            .as_ref()
            .map(|c| c.track(Recheck::Inbound(inbound.clone())));
        async move {
            match tracked {
                Some(mut tracked) => tracked.closed().await,
                None => std::future::pending().await,
            }
        }
    }

    fn ended(&self, _: &Inbound, sent: u64, received: u64, end: TunnelEnd) {
        if let Some(metrics) = &self.metrics {
            let cause = match end {
                TunnelEnd::Done => CloseCause::Done,
                TunnelEnd::Closed | TunnelEnd::Revoked => CloseCause::Policy,
                TunnelEnd::Failed => CloseCause::Error,
            };
            metrics.closed(Direction::Inbound, cause, sent, received);
        }
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
        let destination: std::net::SocketAddr = destination.parse().expect("addr");
        Inbound {
            peer: WorkloadId::parse(&format!("spiffe://cluster-1/ns/demo/sa/{peer}")).expect("id"),
            source: source.parse().expect("ip"),
            destination,
            arrived_at: std::net::SocketAddr::new(destination.ip(), crate::proxy::HBONE_PORT),
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
        // A connection to one pod carries no tunnel to another.
        let mut elsewhere = inbound("client", "10.0.0.2", "10.0.0.1:80");
        elsewhere.arrived_at = "10.0.0.9:15008".parse().expect("addr");
        assert_eq!(refused(&a, &elsewhere).0, 400);
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
        assert!(status == 403 && reason.starts_with("egress"), "{reason}");
        assert_eq!(
            refused(&a, &inbound("client", "10.0.0.2", "10.0.0.1:81")).0,
            403
        );
    }

    #[test]
    fn every_denial_says_why_in_one_word() {
        use super::super::decision::Denial;
        let a = admission(true);
        let mut elsewhere = inbound("client", "10.0.0.2", "10.0.0.1:80");
        elsewhere.arrived_at = "10.0.0.9:15008".parse().expect("addr");
        for (tunnel, denial) in [
            (
                inbound("client", "10.0.0.2", "10.0.0.2:80"),
                Denial::NotLocal,
            ),
            (elsewhere, Denial::NotLocal),
            (
                inbound("client", "10.0.0.4", "10.0.0.1:80"),
                Denial::Impersonation,
            ),
            (
                inbound("client", "10.9.9.8", "10.0.0.1:80"),
                Denial::UnknownSource,
            ),
            (
                inbound("client", "10.0.0.3", "10.0.0.1:80"),
                Denial::Ingress,
            ),
            (
                inbound("client", "10.0.0.2", "10.0.0.1:81"),
                Denial::Ingress,
            ),
            (
                inbound("rogue", "10.0.0.4", "10.0.0.1:80"),
                Denial::Identity,
            ),
        ] {
            let (decision, _) = a.judge(&tunnel);
            assert_eq!(decision.denial, Some(denial), "{}", decision.reason);
        }
        let (early, _) = admission(false).judge(&inbound("client", "10.0.0.2", "10.0.0.1:80"));
        assert_eq!(early.denial, Some(Denial::NotReady));
        let (allowed, _) = a.judge(&inbound("client", "10.0.0.2", "10.0.0.1:80"));
        assert_eq!(allowed.denial, None);
        // Plaintext in the client's name (its node unknown here, so not taken for a meshed
        // pod's): NetworkPolicy admits app=client, the identity rules no peer without one.
        let plaintext = a.judge_plaintext(
            "10.0.0.2:40000".parse().expect("addr"),
            "10.0.0.1:80".parse().expect("addr"),
        );
        assert_eq!(plaintext.denial, Some(Denial::NoIdentity));
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
