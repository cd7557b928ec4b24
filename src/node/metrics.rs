//! A node's counters: connections opened and closed by direction and verdict, bytes carried,
//! denials by layer and reason, table restores. Labels are bounded sets (direction, verdict,
//! layer, reason): never an address or an authority a peer chose (THREATS 47).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::decision::{Decision, Direction};

/// Labels of a decided connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Decided {
    direction: &'static str,
    verdict: &'static str,
}

/// Labels of a denial.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Denied {
    direction: &'static str,
    layer: &'static str,
    /// [`Denial`](super::decision::Denial) in one word.
    reason: &'static str,
}

/// Labels of carried bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Carried {
    direction: &'static str,
    /// `sent` (towards the destination) or `received` (back from it).
    flow: &'static str,
}

/// Labels of a closed connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Closed {
    direction: &'static str,
    /// `done` (either side closed), `policy` (tightened), `error`.
    cause: &'static str,
}

/// Labels of a CONNECT refused before admission.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct Malformed {
    /// The status answered: one of the few the HBONE server answers, never a peer's text.
    status: u16,
}

/// The node's counters; shared behind an `Arc`, registered at each scrape.
#[derive(Debug, Default)]
pub struct Metrics {
    opened: Family<Decided, Counter>,
    denied: Family<Denied, Counter>,
    closed: Family<Closed, Counter>,
    bytes: Family<Carried, Counter>,
    audit_denials: Counter,
    malformed: Family<Malformed, Counter>,
}

/// Why a carried connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// Either side closed it.
    Done,
    /// A tightened policy no longer allows it.
    Policy,
    /// The transport failed.
    Error,
}

impl Metrics {
    /// Counts one decision.
    pub fn decided(&self, decision: &Decision) {
        let direction = decision.direction.as_str();
        self.opened
            .get_or_create(&Decided {
                direction,
                verdict: decision.verdict(),
            })
            .inc();
        if decision.audit.is_some() {
            self.audit_denials.inc();
        }
        if !decision.allowed {
            self.denied
                .get_or_create(&Denied {
                    direction,
                    layer: decision.layer.as_str(),
                    reason: decision.denial.map_or("", |d| d.as_str()),
                })
                .inc();
        }
    }

    /// Counts a CONNECT refused before admission with `status`.
    pub fn malformed(&self, status: http::StatusCode) {
        self.malformed
            .get_or_create(&Malformed {
                status: status.as_u16(),
            })
            .inc();
    }

    /// Counts the end of a carried connection and its bytes.
    pub fn closed(&self, direction: Direction, cause: CloseCause, sent: u64, received: u64) {
        let direction = direction.as_str();
        let cause = match cause {
            CloseCause::Done => "done",
            CloseCause::Policy => "policy",
            CloseCause::Error => "error",
        };
        self.closed
            .get_or_create(&Closed { direction, cause })
            .inc();
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.bytes
                .get_or_create(&Carried { direction, flow })
                .inc_by(n);
        }
    }

    /// Adds the counters to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections_decided",
            "Connections judged, by direction and verdict.",
            self.opened.clone(),
        );
        registry.register(
            "connections_denied",
            "Connections denied, by direction, the layer that denied them and why in one word.",
            self.denied.clone(),
        );
        registry.register(
            "connections_closed",
            "Carried connections closed, by direction and cause (done, policy, error).",
            self.closed.clone(),
        );
        registry.register(
            "identity_audit_denials",
            "Connections that identity rules in Audit mode would have denied (never enforced).",
            self.audit_denials.clone(),
        );
        registry.register(
            "hbone_requests_malformed",
            "CONNECTs refused before admission (malformed, ambiguous, not a tunnel), by status.",
            self.malformed.clone(),
        );
        registry.register(
            "bytes",
            "Bytes carried, by direction and flow (sent to the destination, received from it).",
            self.bytes.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::decision::{Denial, Layer};
    use super::*;

    #[test]
    fn counts_decisions_denials_and_bytes_without_addresses() {
        let m = Metrics::default();
        let d = Decision::new(
            Direction::Outbound,
            "10.0.0.1:1234".parse().expect("addr"),
            "10.0.0.2:80".parse().expect("addr"),
        );
        m.decided(&d.clone().allowed_by(Layer::NetworkPolicy, "ok"));
        let mut audited = d.clone().allowed_by(Layer::NetworkPolicy, "ok");
        audited.audit = Some("identity rules in Audit mode (c/ns/p) would deny".into());
        m.decided(&audited);
        m.decided(&d.denied(Layer::Identity, Denial::Identity, "no"));
        m.closed(Direction::Outbound, CloseCause::Done, 10, 20);
        let mut registry = Registry::with_prefix("weft_node");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("weft_node_identity_audit_denials_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"weft_node_connections_decided_total{direction="outbound",verdict="allow"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"weft_node_connections_denied_total{direction="outbound",layer="identity",reason="identity"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"weft_node_bytes_total{direction="outbound",flow="received"} 20"#),
            "{text}"
        );
        assert!(!text.contains("10.0.0"), "no addresses in labels: {text}");
    }

    #[test]
    fn malformed_connects_are_counted_by_status_only() {
        let m = Metrics::default();
        m.malformed(http::StatusCode::BAD_REQUEST);
        m.malformed(http::StatusCode::BAD_REQUEST);
        m.malformed(http::StatusCode::METHOD_NOT_ALLOWED);
        let mut registry = Registry::with_prefix("weft_node");
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for line in [
            r#"weft_node_hbone_requests_malformed_total{status="400"} 2"#,
            r#"weft_node_hbone_requests_malformed_total{status="405"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
