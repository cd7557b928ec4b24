//! The tracker's admin endpoint: ready once every cluster is synced, and metrics per
//! cluster (synced, connected, expired, staleness, last event, objects by kind) and of the
//! service (subscribers, snapshots, resumptions, laggards, refusals), read from the view at
//! each scrape so that they never disagree with it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::server::Tracker;
use crate::admin::Report;

type Labels = Vec<(&'static str, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Gauges {
    let family = Gauges::default();
    registry.register(name, help, family.clone());
    family
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: &AtomicU64) {
    let c: Counter = Counter::default();
    c.inc_by(value.load(Ordering::Relaxed));
    registry.register(name, help, c);
}

fn level(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge<i64, AtomicI64> = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

impl Report for Tracker {
    fn ready(&self) -> Result<(), String> {
        self.read(|view| {
            let unsynced: Vec<&str> = view
                .clusters()
                .filter(|s| !s.synced)
                .map(|s| s.cluster.as_str())
                .collect();
            if view.clusters().next().is_none() {
                Err("no cluster yet".into())
            } else if !unsynced.is_empty() {
                Err(format!("not synced: {}", unsynced.join(", ")))
            } else {
                Ok(())
            }
        })
    }

    fn metrics(&self) -> String {
        let mut registry = Registry::with_prefix("weft_tracker");
        let synced = gauge(
            &mut registry,
            "cluster_synced",
            "The cluster's initial list completed (1) or not (0).",
        );
        let connected = gauge(
            &mut registry,
            "cluster_connected",
            "The cluster's source answers (1) or not (0).",
        );
        let expired = gauge(
            &mut registry,
            "cluster_expired",
            "Stale past the maximum staleness: its pods match no selector.",
        );
        let stale = gauge(
            &mut registry,
            "cluster_stale_seconds",
            "How long the cluster's data has been stale (0 when fresh).",
        );
        let last_event = gauge(
            &mut registry,
            "cluster_last_event_timestamp_seconds",
            "When the last event from the cluster arrived (Unix time).",
        );
        let objects = gauge(
            &mut registry,
            "objects",
            "Objects held, by cluster and kind.",
        );
        let revision = self.read(|view| {
            for s in view.clusters() {
                let l = vec![("cluster", s.cluster.clone())];
                synced.get_or_create(&l).set(flag(s.synced));
                connected.get_or_create(&l).set(flag(s.connected));
                expired.get_or_create(&l).set(flag(s.expired));
                stale.get_or_create(&l).set(s.stale_for_ms as f64 / 1000.0);
                last_event
                    .get_or_create(&l)
                    .set(s.last_event_unix_ms as f64 / 1000.0);
            }
            for (cluster, kind, n) in view.counts() {
                let kind = kind
                    .as_str_name()
                    .trim_start_matches("KIND_")
                    .to_lowercase();
                objects
                    .get_or_create(&vec![("cluster", cluster.to_string()), ("kind", kind)])
                    .set(n as f64);
            }
            view.position().revision
        });
        let stats = self.stats();
        level(
            &mut registry,
            "revision",
            "The view's revision in this epoch.",
            i64::try_from(revision).unwrap_or(i64::MAX),
        );
        level(
            &mut registry,
            "subscribers",
            "Subscribers being fed now.",
            stats.subscribers.load(Ordering::Relaxed),
        );
        counter(
            &mut registry,
            "snapshots",
            "Snapshots sent.",
            &stats.snapshots,
        );
        counter(
            &mut registry,
            "resumptions",
            "Subscribers that resumed with only what they missed.",
            &stats.resumed,
        );
        counter(
            &mut registry,
            "lagged_subscribers",
            "Subscribers that fell behind and were sent a fresh snapshot.",
            &stats.lagged,
        );
        counter(
            &mut registry,
            "refused_subscriptions",
            "Subscriptions refused.",
            &stats.refused,
        );
        counter(
            &mut registry,
            "unowned_changes",
            "Changes refused because another source owns their cluster.",
            &stats.unowned,
        );
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &registry);
        text
    }
}
