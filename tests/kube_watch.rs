//! kube-rs's real client and watcher against the test API server: paged lists, watch events,
//! 410 Gone with relist, faults and recovery, events held back and released out of order. The
//! tracker's tests build on the same fixture.

mod apiserver;

use std::time::Duration;

use apiserver::{ApiServer, Fault, Kind};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

fn pod(ns: &str, name: &str, ip: &str) -> serde_json::Value {
    json!({"metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
           "status": {"phase": "Running", "podIP": ip}})
}

/// Runs a reflector over every pod of `server` in the background; returns its store.
fn reflect_pods(server: &ApiServer, page_size: u32) -> (Store<Pod>, tokio::task::JoinHandle<()>) {
    let api: Api<Pod> = Api::all(server.client());
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().page_size(page_size);
    let stream = reflector::reflector(writer, watcher(api, config))
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Errors are retried with backoff; the test reads the store.
        while stream.next().await.is_some() {}
    });
    (reader, task)
}

/// Waits until `check` holds of the store's pod names, for at most 10 s.
async fn eventually(store: &Store<Pod>, what: &str, check: impl Fn(&[String]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut names: Vec<String> = store
            .state()
            .iter()
            .map(|p| p.metadata.name.clone().unwrap_or_default())
            .collect();
        names.sort();
        if check(&names) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; store has {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn paged_list_then_watch_events() {
    let server = ApiServer::start().await;
    for i in 0..5 {
        server.apply(
            Kind::Pod,
            pod("a", &format!("p{i}"), &format!("10.0.0.{i}")),
        );
    }
    server.apply(Kind::Namespace, json!({"metadata": {"name": "a"}}));
    let (store, task) = reflect_pods(&server, 2);
    eventually(&store, "the initial list", |n| {
        n == ["p0", "p1", "p2", "p3", "p4"]
    })
    .await;
    let lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true"))
        .count();
    assert_eq!(
        lists,
        3,
        "five pods in pages of two: {:?}",
        server.requests()
    );

    server.apply(Kind::Pod, pod("b", "new", "10.0.1.1"));
    server.delete(Kind::Pod, "a", "p0");
    server.apply(Kind::Pod, pod("a", "p1", "10.0.0.101"));
    eventually(&store, "the events", |n| {
        n == ["new", "p1", "p2", "p3", "p4"]
    })
    .await;
    let p1 = store
        .state()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("p1"))
        .expect("p1");
    assert_eq!(
        p1.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("10.0.0.101")
    );
    task.abort();
}

#[tokio::test]
async fn expired_watch_relists_and_drops_what_was_deleted_in_the_gap() {
    let server = ApiServer::start().await;
    server.apply(Kind::Pod, pod("a", "stays", "10.0.0.1"));
    server.apply(Kind::Pod, pod("a", "goes", "10.0.0.2"));
    let (store, task) = reflect_pods(&server, 500);
    eventually(&store, "the initial list", |n| n == ["goes", "stays"]).await;
    // The server's watch cache moves on while a pod is deleted: the watch gets 410 and the
    // watcher relists, so the deletion it never saw as an event still takes effect.
    server.set_fault(Fault::Hang);
    server.delete(Kind::Pod, "a", "goes");
    server.compact();
    server.set_fault(Fault::None);
    eventually(&store, "the relist", |n| n == ["stays"]).await;
    task.abort();
}

#[tokio::test]
async fn faults_then_recovery() {
    let server = ApiServer::start().await;
    server.apply(Kind::Pod, pod("a", "one", "10.0.0.1"));
    server.set_fault(Fault::InternalError);
    let (store, task) = reflect_pods(&server, 500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.state().is_empty(),
        "nothing listed while the server answers 500"
    );
    server.set_fault(Fault::None);
    eventually(&store, "recovery from 500", |n| n == ["one"]).await;

    server.set_fault(Fault::Down);
    server.apply(Kind::Pod, pod("a", "two", "10.0.0.2"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.state().len(), 1, "no events while the server is down");
    server.set_fault(Fault::None);
    eventually(&store, "recovery from down", |n| n == ["one", "two"]).await;
    task.abort();
}

#[tokio::test]
async fn gone_can_be_an_http_status_and_bookmarks_carry_the_version() {
    let server = ApiServer::start().await;
    server.apply(Kind::Pod, pod("a", "one", "10.0.0.1"));
    let old = server.resource_version();
    server.apply(Kind::Pod, pod("a", "two", "10.0.0.2"));
    server.compact();
    let api: Api<Pod> = Api::all(server.client());

    // As an ERROR event in a 200 stream (what the real server does).
    let mut events = api
        .watch(&kube::api::WatchParams::default(), &old.to_string())
        .await
        .expect("watch starts")
        .boxed();
    match events.next().await {
        Some(Ok(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // As an HTTP 410.
    server.set_gone_as_status(true);
    let err = api
        .watch(&kube::api::WatchParams::default(), &old.to_string())
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );

    // Bookmarks (kube asks for them by default).
    let now = server.resource_version();
    let mut events = api
        .watch(&kube::api::WatchParams::default(), &now.to_string())
        .await
        .expect("watch starts")
        .boxed();
    server.bookmark();
    match events.next().await {
        Some(Ok(kube::api::WatchEvent::Bookmark(b))) => {
            assert_eq!(b.metadata.resource_version, now.to_string())
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn held_events_are_released_newest_first() {
    let server = ApiServer::start().await;
    server.apply(Kind::Pod, pod("n1", "old", "10.0.0.1"));
    let api: Api<Pod> = Api::all(server.client());
    let mut events = api
        .watch(
            &kube::api::WatchParams::default(),
            &server.resource_version().to_string(),
        )
        .await
        .expect("watch starts")
        .boxed();
    server.hold_events();
    server.delete(Kind::Pod, "n1", "old");
    server.apply(Kind::Pod, pod("n2", "new", "10.0.0.1"));
    // Held: the watch says nothing, a list already has the change.
    let quiet = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
    assert!(quiet.is_err(), "held: {quiet:?}");
    let listed = api.list(&Default::default()).await.expect("list");
    let names: Vec<_> = listed
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["new"]);

    server.release_events_reversed();
    let mut seen = Vec::new();
    for _ in 0..2 {
        match events.next().await {
            Some(Ok(kube::api::WatchEvent::Added(p))) => seen.push(("ADDED", p)),
            Some(Ok(kube::api::WatchEvent::Deleted(p))) => seen.push(("DELETED", p)),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    let seen: Vec<_> = seen
        .iter()
        .map(|(t, p)| (*t, p.metadata.name.as_deref().unwrap_or_default()))
        .collect();
    assert_eq!(seen, [("ADDED", "new"), ("DELETED", "old")]);
}
