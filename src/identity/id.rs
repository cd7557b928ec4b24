//! SPIFFE ids of workloads, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! parsed by the SPIFFE rules (the spiffe crate's) and weft's stricter ones: a lowercase
//! trust domain, exactly that path, a namespace and a service account Kubernetes would accept.

use std::fmt;

use spiffe::{SpiffeId, TrustDomain};

use crate::model::ClusterId;
use crate::model::labels::{validate_dns_label, validate_dns_subdomain};

/// Why a SPIFFE id or a trust domain is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Not a SPIFFE id by the SPIFFE rules.
    #[error("{id:?} is not a SPIFFE id: {error}")]
    Spiffe {
        /// What was given.
        id: String,
        /// Why.
        error: String,
    },
    /// Not a trust domain by the SPIFFE rules, or not lowercase.
    #[error("{name:?} is not a trust domain: {error}")]
    TrustDomain {
        /// What was given.
        name: String,
        /// Why.
        error: String,
    },
    /// A SPIFFE id that names no workload: its path is not `/ns/NAMESPACE/sa/ACCOUNT`.
    #[error(
        "{id}: not a workload identity (expected spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT)"
    )]
    NotAWorkload {
        /// The SPIFFE id.
        id: String,
    },
    /// The namespace or the service account is not a valid Kubernetes name.
    #[error("{id}: {what} {name:?} is not a valid Kubernetes name")]
    BadName {
        /// The SPIFFE id.
        id: String,
        /// `namespace` or `service account`.
        what: &'static str,
        /// The name.
        name: String,
    },
}

/// The longest SPIFFE id the SPIFFE rules allow (a URI SAN of up to 2048 bytes).
pub const MAX_ID_BYTES: usize = 2048;

fn too_long(id: &str) -> Result<(), IdError> {
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::Spiffe {
            id: format!("{}…", id.chars().take(64).collect::<String>()),
            error: format!("longer than {MAX_ID_BYTES} bytes"),
        });
    }
    Ok(())
}

/// A trust domain as weft accepts it: the SPIFFE rules, and lowercase only (the rules make
/// trust domains case-insensitive; two spellings of one would be two bundles).
pub fn trust_domain(name: &str) -> Result<TrustDomain, IdError> {
    let bad = |error: String| IdError::TrustDomain {
        name: name.to_owned(),
        error,
    };
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("it must be lowercase".into()));
    }
    TrustDomain::new(name).map_err(|e| bad(e.to_string()))
}

/// The trust domain of a cluster: the one its settings name, else one derived from its id
/// (lowercased; a cluster id's characters are all valid in a trust domain).
pub fn trust_domain_for(
    cluster: &ClusterId,
    configured: Option<&str>,
) -> Result<TrustDomain, IdError> {
    match configured {
        Some(name) => trust_domain(name),
        None => trust_domain(&cluster.as_str().to_ascii_lowercase()),
    }
}

/// A workload's identity: its trust domain, namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl WorkloadId {
    /// The identity of service account `service_account` of `namespace` in `trust_domain`.
    pub fn new(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        let id = Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let bad = |what, name: &str| IdError::BadName {
            id: id.to_string(),
            what,
            name: name.to_owned(),
        };
        if validate_dns_label(namespace).is_err() {
            return Err(bad("namespace", namespace));
        }
        if validate_dns_subdomain(service_account).is_err() {
            return Err(bad("service account", service_account));
        }
        Ok(id)
    }

    /// Parses a SPIFFE id that must name a workload.
    pub fn parse(id: &str) -> Result<Self, IdError> {
        too_long(id)?;
        // The spiffe crate lowercases the trust domain; weft refuses another spelling.
        if let Some(rest) = id.strip_prefix("spiffe://") {
            let name = rest.split('/').next().unwrap_or_default();
            if name.bytes().any(|b| b.is_ascii_uppercase()) {
                trust_domain(name)?;
            }
        }
        let spiffe = SpiffeId::new(id).map_err(|e| IdError::Spiffe {
            id: id.to_owned(),
            error: e.to_string(),
        })?;
        Self::from_spiffe(&spiffe)
    }

    /// The workload a SPIFFE id names.
    pub fn from_spiffe(id: &SpiffeId) -> Result<Self, IdError> {
        too_long(&id.to_string())?;
        let td = trust_domain(id.trust_domain_name())?;
        let segments: Vec<&str> = id.path().split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", account] => Self::new(&td, namespace, account),
            _ => Err(IdError::NotAWorkload { id: id.to_string() }),
        }
    }

    /// Whether this is the identity of `pod`, whose cluster's trust domain is
    /// `trust_domain`: what a tunnel that names its source pod must prove (the proven identity
    /// is authorised, never the claimed pod's labels on another identity's word).
    pub fn is_identity_of(&self, pod: &crate::model::Pod, trust_domain: &str) -> bool {
        self.trust_domain == trust_domain
            && self.namespace == pod.namespace
            && self.service_account == pod.service_account
    }

    /// Its trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Its namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Its service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let id = WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/web.frontend").expect("valid");
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster-1", "demo", "web.frontend")
        );
        assert_eq!(id.to_string(), "spiffe://cluster-1/ns/demo/sa/web.frontend");
        let td =
            trust_domain_for(&ClusterId::new("GKE_cluster.1").expect("id"), None).expect("derived");
        assert_eq!(td.to_string(), "gke_cluster.1");
        assert_eq!(
            trust_domain_for(&ClusterId::new("c1").expect("id"), Some("prod.example"))
                .expect("configured")
                .to_string(),
            "prod.example"
        );
    }

    #[test]
    fn malformed_ids_are_refused_by_name() {
        let too_long = format!("spiffe://td/ns/a/sa/{}", "a".repeat(2100));
        for (bad, says) in [
            ("", "not a SPIFFE id"),
            ("https://td/ns/a/sa/b", "not a SPIFFE id"),
            ("spiffe://TD/ns/a/sa/b", "lowercase"),
            ("spiffe://td", "not a workload"),
            ("spiffe://td/ns/a/sa/b/c", "not a workload"),
            ("spiffe://td/ns/a/sa", "not a workload"),
            ("spiffe://td/ns/../sa/b", "not a SPIFFE id"),
            ("spiffe://td/ns/a//sa/b", "not a SPIFFE id"),
            ("spiffe://td/ns/a%2Fb/sa/c", "not a SPIFFE id"),
            ("spiffe://td/ns/a/sa/b/", "not a SPIFFE id"),
            ("spiffe://td/ns/A/sa/b", "namespace \"A\""),
            ("spiffe://td/ns/a.b/sa/c", "namespace \"a.b\""),
            ("spiffe://td/ns/a/sa/b_c", "service account \"b_c\""),
            ("spiffe://td/ns/a/sa/-b", "service account"),
            ("spiffe://user@td/ns/a/sa/b", "not a SPIFFE id"),
            ("spiffe://td:8080/ns/a/sa/b", "not a SPIFFE id"),
            ("spiffe://td/ns/a/sa/b?x=1", "not a SPIFFE id"),
            ("spiffe://td/ns/a/sa/b\u{0}", "not a SPIFFE id"),
            (too_long.as_str(), "not a SPIFFE id"),
        ] {
            let e = WorkloadId::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn names_match_exactly_never_as_patterns() {
        // THREATS 8: a dot is a dot, a star is not a wildcard, a prefix is not a match.
        let allowed = WorkloadId::parse("spiffe://td/ns/demo/sa/a.b").expect("a.b");
        for other in ["axb", "a-b", "a.bc", "a", "a.b.c"] {
            let peer =
                WorkloadId::parse(&format!("spiffe://td/ns/demo/sa/{other}")).expect("valid name");
            assert_ne!(peer, allowed, "{other}");
        }
        for pattern in ["*", "a*", "a.*"] {
            let e =
                WorkloadId::parse(&format!("spiffe://td/ns/demo/sa/{pattern}")).expect_err(pattern);
            assert!(e.to_string().contains("not a SPIFFE id"), "{e}");
        }
        assert_ne!(
            WorkloadId::parse("spiffe://td/ns/demo/sa/web").expect("td"),
            WorkloadId::parse("spiffe://td.evil/ns/demo/sa/web").expect("td.evil")
        );
    }

    #[test]
    fn an_identity_is_only_its_own_pods() {
        // THREATS 2: a certificate for service account b does not speak for a pod of a.
        let pod = |cluster: &str, ns: &str, sa: &str| {
            crate::model::Pod::from_api(
                &ClusterId::new(cluster).expect("id"),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "p", "namespace": ns, "uid": "u"},
                    "spec": {"serviceAccountName": sa, "containers": []},
                    "status": {"phase": "Running"}}))
                .expect("pod"),
            )
            .expect("valid")
        };
        let b = WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/b").expect("id");
        assert!(b.is_identity_of(&pod("cluster-1", "demo", "b"), "cluster-1"));
        assert!(!b.is_identity_of(&pod("cluster-1", "demo", "a"), "cluster-1"));
        assert!(!b.is_identity_of(&pod("cluster-1", "other", "b"), "cluster-1"));
        assert!(
            !b.is_identity_of(&pod("cluster-2", "demo", "b"), "cluster-2"),
            "the same namespace and account in another cluster's trust domain"
        );
    }
}
