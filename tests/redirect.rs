//! weft's nftables capture in real network namespaces: a "node" namespace with a "pod" behind
//! one veth pair and a "peer" (another host) behind another; rules are applied in the node.
//! The pod's link is Calico's shape: the node side has no IPv4 address and answers for the
//! pod's link-local gateway by proxy ARP, so capture works only as TPROXY (REDIRECT drops what
//! arrives there, as the control test shows).

mod netns;

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

use netns::{NODE, Netns, PEER, POD, POD6, link, topology};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn, connect, setsockopt, socket, sockopt,
};
use serde_json::Value;
use weft::redirect::routing::ROUTE_TABLE;
use weft::redirect::{
    Capture, Nft, NftError, PodAddr, PodInterfaces, Ports, Redirect, RedirectError, TableState,
    WEFT_MARK, transparent_listener,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs each of `commands` with `nft` in `ns` (tables of the test's own, beside weft's).
fn nft(ns: &Netns, commands: &[&str]) {
    for command in commands {
        ns.exec_ok(&["nft", command]);
    }
}

/// Asserts that weft's table in `node` is as `redirect` wants it.
fn assert_intact(node: &Netns, redirect: &Redirect) {
    assert_eq!(
        node.block_on(redirect.check()).expect("check"),
        TableState::Intact
    );
}

fn pod(text: &str) -> PodAddr {
    text.parse().expect("a pod address")
}

/// A capture with the default ports and mark and the given pods.
fn redirect(nft: Nft, pods: &[&str]) -> Redirect {
    let mut capture = Capture::new(Ports::default(), WEFT_MARK).expect("default capture");
    for text in pods {
        capture.insert(pod(text));
    }
    Redirect::new(nft, capture)
}

fn bind(ns: &Netns, addr: &str) -> TcpListener {
    ns.run(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"))
}

fn dial(ns: &Netns, addr: SocketAddr) -> TcpStream {
    ns.run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        .unwrap_or_else(|e| panic!("connect to {addr} from {}: {e}", ns.name()))
}

/// The connection waiting on `listener`, if there is one right now.
fn pending(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    listener.set_nonblocking(true).expect("nonblocking");
    match listener.accept() {
        Ok(accepted) => Some(accepted),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("accept: {e}"),
    }
}

/// A listener for captured connections, as the agent opens them (transparent, marked).
fn capture_listener(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("an address");
    ns.run(|| transparent_listener(addr, WEFT_MARK))
        .unwrap_or_else(|e| panic!("listen on {addr}: {e}"))
}

/// The destination a captured connection was made to: TPROXY keeps it as the local address.
fn original(stream: &TcpStream) -> SocketAddr {
    stream.local_addr().expect("a local address")
}

/// `ip [-6] rule` and `ip [-6] route show table all` in `ns`, as text.
fn routing(ns: &Netns) -> String {
    [
        &["ip", "rule"][..],
        &["ip", "-6", "rule"],
        &["ip", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
    ]
    .iter()
    .map(|command| ns.exec_ok(command))
    .collect()
}

/// weft's table as nft lists it, without the kernel's handles (new on every install).
fn listing(node: &Netns) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("handle");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut json: Value =
        serde_json::from_str(&node.exec_ok(&["nft", "-j", "list", "table", "inet", "weft"]))
            .expect("nft's JSON");
    strip(&mut json);
    json
}

/// The handles of weft's chains and rules: unchanged as long as the rules were not rewritten.
fn rule_handles(node: &Netns) -> Vec<(String, u64)> {
    let json: Value =
        serde_json::from_str(&node.exec_ok(&["nft", "-j", "list", "table", "inet", "weft"]))
            .expect("nft's JSON");
    json["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|object| {
            let (kind, body) = object.as_object()?.iter().next()?;
            (kind == "chain" || kind == "rule")
                .then(|| (kind.clone(), body["handle"].as_u64().expect("a handle")))
        })
        .collect()
}

fn set_elements(node: &Netns, set: &str) -> Vec<String> {
    let json: Value =
        serde_json::from_str(&node.exec_ok(&["nft", "-j", "list", "set", "inet", "weft", set]))
            .expect("nft's JSON");
    json["nftables"][1]["set"]["elem"]
        .as_array()
        .map(|elems| {
            elems
                .iter()
                .map(|e| e.as_str().expect("an address").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn outbound_connections_of_local_pods_reach_the_outbound_listener_with_their_destination() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD, POD6]);
    t.node.block_on(redirect.apply()).expect("apply");

    let listener = capture_listener(&t.node, "0.0.0.0:15001");
    let destination: SocketAddr = "203.0.113.7:8080".parse().expect("an address");
    let _client = dial(&t.pod, destination);
    let (accepted, from) = pending(&listener).expect("the pod's connection on 15001");
    assert_eq!(from.ip(), POD.parse::<IpAddr>().expect("an address"));
    assert_eq!(original(&accepted), destination);
}

#[test]
fn a_pod_sending_as_another_local_pod_is_dropped() {
    let Some(t) = topology() else { return };
    // A second pod behind its own veth; the first pod also holds its address, to send as it.
    let other = Netns::new("pod2");
    link(
        &t.node,
        "pod1",
        &["198.18.3.1/24"],
        &other,
        "eth0",
        &["198.18.3.2/24"],
    );
    t.pod.ip(&["addr", "add", "198.18.3.2/32", "dev", "eth0"]);
    let redirect = redirect(Nft::default(), &[POD, "198.18.3.2"]);
    t.node.block_on(redirect.apply()).expect("apply");
    let listener = capture_listener(&t.node, "0.0.0.0:15001");
    let destination: SocketAddr = "203.0.113.7:8080".parse().expect("an address");

    let spoofed = t.pod.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&"198.18.3.2:0".parse::<SocketAddr>().expect("addr").into())?;
        socket.connect_timeout(&destination.into(), Duration::from_millis(500))
    });
    assert!(spoofed.is_err(), "the spoofed connection got through");
    assert!(
        pending(&listener).is_none(),
        "nothing captured for the spoofer"
    );
    // Replies would go to the other pod anyway; the counter shows weft dropped the SYNs
    // before capture saw them.
    let dropped = counted(&listing(&t.node), |r| {
        r["chain"] == "antispoof" && r["comment"].as_str().is_some_and(|c| c.ends_with("(ip)"))
    });
    assert!(
        dropped > 0,
        "the spoofed SYNs were dropped by the anti-spoofing rule"
    );

    // The pod as itself is captured as before.
    let _client = dial(&t.pod, destination);
    let (_, from) = pending(&listener).expect("the pod's own connection on 15001");
    assert_eq!(from.ip(), POD.parse::<IpAddr>().expect("an address"));
}

/// The packets the antispoof rule of pod links counted in `node`.
fn pod_link_drops(node: &Netns) -> u64 {
    counted(&listing(node), |r| {
        r["chain"] == "antispoof"
            && r["comment"]
                .as_str()
                .is_some_and(|c| c.contains("pod links"))
    })
}

/// The packets counted by the rules of nft listing `json` that `keep` picks.
fn counted(json: &Value, keep: impl Fn(&Value) -> bool) -> u64 {
    json["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| o.get("rule"))
        .filter(|r| keep(r))
        .flat_map(|r| r["expr"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
        .sum()
}

/// A UDP socket bound to `addr` inside `ns`, waiting a short while for datagrams.
fn udp(ns: &Netns, addr: &str) -> UdpSocket {
    let socket = ns
        .run(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    socket
}

/// Whether a datagram sent from `from` (an address in `ns`) to `to` reaches `receiver`
/// (bound there), and from where.
fn datagram(ns: &Netns, from: &str, to: &str, receiver: &UdpSocket) -> Option<IpAddr> {
    let sender = udp(ns, from);
    sender.send_to(b"x", to).expect("send");
    let mut buf = [0u8; 16];
    receiver.recv_from(&mut buf).ok().map(|(_, peer)| peer.ip())
}

/// Sends a SYN from `from` (an address in `ns`) to `to`; the handshake never completes when
/// nothing routes the answer back, which is all these tests need.
fn syn(ns: &Netns, from: &str, to: &str) {
    let (from, to): (SocketAddr, SocketAddr) = (
        from.parse().expect("an address"),
        to.parse().expect("an address"),
    );
    let _ = ns.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&from.into())?;
        socket.connect_timeout(&to.into(), Duration::from_millis(300))
    });
}

/// `nft list table inet observe`'s counters in `ns`, by rule comment.
fn observed(ns: &Netns, comment: &str) -> u64 {
    let json: Value =
        serde_json::from_str(&ns.exec_ok(&["nft", "-j", "list", "table", "inet", "observe"]))
            .expect("nft's JSON");
    counted(&json, |r| r["comment"] == comment)
}

#[test]
fn a_pod_sending_from_a_made_up_source_is_dropped_and_counted_and_uplinks_are_not_judged() {
    let Some(t) = topology() else { return };
    const MADE_UP: &str = "203.0.113.7";
    const MADE_UP6: &str = "2001:db8::7";
    // The pod holds an address no pod has (as if it had NET_ADMIN) and binds to it.
    t.pod.ip(&["addr", "add", "203.0.113.7/32", "dev", "eth0"]);
    t.pod
        .ip(&["addr", "add", "2001:db8::7/128", "dev", "eth0", "nodad"]);
    // The peer counts the made-up source's SYNs: the handshake cannot complete (nothing
    // routes the answer back to that address), so only a counter sees whether they arrived.
    nft(
        &t.peer,
        &[
            "add table inet observe",
            "add chain inet observe input { type filter hook input priority 0; policy accept; }",
            r#"add rule inet observe input ip saddr 203.0.113.7 tcp dport 8080 counter comment "syn""#,
        ],
    );
    // An asymmetric uplink: the node routes 10.99.0.0/24 through another interface, so what
    // the peer sends from 10.99.0.1 fails a strict check on peer0. The kernel's own reverse
    // path filter is off, so that only weft judges.
    // (A veth pair with both ends in the node: this kernel may lack the dummy driver.)
    t.node.ip(&[
        "link", "add", "side0", "type", "veth", "peer", "name", "side1",
    ]);
    t.node.ip(&["link", "set", "side0", "up"]);
    t.node.ip(&["route", "add", "10.99.0.0/24", "dev", "side0"]);
    for conf in ["all", "default", "peer0", "pod0"] {
        t.node
            .sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0");
    }
    t.peer.ip(&["addr", "add", "10.99.0.1/32", "dev", "eth0"]);

    let at_peer = udp(&t.peer, "198.18.2.2:9000");
    let at_node6 = udp(&t.node, "[fd18:1::1]:9000");
    let at_pod = udp(&t.pod, "0.0.0.0:9001");
    let peer = "198.18.2.2:8080";

    // Whether the made-up source gets through: a SYN to the peer, a datagram to the peer
    // and an IPv6 datagram to the node.
    let made_up_passes = || {
        let syns = observed(&t.peer, "syn");
        syn(&t.pod, &format!("{MADE_UP}:0"), peer);
        let to_peer = datagram(&t.pod, &format!("{MADE_UP}:0"), "198.18.2.2:9000", &at_peer);
        let to_node = datagram(
            &t.pod,
            &format!("[{MADE_UP6}]:0"),
            "[fd18:1::1]:9000",
            &at_node6,
        );
        (
            observed(&t.peer, "syn") > syns,
            to_peer.is_some(),
            to_node.is_some(),
        )
    };
    // Control: without weft's table the made-up source gets through, TCP and UDP.
    assert_eq!(made_up_passes(), (true, true, true));

    let redirect = redirect(Nft::default(), &[POD, POD6]);
    t.node.block_on(redirect.apply()).expect("apply");
    assert_eq!(
        redirect.pod_links().links,
        ["pod0"],
        "both pods route through pod0"
    );
    assert!(redirect.pod_links().pods_without_link.is_empty());
    assert_eq!(set_elements(&t.node, "pod_links"), ["pod0"]);

    // The made-up source is dropped at the node and counted: TCP, UDP and IPv6.
    assert_eq!(made_up_passes(), (false, false, false));
    let drops = pod_link_drops(&t.node);
    assert!(drops >= 3, "the SYN and both datagrams counted: {drops}");
    assert_intact(&t.node, &redirect);
    assert!(
        redirect.spoofed_dropped() >= drops,
        "what /config_dump shows"
    );

    // The pod's own sources pass: UDP in both families, TCP captured as the pod's.
    assert_eq!(
        datagram(&t.pod, &format!("{POD}:0"), "198.18.2.2:9000", &at_peer),
        Some(POD.parse().expect("an address"))
    );
    let own6 = datagram(
        &t.pod,
        &format!("[{POD6}]:0"),
        "[fd18:1::1]:9000",
        &at_node6,
    );
    assert_eq!(own6, Some(POD6.parse().expect("an address")));
    let listener = capture_listener(&t.node, "0.0.0.0:15001");
    let _client = dial(&t.pod, peer.parse().expect("an address"));
    let (_, from) = pending(&listener).expect("the pod's own connection on 15001");
    assert_eq!(from.ip(), POD.parse::<IpAddr>().expect("an address"));

    // The uplink is not judged: the peer's asymmetric source reaches the pod.
    assert_eq!(
        datagram(&t.peer, "10.99.0.1:0", "198.18.1.2:9001", &at_pod),
        Some("10.99.0.1".parse().expect("an address"))
    );
    assert_eq!(pod_link_drops(&t.node), drops, "nothing more dropped");
    // Control: the source really is asymmetric; were peer0 a pod link, it would be dropped.
    t.node
        .exec_ok(&["nft", "add element inet weft pod_links { peer0 }"]);
    assert_eq!(
        datagram(&t.peer, "10.99.0.1:0", "198.18.1.2:9001", &at_pod),
        None
    );
    assert!(pod_link_drops(&t.node) > drops);
}

#[test]
fn a_pod_s_link_local_ipv6_address_carries_icmpv6_only() {
    let Some(t) = topology() else { return };
    t.node
        .ip(&["addr", "add", "fe80::1/64", "dev", "pod0", "nodad"]);
    t.pod
        .ip(&["addr", "add", "fe80::2/64", "dev", "eth0", "nodad"]);
    let eth0 = t
        .pod
        .run(|| nix::net::if_::if_nametoindex("eth0"))
        .expect("the pod's eth0");
    let link_local = |ip: &str, port: u16| {
        SocketAddr::V6(SocketAddrV6::new(
            ip.parse().expect("an address"),
            port,
            0,
            eth0,
        ))
    };
    // The node's own services (the kubelet's place), on every address of the node.
    let service = bind(&t.node, "[::]:9100");
    let at_node = udp(&t.node, "[::]:9101");
    let reaches = || {
        let tcp = t
            .pod
            .run(|| TcpStream::connect_timeout(&link_local("fe80::1", 9100), CONNECT_TIMEOUT))
            .is_ok();
        let sender = t
            .pod
            .run(|| UdpSocket::bind(link_local("fe80::2", 0)))
            .expect("a link-local sender");
        sender
            .send_to(b"x", link_local("fe80::1", 9101))
            .expect("send");
        let mut buf = [0u8; 4];
        (tcp, at_node.recv_from(&mut buf).is_ok())
    };
    // Control: without weft's table the pod reaches them from its link-local address.
    assert_eq!(reaches(), (true, true));
    assert!(pending(&service).is_some(), "the control's connection");

    let redirect = redirect(Nft::default(), &[POD, POD6]);
    t.node.block_on(redirect.apply()).expect("apply");
    let drops = pod_link_drops(&t.node);
    assert_eq!(reaches(), (false, false), "TCP and UDP from link-local");
    assert!(pod_link_drops(&t.node) > drops, "counted as spoofed");
    // Neighbour discovery still works: with both caches flushed, the pod's own IPv6 address
    // reaches the node.
    t.pod.ip(&["-6", "neigh", "flush", "dev", "eth0"]);
    t.node.ip(&["-6", "neigh", "flush", "dev", "pod0"]);
    assert_eq!(
        datagram(&t.pod, &format!("[{POD6}]:0"), "[fd18:1::1]:9101", &at_node),
        Some(POD6.parse().expect("an address"))
    );
}

#[test]
fn a_pod_weft_does_not_know_yet_on_a_pod_interface_sends_and_receives_nothing() {
    let Some(t) = topology() else { return };
    let at_peer = udp(&t.peer, "198.18.2.2:9000");
    let at_pod = udp(&t.pod, "0.0.0.0:9001");
    let at_pod6 = udp(&t.pod, "[::]:9002");
    let at_node6 = udp(&t.node, "[fd18:1::1]:9003");
    // The node's own service and the pod's: the kubelet's probe of the pod.
    let probed = bind(&t.pod, &format!("{POD}:8080"));
    let traffic = || {
        let out = datagram(&t.pod, &format!("{POD}:0"), "198.18.2.2:9000", &at_peer).is_some();
        let back = datagram(&t.peer, "198.18.2.2:0", "198.18.1.2:9001", &at_pod).is_some();
        let six = datagram(
            &t.pod,
            &format!("[{POD6}]:0"),
            "[fd18:1::1]:9003",
            &at_node6,
        );
        let to_six = datagram(
            &t.node,
            "[fd18:1::1]:0",
            &format!("[{POD6}]:9002"),
            &at_pod6,
        );
        let probe = t
            .node
            .run(|| {
                TcpStream::connect_timeout(
                    &format!("{POD}:8080").parse().expect("an address"),
                    CONNECT_TIMEOUT,
                )
            })
            .is_ok();
        (out, back, six.is_some(), to_six.is_some(), probe)
    };
    // The pod is not yet among the capture's pods: without pod interfaces its traffic passes.
    let mut capture = Capture::new(Ports::default(), WEFT_MARK).expect("default capture");
    let plain = Redirect::new(Nft::default(), capture.clone());
    t.node.block_on(plain.apply()).expect("apply");
    assert_eq!(traffic(), (true, true, true, true, true), "control");
    assert!(pending(&probed).is_some());

    // With the pod's interface named, nothing but its answers to the node: dropped both
    // ways, IPv4 and IPv6, and counted with the spoofed sources.
    capture = capture.with_pod_interfaces(PodInterfaces::new(&["pod*"]).expect("a pattern"));
    let guarded = Redirect::new(Nft::default(), capture.clone());
    t.node.block_on(guarded.apply()).expect("apply");
    let drops = t
        .node
        .block_on(guarded.check())
        .map(|_| guarded.spoofed_dropped());
    assert_eq!(
        traffic(),
        (false, false, false, true, true),
        "an unknown pod: the node's own traffic to it (the last two) passes, as upstream requires"
    );
    assert!(pending(&probed).is_some(), "the node's probe answered");
    t.node.block_on(guarded.check()).expect("check");
    assert!(guarded.spoofed_dropped() > drops.expect("check"), "counted");
    assert!(
        guarded.uncaptured_dropped() > 0,
        "the peer's datagram to it, counted"
    );
    assert_intact(&t.node, &guarded);

    // Once weft knows the pod, its traffic flows again (UDP as before, TCP captured), to the
    // node's own address on the pod's interface too (no pod's, yet not dropped).
    capture.insert(pod(POD));
    capture.insert(pod(POD6));
    let known = Redirect::new(Nft::default(), capture);
    t.node.block_on(known.apply()).expect("apply");
    let (out, back, six, to_six, _) = traffic();
    assert_eq!(
        (out, back, six, to_six),
        (true, true, true, true),
        "a known pod"
    );
}

#[test]
fn outbound_ipv6_connections_of_local_pods_reach_the_outbound_listener() {
    // A topology of its own: a dual-stack listener on [::]:15001 would clash with the IPv4 one.
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD, POD6]);
    t.node.block_on(redirect.apply()).expect("apply");

    let listener = capture_listener(&t.node, "[::]:15001");
    let destination: SocketAddr = "[2001:db8::7]:8080".parse().expect("an address");
    let _client = dial(&t.pod, destination);
    let (accepted, from) = pending(&listener).expect("the pod's IPv6 connection on 15001");
    assert_eq!(from.ip(), POD6.parse::<IpAddr>().expect("an address"));
    assert_eq!(original(&accepted), destination);
}

#[test]
fn plaintext_to_a_local_pod_lands_on_the_inbound_listener_and_tunnels_on_hbone() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");

    let inbound = capture_listener(&t.node, "0.0.0.0:15006");
    let hbone = capture_listener(&t.node, "0.0.0.0:15008");
    let destination: SocketAddr = format!("{POD}:8080").parse().expect("an address");
    let _client = dial(&t.peer, destination);
    let (accepted, from) = pending(&inbound).expect("the peer's connection on 15006");
    assert_eq!(from.ip(), PEER.parse::<IpAddr>().expect("an address"));
    assert_eq!(original(&accepted), destination);

    // A tunnel's outer connection names the pod and port 15008: the node's HBONE listener
    // takes it, and the pod's own port 15008 is never reachable around weft.
    let pod_hbone = bind(&t.pod, &format!("{POD}:15008"));
    let tunnel: SocketAddr = format!("{POD}:15008").parse().expect("an address");
    let _tunnel = dial(&t.peer, tunnel);
    let (accepted, _) = pending(&hbone).expect("the tunnel on the node's 15008");
    assert_eq!(original(&accepted), tunnel);
    assert!(
        pending(&pod_hbone).is_none(),
        "port 15008 of the pod was not reached"
    );
    assert!(pending(&inbound).is_none(), "port 15008 is not plaintext");
}

/// The control for TPROXY: on this topology's pod link, a REDIRECT like weft's former capture
/// loses what the pod sends (the kernel redirects to the incoming interface's first IPv4
/// address, and there is none); the same rule takes it once the node side has an address.
#[test]
fn redirect_cannot_capture_on_a_link_without_an_address() {
    let Some(t) = topology() else { return };
    nft(
        &t.node,
        &[
            "add table ip control",
            "add chain ip control prerouting { type nat hook prerouting priority -100; }",
            "add rule ip control prerouting ip saddr 198.18.1.2 tcp dport 8080 redirect to :15001",
        ],
    );
    let listener = bind(&t.node, "0.0.0.0:15001");
    let destination: SocketAddr = "203.0.113.7:8080".parse().expect("an address");
    let attempt = t
        .pod
        .run(|| TcpStream::connect_timeout(&destination, Duration::from_millis(500)));
    assert!(attempt.is_err(), "REDIRECT took it: {attempt:?}");
    assert!(pending(&listener).is_none(), "nothing reached the listener");

    t.node.ip(&["addr", "add", "198.18.1.1/32", "dev", "pod0"]);
    let _client = dial(&t.pod, destination);
    assert!(
        pending(&listener).is_some(),
        "with an address, REDIRECT takes it"
    );
}

#[test]
fn weft_marked_sockets_are_not_captured() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");
    let hbone = capture_listener(&t.node, "0.0.0.0:15008");
    let inbound = capture_listener(&t.node, "0.0.0.0:15006");
    let pod_hbone = bind(&t.pod, &format!("{POD}:15008"));
    let service = bind(&t.pod, &format!("{POD}:8080"));
    let destination = SockaddrIn::new(198, 18, 1, 2, 15008);

    let marked = t.node.run(|| {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )?;
        setsockopt(&fd, sockopt::Mark, &WEFT_MARK)?;
        connect(fd.as_raw_fd(), &destination)?;
        Ok::<_, nix::Error>(TcpStream::from(fd))
    });
    let _marked = marked.expect("a marked connection from the node");
    assert!(
        pending(&pod_hbone).is_some(),
        "the marked socket reached the pod"
    );
    assert!(
        pending(&hbone).is_none(),
        "the marked socket was not captured"
    );

    // The same connection without the mark is a tunnel between two pods of this node.
    let _unmarked = dial(&t.node, format!("{POD}:15008").parse().expect("an address"));
    assert!(
        pending(&hbone).is_some(),
        "the unmarked tunnel was captured"
    );
    assert!(pending(&pod_hbone).is_none());

    // The node's own plaintext to its pods (kubelet probes) is always allowed: not captured.
    let _probe = dial(&t.node, format!("{POD}:8080").parse().expect("an address"));
    assert!(pending(&service).is_some(), "the node reached its pod");
    assert!(pending(&inbound).is_none());
}

/// Issue 5 §1: before the agent knows its pods, the hold sends every TCP connection the node
/// forwards (either way, whichever pod) to the outbound listener and drops the rest of what it
/// would forward; the node's own traffic to its pods and traffic to the node itself pass.
/// Capture of the pods then replaces it.
#[test]
fn the_hold_takes_every_forwarded_connection_until_capture_replaces_it() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[]);
    t.node.block_on(redirect.hold()).expect("hold");
    let outbound = capture_listener(&t.node, "0.0.0.0:15001");
    let peer_service = bind(&t.peer, &format!("{PEER}:8080"));
    let pod_service = bind(&t.pod, &format!("{POD}:8080"));
    let node_service = bind(&t.node, &format!("{NODE}:9090"));

    for (from, to) in [(&t.pod, PEER), (&t.peer, POD)] {
        let to: SocketAddr = format!("{to}:8080").parse().expect("an address");
        let _client = dial(from, to);
        let (_, source) = pending(&outbound).expect("a forwarded connection on 15001");
        assert_ne!(
            source.ip(),
            NODE.parse::<IpAddr>().expect("an address"),
            "not the node's"
        );
    }
    assert!(pending(&peer_service).is_none() && pending(&pod_service).is_none());

    let datagrams = t
        .peer
        .run(|| std::net::UdpSocket::bind(format!("{PEER}:5353")))
        .expect("a UDP socket");
    datagrams
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("a timeout");
    t.pod
        .run(|| {
            std::net::UdpSocket::bind(format!("{POD}:0"))?.send_to(b"held", format!("{PEER}:5353"))
        })
        .expect("sent");
    assert!(
        datagrams.recv(&mut [0; 16]).is_err(),
        "UDP forwarded in hold"
    );

    // kubelet probes, and the node's own services.
    let _probe = dial(&t.node, format!("{POD}:8080").parse().expect("an address"));
    assert!(pending(&pod_service).is_some(), "the node reached its pod");
    let _to_node = dial(&t.pod, format!("{NODE}:9090").parse().expect("an address"));
    assert!(pending(&node_service).is_some(), "the pod reached the node");
    assert!(pending(&outbound).is_none());

    t.node
        .block_on(redirect.install([pod(POD)]))
        .expect("capture replaces the hold");
    assert_intact(&t.node, &redirect);
    let chains: Vec<String> = listing(&t.node)["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter_map(|o| Some(o.get("chain")?["name"].as_str()?.to_owned()))
        .collect();
    // Capture's chains, then the packet layer's; nothing of the hold's.
    assert_eq!(chains[..3], ["antispoof", "prerouting", "output"]);
    assert!(
        chains[3..].iter().all(|c| c.starts_with("packets_")),
        "{chains:?}"
    );
    let inbound = capture_listener(&t.node, "0.0.0.0:15006");
    let _client = dial(&t.peer, format!("{POD}:8080").parse().expect("an address"));
    assert!(
        pending(&inbound).is_some(),
        "plaintext to the pod is inbound now"
    );
    assert!(pending(&outbound).is_none());
}

#[test]
fn applying_twice_yields_the_same_table() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD, POD6]);
    t.node.block_on(redirect.apply()).expect("apply");
    let (first, routes) = (listing(&t.node), routing(&t.node));
    t.node.block_on(redirect.apply()).expect("apply again");
    assert_eq!(listing(&t.node), first);
    assert_eq!(routing(&t.node), routes, "no rule or route duplicated");
    let table = ROUTE_TABLE.to_string();
    for v in ["-4", "-6"] {
        let rules = t.node.exec_ok(&["ip", v, "rule"]);
        assert_eq!(
            rules
                .matches(&format!("fwmark 0x111/0xfff lookup {table}"))
                .count(),
            1,
            "{rules}"
        );
        let local = t.node.exec_ok(&["ip", v, "route", "show", "table", &table]);
        assert!(local.starts_with("local default dev lo"), "{local}");
    }
    let rules = first["nftables"]
        .as_array()
        .expect("nftables array")
        .iter()
        .filter(|o| o.get("rule").is_some())
        .count();
    assert_eq!(
        rules,
        20 + 29,
        "no rule duplicated (capture, then the packet layer)"
    );
    assert_intact(&t.node, &redirect);
}

#[test]
fn pods_coming_and_going_change_the_sets_only() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");
    let handles = rule_handles(&t.node);

    t.node
        .block_on(async {
            redirect.add_pod(pod("198.18.1.3")).await?;
            redirect.add_pod(pod("fd18:1::3")).await?;
            redirect.remove_pod(pod(POD)).await
        })
        .expect("pod updates");
    assert_eq!(set_elements(&t.node, "pods_v4"), ["198.18.1.3"]);
    assert_eq!(set_elements(&t.node, "pods_v6"), ["fd18:1::3"]);
    assert_eq!(rule_handles(&t.node), handles, "rules were not rewritten");
    assert_intact(&t.node, &redirect);

    // Removing an address that is not there, or adding one twice, changes nothing.
    t.node
        .block_on(async {
            redirect.remove_pod(pod(POD)).await?;
            redirect.add_pod(pod("198.18.1.3")).await
        })
        .expect("repeated updates");
    assert_eq!(set_elements(&t.node, "pods_v4"), ["198.18.1.3"]);
}

#[test]
fn a_pod_without_a_route_yet_gets_its_link_at_the_next_check() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");
    // A new pod's veth is there, its route not yet (CNI not done): the lookup finds the
    // default route via the peer, which is the uplink, never a pod link.
    t.node.ip(&[
        "link", "add", "pod1", "type", "veth", "peer", "name", "pod1peer",
    ]);
    for link in ["pod1", "pod1peer"] {
        t.node.ip(&["link", "set", link, "up"]);
    }
    t.node
        .block_on(redirect.add_pod(pod("198.18.5.2")))
        .expect("add pod");
    let links = redirect.pod_links();
    assert_eq!(links.links, ["pod0"]);
    assert_eq!(links.pods_without_link, ["198.18.5.2"]);
    assert_eq!(set_elements(&t.node, "pod_links"), ["pod0"]);

    t.node.ip(&["route", "add", "198.18.5.2/32", "dev", "pod1"]);
    assert_intact(&t.node, &redirect);
    assert_eq!(redirect.pod_links().links, ["pod0", "pod1"]);
    assert!(redirect.pod_links().pods_without_link.is_empty());
    assert_eq!(set_elements(&t.node, "pod_links"), ["pod0", "pod1"]);

    // Gone with its last pod.
    t.node
        .block_on(redirect.remove_pod(pod("198.18.5.2")))
        .expect("remove pod");
    assert_eq!(set_elements(&t.node, "pod_links"), ["pod0"]);
    assert_intact(&t.node, &redirect);
}

#[test]
fn cleanup_removes_weft_table_and_nothing_else() {
    let Some(t) = topology() else { return };
    nft(
        &t.node,
        &[
            "add table inet bystander",
            "add chain inet bystander input { type filter hook input priority 0; policy accept; }",
            "add rule inet bystander input tcp dport 22 counter accept",
        ],
    );
    let before = t.node.exec_ok(&["nft", "list", "ruleset"]);
    let routes_before = routing(&t.node);

    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");
    assert_ne!(routing(&t.node), routes_before, "policy routing installed");
    t.node.block_on(redirect.cleanup()).expect("cleanup");
    assert_eq!(t.node.exec_ok(&["nft", "list", "ruleset"]), before);
    assert_eq!(routing(&t.node), routes_before, "policy routing removed");
    assert_eq!(
        t.node.block_on(redirect.check()).expect("check"),
        TableState::Missing
    );
    t.node
        .block_on(redirect.cleanup())
        .expect("cleanup of nothing");
}

#[test]
fn the_watch_restores_a_table_flushed_deleted_or_added_to_and_its_routing() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    let table = ROUTE_TABLE.to_string();
    let rule_gone = |family| {
        [
            "ip",
            family,
            "rule",
            "del",
            "fwmark",
            "0x111/0xfff",
            "table",
            &table,
        ]
    };
    let (rule_v4, rule_v6) = (rule_gone("-4"), rule_gone("-6"));
    let tampering: [&[&str]; 8] = [
        &["nft", "flush table inet weft"],
        &["nft", "delete table inet weft"],
        &["nft", "add rule inet weft prerouting tcp dport 22 accept"],
        &["nft", "delete element inet weft pods_v4 { 198.18.1.2 }"],
        &["nft", "flush set inet weft pod_links"],
        &rule_v4,
        &rule_v6,
        &["ip", "route", "flush", "table", &table],
    ];
    t.node.block_on(async {
        redirect.apply().await.expect("apply");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let watch = redirect.watch(Duration::from_millis(50), async {
            let _ = stopped.await;
        });
        let tamper = async {
            for (n, command) in (1..).zip(tampering) {
                let out = tokio::process::Command::new(command[0])
                    .args(&command[1..])
                    .output()
                    .await
                    .expect("nft or ip");
                assert!(out.status.success(), "{command:?}: {out:?}");
                let restored = async {
                    while redirect.restores() < n {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(3), restored)
                    .await
                    .unwrap_or_else(|_| panic!("not restored after {command:?}"));
                assert_eq!(redirect.check().await.expect("check"), TableState::Intact);
            }
            let _ = stop.send(());
        };
        tokio::join!(watch, tamper);
    });
    assert_eq!(redirect.restores(), 8);
    assert_eq!(set_elements(&t.node, "pod_links"), ["pod0"]);
}

#[test]
fn nft_failures_carry_nft_message_and_the_pod() {
    let Some(t) = topology() else { return };
    let redirect = redirect(Nft::default(), &[POD]);
    t.node.block_on(redirect.apply()).expect("apply");
    t.node
        .exec_ok(&["nft", "delete element inet weft pods_v4 { 198.18.1.2 }"]);
    let error = t
        .node
        .block_on(redirect.remove_pod(pod(POD)))
        .expect_err("the element is gone");
    let message = error.to_string();
    assert!(message.contains(POD), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[tokio::test]
async fn a_missing_nft_is_named() {
    // The program does not exist, so nothing runs: safe in the machine's own namespace.
    let redirect = redirect(Nft::new("weft-test-no-such-nft"), &[]);
    let error = redirect.apply().await.expect_err("no nft");
    assert!(
        matches!(
            &error,
            RedirectError::Nft {
                source: NftError::NotFound { .. },
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("weft-test-no-such-nft"),
        "{error}"
    );
    assert!(error.to_string().contains("not found"), "{error}");
}

#[test]
fn bad_pod_addresses_are_refused_with_the_culprit() {
    for (text, expect) in [
        ("198.18.1.300", "198.18.1.300"),
        ("pod-a", "pod-a"),
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::ffff:198.18.1.2", "IPv4-mapped"),
    ] {
        let error = text.parse::<PodAddr>().expect_err(text).to_string();
        assert!(error.contains(expect), "{text}: {error}");
    }
}

/// On a node weft never touched, the policy routing is reported missing (rules and routes of
/// both families), not an error, though the kernel has no table to filter the dump by.
#[test]
fn routing_never_installed_is_missing_not_an_error() {
    let Some(t) = topology() else { return };
    let missing = t
        .node
        .block_on(weft::redirect::routing::missing())
        .expect("a fresh node's routing can be checked");
    assert_eq!(missing.len(), 4, "{missing:?}");
}
