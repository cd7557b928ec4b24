//! weft's certificate authority (`weft ca`, `proto/ca.proto`): one per cluster, it signs X.509
//! SVIDs for the pods of the calling node. The signing key and the leaf template (`signer`),
//! who the calling node is (`authn`), whether it may have the identity asked for (`authz`),
//! the gRPC service (`server`), the node agent's side of it (`client`), and a development PKI
//! (`dev_pki`).

pub mod authn;
pub mod authz;
pub mod client;
pub mod dev_pki;
pub mod server;
pub mod signer;

/// The generated protobuf types.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("weft.ca.v1");
}

pub use authn::{Authenticator, AuthnError, BootstrapTokens, TokenReviewer};
pub use authz::{Authorizer, AuthzError};
pub use server::Ca;
pub use signer::{CsrError, Issued, Signer, SignerError, TtlLimits};
