//! weft: an identity-aware per-node proxy for multi-cluster Kubernetes.
//!
//! Data flows one way: sources (manifests, Kubernetes, another tracker) → [`model`] → [`policy`]
//! → what consumes decisions ([`probe`] for the offline what-if, later the proxy).
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod cli;
pub mod identity;
pub mod model;
pub mod policy;
pub mod probe;
pub mod redirect;
pub mod tracker;
