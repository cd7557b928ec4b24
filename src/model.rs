//! The multi-cluster model: typed, validated objects of every cluster, and the loader that
//! reads a clusterset directory into them.

pub mod cluster;
pub mod clusterset;
pub mod identity_policy;
pub mod labels;
pub mod loader;
pub mod netpol;
pub mod objects;
pub mod schema;
pub mod selector;
pub mod service;

pub use cluster::{ClusterId, ClusterSettings};
pub use clusterset::{Cluster, ClusterSet};
pub use identity_policy::{IdentityPeer, IdentityPolicy, IdentityPort, IdentityRule, Mode};
pub use labels::Labels;
pub use loader::{LoadError, LoadWarning, Loaded, Origin, load_cluster, load_clusterset};
pub use netpol::{IpBlock, NetworkPolicy, Peer, PortRule, PortSpec, Rule};
pub use objects::{ContainerPort, Namespace, Node, Pod, PodPhase, Protocol};
pub use selector::{LabelSelector, Operator, Requirement};
pub use service::{EndpointSlice, Service, ServicePort, SliceEndpoint, SlicePort, TargetPort};

/// A field of a Kubernetes object that failed validation; `path` is the JSON path in the
/// object (`spec.ingress[0].from[1].ipBlock.cidr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FieldError {
    /// Where in the object, in the manifest's own field names.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// An object that failed validation, named as `Kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {field}")]
pub struct ObjectError {
    /// The object's kind (`NetworkPolicy`).
    pub kind: &'static str,
    /// `namespace/name`, or `name` for cluster-scoped objects.
    pub name: String,
    /// The field at fault.
    pub field: FieldError,
}
