//! What a connection to a ClusterIP goes to: one ready endpoint of the Service, at the port
//! the endpoint serves the dialled Service port on, so that policy is judged on the pod and the
//! port actually dialled (THREATS 17), never on the ClusterIP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::model::{ClusterId, EndpointSlice, Protocol, Service, ServicePort};
use crate::tracker::replica::Replica;

/// Why a connection to a ClusterIP cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// The Service declares the port but has no ready endpoint serving it.
    #[error("service {service} has no ready endpoint for port {port}")]
    NoReadyEndpoint {
        /// The Service, as `cluster/namespace/name`.
        service: String,
        /// The Service port dialled.
        port: u16,
    },
}

/// Spreads the connections to a Service over its endpoints; shared by every Service, which
/// spreads each as well as a counter of its own would, without one more map to keep.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Resolves `destination` if it is a ClusterIP and port of a TCP Service of `cluster` (the
/// node's own: ClusterIPs mean nothing outside their cluster): `Ok(None)` when it is not,
/// `Ok(Some(endpoint))` with one ready endpoint at its target port, or an error when the
/// Service has none (the connection is refused, never passed unresolved).
pub fn resolve(
    view: &Replica,
    cluster: &ClusterId,
    destination: SocketAddr,
) -> Result<Option<SocketAddr>, ServiceError> {
    resolve_nth(view, cluster, destination, || {
        NEXT.fetch_add(1, Ordering::Relaxed)
    })
}

/// As [`resolve`], taking the `turn()`-th ready endpoint (modulo their number), in the order
/// of the slices' keys and their endpoints: deterministic for tests.
fn resolve_nth(
    view: &Replica,
    cluster: &ClusterId,
    destination: SocketAddr,
    turn: impl FnOnce() -> usize,
) -> Result<Option<SocketAddr>, ServiceError> {
    // A dual-stack listener may report an IPv4 destination as IPv4-mapped IPv6; ClusterIPs
    // are kept as IPv4.
    let destination = SocketAddr::new(destination.ip().to_canonical(), destination.port());
    let Some(service) = view.service_at(cluster, destination, Protocol::Tcp) else {
        return Ok(None);
    };
    let Some(port) = service
        .ports
        .iter()
        .find(|p| p.port == destination.port() && p.protocol == Protocol::Tcp)
    else {
        // Not reached: the index holds only the ports a Service declares. Were it, the raw
        // destination is still judged by policy, never passed unevaluated.
        return Ok(None);
    };
    let v6 = destination.is_ipv6();
    // Counted, then walked again to the chosen one: a connection allocates nothing, however
    // large the Service.
    let ready = endpoints(view, service, port, v6).count();
    let name = || format!("{}/{}/{}", service.cluster, service.namespace, service.name);
    if ready == 0 {
        tracing::debug!(service = %name(), port = port.port, "no ready endpoint");
        return Err(ServiceError::NoReadyEndpoint {
            service: name(),
            port: port.port,
        });
    }
    let n = turn() % ready;
    let chosen = endpoints(view, service, port, v6).nth(n);
    tracing::trace!(service = %name(), %destination, endpoint = ?chosen, "resolved");
    // The same view answered both passes, so the n-th of `ready` endpoints exists; were it
    // somehow missing, refusing is the safe answer.
    chosen
        .map(Some)
        .ok_or_else(|| ServiceError::NoReadyEndpoint {
            service: name(),
            port: port.port,
        })
}

/// The ready endpoints of `service` for its port `port`, in the family asked for.
fn endpoints<'a>(
    view: &'a Replica,
    service: &'a Service,
    port: &'a ServicePort,
    v6: bool,
) -> impl Iterator<Item = SocketAddr> + 'a {
    view.endpoint_slices(service)
        .flat_map(move |slice| slice_endpoints(slice, port, v6))
}

/// The ready endpoints of one slice for Service port `port`: the slice's port of the same
/// name is the target port resolved for this slice's pods (a named target port may be a
/// different number on each), so a slice without it serves nothing for that port. Each
/// endpoint's first address of the family asked for (its addresses are fungible, as upstream
/// says); an endpoint with none is skipped.
fn slice_endpoints<'a>(
    slice: &'a EndpointSlice,
    port: &ServicePort,
    v6: bool,
) -> impl Iterator<Item = SocketAddr> + 'a {
    let target = slice
        .ports
        .iter()
        .find(|p| p.name == port.name && p.protocol == Protocol::Tcp)
        .map(|p| p.port);
    target.into_iter().flat_map(move |target| {
        slice
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(move |e| e.addresses.iter().find(|a| a.is_ipv6() == v6))
            .map(move |a| SocketAddr::new(*a, target))
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::json;

    use super::super::fixture::{c, replica_of, service, slice};
    use super::*;
    use crate::tracker::wire::Object;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn ready(ip: &str) -> serde_json::Value {
        json!({"addresses": [ip]})
    }

    fn not_ready(ip: &str) -> serde_json::Value {
        json!({"addresses": [ip], "conditions": {"ready": false}})
    }

    /// web: 80 → 8080 by number, 9000 → the named port `metrics`, which the two slices'
    /// pods number differently; db: every endpoint not ready; empty: no slice at all; dual:
    /// dual-stack, one slice of each family.
    fn objects() -> Vec<Object> {
        vec![
            service(
                "web",
                &["10.96.0.10"],
                json!([{"name": "http", "port": 80, "targetPort": 8080},
                       {"name": "metrics", "port": 9000, "targetPort": "metrics"}]),
            ),
            slice(
                "web-a",
                Some("web"),
                false,
                json!([ready("10.0.0.2"), not_ready("10.0.0.3")]),
                json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9100}]),
            ),
            slice(
                "web-b",
                Some("web"),
                false,
                json!([ready("10.0.0.4")]),
                json!([{"name": "http", "port": 8080}, {"name": "metrics", "port": 9200}]),
            ),
            service("db", &["10.96.0.11"], json!([{"port": 5432}])),
            slice(
                "db-a",
                Some("db"),
                false,
                json!([not_ready("10.0.0.5"), not_ready("10.0.0.6")]),
                json!([{"port": 5432}]),
            ),
            service("empty", &["10.96.0.12"], json!([{"port": 80}])),
            service(
                "dual",
                &["10.96.0.13", "fd00::13"],
                json!([{"port": 443, "targetPort": 8443}]),
            ),
            slice(
                "dual-4",
                Some("dual"),
                false,
                json!([ready("10.0.0.7")]),
                json!([{"port": 8443}]),
            ),
            slice(
                "dual-6",
                Some("dual"),
                true,
                json!([ready("fd00:10::7")]),
                json!([{"port": 8443}]),
            ),
        ]
    }

    /// Every endpoint `destination` resolves to over `n` turns.
    fn all(r: &Replica, destination: &str, n: usize) -> BTreeSet<SocketAddr> {
        (0..n)
            .map(|i| {
                resolve_nth(r, &c(), addr(destination), || i)
                    .expect("resolves")
                    .expect("a service")
            })
            .collect()
    }

    fn set(addrs: &[&str]) -> BTreeSet<SocketAddr> {
        addrs.iter().map(|a| addr(a)).collect()
    }

    #[test]
    fn a_cluster_ip_resolves_to_a_ready_endpoint_at_its_target_port() {
        let r = replica_of(objects(), true);
        assert_eq!(
            all(&r, "10.96.0.10:80", 4),
            set(&["10.0.0.2:8080", "10.0.0.4:8080"]),
            "both ready endpoints, by number, never the one not ready"
        );
        assert_eq!(
            all(&r, "10.96.0.10:9000", 4),
            set(&["10.0.0.2:9100", "10.0.0.4:9200"]),
            "a named target port, as each slice numbers it"
        );
        assert_eq!(
            all(&r, "[::ffff:10.96.0.10]:80", 4),
            set(&["10.0.0.2:8080", "10.0.0.4:8080"]),
            "an IPv4-mapped destination"
        );
        assert_eq!(all(&r, "10.96.0.13:443", 2), set(&["10.0.0.7:8443"]));
        assert_eq!(
            all(&r, "[fd00::13]:443", 2),
            set(&["[fd00:10::7]:8443"]),
            "endpoints of the destination's family only"
        );
        // The real counter spreads successive connections too.
        let seen: BTreeSet<SocketAddr> = (0..16)
            .filter_map(|_| resolve(&r, &c(), addr("10.96.0.10:80")).expect("resolves"))
            .collect();
        assert_eq!(seen, set(&["10.0.0.2:8080", "10.0.0.4:8080"]));
    }

    #[test]
    fn what_is_no_service_port_is_left_as_it_is() {
        let r = replica_of(objects(), true);
        for to in [
            "10.96.0.10:81",   // a port the Service does not declare
            "10.0.0.2:8080",   // an endpoint itself
            "203.0.113.9:443", // outside the cluster
            "[fd00::10]:80",   // web has no IPv6 ClusterIP
        ] {
            assert_eq!(resolve(&r, &c(), addr(to)), Ok(None), "{to}");
        }
        let other = crate::model::ClusterId::new("cluster-2").expect("id");
        assert_eq!(
            resolve(&r, &other, addr("10.96.0.10:80")),
            Ok(None),
            "ClusterIPs of another cluster mean nothing here"
        );
    }

    #[test]
    fn a_service_without_a_ready_endpoint_is_an_error_naming_it() {
        let r = replica_of(objects(), true);
        let e = resolve(&r, &c(), addr("10.96.0.11:5432")).expect_err("none ready");
        assert_eq!(
            e,
            ServiceError::NoReadyEndpoint {
                service: "cluster-1/demo/db".into(),
                port: 5432
            }
        );
        assert_eq!(
            e.to_string(),
            "service cluster-1/demo/db has no ready endpoint for port 5432"
        );
        assert!(
            matches!(resolve(&r, &c(), addr("10.96.0.12:80")), Err(ServiceError::NoReadyEndpoint { service, .. }) if service == "cluster-1/demo/empty"),
            "no slice at all"
        );
    }

    #[test]
    fn headless_services_and_odd_slices_resolve_to_nothing() {
        let mut odd = vec![
            service("headless", &["None"], json!([{"port": 80}])),
            slice(
                "headless-a",
                Some("headless"),
                false,
                json!([ready("10.0.0.8")]),
                json!([{"port": 80}]),
            ),
            service(
                "odd",
                &["10.96.0.20"],
                json!([{"name": "http", "port": 80}]),
            ),
            // No service-name label: it serves no Service, whatever it holds.
            slice(
                "stray",
                None,
                false,
                json!([ready("10.0.0.9")]),
                json!([{"name": "http", "port": 80}]),
            ),
            // Of another Service, or of the right name in another namespace (below).
            slice(
                "other",
                Some("web"),
                false,
                json!([ready("10.0.0.10")]),
                json!([{"name": "http", "port": 80}]),
            ),
            slice(
                "elsewhere",
                Some("odd"),
                false,
                json!([ready("10.0.0.15")]),
                json!([{"name": "http", "port": 80}]),
            ),
            // No port, or none of the Service port's name, or of another protocol.
            slice(
                "no-port",
                Some("odd"),
                false,
                json!([ready("10.0.0.11")]),
                json!([]),
            ),
            slice(
                "wrong-name",
                Some("odd"),
                false,
                json!([ready("10.0.0.12")]),
                json!([{"name": "grpc", "port": 80}]),
            ),
            slice(
                "udp",
                Some("odd"),
                false,
                json!([ready("10.0.0.13")]),
                json!([{"name": "http", "port": 80, "protocol": "UDP"}]),
            ),
            // An endpoint with no address.
            slice(
                "no-address",
                Some("odd"),
                false,
                json!([{"addresses": []}]),
                json!([{"name": "http", "port": 80}]),
            ),
        ];
        for o in &mut odd {
            if let Object::EndpointSlice(s) = o
                && s.name == "elsewhere"
            {
                s.namespace = "elsewhere".into();
            }
        }
        let r = replica_of(odd, true);
        assert_eq!(resolve(&r, &c(), addr("10.0.0.8:80")), Ok(None));
        assert!(
            r.service_at(&c(), addr("10.0.0.8:80"), Protocol::Tcp)
                .is_none(),
            "a headless Service has no address to match"
        );
        assert_eq!(
            resolve(&r, &c(), addr("10.96.0.20:80")),
            Err(ServiceError::NoReadyEndpoint {
                service: "cluster-1/demo/odd".into(),
                port: 80
            }),
            "none of those slices serves odd:80"
        );
        // An endpoint of the wrong family in a slice (which the wire refuses; a model object
        // built otherwise might not) is skipped, not dialled.
        let mut wrong = slice(
            "wrong-family",
            Some("odd"),
            false,
            json!([ready("10.0.0.14")]),
            json!([{"name": "http", "port": 80}]),
        );
        if let Object::EndpointSlice(s) = &mut wrong {
            s.endpoints[0].addresses = vec!["fd00::14".parse().expect("ip")];
        }
        let Object::EndpointSlice(wrong) = wrong else {
            unreachable!()
        };
        let odd_port = ServicePort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
            target_port: crate::model::TargetPort::Number(80),
        };
        assert_eq!(slice_endpoints(&wrong, &odd_port, false).count(), 0);
    }
}
