//! IdentityPolicies, the third layer: loaded from a clusterset directory, evaluated by the
//! engine for a destination pod and the identity its peer proved — Enforce admits only what a
//! rule allows, a peer without identity matches nothing, Audit is reported and never enforced,
//! and a cluster's trust domain comes from its settings.

mod tracking;

use std::path::Path;
use std::time::Duration;

use weft::identity::WorkloadId;
use weft::model::{ClusterId, Protocol, load_clusterset};
use weft::policy::Engine;
use weft::policy::identity::IdentityVerdict;

fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn pod(name: &str, app: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {app}}}}}\nspec: {{serviceAccountName: {sa}, containers: []}}\nstatus: {{phase: Running, podIP: {ip}}}\n---\n"
    )
}

fn clusterset(dir: &Path) {
    write(
        dir,
        "cluster-1/pods.yaml",
        &format!(
            "{}{}",
            pod("web", "web", "web", "10.1.0.1"),
            pod("client", "client", "client", "10.1.0.2")
        ),
    );
    write(
        dir,
        "cluster-1/identity.yaml",
        r#"apiVersion: weft.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: web-from-client, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
    - from: [{spiffeId: "spiffe://cluster-1/ns/demo/sa/client"}]
      ports: [{port: 80}]
---
apiVersion: weft.dev/v1alpha1
kind: IdentityPolicy
metadata: {name: web-audit, namespace: demo}
spec:
  podSelector: {matchLabels: {app: web}}
  mode: Audit
  rules:
    - from: [{cluster: cluster-2}]
"#,
    );
    write(dir, "cluster-2/cluster.yaml", "trustDomain: c2.example\n");
    write(
        dir,
        "cluster-2/pods.yaml",
        &pod("client", "client", "client", "10.2.0.2"),
    );
}

#[test]
fn enforce_admits_only_what_a_rule_allows_and_audit_is_only_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    clusterset(dir.path());
    let loaded = load_clusterset(dir.path()).expect("loads");
    let mut engine = Engine::from_clusterset(&loaded.clusterset);
    let pod = |c: &str, n: &str| engine.pod_by_name(c, "demo", n).expect("pod");
    let (web, client, remote) = (
        pod("cluster-1", "web"),
        pod("cluster-1", "client"),
        pod("cluster-2", "client"),
    );
    let client_id = engine.pod_identity(client).expect("identity");
    let remote_id = engine.pod_identity(remote).expect("identity");
    assert_eq!(
        client_id.to_string(),
        "spiffe://cluster-1/ns/demo/sa/client"
    );
    assert_eq!(
        remote_id.to_string(),
        "spiffe://c2.example/ns/demo/sa/client",
        "the trust domain of cluster-2's settings"
    );

    let d = engine.decide_identity(web, 80, Protocol::Tcp, Some(&client_id));
    assert_eq!(
        d.enforced,
        IdentityVerdict::Allowed {
            policy: "cluster-1/demo/web-from-client".into(),
            rule: 0
        }
    );
    assert!(!d.audited.passes(), "audit would deny cluster-1's client");
    let denied = IdentityVerdict::Denied {
        policies: vec!["cluster-1/demo/web-from-client".into()],
    };
    assert_eq!(
        engine
            .decide_identity(web, 81, Protocol::Tcp, Some(&client_id))
            .enforced,
        denied,
        "another port"
    );
    assert_eq!(
        engine
            .decide_identity(web, 80, Protocol::Udp, Some(&client_id))
            .enforced,
        denied,
        "another protocol"
    );
    let d = engine.decide_identity(web, 80, Protocol::Tcp, Some(&remote_id));
    assert_eq!(
        d.enforced, denied,
        "the same namespace and account in another trust domain"
    );
    assert!(
        d.audited.passes(),
        "audit admits cluster-2 by its trust domain"
    );
    assert_eq!(
        engine
            .decide_identity(web, 80, Protocol::Tcp, None)
            .enforced,
        denied,
        "a peer with no identity matches nothing"
    );
    let forged = WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/client.x").expect("id");
    assert_eq!(
        engine
            .decide_identity(web, 80, Protocol::Tcp, Some(&forged))
            .enforced,
        denied
    );
    assert_eq!(
        engine
            .decide_identity(client, 80, Protocol::Tcp, None)
            .enforced,
        IdentityVerdict::NotSelected,
        "no policy selects the client"
    );

    // Removed, the layer passes again; the audit policy stays.
    engine.remove_identity_policy(
        &ClusterId::new("cluster-1").expect("id"),
        "demo",
        "web-from-client",
    );
    let d = engine.decide_identity(web, 80, Protocol::Tcp, None);
    assert_eq!(d.enforced, IdentityVerdict::NotSelected);
    assert!(!d.audited.passes());
}

#[test]
fn a_bad_identity_policy_is_an_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    clusterset(dir.path());
    write(
        dir.path(),
        "cluster-1/bad.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: IdentityPolicy\nmetadata: {name: bad, namespace: demo}\nspec:\n  rules:\n    - from: [{serviceAccount: \"a*\"}]\n",
    );
    let e = load_clusterset(dir.path()).expect_err("a pattern is no service account");
    let text = e.to_string();
    assert!(
        text.contains("bad.yaml")
            && text.contains("IdentityPolicy demo/bad")
            && text.contains("spec.rules[0].from[0].serviceAccount"),
        "{text}"
    );
}

#[test]
fn policy_check_decides_the_identity_layer_with_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    clusterset(dir.path());
    let probes = dir.path().join("probes.yaml");
    std::fs::write(
        &probes,
        "- {from: cluster-1/demo/client, to: cluster-1/demo/web, port: 80}\n\
         - {from: cluster-2/demo/client, to: cluster-1/demo/web, port: 80}\n\
         - {from: 10.9.9.9, to: cluster-1/demo/web, port: 80}\n\
         - {from: 10.9.9.9, to: cluster-1/demo/web, port: 80, identity: \"spiffe://cluster-1/ns/demo/sa/client\"}\n\
         - {from: cluster-1/demo/client, to: cluster-1/demo/web, port: 80, identity: none}\n\
         - {from: cluster-1/demo/web, to: cluster-1/demo/client, port: 80}\n\
         - {from: 10.1.0.2, to: 10.1.0.1, port: 80}\n\
         - {from: 10.9.9.9, to: 10.1.0.1, port: 80}\n",
    )
    .expect("write");
    let run = |output: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weft"))
            .args(["policy", "check", "--clusters"])
            .arg(dir.path())
            .arg("--probes")
            .arg(&probes)
            .args(["--output", output])
            .output()
            .expect("run weft")
    };
    let out = run("json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let verdicts: Vec<&str> = lines
        .iter()
        .map(|l| l["verdict"].as_str().expect("verdict"))
        .collect();
    assert_eq!(
        verdicts,
        [
            "allow", "deny", "deny", "allow", "deny", "allow", "allow", "deny"
        ]
    );
    // Pods named by their addresses are those pods, for the identity layer too.
    assert_eq!(
        lines[6]["identity"]["peer"],
        "spiffe://cluster-1/ns/demo/sa/client"
    );
    assert!(lines[7]["identity"]["peer"].is_null());
    assert_eq!(
        lines[1]["identity"]["peer"],
        "spiffe://c2.example/ns/demo/sa/client"
    );
    assert_eq!(lines[1]["identity"]["audited"]["verdict"], "allowed");
    assert!(
        lines[2]["identity"]["peer"].is_null(),
        "an address proves nothing"
    );
    assert!(
        lines[5].get("identity").is_none(),
        "nothing selects the client"
    );

    let out = run("text");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .next()
            .is_some_and(|h| h.ends_with("IDENTITY (destination)")),
        "{text}"
    );
    assert!(
        text.contains(
            "spiffe://cluster-1/ns/demo/sa/client allowed by cluster-1/demo/web-from-client rule 0"
        ),
        "{text}"
    );
    assert!(
        text.contains("denied: cluster-1/demo/web-from-client selects the pod and none admits a peer with no identity"),
        "{text}"
    );

    std::fs::write(&probes, "- {from: 10.9.9.9, to: cluster-1/demo/web, port: 80, identity: \"spiffe://X/ns/a/sa/b\"}\n").expect("write");
    let out = run("text");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("probe 1: identity:"), "{stderr}");
}

#[tokio::test]
async fn the_tracker_carries_identity_policies_to_the_clusters_that_enforce_them() {
    use weft::tracker::client;
    use weft::tracker::server::Tracker;
    use weft::tracker::source::ClustersetSource;
    use weft::tracker::view::View;
    use weft::tracker::wire::pb;

    let dir = tempfile::tempdir().expect("tempdir");
    clusterset(dir.path());
    let mut source = ClustersetSource::new(dir.path());
    let tracker = Tracker::new(View::new("e", 100), 1 << 20);
    tracker.apply(source.rescan().expect("loads"));
    let target = tracking::serve(&tracker).await;
    let request = |cluster: &str, scope: pb::PolicyScope| pb::SubscribeRequest {
        cluster: cluster.into(),
        policy_scope: scope.into(),
        ..Default::default()
    };
    let wait = Duration::from_secs(10);
    let own = client::sync(
        &target,
        request("cluster-1", pb::PolicyScope::OwnCluster),
        wait,
    )
    .await
    .expect("cluster-1's view");
    let other = client::sync(
        &target,
        request("cluster-2", pb::PolicyScope::OwnCluster),
        wait,
    )
    .await
    .expect("cluster-2's view");
    for (replica, selected) in [(own.engine(), true), (other.engine(), false)] {
        let web = replica
            .pod_by_name("cluster-1", "demo", "web")
            .expect("web");
        let remote = replica
            .pod_by_name("cluster-2", "demo", "client")
            .expect("remote client");
        let remote_id = replica.pod_identity(remote).expect("identity");
        assert_eq!(
            remote_id.to_string(),
            "spiffe://c2.example/ns/demo/sa/client",
            "the trust domain relayed by the tracker"
        );
        let d = replica.decide_identity(web, 80, Protocol::Tcp, Some(&remote_id));
        if selected {
            assert!(!d.enforced.passes(), "{d:?}");
            assert!(d.audited.passes(), "{d:?}");
        } else {
            assert_eq!(
                d.enforced,
                IdentityVerdict::NotSelected,
                "cluster-2's nodes do not get cluster-1's policies"
            );
        }
    }
}

#[test]
fn the_schema_in_deploy_names_the_fields_weft_reads() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/identitypolicy-crd.yaml"
    ))
    .expect("the CRD");
    let crd = weft::model::loader::parse_yaml(&text, 0).expect("YAML");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v["properties"]
            .as_object()
            .expect("properties")
            .keys()
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(spec), ["mode", "podSelector", "rules"]);
    let rule = &spec["properties"]["rules"]["items"];
    assert_eq!(keys(rule), ["from", "ports"]);
    assert_eq!(
        keys(&rule["properties"]["from"]["items"]),
        [
            "cluster",
            "namespace",
            "serviceAccount",
            "spiffeId",
            "trustDomain"
        ]
    );
    assert_eq!(
        keys(&rule["properties"]["ports"]["items"]),
        ["endPort", "port", "protocol"]
    );
    assert_eq!(crd["spec"]["group"], "weft.dev");
    assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
}
