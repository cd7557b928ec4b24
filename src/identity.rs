//! Workload identity: SPIFFE ids as weft uses them (`id`).

pub mod id;

pub use id::{IdError, WorkloadId, trust_domain_for};
