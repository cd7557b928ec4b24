//! Workload identity: SPIFFE ids as weft uses them (`id`) and a node's workload
//! certificates, obtained and renewed (`manager`).

pub mod id;
pub mod manager;

pub use id::{IdError, WorkloadId, trust_domain_for};
