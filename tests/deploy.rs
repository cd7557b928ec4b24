//! The manifests of `deploy/`: every field one Kubernetes knows, every container's arguments
//! ones weft accepts, the parts wired to one another (Services to ports, files to volumes,
//! the agents' token to the CA's audience), and the RBAC they grant: the tracker syncs a
//! cluster and the CA reviews an agent's token with exactly those permissions, reaching the
//! test API server as a pod does (its address, a ServiceAccount token, the cluster's CA) while
//! it enforces them, and no granted permission goes unused. The hub and spoke overlays are
//! rendered as kustomize renders them and checked the same way.

mod apiserver;
mod tracking;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use apiserver::{ApiServer, Attributes, Grant, Kind, TokenUser};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use weft::ca::{Authenticator as _, TokenReviewer};
use weft::tracker::replica::Replica;
use weft::tracker::source::kubernetes::{IN_CLUSTER_CONTEXT, in_cluster_kubeconfig};

/// The directory of the manifests.
fn deploy_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Kustomize's own file, which is no manifest.
const KUSTOMIZATION: &str = "kustomization.yaml";

/// The manifests' files: every `deploy/*.yaml` but [`KUSTOMIZATION`].
fn manifest_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != KUSTOMIZATION))
        .collect();
    files.sort();
    files
}

#[test]
fn the_kustomization_applies_every_manifest() {
    let text = std::fs::read_to_string(deploy_dir().join(KUSTOMIZATION)).expect("read");
    let k = weft::model::loader::parse_yaml(&text, 0).expect("YAML");
    assert_eq!(k["kind"], "Kustomization");
    let mut listed: Vec<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file").to_owned())
        .collect();
    listed.sort();
    let files: Vec<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files);
    // Every subdirectory is an overlay the tests render.
    let mut dirs: Vec<String> = std::fs::read_dir(deploy_dir())
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(dirs, OVERLAYS);
}

/// Every document of every manifest, with its file's name.
fn documents() -> Vec<(String, Value)> {
    let docs: Vec<_> = manifest_files()
        .iter()
        .flat_map(|f| read_documents(f))
        .collect();
    assert!(docs.len() > 10, "deploy/ holds the manifests");
    docs
}

/// The documents of one manifest file, each with the file's name.
fn read_documents(file: &Path) -> Vec<(String, Value)> {
    let name = file
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut docs = Vec::new();
    let mut first_line = 0;
    for part in text.split("\n---\n") {
        let doc = weft::model::loader::parse_yaml(part, first_line)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        first_line += part.lines().count() + 1;
        if !doc.is_null() {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

/// The overlays of deploy/: hub and spoke.
const OVERLAYS: [&str; 2] = ["hub", "spoke"];

/// The documents of the overlay in `deploy/DIR/` as kustomize renders them: deploy/'s own
/// (`..`) and the overlay's files, with its JSON patches applied to their targets.
fn overlay(dir: &str) -> Vec<(String, Value)> {
    let at = deploy_dir().join(dir);
    let text =
        std::fs::read_to_string(at.join(KUSTOMIZATION)).expect("the overlay's kustomization");
    let k = weft::model::loader::parse_yaml(&text, 0).expect("YAML");
    assert_eq!(k["kind"], "Kustomization", "{dir}");
    let mut docs = Vec::new();
    for resource in k["resources"].as_array().expect("resources") {
        match resource.as_str().expect("a path") {
            ".." => docs.extend(documents()),
            file => docs.extend(read_documents(&at.join(file))),
        }
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        let (kind, name) = (&p["target"]["kind"], &p["target"]["name"]);
        let ops = weft::model::loader::parse_yaml(p["patch"].as_str().expect("a patch"), 0)
            .expect("the patch is YAML");
        let ops: json_patch::Patch = serde_json::from_value(ops).expect("a JSON patch");
        let targets: Vec<&mut Value> = docs
            .iter_mut()
            .map(|(_, d)| d)
            .filter(|d| d["kind"] == *kind && d["metadata"]["name"] == *name)
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{dir}: the patch of {kind} {name} has one target"
        );
        for target in targets {
            json_patch::patch(target, &ops).unwrap_or_else(|e| panic!("{dir}: {kind} {name}: {e}"));
        }
    }
    docs
}

/// The one document of `kind` named `name`.
fn find(docs: &[(String, Value)], kind: &str, name: &str) -> Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name}");
    found[0].clone()
}

fn typed<T: DeserializeOwned>(doc: Value) -> T {
    serde_json::from_value(doc).expect("typed")
}

/// The fields of `original` that `round_trip` lacks: those the type does not know.
fn lost(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(o), Value::Object(r)) => {
            for (k, v) in o {
                let at = format!("{path}.{k}");
                match r.get(k) {
                    Some(rv) => lost(v, rv, &at, out),
                    None => out.push(at),
                }
            }
        }
        (Value::Array(o), Value::Array(r)) => {
            for (i, v) in o.iter().enumerate() {
                match r.get(i) {
                    Some(rv) => lost(v, rv, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

/// The fields of `doc` that Kubernetes' type `T` does not know.
fn unknown_fields<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Vec<String>, String> {
    let t: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    lost(doc, &back, "", &mut out);
    Ok(out)
}

#[test]
fn every_manifest_is_made_of_kubernetes_objects_and_fields() {
    kubernetes_objects_and_fields(&documents());
}

/// Every document of `docs` is of a kind deploy/ deals in, with only fields Kubernetes knows,
/// in `weft-system` if namespaced.
fn kubernetes_objects_and_fields(docs: &[(String, Value)]) {
    for (file, doc) in docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let unknown = match kind {
            "Namespace" => unknown_fields::<Namespace>(doc),
            "ConfigMap" => unknown_fields::<ConfigMap>(doc),
            "ServiceAccount" => unknown_fields::<ServiceAccount>(doc),
            "Service" => unknown_fields::<Service>(doc),
            "ClusterRole" => unknown_fields::<ClusterRole>(doc),
            "ClusterRoleBinding" => unknown_fields::<ClusterRoleBinding>(doc),
            "Role" => unknown_fields::<Role>(doc),
            "RoleBinding" => unknown_fields::<RoleBinding>(doc),
            "Deployment" => unknown_fields::<Deployment>(doc),
            "DaemonSet" => unknown_fields::<DaemonSet>(doc),
            "CustomResourceDefinition" => unknown_fields::<CustomResourceDefinition>(doc),
            other => Err(format!("a kind deploy/ has no business with: {other:?}")),
        };
        let name = &doc["metadata"]["name"];
        assert_eq!(
            unknown,
            Ok(vec![]),
            "{file}: {kind} {name}: fields Kubernetes does not know"
        );
        let namespaced = !matches!(
            kind,
            "Namespace" | "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition"
        );
        if namespaced {
            assert_eq!(
                doc["metadata"]["namespace"], "weft-system",
                "{file}: {name}"
            );
        }
    }
}

#[test]
fn hub_and_spoke_render_to_trackers_wired_to_each_other() {
    for dir in OVERLAYS {
        let docs = overlay(dir);
        kubernetes_objects_and_fields(&docs);
        containers_run_weft_as_it_accepts(&docs);
    }
    // The hub: the spokes reach its tracker, as its own agents do, at the port it serves.
    let hub = overlay("hub");
    let lb: Service = typed(find(&hub, "Service", "weft-tracker-hub"));
    assert_eq!(
        lb.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("LoadBalancer")
    );
    let (_, _, hub_line) = container(&hub, "weft-tracker");
    let listen = port_of(flag(&hub_line, "--listen").expect("--listen"));
    assert_eq!(service_target(&hub, "weft-tracker-hub", 19090), listen);
    assert_eq!(
        flag(&hub_line, "--upstream"),
        None,
        "the hub follows no one"
    );

    // A spoke: its own cluster from its own API server, the rest from the hub, over TLS with
    // its tracker's certificate, at an address it can dial.
    let spoke = overlay("spoke");
    let (_, _, line) = container(&spoke, "weft-tracker");
    let upstream = flag(&line, "--upstream").expect("--upstream");
    assert!(upstream.starts_with("https://"), "{upstream}");
    assert_eq!(
        weft::endpoint::unreachable_host(upstream),
        None,
        "{upstream}"
    );
    assert_eq!(port_of(upstream), listen, "the hub's port");
    let own = flag(&line, "--cluster").expect("--cluster");
    let config: ConfigMap = typed(find(&spoke, "ConfigMap", "weft-config"));
    assert_eq!(
        config
            .data
            .as_ref()
            .and_then(|d| d.get("cluster"))
            .map(String::as_str),
        Some(own)
    );
    // The start check of `weft tracker`: a spoke's own cluster is one its sources name.
    let names: BTreeMap<String, weft::model::ClusterId> = line
        .iter()
        .filter_map(|a| a.strip_prefix("--cluster-name="))
        .filter_map(|m| m.split_once('='))
        .map(|(context, id)| {
            (
                context.to_owned(),
                weft::model::ClusterId::new(id).expect("id"),
            )
        })
        .collect();
    assert!(line.iter().any(|a| a == "--in-cluster"), "{line:?}");
    let dir = tempfile::tempdir().expect("a directory");
    let kubeconfig = in_cluster_kubeconfig("10.96.0.1", "443", dir.path());
    let ids = weft::tracker::source::kubernetes::cluster_ids(None, Some(&kubeconfig), &names);
    assert!(
        ids.iter().any(|id| id.as_str() == own),
        "--cluster {own} among {ids:?}"
    );
    assert!(
        flag(&line, "--tls-cert").is_some(),
        "the spoke's client certificate"
    );
    // Everything else is deploy/'s own.
    let base = documents();
    for (kind, name) in [("DaemonSet", "weft-node"), ("Deployment", "weft-ca")] {
        assert_eq!(
            find(&spoke, kind, name),
            find(&base, kind, name),
            "{kind} {name}"
        );
        assert_eq!(
            find(&hub, kind, name),
            find(&base, kind, name),
            "{kind} {name}"
        );
    }
}

/// The workloads' pod specs, by name.
fn workloads(docs: &[(String, Value)]) -> BTreeMap<String, (String, PodSpec)> {
    let mut out = BTreeMap::new();
    for (_, doc) in docs {
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (labels, spec) = match doc["kind"].as_str() {
            Some("Deployment") => {
                let d: Deployment = typed(doc.clone());
                let t = d.spec.template;
                (
                    t.metadata.expect("metadata").labels,
                    t.spec.expect("pod spec"),
                )
            }
            Some("DaemonSet") => {
                let d: DaemonSet = typed(doc.clone());
                let t = d.spec.template;
                (
                    t.metadata.expect("metadata").labels,
                    t.spec.expect("pod spec"),
                )
            }
            _ => continue,
        };
        let app = labels
            .and_then(|l| l.get("app.kubernetes.io/name").cloned())
            .expect("the app label");
        out.insert(name, (app, spec));
    }
    out
}

/// The address the kubelet gives pods for each Service of `docs`, by the Service's name: a
/// made-up ClusterIP, the same at every call.
fn service_addresses(docs: &[(String, Value)]) -> BTreeMap<String, String> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .enumerate()
        .map(|(i, (_, d))| {
            let name = d["metadata"]["name"].as_str().expect("a name").to_owned();
            (name, format!("10.96.0.{}", 100 + i))
        })
        .collect()
}

/// `container`'s command line as the kubelet runs it: `$(VAR)` replaced by the variable's value
/// (a literal, a key of a ConfigMap of `docs`, `node-1` for the node's name, or a Service's
/// address, `NAME_SERVICE_HOST`, as the kubelet gives every pod of the namespace).
fn command_line(docs: &[(String, Value)], container: &Container) -> Vec<String> {
    let mut vars: BTreeMap<String, String> = service_addresses(docs)
        .into_iter()
        .map(|(name, ip)| {
            let var = format!("{}_SERVICE_HOST", name.to_uppercase().replace('-', "_"));
            (var, ip)
        })
        .collect();
    for var in container.env.as_deref().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(key) = &from.config_map_key_ref {
                    let map: ConfigMap = typed(find(docs, "ConfigMap", &key.name));
                    map.data
                        .and_then(|d| d.get(&key.key).cloned())
                        .unwrap_or_else(|| panic!("ConfigMap {} has no {}", key.name, key.key))
                } else if from.field_ref.as_ref().map(|f| f.field_path.as_str())
                    == Some("spec.nodeName")
                {
                    "node-1".to_owned()
                } else {
                    panic!("an environment source the test does not know: {from:?}")
                }
            }
            (None, None) => String::new(),
        };
        vars.insert(var.name.clone(), value);
    }
    let expand = |arg: &String| {
        let mut arg = arg.clone();
        for (name, value) in &vars {
            arg = arg.replace(&format!("$({name})"), value);
        }
        assert!(!arg.contains("$("), "an undefined variable in {arg}");
        arg
    };
    let command = container.command.as_deref().unwrap_or_default();
    let args = container.args.as_deref().unwrap_or_default();
    command.iter().chain(args).map(expand).collect()
}

/// The value of `--flag=VALUE` in `line`.
fn flag<'a>(line: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    line.iter().find_map(|a| a.strip_prefix(&prefix))
}

/// The port of `ADDR` or `URL` (its last `:PORT`).
fn port_of(addr: &str) -> i32 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port")
}

/// The container port named `name`.
fn named_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{}: no port {name}", container.name))
        .container_port
}

/// The (path, port name) of an HTTP probe.
fn http_probe(probe: Option<&k8s_openapi::api::core::v1::Probe>) -> (String, String) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP probe");
    let IntOrString::String(port) = &get.port else {
        panic!("probes name their port");
    };
    (get.path.clone().expect("a path"), port.clone())
}

#[test]
fn every_container_runs_weft_with_arguments_it_accepts_and_files_it_mounts() {
    containers_run_weft_as_it_accepts(&documents());
}

/// Every container of `docs`'s three workloads runs weft with arguments it accepts and files
/// it mounts, locked down, with probes on ports it serves.
fn containers_run_weft_as_it_accepts(docs: &[(String, Value)]) {
    let workloads = workloads(docs);
    assert_eq!(
        workloads.keys().collect::<Vec<_>>(),
        ["weft-ca", "weft-node", "weft-tracker"]
    );
    for (name, (_, spec)) in &workloads {
        for container in &spec.containers {
            let line = command_line(docs, container);
            assert_eq!(line[0], "weft", "{name}");
            if let Err(e) = weft::cli::Cli::try_parse_from(&line) {
                panic!("{name}: weft refuses {line:?}:\n{e}");
            }
            let mounts = container.volume_mounts.as_deref().unwrap_or_default();
            let volumes: BTreeSet<&str> = spec
                .volumes
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|v| v.name.as_str())
                .collect();
            for mount in mounts {
                assert!(
                    volumes.contains(mount.name.as_str()),
                    "{name}: {}",
                    mount.name
                );
                assert_eq!(mount.read_only, Some(true), "{name}: {}", mount.name);
            }
            // Every file or directory weft is told of is in a volume of the pod.
            for path in line
                .iter()
                .filter_map(|a| a.split_once("=/").map(|(_, p)| p))
            {
                let path = format!("/{path}");
                assert!(
                    mounts.iter().any(|m| path.starts_with(&m.mount_path)),
                    "{name}: {path} is in no volume"
                );
            }
            let security = container
                .security_context
                .as_ref()
                .expect("a security context");
            assert_eq!(security.allow_privilege_escalation, Some(false), "{name}");
            assert_eq!(security.read_only_root_filesystem, Some(true), "{name}");
            let caps = security.capabilities.as_ref().expect("capabilities");
            assert_eq!(
                caps.drop.as_deref(),
                Some(&["ALL".to_owned()][..]),
                "{name}"
            );
            for (probe, path) in [
                (container.liveness_probe.as_ref(), "/healthz"),
                (container.readiness_probe.as_ref(), ""),
            ] {
                let (at, port) = http_probe(probe);
                assert!(at.starts_with(path), "{name}: {at}");
                named_port(container, &port);
            }
        }
    }
}

/// The one container of workload `name`, and its command line.
fn container(docs: &[(String, Value)], name: &str) -> (PodSpec, Container, Vec<String>) {
    let (_, spec) = workloads(docs).remove(name).expect("the workload");
    let [container] = <[Container; 1]>::try_from(spec.containers.clone()).expect("one container");
    let line = command_line(docs, &container);
    (spec, container, line)
}

/// The port number a Service's port `target` names in the container it selects.
fn service_target(docs: &[(String, Value)], service: &str, port: i32) -> i32 {
    let s: Service = typed(find(docs, "Service", service));
    let spec = s.spec.expect("spec");
    let app = spec
        .selector
        .and_then(|s| s.get("app.kubernetes.io/name").cloned())
        .expect("a selector");
    let (workload, _) = workloads(docs)
        .into_iter()
        .find(|(_, (a, _))| *a == app)
        .expect("the Service selects a workload");
    let (_, c, _) = container(docs, &workload);
    let p = spec
        .ports
        .expect("ports")
        .into_iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("{service} has no port {port}"));
    match p.target_port.expect("a target port") {
        IntOrString::String(name) => named_port(&c, &name),
        IntOrString::Int(n) => n,
    }
}

#[test]
fn the_parts_are_wired_to_one_another() {
    let docs = documents();
    let (node_pod, node, node_line) = container(&docs, "weft-node");
    let (_, tracker, tracker_line) = container(&docs, "weft-tracker");
    let (_, _, ca_line) = container(&docs, "weft-ca");

    // The agent runs on every node, in its network namespace, with what capture needs; the
    // tracker and the CA too, as agents waiting for them would hold their captured traffic.
    // None depends on cluster DNS, whose pods the agents hold too.
    for (name, (_, spec)) in workloads(&docs) {
        assert_eq!(spec.host_network, Some(true), "{name}");
        assert_eq!(spec.dns_policy.as_deref(), Some("Default"), "{name}");
    }
    assert!(
        node_pod
            .tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none())
    );
    let caps = node
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone());
    assert_eq!(
        caps.and_then(|c| c.add),
        Some(vec!["NET_ADMIN".to_owned()]),
        "NET_ADMIN, and nothing more"
    );
    // The agent's drain ends before the kubelet's kill.
    let drain: i64 = flag(&node_line, "--drain-timeout")
        .and_then(|d| d.strip_suffix('s'))
        .and_then(|d| d.parse().ok())
        .expect("--drain-timeout in seconds");
    let grace = node_pod
        .termination_grace_period_seconds
        .expect("a termination grace period");
    assert!(drain < grace, "--drain-timeout {drain}s, grace {grace}s");
    assert!(
        node.env.as_deref().unwrap_or_default().iter().any(|v| {
            v.name == "NODE_NAME"
                && v.value_from
                    .as_ref()
                    .and_then(|f| f.field_ref.as_ref())
                    .map(|f| f.field_path.as_str())
                    == Some("spec.nodeName")
        }),
        "--node is the node the pod runs on"
    );
    assert_eq!(flag(&node_line, "--node"), Some("node-1"));
    let patterns: Vec<&str> = flag(&node_line, "--pod-interfaces")
        .expect("--pod-interfaces")
        .split(',')
        .collect();
    weft::redirect::PodInterfaces::new(&patterns).expect("patterns weft accepts");
    // The ports it serves are the ports its probes and metrics name.
    let (ready, port) = http_probe(node.readiness_probe.as_ref());
    assert_eq!(ready, "/healthz/ready");
    assert_eq!(
        named_port(&node, &port),
        port_of(flag(&node_line, "--readiness").expect("--readiness"))
    );
    assert_eq!(
        named_port(&node, "metrics"),
        port_of(flag(&node_line, "--metrics").expect("--metrics"))
    );
    assert!(
        flag(&node_line, "--admin").is_some_and(|a| a.starts_with("127.0.0.1:")),
        "the config dump stays on the node"
    );

    // The agent's token is for the CA, of the ServiceAccount the CA takes tokens of.
    let token_file = flag(&node_line, "--token-file").expect("--token-file");
    let (dir, file) = token_file.rsplit_once('/').expect("a path");
    let mount = node
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.mount_path == dir)
        .expect("the token's mount")
        .clone();
    let volume = node_pod
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the token's volume")
        .clone();
    let token = volume
        .projected
        .and_then(|p| p.sources)
        .and_then(|s| s.into_iter().find_map(|s| s.service_account_token))
        .expect("a projected ServiceAccount token");
    assert_eq!(token.path, file);
    assert_eq!(
        Some(token.audience.as_deref().unwrap_or_default()),
        flag(&ca_line, "--token-audience")
    );
    let account = format!(
        "weft-system/{}",
        node_pod
            .service_account_name
            .as_deref()
            .expect("an account")
    );
    assert_eq!(
        flag(&ca_line, "--agent-service-account"),
        Some(account.as_str())
    );

    // The tracker and the CA are reached by their Services' addresses (no DNS), at the ports
    // they listen on, their certificates checked for the Services' names.
    let addresses = service_addresses(&docs);
    for (line, url_flag, name_flag) in [
        (&node_line, "--tracker", "--tracker-server-name"),
        (&ca_line, "--tracker", "--tracker-server-name"),
        (&node_line, "--ca", "--ca-server-name"),
    ] {
        let url = flag(line, url_flag).expect("a URL");
        let host = url
            .strip_prefix("https://")
            .and_then(|h| h.split(':').next())
            .expect("https");
        let service = addresses
            .iter()
            .find_map(|(service, ip)| (ip == host).then_some(service.as_str()))
            .unwrap_or_else(|| panic!("{url}: the address of a Service of weft-system"));
        assert_eq!(
            flag(line, name_flag),
            Some(format!("{service}.weft-system.svc").as_str()),
            "{url}"
        );
        let target = service_target(&docs, service, port_of(url));
        let listen = match service {
            "weft-tracker" => flag(&tracker_line, "--listen"),
            _ => flag(&ca_line, "--listen"),
        };
        assert_eq!(target, port_of(listen.expect("--listen")), "{url}");
    }

    // The tracker's own cluster is the in-cluster context, named by the cluster's id.
    assert!(tracker_line.iter().any(|a| a == "--in-cluster"));
    assert!(ca_line.iter().any(|a| a == "--in-cluster"));
    let mapping = flag(&tracker_line, "--cluster-name").expect("--cluster-name");
    let cluster: ConfigMap = typed(find(&docs, "ConfigMap", "weft-config"));
    let id = cluster
        .data
        .and_then(|d| d.get("cluster").cloned())
        .expect("cluster");
    assert_eq!(mapping, format!("{IN_CLUSTER_CONTEXT}={id}"));
    weft::model::ClusterId::new(&id).expect("a valid cluster id");
    assert!(
        tracker
            .volume_mounts
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|m| Some(m.mount_path.as_str()) == flag(&tracker_line, "--kubeconfig-dir"))
    );
}

/// What the manifests grant ServiceAccount `weft-system/account`: the rules of every role a
/// binding gives it, for all namespaces (ClusterRoleBinding) or the binding's (RoleBinding).
fn grants(docs: &[(String, Value)], account: &str) -> Vec<Grant> {
    let mut out = Vec::new();
    for (_, doc) in docs {
        let (namespace, role_ref, subjects) = match doc["kind"].as_str() {
            Some("ClusterRoleBinding") => {
                let b: ClusterRoleBinding = typed(doc.clone());
                (None, b.role_ref, b.subjects)
            }
            Some("RoleBinding") => {
                let b: RoleBinding = typed(doc.clone());
                (b.metadata.namespace, b.role_ref, b.subjects)
            }
            _ => continue,
        };
        let bound = subjects.unwrap_or_default().iter().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some("weft-system")
        });
        if !bound {
            continue;
        }
        let rules = match role_ref.kind.as_str() {
            "ClusterRole" => typed::<ClusterRole>(find(docs, "ClusterRole", &role_ref.name)).rules,
            "Role" => typed::<Role>(find(docs, "Role", &role_ref.name)).rules,
            other => panic!("a role kind RBAC does not have: {other}"),
        };
        for rule in rules.unwrap_or_default() {
            out.push(Grant {
                namespace: namespace.clone(),
                rule,
            });
        }
    }
    assert!(!out.is_empty(), "{account} is granted something");
    out
}

/// Every (verb, group, resource) a grant names, each with the requests that used it: a grant
/// nobody used is more than the component needs.
fn unused(grants: &[Grant], asked: &[(Attributes, bool)]) -> Vec<String> {
    let mut out = Vec::new();
    for grant in grants {
        let rule = &grant.rule;
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    let used = asked.iter().any(|(a, allowed)| {
                        *allowed && &a.verb == verb && &a.group == group && &a.resource == resource
                    });
                    if !used {
                        out.push(format!("{verb} {group}/{resource}"));
                    }
                }
            }
        }
    }
    out
}

/// `server` refused nothing, and every permission of `granted` was used.
fn exactly_what_was_needed(granted: &[Grant], server: &ApiServer) {
    assert_eq!(refused(server), Vec::<String>::new(), "nothing refused");
    assert_eq!(
        unused(granted, &server.authorized()),
        Vec::<String>::new(),
        "granted but never needed"
    );
}

/// What a pod of `server`'s cluster is given to reach it: the server's address, and in
/// `dir` its ServiceAccount's token and the cluster's CA, as the kubelet mounts them.
fn in_cluster(server: &ApiServer, dir: &Path, token: &str) -> kube::config::Kubeconfig {
    std::fs::write(dir.join("token"), token).expect("token");
    let ca = &server.pki().expect("TLS").ca_pem;
    std::fs::write(dir.join("ca.crt"), ca).expect("CA");
    let url = server.url();
    let (host, port) = url
        .strip_prefix("https://")
        .and_then(|a| a.rsplit_once(':'))
        .expect("https://HOST:PORT");
    in_cluster_kubeconfig(host, port, dir)
}

/// A cluster with one of everything the tracker watches, serving only what `grants` allow to
/// the bearer of `token`.
async fn cluster(grants: Vec<Grant>, token: &str) -> ApiServer {
    let s = ApiServer::start_tls_for_tokens(token).await;
    s.authorize(Some(grants));
    s.apply(
        Kind::Namespace,
        json!({"metadata": {"name": "kube-system"}}),
    );
    s.apply(Kind::Namespace, json!({"metadata": {"name": "demo"}}));
    s.apply(
        Kind::Pod,
        json!({"metadata": {"name": "web-1", "namespace": "demo", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-1", "serviceAccountName": "web"},
               "status": {"phase": "Running", "podIP": "10.1.0.1"}}),
    );
    s.apply(
        Kind::Node,
        json!({"metadata": {"name": "node-1"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.11"}]}}),
    );
    s.apply(
        Kind::Service,
        json!({"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}}),
    );
    s.apply(
        Kind::EndpointSlice,
        json!({"metadata": {"name": "web-1", "namespace": "demo",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": true}}],
               "ports": [{"port": 8080}]}),
    );
    s.apply(
        Kind::NetworkPolicy,
        json!({"metadata": {"name": "deny", "namespace": "demo"}, "spec": {"podSelector": {}}}),
    );
    s.apply(
        Kind::IdentityPolicy,
        json!({"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"podSelector": {}, "rules": [{"from": [{"serviceAccount": "client"}]}]}}),
    );
    s.apply(
        Kind::ClusterProperty,
        json!({"metadata": {"name": "cluster.clusterset.k8s.io"}, "spec": {"value": "cluster-1"}}),
    );
    s
}

/// A tracker of the cluster it runs in (`in_cluster`), and a subscriber's stream of it.
async fn follow(
    in_cluster: kube::config::Kubeconfig,
) -> (tonic::Streaming<weft::tracker::wire::pb::Update>, Replica) {
    let tracker =
        tracking::kube_tracker_with(None, Some(in_cluster), &[], Duration::from_millis(300));
    let url = tracking::serve(&tracker).await;
    (tracking::subscribe_all(&url).await, Replica::new())
}

fn synced(r: &Replica) -> bool {
    tracking::status(r, "cluster-1").is_some_and(|s| s.synced && s.error.is_empty())
}

fn refused(server: &ApiServer) -> Vec<String> {
    server
        .authorized()
        .into_iter()
        .filter(|(_, allowed)| !allowed)
        .map(|(a, _)| a.to_string())
        .collect()
}

#[tokio::test]
async fn the_tracker_syncs_a_cluster_with_exactly_the_permissions_its_role_grants() {
    let docs = documents();
    let granted = grants(&docs, "weft-tracker");
    let server = cluster(granted.clone(), "tracker-token").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut stream, mut r) = follow(in_cluster(&server, tmp.path(), "tracker-token")).await;
    tracking::until(&mut stream, &mut r, "the cluster synced", |r| {
        synced(r) && tracking::has_pod(r, "cluster-1", "demo", "web-1")
    })
    .await;
    assert_eq!(r.engine().counts().2, 1, "the NetworkPolicy");
    let web = r
        .engine()
        .pod_by_name("cluster-1", "demo", "web-1")
        .expect("web");
    let client =
        weft::identity::WorkloadId::parse("spiffe://cluster-1/ns/demo/sa/client").expect("id");
    assert!(
        r.engine()
            .decide_identity(web, 80, weft::model::Protocol::Tcp, Some(&client))
            .enforced
            .passes(),
        "the IdentityPolicy"
    );
    exactly_what_was_needed(&granted, &server);

    // Control: without one of its rules the tracker is refused, and says it is not synced.
    let fewer: Vec<Grant> = granted
        .into_iter()
        .filter(|g| g.rule.resources.as_deref() != Some(&["networkpolicies".to_owned()][..]))
        .collect();
    let server = cluster(fewer, "tracker-token").await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut stream, mut r) = follow(in_cluster(&server, tmp.path(), "tracker-token")).await;
    tracking::until(&mut stream, &mut r, "the cluster's status", |r| {
        tracking::status(r, "cluster-1").is_some()
    })
    .await;
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        tracking::until(&mut stream, &mut r, "never", |_| false),
    )
    .await;
    assert!(!synced(&r), "{:?}", tracking::status(&r, "cluster-1"));
    assert!(
        refused(&server)
            .iter()
            .any(|a| a.starts_with("list networking.k8s.io/networkpolicies")),
        "{:?}",
        refused(&server)
    );
}

#[tokio::test]
async fn the_ca_reviews_an_agent_s_token_with_exactly_the_permissions_its_roles_grant() {
    let docs = &documents();
    let (_, _, ca_line) = container(docs, "weft-ca");
    let audience = flag(&ca_line, "--token-audience").expect("--token-audience");
    let (namespace, account) = flag(&ca_line, "--agent-service-account")
        .and_then(|a| a.split_once('/'))
        .expect("--agent-service-account");
    let review = |granted: Vec<Grant>| async move {
        let server = ApiServer::start_tls_for_tokens("ca-token").await;
        server.authorize(Some(granted));
        // A token of a cluster before 1.30 names the agent's pod, not its node: the CA reads
        // the pod.
        server.apply(
            Kind::Pod,
            json!({"metadata": {"name": "weft-node-x1", "namespace": namespace, "uid": "uid-x1"},
                   "spec": {"nodeName": "node-1", "serviceAccountName": account, "containers": []},
                   "status": {"phase": "Running"}}),
        );
        server.add_reviewed_token(
            "agent-token",
            TokenUser::bound(namespace, account, audience, "weft-node-x1", "uid-x1", None),
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let kubeconfig = in_cluster(&server, tmp.path(), "ca-token");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("config");
        let client = kube::Client::try_from(config).expect("client");
        let reviewer = TokenReviewer::new(client, audience, namespace, account);
        (reviewer.authenticate("agent-token").await, server)
    };
    let granted = grants(docs, "weft-ca");
    let (node, server) = review(granted.clone()).await;
    assert_eq!(node, Ok("node-1".to_owned()));
    exactly_what_was_needed(&granted, &server);

    // Control: the pod read is refused outside the agent's namespace's RoleBinding.
    let cluster_wide: Vec<Grant> = granted
        .into_iter()
        .filter(|g| g.namespace.is_none())
        .collect();
    let (node, server) = review(cluster_wide).await;
    let e = node.expect_err("the bound pod cannot be read");
    assert!(e.to_string().contains("forbidden"), "{e}");
    assert_eq!(
        refused(&server),
        [format!("get core/pods weft-node-x1 in {namespace}")]
    );
}
