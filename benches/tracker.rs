//! Tracker benchmark at clusterset scale (10 clusters, 100,000 pods): tracker memory per pod,
//! snapshot time to one subscriber, and propagation latency from a change to every subscriber
//! (p50/p99) with 100 and 1,000 light subscribers (they decode and timestamp only; one
//! delta's encoding is shared by every stream), all over gRPC on loopback.
//!
//! Run: `cargo bench --bench tracker`.

mod common;
#[path = "../tests/tracking/mod.rs"]
mod tracking;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Rng, clusterset, rss_bytes};
use tracking::serve;
use weft::tracker::client;
use weft::tracker::server::{SNAPSHOT_PART_BYTES, Tracker};
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, cluster_objects, pb};

const ROUNDS: u64 = 50;

fn all_objects(set: &weft::model::ClusterSet) -> Change {
    Change {
        upserts: set.clusters.values().flat_map(cluster_objects).collect(),
        clusters: set
            .clusters
            .keys()
            .map(|id| pb::ClusterStatus {
                cluster: id.to_string(),
                synced: true,
                connected: true,
                ..Default::default()
            })
            .collect(),
        ..Change::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn request(resume: Option<pb::Position>) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        policy_scope: pb::PolicyScope::AllClusters.into(),
        resume,
        ..Default::default()
    }
}

/// `subscribers` light subscribers from the current position; returns when a round of
/// changes has reached all of them: the latencies, sorted.
async fn propagation(
    tracker: &Tracker,
    url: &client::Target,
    subscribers: usize,
    set: &weft::model::ClusterSet,
) -> Vec<Duration> {
    let start = tracker.position();
    let last = start.revision + ROUNDS;
    let received: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut channels = Vec::new();
    for _ in 0..subscribers.div_ceil(100) {
        channels.push(client::connect(url).await.expect("connect"));
    }
    let mut tasks = Vec::new();
    for i in 0..subscribers {
        let mut c = channels[i % channels.len()].clone();
        let received = received.clone();
        let from = start.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = c
                .subscribe(request(Some(from)))
                .await
                .expect("subscribe")
                .into_inner();
            while let Some(u) = stream.message().await.expect("stream") {
                let at = Instant::now();
                let revision = u.position.map_or(0, |p| p.revision);
                received.lock().expect("lock").push((revision, at));
                if revision >= last {
                    return;
                }
            }
        }));
    }
    // Let every subscription start before the first change.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sent = Vec::new();
    let mut pod = set.pods().next().expect("a pod").clone();
    for round in 0..ROUNDS {
        pod.labels.insert("round".into(), round.to_string());
        let at = Instant::now();
        tracker.apply(Change {
            upserts: vec![Object::Pod(pod.clone())],
            ..Change::default()
        });
        sent.push((start.revision + round + 1, at));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.expect("subscriber");
    }
    let received = received.lock().expect("lock");
    let mut latencies: Vec<Duration> = received
        .iter()
        .filter_map(|(rev, at)| {
            let (_, sent_at) = sent.iter().find(|(r, _)| r == rev)?;
            Some(at.duration_since(*sent_at))
        })
        .collect();
    assert_eq!(
        latencies.len(),
        subscribers * ROUNDS as usize,
        "every change reached every subscriber"
    );
    latencies.sort();
    latencies
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let set = clusterset(&mut Rng(0x9E37_79B9_7F4A_7C15));
    let pods = set.pods().count();
    let change = all_objects(&set);
    let rss_before = rss_bytes();
    let tracker = Tracker::new(View::new("bench", 10_000), SNAPSHOT_PART_BYTES);
    tracker.apply(change);
    let rss_after = rss_bytes();
    let per_pod = rss_after.saturating_sub(rss_before) as f64 / pods as f64;

    runtime.block_on(async {
        let url = serve(&tracker).await;

        // Snapshot to one subscriber: every part received and decoded.
        let t = Instant::now();
        let mut c = client::connect(&url).await.expect("connect");
        let mut stream = c.subscribe(request(None)).await.expect("subscribe").into_inner();
        let mut parts = 0;
        while let Some(u) = stream.message().await.expect("stream") {
            parts += 1;
            if let Some(pb::update::Change::Snapshot(p)) = &u.change
                && p.last
            {
                break;
            }
        }
        let snapshot = t.elapsed();
        drop(stream);
        // And into a ready replica: validated, and compiled into the policy engine.
        let t = Instant::now();
        client::sync(&url, request(None), Duration::from_secs(60))
            .await
            .expect("synced");
        let replica = t.elapsed();

        println!("weft tracker, 10 clusters, {pods} pods, {} policies:", set.policies().count());
        println!(
            "  memory: {:.0} bytes per pod (RSS growth for the whole view / pods; target <= 1024)",
            per_pod
        );
        println!("  snapshot to one subscriber: {snapshot:.2?} ({parts} parts); into a ready replica: {replica:.2?}");
        for subscribers in [100, 1000] {
            let l = propagation(&tracker, &url, subscribers, &set).await;
            println!(
                "  propagation to {subscribers} subscribers: p50 {:.2?}, p99 {:.2?}, max {:.2?} (target p99 <= 50 ms at 1,000)",
                percentile(&l, 0.5),
                percentile(&l, 0.99),
                percentile(&l, 1.0)
            );
        }
    });
}
