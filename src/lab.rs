//! A multi-cluster topology out of network namespaces, built from a clusterset: what
//! `weft demo`, the data-plane tests and the benchmark run on.
//!
//! - A *wire* namespace holds a bridge and an address of the nodes' segment, where
//!   control-plane processes (tracker, CAs) listen.
//! - Each node is a namespace on the bridge at its InternalIP, forwarding, with a route to
//!   every pod of every other node via that node and a default route via the wire.
//! - Each pod that owns its address is a namespace behind a veth pair to its node: the pod
//!   side holds the pod's IP/32 and a default route via a link-local gateway the node side
//!   answers for by proxy ARP, and the node side has a /32 route to the pod and no IPv4
//!   address, as Calico does it (capture is TPROXY, which needs none; REDIRECT would drop
//!   what arrives on such an interface).
//!
//! Names carry the process id (`weft-PID-N-…`), so [`sweep`] can delete what dead runs left.
//! A [`Lab`] kills the processes it started, then deletes every namespace it made, when
//! dropped. Only namespaces the lab made are ever configured: never the machine's own.

mod netns;
mod plan;
mod process;
mod traffic;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;

pub use netns::Netns;
pub use plan::{Plan, PlannedNode, PlannedPod, covering_segment};
pub use process::{Output, Process};
pub use traffic::{Exchange, ExchangeOutcome, HttpAnswer, exchange, http_get, respond};

use crate::model::{ClusterId, ClusterSet};

/// The gateway every pod routes through: link-local, answered by its node's proxy ARP, so
/// pods need no address of the node's.
const POD_GATEWAY: &str = "169.254.1.1";
/// The node ends of pod links (`p0`, `p1`, …) as `weft node --pod-interfaces` names them.
pub const POD_INTERFACES: &str = "p*";
/// A pod's IPv6 gateway: a link-local address its node's end of the link holds.
const POD_GATEWAY6: &str = "fe80::1";
/// The prefix of every namespace the lab makes.
const PREFIX: &str = "weft-";
/// How long dropping a lab waits for the processes it killed to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Why the lab cannot be built or used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Something the lab needs is missing on this machine.
    #[error(
        "the network-namespace lab needs root (to create network namespaces), `ip` (iproute2) and `nft` (nftables); missing: {}",
        .missing.join(", ")
    )]
    Prerequisites {
        /// What is missing.
        missing: Vec<&'static str>,
    },
    /// The clusterset cannot be laid out as namespaces.
    #[error("the lab's topology: {message}")]
    Topology {
        /// Why.
        message: String,
    },
    /// A command failed.
    #[error("{command}: {error}")]
    Command {
        /// The command.
        command: String,
        /// Its error output, or why it did not run.
        error: String,
    },
    /// A thread could not enter a namespace.
    #[error("entering network namespace {netns}: {error}")]
    Enter {
        /// The namespace.
        netns: String,
        /// Why.
        error: String,
    },
    /// A socket could not be opened or connected inside a namespace.
    #[error("{addr} in network namespace {netns}: {error}")]
    Socket {
        /// The namespace.
        netns: String,
        /// The address bound or dialled.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// A process could not be started.
    #[error("starting {name}: {error}")]
    Spawn {
        /// Its name.
        name: String,
        /// Why.
        error: std::io::Error,
    },
    /// An HTTP request failed.
    #[error("{url}: {error}")]
    Http {
        /// What was asked.
        url: String,
        /// Why.
        error: String,
    },
}

/// A missing prerequisite, in words for an error message.
pub fn missing_prerequisites() -> Vec<&'static str> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (to create network namespaces)");
    }
    if !runs("ip", "-V") {
        missing.push("`ip` on PATH (Debian package iproute2)");
    }
    if !runs("nft", "--version") {
        missing.push("`nft` on PATH (Debian package nftables)");
    }
    missing
}

/// Whether this machine can hold a lab: root, with `ip` and `nft` on PATH.
pub fn check_prerequisites() -> Result<(), LabError> {
    let missing = missing_prerequisites();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LabError::Prerequisites { missing })
    }
}

fn is_root() -> bool {
    // The effective uid is the second field of /proc/self/status's Uid line.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn runs(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Deletes the namespaces of labs whose process is gone (killing what still runs in them),
/// and returns their names. Namespaces of live processes are left alone.
pub fn sweep() -> Result<Vec<String>, LabError> {
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries,
        // No namespace was ever made here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(LabError::Command {
                command: "reading /run/netns".into(),
                error: e.to_string(),
            });
        }
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = lab_pid(&name) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for orphan in netns::pids(&name) {
            // A process a killed run left behind in its namespace; it may be gone already.
            let _ = i32::try_from(orphan).map(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)
            });
        }
        netns::run_ip(&["netns", "del", &name], None)?;
        tracing::info!(netns = %name, pid, "deleted a namespace a dead run left behind");
        swept.push(name);
    }
    Ok(swept)
}

/// The process id in a lab namespace's name (`weft-PID-…`), if it is one.
fn lab_pid(name: &str) -> Option<u32> {
    let (pid, _) = name.strip_prefix(PREFIX)?.split_once('-')?;
    pid.parse().ok()
}

/// How to build a lab.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// The wire's address (default: the first free address of the nodes' segment).
    pub wire: Option<Ipv4Addr>,
}

/// A node of the lab: its namespace on the wire.
#[derive(Debug)]
pub struct LabNode {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Its name.
    pub name: String,
    /// Its address on the wire.
    pub ip: Ipv4Addr,
    /// Its IPv6 address on the wire, if it is dual-stack.
    pub ip6: Option<Ipv6Addr>,
    /// Its namespace.
    pub netns: Netns,
}

/// A pod of the lab: its namespace behind its node.
#[derive(Debug)]
pub struct LabPod {
    /// Its cluster.
    pub cluster: ClusterId,
    /// Its namespace (Kubernetes').
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if it and its node are dual-stack.
    pub ip6: Option<Ipv6Addr>,
    /// Its node, an index into [`Lab::nodes`].
    pub node: usize,
    /// The TCP ports its containers declare.
    pub tcp_ports: Vec<u16>,
    /// Its network namespace.
    pub netns: Netns,
}

impl LabPod {
    /// `cluster/namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

/// A multi-cluster topology of network namespaces, torn down when dropped.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    segment: Ipv4Net,
    wire_ip: Ipv4Addr,
    wire_ip6: Option<Ipv6Addr>,
    skipped: Vec<String>,
    children: Mutex<Vec<Option<tokio::process::Child>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    // Dropped in this order, after the processes are killed: pods, nodes, the wire.
    pods: Vec<LabPod>,
    nodes: Vec<LabNode>,
    wire: Netns,
}

impl Lab {
    /// Builds the lab of `clusterset`. Blocks while `ip` runs (a few milliseconds per
    /// namespace). Whatever was made is deleted again if a step fails.
    pub fn build(clusterset: &ClusterSet, options: &LabOptions) -> Result<Self, LabError> {
        check_prerequisites()?;
        let plan = Plan::new(clusterset, options.wire)?;
        static LABS: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let wire = Netns::create(&format!("{prefix}-w"))?;
        let mut nodes = Vec::with_capacity(plan.nodes.len());
        for (i, node) in plan.nodes.iter().enumerate() {
            nodes.push(LabNode {
                cluster: node.cluster.clone(),
                name: node.name.clone(),
                ip: node.ip,
                ip6: node.ip6,
                netns: Netns::create(&format!("{prefix}-n{i}"))?,
            });
        }
        let mut pods = Vec::with_capacity(plan.pods.len());
        for (j, pod) in plan.pods.iter().enumerate() {
            pods.push(LabPod {
                cluster: pod.cluster.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip: pod.ip,
                ip6: pod.ip6,
                node: pod.node,
                tcp_ports: pod.tcp_ports.clone(),
                netns: Netns::create(&format!("{prefix}-p{j}"))?,
            });
        }
        let lab = Self {
            prefix,
            segment: plan.segment,
            wire_ip: plan.wire,
            wire_ip6: plan.wire6,
            skipped: plan.skipped,
            children: Mutex::default(),
            tasks: Mutex::default(),
            pods,
            nodes,
            wire,
        };
        lab.wire_up()?;
        for skipped in &lab.skipped {
            tracing::warn!(prefix = %lab.prefix, "not in the lab: {skipped}");
        }
        tracing::info!(
            prefix = %lab.prefix,
            segment = %lab.segment,
            wire = %lab.wire_ip,
            nodes = lab.nodes.len(),
            pods = lab.pods.len(),
            "lab built"
        );
        Ok(lab)
    }

    /// Addresses, links and routes, namespace by namespace.
    fn wire_up(&self) -> Result<(), LabError> {
        let len = self.segment.prefix_len();
        let mut wire = vec![
            "link add br0 type bridge".to_owned(),
            format!("addr add {}/{len} dev br0", self.wire_ip),
            "link set br0 up".to_owned(),
        ];
        for (i, node) in self.nodes.iter().enumerate() {
            wire.push(format!(
                "link add n{i} type veth peer name eth0 netns {}",
                node.netns.name()
            ));
            wire.push(format!("link set n{i} master br0"));
            wire.push(format!("link set n{i} up"));
        }
        for pod in &self.pods {
            wire.push(format!(
                "route add {}/32 via {}",
                pod.ip, self.nodes[pod.node].ip
            ));
        }
        if let Some(wire6) = self.wire_ip6 {
            wire.push(format!("addr add {wire6}/128 dev br0 nodad"));
            for node6 in self.nodes.iter().filter_map(|n| n.ip6) {
                wire.push(format!("route add {node6}/128 dev br0"));
            }
            for pod in &self.pods {
                if let (Some(ip6), Some(via)) = (pod.ip6, self.nodes[pod.node].ip6) {
                    wire.push(format!("route add {ip6}/128 via {via} dev br0"));
                }
            }
        }
        self.wire
            .sysctl(&[("net/ipv6/conf/default/accept_dad".to_owned(), "0")])?;
        self.wire.ip_batch(&wire)?;

        for (i, node) in self.nodes.iter().enumerate() {
            // Forwarding first: devices made after it inherit it, which proxy ARP needs. No
            // duplicate address detection: an address would stay tentative for a second.
            node.netns.sysctl(&[
                ("net/ipv4/ip_forward".to_owned(), "1"),
                ("net/ipv6/conf/all/forwarding".to_owned(), "1"),
                ("net/ipv6/conf/default/accept_dad".to_owned(), "0"),
                ("net/ipv6/conf/eth0/accept_dad".to_owned(), "0"),
            ])?;
            let mut commands = vec![
                format!("addr add {}/{len} dev eth0", node.ip),
                "link set eth0 up".to_owned(),
                format!("route add default via {}", self.wire_ip),
            ];
            // IPv6 addresses are /128s: the nodes and the wire reach one another on the
            // bridge by a route for each.
            if let Some(ip6) = node.ip6 {
                commands.push(format!("addr add {ip6}/128 dev eth0 nodad"));
                let peers = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.ip6)
                    .filter(|p| *p != ip6);
                for peer in peers.chain(self.wire_ip6) {
                    commands.push(format!("route add {peer}/128 dev eth0"));
                }
            }
            let mut sysctls = Vec::new();
            for (j, pod) in self.pods.iter().enumerate() {
                if pod.node == i {
                    commands.push(format!(
                        "link add p{j} type veth peer name eth0 netns {}",
                        pod.netns.name()
                    ));
                    commands.push(format!("link set p{j} up"));
                    commands.push(format!("route add {}/32 dev p{j}", pod.ip));
                    sysctls.push((format!("net/ipv4/conf/p{j}/proxy_arp"), "1"));
                    // Answer the pod's first ARP at once, not after a random delay.
                    sysctls.push((format!("net/ipv4/neigh/p{j}/proxy_delay"), "0"));
                    if let Some(ip6) = pod.ip6 {
                        // The pod's IPv6 gateway, as proxy ARP is its IPv4 one.
                        commands.push(format!("addr add {POD_GATEWAY6}/64 dev p{j} nodad"));
                        commands.push(format!("route add {ip6}/128 dev p{j}"));
                    }
                } else {
                    commands.push(format!(
                        "route add {}/32 via {}",
                        pod.ip, self.nodes[pod.node].ip
                    ));
                    if let (Some(ip6), Some(via)) = (pod.ip6, self.nodes[pod.node].ip6) {
                        commands.push(format!("route add {ip6}/128 via {via} dev eth0"));
                    }
                }
            }
            node.netns.ip_batch(&commands)?;
            node.netns.sysctl(&sysctls)?;
        }

        for pod in &self.pods {
            pod.netns
                .sysctl(&[("net/ipv6/conf/eth0/accept_dad".to_owned(), "0")])?;
            let mut commands = vec![
                format!("addr add {}/32 dev eth0", pod.ip),
                "link set eth0 up".to_owned(),
                format!("route add default via {POD_GATEWAY} dev eth0 onlink"),
            ];
            if let Some(ip6) = pod.ip6 {
                commands.push(format!("addr add {ip6}/128 dev eth0 nodad"));
                commands.push(format!("route add default via {POD_GATEWAY6} dev eth0"));
            }
            pod.netns.ip_batch(&commands)?;
        }
        Ok(())
    }

    /// The prefix of every namespace name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The wire namespace, where control-plane processes run.
    pub fn wire(&self) -> &Netns {
        &self.wire
    }

    /// The wire's address.
    pub fn wire_ip(&self) -> Ipv4Addr {
        self.wire_ip
    }

    /// The wire's IPv6 address, when the nodes are dual-stack.
    pub fn wire_ip6(&self) -> Option<Ipv6Addr> {
        self.wire_ip6
    }

    /// The segment the wire and the nodes share.
    pub fn segment(&self) -> Ipv4Net {
        self.segment
    }

    /// What of the clusterset got no namespace, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The nodes, ordered by cluster and name.
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// The node `name` of `cluster`.
    pub fn node(&self, cluster: &str, name: &str) -> Option<&LabNode> {
        self.nodes
            .iter()
            .find(|n| n.cluster.as_str() == cluster && n.name == name)
    }

    /// The pods, ordered by cluster, namespace and name.
    pub fn pods(&self) -> &[LabPod] {
        &self.pods
    }

    /// The pod `namespace/name` of `cluster`.
    pub fn pod(&self, cluster: &str, namespace: &str, name: &str) -> Option<&LabPod> {
        self.pods
            .iter()
            .find(|p| p.cluster.as_str() == cluster && p.namespace == namespace && p.name == name)
    }

    /// The pod at `ip`.
    pub fn pod_at(&self, ip: IpAddr) -> Option<&LabPod> {
        self.pods
            .iter()
            .find(|p| IpAddr::V4(p.ip) == ip || p.ip6.map(IpAddr::V6) == Some(ip))
    }

    /// The node of `pod`.
    pub fn node_of(&self, pod: &LabPod) -> &LabNode {
        // Indexes come from the plan, which only points pods at its own nodes.
        &self.nodes[pod.node]
    }

    /// The namespaces of this lab that exist right now (`ip netns list`, by prefix).
    pub fn namespaces_of(prefix: &str) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| name.starts_with(&format!("{prefix}-")))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Starts `command` inside `netns` (`ip netns exec`), named `name` in errors and logs,
    /// with its stdout and stderr collected as lines. Call it inside a tokio runtime; the
    /// process is killed when the lab is dropped, or by [`Lab::kill`].
    pub fn spawn(&self, netns: &Netns, name: &str, command: &Command) -> Result<Process, LabError> {
        let mut wrapped = tokio::process::Command::new("ip");
        wrapped
            .args(["netns", "exec", netns.name()])
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            wrapped.current_dir(dir);
        }
        let mut child = wrapped.spawn().map_err(|error| LabError::Spawn {
            name: name.to_owned(),
            error,
        })?;
        let output = std::sync::Arc::new(Output::default());
        if let Some(stdout) = child.stdout.take() {
            process::collect(stdout, output.clone());
        }
        if let Some(stderr) = child.stderr.take() {
            process::collect(stderr, output.clone());
        }
        let pid = child.id();
        let mut children = self.children();
        children.push(Some(child));
        tracing::debug!(name, netns = netns.name(), pid, "started");
        Ok(Process::new(
            children.len() - 1,
            name.to_owned(),
            pid,
            output,
        ))
    }

    /// How `process` ended, if it has.
    pub fn exit_status(&self, process: &Process) -> Option<ExitStatus> {
        self.children()
            .get_mut(process.slot)
            .and_then(Option::as_mut)
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Kills `process` and waits for it to be gone.
    pub async fn kill(&self, process: &Process) {
        let child = self.children().get_mut(process.slot).and_then(Option::take);
        if let Some(mut child) = child
            && let Err(e) = child.kill().await
        {
            tracing::warn!(name = process.name(), error = %e, "could not kill");
        }
    }

    /// Stops `process` with SIGTERM and waits up to `grace` for it to exit; kills it if it
    /// has not. How it ended when it exited by itself within the grace.
    pub async fn terminate(&self, process: &Process, grace: Duration) -> Option<ExitStatus> {
        let child = self.children().get_mut(process.slot).and_then(Option::take);
        let mut child = child?;
        // The child is ours and not yet reaped, so its pid is not reused by another process.
        let pid = child.id().and_then(|pid| i32::try_from(pid).ok());
        if let Some(pid) = pid
            && let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM)
        {
            tracing::warn!(name = process.name(), error = %e, "could not send SIGTERM");
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            Ok(Err(e)) => {
                tracing::warn!(name = process.name(), error = %e, "could not wait");
                None
            }
            Err(_) => {
                tracing::warn!(
                    name = process.name(),
                    ?grace,
                    "no exit after SIGTERM; killing"
                );
                if let Err(e) = child.kill().await {
                    tracing::warn!(name = process.name(), error = %e, "could not kill");
                }
                None
            }
        }
    }

    /// Serves [`respond`] on `addr` inside `netns`, answering as `who`, until the lab is
    /// dropped. Call it inside a tokio runtime.
    pub fn serve_responder(
        &self,
        netns: &Netns,
        addr: SocketAddr,
        who: &str,
    ) -> Result<(), LabError> {
        let listener = netns.listen(addr)?;
        let task = tokio::spawn(respond(listener, who.to_owned()));
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task.abort_handle());
        Ok(())
    }

    fn children(&self) -> std::sync::MutexGuard<'_, Vec<Option<tokio::process::Child>>> {
        // A panic while holding the lock leaves plain handles behind: still usable.
        self.children.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let mut children: Vec<_> = self.children().drain(..).flatten().collect();
        for child in &mut children {
            // SIGKILL: the namespaces go next, so nothing is left for a graceful exit to do.
            let _ = child.start_kill();
        }
        let deadline = std::time::Instant::now() + KILL_WAIT;
        for child in &mut children {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            task.abort();
        }
        tracing::debug!(prefix = %self.prefix, "lab torn down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lab_names_carry_a_pid() {
        assert_eq!(lab_pid("weft-1234-0-n1"), Some(1234));
        assert_eq!(lab_pid("weft-1234-0-w"), Some(1234));
        // tests/netns names its namespaces role first: never swept as a lab's.
        assert_eq!(lab_pid("weft-node-1234-0"), None);
        assert_eq!(lab_pid("other-1234-0"), None);
        assert_eq!(lab_pid("weft-1234"), None);
    }
}
