//! The node agent's view of its own node (`local`): which pods of the global view run here,
//! the identities they need certificates for, the addresses capture must cover, and when the
//! node is ready to take traffic; the admission of inbound tunnels (`inbound`); where an
//! outbound connection goes, if anywhere (`outbound`); and what a ClusterIP resolves to
//! (`services`).

#[cfg(test)]
mod fixture;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod services;
