//! Compiled policies: symbols instead of strings, and each policy's rules as one short, flat
//! sequence of operations, so that deciding a connection allocates nothing, compares integers
//! and touches few cache lines.

use std::net::IpAddr;

use smallvec::SmallVec;

use super::decision::RuleRef;
use super::intern::{Interner, LabelSet, Sym};
use ipnet::IpNet;

use crate::model::{self, IpBlock, LabelSelector, Operator, PortSpec, Protocol};

/// A compiled label selector, for the selectors kept outside programs (a policy's pod
/// selector, namespace selectors); no requirements selects everything.
#[derive(Debug, Clone)]
pub(crate) struct Selector(Box<[Op]>);

impl Selector {
    /// Compiles `sel`, interning its keys and values.
    pub(crate) fn new(sel: &LabelSelector, interner: &mut Interner) -> Self {
        let mut ops = Vec::new();
        push_selector(&mut ops, sel, interner);
        Self(ops.into_boxed_slice())
    }

    /// Whether `labels` satisfy every requirement.
    #[inline]
    pub(crate) fn matches(&self, labels: &LabelSet) -> bool {
        selector_matches(&self.0, labels)
    }
}

/// One step of a compiled policy. A rule is a [`Op::Rule`] head, its ports, then its peers;
/// a peer is a head, then the requirements of its pod selector; `In`/`NotIn` are followed by
/// their values. Every variant is at most 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// A rule of `len` ops (head included): `ports` port ops, then `peers` peers. No ports
    /// admits every port; no peers every peer.
    Rule { ports: u16, peers: u16, len: u32 },
    /// Ports `lo..=hi` over `protocol`.
    Ports {
        protocol: Protocol,
        lo: u16,
        hi: u16,
    },
    /// The destination pod's port called `name` over `protocol`.
    NamedPort { protocol: Protocol, name: Sym },
    /// Pods of namespace `ns` (of the policy's cluster) matching the `len` ops that follow.
    Local { ns: u32, len: u32 },
    /// Pods of namespaces matching namespace selector `sel` (of every cluster) and the `len`
    /// ops that follow.
    Namespaces { sel: u32, len: u32 },
    /// Addresses in block `block` of the program's blocks.
    Block { block: u32 },
    /// Label `key` is `value`.
    Eq { key: Sym, value: Sym },
    /// Label `key` is one of the `values` ops that follow.
    In { key: Sym, values: u32 },
    /// Label `key` is absent or none of the `values` ops that follow.
    NotIn { key: Sym, values: u32 },
    /// Label `key` is present.
    Exists { key: Sym },
    /// Label `key` is absent.
    DoesNotExist { key: Sym },
    /// A value of the `In`/`NotIn` before it.
    Value(Sym),
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn push_selector(ops: &mut Vec<Op>, sel: &LabelSelector, interner: &mut Interner) {
    for (k, v) in &sel.match_labels {
        ops.push(Op::Eq {
            key: interner.intern(k),
            value: interner.intern(v),
        });
    }
    for r in &sel.match_expressions {
        let key = interner.intern(&r.key);
        let values = len_u32(r.values.len());
        ops.push(match r.operator {
            Operator::In => Op::In { key, values },
            Operator::NotIn => Op::NotIn { key, values },
            Operator::Exists => Op::Exists { key },
            Operator::DoesNotExist => Op::DoesNotExist { key },
        });
        if matches!(r.operator, Operator::In | Operator::NotIn) {
            ops.extend(r.values.iter().map(|v| Op::Value(interner.intern(v))));
        }
    }
}

/// Whether `labels` satisfy the requirements `ops` (a compiled selector).
#[inline]
fn selector_matches(ops: &[Op], labels: &LabelSet) -> bool {
    let mut i = 0;
    while let Some(op) = ops.get(i) {
        i += 1;
        let ok = match *op {
            Op::Eq { key, value } => labels.get(key) == Some(value),
            Op::Exists { key } => labels.get(key).is_some(),
            Op::DoesNotExist { key } => labels.get(key).is_none(),
            Op::In { key, values } | Op::NotIn { key, values } => {
                let vals = ops.get(i..i + values as usize).unwrap_or_default();
                i += values as usize;
                let found = labels.get(key).map(|v| vals.contains(&Op::Value(v)));
                match op {
                    Op::In { .. } => found == Some(true),
                    _ => found != Some(true),
                }
            }
            _ => true,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The ports and protocols some rule of a direction could admit: a cheap test that lets a
/// decision skip a policy without reading its rules. No rules admit nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PortSpan {
    lo: u16,
    hi: u16,
    protocols: u8,
}

impl PortSpan {
    fn bit(protocol: Protocol) -> u8 {
        match protocol {
            Protocol::Tcp => 1,
            Protocol::Udp => 2,
            Protocol::Sctp => 4,
        }
    }

    fn of(rules: &[model::Rule]) -> Self {
        let mut span = PortSpan {
            lo: u16::MAX,
            hi: 0,
            protocols: 0,
        };
        let mut widen = |protocols: u8, lo: u16, hi: u16| {
            span.protocols |= protocols;
            span.lo = span.lo.min(lo);
            span.hi = span.hi.max(hi);
        };
        for rule in rules {
            if rule.ports.is_empty() {
                widen(7, 0, u16::MAX);
            }
            for p in &rule.ports {
                let (lo, hi) = match &p.port {
                    Some(PortSpec::Range { start, end }) => (*start, *end),
                    // Named ports resolve per destination pod: any number.
                    None | Some(PortSpec::Named(_)) => (0, u16::MAX),
                };
                widen(Self::bit(p.protocol), lo, hi);
            }
        }
        span
    }

    /// Whether some rule could admit `port` over `protocol`.
    #[inline]
    pub(crate) fn admits(&self, port: u16, protocol: Protocol) -> bool {
        self.protocols & Self::bit(protocol) != 0 && (self.lo..=self.hi).contains(&port)
    }
}

/// What one direction of a decision asks of a policy: the connection, seen from the pod
/// the policy selects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query<'a> {
    /// Ingress of the destination, or egress of the source.
    pub(crate) ingress: bool,
    /// Destination port.
    pub(crate) port: u16,
    /// Protocol.
    pub(crate) protocol: Protocol,
    /// The destination pod's named ports, when the destination is a pod.
    pub(crate) dst_ports: Option<&'a [(Sym, Protocol, u16)]>,
    /// The other end's address on the connection.
    pub(crate) peer_ip: IpAddr,
    /// The other end's namespace and labels, when it is a pod.
    pub(crate) peer_pod: Option<(u32, &'a LabelSet)>,
}

/// A policy's rules of both directions, compiled.
#[derive(Debug)]
pub(crate) struct Program {
    /// Ingress rules, then egress rules; small policies need no further allocation.
    ops: SmallVec<[Op; 6]>,
    /// Where the egress rules start in `ops`.
    egress_at: u32,
    ingress: Option<PortSpan>,
    egress: Option<PortSpan>,
    blocks: Box<[Block]>,
}

impl Program {
    /// Compiles a policy's rules. `ns` is the policy's namespace; `ns_sels` the ids of the
    /// namespace selectors of its peers, in rule and peer order (ingress first).
    pub(crate) fn new(
        p: &model::NetworkPolicy,
        ns: u32,
        ns_sels: &[u32],
        interner: &mut Interner,
    ) -> Self {
        let mut ops = Vec::new();
        let mut blocks = Vec::new();
        let mut ns_sels = ns_sels.iter().copied();
        let mut compile = |ops: &mut Vec<Op>, rules: &[model::Rule]| {
            for rule in rules {
                let head = ops.len();
                ops.push(Op::Rule {
                    ports: u16::try_from(rule.ports.len()).unwrap_or(u16::MAX),
                    peers: u16::try_from(rule.peers.len()).unwrap_or(u16::MAX),
                    len: 0,
                });
                for port in &rule.ports {
                    ops.push(match &port.port {
                        None => Op::Ports {
                            protocol: port.protocol,
                            lo: 0,
                            hi: u16::MAX,
                        },
                        Some(PortSpec::Range { start, end }) => Op::Ports {
                            protocol: port.protocol,
                            lo: *start,
                            hi: *end,
                        },
                        Some(PortSpec::Named(n)) => Op::NamedPort {
                            protocol: port.protocol,
                            name: interner.intern(n),
                        },
                    });
                }
                for peer in &rule.peers {
                    let at = ops.len();
                    match peer {
                        model::Peer::IpBlock(b) => {
                            ops.push(Op::Block {
                                block: len_u32(blocks.len()),
                            });
                            blocks.push(Block::new(b));
                        }
                        model::Peer::Pods {
                            pod_selector,
                            namespace_selector,
                        } => {
                            ops.push(match namespace_selector {
                                None => Op::Local { ns, len: 0 },
                                Some(_) => Op::Namespaces {
                                    sel: ns_sels.next().unwrap_or(u32::MAX),
                                    len: 0,
                                },
                            });
                            if let Some(s) = pod_selector {
                                push_selector(ops, s, interner);
                            }
                            let n = len_u32(ops.len() - at - 1);
                            if let Op::Local { len, .. } | Op::Namespaces { len, .. } = &mut ops[at]
                            {
                                *len = n;
                            }
                        }
                    }
                }
                let n = len_u32(ops.len() - head);
                if let Op::Rule { len, .. } = &mut ops[head] {
                    *len = n;
                }
            }
        };
        compile(&mut ops, p.ingress.as_deref().unwrap_or_default());
        let egress_at = len_u32(ops.len());
        compile(&mut ops, p.egress.as_deref().unwrap_or_default());
        Self {
            ops: SmallVec::from_vec(ops),
            egress_at,
            ingress: p.ingress.as_deref().map(PortSpan::of),
            egress: p.egress.as_deref().map(PortSpan::of),
            blocks: blocks.into_boxed_slice(),
        }
    }

    /// The port spans of (ingress, egress); a direction the policy does not apply to admits
    /// nothing.
    pub(crate) fn spans(&self) -> [PortSpan; 2] {
        [
            self.ingress.unwrap_or_default(),
            self.egress.unwrap_or_default(),
        ]
    }

    /// Whether the policy applies to the direction.
    #[inline]
    pub(crate) fn applies(&self, ingress: bool) -> bool {
        if ingress {
            self.ingress.is_some()
        } else {
            self.egress.is_some()
        }
    }

    fn ops(&self, ingress: bool) -> &[Op] {
        let at = (self.egress_at as usize).min(self.ops.len());
        if ingress {
            &self.ops[..at]
        } else {
            &self.ops[at..]
        }
    }

    /// The rules of a direction, in order: each one's port ops (none: every port of every
    /// protocol) and peer ops (none: every peer), to read with [`Program::peers`].
    pub(crate) fn rules(&self, ingress: bool) -> impl Iterator<Item = (&[Op], &[Op])> {
        let ops = self.ops(ingress);
        let mut at = 0;
        std::iter::from_fn(move || {
            let &Op::Rule { ports, len, .. } = ops.get(at)? else {
                return None;
            };
            let rule = ops.get(at + 1..at + len as usize).unwrap_or_default();
            at += (len as usize).max(1);
            Some(rule.split_at((ports as usize).min(rule.len())))
        })
    }

    /// The peers of a rule's peer ops, in order; a malformed op ends them.
    pub(crate) fn peers<'a>(&'a self, ops: &'a [Op]) -> impl Iterator<Item = PeerOp<'a>> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (len, peer) = match *ops.get(at)? {
                Op::Block { block } => (0, PeerOp::Block(self.blocks.get(block as usize))),
                Op::Local { ns, len } => (
                    len,
                    PeerOp::Local {
                        ns,
                        reqs: reqs(ops, at, len),
                    },
                ),
                Op::Namespaces { sel, len } => (
                    len,
                    PeerOp::Namespaces {
                        sel,
                        reqs: reqs(ops, at, len),
                    },
                ),
                _ => return None,
            };
            at += 1 + len as usize;
            Some(peer)
        })
    }

    /// Calls `allow(rule, peer)` for every rule of the direction that admits the connection,
    /// with the index of its first matching peer ([`RuleRef::EVERY_PEER`] for a rule without
    /// peers).
    #[inline]
    pub(crate) fn admit(
        &self,
        q: &Query<'_>,
        ns_selected: impl Fn(u32, u32) -> bool,
        mut allow: impl FnMut(u32, u32),
    ) {
        let (port, protocol) = (q.port, q.protocol);
        let span = if q.ingress { self.ingress } else { self.egress };
        if !span.is_some_and(|s| s.admits(port, protocol)) {
            return;
        }
        for (index, (port_ops, peer_ops)) in (0u32..).zip(self.rules(q.ingress)) {
            let port_ok = port_ops.is_empty()
                || port_ops.iter().any(|op| match *op {
                    Op::Ports {
                        protocol: p,
                        lo,
                        hi,
                    } => p == protocol && (lo..=hi).contains(&port),
                    // A named port never matches an address that is not a pod.
                    Op::NamedPort { protocol: p, name } => {
                        p == protocol
                            && q.dst_ports.is_some_and(|named| {
                                named_port(named, name, protocol) == Some(port)
                            })
                    }
                    _ => false,
                });
            if port_ok {
                let matched = if peer_ops.is_empty() {
                    Some(RuleRef::EVERY_PEER)
                } else {
                    (0u32..)
                        .zip(self.peers(peer_ops))
                        .find(|(_, peer)| peer.admits(q.peer_ip, q.peer_pod, &ns_selected))
                        .map(|(k, _)| k)
                };
                if let Some(k) = matched {
                    allow(index, k);
                }
            }
        }
    }

    /// What peer `peer` of rule `rule` of a direction is, for explanations.
    pub(crate) fn peer_kind(&self, ingress: bool, rule: u32, peer: u32) -> Option<PeerKind> {
        let (_, peer_ops) = self.rules(ingress).nth(rule as usize)?;
        if peer_ops.is_empty() {
            return Some(PeerKind::Every);
        }
        Some(match self.peers(peer_ops).nth(peer as usize)? {
            PeerOp::Block(_) => PeerKind::Block,
            PeerOp::Local { .. } => PeerKind::Local,
            PeerOp::Namespaces { sel, .. } => PeerKind::Namespaces(sel),
        })
    }
}

/// The number of the port called `name` over `protocol` among a pod's named ports.
#[inline]
pub(crate) fn named_port(
    named: &[(Sym, Protocol, u16)],
    name: Sym,
    protocol: Protocol,
) -> Option<u16> {
    named
        .iter()
        .find(|&&(n, pr, _)| n == name && pr == protocol)
        .map(|&(_, _, number)| number)
}

/// One peer of a rule, read from its ops.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PeerOp<'a> {
    /// An ipBlock (`None`: a dangling index, which matches nothing).
    Block(Option<&'a Block>),
    /// Pods of namespace `ns` (of the policy's cluster) matching `reqs`.
    Local { ns: u32, reqs: &'a [Op] },
    /// Pods of namespaces matching namespace selector `sel` (of every cluster) and `reqs`.
    Namespaces { sel: u32, reqs: &'a [Op] },
}

impl PeerOp<'_> {
    /// Whether the peer admits a pod of namespace `ns` with `labels` (an ipBlock admits
    /// addresses, never a pod as such).
    #[inline]
    pub(crate) fn admits_pod(
        &self,
        ns: u32,
        labels: &LabelSet,
        ns_selected: &impl Fn(u32, u32) -> bool,
    ) -> bool {
        match *self {
            PeerOp::Block(_) => false,
            PeerOp::Local { ns: own, reqs } => ns == own && selector_matches(reqs, labels),
            PeerOp::Namespaces { sel, reqs } => {
                ns_selected(ns, sel) && selector_matches(reqs, labels)
            }
        }
    }

    /// Whether the peer admits the end at `ip`, which is the pod `pod` (its namespace and
    /// labels) when it is one.
    #[inline]
    fn admits(
        &self,
        ip: IpAddr,
        pod: Option<(u32, &LabelSet)>,
        ns_selected: &impl Fn(u32, u32) -> bool,
    ) -> bool {
        match self {
            PeerOp::Block(block) => block.is_some_and(|b| b.contains(ip)),
            _ => pod.is_some_and(|(ns, labels)| self.admits_pod(ns, labels, ns_selected)),
        }
    }
}

/// The `len` ops after the peer head at `at`.
#[inline]
fn reqs(ops: &[Op], at: usize, len: u32) -> &[Op] {
    ops.get(at + 1..at + 1 + len as usize).unwrap_or_default()
}

/// A CIDR as integers: the address with its host bits cleared, and the prefix mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    v6: bool,
    net: u128,
    mask: u128,
}

impl Cidr {
    fn new(net: &IpNet) -> Self {
        let (v6, bits, width) = Self::bits(net.network());
        let prefix = u32::from(net.prefix_len());
        let mask = if prefix == 0 {
            0
        } else {
            (u128::MAX << (width - prefix)) & (u128::MAX >> (128 - width))
        };
        Self {
            v6,
            net: bits & mask,
            mask,
        }
    }

    /// (is IPv6, the address as an integer, its width in bits).
    #[inline]
    fn bits(ip: IpAddr) -> (bool, u128, u32) {
        match ip {
            IpAddr::V4(a) => (false, u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (true, u128::from(a), 128),
        }
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        let (v6, bits, _) = Self::bits(ip);
        v6 == self.v6 && bits & self.mask == self.net
    }

    /// The first and last address of the CIDR, as integers.
    fn range(&self) -> (u128, u128) {
        let width = if self.v6 { 128 } else { 32 };
        (
            self.net,
            self.net | (!self.mask & (u128::MAX >> (128 - width))),
        )
    }
}

/// A compiled ipBlock: a CIDR minus exceptions, tested with integer masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Block {
    cidr: Cidr,
    except: Box<[Cidr]>,
}

impl Block {
    fn new(b: &IpBlock) -> Self {
        Self {
            cidr: Cidr::new(&b.cidr),
            except: b.except.iter().map(Cidr::new).collect(),
        }
    }

    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && !self.except.iter().any(|e| e.contains(ip))
    }

    /// The block as sorted, disjoint (first, last) address ranges: the CIDR with every
    /// exception cut out. Exact whatever the exceptions are: one outside the CIDR or of the
    /// other family removes nothing, one covering it removes everything.
    pub(crate) fn ranges(&self) -> Vec<(IpAddr, IpAddr)> {
        let mut ranges = vec![self.cidr.range()];
        for except in self.except.iter().filter(|e| e.v6 == self.cidr.v6) {
            let (lo, hi) = except.range();
            ranges = ranges
                .into_iter()
                .flat_map(|(a, b)| {
                    let below = (a < lo).then(|| (a, b.min(lo - 1)));
                    let above = (b > hi).then(|| (a.max(hi + 1), b));
                    below.into_iter().chain(above)
                })
                .collect();
        }
        let ip = |bits: u128| match self.cidr.v6 {
            true => IpAddr::V6(bits.into()),
            // An IPv4 CIDR's range stays within 32 bits.
            false => IpAddr::V4(u32::try_from(bits).unwrap_or(u32::MAX).into()),
        };
        ranges.into_iter().map(|(a, b)| (ip(a), ip(b))).collect()
    }
}

/// What kind of peer admitted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerKind {
    /// A rule without peers.
    Every,
    /// Pods of the policy's own namespace.
    Local,
    /// Pods of namespaces chosen by this namespace selector.
    Namespaces(u32),
    /// An ipBlock.
    Block,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_blocks_agree_with_ipnet() {
        let cases = [
            ("10.0.0.0/8", vec!["10.1.0.0/16"]),
            ("0.0.0.0/0", vec![]),
            ("::/0", vec![]),
            ("fd00::/8", vec!["fd00:1::/32"]),
            ("192.168.1.7/32", vec![]),
            ("2001:db8::1/128", vec![]),
        ];
        let ips = [
            "10.0.0.1",
            "10.1.2.3",
            "11.0.0.1",
            "192.168.1.7",
            "192.168.1.8",
            "0.0.0.0",
            "255.255.255.255",
            "fd00::1",
            "fd00:1::1",
            "fe00::1",
            "2001:db8::1",
            "::",
            "::1",
        ];
        for (cidr, except) in cases {
            let block = IpBlock {
                cidr: cidr.parse().expect("cidr"),
                except: except.iter().map(|e| e.parse().expect("cidr")).collect(),
            };
            let compiled = Block::new(&block);
            for ip in ips {
                let ip: IpAddr = ip.parse().expect("ip");
                assert_eq!(compiled.contains(ip), block.contains(ip), "{cidr} {ip}");
            }
        }
    }

    #[test]
    fn block_ranges_are_exactly_the_addresses_it_contains_whatever_its_exceptions() {
        // Odd exceptions the loader refuses, should one ever get here: outside the CIDR, of
        // the other family, covering it, overlapping each other. None may widen the block.
        let cases = [
            (
                "10.0.0.0/8",
                vec!["10.1.0.0/16", "10.1.2.0/24", "10.255.255.0/24"],
            ),
            ("10.0.0.0/8", vec!["11.0.0.0/8", "fd00::/8"]),
            ("10.1.0.0/16", vec!["10.0.0.0/8"]),
            ("10.0.0.0/8", vec!["10.0.0.0/9", "10.64.0.0/10"]),
            ("0.0.0.0/0", vec!["0.0.0.0/32", "255.255.255.255/32"]),
            ("fd00::/16", vec!["fd00::/17", "fd00:ffff::/32"]),
            ("::/0", vec![]),
        ];
        let ips = [
            "0.0.0.0",
            "9.255.255.255",
            "10.0.0.0",
            "10.0.255.255",
            "10.1.0.0",
            "10.1.2.3",
            "10.1.255.255",
            "10.2.0.0",
            "10.63.255.255",
            "10.64.0.0",
            "10.127.255.255",
            "10.128.0.0",
            "10.255.254.255",
            "10.255.255.0",
            "10.255.255.255",
            "11.0.0.0",
            "255.255.255.255",
            "::",
            "fd00::",
            "fd00:7fff::",
            "fd00:8000::",
            "fd00:fffe::1",
            "fd00:ffff::1",
            "fd01::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for (cidr, except) in cases {
            let block = Block {
                cidr: Cidr::new(&cidr.parse().expect("cidr")),
                except: except
                    .iter()
                    .map(|e| Cidr::new(&e.parse().expect("cidr")))
                    .collect(),
            };
            let ranges = block.ranges();
            for w in ranges.windows(2) {
                assert!(w[0].1 < w[1].0, "{cidr}: sorted and disjoint: {ranges:?}");
            }
            for ip in ips {
                let ip: IpAddr = ip.parse().expect("ip");
                let in_ranges = ranges.iter().any(|&(a, b)| (a..=b).contains(&ip));
                assert_eq!(
                    in_ranges,
                    block.contains(ip),
                    "{cidr} minus {except:?}: {ip}"
                );
            }
        }
    }

    #[test]
    fn ops_stay_small() {
        assert!(std::mem::size_of::<Op>() <= 12);
    }

    #[test]
    fn compiled_selectors_follow_upstream() {
        let mut i = Interner::default();
        let labels: crate::model::Labels = [("app", "web"), ("tier", "front")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let set = LabelSet::new(&labels, &mut i);
        let mut sel = |yaml: serde_json::Value| {
            let api = serde_json::from_value(yaml).expect("selector");
            Selector::new(&LabelSelector::from_api(&api, "s").expect("valid"), &mut i)
        };
        let cases = [
            (serde_json::json!({}), true),
            (serde_json::json!({"matchLabels": {"app": "web"}}), true),
            (serde_json::json!({"matchLabels": {"app": "db"}}), false),
            (
                serde_json::json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "web"]}]}),
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db", "web"]}]}),
                false,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["a"]}, {"key": "tier", "operator": "Exists"}]}),
                true,
            ),
            (
                serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
                false,
            ),
        ];
        for (yaml, want) in cases {
            let s = sel(yaml.clone());
            assert_eq!(s.matches(&set), want, "{yaml}");
        }
    }
}
