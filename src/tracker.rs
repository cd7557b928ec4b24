//! The tracker: one live view of every cluster, streamed to node agents over gRPC
//! (`proto/tracker.proto`). So far: the stream's objects and their validation on receipt
//! (`wire`), and the revisioned view that produces snapshots and deltas (`view`).

pub mod view;
pub mod wire;
