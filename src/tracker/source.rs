//! Where the view comes from. So far: a clusterset directory, loaded whole (watching it for
//! changes, kubeconfigs and an upstream tracker come next).

use super::view::Change;
use super::wire::{Object, pb};
use crate::model::ClusterSet;

/// Every object of `set`, and each cluster synced and connected.
pub fn clusterset_change(set: &ClusterSet) -> Change {
    let mut change = Change::default();
    for cluster in set.clusters.values() {
        change
            .upserts
            .extend(cluster.namespaces.values().cloned().map(Object::Namespace));
        change
            .upserts
            .extend(cluster.nodes.values().cloned().map(Object::Node));
        change
            .upserts
            .extend(cluster.pods.values().cloned().map(Object::Pod));
        change
            .upserts
            .extend(cluster.services.values().cloned().map(Object::Service));
        change.upserts.extend(
            cluster
                .endpoint_slices
                .values()
                .cloned()
                .map(Object::EndpointSlice),
        );
        change.upserts.extend(
            cluster
                .policies
                .values()
                .cloned()
                .map(Object::NetworkPolicy),
        );
        change.clusters.push(pb::ClusterStatus {
            cluster: cluster.id.to_string(),
            unique_id: cluster.settings.uid.clone().unwrap_or_default(),
            trust_domain: cluster.settings.trust_domain.clone().unwrap_or_default(),
            network: cluster.settings.network.clone().unwrap_or_default(),
            synced: true,
            connected: true,
            ..Default::default()
        });
    }
    change
}
