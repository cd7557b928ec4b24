//! Network namespaces for tests: the data-plane tests build nodes and pods out of them, so that
//! nftables and routes are only ever programmed in namespaces the test made, never in the
//! machine's own (a stray rule there could cut the machine off).
//!
//! - [`prerequisites`] first: it says whether the test can run (root, `ip`, `nft`); under
//!   `CI=true` a missing one fails the test instead of skipping it.
//! - [`Netns::new`] makes a namespace (`ip netns add`) and deletes it when dropped.
//! - [`link`] joins two namespaces with a veth pair and gives each end its addresses.
//! - [`Netns::ip`] and [`Netns::exec`] run `ip -n NAME …` and `ip netns exec NAME …`.
//! - [`topology`] builds a node with one pod (Calico's link shape) and one peer host.
//! - [`Netns::run`] runs a closure on a thread inside the namespace: sockets it opens stay in
//!   that namespace after it returns, and processes it starts (`nft`) run there;
//!   [`Netns::block_on`] does the same for a future, on a runtime of its own.
#![allow(dead_code)] // each test file uses its own share of the helpers

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether namespaces can be made here: root, with `ip` and `nft` on PATH. Under `CI=true` a
/// missing prerequisite panics; elsewhere it is printed and the test should return.
pub fn prerequisites() -> bool {
    let missing = weft::lab::missing_prerequisites();
    if missing.is_empty() {
        return true;
    }
    let message = format!("netns test needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{message}; .ci/run installs nftables and iproute2 and runs as root");
    }
    eprintln!("skipping: {message}");
    false
}

/// A network namespace made for one test, deleted when dropped: the lab's, with panics for
/// errors (a test has nothing better to do with them).
#[derive(Debug)]
pub struct Netns(weft::lab::Netns);

impl Netns {
    /// Makes a namespace named after `role`, the process and a counter, with loopback up.
    pub fn new(role: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let name = format!("weft-{role}-{}-{n}", std::process::id());
        Self(weft::lab::Netns::create(&name).unwrap_or_else(|e| panic!("{e}")))
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// Runs `ip -n NAME args…`, panicking with ip's message if it fails.
    pub fn ip(&self, args: &[&str]) {
        self.0.ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sets `key` (a path under /proc/sys, `net/ipv4/...`) to `value` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        self.0
            .sysctl(&[(key.to_owned(), value)])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `command…` inside the namespace and returns its output, whatever its exit status.
    pub fn exec(&self, command: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.name()])
            .args(command)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {}: {e}", self.name()))
    }

    /// Runs `command…` inside the namespace, panicking if it fails; returns its stdout.
    pub fn exec_ok(&self, command: &[&str]) -> String {
        let out = self.exec(command);
        assert!(
            out.status.success(),
            "{} in {} failed: {}",
            command.join(" "),
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered the namespace, and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.0.run(f).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `future` to completion inside the namespace, on a current-thread runtime.
    pub fn block_on<F: Future + Send>(&self, future: F) -> F::Output
    where
        F::Output: Send,
    {
        self.0.block_on(future).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Joins `a` and `b` with a veth pair named `a_if` and `b_if`, gives each end its addresses
/// (`"198.18.1.1/24"`; IPv6 ones without duplicate detection, so they work at once) and brings
/// both up. The pair is made inside `a`, so interface names never meet the machine's own.
pub fn link(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["addr", "add", addr, "dev", ifname];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.ip(&args);
        }
        ns.ip(&["link", "set", ifname, "up"]);
    }
}

/// A node with one pod and one peer host, each its own namespace.
pub struct Topology {
    pub node: Netns,
    pub pod: Netns,
    pub peer: Netns,
}

/// The pod's addresses, the peer's, and the node's only IPv4 address (on its link to the
/// peer) in [`topology`].
pub const POD: &str = "198.18.1.2";
pub const POD6: &str = "fd18:1::2";
pub const PEER: &str = "198.18.2.2";
pub const NODE: &str = "198.18.2.1";
pub const NODE6: &str = "fd18:1::1";

/// A node routing between a pod and a peer host, or `None` without the [`prerequisites`].
/// The pod's link is Calico's shape: the node side has no IPv4 address and answers for the
/// pod's link-local gateway by proxy ARP (REDIRECT cannot capture there; TPROXY can).
pub fn topology() -> Option<Topology> {
    if !prerequisites() {
        return None;
    }
    let (node, pod, peer) = (Netns::new("node"), Netns::new("pod"), Netns::new("peer"));
    link(
        &node,
        "pod0",
        &["fd18:1::1/64"],
        &pod,
        "eth0",
        &["198.18.1.2/32", "fd18:1::2/64"],
    );
    link(
        &node,
        "peer0",
        &["198.18.2.1/24"],
        &peer,
        "eth0",
        &["198.18.2.2/24"],
    );
    node.ip(&["route", "add", "198.18.1.2/32", "dev", "pod0"]);
    // Proxy ARP answers only for an address routed out of another interface.
    node.ip(&["route", "add", "default", "via", "198.18.2.2"]);
    node.sysctl("net/ipv4/conf/pod0/proxy_arp", "1");
    node.sysctl("net/ipv4/neigh/pod0/proxy_delay", "0");
    // The node routes between pod and peer, as a Kubernetes node does.
    node.sysctl("net/ipv4/ip_forward", "1");
    node.sysctl("net/ipv6/conf/all/forwarding", "1");
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    pod.ip(&["-6", "route", "add", "default", "via", "fd18:1::1"]);
    peer.ip(&["route", "add", "default", "via", "198.18.2.1"]);
    Some(Topology { node, pod, peer })
}
