//! The third layer of a decision: the IdentityPolicies of the destination's cluster that
//! select the destination pod admit only the identities they allow. A pod no Enforce policy
//! selects passes; a peer without a proven identity matches no rule. Audit policies are
//! evaluated the same way and reported, never enforced.

use serde::Serialize;

use crate::identity::WorkloadId;
use crate::model::{ClusterId, IdentityPolicy, Mode, Protocol};

/// What the identity layer says of one mode's policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum IdentityVerdict {
    /// No policy of this mode selects the destination.
    NotSelected,
    /// A rule admits the peer.
    Allowed {
        /// `cluster/namespace/name` of the policy.
        policy: String,
        /// The rule's index, from 0.
        rule: usize,
    },
    /// Policies select the destination and none admits the peer.
    Denied {
        /// `cluster/namespace/name` of the selecting policies, sorted.
        policies: Vec<String>,
    },
}

impl IdentityVerdict {
    /// Whether traffic may pass this layer.
    pub fn passes(&self) -> bool {
        !matches!(self, IdentityVerdict::Denied { .. })
    }
}

/// The identity layer's decision: enforced, and what audit policies would have said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityDecision {
    /// The peer's proven identity, if any.
    pub peer: Option<String>,
    /// The Enforce policies' verdict.
    pub enforced: IdentityVerdict,
    /// The Audit policies' verdict.
    pub audited: IdentityVerdict,
}

/// Decides over `selecting` (the policies that select the destination) for `peer` on `port`
/// of `protocol`; `trust_domain_of` gives a cluster's trust domain.
pub fn decide<'a>(
    selecting: impl Iterator<Item = &'a IdentityPolicy> + Clone,
    peer: Option<&WorkloadId>,
    port: u16,
    protocol: Protocol,
    trust_domain_of: impl Fn(&ClusterId) -> Option<String> + Copy,
) -> IdentityDecision {
    let verdict = |mode: Mode| {
        let mut names: Vec<String> = Vec::new();
        for p in selecting.clone().filter(|p| p.mode == mode) {
            if let Some(id) = peer
                && let Some(rule) = p.admitting_rule(id, port, protocol, trust_domain_of)
            {
                return IdentityVerdict::Allowed {
                    policy: format!("{}/{}/{}", p.cluster, p.namespace, p.name),
                    rule,
                };
            }
            names.push(format!("{}/{}/{}", p.cluster, p.namespace, p.name));
        }
        if names.is_empty() {
            IdentityVerdict::NotSelected
        } else {
            names.sort();
            IdentityVerdict::Denied { policies: names }
        }
    };
    IdentityDecision {
        peer: peer.map(ToString::to_string),
        enforced: verdict(Mode::Enforce),
        audited: verdict(Mode::Audit),
    }
}
