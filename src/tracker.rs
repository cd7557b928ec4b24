//! The tracker: one live view of every cluster, streamed to node agents over gRPC
//! (`proto/tracker.proto`). So far: the stream's objects and their validation on receipt
//! (`wire`), the revisioned view that produces snapshots and deltas (`view`), and the
//! subscriber's replica that applies them to the policy engine (`replica`).

pub mod replica;
pub mod view;
pub mod wire;
