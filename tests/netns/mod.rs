//! Network namespaces for tests: the data-plane tests build nodes and pods out of them, so that
//! nftables and routes are only ever programmed in namespaces the test made, never in the
//! machine's own (a stray rule there could cut the machine off).
//!
//! - [`prerequisites`] first: it says whether the test can run (root, `ip`, `nft`); under
//!   `CI=true` a missing one fails the test instead of skipping it.
//! - [`Netns::new`] makes a namespace (`ip netns add`) and deletes it when dropped.
//! - [`link`] joins two namespaces with a veth pair and gives each end its addresses.
//! - [`Netns::ip`] and [`Netns::exec`] run `ip -n NAME …` and `ip netns exec NAME …`.
//! - [`Netns::run`] runs a closure on a thread inside the namespace: sockets it opens stay in
//!   that namespace after it returns, and processes it starts (`nft`) run there;
//!   [`Netns::block_on`] does the same for a future, on a runtime of its own.
#![allow(dead_code)] // each test file uses its own share of the helpers

use std::fs::File;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sched::{CloneFlags, setns};

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

/// Runs `program args`, panicking with its stderr if it fails.
fn checked(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace made for one test, deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a namespace named after `role`, the process and a counter, with loopback up.
    pub fn new(role: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let name = format!("weft-{role}-{}-{n}", std::process::id());
        checked("ip", &["netns", "add", &name]);
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args…`, panicking with ip's message if it fails.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        checked("ip", &all)
    }

    /// Runs `command…` inside the namespace and returns its output, whatever its exit status.
    pub fn exec(&self, command: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(command)
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {}: {e}", self.name))
    }

    /// Runs `command…` inside the namespace, panicking if it fails; returns its stdout.
    pub fn exec_ok(&self, command: &[&str]) -> String {
        let out = self.exec(command);
        assert!(
            out.status.success(),
            "{} in {} failed: {}",
            command.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered the namespace, and returns what it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                // setns moves only this thread; it ends with the scope, so no other code runs here.
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("cannot enter {path}: {e}"));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Runs `future` to completion inside the namespace, on a current-thread runtime.
    pub fn block_on<F: Future + Send>(&self, future: F) -> F::Output
    where
        F::Output: Send,
    {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
                .block_on(future)
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace also removes its veth ends and everything nft put in it.
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if !out.is_ok_and(|out| out.status.success()) {
            eprintln!("could not delete network namespace {}", self.name);
        }
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
