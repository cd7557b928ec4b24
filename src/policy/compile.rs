//! Compiled forms of selectors and rules: symbols instead of strings, so that matching a
//! connection allocates nothing and compares integers.

use std::net::IpAddr;

use super::intern::{Interner, LabelSet, Sym};
use crate::model::{IpBlock, LabelSelector, Operator, PortSpec, Protocol};

/// One compiled selector requirement.
#[derive(Debug, Clone)]
enum Req {
    Eq(Sym, Sym),
    In(Sym, Box<[Sym]>),
    NotIn(Sym, Box<[Sym]>),
    Exists(Sym),
    DoesNotExist(Sym),
}

/// A compiled label selector; no requirements selects everything.
#[derive(Debug, Clone)]
pub(crate) struct Selector(Box<[Req]>);

impl Selector {
    /// Compiles `sel`, interning its keys and values.
    pub(crate) fn new(sel: &LabelSelector, interner: &mut Interner) -> Self {
        let mut reqs: Vec<Req> = sel
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
        Self(reqs.into_boxed_slice())
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
    pub(crate) ports: Box<[Port]>,
    pub(crate) peers: Box<[Peer]>,
}
