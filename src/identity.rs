//! Workload identity: SPIFFE ids as weft uses them (`id`), the checks a peer's SVID leaf must
//! pass (`svid`), trust bundles per trust domain (`bundle`), the rustls verifiers that tie
//! them together (`verify`), and a node's workload certificates, obtained and renewed
//! (`manager`).

pub mod bundle;
pub mod id;
pub mod manager;
pub mod svid;
#[cfg(test)]
mod testpki;
pub mod verify;

pub use bundle::{BundleError, BundleFile, BundleSet, TrustBundle};
pub use id::{IdError, WorkloadId, trust_domain_for};
pub use svid::{SvidError, SvidProblem, leaf_identity};
pub use verify::{
    Expected, SpiffeClientVerifier, SpiffeServerVerifier, TrustStore, VerifyError, peer_identity,
};
