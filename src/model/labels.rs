//! Label keys and values: validation as the API server does it, and the labels weft sets on
//! every namespace (its name and the cluster it really came from).

use std::collections::BTreeMap;

use super::ClusterId;

/// Labels of an object.
pub type Labels = BTreeMap<String, String>;

/// The namespace-name label the API server sets on every namespace.
pub const METADATA_NAME: &str = "kubernetes.io/metadata.name";

/// The cluster labels in use today, all set by weft: the seed's, NPEP-311's and NPEP-308's.
pub const CLUSTER_LABELS: [&str; 3] = [
    "cluster.clusterset.k8s.io",
    "clusterset.k8s.io/cluster-name",
    "networking.k8s.io/multicluster-name",
];

const MAX_NAME: usize = 63;
const MAX_PREFIX: usize = 253;

fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// Checks a label value: empty, or at most 63 characters of `[A-Za-z0-9_.-]` that begin and
/// end with an alphanumeric.
pub fn validate_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    check_name(v)
}

fn check_name(v: &str) -> Result<(), String> {
    if v.len() > MAX_NAME {
        return Err(format!("must be at most {MAX_NAME} characters"));
    }
    let b = v.as_bytes();
    if !b.iter().all(|&c| is_name_char(c)) {
        return Err("may contain only letters, digits, '-', '_' and '.'".into());
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must begin and end with a letter or digit".into());
    }
    Ok(())
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a non-empty name.
pub fn validate_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if name.is_empty() {
        return Err("name part must not be empty".into());
    }
    check_name(name).map_err(|e| format!("name part {e}"))?;
    if let Some(p) = prefix {
        validate_dns_subdomain(p).map_err(|e| format!("prefix {e}"))?;
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain (namespace names of policies' prefixes, object names).
pub fn validate_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_PREFIX {
        return Err(format!("must be 1 to {MAX_PREFIX} characters"));
    }
    for part in s.split('.') {
        let b = part.as_bytes();
        let ok = !b.is_empty()
            && b.iter()
                .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err(format!("{s:?} is not a lowercase DNS subdomain"));
        }
    }
    Ok(())
}

/// Checks a DNS-1123 label (namespace names): at most 63 lowercase alphanumerics or '-'.
pub fn validate_dns_label(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a lowercase DNS label of at most 63 characters"
        ))
    }
}

/// Checks every key and value; the error is `(path suffix, message)`.
pub fn validate_labels(labels: &Labels) -> Result<(), (String, String)> {
    for (k, v) in labels {
        validate_key(k).map_err(|e| (String::new(), format!("invalid label key {k:?}: {e}")))?;
        validate_value(v).map_err(|e| (k.clone(), format!("invalid label value {v:?}: {e}")))?;
    }
    Ok(())
}

/// A cluster label a manifest set to another cluster's id, overruled by weft.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLabelCorrection {
    /// The label name.
    pub label: &'static str,
    /// The value the manifest claimed.
    pub claimed: String,
}

/// The labels of namespace `name` of `cluster`: the declared ones, with the name label and the
/// three cluster labels set authoritatively. Returns the cluster labels that had to be corrected.
pub fn namespace_labels(
    cluster: &ClusterId,
    name: &str,
    mut labels: Labels,
) -> (Labels, Vec<ClusterLabelCorrection>) {
    let mut corrections = Vec::new();
    for label in CLUSTER_LABELS {
        if let Some(old) = labels.insert(label.to_owned(), cluster.as_str().to_owned())
            && old != cluster.as_str()
        {
            corrections.push(ClusterLabelCorrection {
                label,
                claimed: old,
            });
        }
    }
    labels.insert(METADATA_NAME.to_owned(), name.to_owned());
    (labels, corrections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        for ok in ["", "a", "a.b-c_d", "A1", &"x".repeat(63)] {
            assert!(validate_value(ok).is_ok(), "{ok:?}");
        }
        for bad in ["-a", "a-", ".a", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(validate_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys() {
        for ok in ["app", "kubernetes.io/metadata.name", "a.b/c-d", "x_Y"] {
            assert!(validate_key(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "/a", "a/", "A.B/c", "a//b", "-a", "a/b/c", "a b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn namespace_labels_are_authoritative() {
        let c = ClusterId::new("cluster-2").unwrap();
        let declared = Labels::from([
            (
                "cluster.clusterset.k8s.io".to_owned(),
                "cluster-1".to_owned(),
            ),
            ("team".to_owned(), "a".to_owned()),
            (METADATA_NAME.to_owned(), "other".to_owned()),
        ]);
        let (labels, corrections) = namespace_labels(&c, "demo", declared);
        assert_eq!(labels[METADATA_NAME], "demo");
        for l in CLUSTER_LABELS {
            assert_eq!(labels[l], "cluster-2");
        }
        assert_eq!(labels["team"], "a");
        assert_eq!(
            corrections,
            vec![ClusterLabelCorrection {
                label: "cluster.clusterset.k8s.io",
                claimed: "cluster-1".into()
            }]
        );
    }
}
