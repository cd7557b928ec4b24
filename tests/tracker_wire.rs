//! The tracker stream with bad input from either side. A fake tracker (hyper, hand-made gRPC
//! frames) sends truncated, corrupt, oversized and invalid updates to `client::sync`,
//! `client::follow` and `Replica::apply`: each ends in an error naming the problem, no panic,
//! and the last good state kept. A real tracker gets junk on its listener and refuses bad
//! requests naming the field, and still serves a snapshot afterwards.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::{self, BoxStream};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proptest::prelude::*;
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use weft::model::{ClusterId, NetworkPolicy, Pod};
use weft::policy::{Connection, Verdict};
use weft::tracker::client::{self, ClientError};
use weft::tracker::replica::Replica;
use weft::tracker::server::{SNAPSHOT_PART_BYTES, Tracker};
use weft::tracker::view::{Change, Scope, View};
use weft::tracker::wire::{Object, pb};

mod tracking;

/// How long a client waits for a fake or real tracker in these tests.
const WAIT: Duration = Duration::from_secs(3);
/// The gRPC path of the subscription.
const SUBSCRIBE: &str = "/weft.tracker.v1.Tracker/Subscribe";

// ---------------------------------------------------------------------------------------------
// The good state: a view, its snapshot, and one good delta after it.

fn cluster() -> ClusterId {
    ClusterId::new("c1").expect("cluster id")
}

fn pod(name: &str, ip: &str, app: &str) -> Object {
    Object::Pod(
        Pod::from_api(
            &cluster(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "a", "uid": format!("uid-{name}"),
                             "labels": {"app": app}},
                "status": {"phase": "Running", "podIP": ip}}))
            .expect("pod"),
        )
        .expect("valid"),
    )
}

fn policy(name: &str, spec: serde_json::Value) -> Object {
    Object::NetworkPolicy(
        NetworkPolicy::from_api(
            &cluster(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "a", "uid": format!("uid-{name}")},
                "spec": spec}))
            .expect("policy"),
            &mut Vec::new(),
        )
        .expect("valid"),
    )
}

/// Only pods labelled `app: web` reach `db`.
fn db_from_web() -> Object {
    policy(
        "db-from-web",
        serde_json::json!({"podSelector": {"matchLabels": {"app": "db"}},
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]}),
    )
}

/// Nothing reaches any pod of namespace `a`.
fn deny_all() -> Object {
    policy("deny-all", serde_json::json!({"podSelector": {}}))
}

fn status(cluster: &str, synced: bool) -> pb::ClusterStatus {
    pb::ClusterStatus {
        cluster: cluster.into(),
        synced,
        connected: true,
        ..Default::default()
    }
}

/// The view of a tracker: pods `web`, `db` and `other` and the policy that admits only web to
/// db, in c1; c2 is still listing, so `sync` reads on past the snapshot to what follows.
fn good_view() -> View {
    let mut view = View::new("e1", 100);
    view.apply(Change {
        upserts: vec![
            pod("web", "10.0.0.1", "web"),
            pod("db", "10.0.0.2", "db"),
            pod("other", "10.0.0.3", "other"),
            db_from_web(),
        ],
        clusters: vec![status("c1", true), status("c2", false)],
        ..Change::default()
    });
    view
}

/// The snapshot of `view`, in several parts.
fn snapshot(view: &View) -> Vec<pb::Update> {
    let parts = view.snapshot(&Scope::AllClusters, 100);
    assert!(parts.len() > 1, "the snapshot comes in parts");
    parts
}

/// The good delta that follows the good view: pod `late`, a web pod.
fn good_delta(view: &mut View) -> pb::Update {
    let update = view
        .apply(Change {
            upserts: vec![pod("late", "10.0.0.4", "web")],
            ..Change::default()
        })
        .expect("a change");
    (*update).clone()
}

/// A replica holding the good view.
fn good_replica() -> Replica {
    let mut replica = Replica::new();
    for part in snapshot(&good_view()) {
        replica.apply(part).expect("good part");
    }
    replica
}

fn position(epoch: &str, revision: u64) -> pb::Position {
    pb::Position {
        epoch: epoch.into(),
        revision,
    }
}

/// What of a replica's state these tests compare: its position, what its engine holds and
/// answers, and its clusters.
#[derive(Debug, Clone, PartialEq)]
struct State {
    position: Option<pb::Position>,
    counts: (usize, usize, usize),
    clusters: Vec<pb::ClusterStatus>,
    pods: Vec<(&'static str, bool)>,
    verdicts: Vec<(&'static str, &'static str, Verdict)>,
}

fn state(replica: &Replica) -> State {
    let e = replica.engine();
    let verdict = |from: &str, to: &str| {
        let conn = Connection {
            src: e.address_endpoint(from.parse().expect("ip")),
            dst: e.address_endpoint(to.parse().expect("ip")),
            port: 80,
            protocol: weft::model::Protocol::Tcp,
        };
        e.decide(&conn).verdict()
    };
    State {
        position: replica.position().cloned(),
        counts: e.counts(),
        clusters: replica.clusters().cloned().collect(),
        pods: ["web", "db", "other", "late", "evil"]
            .into_iter()
            .map(|n| (n, e.pod_by_name("c1", "a", n).is_some()))
            .collect(),
        verdicts: [
            ("web", "db", "10.0.0.1", "10.0.0.2"),
            ("other", "db", "10.0.0.3", "10.0.0.2"),
            ("late", "db", "10.0.0.4", "10.0.0.2"),
            ("evil", "db", "10.0.0.9", "10.0.0.2"),
            ("db", "web", "10.0.0.2", "10.0.0.1"),
        ]
        .into_iter()
        .map(|(from, to, src, dst)| (from, to, verdict(src, dst)))
        .collect(),
    }
}

#[test]
fn the_good_state_is_what_the_tests_think() {
    let before = state(&good_replica());
    assert_eq!(before.position, Some(position("e1", 1)));
    let verdicts: Vec<Verdict> = before.verdicts.iter().map(|v| v.2).collect();
    use Verdict::{Allow, Deny};
    assert_eq!(verdicts, [Allow, Deny, Deny, Deny, Allow]);
    let mut view = good_view();
    let mut replica = good_replica();
    replica.apply(good_delta(&mut view)).expect("good delta");
    let after = state(&replica);
    assert_eq!(after.position, Some(position("e1", 2)));
    assert_eq!(after.verdicts[2].2, Allow, "late is a web pod");
}

// ---------------------------------------------------------------------------------------------
// Well-formed updates whose content is invalid.

/// A bad update, and what its error must say.
struct Case {
    name: &'static str,
    /// Sent to an empty replica (else to one holding the good view at `at`).
    fresh: bool,
    update: pb::Update,
    want: Vec<String>,
}

fn delta_at(at: pb::Position, delta: pb::Delta) -> pb::Update {
    pb::Update {
        position: Some(at),
        change: Some(pb::update::Change::Delta(delta)),
    }
}

fn part_at(at: pb::Position, part: pb::SnapshotPart) -> pb::Update {
    pb::Update {
        position: Some(at),
        change: Some(pb::update::Change::Snapshot(part)),
    }
}

/// Pod `evil` (a web pod at 10.0.0.9) on the wire, changed by `f`.
fn wire_pod(f: impl FnOnce(&mut pb::Pod)) -> pb::Object {
    let mut o = pb::Object::from(&pod("evil", "10.0.0.9", "web"));
    if let Some(pb::object::Object::Pod(p)) = &mut o.object {
        f(p);
    }
    o
}

/// A delta after `at` upserting the deny-all (good) and then `bad`: applied in part, it
/// would change the verdicts.
fn upserting(at: &pb::Position, bad: pb::Object) -> pb::Update {
    delta_at(
        position(&at.epoch, at.revision + 1),
        pb::Delta {
            upserts: vec![pb::Object::from(&deny_all()), bad],
            ..Default::default()
        },
    )
}

/// Every bad update for a replica at `at` (revision at least 1).
fn bad_updates(at: &pb::Position) -> Vec<Case> {
    let (epoch, rev) = (at.epoch.as_str(), at.revision);
    let next = || position(epoch, rev + 1);
    let case = |name, update, want: &[&str]| Case {
        name,
        fresh: false,
        update,
        want: want.iter().map(|w| (*w).to_owned()).collect(),
    };
    let bad_cluster = "Not A Cluster!";
    let bad_key = pb::ObjectKey {
        kind: pb::Kind::Pod.into(),
        cluster: bad_cluster.into(),
        uid: "uid-web".into(),
        ..Default::default()
    };
    let bad_cidr = {
        let mut o = pb::Object::from(&db_from_web());
        if let Some(pb::object::Object::NetworkPolicy(p)) = &mut o.object {
            p.ingress = Some(pb::Rules {
                rules: vec![pb::Rule {
                    ports: vec![],
                    peers: vec![pb::Peer {
                        peer: Some(pb::peer::Peer::IpBlock(pb::IpBlock {
                            cidr: "10.0.0/8".into(),
                            except: vec![],
                        })),
                    }],
                }],
            });
        }
        o
    };
    let mut cases = vec![
        case(
            "a pod with a bad IP",
            upserting(at, wire_pod(|p| p.ips = vec!["10.0.0.300".into()])),
            &["Pod c1/a/evil", "status.podIPs[0].ip", "invalid IP address"],
        ),
        case(
            "a pod with a bad label key",
            upserting(
                at,
                wire_pod(|p| {
                    p.labels.insert("a b".into(), "x".into());
                }),
            ),
            &["Pod c1/a/evil", "invalid label key"],
        ),
        case(
            "a pod with a bad label value",
            upserting(
                at,
                wire_pod(|p| {
                    p.labels.insert("app".into(), "-web".into());
                }),
            ),
            &["Pod c1/a/evil", "-web"],
        ),
        case(
            "a pod of a cluster id that is not valid",
            upserting(at, wire_pod(|p| p.cluster = bad_cluster.into())),
            &["Pod Not A Cluster!/a/evil", "invalid cluster id"],
        ),
        case(
            "a pod with a port out of range",
            upserting(
                at,
                wire_pod(|p| {
                    p.ports = vec![pb::ContainerPort {
                        name: "http".into(),
                        port: 70_000,
                        protocol: pb::Protocol::Tcp.into(),
                    }]
                }),
            ),
            &["Pod c1/a/evil", "70000 is not a port"],
        ),
        case(
            "a policy with a bad CIDR",
            upserting(at, bad_cidr),
            &[
                "NetworkPolicy c1/a/db-from-web",
                "invalid CIDR \"10.0.0/8\"",
            ],
        ),
        case(
            "an object message without its object",
            upserting(at, pb::Object { object: None }),
            &["an object message carries no object"],
        ),
        case(
            "a cluster status of a cluster id that is not valid",
            delta_at(
                next(),
                pb::Delta {
                    upserts: vec![pb::Object::from(&deny_all())],
                    clusters: vec![status(bad_cluster, true)],
                    ..Default::default()
                },
            ),
            &["cluster status", "invalid cluster id \"Not A Cluster!\""],
        ),
        case(
            "a removed cluster id that is not valid",
            delta_at(
                next(),
                pb::Delta {
                    upserts: vec![pb::Object::from(&deny_all())],
                    removed_clusters: vec![bad_cluster.into()],
                    ..Default::default()
                },
            ),
            &["removed cluster", "invalid cluster id \"Not A Cluster!\""],
        ),
        case(
            "a delete of a cluster id that is not valid",
            delta_at(
                next(),
                pb::Delta {
                    upserts: vec![pb::Object::from(&deny_all())],
                    deletes: vec![bad_key.clone()],
                    ..Default::default()
                },
            ),
            &["key POD Not A Cluster! uid uid-web", "invalid cluster id"],
        ),
        case(
            "a delete of an unknown kind",
            delta_at(
                next(),
                pb::Delta {
                    deletes: vec![pb::ObjectKey {
                        kind: 42,
                        cluster: "c1".into(),
                        namespace: "a".into(),
                        name: "db-from-web".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ),
            &["key UNKNOWN c1/a/db-from-web", "unknown kind value 42"],
        ),
        case(
            "a delta whose revision skips one",
            delta_at(position(epoch, rev + 2), pb::Delta::default()),
            &[&format!(
                "delta at {epoch}/{} does not follow {epoch}/{rev}: updates were lost",
                rev + 2
            )],
        ),
        case(
            "a delta whose revision repeats",
            delta_at(position(epoch, rev), pb::Delta::default()),
            &[&format!(
                "delta at {epoch}/{rev} does not follow {epoch}/{rev}"
            )],
        ),
        case(
            "a delta whose revision goes backwards",
            delta_at(position(epoch, rev - 1), pb::Delta::default()),
            &[&format!(
                "delta at {epoch}/{} does not follow {epoch}/{rev}",
                rev - 1
            )],
        ),
        case(
            "a delta of another epoch",
            delta_at(position("e-other", rev + 1), pb::Delta::default()),
            &[&format!(
                "delta at e-other/{} does not follow {epoch}/{rev}",
                rev + 1
            )],
        ),
        case(
            "a snapshot part that continues no snapshot",
            part_at(
                next(),
                pb::SnapshotPart {
                    first: false,
                    last: true,
                    objects: vec![pb::Object::from(&deny_all())],
                    clusters: vec![status("c1", true)],
                },
            ),
            &[&format!(
                "snapshot part at {epoch}/{} does not continue the snapshot being received",
                rev + 1
            )],
        ),
        case(
            "a snapshot older than the view",
            part_at(
                position(epoch, rev - 1),
                pb::SnapshotPart {
                    first: true,
                    last: true,
                    objects: vec![pb::Object::from(&deny_all())],
                    clusters: vec![status("c1", true)],
                },
            ),
            &[&format!(
                "snapshot at {epoch}/{} is older than the view at {epoch}/{rev}",
                rev - 1
            )],
        ),
        case(
            "a snapshot with a bad object",
            part_at(
                next(),
                pb::SnapshotPart {
                    first: true,
                    last: true,
                    objects: vec![
                        pb::Object::from(&deny_all()),
                        wire_pod(|p| p.ips = vec!["::g".into()]),
                    ],
                    clusters: vec![status("c1", true)],
                },
            ),
            &["Pod c1/a/evil", "invalid IP address"],
        ),
        case(
            "an update without a position",
            pb::Update {
                position: None,
                change: Some(pb::update::Change::Delta(pb::Delta::default())),
            },
            &["update without a position"],
        ),
        case(
            "an update without a change",
            pb::Update {
                position: Some(next()),
                change: None,
            },
            &["update without a change"],
        ),
    ];
    cases.push(Case {
        name: "a delta before any snapshot",
        fresh: true,
        update: delta_at(
            position(epoch, 1),
            pb::Delta {
                upserts: vec![pb::Object::from(&pod("evil", "10.0.0.9", "web"))],
                ..Default::default()
            },
        ),
        want: vec!["delta before a complete snapshot".into()],
    });
    cases
}

fn assert_names(name: &str, error: &str, want: &[String]) {
    for w in want {
        assert!(error.contains(w.as_str()), "{name}: {error:?} lacks {w:?}");
    }
}

#[test]
fn every_bad_update_is_refused_and_the_last_good_state_stays() {
    let at = position("e1", 1);
    for case in bad_updates(&at) {
        let mut replica = if case.fresh {
            Replica::new()
        } else {
            good_replica()
        };
        let before = state(&replica);
        let error = replica.apply(case.update).expect_err(case.name).to_string();
        assert_names(case.name, &error, &case.want);
        assert_eq!(state(&replica), before, "{}: state changed", case.name);
        // Nothing of it lingers: what the tracker sends next applies as if it never came.
        let mut view = good_view();
        let mut want = if case.fresh {
            Replica::new()
        } else {
            good_replica()
        };
        let next = if case.fresh {
            snapshot(&view)
        } else {
            vec![good_delta(&mut view)]
        };
        for u in next {
            want.apply(u.clone()).expect("good");
            replica
                .apply(u)
                .unwrap_or_else(|e| panic!("{}: the next good update: {e}", case.name));
        }
        assert_eq!(state(&replica), state(&want), "{}", case.name);
    }
}

// ---------------------------------------------------------------------------------------------
// A fake tracker: hyper's HTTP/2 server, gRPC frames made by hand.

/// How a scripted response ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// Trailers with this grpc-status and grpc-message.
    Trailers(&'static str, &'static str),
    /// The body ends without trailers.
    Eof,
    /// The connection is closed under the response.
    Close,
    /// Nothing more: the response stays open.
    Hang,
}

/// One response of the fake tracker: DATA chunks, then its end.
#[derive(Debug, Clone)]
struct Reply {
    chunks: Vec<Bytes>,
    end: End,
}

impl Reply {
    fn of(updates: &[pb::Update], raw: &[Bytes], end: End) -> Self {
        Self {
            chunks: updates
                .iter()
                .map(message)
                .chain(raw.iter().cloned())
                .collect(),
            end,
        }
    }
}

/// A gRPC frame: the compressed flag, the length it declares, then `bytes`.
fn frame(flag: u8, declared: u32, bytes: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(flag);
    out.extend_from_slice(&declared.to_be_bytes());
    out.extend_from_slice(bytes);
    out.into()
}

fn message(u: &pb::Update) -> Bytes {
    let bytes = u.encode_to_vec();
    frame(0, u32::try_from(bytes.len()).expect("small"), &bytes)
}

type FakeBody = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

#[derive(Debug, Default)]
struct Script {
    replies: VecDeque<Reply>,
    requests: Vec<pb::SubscribeRequest>,
}

/// A fake tracker on loopback. Each subscription gets the next reply; once they are used up
/// it holds the stream open and says nothing.
struct Fake {
    url: String,
    script: Arc<Mutex<Script>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Fake {
    /// Where to subscribe.
    fn target(&self) -> client::Target {
        client::Target::plaintext(&self.url).expect("a plaintext target")
    }

    async fn start(replies: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let script = Arc::new(Mutex::new(Script {
            replies: replies.into(),
            requests: Vec::new(),
        }));
        let shared = script.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let script = shared.clone();
                // Told by a reply that ends in `End::Close`: drops the connection.
                let close = Arc::new(Notify::new());
                let service = {
                    let close = close.clone();
                    hyper::service::service_fn(move |req| {
                        let (script, close) = (script.clone(), close.clone());
                        async move { Ok::<_, Infallible>(respond(req, script, close).await) }
                    })
                };
                tokio::spawn(async move {
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service);
                    tokio::select! {
                        _ = conn => {}
                        () = close.notified() => {}
                    }
                });
            }
        });
        Self {
            url,
            script,
            server,
        }
    }

    /// The subscriptions received, once there are `n` of them.
    async fn requests(&self, n: usize) -> Vec<pb::SubscribeRequest> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let requests = self.script.lock().expect("lock").requests.clone();
            if requests.len() >= n {
                return requests;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} subscriptions, not {n}",
                requests.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    script: Arc<Mutex<Script>>,
    close: Arc<Notify>,
) -> Response<FakeBody> {
    assert_eq!(req.uri().path(), SUBSCRIBE);
    let body = req
        .into_body()
        .collect()
        .await
        .expect("the request body")
        .to_bytes();
    let request = body
        .get(5..)
        .map(pb::SubscribeRequest::decode)
        .expect("a framed request")
        .expect("a SubscribeRequest");
    let reply = {
        let mut script = script.lock().expect("lock");
        script.requests.push(request);
        script.replies.pop_front().unwrap_or(Reply {
            chunks: Vec::new(),
            end: End::Hang,
        })
    };
    let data = stream::iter(reply.chunks.into_iter().map(|c| Ok(Frame::data(c))));
    let end: BoxStream<'static, Result<Frame<Bytes>, Infallible>> = match reply.end {
        End::Trailers(code, message) => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static(code));
            trailers.insert("grpc-message", HeaderValue::from_static(message));
            stream::iter([Ok(Frame::trailers(trailers))]).boxed()
        }
        End::Eof => stream::empty().boxed(),
        End::Hang => stream::pending().boxed(),
        End::Close => stream::once(async move {
            // Time for what was sent to leave on loopback.
            tokio::time::sleep(Duration::from_millis(50)).await;
            close.notify_one();
        })
        .filter_map(|()| async { None })
        .chain(stream::pending())
        .boxed(),
    };
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(data.chain(end).boxed()))
        .expect("a response")
}

fn all_clusters() -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        node: "node-1".into(),
        cluster: "c1".into(),
        policy_scope: pb::PolicyScope::AllClusters.into(),
        resume: None,
    }
}

/// `client::sync` against a fake answering `reply`: its error.
async fn sync_error(reply: Reply) -> (String, ClientError) {
    let fake = Fake::start(vec![reply]).await;
    let outcome = client::sync(&fake.target(), all_clusters(), WAIT).await;
    let error = outcome.expect_err("no replica from bad input");
    (fake.url.clone(), error)
}

/// `client::follow` from `replica` against a fake answering `reply` to the first
/// subscription and nothing to the next: the replica's state once it subscribed again, and
/// both subscriptions.
async fn follow(replica: Replica, reply: Reply) -> (State, Vec<pb::SubscribeRequest>) {
    let fake = Fake::start(vec![reply]).await;
    let replica = Arc::new(RwLock::new(replica));
    let task = tokio::spawn(client::follow(
        fake.target(),
        all_clusters(),
        replica.clone(),
        Duration::from_millis(10),
    ));
    let requests = fake.requests(2).await;
    task.abort();
    let state = state(&replica.read().expect("lock"));
    (state, requests)
}

#[tokio::test]
async fn sync_names_each_bad_update() {
    let view = good_view();
    for case in bad_updates(&view.position()) {
        let mut updates = if case.fresh {
            Vec::new()
        } else {
            snapshot(&view)
        };
        updates.push(case.update);
        let (url, error) = sync_error(Reply::of(&updates, &[], End::Hang)).await;
        assert!(
            matches!(error, ClientError::Update { .. }),
            "{}: {error}",
            case.name
        );
        let text = error.to_string();
        assert!(text.starts_with(&format!("tracker {url}: ")), "{text}");
        assert_names(case.name, &text, &case.want);
    }
}

#[tokio::test]
async fn follow_keeps_the_last_good_state_and_asks_for_a_fresh_snapshot() {
    let mut view = good_view();
    let delta = good_delta(&mut view);
    let after = {
        let mut r = good_replica();
        r.apply(delta.clone()).expect("good delta");
        state(&r)
    };
    for case in bad_updates(&view.position()) {
        let (replica, updates, kept, first) = if case.fresh {
            let r = Replica::new();
            let empty = state(&r);
            (r, vec![case.update], empty, None)
        } else {
            let r = good_replica();
            let first = r.position().cloned();
            (r, vec![delta.clone(), case.update], after.clone(), first)
        };
        let (state, requests) = follow(replica, Reply::of(&updates, &[], End::Hang)).await;
        assert_eq!(state, kept, "{}: the last good state", case.name);
        assert_eq!(requests[0].resume, first, "{}: resumes", case.name);
        assert_eq!(
            requests[1].resume, None,
            "{}: after an update that cannot be applied, a fresh snapshot",
            case.name
        );
        assert_eq!(requests[1].node, "node-1");
    }
}

#[tokio::test]
async fn a_revision_at_the_top_of_the_range_is_an_error_not_a_panic() {
    let view = good_view();
    let mut updates = snapshot(&view);
    for u in &mut updates {
        u.position = Some(position("e1", u64::MAX));
    }
    updates.push(delta_at(position("e1", 0), pb::Delta::default()));
    let (_, error) = sync_error(Reply::of(&updates, &[], End::Hang)).await;
    assert!(
        error
            .to_string()
            .contains("delta at e1/0 does not follow e1/18446744073709551615"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bytes that are not a good gRPC message.

/// Raw bytes after a good update, and what the error must say.
struct Raw {
    name: &'static str,
    chunks: Vec<Bytes>,
    end: End,
    want: &'static [&'static str],
}

fn raw_cases(next: &pb::Update) -> Vec<Raw> {
    let whole = message(next);
    let encoded = next.encode_to_vec();
    let len = u32::try_from(encoded.len()).expect("small");
    let limit = 4 * SNAPSHOT_PART_BYTES;
    let over = u32::try_from(limit + 1).expect("small");
    // Field 1 (position), holding field 1 (epoch) with a byte that is not UTF-8.
    let not_utf8 = [0x0a, 0x03, 0x0a, 0x01, 0xff];
    vec![
        Raw {
            name: "a frame cut short, then the end of the stream",
            chunks: vec![whole.slice(..whole.len() / 2)],
            end: End::Eof,
            want: &["Unexpected EOF decoding stream"],
        },
        Raw {
            name: "a frame header cut short, then the end of the stream",
            chunks: vec![whole.slice(..3)],
            end: End::Eof,
            want: &["Unexpected EOF decoding stream"],
        },
        Raw {
            name: "a frame cut short, then the connection closed",
            chunks: vec![whole.slice(..whole.len() / 2)],
            end: End::Close,
            // hyper's words for a broken connection depend on when it noticed.
            want: &[],
        },
        Raw {
            name: "bytes that are not protobuf",
            chunks: vec![frame(0, 8, &[0xff; 8])],
            end: End::Hang,
            want: &["Internal", "failed to decode Protobuf message"],
        },
        Raw {
            name: "a string that is not UTF-8",
            chunks: vec![frame(0, 5, &not_utf8)],
            end: End::Hang,
            want: &["failed to decode Protobuf message", "UTF-8"],
        },
        Raw {
            name: "a message flagged compressed without an encoding",
            chunks: vec![frame(1, len, &encoded)],
            end: End::Hang,
            want: &["compressed-flag but no grpc-encoding"],
        },
        Raw {
            name: "a frame with an unknown flag",
            chunks: vec![frame(7, len, &encoded)],
            end: End::Hang,
            want: &["invalid compression flag: 7"],
        },
        Raw {
            name: "a frame longer than the client takes",
            chunks: vec![frame(0, over, &[])],
            end: End::Hang,
            want: &[
                "message length too large",
                "found 4194305 bytes, the limit is: 4194304 bytes",
            ],
        },
        Raw {
            name: "a frame claiming 4 GiB",
            chunks: vec![frame(0, u32::MAX, &[0; 64])],
            end: End::Hang,
            want: &["message length too large", "found 4294967295 bytes"],
        },
        Raw {
            name: "an error status",
            chunks: vec![],
            end: End::Trailers("14", "going away"),
            want: &["The service is currently unavailable", "going away"],
        },
        Raw {
            name: "a grpc-status that is not a number",
            chunks: vec![],
            end: End::Trailers("fourteen", "going away"),
            want: &["Unknown", "going away"],
        },
        Raw {
            name: "trailers with no grpc-status",
            chunks: vec![],
            end: End::Eof,
            want: &["grpc-status"],
        },
    ]
}

#[tokio::test]
async fn sync_names_each_broken_frame() {
    let mut view = good_view();
    let parts = snapshot(&view);
    let next = good_delta(&mut view);
    for raw in raw_cases(&next) {
        let (url, error) = sync_error(Reply::of(&parts, &raw.chunks, raw.end)).await;
        assert!(
            matches!(error, ClientError::Status { .. }),
            "{}: {error}",
            raw.name
        );
        let text = error.to_string();
        assert!(text.starts_with(&format!("tracker {url}: ")), "{text}");
        for w in raw.want {
            assert!(text.contains(w), "{}: {text:?} lacks {w:?}", raw.name);
        }
    }
    let (_, error) = sync_error(Reply::of(&parts, &[], End::Trailers("0", ""))).await;
    assert!(
        error
            .to_string()
            .contains("the stream ended before every cluster was synced"),
        "{error}"
    );
}

#[tokio::test]
async fn follow_keeps_what_arrived_whole_and_never_resumes_past_it() {
    let mut view = good_view();
    let delta = good_delta(&mut view);
    let next = view
        .apply(Change {
            upserts: vec![pod("later", "10.0.0.5", "web")],
            ..Change::default()
        })
        .expect("a change");
    let after = {
        let mut r = good_replica();
        r.apply(delta.clone()).expect("good delta");
        state(&r)
    };
    for raw in raw_cases(&next) {
        let reply = Reply::of(std::slice::from_ref(&delta), &raw.chunks, raw.end);
        let (state, requests) = follow(good_replica(), reply).await;
        assert_eq!(state, after, "{}: the last good state", raw.name);
        assert_eq!(requests[0].resume, Some(position("e1", 1)));
        // A fresh snapshot, or what came after the last update applied: never a position the
        // replica does not hold.
        assert!(
            requests[1].resume.is_none() || requests[1].resume == after.position,
            "{}: resumes from {:?}",
            raw.name,
            requests[1].resume
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Mutated messages never panic the replica, and one refused changes nothing.

/// The good view's snapshot (one part), then two deltas, encoded: each applies to the good
/// replica once the ones before it are applied.
fn good_messages() -> Vec<Vec<u8>> {
    let mut view = good_view();
    let mut messages: Vec<Vec<u8>> = view
        .snapshot(&Scope::AllClusters, 1 << 20)
        .iter()
        .map(|u| u.encode_to_vec())
        .collect();
    assert_eq!(messages.len(), 1);
    messages.push(good_delta(&mut view).encode_to_vec());
    let policy = view
        .apply(Change {
            upserts: vec![deny_all()],
            deletes: vec![pod("web", "10.0.0.1", "web").key()],
            ..Change::default()
        })
        .expect("a change");
    messages.push(policy.encode_to_vec());
    messages
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_mutated_message_never_panics_and_a_refused_one_changes_nothing(
        which in 0usize..3,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let messages = good_messages();
        let mut replica = good_replica();
        for good in messages.iter().take(which).skip(1) {
            replica
                .apply(pb::Update::decode(good.as_slice()).expect("decodes"))
                .expect("applies");
        }
        let mut bytes = messages[which].clone();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        // What tonic would refuse to decode never reaches the replica.
        if let Ok(update) = pb::Update::decode(bytes.as_slice()) {
            let before = state(&replica);
            if replica.apply(update).is_err() {
                prop_assert_eq!(state(&replica), before);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Junk on a real tracker's listener.

/// Sends `bytes` on a new connection to `addr`, then half-closes it: what the tracker
/// answered before it closed the connection.
async fn junk(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    // The tracker may close before reading everything; that is an answer too.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.shutdown().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the tracker let a connection of junk hang");
    answer
}

/// Whether `bytes` (from a server, after its preface) hold an HTTP/2 GOAWAY frame.
fn has_goaway(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes[3] == 0x7 {
            return true;
        }
        bytes = bytes.get(9 + len..).unwrap_or_default();
    }
    false
}

/// A raw gRPC call to `addr`: the status it ends with.
async fn grpc(addr: SocketAddr, path: &str, body: Bytes) -> tonic::Status {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    let request = Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(body))
        .expect("a request");
    let response = tokio::time::timeout(WAIT, send.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    // A refusal before any message comes in the headers alone.
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("the end of the answer in time")
        .expect("the answer");
    body.trailers()
        .and_then(tonic::Status::from_header_map)
        .expect("a grpc-status")
}

#[tokio::test]
async fn junk_on_the_listener_is_refused_and_subscribers_still_get_a_snapshot() {
    let tracker = Tracker::new(good_view(), SNAPSHOT_PART_BYTES);
    tracker.apply(Change {
        clusters: vec![status("c2", true)],
        ..Change::default()
    });
    let at = tracker.position();
    let url = tracking::serve(&tracker).await;
    let addr: SocketAddr = url
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    // A connection that says nothing, held open throughout: it blocks no one.
    let _silent = TcpStream::connect(addr).await.expect("connect");

    junk(addr, b"").await;
    // A TLS ClientHello to a plaintext listener, and bytes of nothing in particular.
    junk(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03").await;
    junk(addr, &[0xa5; 100]).await;
    junk(
        addr,
        format!("POST {SUBSCRIBE} HTTP/1.1\r\nHost: tracker\r\nContent-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await;
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let answer = junk(addr, &[PREFACE, &[0xff; 64]].concat()).await;
    assert!(has_goaway(&answer), "{answer:?}");
    // A SETTINGS frame whose length is not a multiple of 6.
    let answer = junk(
        addr,
        &[PREFACE, &[0, 0, 5, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]].concat(),
    )
    .await;
    assert!(has_goaway(&answer), "{answer:?}");

    let valid = all_clusters().encode_to_vec();
    let valid_len = u32::try_from(valid.len()).expect("small");
    use tonic::Code;
    let calls: Vec<(&str, &str, Bytes, Code, &str)> = vec![
        (
            "bytes that are not protobuf",
            SUBSCRIBE,
            frame(0, 8, &[0xff; 8]),
            Code::Internal,
            "failed to decode Protobuf message",
        ),
        (
            "a frame cut short",
            SUBSCRIBE,
            frame(0, valid_len, &valid[..valid.len() / 2]),
            Code::Internal,
            "Unexpected EOF",
        ),
        (
            "no message at all",
            SUBSCRIBE,
            Bytes::new(),
            Code::Internal,
            "Missing request message",
        ),
        (
            "a frame longer than the tracker takes",
            SUBSCRIBE,
            frame(0, 64 << 20, &[0; 16]),
            Code::OutOfRange,
            "message length too large",
        ),
        (
            "a message flagged compressed without an encoding",
            SUBSCRIBE,
            frame(1, valid_len, &valid),
            Code::Internal,
            "compressed-flag",
        ),
        (
            "a method the tracker does not have",
            "/weft.tracker.v1.Tracker/Publish",
            frame(0, valid_len, &valid),
            Code::Unimplemented,
            "",
        ),
    ];
    for (name, path, body, code, message) in calls {
        let status = grpc(addr, path, body).await;
        assert_eq!(status.code(), code, "{name}: {status}");
        assert!(
            status.message().contains(message),
            "{name}: {status} lacks {message:?}"
        );
    }

    let mut c = client::connect(&url).await.expect("connect");
    let unknown_scope = pb::SubscribeRequest {
        policy_scope: 7,
        ..all_clusters()
    };
    let refused = c.subscribe(unknown_scope).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(refused.message(), "policy_scope: unknown value 7");
    let bad_cluster = pb::SubscribeRequest {
        cluster: "Not A Cluster!".into(),
        policy_scope: pb::PolicyScope::OwnCluster.into(),
        ..all_clusters()
    };
    let refused = c.subscribe(bad_cluster).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .starts_with("cluster: invalid cluster id \"Not A Cluster!\""),
        "{refused:?}"
    );
    // A position the tracker never had, of its own epoch or another: a snapshot.
    for resume in [
        position(&at.epoch, u64::MAX),
        position("", 0),
        position(&"x".repeat(10_000), 3),
    ] {
        let request = pb::SubscribeRequest {
            resume: Some(resume),
            ..all_clusters()
        };
        let mut stream = c.subscribe(request).await.expect("subscribed").into_inner();
        let first = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("an update");
        assert!(
            matches!(&first.change, Some(pb::update::Change::Snapshot(p)) if p.first),
            "{first:?}"
        );
    }

    let replica = client::sync(&url, all_clusters(), WAIT)
        .await
        .expect("a normal subscriber is served");
    assert!(replica.ready());
    assert_eq!(replica.position(), Some(&at));
    assert_eq!(tracker.position(), at, "the junk changed nothing");
}
