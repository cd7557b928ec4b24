//! Services and EndpointSlices: what a connection to a ClusterIP resolves to, validated.

use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels::{self, Labels};
use super::objects::{self, Protocol, port_field, protocol_field};
use super::{ClusterId, FieldError, ObjectError};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where a Service port sends traffic on the endpoint pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A container port name, resolved on each endpoint pod.
    Name(String),
}

/// A port of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Its name (required when a Service has several ports).
    pub name: Option<String>,
    /// The port clients dial on the ClusterIP.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// The port on the endpoint pod (the service port when unset).
    pub target_port: TargetPort,
}

/// A Service of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Cluster it belongs to.
    pub cluster: ClusterId,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// Its ClusterIPs (none for a headless Service), IPv4-mapped IPv6 normalised to IPv4.
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// The pods it selects (`None`: endpoints are managed by hand).
    pub selector: Option<Labels>,
}

impl Service {
    /// Converts the API object.
    pub fn from_api(cluster: &ClusterId, svc: &core::Service) -> Result<Self, ObjectError> {
        let (namespace, name, _) = objects::namespaced(&svc.metadata, "Service")?;
        let err = |field| ObjectError {
            kind: "Service",
            name: format!("{namespace}/{name}"),
            field,
        };
        let spec = svc.spec.clone().unwrap_or_default();
        let mut cluster_ips = Vec::new();
        let listed: Vec<(String, &String)> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips
                .iter()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip))
                .collect(),
            _ => spec
                .cluster_ip
                .iter()
                .map(|ip| ("spec.clusterIP".to_owned(), ip))
                .collect(),
        };
        for (at, ip) in listed {
            // "None" marks a headless Service; "" one whose address is not allocated yet.
            if ip == "None" || ip.is_empty() {
                continue;
            }
            cluster_ips.push(objects::parse_ip(ip).map_err(|m| err(FieldError::new(at, m)))?);
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let at = format!("spec.ports[{i}]");
            let port = port_field(&format!("{at}.port"), p.port).map_err(err)?;
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => {
                    TargetPort::Number(port_field(&format!("{at}.targetPort"), *n).map_err(err)?)
                }
                Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
            };
            ports.push(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port,
                protocol: protocol_field(&at, p.protocol.as_deref()).map_err(err)?,
                target_port,
            });
        }
        if let Some(selector) = &spec.selector {
            labels::validate_labels(selector)
                .map_err(|(key, msg)| err(FieldError::new(format!("spec.selector.{key}"), msg)))?;
        }
        Ok(Self {
            cluster: cluster.clone(),
            uid: objects::uid_of(&svc.metadata, cluster, "Service", &namespace, &name),
            namespace,
            name,
            cluster_ips,
            ports,
            selector: spec.selector.clone(),
        })
    }
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Its addresses (of the slice's address type).
    pub addresses: Vec<IpAddr>,
    /// Ready to receive traffic (unknown counts as ready, as upstream says).
    pub ready: bool,
    /// The pod behind it, by name, when the endpoint is a pod.
    pub pod: Option<String>,
    /// The node it is on.
    pub node: Option<String>,
}

/// A port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name it serves.
    pub name: Option<String>,
    /// The port on the endpoints.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
}

/// An EndpointSlice of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Cluster it belongs to.
    pub cluster: ClusterId,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: Option<String>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
    /// Ports.
    pub ports: Vec<SlicePort>,
}

impl EndpointSlice {
    /// Converts the API object; slices of FQDN endpoints are refused (weft routes to IPs).
    pub fn from_api(
        cluster: &ClusterId,
        slice: &discovery::EndpointSlice,
    ) -> Result<Self, ObjectError> {
        let (namespace, name, labels) = objects::namespaced(&slice.metadata, "EndpointSlice")?;
        let err = |field| ObjectError {
            kind: "EndpointSlice",
            name: format!("{namespace}/{name}"),
            field,
        };
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            other => {
                return Err(err(FieldError::new(
                    "addressType",
                    format!("unsupported address type {other:?}: must be IPv4 or IPv6"),
                )));
            }
        };
        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.iter().flatten().enumerate() {
            let at = format!("endpoints[{i}]");
            let mut addresses = Vec::new();
            for (j, a) in e.addresses.iter().enumerate() {
                let ip = objects::parse_ip(a)
                    .map_err(|m| err(FieldError::new(format!("{at}.addresses[{j}]"), m)))?;
                if ip.is_ipv6() != v6 {
                    return Err(err(FieldError::new(
                        format!("{at}.addresses[{j}]"),
                        format!(
                            "{a} is not of the slice's address type {}",
                            slice.address_type
                        ),
                    )));
                }
                addresses.push(ip);
            }
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone());
            endpoints.push(SliceEndpoint {
                addresses,
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
                pod,
                node: e.node_name.clone(),
            });
        }
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let at = format!("ports[{i}]");
            let Some(n) = p.port else {
                // A port left unset means every port: weft needs the number to route.
                return Err(err(FieldError::new(
                    format!("{at}.port"),
                    "is required by weft (an unset port means all ports)",
                )));
            };
            ports.push(SlicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: port_field(&format!("{at}.port"), n).map_err(err)?,
                protocol: protocol_field(&at, p.protocol.as_deref()).map_err(err)?,
            });
        }
        Ok(Self {
            cluster: cluster.clone(),
            uid: objects::uid_of(&slice.metadata, cluster, "EndpointSlice", &namespace, &name),
            service: labels.get(SERVICE_NAME_LABEL).cloned(),
            namespace,
            name,
            endpoints,
            ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn c() -> ClusterId {
        ClusterId::new("c1").expect("cluster id")
    }

    fn svc(v: serde_json::Value) -> Result<Service, ObjectError> {
        Service::from_api(&c(), &serde_json::from_value(v).expect("service"))
    }

    fn slice(v: serde_json::Value) -> Result<EndpointSlice, ObjectError> {
        EndpointSlice::from_api(&c(), &serde_json::from_value(v).expect("slice"))
    }

    #[test]
    fn services_with_target_ports_and_dual_stack() {
        let s = svc(json!({"metadata": {"name": "web", "namespace": "a"}, "spec": {
            "clusterIPs": ["10.96.0.10", "fd00::10"], "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}, {"port": 53, "protocol": "UDP"}]}}))
        .expect("valid");
        assert_eq!(s.cluster_ips.len(), 2);
        assert_eq!(s.ports[0].target_port, TargetPort::Name("http".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(53));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
        let headless =
            svc(json!({"metadata": {"name": "h"}, "spec": {"clusterIP": "None"}})).expect("valid");
        assert!(headless.cluster_ips.is_empty());
    }

    #[test]
    fn bad_services_name_the_field() {
        let cases = [
            (
                json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.96.0.300"}}),
                "spec.clusterIP",
            ),
            (
                json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 0}]}}),
                "spec.ports[0].port",
            ),
            (
                json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "targetPort": 70000}]}}),
                "spec.ports[0].targetPort",
            ),
            (
                json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}}),
                "spec.ports[0].protocol",
            ),
            (
                json!({"metadata": {"name": "s"}, "spec": {"selector": {"app": "a b"}}}),
                "spec.selector.app",
            ),
        ];
        for (v, path) in cases {
            assert_eq!(svc(v).unwrap_err().field.path, path);
        }
    }

    #[test]
    fn endpoint_slices_with_readiness_and_pods() {
        let s = slice(json!({"metadata": {"name": "web-1", "namespace": "a",
                "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "web-a"}, "nodeName": "n1"},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}
            ],
            "ports": [{"name": "http", "port": 8080}]}))
        .expect("valid");
        assert_eq!(s.service.as_deref(), Some("web"));
        assert!(s.endpoints[0].ready && !s.endpoints[1].ready);
        assert_eq!(s.endpoints[0].pod.as_deref(), Some("web-a"));
        assert_eq!(s.ports[0].port, 8080);
    }

    #[test]
    fn bad_endpoint_slices_name_the_field() {
        let cases = [
            (
                json!({"metadata": {"name": "s"}, "addressType": "FQDN"}),
                "addressType",
            ),
            (
                json!({"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [{"addresses": ["fd00::1"]}]}),
                "endpoints[0].addresses[0]",
            ),
            (
                json!({"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [{"addresses": ["x"]}]}),
                "endpoints[0].addresses[0]",
            ),
            (
                json!({"metadata": {"name": "s"}, "addressType": "IPv4", "ports": [{"name": "p"}]}),
                "ports[0].port",
            ),
            (
                json!({"metadata": {"name": "s"}, "addressType": "IPv4", "ports": [{"port": 70000}]}),
                "ports[0].port",
            ),
        ];
        for (v, path) in cases {
            assert_eq!(slice(v).unwrap_err().field.path, path);
        }
    }
}
