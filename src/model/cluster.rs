//! Cluster identity and per-cluster settings.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::labels;

/// The id of a cluster: a valid, non-empty Kubernetes label value, since it is the value of
/// the cluster label on every namespace.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(Arc<str>);

/// A string that cannot be a cluster id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster id {id:?}: {reason}")]
pub struct InvalidClusterId {
    /// The rejected id.
    pub id: String,
    /// Why it was rejected.
    pub reason: String,
}

impl ClusterId {
    /// Validates `id` as a non-empty label value.
    pub fn new(id: &str) -> Result<Self, InvalidClusterId> {
        let invalid = |reason: String| InvalidClusterId {
            id: id.to_owned(),
            reason,
        };
        if id.is_empty() {
            return Err(invalid("must not be empty".into()));
        }
        labels::validate_value(id).map_err(invalid)?;
        Ok(Self(id.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// Per-cluster settings (`cluster.yaml` beside a cluster's manifests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSettings {
    /// SPIFFE trust domain of the cluster's workloads.
    pub trust_domain: Option<String>,
    /// Name of the network the cluster's pods are on (clusters on one network reach each
    /// other's pod IPs directly).
    pub network: Option<String>,
    /// Stable unique id of the cluster (the kube-system namespace UID).
    pub uid: Option<String>,
}

impl ClusterSettings {
    /// Checks the fields' formats; the error names the field.
    pub fn validate(&self) -> Result<(), super::FieldError> {
        use super::FieldError;
        if let Some(td) = &self.trust_domain {
            let ok = !td.is_empty()
                && td.len() <= 255
                && td.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
                });
            if !ok {
                return Err(FieldError::new(
                    "trustDomain",
                    format!(
                        "invalid trust domain {td:?}: lowercase letters, digits, '.', '-' and '_' only"
                    ),
                ));
            }
        }
        if let Some(net) = &self.network {
            labels::validate_value(net)
                .map_err(|e| FieldError::new("network", format!("invalid network {net:?}: {e}")))?;
        }
        if let Some(uid) = &self.uid
            && uid.is_empty()
        {
            return Err(FieldError::new("uid", "must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_ids() {
        for ok in ["cluster-1", "gke-mc-01-us-central1-1", "a", "A.b_c"] {
            assert!(ClusterId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a/b", "a b", &"x".repeat(64)] {
            assert!(ClusterId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_validation_names_the_field() {
        let s = ClusterSettings {
            trust_domain: Some("Bad!".into()),
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().path, "trustDomain");
        let s = ClusterSettings {
            network: Some("a b".into()),
            ..Default::default()
        };
        assert_eq!(s.validate().unwrap_err().path, "network");
    }
}
