//! Namespaces, pods and nodes: the parts of the API objects weft uses, validated.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::labels::{self, ClusterLabelCorrection, Labels};
use super::{ClusterId, FieldError, ObjectError};

/// A transport protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses the API spelling exactly (`TCP`, `UDP`, `SCTP`).
    pub fn from_api(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace of one cluster, with its authoritative labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Cluster it belongs to.
    pub cluster: ClusterId,
    /// Name.
    pub name: String,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// Labels, including the name label and the cluster labels.
    pub labels: Labels,
}

impl Namespace {
    /// A namespace with only its automatic labels (implied by a pod or policy in it).
    pub fn implied(cluster: &ClusterId, name: &str) -> Self {
        let (labels, _) = labels::namespace_labels(cluster, name, Labels::new());
        Self {
            cluster: cluster.clone(),
            name: name.to_owned(),
            uid: derived_uid(cluster, "Namespace", "", name),
            labels,
        }
    }

    /// Converts the API object; also returns the cluster labels it claimed wrongly.
    pub fn from_api(
        cluster: &ClusterId,
        ns: &core::Namespace,
    ) -> Result<(Self, Vec<ClusterLabelCorrection>), ObjectError> {
        let name = object_name(&ns.metadata, "Namespace", None)?;
        let err = |field| ObjectError {
            kind: "Namespace",
            name: name.clone(),
            field,
        };
        labels::validate_dns_label(&name).map_err(|m| err(FieldError::new("metadata.name", m)))?;
        let declared = metadata_labels(&ns.metadata).map_err(err)?;
        let (labels, corrections) = labels::namespace_labels(cluster, &name, declared);
        Ok((
            Self {
                cluster: cluster.clone(),
                uid: uid_of(&ns.metadata, cluster, "Namespace", "", &name),
                name,
                labels,
            },
            corrections,
        ))
    }
}

/// The lifecycle phase of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum PodPhase {
    /// Accepted, not all containers running yet (also the phase of a pod with no status).
    #[default]
    Pending,
    /// Bound to a node, containers running.
    Running,
    /// All containers terminated successfully.
    Succeeded,
    /// All containers terminated, at least one in failure.
    Failed,
    /// State could not be obtained.
    Unknown,
}

impl FromStr for PodPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            "Unknown" => PodPhase::Unknown,
            other => return Err(format!("unknown pod phase {other:?}")),
        })
    }
}

/// A port a container declares, in container order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    /// The port's name, if any (what named NetworkPolicy ports refer to).
    pub name: Option<String>,
    /// Port number.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// A pod, keyed by (cluster, uid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// Cluster it belongs to.
    pub cluster: ClusterId,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Phase.
    pub phase: PodPhase,
    /// Addresses (`status.podIPs`, else `status.podIP`), IPv4-mapped IPv6 normalised to IPv4.
    pub ips: Vec<IpAddr>,
    /// Whether the pod uses its node's network namespace.
    pub host_network: bool,
    /// Node it is scheduled on.
    pub node_name: Option<String>,
    /// Service account (`default` when unset).
    pub service_account: String,
    /// Ports of its containers and of its restartable (sidecar) init containers, in order.
    pub ports: Vec<ContainerPort>,
}

impl Pod {
    /// Whether the pod owns its IPs: alive, not on the host network, and addressed.
    pub fn owns_ips(&self) -> bool {
        !self.host_network
            && matches!(self.phase, PodPhase::Running | PodPhase::Pending)
            && !self.ips.is_empty()
    }

    /// The pod's address of the family of `v6`.
    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// The number of the first container port named `name` with `protocol`.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.protocol == protocol && p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    /// Converts the API object.
    pub fn from_api(cluster: &ClusterId, pod: &core::Pod) -> Result<Self, ObjectError> {
        let (namespace, name, labels) = namespaced(&pod.metadata, "Pod")?;
        let err = |field| ObjectError {
            kind: "Pod",
            name: format!("{namespace}/{name}"),
            field,
        };
        let spec = pod.spec.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        let phase = match &status.phase {
            Some(p) => p
                .parse()
                .map_err(|m: String| err(FieldError::new("status.phase", m)))?,
            None => PodPhase::Pending,
        };
        let mut ips = Vec::new();
        match &status.pod_ips {
            Some(list) if !list.is_empty() => {
                for (i, p) in list.iter().enumerate() {
                    ips.push(
                        parse_ip(&p.ip).map_err(|m| {
                            err(FieldError::new(format!("status.podIPs[{i}].ip"), m))
                        })?,
                    );
                }
            }
            _ => {
                if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
                    ips.push(parse_ip(ip).map_err(|m| err(FieldError::new("status.podIP", m)))?);
                }
            }
        }
        if ips.len() > 2 || (ips.len() == 2 && ips[0].is_ipv6() == ips[1].is_ipv6()) {
            return Err(err(FieldError::new(
                "status.podIPs",
                "at most one address of each family",
            )));
        }
        let mut ports = Vec::new();
        let sidecars = spec
            .init_containers
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
            .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
        let containers = spec
            .containers
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.containers[{i}]"), c));
        // Sidecar init containers start before the main containers, so they come first.
        for (at, c) in sidecars.chain(containers) {
            for (j, p) in c.ports.iter().flatten().enumerate() {
                let at = format!("{at}.ports[{j}]");
                let port =
                    port_field(&format!("{at}.containerPort"), p.container_port).map_err(err)?;
                let protocol = protocol_field(&at, p.protocol.as_deref()).map_err(err)?;
                ports.push(ContainerPort {
                    name: p.name.clone().filter(|n| !n.is_empty()),
                    port,
                    protocol,
                });
            }
        }
        Ok(Self {
            cluster: cluster.clone(),
            uid: uid_of(&pod.metadata, cluster, "Pod", &namespace, &name),
            namespace,
            name,
            labels,
            phase,
            ips,
            host_network: spec.host_network.unwrap_or(false),
            node_name: spec.node_name.clone().filter(|n| !n.is_empty()),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            ports,
        })
    }
}

/// A node of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Cluster it belongs to.
    pub cluster: ClusterId,
    /// Name.
    pub name: String,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// Labels.
    pub labels: Labels,
    /// Its `InternalIP` addresses: where host-network pods' traffic comes from.
    pub addresses: Vec<IpAddr>,
}

impl Node {
    /// The node's address of the family of `v6`.
    pub fn ip(&self, v6: bool) -> Option<IpAddr> {
        self.addresses.iter().copied().find(|ip| ip.is_ipv6() == v6)
    }

    /// Converts the API object.
    pub fn from_api(cluster: &ClusterId, node: &core::Node) -> Result<Self, ObjectError> {
        let name = object_name(&node.metadata, "Node", None)?;
        let err = |field| ObjectError {
            kind: "Node",
            name: name.clone(),
            field,
        };
        let labels = metadata_labels(&node.metadata).map_err(err)?;
        let mut addresses = Vec::new();
        let list = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, a) in list.into_iter().flatten().enumerate() {
            if a.type_ == "InternalIP" {
                addresses.push(parse_ip(&a.address).map_err(|m| {
                    err(FieldError::new(format!("status.addresses[{i}].address"), m))
                })?);
            }
        }
        Ok(Self {
            cluster: cluster.clone(),
            uid: uid_of(&node.metadata, cluster, "Node", "", &name),
            name,
            labels,
            addresses,
        })
    }
}

/// The protocol field of the entry at `at` (TCP when unset).
pub(crate) fn protocol_field(at: &str, p: Option<&str>) -> Result<Protocol, FieldError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::from_api(s).ok_or_else(|| {
            FieldError::new(
                format!("{at}.protocol"),
                format!("unsupported protocol {s:?}: must be TCP, UDP or SCTP"),
            )
        }),
    }
}

/// A port number field at `at`: 1 to 65535.
pub(crate) fn port_field(at: &str, n: i32) -> Result<u16, FieldError> {
    u16::try_from(n)
        .ok()
        .filter(|&n| n != 0)
        .ok_or_else(|| FieldError::new(at, format!("{n} is not a port between 1 and 65535")))
}

/// Parses an address, normalising IPv4-mapped IPv6 to IPv4.
pub fn parse_ip(s: &str) -> Result<IpAddr, String> {
    s.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| format!("invalid IP address {s:?}"))
}

/// The namespace of a namespaced object (`default` when unset).
pub fn object_namespace(meta: &ObjectMeta) -> String {
    meta.namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// The name of an object, required.
pub fn object_name(
    meta: &ObjectMeta,
    kind: &'static str,
    namespace: Option<&str>,
) -> Result<String, ObjectError> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(n.to_owned()),
        _ => Err(ObjectError {
            kind,
            name: namespace.map_or_else(|| "<unnamed>".into(), |ns| format!("{ns}/<unnamed>")),
            field: FieldError::new("metadata.name", "is required"),
        }),
    }
}

/// The namespace (`default` when unset), name and validated labels of a namespaced object.
pub(crate) fn namespaced(
    meta: &ObjectMeta,
    kind: &'static str,
) -> Result<(String, String, Labels), ObjectError> {
    let namespace = object_namespace(meta);
    let name = object_name(meta, kind, Some(&namespace))?;
    let labels = metadata_labels(meta).map_err(|field| ObjectError {
        kind,
        name: format!("{namespace}/{name}"),
        field,
    })?;
    Ok((namespace, name, labels))
}

/// The object's labels, validated.
pub fn metadata_labels(meta: &ObjectMeta) -> Result<Labels, FieldError> {
    let labels = meta.labels.clone().unwrap_or_default();
    labels::validate_labels(&labels).map_err(|(key, msg)| {
        let at = if key.is_empty() {
            "metadata.labels".to_owned()
        } else {
            format!("metadata.labels.{key}")
        };
        FieldError::new(at, msg)
    })?;
    Ok(labels)
}

/// The object's UID, or one derived deterministically from its identity.
pub fn uid_of(meta: &ObjectMeta, cluster: &ClusterId, kind: &str, ns: &str, name: &str) -> String {
    match meta.uid.as_deref() {
        Some(u) if !u.is_empty() => u.to_owned(),
        _ => derived_uid(cluster, kind, ns, name),
    }
}

/// A UUID (v5) derived from (cluster, kind, namespace, name): stable across loads.
pub fn derived_uid(cluster: &ClusterId, kind: &str, ns: &str, name: &str) -> String {
    let key = format!("{cluster}\0{kind}\0{ns}\0{name}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> ClusterId {
        ClusterId::new("c1").unwrap()
    }

    fn pod(json: serde_json::Value) -> Result<Pod, ObjectError> {
        Pod::from_api(&c(), &serde_json::from_value(json).unwrap())
    }

    #[test]
    fn pod_defaults_and_dual_stack() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "::ffff:10.0.0.2"}]}
        }));
        // ::ffff:10.0.0.2 is IPv4, so this pod claims two IPv4 addresses.
        assert_eq!(p.unwrap_err().field.path, "status.podIPs");
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": {"phase": "Running", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap();
        assert_eq!(p.namespace, "default");
        assert_eq!(p.service_account, "default");
        assert_eq!(p.ip(false), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(p.ip(true), Some("fd00::1".parse().unwrap()));
        assert_eq!(p.named_port("http", Protocol::Tcp), Some(80));
        assert_eq!(p.named_port("http", Protocol::Udp), None);
        assert!(p.owns_ips());
        assert_eq!(p.uid, derived_uid(&c(), "Pod", "default", "a"));
    }

    #[test]
    fn named_ports_first_in_container_order_with_sidecars() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {
                "initContainers": [
                    {"name": "once", "ports": [{"name": "p", "containerPort": 1}]},
                    {"name": "side", "restartPolicy": "Always", "ports": [{"name": "p", "containerPort": 2}]}
                ],
                "containers": [{"name": "c", "ports": [{"name": "p", "containerPort": 3}, {"name": "p", "containerPort": 4, "protocol": "UDP"}]}]
            }
        }))
        .unwrap();
        assert_eq!(p.named_port("p", Protocol::Tcp), Some(2));
        assert_eq!(p.named_port("p", Protocol::Udp), Some(4));
        assert!(!p.owns_ips(), "no IP yet");
    }

    #[test]
    fn bad_pods_name_the_field() {
        let cases = [
            (
                serde_json::json!({"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.300"}}),
                "status.podIP",
            ),
            (
                serde_json::json!({"metadata": {"name": "a"}, "status": {"phase": "Sleeping"}}),
                "status.phase",
            ),
            (
                serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 70000}]}]}}),
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                serde_json::json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "tcp"}]}]}}),
                "spec.containers[0].ports[0].protocol",
            ),
            (
                serde_json::json!({"metadata": {"name": "a", "labels": {"app": "a b"}}}),
                "metadata.labels.app",
            ),
            (serde_json::json!({"metadata": {}}), "metadata.name"),
        ];
        for (json, path) in cases {
            assert_eq!(pod(json).unwrap_err().field.path, path);
        }
    }

    #[test]
    fn host_network_pods_own_no_ip() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "a"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Running", "podIP": "192.168.0.1"}
        }))
        .unwrap();
        assert!(!p.owns_ips());
    }
}
