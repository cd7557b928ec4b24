//! Why a connection would be allowed or denied on this node, asked on the admin endpoint as
//! `/explain?from=SOURCE_IP&to=DESTINATION_IP:PORT[&identity=SPIFFE_ID]` (or with `weft
//! explain`): the question, and the answer — the decisions this node's listeners would make,
//! by their own code, with nothing dialled, logged or counted.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

use super::decision::{Decision, Denial, Direction, Layer};
use super::inbound::{NodeAdmission, meshed_identity};
use super::local::{local_pod, view_complete};
use super::outbound::{self, Route};
use crate::identity::WorkloadId;
use crate::model::ClusterId;
use crate::policy::{Endpoint, Engine};
use crate::proxy::Inbound;
use crate::tracker::replica::Replica;

/// How to ask.
pub const USAGE: &str =
    "/explain?from=SOURCE_IP&to=DESTINATION_IP:PORT, optionally &identity=SPIFFE_ID";

/// The longest part of a bad question an error repeats.
const ECHO_LIMIT: usize = 128;

/// A TCP connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The source address.
    pub from: IpAddr,
    /// The destination address and port (a Service's, or a pod's).
    pub to: SocketAddr,
    /// The identity the source proves on a tunnel (by default a meshed source pod's own).
    pub identity: Option<WorkloadId>,
}

/// Why a question could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuestionError {
    /// A parameter is missing.
    #[error("missing {0} (ask {USAGE})")]
    Missing(&'static str),
    /// A parameter is given twice.
    #[error("{0} given twice")]
    Repeated(&'static str),
    /// A parameter is not one of the question's.
    #[error("unknown parameter {0:?} (ask {USAGE})")]
    Unknown(String),
    /// A parameter's value is not what it must be.
    #[error("{name}={value:?}: {why}")]
    Invalid {
        /// The parameter.
        name: &'static str,
        /// Its value (cut short).
        value: String,
        /// What is wrong with it.
        why: String,
    },
}

/// The question's parameters, in order.
const PARAMETERS: [&str; 3] = ["from", "to", "identity"];

impl Question {
    /// Reads a question from a URL query (`from=…&to=…&identity=…`, percent-encoded).
    pub fn parse(query: &str) -> Result<Self, QuestionError> {
        let mut given: [Option<String>; 3] = Default::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            let Some(i) = PARAMETERS.iter().position(|name| *name == key) else {
                return Err(QuestionError::Unknown(cut(&key)));
            };
            if given[i].replace(value.into_owned()).is_some() {
                return Err(QuestionError::Repeated(PARAMETERS[i]));
            }
        }
        let [from, to, identity] = given;
        let from = from.ok_or(QuestionError::Missing("from"))?;
        let from = from
            .parse::<IpAddr>()
            .map_err(|_| invalid("from", &from, "not an IP address"))?
            .to_canonical();
        let to_text = to.ok_or(QuestionError::Missing("to"))?;
        let to: SocketAddr = to_text.parse().map_err(|_| {
            invalid(
                "to",
                &to_text,
                "not an address and port (IP:PORT, or [IPv6]:PORT)",
            )
        })?;
        if to.port() == 0 {
            return Err(invalid("to", &to_text, "port 0 is never connected to"));
        }
        let identity = identity
            .map(|id| WorkloadId::parse(&id).map_err(|e| invalid("identity", &id, e)))
            .transpose()?;
        Ok(Self {
            from,
            to: SocketAddr::new(to.ip().to_canonical(), to.port()),
            identity,
        })
    }

    /// The question as a URL query, as [`Question::parse`] reads it.
    pub fn to_query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query
            .append_pair("from", &self.from.to_string())
            .append_pair("to", &self.to.to_string());
        if let Some(identity) = &self.identity {
            query.append_pair("identity", &identity.to_string());
        }
        query.finish()
    }
}

fn invalid(name: &'static str, value: &str, why: impl ToString) -> QuestionError {
    QuestionError::Invalid {
        name,
        value: cut(value),
        why: why.to_string(),
    }
}

/// `text`, cut to [`ECHO_LIMIT`] characters: an error repeats what it was given, not all of it.
fn cut(text: &str) -> String {
    text.chars().take(ECHO_LIMIT).collect()
}

/// Why a question has no answer here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// The node's view is not complete: it would refuse every connection.
    #[error("not ready: {0}")]
    NotReady(String),
    /// Neither end is a pod of this node: its listeners never see the connection.
    #[error("neither end is a pod of node {node}: {whereabouts}")]
    NotHere {
        /// `cluster/node`.
        node: String,
        /// Where the ends are, as far as the view knows.
        whereabouts: String,
    },
    /// The destination is one of weft's own listeners: such a connection is dropped unjudged.
    #[error(
        "{0} is one of weft's own listeners: a pod's connection to it is dropped before any decision"
    )]
    OwnListener(SocketAddr),
}

impl ExplainError {
    /// The HTTP status the admin endpoint answers with.
    pub fn status(&self) -> u16 {
        match self {
            ExplainError::NotReady(_) => 503,
            ExplainError::NotHere { .. } => 404,
            ExplainError::OwnListener(_) => 422,
        }
    }
}

/// What a node would do with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The node that answers: `cluster/node`.
    pub node: String,
    /// The verdict, as far as this node decides it.
    pub verdict: Outcome,
    /// The decisions this node's listeners would make, in order.
    pub decisions: Vec<Decision>,
    /// The node that decides the rest (`cluster/node`), when the connection goes on through a
    /// tunnel to another node.
    pub next: Option<String>,
}

/// The verdict of an [`Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every decision allows it, and no other node decides.
    Allow,
    /// A decision denies it.
    Deny,
    /// This node lets it go; the destination's node decides the rest.
    Continues,
}

impl Answer {
    /// The answer of node `node` made of `decisions`, with `next` deciding the rest.
    pub fn new(node: String, decisions: Vec<Decision>, next: Option<String>) -> Self {
        let verdict = if decisions.iter().any(|d| !d.allowed) {
            Outcome::Deny
        } else if next.is_some() {
            Outcome::Continues
        } else {
            Outcome::Allow
        };
        Self {
            node,
            verdict,
            decisions,
            next: next.filter(|_| verdict == Outcome::Continues),
        }
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::Continues => "allowed here, decided further at the destination's node",
        };
        writeln!(f, "node {}: {verdict}", self.node)?;
        for d in &self.decisions {
            let end = |pod: &Option<String>, id: &Option<String>| match (pod, id) {
                (Some(pod), Some(id)) => format!(" ({pod}, {id})"),
                (Some(pod), None) => format!(" ({pod}, no identity)"),
                (None, Some(id)) => format!(" ({id})"),
                (None, None) => String::new(),
            };
            writeln!(
                f,
                "  {} {}{} -> {}{}",
                d.direction,
                d.source.ip(),
                end(&d.source_pod, &d.source_identity),
                d.destination,
                end(&d.destination_pod, &d.destination_identity),
            )?;
            let denial = d.denial.map(|w| format!(" ({})", w.as_str()));
            writeln!(
                f,
                "    {} by {}{}: {}",
                d.verdict(),
                d.layer,
                denial.unwrap_or_default(),
                d.reason
            )?;
            if let Some(audit) = &d.audit {
                writeln!(f, "    audit: {audit}")?;
            }
        }
        if let Some(next) = &self.next {
            writeln!(
                f,
                "  next: node {next} decides the destination's ingress NetworkPolicy and identity rules (ask its /explain)"
            )?;
        }
        Ok(())
    }
}

/// The node a question is asked of.
#[derive(Debug, Clone, Copy)]
pub struct Here<'a> {
    /// Its cluster.
    pub cluster: &'a ClusterId,
    /// Its name.
    pub node: &'a str,
    /// Its HBONE port.
    pub hbone_port: u16,
    /// Whether capture of its pods is installed (else the hold refuses their connections).
    pub captured: bool,
}

/// What node `here` would decide about `question` on `view`, tunnels to its own pods judged
/// by `admission`: as the source's node when the source is one of its pods (then, for a tunnel
/// to another of its pods, as the destination's), else as the destination's node.
pub fn explain(
    view: &RwLock<Replica>,
    admission: &NodeAdmission,
    here: Here<'_>,
    question: &Question,
) -> Result<Answer, ExplainError> {
    let node = format!("{}/{}", here.cluster, here.node);
    let from = SocketAddr::new(question.from, 0);
    let to = question.to;
    let read = || view.read().unwrap_or_else(PoisonError::into_inner);
    let (source_is_local, meshed) = {
        let view = read();
        view_complete(&view, here.cluster).map_err(ExplainError::NotReady)?;
        let local = |ip| local_pod(&view, here.cluster, here.node, ip);
        let engine = view.engine();
        let meshed = match engine.address_endpoint(question.from) {
            Endpoint::Pod { pod, .. } => meshed_identity(engine, pod, question.from.is_ipv6()),
            _ => None,
        };
        let source_is_local = local(question.from).is_some();
        if !source_is_local && local(to.ip()).is_none() {
            let ends = [question.from, to.ip()]
                .map(|ip| match whereabouts(engine, ip) {
                    Some((pod, Some((_, node)))) => format!("{ip} is pod {pod} on {node}"),
                    Some((pod, None)) => format!("{ip} is pod {pod}, on no meshed node"),
                    None => format!("{ip} is no pod of the view"),
                })
                .join("; ");
            return Err(ExplainError::NotHere {
                node,
                whereabouts: ends,
            });
        }
        (source_is_local, meshed)
    };
    let proven = question.identity.clone().or(meshed);
    let tunnel_to = |peer: WorkloadId, destination: SocketAddr, arrived_at: SocketAddr| {
        let inbound = Inbound {
            peer,
            source: question.from,
            destination,
            arrived_at,
        };
        admission.judge(&inbound).0
    };
    if !source_is_local {
        let decision = match proven {
            Some(peer) => tunnel_to(peer, to, to),
            None => admission.judge_plaintext(from, to),
        };
        return Ok(Answer::new(node, vec![decision], None));
    }
    if !here.captured {
        let decision = Decision::new(Direction::Outbound, from, to).denied(
            Layer::View,
            Denial::NotReady,
            super::agent::HOLD_REASON,
        );
        return Ok(Answer::new(node, vec![decision], None));
    }
    let judged = outbound::judge(&read(), here.cluster, here.node, from, to, here.hbone_port);
    let (route, why, decision) = match judged {
        Ok(judged) => judged,
        Err(denied) => return Ok(Answer::new(node, vec![*denied], None)),
    };
    let outbound = decision.allowed_by(Layer::NetworkPolicy, why);
    let Route::Tunnel {
        source,
        node: tunnel,
        target,
        ..
    } = route
    else {
        return Ok(Answer::new(node, vec![outbound], None));
    };
    // A tunnel to a pod of this node comes back to this node's own HBONE listener.
    if local_pod(&read(), here.cluster, here.node, target.ip()).is_some() {
        let peer = question.identity.clone().unwrap_or(source);
        let inbound = tunnel_to(peer, target, tunnel);
        return Ok(Answer::new(node, vec![outbound, inbound], None));
    }
    let next = match whereabouts(read().engine(), target.ip()) {
        Some((_, Some((cluster, name)))) => format!("{cluster}/{name}"),
        _ => format!("of {}", target.ip()),
    };
    Ok(Answer::new(node, vec![outbound], Some(next)))
}

/// The pod at `ip` (`cluster/namespace/name`) and the cluster and name of its meshed node,
/// if the view has them.
fn whereabouts(engine: &Engine, ip: IpAddr) -> Option<(String, Option<(String, String)>)> {
    let Endpoint::Pod { pod, .. } = engine.address_endpoint(ip) else {
        return None;
    };
    let node = engine
        .pod_node_address(pod, ip.is_ipv6())
        .zip(engine.pod_cluster(pod))
        .map(|((name, _), cluster)| (cluster.to_string(), name));
    Some((engine.pod_name(pod), node))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::fixture::{c, node, pod, replica_of, service, slice};
    use super::*;
    use crate::identity::{BundleSet, TrustStore};
    use crate::model::NetworkPolicy;
    use crate::tracker::wire::Object;

    fn question(query: &str) -> Result<Question, QuestionError> {
        Question::parse(query)
    }

    fn id(sa: &str) -> WorkloadId {
        WorkloadId::parse(&format!("spiffe://cluster-1/ns/demo/sa/{sa}")).expect("id")
    }

    #[test]
    fn a_question_names_a_source_a_destination_and_perhaps_an_identity() {
        let q = question("from=10.0.0.1&to=10.0.0.2:80").expect("question");
        assert_eq!(q.from, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(q.to, "10.0.0.2:80".parse::<SocketAddr>().expect("addr"));
        assert_eq!(q.identity, None);
        // IPv6 as curl sends it, or percent-encoded; mapped IPv4 is IPv4.
        let q = question("from=fd00::1&to=[fd00::2]:443").expect("v6");
        assert_eq!(q.to, "[fd00::2]:443".parse::<SocketAddr>().expect("addr"));
        let q = question("from=%3A%3Affff%3A10.0.0.1&to=%5Bfd00%3A%3A2%5D%3A443").expect("encoded");
        assert_eq!(q.from, "10.0.0.1".parse::<IpAddr>().expect("ip"));
        let q = question(
            "to=10.0.0.2:80&identity=spiffe%3A%2F%2Fcluster-1%2Fns%2Fdemo%2Fsa%2Fclient&from=10.0.0.1",
        )
        .expect("with identity");
        assert_eq!(q.identity, Some(id("client")));
        assert_eq!(question(&q.to_query()), Ok(q), "to_query reads back");
    }

    #[test]
    fn a_bad_question_is_refused_naming_the_culprit() {
        let long = "x".repeat(10_000);
        for (query, expected) in [
            ("", "missing from"),
            ("to=10.0.0.2:80", "missing from"),
            ("from=10.0.0.1", "missing to"),
            (
                "from=10.0.0.1&from=10.0.0.3&to=10.0.0.2:80",
                "from given twice",
            ),
            (
                "from=10.0.0.1&to=10.0.0.2:80&port=80",
                "unknown parameter \"port\"",
            ),
            (
                "from=pod-a&to=10.0.0.2:80",
                "from=\"pod-a\": not an IP address",
            ),
            (
                "from=10.0.0.1&to=10.0.0.2",
                "to=\"10.0.0.2\": not an address and port",
            ),
            (
                "from=10.0.0.1&to=fd00::2:80",
                "to=\"fd00::2:80\": not an address and port",
            ),
            ("from=10.0.0.1&to=10.0.0.2:0", "port 0"),
            ("from=10.0.0.1&to=10.0.0.2:65536", "not an address and port"),
            (
                "from=10.0.0.1&to=10.0.0.2:80&identity=spiffe://cluster-1/x",
                "identity=",
            ),
            (
                "from=10.0.0.1&to=10.0.0.2:80&identity=client",
                "identity=\"client\"",
            ),
        ] {
            let error = question(query).expect_err(query).to_string();
            assert!(error.contains(expected), "{query}: {error}");
        }
        // What a peer sends is repeated cut short, never whole.
        let error = question(&format!("{long}=1"))
            .expect_err("unknown")
            .to_string();
        assert!(error.len() < 400, "{} bytes", error.len());
        let error = question(&format!("from={long}&to=10.0.0.2:80")).expect_err("bad");
        assert!(error.to_string().len() < 400, "{error}");
    }

    /// On node-a: client and web (Service `web`, 10.96.0.20:8080 to port 80); on node-b: db and
    /// other; `outside` (app=client) on no meshed node; web admits app=client on 80, db nobody.
    fn node_a(synced: bool) -> (Arc<RwLock<Replica>>, NodeAdmission) {
        let policy = |name: &str, app: &str, from: serde_json::Value| {
            Object::NetworkPolicy(
                NetworkPolicy::from_api(
                    &c(),
                    &serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name, "namespace": "demo"},
                        "spec": {"podSelector": {"matchLabels": {"app": app}},
                                 "ingress": from}}))
                    .expect("policy"),
                    &mut Vec::new(),
                )
                .expect("valid"),
            )
        };
        let view = Arc::new(RwLock::new(replica_of(
            vec![
                node("node-a", "192.168.0.1"),
                node("node-b", "192.168.0.2"),
                pod(
                    "client", "node-a", "client", "client", "Running", "10.0.0.1",
                ),
                pod("web", "node-a", "web", "web", "Running", "10.0.0.2"),
                pod("db", "node-b", "db", "db", "Running", "10.0.0.3"),
                pod("other", "node-b", "client", "other", "Running", "10.0.0.4"),
                pod(
                    "outside", "node-c", "client", "outside", "Running", "10.0.0.5",
                ),
                policy(
                    "web",
                    "web",
                    serde_json::json!([{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                                         "ports": [{"port": 80}]}]),
                ),
                policy("db", "db", serde_json::json!([])),
                service(
                    "web",
                    &["10.96.0.20"],
                    serde_json::json!([{"port": 8080, "targetPort": 80}]),
                ),
                slice(
                    "web-a",
                    Some("web"),
                    false,
                    serde_json::json!([{"addresses": ["10.0.0.2"], "nodeName": "node-a"}]),
                    serde_json::json!([{"port": 80}]),
                ),
            ],
            synced,
        )));
        let trust = TrustStore::new(BundleSet::new([]).expect("set")).expect("trust");
        let admission = NodeAdmission::new(view.clone(), c(), "node-a", trust);
        (view, admission)
    }

    fn ask(captured: bool, synced: bool, query: &str) -> Result<Answer, ExplainError> {
        let (view, admission) = node_a(synced);
        let cluster = c();
        let here = Here {
            cluster: &cluster,
            node: "node-a",
            hbone_port: 15008,
            captured,
        };
        explain(&view, &admission, here, &question(query).expect("question"))
    }

    fn denials(answer: &Answer) -> Vec<Option<Denial>> {
        answer.decisions.iter().map(|d| d.denial).collect()
    }

    #[test]
    fn the_source_node_judges_egress_and_names_the_node_that_decides_the_rest() {
        // The node holds its own cluster's policies: it judges a pod of its cluster's ingress
        // too, then the destination's node judges it again with the identity rules.
        let denied = ask(true, true, "from=10.0.0.1&to=10.0.0.3:5432").expect("answer");
        assert_eq!(denials(&denied), [Some(Denial::Ingress)]);
        assert_eq!((denied.verdict, &denied.next), (Outcome::Deny, &None));
        let answer = ask(true, true, "from=10.0.0.1&to=10.0.0.4:8080").expect("answer");
        assert_eq!(answer.verdict, Outcome::Continues);
        assert_eq!(answer.next.as_deref(), Some("cluster-1/node-b"));
        let [outbound] = answer.decisions.as_slice() else {
            panic!("{answer:?}")
        };
        assert_eq!(outbound.direction, Direction::Outbound);
        assert_eq!(
            outbound.source_pod.as_deref(),
            Some("cluster-1/demo/client")
        );
        assert_eq!(
            outbound.destination_pod.as_deref(),
            Some("cluster-1/demo/other")
        );
        assert!(
            outbound.reason.ends_with("tunnel to 10.0.0.4:15008"),
            "{}",
            outbound.reason
        );
        let text = answer.to_string();
        assert!(text.contains("next: node cluster-1/node-b"), "{text}");
    }

    #[test]
    fn a_tunnel_between_two_pods_of_the_node_is_judged_at_both_ends() {
        let allowed = ask(true, true, "from=10.0.0.1&to=10.0.0.2:80").expect("answer");
        assert_eq!(allowed.verdict, Outcome::Allow, "{allowed}");
        let directions: Vec<_> = allowed.decisions.iter().map(|d| d.direction).collect();
        assert_eq!(directions, [Direction::Outbound, Direction::Inbound]);
        assert_eq!(
            allowed.decisions[1].source_identity.as_deref(),
            Some("spiffe://cluster-1/ns/demo/sa/client")
        );
        // Through the Service: judged and dialled as its endpoint, at its target port.
        let service = ask(true, true, "from=10.0.0.1&to=10.96.0.20:8080").expect("answer");
        assert_eq!(service.verdict, Outcome::Allow, "{service}");
        let dialled: Vec<_> = service.decisions.iter().map(|d| d.destination).collect();
        let endpoint: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        assert_eq!(dialled, [endpoint, endpoint]);
        let denied = ask(true, true, "from=10.0.0.1&to=10.0.0.2:81").expect("answer");
        assert_eq!(denied.verdict, Outcome::Deny);
        assert_eq!(
            denials(&denied),
            [Some(Denial::Ingress)],
            "judged at the source"
        );
        let text = denied.to_string();
        assert!(text.contains("deny by networkpolicy (ingress)"), "{text}");
    }

    #[test]
    fn the_destination_node_judges_tunnels_and_plaintext_as_its_listeners_would() {
        // A meshed pod of another node comes through a tunnel, with its own identity.
        let answer = ask(true, true, "from=10.0.0.4&to=10.0.0.2:80").expect("answer");
        assert_eq!(answer.verdict, Outcome::Allow, "{answer}");
        assert_eq!(answer.decisions[0].direction, Direction::Inbound);
        // Proving another identity than its own is impersonation.
        let spoofed = "from=10.0.0.4&to=10.0.0.2:80&identity=spiffe://cluster-1/ns/demo/sa/client";
        let answer = ask(true, true, spoofed).expect("answer");
        assert_eq!(denials(&answer), [Some(Denial::Impersonation)]);
        // A pod on no meshed node, and an address that is no pod: plaintext.
        let answer = ask(true, true, "from=10.0.0.5&to=10.0.0.2:80").expect("answer");
        assert_eq!(answer.decisions[0].direction, Direction::Plaintext);
        assert_eq!(answer.verdict, Outcome::Allow, "{answer}");
        let answer = ask(true, true, "from=172.16.0.9&to=10.0.0.2:80").expect("answer");
        assert_eq!(answer.decisions[0].direction, Direction::Plaintext);
        assert_eq!(denials(&answer), [Some(Denial::Ingress)]);
    }

    #[test]
    fn without_capture_or_a_complete_view_nothing_is_allowed_and_elsewhere_nothing_is_said() {
        let held = ask(false, true, "from=10.0.0.1&to=10.0.0.2:80").expect("answer");
        assert_eq!(denials(&held), [Some(Denial::NotReady)]);
        let early = ask(true, false, "from=10.0.0.1&to=10.0.0.2:80");
        assert!(matches!(early, Err(ExplainError::NotReady(_))), "{early:?}");
        let forbidden = ask(true, true, "from=10.0.0.1&to=169.254.169.254:80").expect("answer");
        assert_eq!(denials(&forbidden), [Some(Denial::ForbiddenDestination)]);
        let elsewhere = ask(true, true, "from=10.0.0.4&to=10.0.0.3:80").expect_err("not here");
        assert_eq!(elsewhere.status(), 404);
        let text = elsewhere.to_string();
        assert!(
            text.contains("10.0.0.4 is pod cluster-1/demo/other on node-b")
                && text.contains("10.0.0.3 is pod cluster-1/demo/db on node-b"),
            "{text}"
        );
    }
}
