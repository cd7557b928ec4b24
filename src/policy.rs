//! The NetworkPolicy engine: compiles policies and selectors against interned labels, keeps
//! per-pod indexes that are updated incrementally, and decides connections with their reasons.
//!
//! Semantics are upstream `networking.k8s.io/v1`, with weft's multi-cluster rule: a policy
//! applies only to pods of its own cluster, while namespace selectors match namespaces of
//! every cluster. A peer with only a pod selector means pods of the policy's own namespace in
//! the policy's own cluster. IdentityPolicies are the third layer (`identity`).

mod compile;
mod decision;
mod engine;
pub mod identity;
mod intern;
mod store;

pub use decision::{
    Connection, Decision, Direction, DirectionExplanation, Endpoint, Explanation, PolicyId,
    RuleRef, Verdict, Why,
};
pub use engine::{AddrRange, EndpointError, Engine, Grant, PacketPolicy, PodId, PodPackets};
