//! The decision log: one JSON-able event per connection judged by a node — who, to whom, as
//! which identities, the verdict, the layer that decided, for a denial why in one word, and
//! the policy behind it — logged through `tracing` under the target `weft::decision`.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Which of a node's listeners judged the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// From a local pod, on the outbound listener.
    Outbound,
    /// Through an HBONE tunnel to a local pod.
    Inbound,
    /// Plaintext to a local pod from a source with no identity.
    Plaintext,
}

/// The part of the decision that settled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layer {
    /// The view of the node's cluster is not complete: nothing passes unevaluated.
    View,
    /// What the connection names is not served here, or its source is not who it claims.
    Admission,
    /// The NetworkPolicies of the source's and destination's clusters.
    NetworkPolicy,
    /// The IdentityPolicies of the destination's cluster.
    Identity,
    /// The destination's node refused the tunnel (its NetworkPolicy, identity rules or
    /// admission; its own decision log says which).
    Destination,
    /// Carrying it failed after it was allowed (destination unreachable, TLS failed).
    Transport,
}

/// Why a connection was denied, in one word of a closed set: the `denial` of the decision log
/// and the `reason` label of the denial counter (the log's `reason` says it in full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    /// The view of the node's cluster is not complete, or capture still holds.
    NotReady,
    /// The source is no pod it can be: no local pod outbound, no single live pod inbound.
    UnknownSource,
    /// A destination never dialled for a pod (loopback, link-local, multicast, ...).
    ForbiddenDestination,
    /// The source pod has no identity to present, or the peer has none to admit.
    NoIdentity,
    /// A Service's ClusterIP with no ready endpoint for the port.
    NoEndpoint,
    /// Not addressed to a pod of this node (or over a connection to another pod).
    NotLocal,
    /// The source claims to be what it is not: a pod that runs as another identity than the
    /// one proven, or plaintext in a meshed pod's name.
    Impersonation,
    /// The source's egress NetworkPolicy.
    Egress,
    /// The destination's ingress NetworkPolicy.
    Ingress,
    /// Identity rules admit no such peer.
    Identity,
    /// The destination's node refused the tunnel.
    Refused,
    /// The destination, or its node, could not be reached.
    Unreachable,
}

impl Denial {
    /// The word in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::NotReady => "not_ready",
            Denial::UnknownSource => "unknown_source",
            Denial::ForbiddenDestination => "forbidden_destination",
            Denial::NoIdentity => "no_identity",
            Denial::NoEndpoint => "no_endpoint",
            Denial::NotLocal => "not_local",
            Denial::Impersonation => "impersonation",
            Denial::Egress => "egress",
            Denial::Ingress => "ingress",
            Denial::Identity => "identity",
            Denial::Refused => "refused",
            Denial::Unreachable => "unreachable",
        }
    }
}

impl Layer {
    /// The layer's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::View => "view",
            Layer::Admission => "admission",
            Layer::NetworkPolicy => "networkpolicy",
            Layer::Identity => "identity",
            Layer::Destination => "destination",
            Layer::Transport => "transport",
        }
    }
}

impl Direction {
    /// The direction's name in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Plaintext => "plaintext",
        }
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Which listener judged it.
    pub direction: Direction,
    /// The source address (the source pod's, or an unmeshed peer's).
    pub source: SocketAddr,
    /// The destination as dialled (a Service already resolved to its endpoint).
    pub destination: SocketAddr,
    /// `cluster/namespace/name` of the source pod, if it is one.
    pub source_pod: Option<String>,
    /// `cluster/namespace/name` of the destination pod, if it is one.
    pub destination_pod: Option<String>,
    /// The source's identity (proven by its certificate inbound; the pod's own outbound).
    pub source_identity: Option<String>,
    /// The destination workload's identity, if it has one.
    pub destination_identity: Option<String>,
    /// Whether it may pass.
    pub allowed: bool,
    /// The layer that settled it (for an allowed connection: the last one passed).
    pub layer: Layer,
    /// Why it was denied, in one word.
    pub denial: Option<Denial>,
    /// Why, naming the deciding policies.
    pub reason: String,
    /// What identity rules in Audit mode would have done, when they would deny.
    pub audit: Option<String>,
}

impl Decision {
    /// A decision about `source` → `destination` by `direction`, with nothing known yet.
    pub fn new(direction: Direction, source: SocketAddr, destination: SocketAddr) -> Self {
        Self {
            direction,
            source,
            destination,
            source_pod: None,
            destination_pod: None,
            source_identity: None,
            destination_identity: None,
            allowed: false,
            layer: Layer::View,
            denial: None,
            reason: String::new(),
            audit: None,
        }
    }

    /// This decision, allowed: `layer` is the last one passed, `reason` names its policies.
    pub fn allowed_by(mut self, layer: Layer, reason: impl Into<String>) -> Self {
        self.allowed = true;
        self.layer = layer;
        self.denial = None;
        self.reason = reason.into();
        self
    }

    /// This decision, denied by `layer` for `denial`, said in full in `reason`.
    pub fn denied(mut self, layer: Layer, denial: Denial, reason: impl Into<String>) -> Self {
        self.allowed = false;
        self.layer = layer;
        self.denial = Some(denial);
        self.reason = reason.into();
        self
    }

    /// This decision, denied as the transport failed: the destination could not be reached.
    pub fn unreachable(self, reason: impl Into<String>) -> Self {
        self.denied(Layer::Transport, Denial::Unreachable, reason)
    }

    /// "allow" or "deny".
    pub fn verdict(&self) -> &'static str {
        if self.allowed { "allow" } else { "deny" }
    }

    /// Writes the decision to the decision log and counts it in `metrics`.
    pub fn record(&self, metrics: Option<&super::metrics::Metrics>) {
        self.log();
        if let Some(metrics) = metrics {
            metrics.decided(self);
        }
    }

    /// Writes the decision to the decision log.
    fn log(&self) {
        let text = |o: &Option<String>| o.clone().unwrap_or_default();
        tracing::info!(
            target: "weft::decision",
            direction = self.direction.as_str(),
            source = %self.source,
            destination = %self.destination,
            source_pod = text(&self.source_pod),
            destination_pod = text(&self.destination_pod),
            source_identity = text(&self.source_identity),
            destination_identity = text(&self.destination_identity),
            verdict = self.verdict(),
            layer = self.layer.as_str(),
            denial = self.denial.map_or("", Denial::as_str),
            reason = %self.reason,
            audit = text(&self.audit),
            "decision"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decision_names_its_verdict_and_layer() {
        let d = Decision::new(
            Direction::Plaintext,
            "10.0.0.1:40000".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
        );
        assert_eq!(d.verdict(), "deny");
        let denied = d
            .clone()
            .denied(Layer::NetworkPolicy, Denial::Ingress, "no rule");
        assert_eq!(
            (denied.verdict(), denied.layer.as_str()),
            ("deny", "networkpolicy")
        );
        let json = serde_json::to_value(&denied).expect("json");
        assert_eq!(json["denial"], "ingress");
        let d = denied.allowed_by(Layer::NetworkPolicy, "allowed by cluster-1/demo/web rule 0");
        assert_eq!((d.verdict(), d.layer.as_str()), ("allow", "networkpolicy"));
        let json = serde_json::to_value(&d).expect("json");
        assert_eq!(json["direction"], "plaintext");
        assert_eq!(json["layer"], "networkpolicy");
        assert_eq!(json["denial"], serde_json::Value::Null);
    }
}
