//! Bad input never panics and never loads half a cluster: random and mutated manifests, and
//! random probe files, either load or fail with an error naming the file.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use weft::model::load_clusterset;
use weft::policy::Engine;

/// Field names of NetworkPolicies and their parts, misspellings and strangers included.
const KEYS: &[&str] = &[
    "podSelector",
    "namespaceSelector",
    "ipBlock",
    "cidr",
    "except",
    "exept",
    "ports",
    "port",
    "endPort",
    "protocol",
    "from",
    "to",
    "ingress",
    "egress",
    "policyTypes",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "ipblock",
    "name",
    "namespace",
    "labels",
];

/// Scalars that are sometimes valid somewhere and often not.
const STRINGS: &[&str] = &[
    "",
    "10.0.0.0/8",
    "10.0.0/8",
    "10.1.2.3/8",
    "::/0",
    "fd00::/8",
    "0.0.0.0/0",
    "TCP",
    "UDP",
    "SCTP",
    "tcp",
    "ICMP",
    "In",
    "NotIn",
    "Exists",
    "DoesNotExist",
    "Equals",
    "http",
    "Ingress",
    "Egress",
    "app",
    "web",
    "a b",
    "-x",
    "kubernetes.io/metadata.name",
    "cluster.clusterset.k8s.io",
    "\u{0}",
    "ünïcode",
    "999999999999999999999",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(80),
            Just(65535),
            Just(65536),
            any::<i64>()
        ]
        .prop_map(|n| json!(n)),
        prop::sample::select(STRINGS).prop_map(|s| json!(s)),
    ]
}

fn tree() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>(),
                )
            }),
        ]
    })
}

/// A NetworkPolicy whose spec is a random tree: mostly malformed, sometimes valid.
fn policy_document() -> impl Strategy<Value = Value> {
    (tree(), prop::option::of(tree())).prop_map(|(spec, metadata)| {
        let mut metadata = metadata.unwrap_or_else(|| json!({}));
        if let Value::Object(m) = &mut metadata {
            m.insert("name".into(), json!("p"));
        }
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": metadata, "spec": spec})
    })
}

fn write_cluster(file_text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let c1 = dir.path().join("c1");
    std::fs::create_dir_all(&c1).expect("mkdir");
    std::fs::write(
        c1.join("pods.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nstatus: {phase: Running, podIP: 10.0.0.1}\n",
    )
    .expect("write");
    std::fs::write(c1.join("bad.yaml"), file_text).expect("write");
    dir
}

/// Loads `dir`: an error names the file; a success yields an engine that decides.
fn load_and_decide(dir: &Path) -> Result<(), TestCaseError> {
    match load_clusterset(dir) {
        Err(e) => prop_assert!(
            e.to_string().contains("bad.yaml"),
            "error names the file: {e}"
        ),
        Ok(loaded) => {
            let engine = Engine::from_clusterset(&loaded.clusterset);
            let pod = engine.pod_by_name("c1", "default", "a");
            prop_assert!(pod.is_some(), "the rest of the cluster is loaded");
            let a = engine.address_endpoint("10.0.0.1".parse().expect("ip"));
            let out = engine.address_endpoint("203.0.113.1".parse().expect("ip"));
            for (src, dst) in [(a, out), (out, a)] {
                let c = weft::policy::Connection {
                    src,
                    dst,
                    port: 80,
                    protocol: weft::model::Protocol::Tcp,
                };
                let _ = engine.explain(&c, &engine.decide(&c));
            }
        }
    }
    Ok(())
}

/// The generator reaches both outcomes: policies that load and policies that are refused.
#[test]
fn generated_policies_both_load_and_fail() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..200 {
        let doc = policy_document()
            .new_tree(&mut runner)
            .expect("a value")
            .current();
        let dir = write_cluster(&serde_saphyr::to_string(&doc).expect("serialisable"));
        match load_clusterset(dir.path()) {
            Ok(_) => loaded += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(
        loaded >= 5 && refused >= 50,
        "loaded {loaded}, refused {refused}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn random_policies_load_or_fail_naming_the_file(doc in policy_document()) {
        let yaml = serde_saphyr::to_string(&doc).expect("serialisable");
        let dir = write_cluster(&yaml);
        load_and_decide(dir.path())?;
    }

    #[test]
    fn random_text_as_a_manifest_never_panics(text in "[ -~\n\t:{}\\[\\]\\-#&*!|>'\"%@`]{0,200}") {
        let dir = write_cluster(&text);
        load_and_decide(dir.path())?;
    }

    #[test]
    fn random_probe_files_never_panic(text in "[ -~\n\t:{}\\[\\]\\-#]{0,200}", doc in tree()) {
        let engine = Engine::new();
        let file = Path::new("probes.yaml");
        for t in [text, serde_saphyr::to_string(&doc).expect("serialisable")] {
            if let Err(e) = weft::probe::parse(file, &t, &engine) {
                prop_assert!(e.to_string().starts_with("probes.yaml"), "{e}");
            }
        }
    }
}
