//! The outbound decision of a node: a connection captured from a local pod to its original
//! destination (for a Service's ClusterIP, the ready endpoint it resolves to) is judged by the
//! source cluster's egress (and, for a destination in this cluster, its ingress)
//! NetworkPolicies, then routed — to a pod of a meshed node through an
//! HBONE tunnel to that node (the source workload's certificate presented, the destination
//! workload's identity required), or directly. Nothing leaves before the view of this node's
//! cluster is complete.

use std::net::{IpAddr, SocketAddr};

use super::decision::{Decision, Denial, Direction, Layer};
use super::local::{local_pod, view_complete};
use super::services::{self, ServiceError};
use crate::identity::WorkloadId;
use crate::model::{ClusterId, Protocol};
use crate::policy::{Connection, Endpoint, Verdict};
use crate::tracker::replica::Replica;

/// Where an allowed connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HBONE tunnel to the destination pod's node.
    Tunnel {
        /// The source workload, whose certificate the tunnel presents.
        source: WorkloadId,
        /// Where the tunnel's connection goes: the destination pod's address on the HBONE
        /// port, which the pod's node captures (as ztunnel addresses it).
        node: SocketAddr,
        /// The destination workload, which the node must prove to be.
        destination: WorkloadId,
        /// The pod's address and port, the tunnel's authority.
        target: SocketAddr,
    },
    /// Directly: a destination weft does not serve (outside every cluster, a host-network
    /// pod, a pod whose node address is unknown).
    Direct {
        /// Where to connect.
        target: SocketAddr,
    },
}

/// Why a captured connection is not carried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// The view of this node's cluster is not complete: nothing is passed unevaluated.
    #[error("the view of cluster {0} is not complete yet")]
    NotReady(ClusterId),
    /// The source address is no live pod of this node.
    #[error("{0} is no pod of this node")]
    NotLocal(IpAddr),
    /// A destination the node must never dial for a pod (THREATS 15): loopback, link-local
    /// (the cloud metadata service among them), unspecified, multicast or broadcast.
    #[error("{0}: {1} destinations are never dialled for a pod")]
    Forbidden(SocketAddr, &'static str),
    /// The source pod has no workload identity to present.
    #[error("source pod {0} has no identity")]
    NoIdentity(String),
    /// The destination is a Service's ClusterIP with no ready endpoint for the port.
    #[error(transparent)]
    NoEndpoint(#[from] ServiceError),
    /// NetworkPolicy denies it.
    #[error("{from} -> {to}: egress {egress}; ingress {ingress}")]
    Denied {
        /// The source.
        from: String,
        /// The destination.
        to: SocketAddr,
        /// Why, for the source.
        egress: String,
        /// Why, for the destination.
        ingress: String,
        /// Whether the source's egress denies it (else the destination's ingress does).
        by_egress: bool,
    },
}

impl OutboundError {
    /// The layer that denies the connection, and why in one word.
    pub fn cause(&self) -> (Layer, Denial) {
        match self {
            OutboundError::NotReady(_) => (Layer::View, Denial::NotReady),
            OutboundError::NotLocal(_) => (Layer::Admission, Denial::UnknownSource),
            OutboundError::Forbidden(..) => (Layer::Admission, Denial::ForbiddenDestination),
            OutboundError::NoIdentity(_) => (Layer::Admission, Denial::NoIdentity),
            OutboundError::NoEndpoint(_) => (Layer::Admission, Denial::NoEndpoint),
            OutboundError::Denied { by_egress, .. } => (
                Layer::NetworkPolicy,
                if *by_egress {
                    Denial::Egress
                } else {
                    Denial::Ingress
                },
            ),
        }
    }
}

/// Routes a TCP connection captured on node `node` of `cluster` from `source` to its
/// original destination `original`, tunnels going to nodes' `hbone_port`.
pub fn route(
    view: &Replica,
    cluster: &ClusterId,
    node: &str,
    source: IpAddr,
    original: SocketAddr,
    hbone_port: u16,
) -> Result<Route, OutboundError> {
    route_explained(view, cluster, node, source, original, hbone_port).map(|(route, _)| route)
}

/// [`route`], with why NetworkPolicy allowed it and where it goes (for the decision log).
pub fn route_explained(
    view: &Replica,
    cluster: &ClusterId,
    node: &str,
    source: IpAddr,
    original: SocketAddr,
    hbone_port: u16,
) -> Result<(Route, String), OutboundError> {
    view_complete(view, cluster).map_err(|_| OutboundError::NotReady(cluster.clone()))?;
    if let Some(kind) = forbidden(original.ip()) {
        return Err(OutboundError::Forbidden(original, kind));
    }
    let engine = view.engine();
    let local = local_pod(view, cluster, node, source).ok_or(OutboundError::NotLocal(source))?;
    // A ClusterIP is never judged or dialled itself: the endpoint it resolves to, at its target
    // port, is what policy judges and what is dialled (THREATS 17).
    let original = services::resolve(view, cluster, original)?.unwrap_or(original);
    let src = engine.address_endpoint(source);
    let dst = engine.address_endpoint(original.ip());
    let connection = Connection {
        src,
        dst,
        port: original.port(),
        protocol: Protocol::Tcp,
    };
    let decision = engine.decide(&connection);
    let why = engine.explain(&connection, &decision);
    if decision.verdict() != Verdict::Allow {
        return Err(OutboundError::Denied {
            from: engine.pod_name(local),
            to: original,
            egress: why.egress.to_string(),
            ingress: why.ingress.to_string(),
            by_egress: !decision.egress.allows(),
        });
    }
    // A node holds its own cluster's policies only: another cluster's pod is judged for
    // ingress by its own node.
    let ingress = match dst {
        Endpoint::Pod { pod, .. } if engine.pod_cluster(pod) != Some(cluster) => {
            "judged at the destination's node".to_owned()
        }
        _ => why.ingress.to_string(),
    };
    let allowed = format!("egress {}; ingress {ingress}", why.egress);
    let direct = Route::Direct { target: original };
    let direct_allowed = format!("{allowed}; direct");
    let Endpoint::Pod { pod: to, .. } = dst else {
        return Ok((direct, direct_allowed));
    };
    let (Some(destination), Some(_)) = (
        engine.pod_identity(to),
        engine.pod_node_address(to, original.is_ipv6()),
    ) else {
        return Ok((direct, direct_allowed));
    };
    let source_id = engine
        .pod_identity(local)
        .ok_or_else(|| OutboundError::NoIdentity(engine.pod_name(local)))?;
    let node = SocketAddr::new(original.ip(), hbone_port);
    let tunnel = Route::Tunnel {
        source: source_id,
        node,
        destination,
        target: original,
    };
    Ok((tunnel, format!("{allowed}; tunnel to {node}")))
}

/// [`route_explained`] for a connection from `from`, with the decision it starts (the source
/// and destination pods and their identities, as the decision log names them): denied when
/// the connection may go nowhere, else still to be settled by carrying it.
pub fn judge(
    view: &Replica,
    cluster: &ClusterId,
    node: &str,
    from: SocketAddr,
    original: SocketAddr,
    hbone_port: u16,
) -> Result<(Route, String, Decision), Box<Decision>> {
    let routed = route_explained(view, cluster, node, from.ip(), original, hbone_port);
    let target = match &routed {
        Ok((Route::Tunnel { target, .. } | Route::Direct { target }, _)) => *target,
        Err(_) => original,
    };
    let mut decision = Decision::new(Direction::Outbound, from, target);
    let engine = view.engine();
    if let Some(pod) = local_pod(view, cluster, node, from.ip()) {
        decision.source_pod = Some(engine.pod_name(pod));
        decision.source_identity = engine.pod_identity(pod).map(|id| id.to_string());
    }
    if let Endpoint::Pod { pod, .. } = engine.address_endpoint(target.ip()) {
        decision.destination_pod = Some(engine.pod_name(pod));
        decision.destination_identity = engine.pod_identity(pod).map(|id| id.to_string());
    }
    match routed {
        Ok((route, why)) => Ok((route, why, decision)),
        Err(error) => {
            let (layer, denial) = error.cause();
            Err(Box::new(decision.denied(layer, denial, error.to_string())))
        }
    }
}

/// What kind of address `ip` is, if the node must never dial it for a pod: dialled from the
/// node, it would reach the node's own services or its cloud's metadata service.
fn forbidden(ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{c, node, replica_of, service, slice};
    use super::*;
    use crate::model::NetworkPolicy;
    use crate::tracker::wire::Object;

    /// A running pod whose service account is its app's name.
    fn pod(name: &str, node: &str, app: &str, ip: &str) -> Object {
        super::super::fixture::pod(name, node, app, app, "Running", ip)
    }

    /// client on node-a may reach web (node-b) on 80 only; db has no node address known.
    fn view(synced: bool) -> Replica {
        let egress = NetworkPolicy::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "client-out", "namespace": "demo"},
                "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 80}]},
                                    {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]},
                                    {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}]}]}}))
            .expect("policy"),
            &mut Vec::new(),
        )
        .expect("valid");
        replica_of(
            vec![
                node("node-a", "192.168.0.1"),
                node("node-b", "192.168.0.2"),
                pod("client", "node-a", "client", "10.0.0.1"),
                pod("web", "node-b", "web", "10.0.0.2"),
                pod("db", "node-c", "db", "10.0.0.3"),
                Object::NetworkPolicy(egress),
            ],
            synced,
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// The tunnel from the client pod to the web pod at `target`.
    fn client_to_web(target: &str) -> Route {
        Route::Tunnel {
            source: WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/client").expect("id"),
            node: addr("10.0.0.2:15008"),
            destination: WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/web").expect("id"),
            target: addr(target),
        }
    }

    #[test]
    fn allowed_connections_tunnel_to_pods_and_go_direct_elsewhere() {
        let r = view(true);
        let go = |to: &str| route(&r, &c(), "node-a", ip("10.0.0.1"), addr(to), 15008);
        assert_eq!(go("10.0.0.2:80"), Ok(client_to_web("10.0.0.2:80")));
        assert_eq!(
            go("203.0.113.9:443"),
            Ok(Route::Direct {
                target: addr("203.0.113.9:443")
            }),
            "outside every cluster"
        );
        assert_eq!(
            go("10.0.0.3:5432"),
            Ok(Route::Direct {
                target: addr("10.0.0.3:5432")
            }),
            "a pod whose node address is unknown"
        );
    }

    #[test]
    fn the_node_never_dials_loopback_link_local_or_metadata_for_a_pod() {
        let r = view(true);
        for to in [
            "127.0.0.1:15000",
            "169.254.169.254:80",
            "[::1]:15001",
            "[fe80::1]:80",
            "[::ffff:127.0.0.1]:80",
            "0.0.0.0:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
        ] {
            let e = route(&r, &c(), "node-a", ip("10.0.0.1"), addr(to), 15008).expect_err(to);
            assert!(matches!(e, OutboundError::Forbidden(..)), "{to}: {e}");
        }
    }

    #[test]
    fn denied_unknown_or_early_connections_are_not_carried() {
        let r = view(true);
        let e = route(
            &r,
            &c(),
            "node-a",
            ip("10.0.0.1"),
            addr("10.0.0.2:81"),
            15008,
        )
        .expect_err("port 81");
        assert!(
            matches!(&e, OutboundError::Denied { from, .. } if from == "cluster-1/demo/client"),
            "{e}"
        );
        assert!(e.to_string().contains("client-out"), "{e}");
        assert_eq!(e.cause(), (Layer::NetworkPolicy, Denial::Egress));
        assert_eq!(
            route(
                &r,
                &c(),
                "node-a",
                ip("10.0.0.2"),
                addr("10.0.0.1:80"),
                15008
            ),
            Err(OutboundError::NotLocal(ip("10.0.0.2"))),
            "web is not on node-a"
        );
        assert_eq!(
            OutboundError::NotLocal(ip("10.0.0.2")).cause(),
            (Layer::Admission, Denial::UnknownSource)
        );
        assert_eq!(
            OutboundError::NotReady(c()).cause(),
            (Layer::View, Denial::NotReady)
        );
        assert_eq!(
            route(
                &view(false),
                &c(),
                "node-a",
                ip("10.0.0.1"),
                addr("10.0.0.2:80"),
                15008
            ),
            Err(OutboundError::NotReady(c()))
        );
    }

    /// client may reach web pods on 8080 only, and anything in the ClusterIP range; Service
    /// `wrong` sends its port 80 to 9090 on web, `right` to 8080 (by name, `http`); `gone` has
    /// no ready endpoint.
    fn services_view() -> Replica {
        let egress = NetworkPolicy::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "client-out", "namespace": "demo"},
                "spec": {"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"],
                         "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 8080}]},
                                    {"to": [{"ipBlock": {"cidr": "10.96.0.0/16"}}]}]}}))
            .expect("policy"),
            &mut Vec::new(),
        )
        .expect("valid");
        let web = serde_json::json!([{"addresses": ["10.0.0.2"], "nodeName": "node-b"}]);
        replica_of(
            vec![
                node("node-a", "192.168.0.1"),
                node("node-b", "192.168.0.2"),
                pod("client", "node-a", "client", "10.0.0.1"),
                pod("web", "node-b", "web", "10.0.0.2"),
                Object::NetworkPolicy(egress),
                service(
                    "wrong",
                    &["10.96.0.10"],
                    serde_json::json!([{"port": 80, "targetPort": 9090}]),
                ),
                slice(
                    "wrong-a",
                    Some("wrong"),
                    false,
                    web.clone(),
                    serde_json::json!([{"port": 9090}]),
                ),
                service(
                    "right",
                    &["10.96.0.11"],
                    serde_json::json!([{"name": "web", "port": 80, "targetPort": "http"}]),
                ),
                slice(
                    "right-a",
                    Some("right"),
                    false,
                    web,
                    serde_json::json!([{"name": "web", "port": 8080}]),
                ),
                service("gone", &["10.96.0.12"], serde_json::json!([{"port": 80}])),
            ],
            true,
        )
    }

    #[test]
    fn policy_judges_the_endpoint_and_the_port_dialled_not_the_cluster_ip() {
        let r = services_view();
        let go = |to: &str| route(&r, &c(), "node-a", ip("10.0.0.1"), addr(to), 15008);
        // THREATS 17: 8080 allowed, the Service port maps to 9090. That the ClusterIP's range
        // is allowed changes nothing: the ClusterIP is not what is dialled.
        let e = go("10.96.0.10:80").expect_err("9090 is not allowed");
        assert!(
            matches!(&e, OutboundError::Denied { to, .. } if *to == addr("10.0.0.2:9090")),
            "{e}"
        );
        assert_eq!(
            go("10.96.0.11:80"),
            Ok(client_to_web("10.0.0.2:8080")),
            "a named target port resolved to 8080: the endpoint, tunnelled to its node"
        );
        // A port the Service does not declare is no Service: the raw address is judged (the
        // ClusterIP range is allowed) and dialled as it is.
        assert_eq!(
            go("10.96.0.10:81"),
            Ok(Route::Direct {
                target: addr("10.96.0.10:81")
            })
        );
        let e = go("10.96.0.12:80").expect_err("no endpoint");
        assert_eq!(
            e,
            OutboundError::NoEndpoint(ServiceError::NoReadyEndpoint {
                service: "cluster-1/demo/gone".into(),
                port: 80
            })
        );
        assert!(e.to_string().contains("cluster-1/demo/gone"), "{e}");
    }
}
