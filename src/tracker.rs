//! The tracker: one live view of every cluster, streamed to node agents over gRPC
//! (`proto/tracker.proto`). So far: the stream's objects and their validation on receipt.

pub mod wire;
