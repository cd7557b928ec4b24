//! Who is calling the CA: the node a bearer token belongs to, checked on every call (a token
//! revoked between two calls on one channel fails the second). Outside Kubernetes a bootstrap
//! token file maps tokens to nodes (`bootstrap`); in Kubernetes the node agent's projected
//! ServiceAccount token is reviewed by the cluster's API server (`token_review`).

pub mod bootstrap;
pub mod token_review;

pub use bootstrap::{BootstrapTokens, TokenFileError};
pub use token_review::TokenReviewer;

/// Why a caller is not authenticated as a node.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthnError {
    /// The token is not one the CA accepts (unknown, revoked, expired, another audience).
    #[error("token refused: {0}")]
    Refused(String),
    /// The token is valid but not the node agent's.
    #[error("{user} is not the node agent ({expected})")]
    NotTheAgent {
        /// Who the token is.
        user: String,
        /// Who the node agent is.
        expected: String,
    },
    /// The token does not lead to a node.
    #[error("no node for the token: {0}")]
    NoNode(String),
    /// Whatever decides cannot answer now (the API server, the token file).
    #[error("cannot authenticate now: {0}")]
    Unavailable(String),
}

/// What proves which node a caller is.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The name of the node that `token` belongs to.
    async fn authenticate(&self, token: &str) -> Result<String, AuthnError>;
}

/// A node name as Kubernetes allows one, or why not.
fn node_name(name: &str) -> Result<String, AuthnError> {
    crate::tracker::subscriber::node_name(name).map_err(AuthnError::NoNode)?;
    Ok(name.to_owned())
}
