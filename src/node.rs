//! The node agent's view of its own node (`local`): which pods of the global view run here,
//! the identities they need certificates for, the addresses capture must cover, and when the
//! node is ready to take traffic; the admission of inbound tunnels (`inbound`); where an
//! outbound connection goes, if anywhere (`outbound`), and what a ClusterIP resolves to
//! (`services`); the decision log (`decision`), and what the node would decide about a given
//! connection (`explain`); the open connections judged again as the view changes
//! (`connections`), the counters (`metrics`), and the running agent that wires them to the
//! tracker, the CA, nftables and its listeners (`agent`).

pub mod agent;
pub mod connections;
pub mod decision;
pub mod explain;
#[cfg(test)]
mod fixture;
pub mod inbound;
pub mod local;
pub mod metrics;
pub mod outbound;
pub mod services;
