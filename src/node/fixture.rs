//! Objects and views for the node module's tests: one cluster, `cluster-1`, namespace `demo`.

use crate::model::{ClusterId, Node, Pod};
use crate::tracker::replica::Replica;
use crate::tracker::view::{Change, Scope, View};
use crate::tracker::wire::{Object, pb};

/// `cluster-1`.
pub(super) fn c() -> ClusterId {
    ClusterId::new("cluster-1").expect("id")
}

/// Pod `name` of `demo` on `node`, labelled `app`, running as `sa`.
pub(super) fn pod(name: &str, node: &str, app: &str, sa: &str, phase: &str, ip: &str) -> Object {
    pod_on(name, node, app, sa, phase, ip, false)
}

/// As [`pod`], on the host's network when `host`.
pub(super) fn pod_on(
    name: &str,
    node: &str,
    app: &str,
    sa: &str,
    phase: &str,
    ip: &str,
    host: bool,
) -> Object {
    Object::Pod(
        Pod::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo", "uid": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "serviceAccountName": sa, "hostNetwork": host, "containers": []},
                "status": {"phase": phase, "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

/// Node `name` of `cluster-1` at `ip`.
pub(super) fn node(name: &str, ip: &str) -> Object {
    Object::Node(
        Node::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
            .expect("node"),
        )
        .expect("valid"),
    )
}

/// `cluster-1`'s status, synced or not, in `trust_domain` (empty: derived from the id).
pub(super) fn status(synced: bool, trust_domain: &str) -> pb::ClusterStatus {
    pb::ClusterStatus {
        cluster: "cluster-1".into(),
        synced,
        connected: true,
        trust_domain: trust_domain.into(),
        ..Default::default()
    }
}

/// A replica fed `view`'s snapshot.
pub(super) fn replica(view: &View) -> Replica {
    let mut r = Replica::new();
    for part in view.snapshot(&Scope::AllClusters, 1 << 20) {
        r.apply(part).expect("part");
    }
    r
}

/// A replica of `objects` with `cluster-1` synced or not.
pub(super) fn replica_of(objects: Vec<Object>, synced: bool) -> Replica {
    let mut view = View::new("e", 100);
    view.apply(Change {
        upserts: objects,
        clusters: vec![status(synced, "")],
        ..Change::default()
    });
    replica(&view)
}

/// Service `name` of `demo` at `cluster_ips` (`["None"]`: headless) with `ports`, as the API
/// has them.
pub(super) fn service(name: &str, cluster_ips: &[&str], ports: serde_json::Value) -> Object {
    Object::Service(
        crate::model::Service::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo"},
                "spec": {"clusterIPs": cluster_ips, "selector": {"app": name}, "ports": ports}}))
            .expect("service"),
        )
        .expect("valid"),
    )
}

/// EndpointSlice `name` of `demo` serving Service `service` (none: no service-name label),
/// IPv6 when `v6`, with `endpoints` and `ports` as the API has them.
pub(super) fn slice(
    name: &str,
    service: Option<&str>,
    v6: bool,
    endpoints: serde_json::Value,
    ports: serde_json::Value,
) -> Object {
    let labels: serde_json::Map<String, serde_json::Value> = service
        .map(|s| (crate::model::service::SERVICE_NAME_LABEL.into(), s.into()))
        .into_iter()
        .collect();
    Object::EndpointSlice(
        crate::model::EndpointSlice::from_api(
            &c(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo", "labels": labels},
                "addressType": if v6 { "IPv6" } else { "IPv4" },
                "endpoints": endpoints, "ports": ports}))
            .expect("slice"),
        )
        .expect("valid"),
    )
}
