//! Faults against the real data plane, on the lab of `tests/dataplane_lab/` (two clusters, a
//! client pod behind node A, a server pod behind node B, the real tracker, CAs and node
//! agents), as root: weft's table flushed or deleted by hand is restored; a node agent killed
//! fails closed and, restarted, carries traffic again with the same table; a policy tightened
//! while a connection is open closes it. One lab for the three, in that order, to keep the
//! run short on CI's two cores.

mod dataplane_lab;
mod netns;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use weft::lab::{Lab, LabNode, LabPod, exchange};

use dataplane_lab::{LINE_PORT, nft};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// weft's table in `node` (`nft -j list table inet weft`), handles removed: a table made
/// again gets new ones from the kernel (a restarted agent replaces its table in one
/// transaction, so the table's own handle changes while everything in it is the same).
fn table(node: &LabNode) -> Option<serde_json::Value> {
    let text = nft(node, &["-j", "list", "table", "inet", "weft"]).ok()?;
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("nft's JSON");
    strip_handles(&mut json);
    Some(json)
}

fn strip_handles(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.remove("handle");
            map.values_mut().for_each(strip_handles);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_handles),
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

/// Polls `check` every 100 ms until it holds or `within` passes; how long it took.
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_survives_a_flushed_table_a_killed_agent_and_a_tightened_policy() {
    if !netns::prerequisites() {
        return;
    }
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
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
    let agent = &plane.nodes.iter().find(|n| n.node.name == node_a.name);
    let agent = agent.expect("node A's agent");
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
    drop_lab(lab);
}

fn drop_lab(lab: Lab) {
    let prefix = lab.prefix().to_owned();
    drop(lab);
    assert!(Lab::namespaces_of(&prefix).is_empty(), "namespaces left");
}
