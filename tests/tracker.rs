//! The tracker's gRPC stream end to end on loopback: snapshot, deltas, resumption, a slow
//! subscriber, refusals, and `weft policy check --tracker` answering as the offline check.

use std::path::Path;
use std::time::Duration;

use weft::model::{ClusterId, Pod};
use weft::tracker::client;
use weft::tracker::replica::Replica;
use weft::tracker::server::Tracker;
use weft::tracker::source::{ClustersetSource, watch};
use weft::tracker::view::{Change, View};
use weft::tracker::wire::{Object, pb};

mod tracking;

use tracking::{all_clusters, serve, status, synced, until, verdict, wait_for};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-cluster");

fn example_tracker(part_bytes: usize) -> Tracker {
    let mut source = ClustersetSource::new(Path::new(EXAMPLE).join("3-allow-from-cluster-1"));
    let tracker = Tracker::new(View::new("epoch-1", 100), part_bytes);
    tracker.apply(source.rescan().expect("example loads"));
    tracker
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
    let url = serve(&tracker).await;
    let replica = client::sync(&url, all_clusters(), Duration::from_secs(10))
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
    let url = serve(&tracker).await;
    let mut c = client::connect(&url).await.expect("connect");
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
    let url = serve(&tracker).await;
    let mut stream = tracking::subscribe_all(&url).await;
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
    let url = serve(&tracker).await;
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

    let err = client::sync(
        &client::Target::plaintext("http://127.0.0.1:1").expect("target"),
        all_clusters(),
        Duration::from_secs(5),
    )
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

/// Copies `from` into `to`, following the example's symbolic links.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let path = entry.expect("entry").path();
        let target = to.join(path.file_name().expect("name"));
        if std::fs::metadata(&path).expect("metadata").is_dir() {
            copy_tree(&path, &target);
        } else {
            std::fs::copy(&path, &target).expect("copy");
        }
    }
}

#[tokio::test]
async fn the_clusterset_directory_is_watched_and_a_bad_file_keeps_the_last_good_state() {
    use weft::policy::Verdict::{Allow, Deny};
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("clusters");
    copy_tree(&Path::new(EXAMPLE).join("1-no-policy"), &dir);
    let mut source = ClustersetSource::new(&dir);
    let tracker = Tracker::new(View::new("epoch-w", 1000), 1 << 20);
    tracker.apply_from(&source.name(), source.rescan().expect("loads"));
    tokio::spawn(watch(source, tracker.clone(), Duration::from_millis(50)));
    let url = serve(&tracker).await;
    let (mut stream, mut replica) = synced(&url).await;
    let (client, web) = ("cluster-1/demo-c1/tmp-client", "cluster-2/demo-c2/web-c2");
    assert_eq!(verdict(&replica, client, web), Allow);

    let policy = Path::new(EXAMPLE).join("2-default-deny/cluster-2/policy.yaml");
    std::fs::copy(&policy, dir.join("cluster-2/policy.yaml")).expect("copy");
    until(&mut stream, &mut replica, "the policy", |r| {
        verdict(r, client, web) == Deny
    })
    .await;

    std::fs::write(
        dir.join("cluster-2/bad.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x, labels: {a: -b}}\n",
    )
    .expect("write");
    until(&mut stream, &mut replica, "the error", |r| {
        status(r, "cluster-2").is_some_and(|s| s.error.contains("bad.yaml"))
    })
    .await;
    assert_eq!(
        verdict(&replica, client, web),
        Deny,
        "the last good state stays"
    );
    assert!(status(&replica, "cluster-2").is_some_and(|s| s.synced));

    std::fs::remove_file(dir.join("cluster-2/bad.yaml")).expect("rm");
    std::fs::remove_file(dir.join("cluster-2/policy.yaml")).expect("rm");
    until(&mut stream, &mut replica, "the recovery", |r| {
        status(r, "cluster-2").is_some_and(|s| s.error.is_empty())
            && verdict(r, client, web) == Allow
    })
    .await;

    std::fs::remove_dir_all(dir.join("cluster-1")).expect("rm");
    until(&mut stream, &mut replica, "cluster-1 leaving", |r| {
        status(r, "cluster-1").is_none()
    })
    .await;
    assert!(
        replica
            .engine()
            .pod_by_name("cluster-1", "demo-c1", "tmp-client")
            .is_none()
    );

    std::fs::create_dir_all(dir.join("cluster-3")).expect("mkdir");
    std::fs::write(
        dir.join("cluster-3/ns.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: new}\n",
    )
    .expect("write");
    until(&mut stream, &mut replica, "cluster-3 arriving", |r| {
        status(r, "cluster-3").is_some_and(|s| s.synced)
    })
    .await;
}

/// A `weft tracker` process, killed when dropped.
struct TrackerProcess(std::process::Child);

impl TrackerProcess {
    fn start(clusters: &Path, port: u16) -> Self {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args([
                "tracker",
                "--insecure",
                "--admin",
                "127.0.0.1:0",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--clusters",
            ])
            .arg(clusters)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start weft tracker");
        Self(child)
    }
}

impl TrackerProcess {
    /// Sends the process a signal (`STOP`, `CONT`).
    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.0.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{name}");
    }
}

impl Drop for TrackerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_follower_survives_a_tracker_restart_and_takes_the_new_view() {
    use weft::policy::Verdict::{Allow, Deny};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let first = TrackerProcess::start(&Path::new(EXAMPLE).join("1-no-policy"), port);
    let replica = std::sync::Arc::new(std::sync::RwLock::new(Replica::new()));
    let follower = tokio::spawn(client::follow(
        client::Target::plaintext(&format!("http://127.0.0.1:{port}")).expect("target"),
        all_clusters(),
        replica.clone(),
        Duration::from_millis(50),
    ));
    let (from, to) = ("cluster-1/demo-c1/tmp-client", "cluster-2/demo-c2/web-c2");
    wait_for(&replica, "the first tracker's view", |r| {
        r.ready() && verdict(r, from, to) == Allow
    })
    .await;
    let epoch = replica
        .read()
        .expect("lock")
        .position()
        .map(|p| p.epoch.clone());

    drop(first);
    let _second = TrackerProcess::start(&Path::new(EXAMPLE).join("2-default-deny"), port);
    wait_for(&replica, "the restarted tracker's view", |r| {
        r.position().map(|p| p.epoch.clone()) != epoch && verdict(r, from, to) == Deny
    })
    .await;
    follower.abort();
}

#[tokio::test]
async fn a_change_too_large_for_one_delta_arrives_as_a_whole_snapshot() {
    let mut source = ClustersetSource::new(Path::new(EXAMPLE).join("3-allow-from-cluster-1"));
    let tracker = Tracker::new(
        View::new("epoch-1", 100).with_max_delta_bytes(2_000),
        1 << 20,
    );
    tracker.apply(source.rescan().expect("example loads"));
    let url = serve(&tracker).await;
    let (mut stream, mut replica) = synced(&url).await;
    let before = replica.position().cloned().expect("position");

    let many: Vec<Object> = (0..60)
        .map(|i| pod(&format!("bulk-{i}"), &format!("10.2.3.{i}")))
        .collect();
    tracker.apply(Change {
        upserts: many,
        ..Change::default()
    });
    let u = stream.message().await.expect("ok").expect("an update");
    assert!(
        part(&u).is_some_and(|p| p.first),
        "a fresh snapshot, not a delta: {:?}",
        u.position
    );
    replica.apply(u).expect("applies");
    until(&mut stream, &mut replica, "all of the change", |r| {
        r.engine()
            .pod_by_name("cluster-2", "demo-c2", "bulk-59")
            .is_some()
    })
    .await;
    assert_eq!(
        replica.position().map(|p| p.revision),
        Some(before.revision + 1)
    );

    // A small change after it is a delta again; resuming from before the large one is a
    // snapshot, since it was never kept.
    tracker.apply(Change {
        upserts: vec![pod("small", "10.2.4.1")],
        ..Change::default()
    });
    let u = stream.message().await.expect("ok").expect("an update");
    assert!(part(&u).is_none(), "a delta");
    let resume = pb::SubscribeRequest {
        resume: Some(before),
        ..all_clusters()
    };
    let mut stream = client::subscribe(&url, resume).await.expect("subscribe");
    let u = stream.message().await.expect("ok").expect("an update");
    assert!(part(&u).is_some_and(|p| p.first));
}

#[tokio::test]
async fn a_tracker_that_stops_answering_is_noticed_without_a_closed_connection() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let tracker = TrackerProcess::start(&Path::new(EXAMPLE).join("1-no-policy"), port);
    let replica = std::sync::Arc::new(std::sync::RwLock::new(Replica::new()));
    let target = client::Target::plaintext(&format!("http://127.0.0.1:{port}"))
        .expect("target")
        .with_keepalive(Duration::from_millis(300));
    let follower = tokio::spawn(client::follow(
        target,
        all_clusters(),
        replica.clone(),
        Duration::from_millis(50),
    ));
    wait_for(&replica, "the view", |r| {
        r.ready() && r.stale_for().is_none()
    })
    .await;

    // Frozen: its connection stays open, but it answers no ping.
    tracker.signal("STOP");
    wait_for(&replica, "the tracker taken as gone", |r| {
        r.stale_for().is_some()
    })
    .await;
    assert!(replica.read().expect("lock").ready(), "fail static");
    tracker.signal("CONT");
    wait_for(&replica, "the tracker back", |r| r.stale_for().is_none()).await;
    follower.abort();
}
