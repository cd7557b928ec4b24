//! A node's traffic capture in nftables: which pod connections go to weft's listeners, kept in
//! weft's own table (`inet weft`) and in sets of the node's pod addresses; before the node knows
//! its pods, a hold that sends every connection it forwards to a listener that refuses it.
//!
//! Capture is TPROXY: a captured packet keeps its addresses, is marked, and the mark's policy
//! routing ([`routing`]) delivers it to weft's listener, which accepts it as the original
//! destination. Unlike REDIRECT it needs no address on the interface the packet came in by
//! (Calico's host-side veths have none).
//!
//! Everything here runs `nft` ([`nft::Nft`]) and netlink in the calling thread's network
//! namespace.

pub mod nft;
pub mod packets;
pub mod routing;
pub mod ruleset;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::policy::PacketPolicy;

pub use nft::{Nft, NftError};
pub use packets::{Packets, Way};
pub use ruleset::{Drift, TableState};

/// The nftables table weft owns; it never touches any other.
pub const TABLE: &str = "weft";

/// The family of weft's table: one table for IPv4 and IPv6.
pub const FAMILY: &str = "inet";

/// The socket mark on weft's own sockets, so that their traffic is never captured again.
pub const WEFT_MARK: u32 = 0x539;

/// Default outbound listener port (as ztunnel).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default inbound plaintext listener port (as ztunnel).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Default HBONE tunnel port (as ztunnel).
pub const DEFAULT_HBONE_PORT: u16 = 15008;

/// The destination a captured connection was addressed to: TPROXY keeps it as the accepted
/// socket's local address (a connection made to a listener directly names the listener).
pub fn original_destination(
    stream: &tokio::net::TcpStream,
) -> std::io::Result<std::net::SocketAddr> {
    stream.local_addr()
}

/// A listener for captured connections at `addr`: transparent, so that TPROXY can hand it
/// connections to any address, and carrying weft's `mark`, which its accepted connections
/// inherit, so that their packets are never captured again. Non-blocking, for tokio.
/// An IPv6 listener takes IPv6 only, so that no address it reports is IPv4-mapped.
pub fn transparent_listener(
    addr: std::net::SocketAddr,
    mark: u32,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The listeners for captured connections at `addr` ([`transparent_listener`]): TPROXY hands
/// a packet only to a listener of its own family, so `[::]` means both families, one socket
/// each; on a kernel without IPv6, IPv4 alone. Any other address is one listener.
pub fn transparent_listeners(
    addr: std::net::SocketAddr,
    mark: u32,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    if addr != SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())) {
        return Ok(vec![transparent_listener(addr, mark)?]);
    }
    let v4 = transparent_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port())), mark)?;
    match transparent_listener(addr, mark) {
        Ok(v6) => Ok(vec![v4, v6]),
        Err(e) if e.raw_os_error() == Some(nix::libc::EAFNOSUPPORT) => {
            tracing::warn!(%addr, "no IPv6 in this kernel: listening on IPv4 only");
            Ok(vec![v4])
        }
        Err(e) => Err(e),
    }
}

/// What weft's table does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Before the node knows its pods: every TCP connection it forwards goes to the outbound
    /// listener, which refuses it, and nothing else is forwarded (fail closed).
    Hold,
    /// Its local pods' traffic goes to weft's listeners.
    Captured,
}

impl Mode {
    /// The mode's name in logs, readiness and `/config_dump`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Captured => "captured",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong describing or installing the capture.
#[derive(Debug, Error)]
pub enum RedirectError {
    /// A text that is not an IP address where a pod address was expected.
    #[error("pod address {text:?} is not an IP address")]
    Unparsable { text: String },
    /// An address that no pod can have (capturing it would capture the node's own traffic).
    #[error("{addr} cannot be a pod address: it is {why}")]
    NotAPodAddress { addr: IpAddr, why: &'static str },
    /// Two listeners given the same port, or port 0.
    #[error("capture ports {ports:?} must be non-zero and distinct")]
    Ports { ports: Ports },
    /// Mark 0 would exempt every unmarked packet from capture.
    #[error("weft's socket mark must not be 0 (every unmarked packet carries 0)")]
    ZeroMark,
    /// A socket mark that the policy routing of captured packets would take for its own:
    /// every packet weft sends would be delivered back to the node.
    #[error(
        "weft's socket mark {mark:#x} must not match capture's {:#x}/{:#x}",
        routing::TPROXY_MARK,
        routing::MARK_MASK
    )]
    MarkClash { mark: u32 },
    /// `nft` failed while doing `action`.
    #[error("{action}: {source}")]
    Nft {
        action: String,
        #[source]
        source: NftError,
    },
    /// The policy routing of captured packets could not be read or changed.
    #[error("policy routing of captured packets: {0}")]
    Routing(#[from] routing::RoutingError),
    /// A pod interface pattern that is no interface name (with an optional trailing `*`).
    #[error(
        "pod interface pattern {pattern:?}: {why} (an interface name of at most 15 letters, \
         digits, '-', '_' or '.', with an optional trailing '*')"
    )]
    PodInterface { pattern: String, why: &'static str },
}

/// The longest interface name Linux takes (IFNAMSIZ less its terminating zero).
const IFNAME_MAX: usize = 15;

/// The names of the interfaces local pods' traffic arrives by (`cali*`, `lxc*`, `cni0`): a
/// CNI's naming, which an operator knows and weft cannot guess. An address behind them that
/// is not yet a known local pod (a pod that started before the view has it) sends and
/// receives nothing until it is one, as Calico drops traffic of an interface it has no
/// endpoint for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodInterfaces(Vec<String>);

impl PodInterfaces {
    /// Patterns as nft matches them: a name, or a prefix with a trailing `*`.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, RedirectError> {
        patterns
            .iter()
            .map(|p| {
                let pattern = p.as_ref();
                let bad = |why| RedirectError::PodInterface {
                    pattern: pattern.to_owned(),
                    why,
                };
                let name = pattern.strip_suffix('*').unwrap_or(pattern);
                if name.is_empty() {
                    Err(bad("it names no interface"))
                } else if name.len() > IFNAME_MAX {
                    Err(bad("too long"))
                } else if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    Err(bad("a character no interface name has"))
                } else {
                    Ok(pattern.to_owned())
                }
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// The patterns.
    pub fn patterns(&self) -> &[String] {
        &self.0
    }
}

/// The ports weft's listeners use on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    /// Where outbound connections of local pods are captured to.
    pub outbound: u16,
    /// Where plaintext connections to local pods are captured to.
    pub inbound: u16,
    /// Where HBONE tunnels to local pods are captured to.
    pub hbone: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            outbound: DEFAULT_OUTBOUND_PORT,
            inbound: DEFAULT_INBOUND_PORT,
            hbone: DEFAULT_HBONE_PORT,
        }
    }
}

/// An address a local pod may have: unicast, not loopback, unspecified or IPv4-mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodAddr(IpAddr);

impl PodAddr {
    /// Checks that `addr` can be a pod's address.
    pub fn new(addr: IpAddr) -> Result<Self, RedirectError> {
        let why = match addr {
            _ if addr.is_unspecified() => Some("unspecified"),
            _ if addr.is_loopback() => Some("loopback"),
            _ if addr.is_multicast() => Some("multicast"),
            IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
            // nft keeps IPv4 and IPv6 in separate sets; a mapped address would never match.
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                Some("IPv4-mapped (give it as IPv4)")
            }
            _ => None,
        };
        match why {
            Some(why) => Err(RedirectError::NotAPodAddress { addr, why }),
            None => Ok(Self(addr)),
        }
    }

    /// The address.
    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl FromStr for PodAddr {
    type Err = RedirectError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let addr = text.parse().map_err(|_| RedirectError::Unparsable {
            text: text.to_owned(),
        })?;
        Self::new(addr)
    }
}

impl fmt::Display for PodAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The capture a node should have: its mode, its listeners' ports, weft's mark, its local
/// pods and the links they are routed through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    mode: Mode,
    ports: Ports,
    mark: u32,
    pods: BTreeSet<PodAddr>,
    pod_interfaces: PodInterfaces,
    /// The interface each local pod is routed through, where known (pods whose route is not
    /// there yet are looked up again at the next check).
    links: BTreeMap<PodAddr, String>,
    packets: Arc<Packets>,
}

impl Capture {
    /// A capture (mode [`Mode::Captured`]) with no local pods yet.
    pub fn new(ports: Ports, mark: u32) -> Result<Self, RedirectError> {
        let Ports {
            outbound,
            inbound,
            hbone,
        } = ports;
        if [outbound, inbound, hbone].contains(&0)
            || outbound == inbound
            || inbound == hbone
            || outbound == hbone
        {
            return Err(RedirectError::Ports { ports });
        }
        if mark == 0 {
            return Err(RedirectError::ZeroMark);
        }
        if mark & routing::MARK_MASK == routing::TPROXY_MARK {
            return Err(RedirectError::MarkClash { mark });
        }
        Ok(Self {
            mode: Mode::Captured,
            ports,
            mark,
            pods: BTreeSet::new(),
            pod_interfaces: PodInterfaces::default(),
            links: BTreeMap::new(),
            packets: Arc::default(),
        })
    }

    /// The same capture, keeping addresses that are no known local pod off `interfaces`.
    pub fn with_pod_interfaces(self, interfaces: PodInterfaces) -> Self {
        Self {
            pod_interfaces: interfaces,
            ..self
        }
    }

    /// The interfaces only known local pods may use.
    pub fn pod_interfaces(&self) -> &PodInterfaces {
        &self.pod_interfaces
    }

    /// What the table does.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The listeners' ports.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// weft's socket mark.
    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Adds a local pod's address; false if it was already there.
    pub fn insert(&mut self, pod: PodAddr) -> bool {
        self.pods.insert(pod)
    }

    /// Removes a local pod's address (and its link); false if it was not there.
    pub fn remove(&mut self, pod: PodAddr) -> bool {
        self.links.remove(&pod);
        self.pods.remove(&pod)
    }

    /// Records the interface a local pod is routed through (`None`: not known); ignored for
    /// an address that is not a local pod's.
    pub fn set_link(&mut self, pod: PodAddr, link: Option<String>) {
        match link {
            Some(link) if self.pods.contains(&pod) => {
                self.links.insert(pod, link);
            }
            _ => {
                self.links.remove(&pod);
            }
        }
    }

    /// The interface `pod` is routed through, if known.
    pub fn link_of(&self, pod: PodAddr) -> Option<&str> {
        self.links.get(&pod).map(String::as_str)
    }

    /// The pod links: every interface some local pod is routed through (one for all pods on
    /// a bridge).
    pub fn pod_links(&self) -> BTreeSet<&str> {
        self.links.values().map(String::as_str).collect()
    }

    /// Local pods whose link is not known (yet).
    pub fn pods_without_link(&self) -> Vec<PodAddr> {
        self.pods
            .iter()
            .filter(|pod| !self.links.contains_key(pod))
            .copied()
            .collect()
    }

    /// The local pods' addresses.
    pub fn pods(&self) -> &BTreeSet<PodAddr> {
        &self.pods
    }

    /// The packet layer: NetworkPolicy for the traffic the proxy does not carry.
    pub fn packets(&self) -> &Packets {
        &self.packets
    }

    /// Makes `packets` the packet layer; the one it replaces is returned.
    pub fn set_packets(&mut self, packets: Arc<Packets>) -> Arc<Packets> {
        std::mem::replace(&mut self.packets, packets)
    }
}

/// A node's capture, installed through `nft`: the desired state and the table that carries it.
///
/// One lock serialises every change, so a restore by [`Redirect::watch`] never races a pod update.
#[derive(Debug)]
pub struct Redirect {
    nft: Nft,
    capture: Mutex<Capture>,
    restores: AtomicU64,
    /// weft's table is installed by this process in [`Mode::Captured`] (so changes to its
    /// pod links and packet layer can be applied to it; the hold has neither).
    captured: AtomicBool,
    /// The packet layer's drops, as its counters were last read.
    dropped: std::sync::Mutex<DropTally>,
    /// The packet layer as the capture has it, for readers that cannot wait on its lock.
    packets: std::sync::Mutex<Arc<Packets>>,
    /// The pod links as the capture has them, for readers that cannot wait on its lock.
    links: std::sync::Mutex<PodLinkState>,
    /// The capture's pod interfaces (they never change).
    pod_interfaces: PodInterfaces,
}

/// The pod links as last looked up: what `/config_dump` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PodLinkState {
    /// Interfaces leading to local pods, where sources must route back the same way.
    pub links: Vec<String>,
    /// Local pods whose route is not there yet (looked up again at the next check).
    pub pods_without_link: Vec<String>,
}

/// Where [`DropTally`] keeps the antispoof chain's drops (after the packet layer's [`Way`]s).
const SPOOFED: usize = 2;
/// Where [`DropTally`] keeps capture's fail-closed drops (the prerouting chain's).
const UNCAPTURED: usize = 3;

/// The packet layer's drop counters, per [`Way`], the antispoof chain's ([`SPOOFED`]) and
/// the prerouting chain's ([`UNCAPTURED`]), kept monotonic across table installs (each
/// starts the kernel's counters at zero again).
#[derive(Debug, Default)]
struct DropTally {
    /// What earlier tables counted.
    before: [u64; 4],
    /// What the current table counted when last read.
    current: [u64; 4],
}

impl DropTally {
    /// Takes a reading of the current table's counters.
    fn read(&mut self, now: [u64; 4]) {
        for (i, n) in now.into_iter().enumerate() {
            // Lower than before: the table was made again under us (a flush, a restore).
            if n < self.current[i] {
                self.before[i] += self.current[i];
            }
            self.current[i] = n;
        }
    }

    /// The current table is about to be replaced: what it counted is kept.
    fn replaced(&mut self) {
        for i in 0..self.current.len() {
            self.before[i] += std::mem::take(&mut self.current[i]);
        }
    }

    fn total(&self, i: usize) -> u64 {
        self.before[i] + self.current[i]
    }
}

impl Redirect {
    /// Manages `capture` through `nft`; nothing is installed until [`Redirect::apply`].
    pub fn new(nft: Nft, capture: Capture) -> Self {
        Self {
            nft,
            pod_interfaces: capture.pod_interfaces.clone(),
            capture: Mutex::new(capture),
            restores: AtomicU64::new(0),
            captured: AtomicBool::new(false),
            dropped: std::sync::Mutex::default(),
            packets: std::sync::Mutex::default(),
            links: std::sync::Mutex::default(),
        }
    }

    /// Installs weft's table as the capture says (its pods' links looked up first), replacing
    /// whatever the table held, in one transaction.
    pub async fn apply(&self) -> Result<(), RedirectError> {
        let mut capture = self.capture.lock().await;
        let pods: Vec<_> = capture.pods.iter().copied().collect();
        self.look_up_links(&mut capture, pods, true).await;
        self.apply_locked(&capture).await
    }

    /// Looks up the links `pods` are routed through and records them in `capture` (a pod
    /// whose route is not there yet is left without one, to be looked up at the next check);
    /// returns the pod links this added and removed. Never fails: netlink trouble is logged
    /// and what was known is kept. `announce` logs pods left without a link at info, not
    /// debug (a check repeats them every interval).
    async fn look_up_links(
        &self,
        capture: &mut Capture,
        pods: impl IntoIterator<Item = PodAddr>,
        announce: bool,
    ) -> (Vec<String>, Vec<String>) {
        let before: BTreeSet<String> = capture.pod_links().into_iter().map(str::to_owned).collect();
        match routing::PodLinks::connect().await {
            Err(error) => {
                tracing::warn!(%error, "cannot look up pod links; will retry at the next check");
            }
            Ok(lookup) => {
                for pod in pods {
                    let known = capture.link_of(pod).map(str::to_owned);
                    match lookup.of(pod.ip()).await {
                        Ok(link) => {
                            if known.as_deref() != Some(link.as_str()) {
                                tracing::info!(%pod, %link, previous = ?known, "pod link found");
                            }
                            capture.set_link(pod, Some(link));
                        }
                        // The kernel did not answer: what was known stays.
                        Err(routing::PodLinkError::Routing(error)) => {
                            tracing::warn!(%pod, %error, "cannot look up the pod's link; will retry");
                        }
                        Err(error) => {
                            if announce || known.is_some() {
                                tracing::info!(%pod, reason = %error, previous = ?known,
                                    "pod's link not known; looked up again at the next check");
                            } else {
                                tracing::debug!(%pod, reason = %error, "pod's link still not known");
                            }
                            capture.set_link(pod, None);
                        }
                    }
                }
            }
        }
        let after: BTreeSet<String> = capture.pod_links().into_iter().map(str::to_owned).collect();
        self.publish_links(capture);
        (
            after.difference(&before).cloned().collect(),
            before.difference(&after).cloned().collect(),
        )
    }

    /// Makes `capture`'s pod links what [`Redirect::pod_links`] shows.
    fn publish_links(&self, capture: &Capture) {
        *self.links.lock().unwrap_or_else(PoisonError::into_inner) = PodLinkState {
            links: capture.pod_links().into_iter().map(str::to_owned).collect(),
            pods_without_link: capture
                .pods_without_link()
                .iter()
                .map(ToString::to_string)
                .collect(),
        };
    }

    /// The pod links as last looked up.
    pub fn pod_links(&self) -> PodLinkState {
        self.links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The interfaces only known local pods may use (`--pod-interfaces`).
    pub fn pod_interfaces(&self) -> &PodInterfaces {
        &self.pod_interfaces
    }

    /// Packets capture dropped because no listener took them (no agent, no listener of their
    /// family) or because they were bound for an unknown pod on a pod interface, since weft's
    /// table was installed on this node (earlier agents' counts, and what was dropped while no
    /// agent ran, included), as of the last check.
    pub fn uncaptured_dropped(&self) -> u64 {
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total(UNCAPTURED)
    }

    /// Packets the antispoof chain has dropped (a local pod's address from elsewhere, a
    /// source not routed back through the pod link it came in by, an unknown pod on a pod
    /// interface) since weft's table was installed on this node, as of the last check.
    pub fn spoofed_dropped(&self) -> u64 {
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total(SPOOFED)
    }

    async fn apply_locked(&self, capture: &Capture) -> Result<(), RedirectError> {
        // What the table counted until now, a previous agent's table among them (drops while
        // no agent ran), is kept: read it last thing before it is replaced.
        match self.nft.list_table(FAMILY, TABLE).await {
            Ok(Some(json)) => self.read_drops(&json),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot read the drop counters of the table it replaces")
            }
        }
        self.nft
            .apply(&ruleset::install(capture))
            .await
            .map_err(|source| RedirectError::Nft {
                action: format!("installing table {FAMILY} {TABLE}"),
                source,
            })?;
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replaced();
        self.captured
            .store(capture.mode == Mode::Captured, Ordering::Relaxed);
        // After the table: until the routes are there, a marked packet is not forwarded
        // either (the kernel drops forwarded packets TPROXY gave a socket).
        routing::install().await?;
        tracing::info!(
            table = TABLE,
            mode = %capture.mode,
            pods = capture.pods.len(),
            outbound = capture.ports.outbound,
            inbound = capture.ports.inbound,
            hbone = capture.ports.hbone,
            mark = capture.mark,
            ingress_isolated = capture.packets().isolated(Way::Ingress).len(),
            egress_isolated = capture.packets().isolated(Way::Egress).len(),
            "capture installed"
        );
        Ok(())
    }

    /// Makes `policy` the packet layer, applying only what changed (elements added and
    /// deleted in one transaction) once the table is installed; before, it is kept for the
    /// install.
    pub async fn set_packets(&self, policy: &PacketPolicy) -> Result<(), RedirectError> {
        let next = Packets::new(policy);
        let mut capture = self.capture.lock().await;
        let Some(batch) = capture.packets().changes(&next) else {
            return Ok(());
        };
        // Kept even if nft fails: a later check sees the difference and the watch restores it.
        let next = Arc::new(next);
        capture.set_packets(next.clone());
        *self.packets.lock().unwrap_or_else(PoisonError::into_inner) = next;
        // Until capture is installed (the hold has no packet layer), its install carries it.
        if !self.captured.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.nft
            .apply(&batch)
            .await
            .map_err(|source| RedirectError::Nft {
                action: format!("updating the packet layer of table {FAMILY} {TABLE}"),
                source,
            })?;
        let packets = capture.packets();
        tracing::info!(
            ingress_isolated = packets.isolated(Way::Ingress).len(),
            egress_isolated = packets.isolated(Way::Egress).len(),
            ingress_allowed = packets.allowed(Way::Ingress).len(),
            egress_allowed = packets.allowed(Way::Egress).len(),
            "packet layer updated"
        );
        Ok(())
    }

    /// The packet layer as it should be installed now.
    pub fn packets(&self) -> Arc<Packets> {
        self.packets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Packets the packet layer has dropped in `way` since weft's table was installed on this
    /// node, as of the last check ([`Redirect::check`], which [`Redirect::watch`] runs).
    pub fn packets_dropped(&self, way: Way) -> u64 {
        self.dropped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total(way as usize)
    }

    /// Makes `pods` the local pods and installs the table in mode [`Mode::Captured`] for them,
    /// replacing whatever it held (the hold among them), in one transaction.
    pub async fn install(
        &self,
        pods: impl IntoIterator<Item = PodAddr>,
    ) -> Result<(), RedirectError> {
        let mut capture = self.capture.lock().await;
        capture.pods = pods.into_iter().collect();
        let Capture { pods, links, .. } = &mut *capture;
        links.retain(|pod, _| pods.contains(pod));
        capture.mode = Mode::Captured;
        let pods: Vec<_> = capture.pods.iter().copied().collect();
        self.look_up_links(&mut capture, pods, true).await;
        self.apply_locked(&capture).await
    }

    /// Installs the table in mode [`Mode::Hold`], replacing whatever it held, in one
    /// transaction: until [`Redirect::install`], every connection the node forwards is refused.
    pub async fn hold(&self) -> Result<(), RedirectError> {
        let mut capture = self.capture.lock().await;
        capture.mode = Mode::Hold;
        self.apply_locked(&capture).await
    }

    /// The capture as it should be now.
    pub async fn capture(&self) -> Capture {
        self.capture.lock().await.clone()
    }

    /// Adds a local pod's address to weft's sets, and its link to the pod links if it is a
    /// new one (the rules stay as they are).
    pub async fn add_pod(&self, pod: PodAddr) -> Result<(), RedirectError> {
        let mut capture = self.capture.lock().await;
        // A held table has no pod sets: the next install brings them.
        if !capture.insert(pod) || capture.mode == Mode::Hold {
            return Ok(());
        }
        let (added, _) = self.look_up_links(&mut capture, [pod], true).await;
        let added: Vec<&str> = added.iter().map(String::as_str).collect();
        // The pod stays in the desired state even if nft fails: a later check sees the
        // difference and the watch restores it.
        self.nft
            .apply(&ruleset::elements(true, pod, &added))
            .await
            .map_err(|source| RedirectError::Nft {
                action: format!("adding pod {pod} to table {FAMILY} {TABLE}"),
                source,
            })?;
        tracing::debug!(%pod, "pod captured");
        Ok(())
    }

    /// Removes a local pod's address from weft's sets, and its link from the pod links if no
    /// other pod is routed through it (the rules stay as they are).
    pub async fn remove_pod(&self, pod: PodAddr) -> Result<(), RedirectError> {
        let mut capture = self.capture.lock().await;
        let before: BTreeSet<String> = capture.pod_links().into_iter().map(str::to_owned).collect();
        if !capture.remove(pod) {
            return Ok(());
        }
        self.publish_links(&capture);
        if capture.mode == Mode::Hold {
            return Ok(());
        }
        let after = capture.pod_links();
        let removed: Vec<&str> = before
            .iter()
            .map(String::as_str)
            .filter(|link| !after.contains(link))
            .collect();
        self.nft
            .apply(&ruleset::elements(false, pod, &removed))
            .await
            .map_err(|source| RedirectError::Nft {
                action: format!("removing pod {pod} from table {FAMILY} {TABLE}"),
                source,
            })?;
        tracing::debug!(%pod, "pod no longer captured");
        Ok(())
    }

    /// Looks up the local pods' links again (bringing the pod links up to date), then reads
    /// weft's table back and says whether it is as the capture says.
    pub async fn check(&self) -> Result<TableState, RedirectError> {
        let mut capture = self.capture.lock().await;
        self.check_locked(&mut capture).await
    }

    async fn check_locked(&self, capture: &mut Capture) -> Result<TableState, RedirectError> {
        // Every pod, not only those without a link: a pod's interface can be made anew (its
        // sandbox restarted) without the pod leaving the view.
        if self.captured.load(Ordering::Relaxed) {
            let pods: Vec<_> = capture.pods.iter().copied().collect();
            let (added, removed) = self.look_up_links(capture, pods, false).await;
            let added: Vec<&str> = added.iter().map(String::as_str).collect();
            let removed: Vec<&str> = removed.iter().map(String::as_str).collect();
            if let Some(batch) = ruleset::link_changes(&added, &removed) {
                match self.nft.apply(&batch).await {
                    Ok(()) => tracing::info!(?added, ?removed, "pod links updated"),
                    // The comparison below finds the difference and the watch restores it.
                    Err(error) => tracing::warn!(%error, "cannot update the pod links"),
                }
            }
        }
        let listing =
            self.nft
                .list_table(FAMILY, TABLE)
                .await
                .map_err(|source| RedirectError::Nft {
                    action: format!("listing table {FAMILY} {TABLE}"),
                    source,
                })?;
        let missing = routing::missing().await?;
        let Some(json) = listing else {
            return Ok(TableState::Missing);
        };
        self.read_drops(&json);
        let table = ruleset::compare(capture, &json);
        Ok(if missing.is_empty() {
            table
        } else {
            let mut drifts = match table {
                TableState::Drifted(drifts) => drifts,
                _ => Vec::new(),
            };
            drifts.push(Drift::Routing { missing });
            TableState::Drifted(drifts)
        })
    }

    /// Takes a reading of the drop counters of the table `json` lists (none from a table
    /// without them: a hold, or another version's).
    fn read_drops(&self, json: &str) {
        if let (Some([ingress, egress]), Some([spoofed, uncaptured])) =
            (packets::dropped(json), ruleset::capture_drops(json))
        {
            self.dropped
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read([ingress, egress, spoofed, uncaptured]);
        }
    }

    /// Removes weft's table and its policy routing, and so all of weft's capture; other
    /// tables, rules and routes are left alone.
    pub async fn cleanup(&self) -> Result<(), RedirectError> {
        let _serialised = self.capture.lock().await;
        self.nft
            .apply(&ruleset::remove())
            .await
            .map_err(|source| RedirectError::Nft {
                action: format!("removing table {FAMILY} {TABLE}"),
                source,
            })?;
        routing::remove().await?;
        tracing::info!(table = TABLE, "capture removed");
        Ok(())
    }

    /// Checks weft's table every `interval` and reinstalls it when another program changed it,
    /// until `shutdown` resolves.
    pub async fn watch(&self, interval: Duration, shutdown: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            let mut capture = self.capture.lock().await;
            let state = match self.check_locked(&mut capture).await {
                Ok(TableState::Intact) => continue,
                Ok(state) => state,
                Err(error) => {
                    tracing::warn!(%error, table = TABLE, "cannot check capture; will retry");
                    continue;
                }
            };
            tracing::warn!(%state, table = TABLE, "capture changed by another program; restoring");
            match self.apply_locked(&capture).await {
                Ok(()) => {
                    let restores = self.restores.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(restores, table = TABLE, "capture restored");
                }
                Err(error) => tracing::error!(%error, table = TABLE, "cannot restore capture"),
            }
        }
    }

    /// How many times [`Redirect::watch`] has restored weft's table.
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_interface_patterns_are_interface_names_or_prefixes() {
        let good = PodInterfaces::new(&["cali*", "cni0", "lxc*", "veth.1_a-b", "fifteen-letters"])
            .expect("good patterns");
        assert_eq!(good.patterns().len(), 5);
        for (bad, why) in [
            ("", "names no interface"),
            ("*", "names no interface"),
            ("sixteen-letters-*", "too long"),
            ("sixteen-letters-", "too long"),
            ("cali/0", "a character"),
            ("ca*li", "a character"),
            ("eth 0", "a character"),
            ("\"x\"", "a character"),
            ("{a,b}", "a character"),
        ] {
            let e = PodInterfaces::new(&["cali*", bad]).expect_err(bad);
            let text = e.to_string();
            assert!(
                text.contains(&format!("{bad:?}")) && text.contains(why),
                "{text}"
            );
        }
    }

    #[test]
    fn ports_must_be_distinct_and_non_zero() {
        for ports in [
            Ports {
                outbound: 0,
                ..Ports::default()
            },
            Ports {
                inbound: DEFAULT_OUTBOUND_PORT,
                ..Ports::default()
            },
            Ports {
                hbone: DEFAULT_INBOUND_PORT,
                ..Ports::default()
            },
            Ports {
                hbone: DEFAULT_OUTBOUND_PORT,
                ..Ports::default()
            },
        ] {
            let error = Capture::new(ports, WEFT_MARK).expect_err("a bad port set");
            assert!(matches!(error, RedirectError::Ports { .. }), "{ports:?}");
        }
        assert!(Capture::new(Ports::default(), WEFT_MARK).is_ok());
    }

    #[test]
    fn mark_zero_is_refused() {
        assert!(matches!(
            Capture::new(Ports::default(), 0),
            Err(RedirectError::ZeroMark)
        ));
    }

    #[test]
    fn a_mark_the_policy_routing_takes_for_capture_s_is_refused() {
        for mark in [routing::TPROXY_MARK, 0x4000 | routing::TPROXY_MARK] {
            let error = Capture::new(Ports::default(), mark).expect_err("a clashing mark");
            assert!(
                matches!(error, RedirectError::MarkClash { .. }),
                "{mark:#x}"
            );
            assert!(error.to_string().contains("0x111/0xfff"), "{error}");
        }
        assert!(Capture::new(Ports::default(), 0x112).is_ok());
    }

    #[test]
    fn pod_addresses_are_unicast_and_not_the_node_own() {
        for bad in [
            "127.0.0.1",
            "::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:10.1.0.5",
        ] {
            let error = bad.parse::<PodAddr>().expect_err(bad);
            assert!(
                matches!(error, RedirectError::NotAPodAddress { .. }),
                "{bad}: {error}"
            );
        }
        let error = "10.1.0.256".parse::<PodAddr>().expect_err("not an address");
        assert_eq!(
            error.to_string(),
            r#"pod address "10.1.0.256" is not an IP address"#
        );
        for good in ["10.1.0.5", "fd00::5", "2001:db8::1"] {
            assert_eq!(good.parse::<PodAddr>().expect(good).to_string(), good);
        }
    }
}
