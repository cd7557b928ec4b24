//! Decisions: the verdict of each direction with its reasons, kept as indices while deciding
//! and turned into names only when shown.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;
use smallvec::SmallVec;

use super::engine::PodId;
use crate::model::Protocol;

/// One end of a connection, as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A pod that owns `ip`.
    Pod {
        /// The pod.
        pod: PodId,
        /// Its address on this connection.
        ip: IpAddr,
    },
    /// An address no pod owns (external, a node, a host-network pod).
    Address(IpAddr),
    /// An address several live pods claim: it matches none of them.
    Ambiguous(IpAddr),
}

impl Endpoint {
    /// The address on this connection.
    pub fn ip(&self) -> IpAddr {
        match *self {
            Endpoint::Pod { ip, .. } | Endpoint::Address(ip) | Endpoint::Ambiguous(ip) => ip,
        }
    }
}

/// A connection to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// Source.
    pub src: Endpoint,
    /// Destination.
    pub dst: Endpoint,
    /// Destination port actually dialled.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Drop it.
    Deny,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

/// A policy, by index in the engine (valid until that policy is removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId(pub(crate) u32);

/// Rule `rule` (from 0) of a direction of policy `policy`, and the peer of it that matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    /// The policy.
    pub policy: PolicyId,
    /// The rule's index in the policy's ingress or egress list.
    pub rule: u32,
    /// The first matching peer of the rule ([`RuleRef::EVERY_PEER`] when it has none).
    pub peer: u32,
}

impl RuleRef {
    /// `peer` of a rule without peers, which admits every peer.
    pub const EVERY_PEER: u32 = u32::MAX;
}

/// The outcome of one direction (egress of the source, or ingress of the destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// A pod's traffic to itself: always allowed.
    SelfTraffic,
    /// This end is not a pod, so no policy applies to it.
    NotAPod,
    /// No policy selects the pod in this direction: allowed.
    NotSelected,
    /// Allowed by these rules (every allowing rule, not only the first).
    Allowed(SmallVec<[RuleRef; 4]>),
    /// These policies select the pod and none allows the connection.
    Denied(SmallVec<[PolicyId; 8]>),
    /// The address is claimed by several pods: it matches none, and is denied.
    Ambiguous,
}

impl Direction {
    /// Whether this direction lets the connection through.
    pub fn allows(&self) -> bool {
        !matches!(self, Direction::Denied(_) | Direction::Ambiguous)
    }
}

/// A decision: both directions, each with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Egress of the source.
    pub egress: Direction,
    /// Ingress of the destination.
    pub ingress: Direction,
}

impl Decision {
    /// Allowed only if both directions allow.
    pub fn verdict(&self) -> Verdict {
        if self.egress.allows() && self.ingress.allows() {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }
}

/// Why a direction came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Why {
    /// A pod's traffic to itself.
    #[serde(rename = "self")]
    SelfTraffic,
    /// Not a pod: no policies.
    NotAPod,
    /// No policy selects the pod.
    NotSelected,
    /// Allowed by rules.
    Allowed,
    /// Denied: policies select the pod, none allows.
    Denied,
    /// Address claimed by several pods.
    Ambiguous,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::SelfTraffic => "self",
            Why::NotAPod => "not-a-pod",
            Why::NotSelected => "not-selected",
            Why::Allowed => "allowed",
            Why::Denied => "denied",
            Why::Ambiguous => "ambiguous",
        })
    }
}

/// A direction's outcome with names: what `weft policy check` and logs show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionExplanation {
    /// This direction's verdict.
    pub verdict: Verdict,
    /// Why.
    pub why: Why,
    /// `cluster/namespace/policy`: the denying policies, or the policies of the allowing rules
    /// (sorted, unique).
    pub policies: Vec<String>,
    /// `cluster/namespace/policy rule N` of every allowing rule, sorted.
    pub rules: Vec<String>,
    /// What a reader should not miss: each allowing rule that admits a pod of another cluster
    /// than the policy's, and why it reaches that far (sorted like `rules`).
    pub notes: Vec<String>,
}

impl fmt::Display for DirectionExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.why {
            Why::SelfTraffic => f.write_str("allowed: a pod's traffic to itself"),
            Why::NotAPod => f.write_str("allowed: not a pod, no policies apply"),
            Why::NotSelected => f.write_str("allowed: no policy selects the pod"),
            Why::Ambiguous => f.write_str("denied: address claimed by several pods"),
            Why::Allowed => write!(f, "allowed by {}", self.rules.join(", ")),
            Why::Denied => write!(
                f,
                "denied: {} select{} the pod and none allows it",
                self.policies.join(", "),
                if self.policies.len() == 1 { "s" } else { "" }
            ),
        }
    }
}

/// A decision with names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The overall verdict.
    pub verdict: Verdict,
    /// Egress of the source.
    pub egress: DirectionExplanation,
    /// Ingress of the destination.
    pub ingress: DirectionExplanation,
}
