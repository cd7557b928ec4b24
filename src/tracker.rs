//! The tracker: one live view of every cluster, streamed to node agents over gRPC
//! (`proto/tracker.proto`): the stream's objects and their validation on receipt (`wire`),
//! the revisioned view that produces snapshots and deltas (`view`), the gRPC service
//! (`server`), who a subscriber is (`subscriber`) over mutual TLS (`tls`), the subscriber's side (`client`, `replica`) and where the view comes from
//! (`source`).

pub mod client;
pub mod metrics;
pub mod replica;
pub mod sequence;
pub mod server;
pub mod source;
pub mod subscriber;
pub mod tls;
pub mod view;
pub mod wire;
