//! The packet layer in real network namespaces, with real datagrams: a "node" namespace with a
//! "pod" behind one veth pair (IPv4 and IPv6) and a "peer" host behind another; weft's table
//! is applied in the node with a packet policy written out by hand (the engine's compilation
//! has its own tests), then changed.

mod netns;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use netns::{NODE, NODE6, Netns, PEER, POD, POD6, topology};
use socket2::{Domain, Socket, Type};
use weft::model::Protocol;
use weft::policy::{AddrRange, Grant, PacketPolicy, PodPackets};
use weft::redirect::{Capture, Nft, Ports, Redirect, TableState, WEFT_MARK, Way};

/// How long a datagram may take; beyond it, it was dropped.
const WAIT: Duration = Duration::from_millis(300);

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

/// weft's table for the pod, with no packet policy yet.
fn redirect() -> Redirect {
    let mut capture = Capture::new(Ports::default(), WEFT_MARK).expect("default capture");
    capture.insert(POD.parse().expect("pod address"));
    capture.insert(POD6.parse().expect("pod address"));
    Redirect::new(Nft::default(), capture)
}

/// A grant of `protocol` on `lo..=hi` from (or to) `first..=last`.
fn grant(protocol: Protocol, lo: u16, hi: u16, first: &str, last: &str) -> Grant {
    Grant {
        protocol,
        ports: (lo, hi),
        peers: AddrRange {
            first: ip(first),
            last: ip(last),
        },
    }
}

/// The pod's packet policy: `ingress` and `egress` for both its addresses (each family's
/// grants go to the address of that family).
fn policy(ingress: Option<Vec<Grant>>, egress: Option<Vec<Grant>>) -> PacketPolicy {
    let of = |grants: &Option<Vec<Grant>>, v6: bool| {
        grants.as_ref().map(|g| {
            g.iter()
                .filter(|g| g.peers.is_ipv6() == v6)
                .copied()
                .collect()
        })
    };
    let mut p = PacketPolicy::default();
    for (addr, v6) in [(POD, false), (POD6, true)] {
        p.pods.insert(
            ip(addr),
            PodPackets {
                ingress: of(&ingress, v6),
                egress: of(&egress, v6),
            },
        );
    }
    p
}

/// A UDP socket bound to `addr` inside `ns`.
fn udp(ns: &Netns, addr: &str) -> UdpSocket {
    let socket = ns
        .run(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    socket
}

/// A raw IPv4 socket of protocol 253 inside `ns` (a protocol NetworkPolicy cannot name).
fn raw(ns: &Netns) -> Socket {
    let socket = ns
        .run(|| Socket::new(Domain::IPV4, Type::RAW, Some(socket2::Protocol::from(253))))
        .expect("raw socket");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    socket
}

/// Sends `what` from `from` to `to`; the datagram `to` received, if any, and from where.
fn send(from: &UdpSocket, to: &UdpSocket, what: &str) -> Option<(String, SocketAddr)> {
    let dst = to.local_addr().expect("bound");
    from.send_to(what.as_bytes(), dst).expect("send");
    let mut buf = [0u8; 64];
    let (n, src) = to.recv_from(&mut buf).ok()?;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), src))
}

/// Whether `what` from `a` reaches `b` and `b`'s answer comes back to `a`.
fn exchange(a: &UdpSocket, b: &UdpSocket, what: &str) -> (bool, bool) {
    let Some((got, src)) = send(a, b, what) else {
        return (false, false);
    };
    assert_eq!(got, what);
    b.send_to(b"answer", src).expect("answer");
    let mut buf = [0u8; 64];
    (true, a.recv_from(&mut buf).is_ok())
}

#[test]
fn udp_to_an_isolated_pod_passes_only_as_granted_and_replies_come_back() {
    let Some(t) = topology() else { return };
    let redirect = redirect();
    let only_5300 = policy(
        Some(vec![grant(Protocol::Udp, 5300, 5300, PEER, PEER)]),
        None,
    );
    t.node
        .block_on(async {
            redirect.set_packets(&only_5300).await?;
            redirect.apply().await
        })
        .expect("installed");
    assert_eq!(
        t.node.block_on(redirect.check()).expect("check"),
        TableState::Intact
    );
    let peer = udp(&t.peer, &format!("{PEER}:4000"));
    let granted = udp(&t.pod, &format!("{POD}:5300"));
    let other = udp(&t.pod, &format!("{POD}:5301"));
    assert_eq!(exchange(&peer, &granted, "to 5300"), (true, true));
    assert_eq!(exchange(&peer, &other, "to 5301"), (false, false));
    // A protocol no policy can name (253, for experiments) reaches no isolated pod.
    let raw_pod = raw(&t.pod);
    raw(&t.peer)
        .send_to(b"raw", &SocketAddr::new(ip(POD), 0).into())
        .expect("raw send");
    let mut buf = [std::mem::MaybeUninit::new(0u8); 64];
    assert!(
        raw_pod.recv(&mut buf).is_err(),
        "protocol 253 reached an isolated pod"
    );
    // The node may always reach its pods.
    let node = udp(&t.node, &format!("{NODE}:4001"));
    assert_eq!(exchange(&node, &other, "from the node"), (true, true));
    t.node.block_on(redirect.check()).expect("check");
    assert!(
        redirect.packets_dropped(Way::Ingress) >= 2,
        "the datagram and the ping are counted: {}",
        redirect.packets_dropped(Way::Ingress)
    );
    assert_eq!(redirect.packets_dropped(Way::Egress), 0);
}

#[test]
fn a_tightened_policy_stops_a_flow_already_established_both_ways() {
    let Some(t) = topology() else { return };
    let redirect = redirect();
    let open = policy(
        Some(vec![grant(
            Protocol::Udp,
            5000,
            6000,
            "198.18.0.0",
            "198.18.255.255",
        )]),
        Some(vec![grant(Protocol::Udp, 7000, 7000, PEER, PEER)]),
    );
    t.node
        .block_on(async {
            redirect.set_packets(&open).await?;
            redirect.apply().await
        })
        .expect("installed");
    let peer = udp(&t.peer, &format!("{PEER}:7000"));
    let pod = udp(&t.pod, &format!("{POD}:5353"));
    // Two flows: peer → pod:5353 (ingress) and pod → peer:7000 (egress), replies flowing.
    assert_eq!(exchange(&peer, &pod, "in"), (true, true));
    let pod_out = udp(&t.pod, &format!("{POD}:4444"));
    assert_eq!(exchange(&pod_out, &peer, "out"), (true, true));

    // Tightened by an incremental update: another port for ingress, nothing for egress.
    let tight = policy(
        Some(vec![grant(Protocol::Udp, 6001, 6001, PEER, PEER)]),
        Some(vec![]),
    );
    let listing_before = t.node.exec_ok(&["nft", "-j", "list", "chains", "inet"]);
    t.node
        .block_on(redirect.set_packets(&tight))
        .expect("updated");
    assert_eq!(
        t.node.exec_ok(&["nft", "-j", "list", "chains", "inet"]),
        listing_before,
        "elements changed, chains untouched"
    );
    assert_eq!(
        t.node.block_on(redirect.check()).expect("check"),
        TableState::Intact
    );
    // The same sockets, whose conntrack entries are still there: nothing passes either way.
    assert_eq!(exchange(&peer, &pod, "in again"), (false, false));
    assert_eq!(exchange(&pod_out, &peer, "out again"), (false, false));
    // A reply of the ingress flow (pod → peer from 5353) is judged as that flow: dropped.
    assert!(send(&pod, &peer, "late reply").is_none());
    t.node.block_on(redirect.check()).expect("check");
    assert!(redirect.packets_dropped(Way::Ingress) >= 2);
    assert!(redirect.packets_dropped(Way::Egress) >= 1);

    // Loosened again: the same flows pass with no reconnect.
    t.node
        .block_on(redirect.set_packets(&open))
        .expect("updated");
    assert_eq!(exchange(&peer, &pod, "in once more"), (true, true));
    assert_eq!(exchange(&pod_out, &peer, "out once more"), (true, true));
}

#[test]
fn egress_to_the_node_is_judged_in_both_families_and_neighbour_discovery_works() {
    let Some(t) = topology() else { return };
    let redirect = redirect();
    let dns_only = policy(
        None,
        Some(vec![
            grant(Protocol::Udp, 53, 53, NODE, NODE),
            grant(Protocol::Udp, 53, 53, NODE6, NODE6),
        ]),
    );
    t.node
        .block_on(async {
            redirect.set_packets(&dns_only).await?;
            redirect.apply().await
        })
        .expect("installed");
    let pod = udp(&t.pod, &format!("{POD}:4000"));
    let pod6 = udp(&t.pod, &format!("[{POD6}]:4000"));
    let dns = udp(&t.node, &format!("{NODE}:53"));
    let dns6 = udp(&t.node, &format!("[{NODE6}]:53"));
    let other6 = udp(&t.node, &format!("[{NODE6}]:54"));
    assert_eq!(exchange(&pod, &dns, "v4 dns"), (true, true));
    // The IPv6 exchange needs neighbour discovery between pod and node first.
    assert_eq!(exchange(&pod6, &dns6, "v6 dns"), (true, true));
    assert_eq!(exchange(&pod6, &other6, "v6 other"), (false, false));
    // Ingress is not isolated: the peer reaches the pod on any port, and the answer is a
    // reply, which the pod's egress policy does not judge.
    let peer = udp(&t.peer, &format!("{PEER}:4000"));
    assert_eq!(exchange(&peer, &pod, "from the peer"), (true, true));
    // But the pod's own flows to the peer are egress, as are other protocols (253).
    let to_peer = udp(&t.peer, &format!("{PEER}:4001"));
    assert!(send(&pod, &to_peer, "to the peer").is_none());
    let raw_peer = raw(&t.peer);
    raw(&t.pod)
        .send_to(b"raw", &SocketAddr::new(ip(PEER), 0).into())
        .expect("raw send");
    let mut buf = [std::mem::MaybeUninit::new(0u8); 64];
    assert!(
        raw_peer.recv(&mut buf).is_err(),
        "protocol 253 left an egress-isolated pod"
    );
    t.node.block_on(redirect.check()).expect("check");
    assert_eq!(
        redirect.packets_dropped(Way::Egress),
        3,
        "v6 other, to the peer, protocol 253"
    );
}

#[test]
fn overlapping_grants_install_and_change_as_disjoint_elements() {
    let Some(t) = topology() else { return };
    let redirect = redirect();
    let first = policy(
        Some(vec![
            grant(Protocol::Udp, 5000, 5100, "198.18.0.0", "198.18.255.255"),
            grant(Protocol::Udp, 5050, 5200, "198.18.2.0", "198.18.2.255"),
            grant(Protocol::Sctp, 0, 65535, "0.0.0.0", "255.255.255.255"),
            grant(Protocol::Udp, 53, 53, "fd00::", "fdff::"),
        ]),
        None,
    );
    let second = policy(
        Some(vec![
            grant(Protocol::Udp, 5000, 5150, "198.18.0.0", "198.18.255.255"),
            grant(Protocol::Udp, 5100, 5200, "198.18.2.2", "198.18.2.2"),
        ]),
        Some(vec![grant(Protocol::Sctp, 9, 9, "fd18:1::1", "fd18:1::1")]),
    );
    t.node
        .block_on(async {
            redirect.set_packets(&first).await?;
            redirect.apply().await?;
            assert_eq!(redirect.check().await?, TableState::Intact);
            redirect.set_packets(&second).await?;
            assert_eq!(redirect.check().await?, TableState::Intact);
            redirect.set_packets(&first).await?;
            redirect.check().await
        })
        .map(|state| assert_eq!(state, TableState::Intact))
        .expect("every change applied");
    let peer = udp(&t.peer, &format!("{PEER}:4000"));
    let pod = udp(&t.pod, &format!("{POD}:5180"));
    assert_eq!(exchange(&peer, &pod, "in the second grant"), (true, true));

    // An element deleted by hand is drift, and the table comes back whole.
    let set = t.node.exec_ok(&[
        "nft",
        "-j",
        "list",
        "set",
        "inet",
        "weft",
        "packets_ingress_allowed_v4",
    ]);
    assert!(set.contains("5200"), "{set}");
    t.node.exec_ok(&[
        "nft",
        "flush",
        "set",
        "inet",
        "weft",
        "packets_ingress_allowed_v4",
    ]);
    let TableState::Drifted(drifts) = t.node.block_on(redirect.check()).expect("check") else {
        panic!("a flushed set is drift");
    };
    assert!(
        drifts[0]
            .to_string()
            .starts_with("set packets_ingress_allowed_v4 lacks"),
        "{drifts:?}"
    );
    assert!(send(&peer, &pod, "flushed").is_none());
    t.node.block_on(redirect.apply()).expect("restored");
    assert_eq!(
        t.node.block_on(redirect.check()).expect("check"),
        TableState::Intact
    );
    assert_eq!(exchange(&peer, &pod, "restored"), (true, true));
}
