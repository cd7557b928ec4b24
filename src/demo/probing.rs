//! The demo's probes: placed in the lab, served by responders, made with real TCP, and
//! explained from the nodes' decision logs.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::DemoError;
use super::plane::RunningNode;
use crate::lab::{self, Lab, LabNode, LabPod};
use crate::policy::Verdict;
use crate::probe::{self, Outcome};

/// Each step of a probe (connect, answer) may take this long; a denied connection is closed
/// at once, so only an unanswered one waits it out.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after an exchange the nodes' decision lines about it are waited for.
const DECISION_WAIT: Duration = Duration::from_secs(1);

/// The probes of a scenario, placed in its lab, and what they found so far.
pub(super) struct Probes<'lab> {
    lab: &'lab Lab,
    /// In file order: where each probe is made, or why it is not.
    placed: Vec<Result<ResolvedProbe<'lab>, String>>,
    matched: usize,
    differed: usize,
    skipped: usize,
}

impl<'lab> Probes<'lab> {
    /// Places every probe of `outcomes` (one step's: every step has the same probes) in `lab`.
    pub(super) fn place(lab: &'lab Lab, outcomes: &[Outcome]) -> Self {
        Self {
            lab,
            placed: outcomes.iter().map(|o| resolve(lab, o)).collect(),
            matched: 0,
            differed: 0,
            skipped: 0,
        }
    }

    /// Serves every pod's declared TCP ports and every port a probe names, and adds the
    /// outside addresses probes come from to the wire.
    pub(super) fn serve(&self) -> Result<(), DemoError> {
        let placed = || self.placed.iter().filter_map(|p| p.as_ref().ok());
        for pod in self.lab.pods() {
            let mut ports: BTreeSet<u16> = pod.tcp_ports.iter().copied().collect();
            ports.extend(placed().filter(|p| std::ptr::eq(p.to, pod)).map(|p| p.port));
            for port in ports {
                let addr = SocketAddr::new(IpAddr::V4(pod.ip), port);
                self.lab.serve_responder(&pod.netns, addr, &pod.key())?;
            }
        }
        let outside: BTreeSet<Ipv4Addr> = placed()
            .filter_map(|p| match p.from {
                Source::Outside(ip) if ip != self.lab.wire_ip() => Some(ip),
                _ => None,
            })
            .collect();
        for ip in outside {
            self.lab
                .wire()
                .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        }
        Ok(())
    }

    /// Makes every probe of step `step` (from 1), whose expected outcomes are `outcomes`, and
    /// prints each with what the `nodes` logged about it.
    pub(super) async fn run_step(
        &mut self,
        step: usize,
        outcomes: &[Outcome],
        nodes: &[RunningNode<'_>],
    ) {
        for (n, (outcome, probe)) in outcomes.iter().zip(&self.placed).enumerate() {
            let header = format!(
                "{} -> {} {}/{}",
                outcome.from, outcome.to, outcome.port, outcome.protocol
            );
            let probe = match probe {
                Ok(probe) => probe,
                Err(why) => {
                    println!("  [skip] {header}: {why}; not probed");
                    self.skipped += 1;
                    continue;
                }
            };
            let line = format!("weft demo step {step} probe {}", n + 1);
            let observed = run_probe(self.lab, nodes, probe, &line).await;
            if (outcome.verdict == Verdict::Allow) == observed.allowed {
                self.matched += 1;
            } else {
                self.differed += 1;
            }
            print_probe(&header, outcome, &observed);
        }
    }

    /// Prints the tally; true when every probe made was observed as expected.
    pub(super) fn summary(&self) -> bool {
        println!(
            "{} probes made: {} as expected, {} not; {} not probed",
            self.matched + self.differed,
            self.matched,
            self.differed,
            self.skipped
        );
        self.differed == 0
    }
}

/// Where a probe is made from.
#[derive(Debug)]
enum Source<'lab> {
    /// A pod's namespace.
    Pod(&'lab LabPod),
    /// A node's namespace (a host-network source).
    Node(&'lab LabNode),
    /// The wire, from an address outside every cluster added there.
    Outside(Ipv4Addr),
}

/// A probe as the lab makes it.
#[derive(Debug)]
struct ResolvedProbe<'lab> {
    from: Source<'lab>,
    to: &'lab LabPod,
    port: u16,
}

/// Where probe `o` is made in the lab, or why it cannot be.
fn resolve<'lab>(lab: &'lab Lab, o: &Outcome) -> Result<ResolvedProbe<'lab>, String> {
    if !o.protocol.eq_ignore_ascii_case("tcp") {
        return Err(format!("{}: only TCP is probed", o.protocol));
    }
    let port = o
        .port
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("port {}", o.port))?;
    let from = match place(lab, &o.from)? {
        Place::Pod(pod) => Source::Pod(pod),
        Place::Node(node) => Source::Node(node),
        Place::Outside(ip) => Source::Outside(ip),
    };
    let to = match place(lab, &o.to)? {
        Place::Pod(pod) => pod,
        Place::Node(_) | Place::Outside(_) => {
            return Err(format!("{} is not a pod of the lab", o.to));
        }
    };
    Ok(ResolvedProbe { from, to, port })
}

/// Where one end of a probe is.
enum Place<'lab> {
    Pod(&'lab LabPod),
    Node(&'lab LabNode),
    Outside(Ipv4Addr),
}

/// Where `end` (`cluster/namespace/pod` or an address) is in the lab.
fn place<'lab>(lab: &'lab Lab, end: &str) -> Result<Place<'lab>, String> {
    if let Ok(ip) = end.parse::<IpAddr>() {
        let IpAddr::V4(v4) = ip.to_canonical() else {
            return Err(format!("{end}: IPv6 is not probed"));
        };
        if let Some(pod) = lab.pod_at(IpAddr::V4(v4)) {
            return Ok(Place::Pod(pod));
        }
        if let Some(node) = lab.nodes().iter().find(|n| n.ip == v4) {
            return Ok(Place::Node(node));
        }
        return Ok(Place::Outside(v4));
    }
    let mut parts = end.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(ns), Some(name)) => lab.pod(c, ns, name).map(Place::Pod).ok_or_else(|| {
            format!("{end} has no namespace in the lab (host network, or not scheduled)")
        }),
        _ => Err(format!("{end}: not a pod or an address")),
    }
}

/// What a probe saw.
struct Observed {
    allowed: bool,
    exchange: lab::Exchange,
    decisions: Vec<(String, DecisionLine)>,
}

async fn run_probe(
    lab: &Lab,
    nodes: &[RunningNode<'_>],
    probe: &ResolvedProbe<'_>,
    line: &str,
) -> Observed {
    let to = SocketAddr::new(IpAddr::V4(probe.to.ip), probe.port);
    let (netns, from, source_ip) = match &probe.from {
        Source::Pod(pod) => (&pod.netns, None, pod.ip),
        Source::Node(node) => (&node.netns, None, node.ip),
        Source::Outside(ip) => (lab.wire(), Some(IpAddr::V4(*ip)), *ip),
    };
    let marks: Vec<usize> = nodes.iter().map(|n| n.process.output().mark()).collect();
    let exchange = lab::exchange(netns, from, to, line, PROBE_TIMEOUT).await;
    let about = |d: &DecisionLine| {
        d.destination == to.to_string()
            && d.source
                .parse::<SocketAddr>()
                .is_ok_and(|s| s.ip() == IpAddr::V4(source_ip))
    };
    let collect = || {
        nodes
            .iter()
            .zip(&marks)
            .flat_map(|(n, mark)| {
                n.process
                    .output()
                    .since(*mark)
                    .into_iter()
                    .filter_map(|line| decision_line(&line))
                    .filter(|d| about(d))
                    .map(|d| (n.node.name.clone(), d))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    // Nodes log a decision before they pass or close the connection, but their lines reach
    // the demo through pipes: give them a moment.
    let deadline = tokio::time::Instant::now() + DECISION_WAIT;
    while collect().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    Observed {
        allowed: exchange.outcome.allowed(),
        exchange,
        decisions: collect(),
    }
}

fn print_probe(header: &str, outcome: &Outcome, observed: &Observed) {
    let expected = outcome.verdict;
    let seen = if observed.allowed { "allow" } else { "deny" };
    let ok = (expected == Verdict::Allow) == observed.allowed;
    println!(
        "  [{}] {header}: expected {expected}, observed {seen} ({})",
        if ok { " ok " } else { "DIFF" },
        observed.exchange.outcome
    );
    // The layer that decided: the first that denies, else the last one passed.
    let identity = outcome
        .identity
        .as_ref()
        .map(|d| format!("identity {}", probe::describe_identity(d)));
    let engine = if outcome.egress.verdict == Verdict::Deny {
        format!("egress {}", outcome.egress)
    } else if outcome.ingress.verdict == Verdict::Deny {
        format!("ingress {}", outcome.ingress)
    } else {
        match identity {
            Some(identity) => format!("ingress {}; {identity}", outcome.ingress),
            None => format!("ingress {}", outcome.ingress),
        }
    };
    println!("         engine: {engine}");
    if observed.decisions.is_empty() {
        println!("         nodes: no decision logged for this connection");
    }
    for (node, d) in &observed.decisions {
        let identity = |id: &str| {
            if id.is_empty() {
                "(none)".to_owned()
            } else {
                id.to_owned()
            }
        };
        // A denial's word, after its layer: `deny by networkpolicy (ingress)`.
        let denial = if d.denial.is_empty() {
            String::new()
        } else {
            format!(" ({})", d.denial)
        };
        println!(
            "         {node} {}: {} by {}{denial}: {}; identities {} -> {}",
            d.direction,
            d.verdict,
            d.layer,
            d.reason,
            identity(&d.source_identity),
            identity(&d.destination_identity)
        );
    }
}

/// One decision line of a node's log (`target: weft::decision`).
#[derive(Debug, Deserialize)]
struct DecisionLine {
    direction: String,
    source: String,
    destination: String,
    #[serde(default)]
    source_identity: String,
    #[serde(default)]
    destination_identity: String,
    verdict: String,
    layer: String,
    /// Why a denial, in one word (absent from an allow's line, empty in older logs).
    #[serde(default)]
    denial: String,
    reason: String,
}

fn decision_line(line: &str) -> Option<DecisionLine> {
    #[derive(Deserialize)]
    struct Event {
        target: String,
        fields: serde_json::Value,
    }
    let event: Event = serde_json::from_str(line).ok()?;
    if event.target != "weft::decision" {
        return None;
    }
    serde_json::from_value(event.fields).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_lines_are_read_from_the_json_log() {
        let line = r#"{"timestamp":"2026-11-29T17:00:00Z","level":"INFO","fields":{"message":"decision","direction":"inbound","source":"10.1.1.20:40000","destination":"10.2.1.10:80","source_pod":"cluster-1/demo-c1/tmp-client","destination_pod":"cluster-2/demo-c2/web-c2","source_identity":"spiffe://cluster-1/ns/demo-c1/sa/default","destination_identity":"spiffe://cluster-2/ns/demo-c2/sa/default","verdict":"allow","layer":"networkpolicy","reason":"allowed by cluster-2/demo-c2/default-deny-ingress rule 0"},"target":"weft::decision"}"#;
        let d = decision_line(line).expect("a decision");
        assert_eq!(
            (d.direction.as_str(), d.verdict.as_str()),
            ("inbound", "allow")
        );
        assert_eq!(d.destination, "10.2.1.10:80");
        assert!(decision_line(&line.replace("weft::decision", "weft::node")).is_none());
        assert!(decision_line("not json").is_none());
    }
}
