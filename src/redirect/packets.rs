//! The packet layer in weft's table: NetworkPolicy for the traffic the proxy does not carry
//! (UDP, SCTP, and protocols NetworkPolicy cannot name), from the engine's
//! [`PacketPolicy`] — plain addresses, protocols and ports; nothing here knows a selector.
//!
//! Sets, per address family: the local pods isolated for ingress and for egress, and the
//! allowed `pod . l4proto . port . peer` tuples of each direction (interval sets of
//! concatenations, whose elements must not overlap: [`Packets::new`] makes them disjoint).
//! Chains on the forward hook (pod to pod, pod to elsewhere) and the input hook (pod to its
//! node):
//!
//! - TCP is accepted: the proxy captures and judges it (judging it twice would be a second
//!   policy to keep in step).
//! - ICMP errors about a tracked flow are accepted (path MTU, unreachable).
//! - Every other packet of an isolated pod's flow, in either direction, is looked up in the
//!   allowed set by the flow's own orientation (a reply by its source port): a tightened
//!   policy stops established UDP flows too, not only new ones, without touching conntrack.
//!   Replies to the node's own flows are accepted (the node may always reach its pods).
//! - What is not allowed is counted and dropped. Protocols NetworkPolicy cannot name (ICMP
//!   echo, GRE, …) are never allowed for an isolated pod: a rule with no ports admits every
//!   port of UDP, SCTP (and TCP), nothing more. Traffic from the node to its pods never
//!   reaches these chains (output hook), as upstream requires.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Prefix, Range, SetItem};
use nftables::schema::{
    Chain, Element, NfListObject, Nftables, Set, SetFlag, SetType, SetTypeValue,
};
use nftables::stmt::{Counter, Drop, JumpTarget, Operator, Return, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::TABLE;
use super::ruleset::{Drift, Family, ct, is_reply, matches, payload};
use crate::model::Protocol;
use crate::policy::{Grant, PacketPolicy};

/// The packet layer's base chains run at filter priority: after capture (dstnat) decided.
const FILTER_PRIORITY: i32 = 0;

/// The base chains: (name, hook).
const BASE_CHAINS: [(&str, NfHook); 2] = [
    ("packets_forward", NfHook::Forward),
    ("packets_input", NfHook::Input),
];

/// The regular chains: replies, and each direction's check of a flow and of its replies.
const REPLY: &str = "packets_reply";
const CHECKS: [Check; 4] = [
    Check {
        chain: "packets_ingress",
        way: Way::Ingress,
        reply: false,
    },
    Check {
        chain: "packets_egress",
        way: Way::Egress,
        reply: false,
    },
    Check {
        chain: "packets_ingress_reply",
        way: Way::Ingress,
        reply: true,
    },
    Check {
        chain: "packets_egress_reply",
        way: Way::Egress,
        reply: true,
    },
];

/// One check chain: the allowed set of `way` looked up for a flow's packets (`reply`: for its
/// replies, whose ends and ports are the other way round).
#[derive(Debug, Clone, Copy)]
struct Check {
    chain: &'static str,
    way: Way,
    reply: bool,
}

/// A direction of NetworkPolicy, seen from the local pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Way {
    /// Traffic to the pod.
    Ingress,
    /// Traffic from the pod.
    Egress,
}

impl Way {
    /// Both directions.
    pub const BOTH: [Way; 2] = [Way::Ingress, Way::Egress];

    /// `ingress` or `egress`.
    pub fn name(self) -> &'static str {
        match self {
            Way::Ingress => "ingress",
            Way::Egress => "egress",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn isolated_set(self, family: Family) -> &'static str {
        match (self, family) {
            (Way::Ingress, Family::V4) => "packets_ingress_isolated_v4",
            (Way::Ingress, Family::V6) => "packets_ingress_isolated_v6",
            (Way::Egress, Family::V4) => "packets_egress_isolated_v4",
            (Way::Egress, Family::V6) => "packets_egress_isolated_v6",
        }
    }

    fn allowed_set(self, family: Family) -> &'static str {
        match (self, family) {
            (Way::Ingress, Family::V4) => "packets_ingress_allowed_v4",
            (Way::Ingress, Family::V6) => "packets_ingress_allowed_v6",
            (Way::Egress, Family::V4) => "packets_egress_allowed_v4",
            (Way::Egress, Family::V6) => "packets_egress_allowed_v6",
        }
    }
}

impl fmt::Display for Way {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One element of an allowed set: traffic of `pod` over `protocol` whose destination port
/// is in `ports` and whose other end is in `peers` (the pod's family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allowed {
    /// The local pod.
    pub pod: IpAddr,
    /// UDP or SCTP.
    pub protocol: Protocol,
    /// First and last destination port.
    pub ports: (u16, u16),
    /// First and last address of the other end.
    pub peers: (IpAddr, IpAddr),
}

impl fmt::Display for Allowed {
    /// As nft would write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = self.ports;
        let (first, last) = self.peers;
        write!(f, "{} . {} . {lo}", self.pod, nft_protocol(self.protocol))?;
        if hi != lo {
            write!(f, "-{hi}")?;
        }
        write!(f, " . {first}")?;
        if last != first {
            write!(f, "-{last}")?;
        }
        Ok(())
    }
}

fn nft_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The packet layer as weft's table carries it: per direction, the isolated pods and the
/// allowed elements (disjoint).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packets {
    isolated: [BTreeSet<IpAddr>; 2],
    allowed: [BTreeSet<Allowed>; 2],
}

impl Packets {
    /// The table's form of `policy`: the grants of each pod and protocol made disjoint (an
    /// interval set refuses overlapping elements), nothing widened or lost.
    pub fn new(policy: &PacketPolicy) -> Self {
        let mut packets = Packets::default();
        for (&pod, pod_packets) in &policy.pods {
            for (way, grants) in [
                (Way::Ingress, &pod_packets.ingress),
                (Way::Egress, &pod_packets.egress),
            ] {
                let Some(grants) = grants else { continue };
                packets.isolated[way.index()].insert(pod);
                packets.allowed[way.index()].extend(disjoint(pod, grants));
            }
        }
        packets
    }

    /// The pods isolated for `way`.
    pub fn isolated(&self, way: Way) -> &BTreeSet<IpAddr> {
        &self.isolated[way.index()]
    }

    /// The allowed elements of `way`.
    pub fn allowed(&self, way: Way) -> &BTreeSet<Allowed> {
        &self.allowed[way.index()]
    }

    /// The batch that turns `self` into `next` element by element, in one transaction
    /// (deletions first, so that a replaced element never overlaps its successor); `None`
    /// when nothing changes.
    pub fn changes(&self, next: &Packets) -> Option<Nftables<'static>> {
        let mut batch = Batch::new();
        let mut empty = true;
        for delete in [true, false] {
            let (from, to) = if delete { (next, self) } else { (self, next) };
            for way in Way::BOTH {
                let gone = to.isolated(way).difference(from.isolated(way));
                for family in Family::ALL {
                    let elem: Vec<_> = gone
                        .clone()
                        .filter(|pod| Family::of(**pod) == family)
                        .map(|pod| Expression::String(pod.to_string().into()))
                        .collect();
                    empty &= elem.is_empty();
                    element(&mut batch, delete, way.isolated_set(family), elem);
                    let elem: Vec<_> = to
                        .allowed(way)
                        .difference(from.allowed(way))
                        .filter(|a| Family::of(a.pod) == family)
                        .map(Allowed::expression)
                        .collect();
                    empty &= elem.is_empty();
                    element(&mut batch, delete, way.allowed_set(family), elem);
                }
            }
        }
        (!empty).then(|| batch.to_nftables())
    }
}

/// Adds (or with `delete`, deletes) `elem` in set `set`; nothing when `elem` is empty.
fn element(
    batch: &mut Batch<'static>,
    delete: bool,
    set: &'static str,
    elem: Vec<Expression<'static>>,
) {
    if elem.is_empty() {
        return;
    }
    let element = NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: set.into(),
        elem: elem.into(),
    });
    if delete {
        batch.delete(element);
    } else {
        batch.add(element);
    }
}

/// Ports `lo..=hi` (of a cut) with the merged peer ranges every grant covering them admits.
type Slice = (u32, u32, Vec<(u128, u128)>);

/// `grants` of `pod` as disjoint elements: for each protocol, the ports cut where any grant
/// starts or ends, each slice's peer ranges merged, equal neighbouring slices joined again.
fn disjoint(pod: IpAddr, grants: &[Grant]) -> Vec<Allowed> {
    let v6 = pod.is_ipv6();
    let mut out = Vec::new();
    let mut by_protocol: BTreeMap<Protocol, Vec<(u32, u32, u128, u128)>> = BTreeMap::new();
    for g in grants {
        // The engine gives a pod grants of its own family; anything else could not match.
        if g.peers.is_ipv6() != v6 || g.ports.0 > g.ports.1 || g.peers.first > g.peers.last {
            continue;
        }
        let rect = (
            u32::from(g.ports.0),
            u32::from(g.ports.1),
            bits(g.peers.first),
            bits(g.peers.last),
        );
        by_protocol.entry(g.protocol).or_default().push(rect);
    }
    for (protocol, rects) in by_protocol {
        let mut cuts: Vec<u32> = rects.iter().flat_map(|r| [r.0, r.1 + 1]).collect();
        cuts.sort_unstable();
        cuts.dedup();
        // (first port, last port, merged peer ranges) of each slice some grant covers.
        let mut slices: Vec<Slice> = Vec::new();
        for pair in cuts.windows(2) {
            let (lo, hi) = (pair[0], pair[1] - 1);
            let mut peers: Vec<(u128, u128)> = rects
                .iter()
                .filter(|r| r.0 <= lo && hi <= r.1)
                .map(|r| (r.2, r.3))
                .collect();
            if peers.is_empty() {
                continue;
            }
            peers.sort_unstable();
            let mut merged: Vec<(u128, u128)> = Vec::new();
            for (a, b) in peers {
                match merged.last_mut() {
                    Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            match slices.last_mut() {
                Some(last) if last.1 + 1 == lo && last.2 == merged => last.1 = hi,
                _ => slices.push((lo, hi, merged)),
            }
        }
        for (lo, hi, peers) in slices {
            for (a, b) in peers {
                out.push(Allowed {
                    pod,
                    protocol,
                    // Cuts lie within 0..=65536 and a slice ends before the last one.
                    ports: (port(lo), port(hi)),
                    peers: (addr(a, v6), addr(b, v6)),
                });
            }
        }
    }
    out
}

fn port(n: u32) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(bits: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bits))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX)))
    }
}

impl Allowed {
    /// The element as nft's JSON writes it: a concatenation with ranges where needed.
    fn expression(&self) -> Expression<'static> {
        let (lo, hi) = self.ports;
        let ports = if lo == hi {
            Expression::Number(lo.into())
        } else {
            Expression::Range(Box::new(Range {
                range: [Expression::Number(lo.into()), Expression::Number(hi.into())],
            }))
        };
        let (first, last) = self.peers;
        let peers = if first == last {
            Expression::String(first.to_string().into())
        } else {
            Expression::Range(Box::new(Range {
                range: [
                    Expression::String(first.to_string().into()),
                    Expression::String(last.to_string().into()),
                ],
            }))
        };
        Expression::Named(NamedExpression::Concat(vec![
            Expression::String(self.pod.to_string().into()),
            Expression::String(nft_protocol(self.protocol).into()),
            ports,
            peers,
        ]))
    }

    /// An element as nft lists it (values, ranges or prefixes); `None` if it is not one of
    /// weft's.
    fn from_listing(expr: &Expression<'_>) -> Option<Self> {
        let Expression::Named(NamedExpression::Concat(parts)) = expr else {
            return None;
        };
        let [pod, protocol, ports, peers] = parts.as_slice() else {
            return None;
        };
        let pod: IpAddr = text(pod)?.parse().ok()?;
        let protocol = match protocol {
            Expression::String(s) if s == "udp" => Protocol::Udp,
            Expression::String(s) if s == "sctp" => Protocol::Sctp,
            Expression::Number(17) => Protocol::Udp,
            Expression::Number(132) => Protocol::Sctp,
            _ => return None,
        };
        let number = |e: &Expression<'_>| match e {
            Expression::Number(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let ports = match ports {
            Expression::Range(r) => (number(&r.range[0])?, number(&r.range[1])?),
            single => (number(single)?, number(single)?),
        };
        let address = |e: &Expression<'_>| text(e)?.parse::<IpAddr>().ok();
        let peers = match peers {
            Expression::Range(r) => (address(&r.range[0])?, address(&r.range[1])?),
            Expression::Named(NamedExpression::Prefix(Prefix { addr: a, len })) => {
                let a = address(a)?;
                let width = if a.is_ipv6() { 128 } else { 32 };
                let host_bits = width - (*len).min(width);
                let host = match host_bits {
                    0 => 0,
                    n => u128::MAX >> (128 - n),
                };
                (a, addr(bits(a) | host, a.is_ipv6()))
            }
            single => (address(single)?, address(single)?),
        };
        Some(Self {
            pod,
            protocol,
            ports,
            peers,
        })
    }
}

fn text<'a>(e: &'a Expression<'_>) -> Option<&'a str> {
    match e {
        Expression::String(s) => Some(s),
        _ => None,
    }
}

fn meta_l4proto() -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta {
        key: MetaKey::L4proto,
    }))
}

fn anonymous_set(items: &[&'static str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items
            .iter()
            .map(|i| SetItem::Element(Expression::String((*i).into())))
            .collect(),
    ))
}

fn in_set(left: Expression<'static>, set: &'static str) -> Statement<'static> {
    matches(
        left,
        Operator::EQ,
        Expression::String(format!("@{set}").into()),
    )
}

fn jump(chain: &'static str) -> Statement<'static> {
    Statement::Jump(JumpTarget {
        target: chain.into(),
    })
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

/// The packet layer's rules: (chain, comment, statements), in chain order.
fn rules() -> Vec<(&'static str, String, Vec<Statement<'static>>)> {
    let mut rules = Vec::new();
    for (chain, _) in BASE_CHAINS {
        rules.push((
            chain,
            "weft: tcp is the proxy's".to_owned(),
            vec![
                matches(
                    meta_l4proto(),
                    Operator::EQ,
                    Expression::String("tcp".into()),
                ),
                accept(),
            ],
        ));
        rules.push((
            chain,
            "weft: icmp errors about tracked flows".to_owned(),
            vec![
                matches(
                    ct("state"),
                    Operator::IN,
                    Expression::String("related".into()),
                ),
                matches(
                    meta_l4proto(),
                    Operator::EQ,
                    anonymous_set(&["icmp", "ipv6-icmp"]),
                ),
                accept(),
            ],
        ));
        let reply = is_reply();
        if chain == "packets_input" {
            // Address resolution between a pod and its node is the link's, not policy's.
            rules.push((
                chain,
                "weft: neighbour discovery".to_owned(),
                vec![
                    matches(
                        payload("icmpv6", "type"),
                        Operator::EQ,
                        anonymous_set(&[
                            "nd-neighbor-solicit",
                            "nd-neighbor-advert",
                            "nd-router-solicit",
                        ]),
                    ),
                    accept(),
                ],
            ));
            // Only replies to the node's own flows reach input: the node may reach its pods.
            rules.push((
                chain,
                "weft: replies to the node's flows".to_owned(),
                vec![reply, accept()],
            ));
        } else {
            rules.push((
                chain,
                "weft: replies are judged as their flows".to_owned(),
                vec![
                    reply,
                    Statement::Goto(JumpTarget {
                        target: REPLY.into(),
                    }),
                ],
            ));
        }
        // Untracked and invalid packets have no direction: judged as new flows.
        for way in Way::BOTH {
            if way == Way::Ingress && chain == "packets_input" {
                continue; // the node is no pod
            }
            for family in Family::ALL {
                let ip = family.protocol();
                let end = if way == Way::Egress { "saddr" } else { "daddr" };
                rules.push((
                    chain,
                    format!("weft: {way} of isolated pods ({ip})"),
                    vec![
                        in_set(payload(ip, end), way.isolated_set(family)),
                        jump(check(way, false).chain),
                    ],
                ));
            }
        }
    }
    for way in Way::BOTH {
        for family in Family::ALL {
            let ip = family.protocol();
            // A reply's source is the flow's destination.
            let end = if way == Way::Egress { "daddr" } else { "saddr" };
            rules.push((
                REPLY,
                format!("weft: replies of {way} of isolated pods ({ip})"),
                vec![
                    in_set(payload(ip, end), way.isolated_set(family)),
                    jump(check(way, true).chain),
                ],
            ));
        }
    }
    for c in CHECKS {
        for family in Family::ALL {
            let ip = family.protocol();
            // pod . l4proto . the flow's destination port . peer, as the packet carries them.
            let (pod, peer, port) = match (c.way, c.reply) {
                (Way::Egress, false) => ("saddr", "daddr", "dport"),
                (Way::Ingress, false) => ("daddr", "saddr", "dport"),
                (Way::Egress, true) => ("daddr", "saddr", "sport"),
                (Way::Ingress, true) => ("saddr", "daddr", "sport"),
            };
            let tuple = Expression::Named(NamedExpression::Concat(vec![
                payload(ip, pod),
                meta_l4proto(),
                payload("th", port),
                payload(ip, peer),
            ]));
            rules.push((
                c.chain,
                format!("weft: allowed {} ({ip})", c.way),
                vec![
                    in_set(tuple, c.way.allowed_set(family)),
                    Statement::Return(Some(Return {})),
                ],
            ));
        }
        rules.push((
            c.chain,
            format!("weft: {} not allowed", c.way),
            vec![
                // Read by [`dropped`]: the packet layer's denials, per direction.
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Drop(Some(Drop {})),
            ],
        ));
    }
    rules
}

fn check(way: Way, reply: bool) -> Check {
    CHECKS
        .into_iter()
        .find(|c| c.way == way && c.reply == reply)
        .unwrap_or(CHECKS[0])
}

/// Every chain of the packet layer.
fn chain_names() -> impl Iterator<Item = &'static str> {
    BASE_CHAINS
        .iter()
        .map(|(name, _)| *name)
        .chain([REPLY])
        .chain(CHECKS.iter().map(|c| c.chain))
}

/// Every set of the packet layer, with its type and whether it holds intervals.
fn sets() -> impl Iterator<Item = (&'static str, Way, Family, bool)> {
    Way::BOTH.into_iter().flat_map(|way| {
        Family::ALL.into_iter().flat_map(move |family| {
            [
                (way.isolated_set(family), way, family, false),
                (way.allowed_set(family), way, family, true),
            ]
        })
    })
}

/// Whether `name` is a set of the packet layer.
pub(super) fn owns_set(name: &str) -> bool {
    sets().any(|(set, ..)| set == name)
}

/// Adds the packet layer carrying `packets` to `batch` (after weft's table): sets, chains,
/// then rules.
pub(super) fn install(batch: &mut Batch<'static>, packets: &Packets) {
    for (name, way, family, interval) in sets() {
        let (set_type, elem): (SetTypeValue<'static>, Vec<Expression<'static>>) = if interval {
            let t = family.set_type();
            (
                SetTypeValue::Concatenated(
                    vec![t, SetType::InetProto, SetType::InetService, t].into(),
                ),
                packets
                    .allowed(way)
                    .iter()
                    .filter(|a| Family::of(a.pod) == family)
                    .map(Allowed::expression)
                    .collect(),
            )
        } else {
            (
                SetTypeValue::Single(family.set_type()),
                packets
                    .isolated(way)
                    .iter()
                    .filter(|pod| Family::of(**pod) == family)
                    .map(|pod| Expression::String(pod.to_string().into()))
                    .collect(),
            )
        };
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            set_type,
            flags: interval.then(|| [SetFlag::Interval].into_iter().collect()),
            elem: (!elem.is_empty()).then(|| elem.into()),
            ..Set::default()
        })));
    }
    for name in chain_names() {
        let hook = BASE_CHAINS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| *h);
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            _type: hook.map(|_| NfChainType::Filter),
            hook,
            prio: hook.map(|_| FILTER_PRIORITY),
            policy: hook.map(|_| NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }
    super::ruleset::add_rules(batch, rules());
}

/// A chain's type, hook, priority and policy (all `None` for a regular chain).
pub(super) type ChainShape = (
    Option<NfChainType>,
    Option<NfHook>,
    Option<i32>,
    Option<NfChainPolicy>,
);

/// Adds to `drifts` how listed chain `name` differs from the shape `want` and from the rules
/// (by comment) `expected`, `found` being the rules listed in it. Weft's table and the packet
/// layer judge their chains alike.
pub(super) fn compare_chain(
    drifts: &mut Vec<Drift>,
    name: &'static str,
    chain: &Chain<'_>,
    want: ChainShape,
    found: Vec<String>,
    expected: Vec<String>,
) {
    if (chain._type, chain.hook, chain.prio, chain.policy) != want {
        drifts.push(Drift::ChainChanged { chain: name });
    }
    if found != expected {
        drifts.push(Drift::Rules {
            chain: name,
            expected,
            found,
        });
    }
}

/// How the packet layer in a listing differs from `packets`: its chains, their rules (by
/// comment) and its sets' elements. Takes its chains and rules out of `chains` and `rules`,
/// so that what is left there is someone else's.
pub(super) fn compare(
    packets: &Packets,
    chains: &mut BTreeMap<String, &Chain<'_>>,
    rules: &mut BTreeMap<String, Vec<String>>,
    listed_sets: &BTreeMap<String, &Set<'_>>,
) -> Vec<Drift> {
    let mut drifts = Vec::new();
    let mut expected: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (chain, comment, _) in self::rules() {
        expected.entry(chain).or_default().push(comment);
    }
    for name in chain_names() {
        let Some(chain) = chains.remove(name) else {
            drifts.push(Drift::ChainMissing { chain: name });
            continue;
        };
        let hook = BASE_CHAINS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, h)| *h);
        let want = (
            hook.map(|_| NfChainType::Filter),
            hook,
            hook.map(|_| FILTER_PRIORITY),
            hook.map(|_| NfChainPolicy::Accept),
        );
        let found = rules.remove(name).unwrap_or_default();
        let expected = expected.remove(name).unwrap_or_default();
        compare_chain(&mut drifts, name, chain, want, found, expected);
    }
    for (name, way, family, interval) in sets() {
        let Some(set) = listed_sets.get(name) else {
            drifts.push(Drift::SetMissing { set: name });
            continue;
        };
        let listed = set.elem.iter().flat_map(|e| e.iter());
        let (missing, unexpected): (Vec<String>, Vec<String>) = if interval {
            let mut missing: BTreeSet<&Allowed> = packets
                .allowed(way)
                .iter()
                .filter(|a| Family::of(a.pod) == family)
                .collect();
            let mut unexpected = Vec::new();
            for elem in listed {
                match Allowed::from_listing(elem) {
                    Some(a) if missing.remove(&a) => {}
                    Some(a) => unexpected.push(a.to_string()),
                    None => unexpected.push(json(elem)),
                }
            }
            (
                missing.iter().map(ToString::to_string).collect(),
                unexpected,
            )
        } else {
            let mut missing: BTreeSet<&IpAddr> = packets
                .isolated(way)
                .iter()
                .filter(|pod| Family::of(**pod) == family)
                .collect();
            let mut unexpected = Vec::new();
            for elem in listed {
                match text(elem).and_then(|t| t.parse::<IpAddr>().ok()) {
                    Some(pod) if missing.remove(&pod) => {}
                    Some(pod) => unexpected.push(pod.to_string()),
                    None => unexpected.push(json(elem)),
                }
            }
            (
                missing.iter().map(ToString::to_string).collect(),
                unexpected,
            )
        };
        if !missing.is_empty() || !unexpected.is_empty() {
            drifts.push(Drift::SetElements {
                set: name,
                missing,
                unexpected,
            });
        }
    }
    drifts
}

fn json(e: &Expression<'_>) -> String {
    serde_json::to_string(e).unwrap_or_else(|e| e.to_string())
}

/// The packets the counters of `rule` (a rule of an untyped nft JSON listing) counted.
pub(super) fn counted(rule: &serde_json::Value) -> u64 {
    rule.get("expr")
        .and_then(|e| e.as_array())
        .into_iter()
        .flatten()
        .filter_map(|statement| statement.get("counter")?.get("packets")?.as_u64())
        .fold(0, u64::saturating_add)
}

/// Packets the packet layer has dropped, per direction, as its counters in a listing of
/// weft's table (`nft -j list table`) say; `None` if the listing cannot be read.
pub(super) fn dropped(listing: &str) -> Option<[u64; 2]> {
    // Read untyped: counters grow past what the nftables crate's types hold.
    let listing: serde_json::Value = serde_json::from_str(listing).ok()?;
    let mut dropped = [0u64; 2];
    for object in listing.get("nftables")?.as_array()? {
        let Some(rule) = object.get("rule") else {
            continue;
        };
        let chain = rule.get("chain").and_then(|c| c.as_str());
        let Some(check) = CHECKS.iter().find(|c| Some(c.chain) == chain) else {
            continue;
        };
        dropped[check.way.index()] += counted(rule);
    }
    Some(dropped)
}

#[cfg(test)]
mod tests {
    use nftables::schema::{NfCmd, NfObject};

    use super::*;
    use crate::policy::{AddrRange, PodPackets};

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn grant(protocol: Protocol, ports: (u16, u16), first: &str, last: &str) -> Grant {
        Grant {
            protocol,
            ports,
            peers: AddrRange {
                first: ip(first),
                last: ip(last),
            },
        }
    }

    fn allowed(pod: &str, protocol: Protocol, ports: (u16, u16), a: &str, b: &str) -> Allowed {
        Allowed {
            pod: ip(pod),
            protocol,
            ports,
            peers: (ip(a), ip(b)),
        }
    }

    /// The engine's view of one pod: `ingress` isolated with `grants`, egress not isolated.
    fn policy(pod: &str, grants: Vec<Grant>) -> PacketPolicy {
        let mut p = PacketPolicy::default();
        p.pods.insert(
            ip(pod),
            PodPackets {
                ingress: Some(grants),
                egress: None,
            },
        );
        p
    }

    /// Whether `elements` admit (port, peer) over `protocol`, as a lookup would.
    fn admits(elements: &BTreeSet<Allowed>, protocol: Protocol, port: u16, peer: &str) -> bool {
        let peer = ip(peer);
        elements.iter().any(|a| {
            a.protocol == protocol
                && (a.ports.0..=a.ports.1).contains(&port)
                && (a.peers.0..=a.peers.1).contains(&peer)
        })
    }

    #[test]
    fn overlapping_grants_become_disjoint_elements_admitting_the_same() {
        let grants = vec![
            grant(Protocol::Udp, (5000, 5100), "10.0.0.0", "10.255.255.255"),
            grant(Protocol::Udp, (5050, 5200), "10.1.0.0", "10.1.255.255"),
            grant(Protocol::Udp, (5201, 5300), "10.1.0.0", "10.1.255.255"),
            grant(Protocol::Udp, (53, 53), "10.0.0.1", "10.0.0.1"),
            grant(Protocol::Udp, (53, 53), "10.0.0.2", "10.0.0.2"),
            grant(Protocol::Sctp, (53, 53), "10.0.0.5", "10.0.0.5"),
            // Another family, or backwards: nothing (the engine never gives them).
            grant(Protocol::Udp, (1, 2), "fd00::1", "fd00::1"),
            grant(Protocol::Udp, (9, 8), "10.0.0.1", "10.0.0.1"),
        ];
        let packets = Packets::new(&policy("10.9.0.1", grants.clone()));
        let got = packets.allowed(Way::Ingress);
        let pod = "10.9.0.1";
        let want: BTreeSet<Allowed> = [
            allowed(pod, Protocol::Udp, (53, 53), "10.0.0.1", "10.0.0.2"),
            allowed(
                pod,
                Protocol::Udp,
                (5000, 5100),
                "10.0.0.0",
                "10.255.255.255",
            ),
            allowed(pod, Protocol::Udp, (5101, 5300), "10.1.0.0", "10.1.255.255"),
            allowed(pod, Protocol::Sctp, (53, 53), "10.0.0.5", "10.0.0.5"),
        ]
        .into();
        assert_eq!(got, &want);
        for (a, b) in got.iter().zip(got.iter().skip(1)) {
            let overlap = a.protocol == b.protocol
                && a.ports.0 <= b.ports.1
                && b.ports.0 <= a.ports.1
                && a.peers.0 <= b.peers.1
                && b.peers.0 <= a.peers.1;
            assert!(!overlap, "{a} overlaps {b}");
        }
        // Nothing widened, nothing lost: probes on every edge agree with the grants.
        for protocol in [Protocol::Udp, Protocol::Sctp, Protocol::Tcp] {
            for port in [
                0, 52, 53, 54, 4999, 5000, 5049, 5050, 5100, 5101, 5200, 5201, 5300, 5301,
            ] {
                for peer in [
                    "9.255.255.255",
                    "10.0.0.0",
                    "10.0.0.1",
                    "10.0.0.2",
                    "10.0.0.3",
                    "10.0.0.5",
                    "10.1.0.0",
                    "10.1.255.255",
                    "10.2.0.0",
                    "10.255.255.255",
                    "11.0.0.0",
                    "fd00::1",
                ] {
                    let granted = grants.iter().any(|g| {
                        g.protocol == protocol
                            && !g.peers.is_ipv6()
                            && (g.ports.0..=g.ports.1).contains(&port)
                            && (g.peers.first..=g.peers.last).contains(&ip(peer))
                    });
                    assert_eq!(
                        admits(got, protocol, port, peer),
                        granted,
                        "{protocol:?} {port} from {peer}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_port_and_address_is_one_element() {
        let all = vec![
            grant(
                Protocol::Udp,
                (0, u16::MAX),
                "::",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            grant(Protocol::Udp, (80, 80), "fd00::1", "fd00::1"),
        ];
        let packets = Packets::new(&policy("fd00::9", all));
        let want = allowed(
            "fd00::9",
            Protocol::Udp,
            (0, u16::MAX),
            "::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        );
        assert_eq!(packets.allowed(Way::Ingress), &BTreeSet::from([want]));
        assert_eq!(
            want.to_string(),
            "fd00::9 . udp . 0-65535 . ::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert!(packets.isolated(Way::Ingress).contains(&ip("fd00::9")));
        assert!(packets.isolated(Way::Egress).is_empty());
    }

    #[test]
    fn listed_elements_read_back_as_installed_in_every_form_nft_prints() {
        let listed: Vec<Expression<'_>> = serde_json::from_value(serde_json::json!([
            {"concat": ["10.1.1.10", "udp", {"range": [5000, 5010]}, {"prefix": {"addr": "10.0.0.0", "len": 8}}]},
            {"concat": ["10.1.1.10", "sctp", 53, {"range": ["10.2.0.3", "10.2.0.9"]}]},
            {"concat": ["10.1.1.10", "udp", 7, "10.0.0.1"]},
            {"concat": ["10.1.1.10", 17, 7, {"prefix": {"addr": "0.0.0.0", "len": 0}}]},
            {"concat": ["fd00::1", "udp", 7, {"prefix": {"addr": "fd00::", "len": 16}}]},
            {"concat": ["fd00::1", "udp", 7, {"prefix": {"addr": "fd00::", "len": 128}}]},
        ]))
        .expect("expressions");
        let read: Vec<Allowed> = listed.iter().filter_map(Allowed::from_listing).collect();
        assert_eq!(
            read,
            [
                allowed(
                    "10.1.1.10",
                    Protocol::Udp,
                    (5000, 5010),
                    "10.0.0.0",
                    "10.255.255.255"
                ),
                allowed(
                    "10.1.1.10",
                    Protocol::Sctp,
                    (53, 53),
                    "10.2.0.3",
                    "10.2.0.9"
                ),
                allowed("10.1.1.10", Protocol::Udp, (7, 7), "10.0.0.1", "10.0.0.1"),
                allowed(
                    "10.1.1.10",
                    Protocol::Udp,
                    (7, 7),
                    "0.0.0.0",
                    "255.255.255.255"
                ),
                allowed(
                    "fd00::1",
                    Protocol::Udp,
                    (7, 7),
                    "fd00::",
                    "fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
                ),
                allowed("fd00::1", Protocol::Udp, (7, 7), "fd00::", "fd00::"),
            ]
        );
        for a in &read {
            assert_eq!(Allowed::from_listing(&a.expression()).as_ref(), Some(a));
        }
        let tcp: Expression<'_> = serde_json::from_value(
            serde_json::json!({"concat": ["10.1.1.10", "tcp", 7, "10.0.0.1"]}),
        )
        .expect("expression");
        assert_eq!(Allowed::from_listing(&tcp), None, "never one of weft's");
    }

    #[test]
    fn changes_delete_before_they_add_and_nothing_is_nothing() {
        let before = Packets::new(&policy(
            "10.9.0.1",
            vec![grant(Protocol::Udp, (1, 10), "10.0.0.0", "10.0.0.255")],
        ));
        let after = Packets::new(&policy(
            "10.9.0.1",
            vec![grant(Protocol::Udp, (5, 20), "10.0.0.0", "10.0.0.255")],
        ));
        assert!(before.changes(&before).is_none());
        let json = serde_json::to_value(before.changes(&after).expect("a change")).expect("json");
        let commands: Vec<(&str, &str)> = json["nftables"]
            .as_array()
            .expect("commands")
            .iter()
            .map(|c| {
                let (verb, object) = c
                    .as_object()
                    .and_then(|o| o.iter().next())
                    .expect("a command");
                (
                    verb.as_str(),
                    object["element"]["name"].as_str().expect("a set"),
                )
            })
            .collect();
        assert_eq!(
            commands,
            [
                ("delete", "packets_ingress_allowed_v4"),
                ("add", "packets_ingress_allowed_v4")
            ]
        );
        // No longer isolated: its address leaves the isolated set, its elements go.
        let open = Packets::new(&PacketPolicy::default());
        let json = serde_json::to_string(&before.changes(&open).expect("a change")).expect("json");
        assert!(
            json.contains(r#""name":"packets_ingress_isolated_v4","elem":["10.9.0.1"]"#),
            "{json}"
        );
        assert!(!json.contains(r#""add""#), "{json}");
    }

    #[test]
    fn rules_are_spelled_as_nft_reads_them() {
        let mut batch = Batch::new();
        install(&mut batch, &Packets::default());
        let json = serde_json::to_string(&batch.to_nftables()).expect("json");
        // ct state is a bitmask: `in`; set lookups `==` "@set"; the tuple a concatenation.
        assert!(
            json.contains(
                r#"{"match":{"left":{"ct":{"key":"state"}},"right":"related","op":"in"}}"#
            ),
            "{json}"
        );
        assert!(json.contains(r#"{"match":{"left":{"concat":[{"payload":{"protocol":"ip","field":"saddr"}},{"meta":{"key":"l4proto"}},{"payload":{"protocol":"th","field":"dport"}},{"payload":{"protocol":"ip","field":"daddr"}}]},"right":"@packets_egress_allowed_v4","op":"=="}}"#), "{json}");
        assert!(
            json.contains(r#"{"goto":{"target":"packets_reply"}}"#),
            "{json}"
        );
        assert!(!json.contains(r#""op":"<""#) && !json.contains(r#""op":">""#));
        // Every drop is counted.
        let drops = json.matches(r#"{"drop":{}}"#).count();
        assert_eq!(drops, 4);
        assert_eq!(
            json.matches(r#"{"counter":null},{"drop":{}}"#).count(),
            drops
        );
    }

    #[test]
    fn compare_accepts_the_install_and_names_a_lost_element() {
        let packets = Packets::new(&policy(
            "10.9.0.1",
            vec![grant(Protocol::Udp, (53, 53), "10.0.0.1", "10.0.0.1")],
        ));
        let mut batch = Batch::new();
        install(&mut batch, &packets);
        let objects: Vec<NfListObject<'static>> = batch
            .to_nftables()
            .objects
            .iter()
            .map(|o| match o {
                NfObject::CmdObject(NfCmd::Add(object)) => object.clone(),
                other => panic!("install adds only: {other:?}"),
            })
            .collect();
        let read = |objects: &[NfListObject<'_>]| {
            let mut chains = BTreeMap::new();
            let mut rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut sets = BTreeMap::new();
            for object in objects {
                match object {
                    NfListObject::Chain(c) => {
                        chains.insert(c.name.to_string(), c);
                    }
                    NfListObject::Rule(r) => rules
                        .entry(r.chain.to_string())
                        .or_default()
                        .push(r.comment.as_deref().unwrap_or_default().to_owned()),
                    NfListObject::Set(s) => {
                        sets.insert(s.name.to_string(), &**s);
                    }
                    _ => {}
                }
            }
            let drifts = compare(&packets, &mut chains, &mut rules, &sets);
            assert!(
                chains.is_empty() && rules.is_empty(),
                "every chain is the packet layer's"
            );
            drifts
        };
        assert_eq!(read(&objects), []);
        let emptied: Vec<NfListObject<'static>> = objects
            .iter()
            .map(|o| match o {
                NfListObject::Set(s) if s.name == "packets_ingress_allowed_v4" => {
                    NfListObject::Set(Box::new(Set {
                        elem: None,
                        ..(**s).clone()
                    }))
                }
                other => other.clone(),
            })
            .collect();
        assert_eq!(
            read(&emptied),
            [Drift::SetElements {
                set: "packets_ingress_allowed_v4",
                missing: vec!["10.9.0.1 . udp . 53 . 10.0.0.1".into()],
                unexpected: vec![],
            }]
        );
    }

    #[test]
    fn drops_are_read_per_direction_from_the_counters() {
        let listing = serde_json::json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"rule": {"chain": "packets_ingress", "expr": [{"counter": {"packets": 3, "bytes": 90}}, {"drop": null}]}},
            {"rule": {"chain": "packets_ingress_reply", "expr": [{"counter": {"packets": 5_000_000_000u64, "bytes": 9_000_000_000u64}}, {"drop": null}]}},
            {"rule": {"chain": "packets_egress", "expr": [{"counter": {"packets": 2, "bytes": 60}}, {"drop": null}]}},
            {"rule": {"chain": "antispoof", "expr": [{"counter": {"packets": 7, "bytes": 60}}, {"drop": null}]}},
        ]});
        assert_eq!(dropped(&listing.to_string()), Some([5_000_000_003, 2]));
        assert_eq!(dropped("not json"), None);
    }
}
