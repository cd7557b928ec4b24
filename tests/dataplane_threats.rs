//! THREATS 2, 14, 15, 16 and 24 against the real `weft node` listeners, on the lab of
//! `tests/dataplane_lab/` with one more pod per node (`client-2` beside the client, running as
//! another service account; `server-2` beside the server) and a policy that admits only the
//! client to the server's line port. A test certificate signed by a cluster's development root
//! speaks HBONE straight to node B's 15008 from node A's namespace, as a peer that holds a key
//! can; "trap" listeners sit where a wrong dial would land and must accept nothing. One lab
//! for all of it, to keep the run short on CI's two cores.

mod dataplane_lab;
mod hbone_fixture;
mod netns;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::TlsConnector;
use weft::identity::{BundleSet, Expected, TrustStore, WorkloadId, trust_domain_for};
use weft::lab::{LabNode, Netns, exchange, http_get};
use weft::model::ClusterId;

use dataplane_lab::{FROM_CLUSTER_1_CLIENT, LINE_PORT, SELECT_SERVER};
use hbone_fixture::status_of;
use hbone_fixture::testpki::{Leaf, leaf_params, uri};

/// Where a wrong dial would land: every trap listens on this port.
const TRAP_PORT: u16 = 80;
/// The cloud metadata address, put on the nodes' loopback so that a dial to it would land.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// How long a probe that must fail may take.
const SHORT: Duration = Duration::from_secs(1);
const WAIT: Duration = Duration::from_secs(5);

/// `client-2` on node A: a pod whose service account is `impostor`.
const CLUSTER_1_MORE: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: client-2
  namespace: bench
  labels:
    app: impostor
spec:
  nodeName: node-a
  serviceAccountName: impostor
  containers:
    - name: client
      image: busybox
status:
  phase: Running
  podIPs:
    - ip: 10.1.1.11
";

/// `server-2` on node B.
const CLUSTER_2_MORE: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: server-2
  namespace: bench
  labels:
    app: server-2
spec:
  nodeName: node-b
  containers:
    - name: server
      image: busybox
status:
  phase: Running
  podIPs:
    - ip: 10.2.1.11
";

/// The server admitting only cluster-1's `app: client` pods, on the line port.
fn server_from_client() -> String {
    dataplane_lab::network_policy(
        "server-from-client",
        SELECT_SERVER,
        &format!(
            "\
policyTypes: [Ingress]
ingress:
  - from: [{FROM_CLUSTER_1_CLIENT}]
    ports: [{{port: {LINE_PORT}}}]
"
        ),
    )
}

/// The SPIFFE id of service account `sa` in namespace `bench` of `cluster`.
fn spiffe(cluster: &str, sa: &str) -> String {
    let cluster = ClusterId::new(cluster).expect("cluster id");
    let td = trust_domain_for(&cluster, None).expect("trust domain");
    format!("spiffe://{td}/ns/bench/sa/{sa}")
}

/// A leaf for `id`, signed by the development root of `cluster`'s trust domain that the
/// control plane wrote into `work/pki/` — what a peer that stole or was issued that
/// identity holds.
fn issue(work: &Path, cluster: &str, id: &str) -> Leaf {
    let cluster = ClusterId::new(cluster).expect("cluster id");
    let td = trust_domain_for(&cluster, None).expect("trust domain");
    let dir = work.join("pki").join(td.as_str());
    let read = |file: &str| std::fs::read_to_string(dir.join(file)).expect("the dev root");
    let root_key = KeyPair::from_pem(&read("root-key.pem")).expect("root key");
    let root = Issuer::from_ca_cert_pem(&read("root.pem"), root_key).expect("root");
    let key = KeyPair::generate().expect("key");
    let cert = leaf_params(vec![uri(id)])
        .signed_by(&key, &root)
        .expect("sign");
    Leaf {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// An HBONE connection from `from`'s namespace to `pod`:15008 as `leaf`, requiring the
/// server to prove `server_id` (node B captures it and presents that pod's certificate).
async fn hbone(
    from: &Netns,
    work: &Path,
    leaf: &Leaf,
    server_id: &str,
    pod: Ipv4Addr,
) -> h2::client::SendRequest<Bytes> {
    let bundles = BundleSet::load_dir(&work.join("bundles")).expect("the bundles");
    let store = TrustStore::new(bundles).expect("trust store");
    let expected = Expected::Workload(WorkloadId::parse(server_id).expect("id"));
    let mut tls = store
        .client_config(expected, leaf.resolver())
        .expect("client config");
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = from
        .connect(None, SocketAddr::new(pod.into(), 15008), WAIT)
        .await
        .expect("node B's HBONE listener");
    let name = ServerName::try_from("spiffe.invalid").expect("name");
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("mTLS with node B, which proves the server pod's identity");
    let (send, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(connection);
    send
}

/// A CONNECT to `authority` (sent as given) from source pod `source`.
fn connect(authority: &str, source: Ipv4Addr) -> Request<()> {
    Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header("forwarded", format!("for={source}"))
        .body(())
        .unwrap_or_else(|e| panic!("CONNECT {authority}: {e}"))
}

/// A listener where a dial must never land, with the peers it accepted.
#[derive(Clone)]
struct Trap {
    name: &'static str,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Trap {
    fn new(name: &'static str, netns: &Netns, addr: SocketAddr) -> Self {
        let listener = netns.listen(addr).expect("a trap listener");
        let accepted: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let seen = accepted.clone();
        tokio::spawn(async move {
            while let Ok((_stream, peer)) = listener.accept().await {
                seen.lock().expect("lock").push(peer);
            }
        });
        Self { name, accepted }
    }

    /// Proves the trap catches a dial from `netns` to `to`, then forgets it.
    async fn arm(&self, netns: &Netns, to: SocketAddr) {
        netns
            .connect(None, to, WAIT)
            .await
            .unwrap_or_else(|e| panic!("trap {} unreachable at {to}: {e}", self.name));
        let start = Instant::now();
        while self.accepted.lock().expect("lock").is_empty() {
            assert!(
                start.elapsed() < WAIT,
                "trap {} saw no dial to {to}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.accepted.lock().expect("lock").clear();
    }

    fn assert_empty(&self, after: &str) {
        let accepted = self.accepted.lock().expect("lock");
        assert!(
            accepted.is_empty(),
            "{after}: trap {} accepted {accepted:?}",
            self.name
        );
    }
}

/// The packets weft's antispoof chain in `node` counted as dropped.
fn antispoof_drops(node: &LabNode) -> u64 {
    let text = dataplane_lab::nft(node, &["-j", "list", "chain", "inet", "weft", "antispoof"])
        .expect("weft's antispoof chain");
    let json: serde_json::Value = serde_json::from_str(&text).expect("nft's JSON");
    let mut packets = 0;
    let mut stack = vec![&json];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(n) = map
                    .get("counter")
                    .and_then(|c| c.get("packets"))
                    .and_then(serde_json::Value::as_u64)
                {
                    packets += n;
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    packets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_listeners_refuse_tunnel_abuse_forbidden_destinations_and_spoofed_sources() {
    if !netns::prerequisites() {
        return;
    }
    let started = Instant::now();
    let weft = Path::new(env!("CARGO_BIN_EXE_weft"));
    let work = tempfile::tempdir().expect("a temporary directory");
    let step = dataplane_lab::step_with(
        "threats",
        &[
            ("cluster-1/threats.yaml", CLUSTER_1_MORE),
            ("cluster-2/threats.yaml", CLUSTER_2_MORE),
            ("cluster-2/policy.yaml", &server_from_client()),
        ],
    );
    let (lab, set, step) = dataplane_lab::build_lab_of(work.path(), step);
    let (client, server, node_a, node_b) = dataplane_lab::ends(&lab);
    let server_2 = lab.pod("cluster-2", "bench", "server-2").expect("server-2");
    let line = dataplane_lab::server_addr(&lab, LINE_PORT);
    lab.serve_responder(&server.netns, line, "server")
        .expect("the server's responder");
    let plane = dataplane_lab::start_plane(&lab, weft, work.path(), &set, &step).await;
    let log_of = |node: &LabNode| dataplane_lab::agent(&plane, node).process.output();
    let (a_log, b_log) = (log_of(node_a), log_of(node_b));

    let client_id = spiffe("cluster-1", "default");
    let impostor_id = spiffe("cluster-1", "impostor");
    let server_id = spiffe("cluster-2", "default");
    let at = |ip: Ipv4Addr, port: u16| SocketAddr::new(ip.into(), port);

    // The traps: everything in node B's namespace on the trap port (its own address,
    // loopback and the metadata address on its loopback), the other node's client pod, the
    // server pods. Each is shown to catch a dial from node B first.
    node_b
        .netns
        .ip(&["addr", "add", &format!("{METADATA}/32"), "dev", "lo"])
        .expect("metadata address on node B");
    let any = at(Ipv4Addr::UNSPECIFIED, TRAP_PORT);
    let b_trap = Trap::new("node B", &node_b.netns, any);
    for to in [node_b.ip, Ipv4Addr::LOCALHOST, METADATA] {
        b_trap.arm(&node_b.netns, at(to, TRAP_PORT)).await;
    }
    let client_trap = Trap::new("client pod", &client.netns, any);
    client_trap
        .arm(&node_b.netns, at(client.ip, TRAP_PORT))
        .await;
    let server_trap = Trap::new("server pod", &server.netns, any);
    server_trap
        .arm(&node_b.netns, at(server.ip, TRAP_PORT))
        .await;
    let server_2_trap = Trap::new("server-2 pod", &server_2.netns, any);
    server_2_trap
        .arm(&node_b.netns, at(server_2.ip, TRAP_PORT))
        .await;

    // The harness reaches the real listener: the client's identity, naming the client pod,
    // gets its tunnel to the server's line port.
    let as_client = issue(work.path(), "cluster-1", &client_id);
    let mut send = hbone(
        &node_a.netns,
        work.path(),
        &as_client,
        &server_id,
        server.ip,
    )
    .await;
    let request = connect(&line.to_string(), client.ip);
    assert_eq!(
        status_of(&mut send, request).await,
        StatusCode::OK,
        "the client's own tunnel to the server"
    );

    // THREATS 14: a CONNECT for anything but the pod the connection was addressed to is a
    // 400 and dials nothing — another node's pod, the node itself, loopback, metadata, and
    // the node's other pod on a connection addressed to the server.
    for target in [
        client.ip,
        node_b.ip,
        Ipv4Addr::LOCALHOST,
        METADATA,
        server_2.ip,
    ] {
        let request = connect(&at(target, TRAP_PORT).to_string(), client.ip);
        assert_eq!(
            status_of(&mut send, request).await,
            StatusCode::BAD_REQUEST,
            "THREATS 14: CONNECT {target}:{TRAP_PORT} through the server's tunnel"
        );
    }

    // THREATS 16: an authority with a second reading is a 400 and dials nothing, even when
    // every reading is the server itself.
    for authority in [
        "10.2.1.10",
        "10.2.1.10:0",
        "10.2.1.10:080",
        "[::ffff:10.2.1.10]:80",
        "0x0a02010a:80",
        "0x0a020a0a:80",
        "167903498:80",
        "10.2.266:80",
        "010.2.1.10:80",
        "server.bench:80",
    ] {
        let request = connect(authority, client.ip);
        assert_eq!(
            status_of(&mut send, request).await,
            StatusCode::BAD_REQUEST,
            "THREATS 16: CONNECT {authority}"
        );
    }

    // THREATS 2: a valid certificate for `impostor` (client-2's service account) naming the
    // client pod as its source is a 403 — the claimed pod runs as `default`, and its labels
    // are not lent to another identity. client-2 naming itself is judged on its own labels,
    // which the server's policy does not admit: 403 too, at the policy layer.
    let as_impostor = issue(work.path(), "cluster-1", &impostor_id);
    let mut send = hbone(
        &node_a.netns,
        work.path(),
        &as_impostor,
        &server_id,
        server.ip,
    )
    .await;
    let mark = b_log.mark();
    let request = connect(&line.to_string(), client.ip);
    assert_eq!(
        status_of(&mut send, request).await,
        StatusCode::FORBIDDEN,
        "THREATS 2: impostor claiming the client pod"
    );
    let request = connect(&line.to_string(), Ipv4Addr::new(10, 1, 1, 11));
    assert_eq!(
        status_of(&mut send, request).await,
        StatusCode::FORBIDDEN,
        "client-2 as itself: the policy admits app=client only"
    );
    let said = b_log.wait_for(mark, WAIT, |l| l.contains("runs as")).await;
    assert!(
        said.is_some(),
        "node B says why it refused the impostor: {:#?}",
        b_log.since(mark)
    );

    // THREATS 15, outbound: the client pod's connection to the metadata address (on node
    // A's loopback, so a dial would land) is refused at node A, never dialled.
    node_a
        .netns
        .ip(&["addr", "add", &format!("{METADATA}/32"), "dev", "lo"])
        .expect("metadata address on node A");
    let a_metadata = Trap::new("node A metadata", &node_a.netns, at(METADATA, TRAP_PORT));
    a_metadata.arm(&node_a.netns, at(METADATA, TRAP_PORT)).await;
    let metadata = exchange(&client.netns, None, at(METADATA, TRAP_PORT), "x", SHORT).await;
    assert!(!metadata.outcome.allowed(), "{}", metadata.outcome);
    // The pod's connections to weft's own ports at its node's address — listeners, admin,
    // metrics, readiness — are refused by node A's outbound before any dial: nothing loops
    // and no pod reads the node's metrics through weft.
    // 127.0.0.1 from a pod is the pod's own loopback, never captured: nothing to test there.
    let mark = a_log.mark();
    for port in [15000, 15001, 15006, 15008, 15020, 15021] {
        let to = at(node_a.ip, port);
        let answer = http_get(&client.netns, to, "/", SHORT).await;
        assert!(answer.is_err(), "client pod -> node A {to}: {answer:?}");
    }
    let refused = a_log
        .wait_for(mark, WAIT, |l| {
            l.contains("addressed to weft's own listener") && l.contains(":15020")
        })
        .await;
    assert!(
        refused.is_some(),
        "node A refuses its own metrics port for a pod: {:#?}",
        a_log.since(mark)
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    for trap in [&b_trap, &client_trap, &server_trap, &server_2_trap] {
        trap.assert_empty("after the CONNECTs to node B");
    }
    a_metadata.assert_empty("after the client pod dialled the metadata address");

    // THREATS 24: plaintext straight to the server pod from an unmeshed source (node A's own
    // address, the wire) on the port the policy opens to the client pod only is judged by
    // its source address, with no identity: denied at node B.
    let mark = b_log.mark();
    let from_node_a = exchange(&node_a.netns, None, line, "x", SHORT).await;
    assert!(!from_node_a.outcome.allowed(), "{}", from_node_a.outcome);
    let from_wire = exchange(lab.wire(), None, line, "x", SHORT).await;
    assert!(!from_wire.outcome.allowed(), "{}", from_wire.outcome);
    for source in [node_a.ip, lab.wire_ip()] {
        let denied = b_log
            .wait_for(mark, WAIT, |l| plaintext_denied(l, source))
            .await;
        assert!(
            denied.is_some(),
            "node B judges plaintext from {source} by address and denies it: {:#?}",
            b_log.since(mark)
        );
    }
    let through_weft = exchange(&client.netns, None, line, "x", WAIT).await;
    assert!(
        through_weft.outcome.allowed(),
        "the client pod itself: {}",
        through_weft.outcome
    );

    // THREATS 24, spoofed sources from inside the client pod (as if it had NET_ADMIN).
    // - client-2's address: node A's antispoof chain drops it (that address is routed to
    //   client-2's interface, and the packet came in on the client's), counted; had it passed,
    //   prerouting would have captured it as client-2's.
    // - an address no pod has: not a local pod's, so capture would not take it and node B
    //   would judge it by that unknown address (an ipBlock); node A's strict source check on
    //   pod links drops it (that address does not route back through the client's
    //   interface), counted.
    let neighbour = Ipv4Addr::new(10, 1, 1, 11);
    let unknown = Ipv4Addr::new(10, 1, 1, 99);
    for spoof in [neighbour, unknown] {
        client
            .netns
            .ip(&["addr", "add", &format!("{spoof}/32"), "dev", "eth0"])
            .expect("a second address in the client pod");
    }
    let drops = antispoof_drops(node_a);
    let mark = b_log.mark();
    let as_neighbour = exchange(&client.netns, Some(neighbour.into()), line, "x", SHORT).await;
    assert!(
        !as_neighbour.outcome.allowed(),
        "as client-2: {}",
        as_neighbour.outcome
    );
    assert!(
        antispoof_drops(node_a) > drops,
        "node A's antispoof chain counted the spoofed SYN"
    );
    let drops = antispoof_drops(node_a);
    let as_unknown = exchange(&client.netns, Some(unknown.into()), line, "x", SHORT).await;
    assert!(
        !as_unknown.outcome.allowed(),
        "as {unknown}: {}",
        as_unknown.outcome
    );
    assert!(
        antispoof_drops(node_a) > drops,
        "node A's antispoof chain counted the made-up source's SYN"
    );
    // Neither spoof was ever credited to a pod at node B.
    let said = b_log.since(mark);
    assert!(
        !said.iter().any(|l| l.contains("cluster-1/bench/client")),
        "node B credited a spoofed connection to a client pod: {said:#?}"
    );
    eprintln!("runtime {:?}", started.elapsed());
}

/// Whether decision log line `line` is a plaintext denial from `source`, with no source pod.
fn plaintext_denied(line: &str, source: Ipv4Addr) -> bool {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(line) else {
        return false;
    };
    let fields = &json["fields"];
    fields["direction"] == "plaintext"
        && fields["verdict"] == "deny"
        && fields["source_pod"] == ""
        && fields["source"]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!("{source}:")))
}
