//! `weft demo` end to end, as root: the built-in two-cluster demo with real traffic through
//! the node agents, the same scenario from a directory of steps and from one clusterset, a
//! scenario with identity rules, and Ctrl-C in the middle — each leaving no namespace, process
//! or temporary directory behind.

mod netns;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

fn weft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weft"))
}

/// Nothing of the demo run by process `pid` is left: namespaces, processes started with its
/// temporary directory, the directory itself.
fn assert_nothing_left(pid: u32) {
    let prefix = format!("weft-{pid}-");
    let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(namespaces.is_empty(), "namespaces left: {namespaces:?}");
    let work = format!("weft-demo-{pid}-");
    let dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&work))
                .collect()
        })
        .unwrap_or_default();
    assert!(dirs.is_empty(), "temporary directories left: {dirs:?}");
    let processes: Vec<String> = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .filter(|c| c.contains(&work))
                .collect()
        })
        .unwrap_or_default();
    assert!(processes.is_empty(), "processes left: {processes:?}");
}

/// Runs `weft demo ARGS…` to its end, checks that it succeeded and left nothing behind, and
/// returns what it printed; a failure shows both streams.
fn demo_leaving_nothing(args: &[&std::ffi::OsStr]) -> String {
    let child = weft()
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weft demo starts");
    let pid = child.id();
    let out = child.wait_with_output().expect("weft demo ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_nothing_left(pid);
    stdout
}

#[test]
fn the_built_in_demo_observes_what_the_engine_expects_and_leaves_nothing() {
    if !netns::prerequisites() {
        return;
    }
    let stdout = demo_leaving_nothing(&[]);
    for step in ["1-no-policy", "2-default-deny", "3-allow-from-cluster-1"] {
        assert!(stdout.contains(step), "{stdout}");
    }
    assert!(
        stdout.contains("15 probes made: 15 as expected, 0 not; 0 not probed"),
        "{stdout}"
    );
    // The identities come from the nodes' decision logs, over mTLS.
    assert!(
        stdout.contains(
            "identities spiffe://cluster-1/ns/demo-c1/sa/default -> spiffe://cluster-2/ns/demo-c2/sa/default"
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("no decision logged"),
        "every probe is explained: {stdout}"
    );
}

#[test]
fn a_scenario_directory_runs_as_steps_or_as_one_clusterset() {
    if !netns::prerequisites() {
        return;
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-cluster");
    let stdout = demo_leaving_nothing(&["--clusters".as_ref(), example.as_os_str()]);
    assert!(
        stdout.contains("== step 3/3: 3-allow-from-cluster-1"),
        "{stdout}"
    );
    assert!(stdout.contains("15 as expected, 0 not"), "{stdout}");

    // One clusterset with its probes inside: step 2 alone, probes from a bare address too.
    let one = tempfile::tempdir().expect("tempdir");
    for cluster in ["cluster-1", "cluster-2"] {
        let from = example.join("2-default-deny").join(cluster);
        let to = one.path().join(cluster);
        std::fs::create_dir(&to).expect("mkdir");
        for file in std::fs::read_dir(&from).expect("ls").flatten() {
            std::fs::copy(file.path(), to.join(file.file_name())).expect("copy");
        }
    }
    std::fs::copy(example.join("probes.yaml"), one.path().join("probes.yaml")).expect("copy");
    let stdout = demo_leaving_nothing(&["--clusters".as_ref(), one.path().as_os_str()]);
    assert!(stdout.contains("== step 1/1"), "{stdout}");
    assert!(
        stdout.contains("5 probes made: 5 as expected, 0 not; 0 not probed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("203.0.113.7 -> 10.2.1.10 80/TCP: expected deny, observed deny"),
        "{stdout}"
    );
}

#[test]
fn identity_rules_are_enforced_as_the_engine_expects() {
    if !netns::prerequisites() {
        return;
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/two-cluster/1-no-policy");
    let dir = tempfile::tempdir().expect("tempdir");
    for cluster in ["cluster-1", "cluster-2"] {
        std::fs::create_dir(dir.path().join(cluster)).expect("mkdir");
        std::fs::copy(
            example.join(cluster).join("demo.yaml"),
            dir.path().join(cluster).join("demo.yaml"),
        )
        .expect("copy");
    }
    std::fs::write(
        dir.path().join("cluster-2/identity.yaml"),
        r#"apiVersion: weft.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: web-from-c1, namespace: demo-c2}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
    - from: [{spiffeId: "spiffe://cluster-1/ns/demo-c1/sa/default"}]
      ports: [{port: 80}]
"#,
    )
    .expect("write");
    std::fs::write(
        dir.path().join("probes.yaml"),
        "- {from: cluster-1/demo-c1/tmp-client, to: cluster-2/demo-c2/web-c2, port: 80}\n\
         - {from: cluster-2/demo-c1/impostor, to: cluster-2/demo-c2/web-c2, port: 80}\n\
         - {from: 203.0.113.7, to: 10.2.1.10, port: 80}\n\
         - {from: cluster-1/demo-c1/tmp-client, to: cluster-2/demo-c2/web-c2, port: 8080}\n\
         - {from: cluster-1/demo-c1/tmp-client, to: cluster-2/demo-c2/web-c2, port: 53, protocol: UDP}\n",
    )
    .expect("write");
    let stdout = demo_leaving_nothing(&["--clusters".as_ref(), dir.path().as_os_str()]);
    assert!(
        stdout.contains("4 probes made: 4 as expected, 0 not; 1 not probed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("inbound: deny by identity (identity)"),
        "the identity layer decided: {stdout}"
    );
    assert!(
        stdout.contains("53/UDP: UDP: only TCP is probed; not probed"),
        "{stdout}"
    );
}

#[test]
fn ctrl_c_tears_everything_down() {
    if !netns::prerequisites() {
        return;
    }
    let mut child = weft()
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weft demo starts");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // Interrupted once the lab is built, while the tracker, CAs and nodes start: the demo
    // is over in about two seconds, so a later moment could miss it.
    let started = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|line| line.starts_with("lab weft-"));
    assert!(started, "the demo built its lab");
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let out = child.wait_with_output().expect("weft demo ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted demo fails");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_nothing_left(pid);
}

#[test]
fn two_clusters_of_two_nodes_decide_across_nodes_at_the_source_and_by_identity() {
    if !netns::prerequisites() {
        return;
    }
    // tests/scenarios/two-by-two: same-cluster cross-node, egress denied at the source's node,
    // identity rules allowing, denying and only audited, plaintext from an unmeshed source.
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios/two-by-two");
    let stdout = demo_leaving_nothing(&["--clusters".as_ref(), scenario.as_os_str()]);
    assert!(
        stdout.contains("10 probes made: 10 as expected, 0 not; 0 not probed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("c1-node-2 outbound: deny by networkpolicy (egress): cluster-1/shop/batch -> 10.2.1.10:5432: egress denied"),
        "egress is denied at the source's node: {stdout}"
    );
    assert!(
        stdout.contains("c2-node-1 inbound: deny by identity (identity)"),
        "the identity layer decided at the destination: {stdout}"
    );
    assert!(
        stdout.contains("c2-node-1 plaintext: deny by identity (no_identity)"),
        "a source without identity matches no identity rule: {stdout}"
    );
}
