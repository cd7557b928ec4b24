//! The tracker's admin endpoint over real HTTP: readiness only once every cluster is synced
//! (naming those that are not), metrics per cluster and of the service read from the view,
//! and clear answers to what it does not serve.

mod tracking;

use tracking::http;

use tokio::io::AsyncWriteExt as _;
use weft::model::{ClusterId, Pod};
use weft::tracker::server::Tracker;
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, pb};

fn status(cluster: &str, synced: bool, stale_for_ms: u64) -> pb::ClusterStatus {
    pb::ClusterStatus {
        cluster: cluster.into(),
        synced,
        connected: stale_for_ms == 0,
        stale_for_ms,
        last_event_unix_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

fn pod(name: &str, ip: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &ClusterId::new("c1").expect("id"),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "a", "uid": format!("uid-{name}")},
                "status": {"phase": "Running", "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

#[tokio::test]
async fn readiness_and_metrics_follow_the_view() {
    let tracker = Tracker::new(View::new("e", 100), 1 << 20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(weft::admin::serve(
        listener,
        tracker.clone(),
        std::future::pending(),
    ));

    assert_eq!(http(addr, "GET", "/healthz").await, (200, "ok\n".into()));
    assert_eq!(
        http(addr, "GET", "/readyz").await,
        (503, "no cluster yet\n".into())
    );
    tracker.apply(Change {
        upserts: vec![pod("one", "10.0.0.1"), pod("two", "10.0.0.2")],
        clusters: vec![status("c1", true, 0), status("c2", false, 0)],
        ..Change::default()
    });
    for path in ["/readyz", "/ready"] {
        assert_eq!(
            http(addr, "GET", path).await,
            (503, "not synced: c2\n".into())
        );
    }
    tracker.apply(Change {
        clusters: vec![status("c2", true, 1500)],
        ..Change::default()
    });
    assert_eq!(http(addr, "GET", "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http(addr, "GET", "/ready").await, (200, "ready\n".into()));

    // A subscriber, to be counted.
    let url = tracking::serve(&tracker).await;
    let _stream = tracking::subscribe_all(&url).await;
    let (code, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "weft_tracker_cluster_synced{cluster=\"c1\"} 1.0",
        "weft_tracker_cluster_connected{cluster=\"c2\"} 0.0",
        "weft_tracker_cluster_stale_seconds{cluster=\"c2\"} 1.5",
        "weft_tracker_cluster_expired{cluster=\"c1\"} 0.0",
        "weft_tracker_cluster_last_event_timestamp_seconds{cluster=\"c1\"} 1700000000.0",
        "weft_tracker_objects{cluster=\"c1\",kind=\"pod\"} 2.0",
        "weft_tracker_revision 2",
        "weft_tracker_subscribers 1",
        "weft_tracker_snapshots_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // Deleting an object counts down.
    tracker.apply(Change {
        deletes: vec![pod("two", "10.0.0.2").key()],
        ..Change::default()
    });
    let (_, metrics) = http(addr, "GET", "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "weft_tracker_objects{cluster=\"c1\",kind=\"pod\"} 1.0"),
        "{metrics}"
    );

    let (code, body) = http(addr, "GET", "/nope").await;
    assert_eq!(code, 404);
    assert!(body.contains("/metrics"), "{body}");
    assert_eq!(http(addr, "POST", "/metrics").await.0, 405);
    // Garbage on the admin port: no answer needed, no harm done.
    let mut junk = tokio::net::TcpStream::connect(addr).await.expect("connect");
    junk.write_all(b"\x00\x01garbage\r\n\r\n")
        .await
        .expect("write");
    drop(junk);
    assert_eq!(http(addr, "GET", "/healthz").await.0, 200);
}
