//! weft's table as nft batches (install, pod updates, removal) and the comparison of a listed
//! table with the capture it should carry.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, CT, Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression,
    Payload, PayloadField, Prefix, Socket, SocketAttr,
};
use nftables::schema::{
    Chain, Element, NfListObject, NfObject, Nftables, Rule, Set, SetType, SetTypeValue, Table,
};
use nftables::stmt::{Accept, Counter, Drop, Mangle, Match, Operator, Return, Statement, TProxy};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::routing::{MARK_MASK, TPROXY_MARK};
use super::{Capture, Mode, PodAddr, TABLE, packets};

/// The set of interfaces that lead to local pods (type `ifname`), where a source must route
/// back through the interface it came in by.
pub const POD_LINKS: &str = "pod_links";

/// The anti-spoofing chain runs at mangle priority: before capture decides anything.
const FILTER_PRIORITY: i32 = -150;

/// Capture runs after anti-spoofing and after dstnat (-100), before routing: a DNAT of
/// kube-proxy (a ClusterIP, a NodePort) or of a hostPort has rewritten the connection's first
/// packet already, so capture and the sockets it leads to see the addresses every later packet
/// of the connection has too. Before dstnat, the later packets of a DNATed connection matched
/// no socket and the connection was reset. A ClusterIP nothing DNATs the agent resolves itself.
const CAPTURE_PRIORITY: i32 = -90;

/// The output chain reroutes at mangle priority (a `route` chain: a changed mark is routed
/// again).
const OUTPUT_PRIORITY: i32 = -150;

/// weft's base chains: spoofed pod sources dropped, pod traffic arriving at the node captured,
/// and traffic the node itself sends.
const CHAINS: [(&str, NfHook, NfChainType, i32); 3] = [
    (
        "antispoof",
        NfHook::Prerouting,
        NfChainType::Filter,
        FILTER_PRIORITY,
    ),
    (
        "prerouting",
        NfHook::Prerouting,
        NfChainType::Filter,
        CAPTURE_PRIORITY,
    ),
    (
        "output",
        NfHook::Output,
        NfChainType::Route,
        OUTPUT_PRIORITY,
    ),
];

/// The chains of the hold ([`Mode::Hold`]): forwarded TCP to the outbound listener, the rest of
/// what the node forwards dropped. Named apart from the captured mode's chains.
const HOLD_CHAINS: [(&str, NfHook, NfChainType, i32); 2] = [
    (
        "hold_prerouting",
        NfHook::Prerouting,
        NfChainType::Filter,
        CAPTURE_PRIORITY,
    ),
    ("hold_forward", NfHook::Forward, NfChainType::Filter, 0),
];

/// The base chains of `mode`.
fn base_chains(mode: Mode) -> &'static [(&'static str, NfHook, NfChainType, i32)] {
    match mode {
        Mode::Hold => &HOLD_CHAINS,
        Mode::Captured => &CHAINS,
    }
}

/// The pod sets of `mode`: a hold knows no pods.
fn families(mode: Mode) -> &'static [Family] {
    match mode {
        Mode::Hold => &[],
        Mode::Captured => &Family::ALL,
    }
}

/// The address families weft captures, each with its own set (nft sets hold one type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub(super) const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub(super) fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn set(self) -> &'static str {
        match self {
            Family::V4 => "pods_v4",
            Family::V6 => "pods_v6",
        }
    }

    pub(super) fn protocol(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The family as `meta nfproto` names it.
    fn nfproto(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The local pods of this family, as nft prints them.
    fn pods(self, capture: &Capture) -> impl Iterator<Item = String> + '_ {
        capture
            .pods()
            .iter()
            .filter(move |pod| {
                matches!(
                    (self, pod.ip()),
                    (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
                )
            })
            .map(PodAddr::to_string)
    }

    pub(super) fn set_type(self) -> SetType {
        match self {
            Family::V4 => SetType::Ipv4Addr,
            Family::V6 => SetType::Ipv6Addr,
        }
    }
}

/// Why weft's table is not as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A base chain weft installs is gone.
    ChainMissing { chain: &'static str },
    /// A base chain has another type, hook, priority or policy.
    ChainChanged { chain: &'static str },
    /// A chain weft does not install.
    UnexpectedChain { chain: String },
    /// A chain's rules (by their comments, in order) are not weft's.
    Rules {
        chain: &'static str,
        expected: Vec<String>,
        found: Vec<String>,
    },
    /// A pod set is gone.
    SetMissing { set: &'static str },
    /// A pod set lacks addresses of local pods, or holds others.
    SetElements {
        set: &'static str,
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    /// Something else in the table (a map, a counter, another set), as nft listed it.
    UnexpectedObject { json: String },
    /// The listing could not be read.
    Unreadable { reason: String },
    /// The policy routing of captured packets lacks these (in words).
    Routing { missing: Vec<String> },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::ChainMissing { chain } => write!(f, "chain {chain} missing"),
            Drift::ChainChanged { chain } => write!(f, "chain {chain} changed"),
            Drift::UnexpectedChain { chain } => write!(f, "unexpected chain {chain}"),
            Drift::Rules {
                chain,
                expected,
                found,
            } => write!(f, "chain {chain} has rules {found:?}, not {expected:?}"),
            Drift::SetMissing { set } => write!(f, "set {set} missing"),
            Drift::SetElements {
                set,
                missing,
                unexpected,
            } => write!(f, "set {set} lacks {missing:?} and holds {unexpected:?}"),
            Drift::UnexpectedObject { json } => write!(f, "unexpected object {json}"),
            Drift::Unreadable { reason } => write!(f, "unreadable listing: {reason}"),
            Drift::Routing { missing } => write!(f, "policy routing lacks {missing:?}"),
        }
    }
}

/// What a check found of weft's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableState {
    /// As the capture says.
    Intact,
    /// Not there at all.
    Missing,
    /// There, but changed.
    Drifted(Vec<Drift>),
}

impl fmt::Display for TableState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableState::Intact => f.write_str("intact"),
            TableState::Missing => f.write_str("missing"),
            TableState::Drifted(drifts) => {
                for (i, drift) in drifts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{drift}")?;
                }
                Ok(())
            }
        }
    }
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        ..Table::default()
    })
}

/// The batch that replaces weft's table with the capture and the packet layer, in one
/// transaction.
pub fn install(capture: &Capture) -> Nftables<'static> {
    let mut batch = Batch::new();
    // add, delete, add: works whether or not the table exists, drops stale chains, rules and
    // elements (a flush would keep chains and sets), and nft commits it as one transaction.
    batch.add(table());
    batch.delete(table());
    batch.add(table());
    for &family in families(capture.mode()) {
        let elem: Vec<_> = family
            .pods(capture)
            .map(|pod| Expression::String(pod.into()))
            .collect();
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: family.set().into(),
            set_type: SetTypeValue::Single(family.set_type()),
            elem: (!elem.is_empty()).then(|| elem.into()),
            ..Set::default()
        })));
    }
    // The hold judges no sources: it forwards no pod's packet anyway.
    if capture.mode() == Mode::Captured {
        let elem: Vec<_> = capture
            .pod_links()
            .into_iter()
            .map(|link| Expression::String(link.to_owned().into()))
            .collect();
        batch.add(NfListObject::Set(Box::new(Set {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: POD_LINKS.into(),
            set_type: SetTypeValue::Single(SetType::Ifname),
            elem: (!elem.is_empty()).then(|| elem.into()),
            ..Set::default()
        })));
    }
    for &(name, hook, kind, priority) in base_chains(capture.mode()) {
        batch.add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: name.into(),
            _type: Some(kind),
            hook: Some(hook),
            prio: Some(priority),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }));
    }
    add_rules(&mut batch, rules_of(capture));
    // The hold drops every forwarded packet it does not take: no packet layer to judge them.
    if capture.mode() == Mode::Captured {
        packets::install(&mut batch, capture.packets());
    }
    batch.to_nftables()
}

/// The batch that adds (`add`) or deletes a pod's address in its family's set, and with it
/// the pod links that came (or went) with the pod, in one transaction.
pub fn elements(add: bool, pod: PodAddr, links: &[&str]) -> Nftables<'static> {
    let element = NfListObject::Element(Element {
        family: NfFamily::INet,
        table: TABLE.into(),
        name: Family::of(pod.ip()).set().into(),
        elem: vec![Expression::String(pod.to_string().into())].into(),
    });
    let mut batch = Batch::new();
    if add {
        batch.add(element);
        if let Some(links) = link_elements(links) {
            batch.add(links);
        }
    } else {
        batch.delete(element);
        if let Some(links) = link_elements(links) {
            batch.delete(links);
        }
    }
    batch.to_nftables()
}

/// The batch that deletes `removed` from and adds `added` to the pod links, in one
/// transaction; `None` if both are empty.
pub fn link_changes(added: &[&str], removed: &[&str]) -> Option<Nftables<'static>> {
    let (added, removed) = (link_elements(added), link_elements(removed));
    if added.is_none() && removed.is_none() {
        return None;
    }
    let mut batch = Batch::new();
    if let Some(removed) = removed {
        batch.delete(removed);
    }
    if let Some(added) = added {
        batch.add(added);
    }
    Some(batch.to_nftables())
}

/// `links` as elements of the pod links set; `None` if there are none (nft refuses an empty
/// element list).
fn link_elements(links: &[&str]) -> Option<NfListObject<'static>> {
    (!links.is_empty()).then(|| {
        NfListObject::Element(Element {
            family: NfFamily::INet,
            table: TABLE.into(),
            name: POD_LINKS.into(),
            elem: links
                .iter()
                .map(|link| Expression::String((*link).to_owned().into()))
                .collect::<Vec<_>>()
                .into(),
        })
    })
}

/// The batch that removes weft's table, whether or not it exists.
pub fn remove() -> Nftables<'static> {
    let mut batch = Batch::new();
    // Adding first makes the delete succeed when the table is already gone.
    batch.add(table());
    batch.delete(table());
    batch.to_nftables()
}

/// Adds `rules` (chain, comment, statements) to weft's table in `batch`, in order; the comment
/// is how [`compare`] knows a rule.
pub(super) fn add_rules(
    batch: &mut Batch<'static>,
    rules: Vec<(&'static str, String, Vec<Statement<'static>>)>,
) {
    for (chain, comment, expr) in rules {
        batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: TABLE.into(),
            chain: chain.into(),
            expr: expr.into(),
            comment: Some(comment.into()),
            ..Rule::default()
        }));
    }
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

pub(super) fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

/// A conntrack key of the packet's connection (`ct state`, `ct direction`).
pub(super) fn ct(key: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: key.into(),
        family: None,
        dir: None,
    }))
}

/// Whether the packet is an answer: it travels its connection's reply direction.
pub(super) fn is_reply() -> Statement<'static> {
    matches(
        ct("direction"),
        Operator::EQ,
        Expression::String("reply".into()),
    )
}

/// Counts the packet, then drops it: every drop of weft's is counted.
fn counted_drop() -> [Statement<'static>; 2] {
    [
        Statement::Counter(Counter::Anonymous(None)),
        Statement::Drop(Some(Drop {})),
    ]
}

/// For IPv6, a match of everything but ICMPv6: neighbour discovery (solicitations to
/// multicast and link-local addresses, which no pod set holds) must pass.
fn not_neighbour_discovery(family: Family) -> Option<Statement<'static>> {
    (family == Family::V6).then(|| {
        matches(
            meta(MetaKey::L4proto),
            Operator::NEQ,
            Expression::String("ipv6-icmp".into()),
        )
    })
}

/// Set membership: nft's JSON spells it `== "@set"` (`Operator::IN` is the bitmask operator).
fn in_set(family: Family, field: &'static str) -> Statement<'static> {
    set_match(family, field, Operator::EQ)
}

/// Set non-membership (`!= "@set"`).
fn not_in_set(family: Family, field: &'static str) -> Statement<'static> {
    set_match(family, field, Operator::NEQ)
}

fn set_match(family: Family, field: &'static str, op: Operator) -> Statement<'static> {
    matches(
        payload(family.protocol(), field),
        op,
        Expression::String(format!("@{}", family.set()).into()),
    )
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn is_tcp() -> Statement<'static> {
    matches(
        meta(MetaKey::L4proto),
        Operator::EQ,
        Expression::String("tcp".into()),
    )
}

/// Sets capture's bits of the packet mark, keeping the others.
fn set_tproxy_mark() -> Statement<'static> {
    let kept = Expression::BinaryOperation(Box::new(BinaryOperation::AND(
        meta(MetaKey::Mark),
        Expression::Number(!MARK_MASK),
    )));
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            kept,
            Expression::Number(TPROXY_MARK),
        ]))),
    })
}

/// Hands the packet to weft's transparent listener on `port`, its addresses kept, and marks
/// it so that the policy routing of [`super::routing`] delivers it to the node.
fn divert(family: Family, port: u16) -> [Statement<'static>; 3] {
    [
        Statement::TProxy(TProxy {
            family: Some(family.protocol().into()),
            port,
            addr: None,
        }),
        set_tproxy_mark(),
        Statement::Accept(Some(Accept {})),
    ]
}

/// Packets of connections weft's listeners already took (sockets with IP_TRANSPARENT are
/// only weft's) are delivered to them without another listener lookup.
fn established() -> Vec<Statement<'static>> {
    vec![
        is_tcp(),
        matches(
            Expression::Named(NamedExpression::Socket(Socket {
                key: std::borrow::Cow::Owned(SocketAttr::Transparent),
            })),
            Operator::EQ,
            Expression::Number(1),
        ),
        set_tproxy_mark(),
        Statement::Accept(Some(Accept {})),
    ]
}

/// TCP to a local pod's HBONE port: the tunnel's outer connection, addressed to the
/// destination pod as ztunnel does.
fn hbone(family: Family, capture: &Capture) -> Vec<Statement<'static>> {
    let ports = capture.ports();
    vec![
        in_set(family, "daddr"),
        matches(
            payload("tcp", "dport"),
            Operator::EQ,
            Expression::Number(ports.hbone.into()),
        ),
    ]
}

/// The rules of the capture's mode.
fn rules_of(capture: &Capture) -> Vec<(&'static str, String, Vec<Statement<'static>>)> {
    match capture.mode() {
        Mode::Hold => hold_rules(capture),
        Mode::Captured => rules(capture),
    }
}

/// The hold's rules: whatever pod sends it, a new TCP connection the node forwards (not
/// addressed to the node itself, so the node's own services and its replies from pods stay
/// reachable) goes to the outbound listener, which refuses it until capture replaces the
/// hold; anything else the node would forward is dropped. The node's own traffic to its
/// pods (kubelet probes) leaves by the output hook, which the hold leaves alone.
fn hold_rules(capture: &Capture) -> Vec<(&'static str, String, Vec<Statement<'static>>)> {
    let mut rules = vec![(
        "hold_prerouting",
        "weft hold: packets of held connections".to_owned(),
        established(),
    )];
    for family in Family::ALL {
        let ip = family.protocol();
        let mut held = vec![
            matches(
                meta(MetaKey::Nfproto),
                Operator::EQ,
                Expression::String(family.nfproto().into()),
            ),
            matches(
                Expression::Named(NamedExpression::Fib(Fib {
                    result: FibResult::Type,
                    flags: [FibFlag::Daddr].into_iter().collect(),
                })),
                Operator::NEQ,
                Expression::String("local".into()),
            ),
            is_tcp(),
        ];
        held.extend(divert(family, capture.ports().outbound));
        rules.push((
            "hold_prerouting",
            format!("weft hold: forwarded tcp to the outbound listener, which refuses it ({ip})"),
            held,
        ));
    }
    rules.push((
        "hold_forward",
        "weft hold: nothing else is forwarded".to_owned(),
        counted_drop().to_vec(),
    ));
    rules
}

/// Counts and drops a packet whose source is not routed back through the interface it came
/// in by: with `. iif` the lookup answers only a route leaving by that interface, otherwise
/// nothing (`missing`). Counted, so that an operator sees spoofing attempts.
fn not_routed_back() -> Vec<Statement<'static>> {
    let mut statements = vec![matches(
        Expression::Named(NamedExpression::Fib(Fib {
            result: FibResult::Oif,
            flags: [FibFlag::Saddr, FibFlag::Iif].into_iter().collect(),
        })),
        Operator::EQ,
        Expression::Boolean(false),
    )];
    statements.extend(counted_drop());
    statements
}

/// weft's rules: (chain, comment, statements), in chain order. Comments name each rule so
/// that a listing can be checked rule by rule.
fn rules(capture: &Capture) -> Vec<(&'static str, String, Vec<Statement<'static>>)> {
    let mut rules = Vec::new();
    for family in Family::ALL {
        let ip = family.protocol();
        // THREATS 24: a local pod's address is only believed from the interface its route
        // leaves by, so no pod sends as another (its identity, its policy grants).
        rules.push((
            "antispoof",
            format!("weft: local pod addresses only from their own interface ({ip})"),
            [in_set(family, "saddr")]
                .into_iter()
                .chain(not_routed_back())
                .collect(),
        ));
    }
    // THREATS 24, made-up sources: a source that is no pod's address is neither captured
    // (capture matches `@pods_*`) nor judged as the pod's egress, and downstream it would be
    // judged as an outside address (an ipBlock). So on an interface leading to local pods, a
    // source must route back through that same interface (strict reverse path: with `. iif`
    // the lookup answers the interface only if the route leaves by it, otherwise nothing;
    // nft cannot compare `oif` with `iif` directly, both being run-time values). Only pod
    // links: the node's uplinks may see asymmetric routes. One rule for both families (fib is
    // family-agnostic in `inet`). On a bridge (cni0) all pods share the link, so they can
    // still send as one another there: that is the bridge's L2 matter, not this check's.
    rules.push((
        "antispoof",
        "weft: on pod links, only sources routed back through the same link".to_owned(),
        [matches(
            meta(MetaKey::Iifname),
            Operator::EQ,
            Expression::String(format!("@{POD_LINKS}").into()),
        )]
        .into_iter()
        .chain(not_routed_back())
        .collect(),
    ));
    // A pod's IPv6 link-local address is no pod address: capture and the packet layer know
    // it not, so what it sends would reach the node's own services (the kubelet) around the
    // pod's egress policy. Over a pod link it carries ICMPv6 only (neighbour discovery, MLD).
    rules.push((
        "antispoof",
        "weft: on pod links, link-local IPv6 sources carry ICMPv6 only".to_owned(),
        vec![
            matches(
                meta(MetaKey::Iifname),
                Operator::EQ,
                Expression::String(format!("@{POD_LINKS}").into()),
            ),
            matches(
                payload("ip6", "saddr"),
                Operator::EQ,
                Expression::Named(NamedExpression::Prefix(Prefix {
                    addr: Box::new(Expression::String("fe80::".into())),
                    len: 10,
                })),
            ),
        ]
        .into_iter()
        .chain(not_neighbour_discovery(Family::V6))
        .chain(counted_drop())
        .collect(),
    ));
    // Pod interfaces the operator named: an address behind them that no known local pod has
    // (a pod that started before the view has it, which capture would not take) sends only
    // its answers to the node's own connections (kubelet probes), and receives nothing (below,
    // after dstnat). IPv6 keeps ICMPv6 (neighbour discovery).
    for pattern in capture.pod_interfaces().patterns() {
        for family in Family::ALL {
            let ip = family.protocol();
            let unknown = || {
                let mut unknown = vec![
                    matches(
                        meta(MetaKey::Iifname),
                        Operator::EQ,
                        Expression::String(pattern.clone().into()),
                    ),
                    not_in_set(family, "saddr"),
                ];
                unknown.extend(not_neighbour_discovery(family));
                unknown
            };
            let mut answers = unknown();
            answers.extend([is_reply(), Statement::Accept(Some(Accept {}))]);
            rules.push((
                "antispoof",
                format!("weft: unknown pods on {pattern} answer the node's own connections ({ip})"),
                answers,
            ));
            let mut dropped = unknown();
            dropped.extend(counted_drop());
            rules.push((
                "antispoof",
                format!("weft: nothing else from unknown pods on {pattern} ({ip})"),
                dropped,
            ));
        }
    }
    rules.push((
        "prerouting",
        "weft: packets of captured connections".to_owned(),
        established(),
    ));
    for family in Family::ALL {
        let ip = family.protocol();
        let ports = capture.ports();
        // Outbound first: a pod talking to a pod of the same node is the source's connection.
        // A pod's answers to the node's own connections (kubelet probes, weft's dials) find
        // their socket, which is not transparent: TPROXY passes them on unchanged.
        let mut outbound = vec![in_set(family, "saddr"), is_tcp()];
        outbound.extend(divert(family, ports.outbound));
        rules.push((
            "prerouting",
            format!("weft: outbound tcp from local pods ({ip})"),
            outbound,
        ));
        let mut tunnels = hbone(family, capture);
        tunnels.extend(divert(family, ports.hbone));
        rules.push((
            "prerouting",
            format!("weft: tunnels to local pods ({ip})"),
            tunnels,
        ));
        let mut inbound = vec![in_set(family, "daddr"), is_tcp()];
        inbound.extend(divert(family, ports.inbound));
        rules.push((
            "prerouting",
            format!("weft: inbound plaintext tcp to local pods ({ip})"),
            inbound,
        ));
        // A TPROXY that finds no listener (the agent down, or none of this family) lets the
        // packet go on as if capture were not there. What the diverts above did not take is
        // dropped here, so capture fails closed; but a pod's answers to the node's own
        // connections (kubelet probes) are no connection of the pod's and pass.
        rules.push((
            "prerouting",
            format!("weft: local pods' answers to the node's own connections ({ip})"),
            vec![
                in_set(family, "saddr"),
                is_tcp(),
                is_reply(),
                Statement::Accept(Some(Accept {})),
            ],
        ));
        for (field, way) in [("saddr", "from"), ("daddr", "to")] {
            rules.push((
                "prerouting",
                format!("weft: tcp {way} local pods that no listener took is dropped ({ip})"),
                [in_set(family, field), is_tcp()]
                    .into_iter()
                    .chain(counted_drop())
                    .collect(),
            ));
        }
        for pattern in capture.pod_interfaces().patterns() {
            rules.push((
                "prerouting",
                format!("weft: nothing to unknown pods on {pattern} ({ip})"),
                [
                    matches(
                        Expression::Named(NamedExpression::Fib(Fib {
                            result: FibResult::Oifname,
                            flags: [FibFlag::Daddr].into_iter().collect(),
                        })),
                        Operator::EQ,
                        Expression::String(pattern.clone().into()),
                    ),
                    // fib answers no interface for the node's own addresses (a bridge's
                    // gateway address), so they never match.
                    not_in_set(family, "daddr"),
                ]
                .into_iter()
                .chain(not_neighbour_discovery(family))
                .chain(counted_drop())
                .collect(),
            ));
        }
    }
    // Only the node's own sockets reach the output hook, and marks do not survive a veth into
    // another namespace, so a pod cannot forge this exemption (THREATS 24). weft's own dials to
    // local pods carry the mark and reach the pod itself.
    rules.push((
        "output",
        "weft: weft's own sockets are never captured".to_owned(),
        vec![
            matches(
                meta(MetaKey::Mark),
                Operator::EQ,
                Expression::Number(capture.mark()),
            ),
            Statement::Return(Some(Return {})),
        ],
    ));
    // A tunnel between two pods of this node leaves the node's own outbound proxy unmarked:
    // TPROXY works only on arriving packets, so it is marked here, routed again (a `route`
    // chain) by the mark to the loopback device, and arrives at its HBONE listener through
    // prerouting. The node's other traffic to its pods (kubelet probes, host-network pods) is
    // not captured: upstream NetworkPolicy always allows it.
    for family in Family::ALL {
        let ip = family.protocol();
        let mut tunnels = hbone(family, capture);
        tunnels.push(set_tproxy_mark());
        rules.push((
            "output",
            format!("weft: node's own tunnels to local pods ({ip})"),
            tunnels,
        ));
    }
    rules
}

/// Compares nft's JSON listing of weft's table with what `capture` installs.
pub fn compare(capture: &Capture, listing: &str) -> TableState {
    let listed: Nftables<'_> = match serde_json::from_str(listing) {
        Ok(listed) => listed,
        Err(e) => {
            return TableState::Drifted(vec![Drift::Unreadable {
                reason: e.to_string(),
            }]);
        }
    };
    let mut drifts = Vec::new();
    let mut chains = BTreeMap::new();
    let mut listed_rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sets = BTreeMap::new();
    for object in listed.objects.iter() {
        match object {
            NfObject::ListObject(NfListObject::Table(_) | NfListObject::MetainfoObject(_)) => {}
            NfObject::ListObject(NfListObject::Chain(chain)) => {
                chains.insert(chain.name.to_string(), chain);
            }
            NfObject::ListObject(NfListObject::Rule(rule)) => {
                listed_rules
                    .entry(rule.chain.to_string())
                    .or_default()
                    .push(rule.comment.as_deref().unwrap_or("(no comment)").to_owned());
            }
            NfObject::ListObject(NfListObject::Set(set))
                if families(capture.mode()).iter().any(|f| f.set() == set.name)
                    || (capture.mode() == Mode::Captured
                        && (packets::owns_set(&set.name) || set.name == POD_LINKS)) =>
            {
                sets.insert(set.name.to_string(), &**set);
            }
            other => drifts.push(Drift::UnexpectedObject {
                json: serde_json::to_string(other).unwrap_or_else(|e| e.to_string()),
            }),
        }
    }

    let mut expected_rules: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (chain, comment, _) in rules_of(capture) {
        expected_rules.entry(chain).or_default().push(comment);
    }
    for &(name, hook, kind, priority) in base_chains(capture.mode()) {
        match chains.remove(name) {
            None => drifts.push(Drift::ChainMissing { chain: name }),
            Some(chain) => {
                let want = (
                    Some(kind),
                    Some(hook),
                    Some(priority),
                    Some(NfChainPolicy::Accept),
                );
                let found = listed_rules.remove(name).unwrap_or_default();
                let expected = expected_rules.remove(name).unwrap_or_default();
                packets::compare_chain(&mut drifts, name, chain, want, found, expected);
            }
        }
    }
    if capture.mode() == Mode::Captured {
        drifts.extend(packets::compare(
            capture.packets(),
            &mut chains,
            &mut listed_rules,
            &sets,
        ));
    }
    drifts.extend(
        chains
            .into_keys()
            .map(|chain| Drift::UnexpectedChain { chain }),
    );

    for &family in families(capture.mode()) {
        let name = family.set();
        let Some(set) = sets.get(name) else {
            drifts.push(Drift::SetMissing { set: name });
            continue;
        };
        let mut missing: BTreeSet<String> = family.pods(capture).collect();
        let mut unexpected = Vec::new();
        for elem in set.elem.iter().flat_map(|e| e.iter()) {
            // nft prints addresses in canonical form, as IpAddr's Display does.
            let text = match elem {
                Expression::String(s) => s
                    .parse::<IpAddr>()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| s.to_string()),
                other => serde_json::to_string(other).unwrap_or_else(|e| e.to_string()),
            };
            if !missing.remove(&text) {
                unexpected.push(text);
            }
        }
        if !missing.is_empty() || !unexpected.is_empty() {
            drifts.push(Drift::SetElements {
                set: name,
                missing: missing.into_iter().collect(),
                unexpected,
            });
        }
    }

    if capture.mode() == Mode::Captured {
        match sets.get(POD_LINKS) {
            None => drifts.push(Drift::SetMissing { set: POD_LINKS }),
            Some(set) => {
                let mut missing: BTreeSet<&str> = capture.pod_links();
                let mut unexpected = Vec::new();
                for elem in set.elem.iter().flat_map(|e| e.iter()) {
                    match elem {
                        Expression::String(link) if missing.remove(link.as_ref()) => {}
                        Expression::String(link) => unexpected.push(link.to_string()),
                        other => unexpected
                            .push(serde_json::to_string(other).unwrap_or_else(|e| e.to_string())),
                    }
                }
                if !missing.is_empty() || !unexpected.is_empty() {
                    drifts.push(Drift::SetElements {
                        set: POD_LINKS,
                        missing: missing.into_iter().map(str::to_owned).collect(),
                        unexpected,
                    });
                }
            }
        }
    }

    if drifts.is_empty() {
        TableState::Intact
    } else {
        TableState::Drifted(drifts)
    }
}

/// Packets capture's chains dropped (their counters summed), as a listing of weft's table
/// says: `[antispoof, prerouting]` (spoofed or unknown sources; what no listener took, or
/// what was bound for an unknown pod); `None` if the listing cannot be read.
pub(super) fn capture_drops(listing: &str) -> Option<[u64; 2]> {
    // Read untyped, as the packet layer's counters: they grow past the crate's types.
    let listing: serde_json::Value = serde_json::from_str(listing).ok()?;
    let rules = listing.get("nftables")?.as_array()?;
    Some(["antispoof", "prerouting"].map(|chain| {
        rules
            .iter()
            .filter_map(|o| o.get("rule"))
            .filter(|r| r.get("chain").and_then(|c| c.as_str()) == Some(chain))
            .map(packets::counted)
            .fold(0, u64::saturating_add)
    }))
}

#[cfg(test)]
mod tests {
    use nftables::schema::NfCmd;
    use serde_json::{Value, json};

    use super::*;
    use crate::redirect::{Ports, WEFT_MARK};

    fn capture() -> Capture {
        let mut capture = Capture::new(Ports::default(), WEFT_MARK).expect("default capture");
        for pod in ["10.1.0.5", "fd00::5"] {
            capture.insert(pod.parse().expect("a pod address"));
            capture.set_link(pod.parse().expect("a pod address"), Some("cali1".into()));
        }
        capture
    }

    /// The rules an install batch adds, in order.
    fn added_rules(json: &Value) -> Vec<&Value> {
        json["nftables"]
            .as_array()
            .expect("objects")
            .iter()
            .filter_map(|o| o["add"].get("rule"))
            .collect()
    }

    /// The comments of the rules an install batch adds to `chain`, in order.
    fn comments<'a>(json: &'a Value, chain: &str) -> Vec<&'a str> {
        added_rules(json)
            .into_iter()
            .filter(|r| r["chain"] == chain)
            .filter_map(|r| r["comment"].as_str())
            .collect()
    }

    /// What nft would list after `install`: its added objects, as a listing.
    fn listing_of(capture: &Capture) -> Nftables<'static> {
        let objects: Vec<_> = install(capture)
            .objects
            .iter()
            .skip(3) // add, delete, add table
            .map(|object| match object {
                NfObject::CmdObject(NfCmd::Add(object)) => NfObject::ListObject(object.clone()),
                other => panic!("install adds only: {other:?}"),
            })
            .collect();
        Nftables {
            objects: objects.into(),
        }
    }

    fn compare_listing(capture: &Capture, listing: &Nftables<'_>) -> TableState {
        compare(capture, &serde_json::to_string(listing).expect("json"))
    }

    #[test]
    fn install_replaces_the_table_in_one_batch() {
        let json = serde_json::to_value(install(&capture())).expect("json");
        let objects = json["nftables"].as_array().expect("objects");
        let table = json!({"family": "inet", "name": "weft"});
        assert_eq!(objects[0], json!({"add": {"table": table}}));
        assert_eq!(objects[1], json!({"delete": {"table": table}}));
        assert_eq!(objects[2], json!({"add": {"table": table}}));
        let sets: Vec<&Value> = objects.iter().filter_map(|o| o["add"].get("set")).collect();
        assert_eq!(sets[0]["elem"], json!(["10.1.0.5"]));
        assert_eq!(sets[1]["elem"], json!(["fd00::5"]));
        // Both pods are routed through one link: it is one element.
        assert_eq!(sets[2]["name"], "pod_links");
        assert_eq!(sets[2]["type"], "ifname");
        assert_eq!(sets[2]["elem"], json!(["cali1"]));
    }

    #[test]
    fn on_pod_links_a_source_must_route_back_the_same_way_in_one_counted_rule() {
        let json = serde_json::to_value(install(&capture())).expect("json");
        let rules: Vec<&Value> = added_rules(&json)
            .into_iter()
            .filter(|r| r["chain"] == "antispoof")
            .collect();
        assert_eq!(rules.len(), 4, "{rules:?}");
        // Both families (no nfproto, no address payload): fib works for either in inet.
        let expr = rules[2]["expr"].as_array().expect("expr");
        assert_eq!(
            expr[0],
            json!({"match": {"left": {"meta": {"key": "iifname"}}, "right": "@pod_links", "op": "=="}})
        );
        // Strict: `. iif` makes the lookup answer nothing unless the route leaves by iif.
        let fib = &expr[1]["match"];
        assert_eq!(fib["left"]["fib"]["result"], "oif");
        let mut flags: Vec<&str> = fib["left"]["fib"]["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        flags.sort_unstable();
        assert_eq!(flags, ["iif", "saddr"]);
        assert_eq!((&fib["op"], &fib["right"]), (&json!("=="), &json!(false)));
        assert_eq!(expr[2..], [json!({"counter": null}), json!({"drop": {}})]);
        // A link-local IPv6 source routes back the same way, so a rule of its own.
        let expr = rules[3]["expr"].as_array().expect("expr");
        assert_eq!(expr[0], rules[2]["expr"][0]);
        assert_eq!(
            expr[1..3],
            [
                json!({"match": {"left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": {"prefix": {"addr": "fe80::", "len": 10}}, "op": "=="}}),
                json!({"match": {"left": {"meta": {"key": "l4proto"}}, "right": "ipv6-icmp", "op": "!="}}),
            ]
        );
        assert_eq!(expr[3..], [json!({"counter": null}), json!({"drop": {}})]);
    }

    #[test]
    fn named_pod_interfaces_keep_unknown_pods_off_them_both_ways() {
        let plain = serde_json::to_value(install(&capture())).expect("json");
        let named = capture().with_pod_interfaces(
            crate::redirect::PodInterfaces::new(&["cali*", "cni0"]).expect("patterns"),
        );
        let json = serde_json::to_value(install(&named)).expect("json");
        // Without patterns, none of these rules.
        let antispoof = comments(&plain, "antispoof");
        assert!(
            antispoof.iter().all(|c| !c.contains("unknown pods")),
            "{antispoof:?}"
        );
        // Each pattern, each family: the answers to the node first, then the drop, after the
        // other antispoof rules; and a drop of what goes to unknown pods in prerouting.
        let antispoof = comments(&json, "antispoof");
        assert_eq!(antispoof.len(), 4 + 2 * 2 * 2, "{antispoof:?}");
        assert_eq!(
            antispoof[4..6],
            [
                "weft: unknown pods on cali* answer the node's own connections (ip)",
                "weft: nothing else from unknown pods on cali* (ip)"
            ]
        );
        let prerouting = comments(&json, "prerouting");
        for name in ["cali*", "cni0"] {
            for ip in ["ip", "ip6"] {
                let to = format!("weft: nothing to unknown pods on {name} ({ip})");
                let at = prerouting.iter().position(|c| *c == to).expect("the rule");
                let dropped =
                    format!("weft: tcp to local pods that no listener took is dropped ({ip})");
                assert!(prerouting.iter().position(|c| *c == dropped) < Some(at));
            }
        }
        let rule = added_rules(&json)
            .into_iter()
            .find(|r| r["comment"] == "weft: nothing to unknown pods on cali* (ip6)")
            .expect("the rule");
        assert_eq!(
            rule["expr"].as_array().expect("expr")[..2],
            [
                json!({"match": {"left": {"fib": {"result": "oifname", "flags": ["daddr"]}}, "right": "cali*", "op": "=="}}),
                json!({"match": {"left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "@pods_v6", "op": "!="}}),
            ]
        );
    }

    #[test]
    fn what_no_listener_took_is_dropped_after_each_family_s_diverts() {
        let json = serde_json::to_value(install(&capture())).expect("json");
        let comments = comments(&json, "prerouting");
        for ip in ["ip", "ip6"] {
            let at = |what: &str| {
                let comment = format!("weft: {what} ({ip})");
                comments
                    .iter()
                    .position(|c| *c == comment)
                    .unwrap_or_else(|| panic!("{comment} in {comments:?}"))
            };
            let diverts = [
                "outbound tcp from local pods",
                "tunnels to local pods",
                "inbound plaintext tcp to local pods",
            ]
            .map(at);
            let answers = at("local pods' answers to the node's own connections");
            let from = at("tcp from local pods that no listener took is dropped");
            let to = at("tcp to local pods that no listener took is dropped");
            assert!(diverts.iter().all(|d| *d < answers), "{comments:?}");
            assert!(answers < from && from < to, "{comments:?}");
        }
    }

    #[test]
    fn pod_links_come_and_go_with_their_pods_and_are_shared_on_a_bridge() {
        let mut capture = capture();
        let (a, b): (PodAddr, PodAddr) = (
            "10.1.0.5".parse().expect("a pod address"),
            "fd00::5".parse().expect("a pod address"),
        );
        assert_eq!(capture.pod_links(), BTreeSet::from(["cali1"]));
        capture.remove(a);
        assert_eq!(
            capture.pod_links(),
            BTreeSet::from(["cali1"]),
            "b still uses it"
        );
        capture.remove(b);
        assert!(capture.pod_links().is_empty());
        // A link is only recorded for a local pod; a pod without one is said to be so.
        capture.set_link(a, Some("cali2".into()));
        assert!(capture.pod_links().is_empty());
        capture.insert(a);
        assert_eq!(capture.pods_without_link(), [a]);
        capture.set_link(a, Some("cali2".into()));
        assert!(capture.pods_without_link().is_empty());
        capture.set_link(a, None);
        assert_eq!(capture.pods_without_link(), [a]);
    }

    #[test]
    fn pod_link_changes_delete_before_they_add_and_ride_with_the_pod() {
        assert!(link_changes(&[], &[]).is_none());
        let json = serde_json::to_value(link_changes(&["cali2"], &["cali1"]).expect("a batch"))
            .expect("json");
        let element = |link: &str| json!({"element": {"family": "inet", "table": "weft", "name": "pod_links", "elem": [link]}});
        assert_eq!(
            json["nftables"],
            json!([{"delete": element("cali1")}, {"add": element("cali2")}])
        );
        let pod: PodAddr = "10.1.0.6".parse().expect("a pod address");
        let json = serde_json::to_value(elements(true, pod, &["cali2"])).expect("json");
        assert_eq!(json["nftables"][1], json!({"add": element("cali2")}));
        let json = serde_json::to_value(elements(false, pod, &[])).expect("json");
        assert_eq!(json["nftables"].as_array().expect("objects").len(), 1);
    }

    #[test]
    fn compare_names_a_lost_or_stray_pod_link_and_a_missing_set() {
        let capture = capture();
        let mut other = capture.clone();
        let pod: PodAddr = "10.1.0.5".parse().expect("a pod address");
        other.set_link(pod, Some("cali9".into()));
        assert_eq!(
            compare_listing(&other, &listing_of(&capture)),
            TableState::Drifted(vec![Drift::SetElements {
                set: "pod_links",
                missing: vec!["cali9".into()],
                unexpected: vec![],
            }])
        );
        let mut none = capture.clone();
        none.set_link(pod, None);
        none.set_link("fd00::5".parse().expect("a pod address"), None);
        assert_eq!(
            compare_listing(&none, &listing_of(&capture)),
            TableState::Drifted(vec![Drift::SetElements {
                set: "pod_links",
                missing: vec![],
                unexpected: vec!["cali1".into()],
            }])
        );
        let listing = listing_of(&capture);
        let without = Nftables {
            objects: listing
                .objects
                .iter()
                .filter(|o| !matches!(o, NfObject::ListObject(NfListObject::Set(s)) if s.name == POD_LINKS))
                .cloned()
                .collect(),
        };
        let TableState::Drifted(drifts) = compare_listing(&capture, &without) else {
            panic!("a table without its pod links is not intact");
        };
        assert!(
            drifts.contains(&Drift::SetMissing { set: "pod_links" }),
            "{drifts:?}"
        );
    }

    #[test]
    fn capture_drops_are_the_antispoof_and_prerouting_chains_counters() {
        let listing = json!({"nftables": [
            {"rule": {"chain": "antispoof", "expr": [{"counter": {"packets": 3, "bytes": 90}}, {"drop": null}]}},
            {"rule": {"chain": "antispoof", "expr": [{"counter": {"packets": 5_000_000_000u64, "bytes": 1}}, {"drop": null}]}},
            {"rule": {"chain": "prerouting", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}},
            {"rule": {"chain": "packets_egress", "expr": [{"counter": {"packets": 2, "bytes": 60}}, {"drop": null}]}},
        ]});
        assert_eq!(
            capture_drops(&listing.to_string()),
            Some([5_000_000_003, 7])
        );
        assert_eq!(capture_drops("not json"), None);
    }

    #[test]
    fn rules_use_set_lookup_as_nft_spells_it() {
        let json = serde_json::to_string(&install(&capture())).expect("json");
        // Set membership is `==` with "@set" (Operator::IN would be the bitmask operator); no
        // ordering operator is used (the crate swaps `<` and `>`).
        assert!(json.contains(r#"{"match":{"left":{"payload":{"protocol":"ip","field":"saddr"}},"right":"@pods_v4","op":"=="}}"#), "{json}");
        assert!(json.contains(r#""right":15008,"op":"==""#), "{json}");
        for port in [15001, 15006, 15008] {
            for family in ["ip", "ip6"] {
                let tproxy = format!(r#"{{"tproxy":{{"family":"{family}","port":{port}}}}}"#);
                assert!(json.contains(&tproxy), "{tproxy} in {json}");
            }
        }
        assert!(!json.contains("redirect"), "{json}");
        assert!(
            json.contains(&format!(r#""right":{WEFT_MARK},"op":"==""#)),
            "{json}"
        );
        assert!(!json.contains(r#""op":"<""#) && !json.contains(r#""op":">""#));
    }

    #[test]
    fn diverted_packets_get_capture_s_mark_bits_and_keep_the_others() {
        let json = serde_json::to_value(install(&capture())).expect("json");
        let mark = json!({"meta": {"key": "mark"}});
        let set = json!({"mangle": {"key": mark.clone(), "value": {"|": [
            {"&": [mark, !MARK_MASK]}, TPROXY_MARK
        ]}}});
        let rules = added_rules(&json);
        for rule in &rules {
            let expr = rule["expr"].as_array().expect("expr");
            let diverts = expr.iter().any(|e| e.get("tproxy").is_some());
            let in_output = rule["chain"] == "output" && expr.len() > 2;
            if diverts || in_output {
                assert!(expr.contains(&set), "{rule}");
            }
        }
        // The packets of taken connections: the socket is weft's (transparent).
        let taken = rules
            .iter()
            .find(|r| r["comment"] == "weft: packets of captured connections")
            .expect("the rule for taken connections");
        assert_eq!(
            taken["expr"][1],
            json!({"match": {"left": {"socket": {"key": "transparent"}}, "right": 1, "op": "=="}})
        );
        let chains: Vec<(&str, &str)> = json["nftables"]
            .as_array()
            .expect("objects")
            .iter()
            .filter_map(|o| o["add"].get("chain"))
            .filter_map(|c| Some((c["name"].as_str()?, c["type"].as_str()?)))
            .filter(|(name, _)| !name.starts_with("packets_"))
            .collect();
        // No nat chain: TPROXY is a filter chain's; output re-routes marked packets (the
        // packet layer's chains are its own).
        assert_eq!(
            chains,
            [
                ("antispoof", "filter"),
                ("prerouting", "filter"),
                ("output", "route")
            ]
        );
    }

    fn held() -> Capture {
        let mut capture = capture();
        capture.mode = Mode::Hold;
        capture
    }

    #[test]
    fn the_hold_sends_forwarded_tcp_to_the_outbound_listener_and_drops_the_rest() {
        let json = serde_json::to_value(install(&held())).expect("json");
        let objects = json["nftables"].as_array().expect("objects");
        // The same add, delete, add: a hold replaces any table, a captured one among them.
        let table = json!({"family": "inet", "name": "weft"});
        assert_eq!(
            objects[..3],
            [
                json!({"add": {"table": table.clone()}}),
                json!({"delete": {"table": table.clone()}}),
                json!({"add": {"table": table}})
            ]
        );
        assert!(
            objects.iter().all(|o| o["add"].get("set").is_none()),
            "no pod sets"
        );
        let chains: Vec<(&str, &str, &str)> = objects
            .iter()
            .filter_map(|o| o["add"].get("chain"))
            .map(|c| {
                let field = |k: &str| c[k].as_str().expect(k);
                (field("name"), field("type"), field("hook"))
            })
            .collect();
        assert_eq!(
            chains,
            [
                ("hold_prerouting", "filter", "prerouting"),
                ("hold_forward", "filter", "forward")
            ]
        );
        let rules: Vec<&Value> = objects
            .iter()
            .filter_map(|o| o["add"].get("rule"))
            .collect();
        assert_eq!(rules.len(), 4, "{rules:?}");
        // Everything not addressed to the node itself, whichever pod sends it.
        for (rule, (nfproto, family)) in rules[1..3].iter().zip([("ipv4", "ip"), ("ipv6", "ip6")]) {
            assert_eq!(
                rule["expr"].as_array().expect("expr")[..4],
                [
                    json!({"match": {"left": {"meta": {"key": "nfproto"}}, "right": nfproto, "op": "=="}}),
                    json!({"match": {"left": {"fib": {"result": "type", "flags": ["daddr"]}}, "right": "local", "op": "!="}}),
                    json!({"match": {"left": {"meta": {"key": "l4proto"}}, "right": "tcp", "op": "=="}}),
                    json!({"tproxy": {"family": family, "port": 15001}}),
                ]
            );
        }
        assert_eq!(rules[3]["expr"], json!([{"counter": null}, {"drop": {}}]));
        assert!(
            rules.iter().all(|r| r["chain"] != "output"),
            "the node's own traffic"
        );
    }

    #[test]
    fn a_hold_and_a_capture_are_each_other_s_drift() {
        let (held, captured) = (held(), capture());
        assert_eq!(
            compare_listing(&held, &listing_of(&held)),
            TableState::Intact
        );
        // The watch restores whichever mode is wanted.
        let TableState::Drifted(drifts) = compare_listing(&held, &listing_of(&captured)) else {
            panic!("a captured table is not a hold");
        };
        assert!(
            drifts.contains(&Drift::ChainMissing {
                chain: "hold_prerouting"
            }),
            "{drifts:?}"
        );
        assert!(
            drifts
                .iter()
                .any(|d| matches!(d, Drift::UnexpectedObject { json } if json.contains("pods_v4"))),
            "{drifts:?}"
        );
        let TableState::Drifted(drifts) = compare_listing(&captured, &listing_of(&held)) else {
            panic!("a hold is not a captured table");
        };
        assert!(
            drifts.contains(&Drift::UnexpectedChain {
                chain: "hold_forward".into()
            }),
            "{drifts:?}"
        );
    }

    #[test]
    fn compare_accepts_what_install_installs() {
        let capture = capture();
        assert_eq!(
            compare_listing(&capture, &listing_of(&capture)),
            TableState::Intact
        );
    }

    #[test]
    fn compare_names_what_changed() {
        let capture = capture();
        let listing = listing_of(&capture);

        let no_rules = Nftables {
            objects: listing
                .objects
                .iter()
                .filter(|o| !matches!(o, NfObject::ListObject(NfListObject::Rule(_))))
                .cloned()
                .collect(),
        };
        let TableState::Drifted(drifts) = compare_listing(&capture, &no_rules) else {
            panic!("a flushed table is not intact");
        };
        assert!(
            matches!(
                drifts[0],
                Drift::Rules {
                    chain: "antispoof",
                    ..
                }
            ),
            "{drifts:?}"
        );
        assert!(
            drifts[1]
                .to_string()
                .contains("chain prerouting has rules []")
        );

        let mut other = capture.clone();
        other.remove("10.1.0.5".parse().expect("a pod address"));
        other.insert("10.1.0.6".parse().expect("a pod address"));
        assert_eq!(
            compare_listing(&other, &listing),
            TableState::Drifted(vec![Drift::SetElements {
                set: "pods_v4",
                missing: vec!["10.1.0.6".into()],
                unexpected: vec!["10.1.0.5".into()],
            }])
        );

        let TableState::Drifted(drifts) = compare(&capture, "not json") else {
            panic!("garbage is not intact");
        };
        assert!(
            matches!(drifts[..], [Drift::Unreadable { .. }]),
            "{drifts:?}"
        );
    }
}
