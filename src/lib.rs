//! weft: an identity-aware per-node proxy for multi-cluster Kubernetes.
//!
//! Data flows one way: sources (manifests, Kubernetes, another tracker) → [`model`] → [`policy`]
//! → what consumes decisions ([`probe`] for the offline what-if; the data plane's capture in
//! [`redirect`] and tunnels in [`proxy`], which the node agent ([`node`]) wires together).
#![forbid(unsafe_code)]

pub mod admin;
pub mod ca;
pub mod cli;
pub mod demo;
pub mod endpoint;
pub mod identity;
pub mod lab;
pub mod model;
pub mod node;
pub mod policy;
pub mod probe;
pub mod proxy;
pub mod redirect;
pub mod tracker;
