//! Faults against the real data plane, on the lab of `tests/dataplane_lab/` (two clusters, a
//! client pod behind node A, a server pod behind node B, the real tracker, CAs and node
//! agents), as root: weft's table flushed or deleted by hand is restored; a node agent killed
//! fails closed and, restarted, carries traffic again with the same table; a policy tightened
//! while a connection is open closes it. One lab for the three, in that order, to keep the
//! run short on CI's two cores. More labs, one after the other (never two at once, for the
//! same cores): node agents stopped and restarted in a loop while a prober sends allowed and
//! denied traffic (THREATS 29), certificates rotating every few seconds under traffic
//! (THREATS 11), a node that holds every connection before its first complete view, a pod
//! reaching its neighbour through its own node, IPv6 end to end on the dual-stack lab, a pod
//! cut off until the view has it, the nodes explaining a connection (`/explain`, `weft
//! explain`) as their listeners decide it, and agents told to stop draining what they carry.

mod dataplane_lab;
mod netns;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use weft::demo::plane::{ControlPlane, PlaneOptions, Stop, TRACKER_PORT};
use weft::lab::{ExchangeOutcome, LabNode, LabPod, exchange, http_get};

use dataplane_lab::{ECHO_PORT, LINE_PORT, config_dump, eventually, nft};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The labs of this file run one at a time: each brings up a tracker, two CAs and two agents,
/// and CI has two cores.
static ONE_LAB_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What each test starts with, or `None` without the prerequisites: its turn at the lab, the
/// agent's binary and a scratch directory.
async fn begin() -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    &'static Path,
    tempfile::TempDir,
)> {
    if !netns::prerequisites() {
        return None;
    }
    let one_lab = ONE_LAB_AT_A_TIME.lock().await;
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    Some((
        one_lab,
        weft,
        tempfile::tempdir().expect("a temporary directory"),
    ))
}

/// weft's table in `node` (`nft -j list table inet weft`), handles and counts removed: a table
/// made again gets new handles from the kernel (a restarted agent replaces its table in one
/// transaction, so the table's own handle changes while everything in it is the same), and
/// its drop rules count what they drop.
fn table(node: &LabNode) -> Option<serde_json::Value> {
    let text = nft(node, &["-j", "list", "table", "inet", "weft"]).ok()?;
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("nft's JSON");
    strip_run_state(&mut json);
    Some(json)
}

/// Drops rule handles and zeroes counters: what differs between two listings of one ruleset.
fn strip_run_state(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("handle");
            if let Some(serde_json::Value::Object(counter)) = map.get_mut("counter") {
                counter.values_mut().for_each(|n| *n = 0.into());
            }
            map.values_mut().for_each(strip_run_state);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_run_state),
        _ => {}
    }
}

/// Whether a probe from the client to the server's responder is answered.
async fn probe(client: &LabPod, to: SocketAddr) -> bool {
    exchange(&client.netns, None, to, "probe", PROBE_TIMEOUT)
        .await
        .outcome
        .allowed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_survives_a_flushed_table_a_killed_agent_and_a_tightened_policy() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let (lab, set, allow) = dataplane_lab::build_lab(work.path());
    let (client, server, node_a, _) = dataplane_lab::ends(&lab);
    let to = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, to, "server")
        .expect("the server's responder");
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &allow).await;
    assert!(probe(client, to).await, "client → server through weft");
    let original = table(node_a).expect("weft's table in node A");

    // 1. The table flushed, then deleted, by hand: restored within a few checks (1 s each).
    for how in [
        &["flush", "table", "inet", "weft"][..],
        &["delete", "table", "inet", "weft"][..],
    ] {
        nft(node_a, how).expect("nft changes weft's table");
        assert_ne!(table(node_a).as_ref(), Some(&original));
        let restored = eventually(Duration::from_secs(5), async || {
            table(node_a).as_ref() == Some(&original)
        })
        .await;
        assert!(restored.is_some(), "`nft {}` not undone", how.join(" "));
        assert!(
            probe(client, to).await,
            "a probe after `nft {}`",
            how.join(" ")
        );
    }

    // 2. The agent of node A killed: its pod's connections fail closed (capture stays, nothing
    //    listens); restarted with the same command line, traffic flows and the table is the same.
    let agent = dataplane_lab::agent(&plane, node_a);
    let pid = agent.process.pid().expect("the agent's pid");
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("the agent's command line")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let before = table(node_a).expect("weft's table");
    lab.kill(&agent.process).await;
    assert!(!probe(client, to).await, "a probe while the agent is down");
    assert_eq!(table(node_a), Some(before.clone()), "capture stays");
    let mut command = Command::new(weft);
    command.args(&argv[1..]);
    let restarted = lab
        .spawn(&node_a.netns, "weft node (restarted)", &command)
        .expect("the agent restarts");
    let back = eventually(Duration::from_secs(15), async || probe(client, to).await).await;
    assert!(
        back.is_some(),
        "no traffic after the restart: {:?}",
        restarted.output().tail(20)
    );
    assert_eq!(
        table(node_a),
        Some(before),
        "the same table after a restart"
    );

    // 3. A policy denying the client tightened while a connection is open: it is closed.
    let stream = client
        .netns
        .connect(None, to, PROBE_TIMEOUT)
        .await
        .expect("a long-lived connection");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"hello\n").await.expect("write");
    let answer = lines.next_line().await.expect("an answer");
    assert!(
        answer.is_some_and(|a| a.ends_with("answered by server")),
        "the long-lived connection works"
    );
    let closed = tokio::spawn(async move {
        // Ends with 0 bytes or an error when the connection is closed.
        let ended = lines.next_line().await;
        (Instant::now(), format!("{ended:?}"))
    });
    let deny = dataplane_lab::step(true);
    let denied_set = dataplane_lab::clusterset(&deny, &work.path().join("staging-deny"));
    let written = Instant::now();
    let revision = plane.revision().await.expect("revision");
    let revision = plane
        .next_step(&allow, &deny, true, revision)
        .await
        .expect("the deny step");
    plane
        .wait_nodes(&denied_set, revision)
        .await
        .expect("the nodes at the deny step");
    let (at, how) = tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("the open connection is closed within 3 s of the policy")
        .expect("the reader");
    let took = at.duration_since(written);
    assert!(took <= Duration::from_secs(3), "closed after {took:?}");
    eprintln!("the open connection ended {took:?} after the policy was written: {how}");
    assert!(!probe(client, to).await, "a new connection is denied");
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// Issue 5 §1: fresh nodes (no agents, no weft tables) forward the client's connection to the
/// server unevaluated; node A's agent, started while its tracker is unreachable (node B's
/// running as usual), holds: the same connection is refused, never passed unevaluated, and
/// the table is in hold mode; once the tracker is reachable the view completes, capture
/// replaces the hold and the same connection succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_its_first_complete_view_a_node_refuses_what_it_forwards() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let started = Instant::now();
    let (lab, set, step) = dataplane_lab::build_lab(work.path());
    let (client, server, node_a, _) = dataplane_lab::ends(&lab);
    let to = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, to, "server")
        .expect("the server's responder");
    let mut plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let revision = plane.revision().await.expect("the tracker's revision");
    assert!(probe(client, to).await, "client → server through weft");
    let captured = table(node_a).expect("weft's table in node A");

    // Fresh nodes: no agents, no tables; the client's traffic passes unevaluated.
    for index in 0..plane.nodes.len() {
        plane.stop_node(index, Stop::Kill).await;
        let node = plane.nodes[index].node;
        let cleanup = node
            .netns
            .run(|| Command::new(weft).args(["node", "--cleanup"]).output())
            .expect("entering the node's namespace")
            .expect("weft node --cleanup");
        assert!(cleanup.status.success(), "{cleanup:?}");
        assert_eq!(table(node), None, "{} is fresh", node.name);
    }
    assert!(probe(client, to).await, "fresh nodes forward unevaluated");
    let index = plane
        .nodes
        .iter()
        .position(|n| n.node.name == node_a.name)
        .expect("node A's agent");
    for other in (0..plane.nodes.len()).filter(|&other| other != index) {
        plane.start_node(other).expect("node B's agent starts");
    }

    // Its agent started with the tracker unreachable (node A's connections to it reset).
    nft(node_a, &["add", "table", "inet", "test_block"]).expect("a table of the test's");
    let chain = "{ type filter hook output priority 0; policy accept; }";
    nft(
        node_a,
        &["add", "chain", "inet", "test_block", "output", chain],
    )
    .expect("its chain");
    let port = TRACKER_PORT.to_string();
    let rule = [
        "add",
        "rule",
        "inet",
        "test_block",
        "output",
        "tcp",
        "dport",
        &port,
    ];
    nft(
        node_a,
        &[&rule[..], &["reject", "with", "tcp", "reset"]].concat(),
    )
    .expect("its rule");
    plane.start_node(index).expect("node A's agent starts");
    let admin = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15000);
    let held = eventually(Duration::from_secs(10), async || {
        // Nothing answers until the agent listens.
        http_get(&node_a.netns, admin, "/config_dump", PROBE_TIMEOUT)
            .await
            .ok()
            .and_then(|answer| serde_json::from_slice::<serde_json::Value>(&answer.body).ok())
            .is_some_and(|dump| dump["capture"]["mode"] == "hold")
    })
    .await;
    assert!(held.is_some(), "node A's agent never held");
    let dump = config_dump(node_a).await;
    assert_eq!(dump["ready"], false);
    let why = dump["not_ready_because"].as_str().expect("a reason");
    assert!(why.contains("hold"), "{why}");
    let hold = table(node_a).expect("weft's table in node A");
    let chains: Vec<&str> = hold["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("chain")?["name"].as_str())
        .collect();
    assert_eq!(chains, ["hold_prerouting", "hold_forward"], "the hold");
    let log = plane.nodes[index].process.output().mark();
    for _ in 0..3 {
        let outcome = exchange(&client.netns, None, to, "held", PROBE_TIMEOUT)
            .await
            .outcome;
        assert!(
            matches!(outcome, ExchangeOutcome::Refused | ExchangeOutcome::Reset),
            "held: {outcome}"
        );
    }
    // The agent's output reaches the test through a pipe and a reader thread: the last line
    // may trail the client's refusal a little.
    let refusals = || {
        plane.nodes[index]
            .process
            .output()
            .since(log)
            .iter()
            .filter(|line| line.contains("capture holds every connection"))
            .count()
    };
    eventually(Duration::from_secs(5), async || refusals() >= 3).await;
    assert_eq!(refusals(), 3, "node A's agent refused each (decision log)");

    // The tracker reachable again: the view completes, capture replaces the hold.
    nft(node_a, &["delete", "table", "inet", "test_block"]).expect("the block removed");
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("node A's agent is ready");
    assert!(probe(client, to).await, "the same connection, captured");
    assert_eq!(table(node_a), Some(captured), "capture replaced the hold");
    let capture = config_dump(node_a).await["capture"].clone();
    assert_eq!(capture["mode"], "captured");
    // Every local pod's link was found (the lab's pods each have their own veth, p0, p1, …).
    let links = capture["pod_links"].as_array().expect("pod_links[]");
    assert!(
        !links.is_empty()
            && links
                .iter()
                .all(|l| l.as_str().is_some_and(|l| l.starts_with('p'))),
        "{capture}"
    );
    assert_eq!(capture["pod_interfaces"], serde_json::json!(["p*"]));
    assert_eq!(
        capture["pods_without_link"],
        serde_json::json!([]),
        "{capture}"
    );
    eprintln!("held and released in {:?}", started.elapsed());
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// A neighbour of the client on node A (the allow step otherwise).
const NEIGHBOUR: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: neighbour
  namespace: bench
  labels:
    app: neighbour
spec:
  nodeName: node-a
  containers:
    - name: neighbour
      image: busybox
status:
  phase: Running
  podIPs:
    - ip: 10.1.1.11
    - ip: fd00:10:1:1::11
";

/// Two pods of one node: the client's connection to its neighbour leaves node A's outbound
/// proxy as a tunnel to the neighbour's HBONE address, which TPROXY cannot take from the
/// node's own output: capture marks it there, it is routed to the loopback device and node
/// A's own HBONE listener admits it (both decisions in node A's log); over IPv4, then IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaches_its_neighbour_through_its_own_node_s_hbone_listener() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let mut step = dataplane_lab::step(false);
    step.name = "neighbours".into();
    step.files
        .insert("cluster-1/neighbour.yaml".into(), NEIGHBOUR.into());
    let (lab, set, step) = dataplane_lab::build_lab_of(work.path(), step);
    let (client, _, node_a, _) = dataplane_lab::ends(&lab);
    let neighbour = lab
        .pod("cluster-1", "bench", "neighbour")
        .expect("the neighbour");
    let neighbour6 = neighbour.ip6.expect("a dual-stack neighbour");
    let targets = [
        SocketAddr::new(neighbour.ip.into(), LINE_PORT),
        SocketAddr::new(neighbour6.into(), LINE_PORT),
    ];
    for to in targets {
        lab.serve_responder(&neighbour.netns, to, "neighbour")
            .expect("the neighbour's responder");
    }
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let agent = dataplane_lab::agent(&plane, node_a);
    // Ready, by every name it answers to: the admin endpoint's, and ztunnel's on 15021.
    for (port, path) in [
        (15000, "/ready"),
        (15000, "/readyz"),
        (15021, "/healthz/ready"),
    ] {
        let at = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        let answer = http_get(&node_a.netns, at, path, PROBE_TIMEOUT)
            .await
            .expect("an answer");
        assert_eq!(answer.status, 200, "{port}{path}");
    }
    for to in targets {
        let log = agent.process.output().mark();
        let outcome = exchange(&client.netns, None, to, "hello", PROBE_TIMEOUT)
            .await
            .outcome;
        assert_eq!(
            outcome,
            ExchangeOutcome::Answered {
                by: "neighbour".into()
            },
            "{to}"
        );
        // Both decisions in node A's log.
        let destination = format!(r#""destination":"{to}""#);
        for direction in ["outbound", "inbound"] {
            let direction = format!(r#""direction":"{direction}""#);
            let parts = [&destination, r#""verdict":"allow""#, &direction];
            dataplane_lab::wait_logged(agent, log, &parts).await;
        }
    }
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// IPv6 end to end on the dual-stack lab: the client's connection to the server's IPv6
/// address is taken by node A's IPv6 listener, carried in a tunnel (`CONNECT [v6]:port`) and
/// dialled by node B from the client's own IPv6 address; a port the server's policy does not
/// admit is refused over IPv6 as over IPv4; node B's decisions name the IPv6 addresses and the
/// client's proven identity. Then plaintext over IPv6 from the wire, judged by source address,
/// and the client's IPv6 connection to an address outside every cluster, dialled directly from
/// its own address after node A's egress check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_connections_are_captured_tunnelled_and_judged_as_ipv4_ones_are() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let (lab, set, step) =
        dataplane_lab::build_lab_of(work.path(), dataplane_lab::line_port_only());
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let (client6, server6) = (
        client.ip6.expect("a dual-stack client"),
        server.ip6.expect("a dual-stack server"),
    );
    let (line, echo) = (
        SocketAddr::new(server6.into(), LINE_PORT),
        SocketAddr::new(server6.into(), ECHO_PORT),
    );
    dataplane_lab::serve_as_peer(&server.netns, line);
    dataplane_lab::serve_as_peer(&server.netns, echo);
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let agent = dataplane_lab::agent(&plane, node_b);
    let log = agent.process.output().mark();

    let identity = r#""source_identity":"spiffe://cluster-1/ns/bench/sa/default""#;
    dataplane_lab::line_answered_echo_refused(
        &client.netns,
        (line, echo),
        server6.into(),
        client6.into(),
        (agent, log),
        &[r#""direction":"inbound""#, identity],
        "through a tunnel over IPv6, the client's own address",
    )
    .await;
    // The refusal says why in one word: the server's ingress NetworkPolicy.
    let refused = format!(r#""destination":"{echo}""#);
    let ingress = r#""verdict":"deny","layer":"networkpolicy","denial":"ingress""#;
    dataplane_lab::wait_logged(agent, log, &[&refused, ingress]).await;

    // Plaintext over IPv6 from outside every cluster, taken by node B's IPv6 inbound listener
    // and judged by the server's policy on the source's address.
    let wire6 = lab.wire_ip6().expect("a dual-stack wire");
    let source = format!(r#""source":"[{wire6}]:"#);
    dataplane_lab::line_answered_echo_refused(
        lab.wire(),
        (line, echo),
        server6.into(),
        wire6.into(),
        (agent, agent.process.output().mark()),
        &[r#""direction":"plaintext""#, &source],
        "plaintext over IPv6",
    )
    .await;

    // Outside every cluster over IPv6: node A's egress check, then a direct dial from the
    // client's own address.
    let outside = SocketAddr::new(wire6.into(), 7001);
    dataplane_lab::serve_as_peer(lab.wire(), outside);
    let agent_a = dataplane_lab::agent(&plane, node_a);
    let log = agent_a.process.output().mark();
    let outcome = exchange(&client.netns, None, outside, "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert_eq!(
        outcome,
        ExchangeOutcome::Answered {
            by: client6.to_string()
        },
        "outside, over IPv6: the peer sees the client's own address"
    );
    let destination = format!(r#""destination":"{outside}""#);
    let parts = [
        r#""direction":"outbound""#,
        &destination,
        r#""verdict":"allow""#,
    ];
    dataplane_lab::wait_logged(agent_a, log, &parts).await;
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// A pod that runs before the view has it (between its CNI wiring it and its status reaching
/// the tracker): capture does not know its address, but the lab's agents run with
/// `--pod-interfaces`, so its node passes nothing of its, either way, until the view has it;
/// then its connection is captured and judged as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_the_view_does_not_have_yet_is_cut_off_until_it_has_it() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let without = dataplane_lab::step(false);
    let mut with = dataplane_lab::step(false);
    with.name = "newcomer".into();
    with.files
        .insert("cluster-1/neighbour.yaml".into(), NEIGHBOUR.into());
    let (lab, set, with) = dataplane_lab::build_lab_of(work.path(), with);
    let (_, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let newcomer = lab
        .pod("cluster-1", "bench", "neighbour")
        .expect("the newcomer");
    let to_server = dataplane_lab::server_addr(&lab, LINE_PORT);
    let to_newcomer = SocketAddr::new(newcomer.ip.into(), LINE_PORT);
    dataplane_lab::serve_as_peer(&server.netns, to_server);
    dataplane_lab::serve_as_peer(&newcomer.netns, to_newcomer);
    let before = dataplane_lab::clusterset(&without, &work.path().join("staging-before"));
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &before, &without).await;
    let reached = async |from: &weft::lab::Netns, to: SocketAddr| {
        exchange(from, None, to, "hello", PROBE_TIMEOUT)
            .await
            .outcome
    };
    let out = reached(&newcomer.netns, to_server).await;
    assert!(!out.allowed(), "from the newcomer while unknown: {out}");
    let into = reached(lab.wire(), to_newcomer).await;
    assert!(!into.allowed(), "to the newcomer while unknown: {into}");
    // Node A counts what it dropped on the way to the newcomer (read at each table check).
    let counted = eventually(Duration::from_secs(5), async || {
        config_dump(node_a).await["capture"]["uncaptured_dropped"]
            .as_u64()
            .is_some_and(|n| n > 0)
    })
    .await;
    assert!(counted.is_some(), "node A's uncaptured_dropped");
    let metrics = dataplane_lab::metrics(node_a).await;
    let total = metrics.lines().find_map(|l| {
        l.strip_prefix("weft_node_uncaptured_dropped_total ")
            .and_then(|n| n.parse::<u64>().ok())
    });
    assert!(total.is_some_and(|n| n > 0), "{metrics}");

    let agent = dataplane_lab::agent(&plane, node_b);
    let log = agent.process.output().mark();
    let revision = plane.revision().await.expect("revision");
    let revision = plane
        .next_step(&without, &with, true, revision)
        .await
        .expect("the tracker takes the step");
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("the nodes know the newcomer");
    assert_eq!(
        reached(&newcomer.netns, to_server).await,
        ExchangeOutcome::Answered {
            by: newcomer.ip.to_string()
        },
        "from the newcomer once known"
    );
    let source = format!(r#""source":"{}:"#, newcomer.ip);
    let identity = r#""source_identity":"spiffe://cluster-1/ns/bench/sa/default""#;
    let parts = [
        r#""direction":"inbound""#,
        &source,
        identity,
        r#""verdict":"allow""#,
    ];
    dataplane_lab::wait_logged(agent, log, &parts).await;
    assert!(
        reached(lab.wire(), to_newcomer).await.allowed(),
        "to the newcomer once known"
    );
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// One probe of the restart loop's prober.
#[derive(Debug)]
struct Attempt {
    /// Whether the policy admits it.
    admitted: bool,
    started: Instant,
    ended: Instant,
    outcome: ExchangeOutcome,
}

/// Probes `admitted` and `denied` in turn from `client`, a probe every 50 ms, until `stop`.
async fn prober(
    client: &LabPod,
    admitted: SocketAddr,
    denied: SocketAddr,
    stop: &AtomicBool,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        for (to, is_admitted) in [(admitted, true), (denied, false)] {
            let started = Instant::now();
            let outcome = exchange(&client.netns, None, to, "probe", Duration::from_secs(1))
                .await
                .outcome;
            attempts.push(Attempt {
                admitted: is_admitted,
                started,
                ended: Instant::now(),
                outcome,
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    attempts
}

/// Each certificate of the agent in `node`, by identity, with its renewals so far.
async fn renewals(node: &LabNode) -> BTreeMap<String, u64> {
    let dump = config_dump(node).await;
    let certificates = dump["certificates"].as_array().expect("certificates[]");
    certificates
        .iter()
        .map(|c| {
            let identity = c["identity"].as_str().expect("an identity").to_owned();
            (identity, c["renewals"].as_u64().expect("renewals"))
        })
        .collect()
}

/// THREATS 29: with the server admitting the line port only, both node agents are stopped
/// (SIGTERM and SIGKILL in turn) and started again five times while a prober sends admitted
/// and denied connections: no denied one ever completes its exchange; admitted ones fail
/// only while an agent is down or not yet ready, and work again after each restart; capture
/// stays while an agent is down, and the tables after the loop are those before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_loop_never_lets_a_denied_connection_through() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let started = Instant::now();
    let (lab, set, step) =
        dataplane_lab::build_lab_of(work.path(), dataplane_lab::line_port_only());
    let (client, server, _, _) = dataplane_lab::ends(&lab);
    let admitted = dataplane_lab::server_addr(&lab, LINE_PORT);
    let denied = dataplane_lab::server_addr(&lab, ECHO_PORT);
    for to in [admitted, denied] {
        lab.serve_responder(&server.netns, to, "server")
            .expect("the server's responders");
    }
    let mut plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let revision = plane.revision().await.expect("the tracker's revision");
    assert!(probe(client, admitted).await, "the line port is admitted");
    assert!(!probe(client, denied).await, "the echo port is denied");
    let tables: Vec<_> = plane.nodes.iter().map(|n| table(n.node)).collect();
    assert!(tables.iter().all(Option::is_some), "weft's tables");

    let stop = AtomicBool::new(false);
    // Each restart: when its agent was told to stop, and when every agent was ready again.
    let restarts = async {
        let mut windows = Vec::new();
        tokio::time::sleep(Duration::from_millis(500)).await;
        for round in 0..5 {
            // Node A, A, B, B, A against SIGTERM, SIGKILL in turn: each node gets both.
            let index = (round / 2) % plane.nodes.len();
            let how = match round % 2 {
                0 => Stop::Terminate {
                    grace: Duration::from_secs(5),
                },
                _ => Stop::Kill,
            };
            let node = plane.nodes[index].node;
            let down = Instant::now();
            let ended = plane.stop_node(index, how).await;
            if matches!(how, Stop::Terminate { .. }) {
                assert!(
                    ended.is_some_and(|status| status.success()),
                    "{} exits cleanly on SIGTERM: {ended:?}",
                    node.name
                );
            }
            // Down: capture stays (the table untouched), so nothing goes around the proxy.
            assert_eq!(table(node), tables[index], "{how:?}: capture stays");
            assert!(!probe(client, admitted).await, "{how:?}: fails closed");
            assert!(!probe(client, denied).await, "{how:?}: denied while down");
            plane.start_node(index).expect("the agent starts again");
            plane
                .wait_nodes(&set, revision)
                .await
                .expect("the agents are ready again");
            let ready = Instant::now();
            let back = eventually(Duration::from_secs(5), async || {
                probe(client, admitted).await
            })
            .await;
            assert!(back.is_some(), "round {round}: no traffic after {how:?}");
            eprintln!(
                "round {round}: {} stopped by {how:?}, ready after {:?}, traffic after {:?} more",
                node.name,
                ready - down,
                back.unwrap_or_default()
            );
            windows.push((down, ready));
            // Some traffic with every agent up before the next round.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        stop.store(true, Ordering::Relaxed);
        windows
    };
    let (windows, attempts) = tokio::join!(restarts, prober(client, admitted, denied, &stop));

    let through: Vec<_> = attempts
        .iter()
        .filter(|a| !a.admitted && a.outcome.allowed())
        .collect();
    assert!(
        through.is_empty(),
        "denied connections completed: {through:?}"
    );
    // An admitted probe may fail if it overlaps a window from an agent's stop to every agent
    // being ready again.
    let outside: Vec<_> = attempts
        .iter()
        .filter(|a| a.admitted && !a.outcome.allowed())
        .filter(|a| {
            !windows
                .iter()
                .any(|(down, ready)| a.ended >= *down && a.started <= *ready)
        })
        .collect();
    let admitted_failed = attempts
        .iter()
        .filter(|a| a.admitted && !a.outcome.allowed())
        .count();
    let count = |admitted: bool| attempts.iter().filter(|a| a.admitted == admitted).count();
    eprintln!(
        "{} admitted probes, {admitted_failed} failed during restarts; {} denied probes, none completed; {:?} in all",
        count(true),
        count(false),
        started.elapsed()
    );
    assert!(
        outside.is_empty(),
        "admitted probes failed with every agent ready: {outside:?}"
    );
    for (running, before) in plane.nodes.iter().zip(&tables) {
        assert_eq!(
            &table(running.node),
            before,
            "{}'s table",
            running.node.name
        );
    }
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// Sends a line on `lines`' connection every 100 ms until `stop`; how many were answered, and
/// the first failure.
async fn keep_talking(stream: tokio::net::TcpStream, stop: &AtomicBool) -> (usize, Option<String>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut answered = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = write
            .write_all(format!("line {answered}\n").as_bytes())
            .await
        {
            return (answered, Some(format!("write: {e}")));
        }
        match tokio::time::timeout(PROBE_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) if line.ends_with("answered by server") => answered += 1,
            other => return (answered, Some(format!("after {answered} lines: {other:?}"))),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (answered, None)
}

/// Opens a connection and exchanges a line every 100 ms until `stop`; the outcomes.
async fn keep_connecting(
    client: &LabPod,
    to: SocketAddr,
    stop: &AtomicBool,
) -> Vec<ExchangeOutcome> {
    let mut outcomes = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        outcomes.push(
            exchange(&client.netns, None, to, "new", PROBE_TIMEOUT)
                .await
                .outcome,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outcomes
}

/// THREATS 11, rotation half: certificates of 4 s (the CA's minimum lowered to match),
/// renewed at about half of it, for about three lifetimes of traffic — a connection
/// exchanging a line every 100 ms and a new connection every 100 ms: the open one stays
/// open, every new one succeeds, both agents renewed their certificates meanwhile, and new
/// tunnels went on new HBONE connections presenting the renewed certificate (pool keys carry
/// the certificate's generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_breaking_a_connection() {
    const LIFETIME: Duration = Duration::from_secs(4);
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let started = Instant::now();
    let (lab, set, step) = dataplane_lab::build_lab(work.path());
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let to = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, to, "server")
        .expect("the server's responder");
    let ttl = format!("{}s", LIFETIME.as_secs());
    let options = PlaneOptions {
        ca_args: vec!["--min-ttl".into(), ttl.clone()],
        node_args: vec!["--certificate-ttl".into(), ttl],
        ..PlaneOptions::default()
    };
    let plane: ControlPlane<'_> =
        dataplane_lab::start_plane_with(&lab, weft, work.path(), &set, &step, &options).await;
    let before = [renewals(node_a).await, renewals(node_b).await];
    for (node, certificates) in [node_a, node_b].iter().zip(&before) {
        assert!(!certificates.is_empty(), "{} holds certificates", node.name);
    }

    let stream = client
        .netns
        .connect(None, to, PROBE_TIMEOUT)
        .await
        .expect("a long-lived connection");
    let stop = AtomicBool::new(false);
    let timer = async {
        tokio::time::sleep(LIFETIME * 3).await;
        stop.store(true, Ordering::Relaxed);
    };
    let ((answered, broken), outcomes, ()) = tokio::join!(
        keep_talking(stream, &stop),
        keep_connecting(client, to, &stop),
        timer
    );

    let after = [renewals(node_a).await, renewals(node_b).await];
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.allowed()).collect();
    eprintln!(
        "{answered} lines on the open connection, {} new connections ({} failed); renewals \
         before {before:?}, after {after:?}; {:?} in all",
        outcomes.len(),
        failed.len(),
        started.elapsed()
    );
    assert_eq!(broken, None, "the open connection broke");
    assert!(failed.is_empty(), "new connections failed: {failed:?}");
    assert!(
        outcomes.len() >= 20,
        "only {} new connections",
        outcomes.len()
    );
    // A renewed certificate is presented by new tunnels at once: they go on new HBONE
    // connections (the old ones idle out), so node A holds more than one.
    let pooled = config_dump(node_a).await["pool_connections"]
        .as_u64()
        .expect("pool_connections");
    assert!(
        pooled >= 3,
        "{pooled} pooled connections: new tunnels kept presenting the first certificate"
    );
    for ((node, before), after) in [node_a, node_b].iter().zip(&before).zip(&after) {
        for (identity, renewed) in after {
            let earlier = before.get(identity).copied().unwrap_or(0);
            assert!(
                *renewed > earlier,
                "{}: {identity} not renewed during the traffic ({earlier} → {renewed})",
                node.name
            );
        }
    }
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// `/explain` on a node's admin endpoint (and `weft explain`, which asks it) answers what the
/// node's listeners decide: node A lets the client's connection go on to node B, node B admits
/// the line port and refuses the echo port with the very reason its decision log gives the
/// real connection; a bad question is a 400 naming it, and only the localhost admin port
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_explain_a_connection_as_their_listeners_decide_it() {
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let (lab, set, step) =
        dataplane_lab::build_lab_of(work.path(), dataplane_lab::line_port_only());
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let json = |(status, body): (u16, String)| -> serde_json::Value {
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("the answer is JSON")
    };
    let query = |port: u16| format!("from={}&to={}:{port}", client.ip, server.ip);

    // Node A: egress allowed, on to node B, which decides the rest.
    let at_a = json(ask(node_a, &query(LINE_PORT)).await);
    assert_eq!(at_a["node"], "cluster-1/node-a", "{at_a}");
    assert_eq!(at_a["verdict"], "continues", "{at_a}");
    assert_eq!(at_a["next"], "cluster-2/node-b", "{at_a}");
    let outbound = &at_a["decisions"][0];
    assert_eq!(outbound["direction"], "outbound", "{at_a}");
    assert_eq!(
        outbound["source_identity"], "spiffe://cluster-1/ns/bench/sa/default",
        "{at_a}"
    );

    // Node B: the line port admitted, the echo port refused by the server's policy, as a real
    // connection is.
    let line = json(ask(node_b, &query(LINE_PORT)).await);
    assert_eq!(line["verdict"], "allow", "{line}");
    assert_eq!(line["decisions"][0]["direction"], "inbound", "{line}");
    let echo = json(ask(node_b, &query(ECHO_PORT)).await);
    assert_eq!(echo["verdict"], "deny", "{echo}");
    let refused = &echo["decisions"][0];
    assert_eq!(
        (&refused["layer"], &refused["denial"]),
        (&"networkpolicy".into(), &"ingress".into()),
        "{echo}"
    );
    let agent_b = dataplane_lab::agent(&plane, node_b);
    let log = agent_b.process.output().mark();
    let echo_at = SocketAddr::new(server.ip.into(), ECHO_PORT);
    let outcome = exchange(&client.netns, None, echo_at, "hello", PROBE_TIMEOUT)
        .await
        .outcome;
    assert!(!outcome.allowed(), "the echo port: {outcome}");
    let reason = format!(r#""reason":{}"#, refused["reason"]);
    dataplane_lab::wait_logged(agent_b, log, &[r#""verdict":"deny""#, &reason]).await;

    // `weft explain`, in the node's namespace as in its pod: the same answers, for people.
    let explain = |node: &LabNode, args: &[String]| {
        node.netns
            .run(|| Command::new(weft).arg("explain").args(args).output())
            .expect("entering the node's namespace")
            .expect("weft explain runs")
    };
    let args = |from: IpAddr, to: SocketAddr| {
        ["--from", &from.to_string(), "--to", &to.to_string()].map(str::to_owned)
    };
    let line_at = SocketAddr::new(server.ip.into(), LINE_PORT);
    let output = explain(node_a, &args(client.ip.into(), line_at));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        text.starts_with("node cluster-1/node-a: allowed here")
            && text.contains("allow by networkpolicy")
            && text.contains("next: node cluster-2/node-b"),
        "{text}"
    );
    let output = explain(node_b, &args(client.ip.into(), echo_at));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("deny by networkpolicy (ingress)"),
        "{text}{output:?}"
    );
    // Over IPv6 as over IPv4: the same pods, the same decisions.
    let (client6, server6) = (
        client.ip6.expect("a dual-stack client"),
        server.ip6.expect("a dual-stack server"),
    );
    for (port, verdict) in [
        (LINE_PORT, "allow by networkpolicy"),
        (ECHO_PORT, "deny by networkpolicy (ingress)"),
    ] {
        let to = SocketAddr::new(server6.into(), port);
        let output = explain(node_b, &args(client6.into(), to));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            text.contains(&format!("inbound {client6} (cluster-1/bench/client"))
                && text.contains(&format!("-> {to} (cluster-2/bench/server"))
                && text.contains(verdict),
            "{text}{output:?}"
        );
    }
    let mut as_json = args(client.ip.into(), echo_at).to_vec();
    as_json.extend(["--output".to_owned(), "json".to_owned()]);
    let output = explain(node_b, &as_json);
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(printed, echo, "the JSON output is the endpoint's answer");

    // Neither end on the asked node: a clear error, and a failure from the CLI too.
    let (status, body) = ask(node_a, &format!("from={}&to={line_at}", server.ip)).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("neither end is a pod of node cluster-1/node-a"),
        "{body}"
    );
    let output = explain(node_a, &args(server.ip.into(), line_at));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("answered 404: neither end"),
        "{stderr}"
    );
    // A bad question, and the metrics port, which never explains.
    let (status, body) = ask(node_a, &format!("from=client&to={line_at}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("from=\"client\": not an IP address"),
        "{body}"
    );
    let metrics = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15020);
    let path = format!("/explain?{}", query(LINE_PORT));
    let answer = http_get(&node_a.netns, metrics, &path, PROBE_TIMEOUT)
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(answer.status, 404, "the metrics port explains nothing");
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// The status and body of `/explain?QUERY` on the admin endpoint of `node`'s agent.
async fn ask(node: &LabNode, query: &str) -> (u16, String) {
    let admin = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15000);
    let answer = http_get(
        &node.netns,
        admin,
        &format!("/explain?{query}"),
        PROBE_TIMEOUT,
    )
    .await
    .expect("/explain answers");
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// One line of the lab's responder protocol on an open connection: its answer, or why none.
async fn say(
    (lines, write): &mut (
        tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
        tokio::net::tcp::OwnedWriteHalf,
    ),
    line: &str,
) -> Result<String, String> {
    write
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    match tokio::time::timeout(PROBE_TIMEOUT, lines.next_line()).await {
        Ok(Ok(Some(answer))) => Ok(answer),
        other => Err(format!("{other:?}")),
    }
}

/// An agent told to stop (SIGTERM, as a DaemonSet's pod is stopped) drains: it is no longer
/// ready, its listeners close at once so that a new connection fails closed as with no agent,
/// and a connection it carries goes on. Node B (its HBONE server: the tunnel's connection told
/// to carry no new tunnel) exits as soon as that connection ends; node A (its outbound
/// listener), with the connection left open, at `--drain-timeout`, the connection closed; and,
/// told twice, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_told_to_stop_drains_what_it_carries() {
    const DRAIN: Duration = Duration::from_secs(5);
    // A connection with no listener to take it fails by timing out (capture drops it).
    const NEW: Duration = Duration::from_secs(1);
    let Some((_one_lab, weft, work)) = begin().await else {
        return;
    };
    let (lab, set, step) = dataplane_lab::build_lab(work.path());
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let to = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, to, "server")
        .expect("the server's responder");
    let options = PlaneOptions {
        node_args: vec!["--drain-timeout".into(), format!("{}s", DRAIN.as_secs())],
        ..PlaneOptions::default()
    };
    let mut plane =
        dataplane_lab::start_plane_with(&lab, weft, work.path(), &set, &step, &options).await;
    let open = || async {
        let stream = client
            .netns
            .connect(None, to, PROBE_TIMEOUT)
            .await
            .expect("a connection through both agents");
        let (read, write) = stream.into_split();
        let mut talk = (BufReader::new(read).lines(), write);
        let answer = say(&mut talk, "hello").await;
        assert_eq!(answer, Ok("hello answered by server".to_owned()));
        talk
    };
    let how = Stop::Terminate { grace: DRAIN * 3 };

    // Node B, while the connection is open; the connection then ends.
    let mut talk = open().await;
    let agent_b = dataplane_lab::agent(&plane, node_b);
    let log = agent_b.process.output().mark();
    let stopping = async {
        let ended = plane.stop_node(1, how).await;
        (ended, Instant::now())
    };
    let meanwhile = async {
        let draining = eventually(Duration::from_secs(5), async || {
            readiness(node_b).await.contains("draining")
        })
        .await;
        assert!(draining.is_some(), "node B says it is draining");
        // A tunnel node A opened before the GOAWAY reached it is still taken; then none is.
        let refused = eventually(Duration::from_secs(2), async || {
            !exchange(&client.netns, None, to, "new", NEW)
                .await
                .outcome
                .allowed()
        })
        .await;
        assert!(refused.is_some(), "new connections while node B drains");
        let new = exchange(&client.netns, None, to, "new", NEW).await.outcome;
        assert!(
            !new.allowed(),
            "a new connection while node B drains: {new}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let answer = say(&mut talk, "still there?").await;
        assert_eq!(answer, Ok("still there? answered by server".to_owned()));
        drop(talk);
        Instant::now()
    };
    let ((ended, exited), closed) = tokio::join!(stopping, meanwhile);
    assert!(
        ended.is_some_and(|status| status.success()),
        "node B exits cleanly: {ended:?}"
    );
    let after = exited - closed;
    assert!(
        after < DRAIN / 2,
        "node B exited {after:?} after its last connection ended"
    );
    dataplane_lab::wait_logged(agent_b, log, &["node agent drained"]).await;
    plane.start_node(1).expect("node B's agent starts again");
    let revision = plane.revision().await.expect("the tracker's revision");
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("node B is ready again");

    // Node A, the connection left open: it is closed at the drain's end.
    let mut talk = open().await;
    let agent_a = dataplane_lab::agent(&plane, node_a);
    let log = agent_a.process.output().mark();
    let told = Instant::now();
    let stopping = plane.stop_node(0, how);
    let meanwhile = async {
        tokio::time::sleep(DRAIN / 2).await;
        let answer = say(&mut talk, "still there?").await;
        assert_eq!(answer, Ok("still there? answered by server".to_owned()));
        let new = exchange(&client.netns, None, to, "new", NEW).await.outcome;
        assert!(
            !new.allowed(),
            "a new connection while node A drains: {new}"
        );
    };
    let (ended, ()) = tokio::join!(stopping, meanwhile);
    let took = told.elapsed();
    assert!(
        ended.is_some_and(|status| status.success()),
        "node A exits cleanly: {ended:?}"
    );
    assert!(
        took >= DRAIN && took < DRAIN * 2,
        "node A exited {took:?} after SIGTERM, with a drain of {DRAIN:?}"
    );
    dataplane_lab::wait_logged(agent_a, log, &["the drain timed out"]).await;
    assert!(
        say(&mut talk, "gone?").await.is_err(),
        "the connection is closed with the agent"
    );

    // Node A again, told twice: the second signal ends the drain at once.
    plane.start_node(0).expect("node A's agent starts again");
    plane
        .wait_nodes(&set, revision)
        .await
        .expect("node A is ready again");
    let mut talk = open().await;
    let pid = dataplane_lab::agent(&plane, node_a)
        .process
        .pid()
        .expect("node A's agent's pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let draining = eventually(Duration::from_secs(5), async || {
        readiness(node_a).await.contains("draining")
    })
    .await;
    assert!(draining.is_some(), "node A says it is draining");
    let told = Instant::now();
    let ended = plane.stop_node(0, how).await;
    let took = told.elapsed();
    assert!(
        ended.is_some_and(|status| status.success()) && took < DRAIN / 2,
        "node A told twice: {ended:?} after {took:?}"
    );
    assert!(say(&mut talk, "gone?").await.is_err(), "closed at once");
    drop(plane);
    dataplane_lab::drop_lab(lab);
}

/// What the readiness endpoint of `node`'s agent says (15021, `/healthz/ready`), or why it
/// does not answer.
async fn readiness(node: &LabNode) -> String {
    let at = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15021);
    match http_get(&node.netns, at, "/healthz/ready", PROBE_TIMEOUT).await {
        Ok(answer) => format!(
            "{} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ),
        Err(e) => e.to_string(),
    }
}
