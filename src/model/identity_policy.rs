//! IdentityPolicy (`weft.dev/v1alpha1`), weft's own namespaced resource: the third layer of a
//! decision. It selects pods of its namespace as a NetworkPolicy does and admits peers by the
//! SPIFFE identity they proved: an exact id, or any id of a trust domain, a namespace, a
//! service account or a cluster — each field compared exactly, never as a pattern.
//!
//! ```yaml
//! apiVersion: weft.dev/v1alpha1
//! kind: IdentityPolicy
//! metadata: {name: web-from-client, namespace: demo}
//! spec:
//!   podSelector: {matchLabels: {app: web}}
//!   mode: Enforce            # or Audit: evaluated and reported, never enforced
//!   rules:
//!     - from:
//!         - spiffeId: spiffe://cluster-1/ns/demo/sa/client
//!         - {trustDomain: cluster-2, namespace: batch}
//!         - cluster: cluster-3
//!       ports: [{port: 80}, {port: 8000, endPort: 8099, protocol: TCP}]
//! ```

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use serde::Deserialize;

use super::labels::{validate_dns_label, validate_dns_subdomain};
use super::objects::{self, Protocol};
use super::selector::LabelSelector;
use super::{ClusterId, FieldError, ObjectError};
use crate::identity::{WorkloadId, id::trust_domain};

/// The API version of weft's identity resources.
pub const API_VERSION: &str = "weft.dev/v1alpha1";

/// Whether a policy's verdict is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Mode {
    /// Enforced: a selected pod admits only the peers a rule allows.
    #[default]
    Enforce,
    /// Evaluated the same way, its would-be verdict reported and counted, never enforced.
    Audit,
}

/// A validated IdentityPolicy of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityPolicy {
    /// Cluster it belongs to (and applies to).
    pub cluster: ClusterId,
    /// Namespace it belongs to (and applies to).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Which pods of its namespace it selects.
    pub pod_selector: LabelSelector,
    /// Enforced or audited.
    pub mode: Mode,
    /// Rules: a peer any of them allows is admitted.
    pub rules: Vec<IdentityRule>,
}

/// A rule: peers (empty: any proven identity) on ports (empty: every port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRule {
    /// Who; empty means any peer with a proven identity.
    pub from: Vec<IdentityPeer>,
    /// Where; empty means every port of every protocol.
    pub ports: Vec<IdentityPort>,
}

/// Which identities a peer entry admits: every field given must match exactly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityPeer {
    /// The trust domain.
    pub trust_domain: Option<String>,
    /// The namespace.
    pub namespace: Option<String>,
    /// The service account.
    pub service_account: Option<String>,
    /// The cluster whose trust domain the identity must be of.
    pub cluster: Option<ClusterId>,
}

/// A port entry: `port` through `end_port` of `protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityPort {
    /// The protocol (TCP when unset).
    pub protocol: Protocol,
    /// The first port.
    pub port: u16,
    /// The last port (`port` when unset).
    pub end_port: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Raw {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: meta::ObjectMeta,
    spec: RawSpec,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    pod_selector: meta::LabelSelector,
    mode: Option<String>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    from: Vec<RawPeer>,
    #[serde(default)]
    ports: Vec<RawPort>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeer {
    spiffe_id: Option<String>,
    trust_domain: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    cluster: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPort {
    protocol: Option<String>,
    port: u16,
    end_port: Option<u16>,
}

impl IdentityPeer {
    fn from_raw(raw: RawPeer, path: &str) -> Result<Self, FieldError> {
        let bad =
            |field: &str, message: String| FieldError::new(format!("{path}.{field}"), message);
        if let Some(id) = raw.spiffe_id {
            if raw.trust_domain.is_some()
                || raw.namespace.is_some()
                || raw.service_account.is_some()
                || raw.cluster.is_some()
            {
                return Err(FieldError::new(
                    path,
                    "spiffeId names one identity: give it alone",
                ));
            }
            let id = WorkloadId::parse(&id).map_err(|e| bad("spiffeId", e.to_string()))?;
            return Ok(Self {
                trust_domain: Some(id.trust_domain().to_owned()),
                namespace: Some(id.namespace().to_owned()),
                service_account: Some(id.service_account().to_owned()),
                cluster: None,
            });
        }
        if raw.trust_domain.is_none()
            && raw.namespace.is_none()
            && raw.service_account.is_none()
            && raw.cluster.is_none()
        {
            return Err(FieldError::new(
                path,
                "an empty peer would admit every identity: name a spiffeId, trustDomain, namespace, serviceAccount or cluster (or leave `from` empty)",
            ));
        }
        if let Some(td) = &raw.trust_domain {
            trust_domain(td).map_err(|e| bad("trustDomain", e.to_string()))?;
        }
        if let Some(ns) = &raw.namespace {
            validate_dns_label(ns).map_err(|e| bad("namespace", e))?;
        }
        if let Some(sa) = &raw.service_account {
            validate_dns_subdomain(sa).map_err(|e| bad("serviceAccount", e))?;
        }
        let cluster = raw
            .cluster
            .map(|c| ClusterId::new(&c).map_err(|e| bad("cluster", e.to_string())))
            .transpose()?;
        Ok(Self {
            trust_domain: raw.trust_domain,
            namespace: raw.namespace,
            service_account: raw.service_account,
            cluster,
        })
    }

    /// Whether `id` is admitted; `cluster_trust_domain` is the trust domain of this entry's
    /// cluster, when it names one.
    pub fn admits(&self, id: &WorkloadId, cluster_trust_domain: Option<&str>) -> bool {
        let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        same(&self.trust_domain, id.trust_domain())
            && same(&self.namespace, id.namespace())
            && same(&self.service_account, id.service_account())
            && (self.cluster.is_none() || cluster_trust_domain == Some(id.trust_domain()))
    }
}

impl IdentityPort {
    fn from_raw(raw: RawPort, path: &str) -> Result<Self, FieldError> {
        let protocol = match raw.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(p) => Protocol::from_api(p).ok_or_else(|| {
                FieldError::new(
                    format!("{path}.protocol"),
                    format!("{p:?} is not TCP, UDP or SCTP"),
                )
            })?,
        };
        if raw.port == 0 {
            return Err(FieldError::new(
                format!("{path}.port"),
                "must be between 1 and 65535",
            ));
        }
        let end_port = raw.end_port.unwrap_or(raw.port);
        if end_port < raw.port {
            return Err(FieldError::new(
                format!("{path}.endPort"),
                format!("{end_port} is below port {}", raw.port),
            ));
        }
        Ok(Self {
            protocol,
            port: raw.port,
            end_port,
        })
    }

    /// Whether `port` of `protocol` is in this entry.
    pub fn admits(&self, port: u16, protocol: Protocol) -> bool {
        self.protocol == protocol && (self.port..=self.end_port).contains(&port)
    }
}

impl IdentityPolicy {
    /// Validates an IdentityPolicy object of `cluster` (its JSON, as a manifest or the API
    /// server gives it). Unknown fields are errors: a misspelled field would widen access.
    pub fn from_value(cluster: &ClusterId, value: serde_json::Value) -> Result<Self, ObjectError> {
        let unnamed = |field| ObjectError {
            kind: "IdentityPolicy",
            name: value_name(&value),
            field,
        };
        let raw: Raw = serde_path_to_error::deserialize(value.clone())
            .map_err(|e| unnamed(FieldError::new(e.path().to_string(), e.inner().to_string())))?;
        let (namespace, name, _) = objects::namespaced(&raw.metadata, "IdentityPolicy")?;
        let err = |field| ObjectError {
            kind: "IdentityPolicy",
            name: format!("{namespace}/{name}"),
            field,
        };
        let pod_selector =
            LabelSelector::from_api(&raw.spec.pod_selector, "spec.podSelector").map_err(err)?;
        let mode = match raw.spec.mode.as_deref() {
            None | Some("Enforce") => Mode::Enforce,
            Some("Audit") => Mode::Audit,
            Some(other) => {
                return Err(err(FieldError::new(
                    "spec.mode",
                    format!("{other:?} is not Enforce or Audit"),
                )));
            }
        };
        let mut rules = Vec::new();
        for (r, rule) in raw.spec.rules.into_iter().enumerate() {
            let from = rule
                .from
                .into_iter()
                .enumerate()
                .map(|(p, peer)| {
                    IdentityPeer::from_raw(peer, &format!("spec.rules[{r}].from[{p}]"))
                })
                .collect::<Result<_, _>>()
                .map_err(err)?;
            let ports = rule
                .ports
                .into_iter()
                .enumerate()
                .map(|(p, port)| {
                    IdentityPort::from_raw(port, &format!("spec.rules[{r}].ports[{p}]"))
                })
                .collect::<Result<_, _>>()
                .map_err(err)?;
            rules.push(IdentityRule { from, ports });
        }
        Ok(Self {
            cluster: cluster.clone(),
            namespace,
            name,
            pod_selector,
            mode,
            rules,
        })
    }

    /// The rule (by index) that admits `id` on `port` of `protocol`, if any; `trust_domain_of`
    /// gives a cluster's trust domain.
    pub fn admitting_rule(
        &self,
        id: &WorkloadId,
        port: u16,
        protocol: Protocol,
        trust_domain_of: impl Fn(&ClusterId) -> Option<String>,
    ) -> Option<usize> {
        self.rules.iter().position(|rule| {
            let port_ok =
                rule.ports.is_empty() || rule.ports.iter().any(|p| p.admits(port, protocol));
            let peer_ok = rule.from.is_empty()
                || rule.from.iter().any(|peer| {
                    let td = peer.cluster.as_ref().and_then(&trust_domain_of);
                    peer.admits(id, td.as_deref())
                });
            port_ok && peer_ok
        })
    }
}

/// `namespace/name` from an object's metadata, for an error before it could be read whole.
fn value_name(value: &serde_json::Value) -> String {
    let meta = &value["metadata"];
    match (meta["namespace"].as_str(), meta["name"].as_str()) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.to_owned(),
        _ => "<unnamed>".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str) -> ClusterId {
        ClusterId::new(id).expect("id")
    }

    fn policy(spec: serde_json::Value) -> Result<IdentityPolicy, ObjectError> {
        IdentityPolicy::from_value(
            &c("cluster-1"),
            serde_json::json!({
                "apiVersion": API_VERSION, "kind": "IdentityPolicy",
                "metadata": {"name": "p", "namespace": "demo"},
                "spec": spec
            }),
        )
    }

    fn id(s: &str) -> WorkloadId {
        WorkloadId::parse(s).expect("id")
    }

    #[test]
    fn peers_match_exactly_by_each_field_given() {
        let p = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "rules": [
                {"from": [{"spiffeId": "spiffe://cluster-1/ns/demo/sa/client"}], "ports": [{"port": 80}]},
                {"from": [{"trustDomain": "cluster-2", "namespace": "batch"}]},
                {"from": [{"cluster": "cluster-3"}], "ports": [{"port": 8000, "endPort": 8099, "protocol": "UDP"}]}
            ]
        }))
        .expect("valid");
        assert_eq!(p.mode, Mode::Enforce);
        let td = |cluster: &ClusterId| Some(format!("td-of-{cluster}"));
        let tcp = Protocol::Tcp;
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-1/ns/demo/sa/client"), 80, tcp, td),
            Some(0)
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-1/ns/demo/sa/client"), 81, tcp, td),
            None
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-1/ns/demo/sa/clientx"), 80, tcp, td),
            None
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-2/ns/batch/sa/any"), 9, tcp, td),
            Some(1)
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-2/ns/batch2/sa/any"), 9, tcp, td),
            None
        );
        assert_eq!(
            p.admitting_rule(
                &id("spiffe://td-of-cluster-3/ns/x/sa/y"),
                8050,
                Protocol::Udp,
                td
            ),
            Some(2)
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://td-of-cluster-3/ns/x/sa/y"), 8050, tcp, td),
            None
        );
        assert_eq!(
            p.admitting_rule(&id("spiffe://cluster-3/ns/x/sa/y"), 8050, Protocol::Udp, td),
            None,
            "a cluster admits its trust domain, not its name"
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        for (spec, says) in [
            (serde_json::json!({"mode": "Permissive"}), "spec.mode"),
            (
                serde_json::json!({"rules": [{"from": [{}]}]}),
                "spec.rules[0].from[0]: an empty peer",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"spiffeId": "spiffe://td/ns/a/sa/b", "namespace": "a"}]}]}),
                "give it alone",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"spiffeId": "spiffe://TD/ns/a/sa/b"}]}]}),
                "spec.rules[0].from[0].spiffeId",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"spiffeId": "spiffe://td/ns/*/sa/b"}]}]}),
                "spiffeId",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"namespace": "A"}]}]}),
                "spec.rules[0].from[0].namespace",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"trustDomain": "Td"}]}]}),
                "trustDomain",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"cluster": "-x"}]}]}),
                "cluster",
            ),
            (
                serde_json::json!({"rules": [{"from": [{"serviceAcount": "a"}]}]}),
                "unknown field `serviceAcount`",
            ),
            (
                serde_json::json!({"rules": [{"ports": [{"port": 0}]}]}),
                "spec.rules[0].ports[0].port",
            ),
            (
                serde_json::json!({"rules": [{"ports": [{"port": 90, "endPort": 80}]}]}),
                "endPort",
            ),
            (
                serde_json::json!({"rules": [{"ports": [{"port": 90, "protocol": "ICMP"}]}]}),
                "protocol",
            ),
            (
                serde_json::json!({"podSelector": {"matchLabels": {"-bad": "x"}}}),
                "spec.podSelector",
            ),
            (
                serde_json::json!({"podSelectr": {}}),
                "unknown field `podSelectr`",
            ),
        ] {
            let e = policy(spec.clone()).expect_err(&spec.to_string());
            assert!(
                e.to_string().contains(says) && e.to_string().starts_with("IdentityPolicy demo/p"),
                "{spec}: {e}"
            );
        }
    }
}
