//! `weft policy check` end to end: the real binary on the example and on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/two-cluster");

fn weft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run weft")
}

fn check(clusters: &Path, probes: &Path, output: &str) -> Output {
    weft(&[
        "policy",
        "check",
        "--clusters",
        clusters.to_str().expect("utf-8 path"),
        "--probes",
        probes.to_str().expect("utf-8 path"),
        "--output",
        output,
    ])
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect()
}

fn verdicts(step: &str) -> Vec<String> {
    let out = check(
        &Path::new(EXAMPLE).join(step),
        &Path::new(EXAMPLE).join("probes.yaml"),
        "json",
    );
    json_lines(&out)
        .iter()
        .map(|o| o["verdict"].as_str().expect("verdict").to_owned())
        .collect()
}

#[test]
fn the_two_cluster_demo_in_three_steps() {
    assert_eq!(verdicts("1-no-policy"), ["allow"; 5]);
    assert_eq!(
        verdicts("2-default-deny"),
        ["deny", "deny", "deny", "deny", "allow"]
    );
    assert_eq!(
        verdicts("3-allow-from-cluster-1"),
        ["allow", "allow", "deny", "deny", "allow"]
    );
}

#[test]
fn json_echoes_the_probe_and_gives_reasons() {
    let out = check(
        &Path::new(EXAMPLE).join("3-allow-from-cluster-1"),
        &Path::new(EXAMPLE).join("probes.yaml"),
        "json",
    );
    let lines = json_lines(&out);
    assert_eq!(
        lines[0],
        serde_json::json!({
            "from": "cluster-1/demo-c1/tmp-client",
            "to": "cluster-2/demo-c2/web-c2",
            "port": 80,
            "protocol": "TCP",
            "verdict": "allow",
            "egress": {"verdict": "allow", "why": "not-selected", "policies": [], "rules": [], "notes": []},
            "ingress": {
                "verdict": "allow",
                "why": "allowed",
                "policies": ["cluster-2/demo-c2/default-deny-ingress"],
                "rules": ["cluster-2/demo-c2/default-deny-ingress rule 0"],
                "notes": ["cluster-2/demo-c2/default-deny-ingress rule 0 admits cluster-1/demo-c1/tmp-client of another cluster: peer 0's namespaceSelector names its cluster"]
            }
        })
    );
    assert_eq!(lines[2]["ingress"]["why"], "denied");
    assert_eq!(lines[3]["egress"]["why"], "not-a-pod");
    // Protocol echoed exactly as written in the probe file.
    assert_eq!(lines[4]["protocol"], "tcp");
}

#[test]
fn text_output_is_an_aligned_table() {
    let out = check(
        &Path::new(EXAMPLE).join("2-default-deny"),
        &Path::new(EXAMPLE).join("probes.yaml"),
        "text",
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    assert!(lines[0].starts_with("FROM"));
    let col = lines[0].find("VERDICT").expect("verdict column");
    for l in &lines[1..] {
        let v = &l[col..];
        assert!(v.starts_with("allow") || v.starts_with("deny"), "{l}");
    }
    assert!(text.contains("denied: cluster-2/demo-c2/default-deny-ingress selects the pod"));
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A clusterset with a dual-stack pod `c1/a/dual`, an IPv4-only pod `c1/a/v4` and a
    /// policy admitting only `app=client` to `dual`.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let c1 = dir.path().join("clusters/c1");
        std::fs::create_dir_all(&c1).expect("mkdir");
        std::fs::write(
            c1.join("pods.yaml"),
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: a}
---
apiVersion: v1
kind: Pod
metadata: {name: dual, namespace: a, labels: {app: server}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v4, namespace: a, labels: {app: client}}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-clients, namespace: a}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}]
"#,
        )
        .expect("write");
        Self { dir }
    }

    fn clusters(&self) -> PathBuf {
        self.dir.path().join("clusters")
    }

    fn probes(&self, yaml: &str) -> PathBuf {
        let p = self.dir.path().join("probes.yaml");
        std::fs::write(&p, yaml).expect("write probes");
        p
    }
}

#[test]
fn named_ports_families_and_addresses() {
    let f = Fixture::new();
    let probes = f.probes(
        r#"
- {from: c1/a/v4, to: c1/a/dual, port: 8080}
- {from: c1/a/v4, to: c1/a/dual, port: 80}
- {from: 10.0.0.2, to: 10.0.0.1, port: 8080}
- {from: "fd00::9", to: c1/a/dual, port: 8080}
- {from: "::ffff:10.0.0.2", to: c1/a/dual, port: 8080, protocol: udp}
- {from: c1/a/dual, to: c1/a/dual, port: 1}
"#,
    );
    let lines = json_lines(&check(&f.clusters(), &probes, "json"));
    let v: Vec<&str> = lines
        .iter()
        .map(|l| l["verdict"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(v, ["allow", "deny", "allow", "deny", "deny", "allow"]);
    assert_eq!(lines[3]["egress"]["why"], "not-a-pod");
    assert_eq!(lines[5]["ingress"]["why"], "self");
}

#[test]
fn bad_probes_are_one_line_naming_the_probe() {
    let f = Fixture::new();
    let cases = [
        (
            "- {from: c1/a/nope, to: c1/a/dual, port: 80}",
            "probe 1: from: unknown pod \"c1/a/nope\"",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 80}\n- {from: c1/a/v4, to: c1/a/dual, port: 0}",
            "probe 2: port 0 is not a number between 1 and 65535",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 70000}",
            "probe 1: port 70000",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: \"80\"}",
            "probe 1: port \"80\"",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 80, protocol: ICMP}",
            "probe 1: protocol \"ICMP\"",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 80, family: IPv5}",
            "probe 1: family",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 80, family: IPv6}",
            "probe 1: from: pod c1/a/v4 has no IPv6 address",
        ),
        (
            "- {from: 10.0.0.9, to: c1/a/dual, port: 80, family: IPv6}",
            "probe 1: from: 10.0.0.9 is not an IPv6 address",
        ),
        (
            "- {from: c1/a, to: c1/a/dual, port: 80}",
            "neither an IP address nor cluster/namespace/pod",
        ),
        (
            "- {from: c1/a/v4, to: c1/a/dual, port: 80, colour: red}",
            "probe 1: unknown field `colour`",
        ),
        ("- {from: c1/a/v4, port: 80}", "probe 1: missing field `to`"),
        ("from: c1/a/v4", "expected a list of probes"),
        ("- [unclosed", "probes.yaml"),
    ];
    for (yaml, want) in cases {
        let out = check(&f.clusters(), &f.probes(yaml), "json");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}: should fail");
        assert!(
            out.stdout.is_empty(),
            "{yaml}: nothing printed before validation"
        );
        assert!(
            stderr.contains(want),
            "{yaml}: stderr {stderr:?} lacks {want:?}"
        );
        assert!(
            stderr.contains("probes.yaml"),
            "{yaml}: names the file: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{yaml}: one line: {stderr}"
        );
    }
}

#[test]
fn a_missing_probe_file_and_a_bad_manifest_are_errors() {
    let f = Fixture::new();
    let out = check(&f.clusters(), &f.dir.path().join("nope.yaml"), "text");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.yaml"));

    let probes = f.probes("- {from: c1/a/v4, to: c1/a/dual, port: 80}");
    std::fs::write(
        f.clusters().join("c1/bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bad, namespace: a}\nspec:\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0/8}}]\n",
    )
    .expect("write");
    let out = check(&f.clusters(), &probes, "text");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("c1/bad.yaml, document 1: NetworkPolicy a/bad: spec.ingress[0].from[0].ipBlock.cidr: invalid CIDR \"10.0.0/8\""),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.matches("invalid CIDR").count(),
        1,
        "said once: {stderr}"
    );
}

#[test]
fn a_bad_flag_is_refused() {
    let out = weft(&[
        "policy",
        "check",
        "--clusters",
        EXAMPLE,
        "--probes",
        "x",
        "--output",
        "xml",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("xml"));
}

#[test]
fn weft_node_refuses_bad_flags_naming_the_culprit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_text = dir.path().to_string_lossy().into_owned();
    let base_args = [
        "node",
        "--cluster",
        "cluster-1",
        "--node",
        "n1",
        "--tracker",
        "http://127.0.0.1:1",
        "--insecure",
        "--ca",
        "https://127.0.0.1:2",
        "--ca-root",
        "/nonexistent/root.pem",
        "--token-file",
        "/nonexistent/token",
        "--bundles",
        &dir_text,
    ];
    let base = |extra: &[&str]| -> Output {
        let mut args = base_args.to_vec();
        args.extend_from_slice(extra);
        weft(&args)
    };
    let refused = |out: &Output, culprit: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {stderr}");
        assert!(stderr.contains(culprit), "{culprit} not named: {stderr}");
    };
    refused(&base(&["--mark", "0"]), "mark 0");
    refused(&base(&["--mark", "0xzz"]), "0xzz");
    // Capture's own mark bits: weft's packets would be delivered back to the node.
    refused(&base(&["--mark", "0x1111"]), "0x111/0xfff");
    refused(&base(&["--worker-threads", "0"]), "worker-threads");
    refused(&base(&["--table-check-interval", "soon"]), "soon");
    refused(&base(&["--hbone", "15008"]), "15008");
    refused(&base(&["--inbound", "0.0.0.0:15001"]), "capture");
    refused(&base(&["--pod-interfaces", "cali*,veth/0"]), "\"veth/0\"");
    refused(&base(&["--pod-interfaces", "*"]), "names no interface");
    refused(
        &base(&["--pod-interfaces", "a-name-longer-than-15*"]),
        "too long",
    );
    refused(
        &base(&["--tracker-server-name", "localhost"]),
        "a server name was given for a plaintext URL",
    );
    // A Service's variable the kubelet left unexpanded (the Service came after the pod).
    let unexpanded = "http://$(WEFT_TRACKER_SERVICE_HOST):19090";
    let args: Vec<&str> = base_args
        .iter()
        .map(|a| {
            if *a == "http://127.0.0.1:1" {
                unexpanded
            } else {
                a
            }
        })
        .collect();
    refused(&weft(&args), &format!("tracker {unexpanded}: "));
    // An empty bundle directory holds no trust domain: named, with why.
    refused(&base(&[]), &format!("--bundles {dir_text}: "));
    refused(&weft(&["node", "--node", "n1"]), "--cluster");
    refused(
        &weft(&["node", "--cleanup", "--nft", "/nonexistent/nft"]),
        "/nonexistent/nft",
    );
}

#[test]
fn in_cluster_outside_a_pod_is_refused_naming_what_is_missing() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["tracker", "--in-cluster", "--insecure"])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run weft");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--in-cluster: KUBERNETES_SERVICE_HOST is not set"),
        "{stderr}"
    );
}

#[test]
fn an_address_in_use_is_named_with_its_cause() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("c1")).expect("mkdir");
    let clusters = dir.path().to_string_lossy().into_owned();
    let out = weft(&[
        "tracker",
        "--clusters",
        &clusters,
        "--insecure",
        "--admin",
        &addr,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("--admin {addr}: ")) && stderr.to_lowercase().contains("in use"),
        "the flag and why: {stderr}"
    );
}

#[test]
fn weft_explain_refuses_bad_flags_and_names_an_unreachable_agent() {
    let refused = |args: &[&str], culprit: &str| {
        let out = weft(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted {args:?}: {stderr}");
        assert!(stderr.contains(culprit), "{culprit} not named: {stderr}");
    };
    fn explain<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["explain"];
        args.extend_from_slice(extra);
        args
    }
    refused(&explain(&["--to", "10.0.0.2:80"]), "--from");
    refused(
        &explain(&["--from", "pod-a", "--to", "10.0.0.2:80"]),
        "pod-a",
    );
    refused(
        &explain(&["--from", "10.0.0.1", "--to", "10.0.0.2"]),
        "10.0.0.2",
    );
    // A good question, with `extra`.
    fn asked<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        explain(&[&["--from", "10.0.0.1", "--to", "10.0.0.2:80"], extra].concat())
    }
    refused(&asked(&["--identity", "spiffe://td/x"]), "--identity");
    // Nothing listens there: the error says whom it asked, and by which flag.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let free = listener.local_addr().expect("its address").to_string();
    drop(listener);
    refused(
        &asked(&["--admin", &free]),
        &format!("asking the node agent at {free} (--admin)"),
    );
}
