//! The tracker's gRPC stream end to end on loopback: snapshot, deltas, resumption, a slow
//! subscriber, refusals, and `weft policy check --tracker` answering as the offline check.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft::model::{ClusterId, Pod};
use weft::tracker::client;
use weft::tracker::server::Tracker;
use weft::tracker::source::clusterset_change;
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, pb};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-cluster");

async fn serve(tracker: &Tracker) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = tracker.service();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("serve");
    });
    addr
}

fn example_tracker(part_bytes: usize) -> Tracker {
    let loaded = weft::model::load_clusterset(&Path::new(EXAMPLE).join("3-allow-from-cluster-1"))
        .expect("example loads");
    let tracker = Tracker::new(View::new("epoch-1", 100), part_bytes);
    tracker.apply(clusterset_change(&loaded.clusterset));
    tracker
}

fn all_clusters() -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        policy_scope: pb::PolicyScope::AllClusters.into(),
        ..Default::default()
    }
}

fn pod(name: &str, ip: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &ClusterId::new("cluster-2").expect("id"),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "demo-c2", "uid": format!("uid-{name}")},
                "status": {"phase": "Running", "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

fn part(u: &pb::Update) -> Option<&pb::SnapshotPart> {
    match &u.change {
        Some(pb::update::Change::Snapshot(s)) => Some(s),
        _ => None,
    }
}

#[tokio::test]
async fn a_synced_replica_answers_as_the_offline_check() {
    let tracker = example_tracker(200);
    let addr = serve(&tracker).await;
    let replica = client::sync(
        &format!("http://{addr}"),
        all_clusters(),
        Duration::from_secs(10),
    )
    .await
    .expect("synced");
    let loaded = weft::model::load_clusterset(&Path::new(EXAMPLE).join("3-allow-from-cluster-1"))
        .expect("example loads");
    let offline = weft::policy::Engine::from_clusterset(&loaded.clusterset);
    let probes = Path::new(EXAMPLE).join("probes.yaml");
    let via_tracker = weft::probe::decide(
        &weft::probe::load(&probes, replica.engine()).expect("probes"),
        replica.engine(),
    );
    let direct = weft::probe::decide(
        &weft::probe::load(&probes, &offline).expect("probes"),
        &offline,
    );
    assert_eq!(
        weft::probe::render_json(&via_tracker),
        weft::probe::render_json(&direct)
    );
}

#[tokio::test]
async fn deltas_follow_and_a_reconnect_resumes_or_takes_a_snapshot() {
    let tracker = example_tracker(1 << 20);
    let addr = serve(&tracker).await;
    let mut c = client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");
    let mut stream = c
        .subscribe(all_clusters())
        .await
        .expect("subscribe")
        .into_inner();
    let first = stream.message().await.expect("ok").expect("an update");
    assert!(part(&first).is_some_and(|p| p.first && p.last));
    let at = first.position.clone().expect("position");

    tracker.apply(Change {
        upserts: vec![pod("new", "10.2.1.99")],
        ..Change::default()
    });
    let next = stream.message().await.expect("ok").expect("an update");
    assert_eq!(
        next.position.as_ref().map(|p| p.revision),
        Some(at.revision + 1)
    );
    drop(stream);

    // Two more changes while away: a resumption gets exactly those.
    tracker.apply(Change {
        upserts: vec![pod("a2", "10.2.1.98")],
        ..Change::default()
    });
    tracker.apply(Change {
        upserts: vec![pod("a3", "10.2.1.97")],
        ..Change::default()
    });
    let resume = pb::SubscribeRequest {
        resume: next.position.clone(),
        ..all_clusters()
    };
    let mut stream = c.subscribe(resume).await.expect("subscribe").into_inner();
    for want in [at.revision + 2, at.revision + 3] {
        let u = stream.message().await.expect("ok").expect("an update");
        assert!(part(&u).is_none(), "a delta, not a snapshot");
        assert_eq!(u.position.map(|p| p.revision), Some(want));
    }
    // Another tracker's position (a restart): a full snapshot.
    let other = pb::SubscribeRequest {
        resume: Some(pb::Position {
            epoch: "epoch-0".into(),
            revision: 2,
        }),
        ..all_clusters()
    };
    let mut stream = c.subscribe(other).await.expect("subscribe").into_inner();
    let u = stream.message().await.expect("ok").expect("an update");
    assert!(part(&u).is_some_and(|p| p.first));
}

#[tokio::test]
async fn a_slow_subscriber_gets_a_fresh_snapshot_not_an_unbounded_buffer() {
    let tracker = example_tracker(1 << 20);
    let addr = serve(&tracker).await;
    let mut c = client::connect(&format!("http://{addr}"))
        .await
        .expect("connect");
    let mut stream = c
        .subscribe(all_clusters())
        .await
        .expect("subscribe")
        .into_inner();
    let _ = stream.message().await.expect("ok").expect("the snapshot");
    // Far more changes than the shared buffer holds, while the subscriber reads nothing.
    for i in 0..6000u32 {
        let ip = format!("10.3.{}.{}", i / 250, i % 250 + 1);
        tracker.apply(Change {
            upserts: vec![pod(&format!("p{i}"), &ip)],
            ..Change::default()
        });
    }
    let last = tracker.position().revision;
    let mut saw_snapshot = false;
    let mut replica_revision = 0;
    while replica_revision < last {
        let u = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("keeps flowing")
            .expect("ok")
            .expect("an update");
        saw_snapshot |= part(&u).is_some_and(|p| p.first);
        replica_revision = u.position.map_or(0, |p| p.revision);
    }
    assert!(
        saw_snapshot,
        "the lagging subscriber was moved to a fresh snapshot"
    );
}

#[tokio::test]
async fn refusals_and_an_unsynced_cluster_never_read_as_a_view() {
    let tracker = example_tracker(1 << 20);
    let addr = serve(&tracker).await;
    let url = format!("http://{addr}");
    let mut c = client::connect(&url).await.expect("connect");
    let bad = pb::SubscribeRequest {
        cluster: "Not A Cluster".into(),
        ..Default::default()
    };
    let status = c.subscribe(bad).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("cluster"), "{status:?}");

    tracker.apply(Change {
        clusters: vec![pb::ClusterStatus {
            cluster: "cluster-3".into(),
            synced: false,
            ..Default::default()
        }],
        ..Change::default()
    });
    let err = client::sync(&url, all_clusters(), Duration::from_millis(500))
        .await
        .expect_err("never synced");
    assert!(
        err.to_string()
            .contains("clusters cluster-3 are not synced"),
        "{err}"
    );

    let err = client::sync("http://127.0.0.1:1", all_clusters(), Duration::from_secs(5))
        .await
        .expect_err("nobody there");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[test]
fn policy_check_over_a_tracker_needs_an_explicit_insecure() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "policy",
            "check",
            "--tracker",
            "http://127.0.0.1:1",
            "--probes",
            "x.yaml",
        ])
        .output()
        .expect("run weft");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
}
