//! Compiled forms of selectors and rules: symbols instead of strings, so that matching a
//! connection allocates nothing and compares integers.

use std::net::IpAddr;

use smallvec::SmallVec;

use super::intern::{Interner, LabelSet, Sym};
use crate::model::{IpBlock, LabelSelector, Operator, PortSpec, Protocol};

/// Values of an `In`/`NotIn` requirement, inline for the usual few.
type Values = SmallVec<[Sym; 3]>;

/// One compiled selector requirement.
#[derive(Debug, Clone)]
enum Req {
    Eq(Sym, Sym),
    In(Sym, Values),
    NotIn(Sym, Values),
    Exists(Sym),
    DoesNotExist(Sym),
}

/// A compiled label selector; no requirements selects everything. Compiled rules keep their
/// parts inline (no pointer per selector, port or peer) so that evaluating a policy touches
/// few cache lines.
#[derive(Debug, Clone)]
pub(crate) struct Selector(SmallVec<[Req; 2]>);

impl Selector {
    /// Compiles `sel`, interning its keys and values.
    pub(crate) fn new(sel: &LabelSelector, interner: &mut Interner) -> Self {
        let mut reqs: SmallVec<[Req; 2]> = sel
            .match_labels
            .iter()
            .map(|(k, v)| Req::Eq(interner.intern(k), interner.intern(v)))
            .collect();
        for r in &sel.match_expressions {
            let key = interner.intern(&r.key);
            let mut values = || r.values.iter().map(|v| interner.intern(v)).collect();
            reqs.push(match r.operator {
                Operator::In => Req::In(key, values()),
                Operator::NotIn => Req::NotIn(key, values()),
                Operator::Exists => Req::Exists(key),
                Operator::DoesNotExist => Req::DoesNotExist(key),
            });
        }
        Self(reqs)
    }

    /// Whether `labels` satisfy every requirement.
    #[inline]
    pub(crate) fn matches(&self, labels: &LabelSet) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => labels.get(*k) == Some(*v),
            Req::In(k, vs) => labels.get(*k).is_some_and(|v| vs.contains(&v)),
            Req::NotIn(k, vs) => labels.get(*k).is_none_or(|v| !vs.contains(&v)),
            Req::Exists(k) => labels.get(*k).is_some(),
            Req::DoesNotExist(k) => labels.get(*k).is_none(),
        })
    }
}

/// Which ports a compiled port entry admits.
#[derive(Debug, Clone)]
pub(crate) enum PortMatch {
    /// Every port of the protocol.
    Any,
    /// An inclusive range.
    Range(u16, u16),
    /// A container port name, resolved on the destination pod.
    Named(Sym),
}

/// A compiled port entry.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    pub(crate) protocol: Protocol,
    pub(crate) port: PortMatch,
}

impl Port {
    /// Compiles a model port entry.
    pub(crate) fn new(
        protocol: Protocol,
        spec: Option<&PortSpec>,
        interner: &mut Interner,
    ) -> Self {
        let port = match spec {
            None => PortMatch::Any,
            Some(PortSpec::Range { start, end }) => PortMatch::Range(*start, *end),
            Some(PortSpec::Named(n)) => PortMatch::Named(interner.intern(n)),
        };
        Self { protocol, port }
    }
}

/// A compiled peer. Namespaces and namespace selectors are referred to by index into the
/// engine's tables.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    /// Pods of one namespace (of one cluster) matching the selector.
    Local { ns: u32, pods: Selector },
    /// Pods of every namespace matching namespace selector `ns_sel`, optionally filtered.
    Namespaces { ns_sel: u32, pods: Option<Selector> },
    /// Addresses.
    Block(IpBlock),
}

impl Peer {
    /// Whether an address-only peer (not a pod) at `ip` matches.
    #[inline]
    pub(crate) fn matches_address(&self, ip: IpAddr) -> bool {
        matches!(self, Peer::Block(b) if b.contains(ip))
    }
}

/// A compiled rule; empty ports or peers match everything.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) ports: SmallVec<[Port; 2]>,
    pub(crate) peers: SmallVec<[Peer; 1]>,
}

/// The ports and protocols some rule of a set could admit: a cheap test that lets a decision
/// skip a policy without reading its rules. No rules admit nothing.
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

    /// The span of `rules`.
    pub(crate) fn of(rules: &[Rule]) -> Self {
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
                let (lo, hi) = match p.port {
                    PortMatch::Range(lo, hi) => (lo, hi),
                    // Named ports resolve per destination pod: any number.
                    PortMatch::Any | PortMatch::Named(_) => (0, u16::MAX),
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
