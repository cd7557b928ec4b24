//! Probes for `weft policy check`: connections read from a YAML file, resolved against the
//! engine, decided, and rendered as a table or as JSON Lines.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::identity::WorkloadId;
use crate::model::{Protocol, loader};
use crate::policy::identity::{IdentityDecision, IdentityVerdict};
use crate::policy::{Connection, DirectionExplanation, Endpoint, Engine, Explanation, Verdict};

/// A probe as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    from: String,
    to: String,
    port: serde_json::Value,
    protocol: Option<String>,
    family: Option<String>,
    /// The identity the source proves: a SPIFFE id, or `none`; by default a source pod's own.
    identity: Option<String>,
}

/// A probe file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The file cannot be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a YAML list of probes.
    #[error("{file}: {message}")]
    Syntax {
        /// The file.
        file: PathBuf,
        /// Why.
        message: String,
    },
    /// One probe is wrong.
    #[error("{file}: probe {number}: {message}")]
    Probe {
        /// The file.
        file: PathBuf,
        /// Its number, from 1.
        number: usize,
        /// Why.
        message: String,
    },
}

/// A probe resolved against the engine, ready to decide.
#[derive(Debug, Clone)]
pub struct Probe {
    from: String,
    to: String,
    port: serde_json::Value,
    protocol: String,
    connection: Connection,
    /// The destination pod, for the identity layer.
    dst_pod: Option<crate::policy::PodId>,
    /// The identity the source proves.
    peer: Option<WorkloadId>,
}

/// A decided probe: the probe as given, with the decision's explanation.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Source as given.
    pub from: String,
    /// Destination as given.
    pub to: String,
    /// Port as given.
    pub port: serde_json::Value,
    /// Protocol as given (`TCP` when not given).
    pub protocol: String,
    /// Overall verdict.
    pub verdict: Verdict,
    /// Egress of the source.
    pub egress: DirectionExplanation,
    /// Ingress of the destination.
    pub ingress: DirectionExplanation,
    /// The identity layer, when an IdentityPolicy selects the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityDecision>,
}

/// Reads and resolves every probe of `file`; the first bad one is the error.
pub fn load(file: &Path, engine: &Engine) -> Result<Vec<Probe>, ProbeError> {
    let text = std::fs::read_to_string(file).map_err(|source| ProbeError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(file, &text, engine)
}

/// Parses and resolves probes from `text` (read from `file`, named in errors).
pub fn parse(file: &Path, text: &str, engine: &Engine) -> Result<Vec<Probe>, ProbeError> {
    let syntax = |message: String| ProbeError::Syntax {
        file: file.to_owned(),
        message,
    };
    let items: Vec<serde_json::Value> = match loader::parse_yaml(text, 0).map_err(syntax)? {
        serde_json::Value::Array(items) => items,
        serde_json::Value::Null => Vec::new(),
        _ => return Err(syntax("expected a list of probes".into())),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            resolve(item, engine).map_err(|message| ProbeError::Probe {
                file: file.to_owned(),
                number: i + 1,
                message,
            })
        })
        .collect()
}

fn resolve(item: serde_json::Value, engine: &Engine) -> Result<Probe, String> {
    let raw: RawProbe = serde_json::from_value(item).map_err(|e| e.to_string())?;
    let port = raw
        .port
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("port {} is not a number between 1 and 65535", raw.port))?;
    let protocol = match raw.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(p) => Protocol::from_api(&p.to_ascii_uppercase())
            .ok_or_else(|| format!("protocol {p:?} is not TCP, UDP or SCTP"))?,
    };
    let from = End::parse(&raw.from, engine).map_err(|e| format!("from: {e}"))?;
    let to = End::parse(&raw.to, engine).map_err(|e| format!("to: {e}"))?;
    let v6 = match raw
        .family
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("ipv4") => false,
        Some("ipv6") => true,
        Some(other) => return Err(format!("family {other:?} is not IPv4 or IPv6")),
        None => !(from.endpoint(false, engine).is_ok() && to.endpoint(false, engine).is_ok()),
    };
    let src = from
        .endpoint(v6, engine)
        .map_err(|e| format!("from: {e}"))?;
    let dst = to.endpoint(v6, engine).map_err(|e| format!("to: {e}"))?;
    // An address a pod owns means that pod, for the identity layer too.
    let pod_of = |end: &Endpoint| match end {
        Endpoint::Pod { pod, .. } => Some(*pod),
        Endpoint::Address(_) | Endpoint::Ambiguous(_) => None,
    };
    let peer = match raw.identity.as_deref() {
        Some("none") => None,
        Some(id) => Some(WorkloadId::parse(id).map_err(|e| format!("identity: {e}"))?),
        None => pod_of(&src).and_then(|pod| engine.pod_identity(pod)),
    };
    Ok(Probe {
        from: raw.from,
        to: raw.to,
        port: raw.port,
        protocol: raw.protocol.unwrap_or_else(|| "TCP".into()),
        connection: Connection {
            src,
            dst,
            port,
            protocol,
        },
        dst_pod: pod_of(&dst),
        peer,
    })
}

/// One end of a probe: a named pod or an address.
enum End {
    Pod(crate::policy::PodId),
    Ip(IpAddr),
}

impl End {
    fn parse(s: &str, engine: &Engine) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(End::Ip(ip.to_canonical()));
        }
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(ns), Some(name), None) => engine
                .pod_by_name(c, ns, name)
                .map(End::Pod)
                .ok_or_else(|| format!("unknown pod {s:?}")),
            _ => Err(format!(
                "{s:?} is neither an IP address nor cluster/namespace/pod"
            )),
        }
    }

    fn endpoint(&self, v6: bool, engine: &Engine) -> Result<Endpoint, String> {
        match *self {
            End::Pod(pod) => engine.pod_endpoint(pod, v6).map_err(|e| e.to_string()),
            End::Ip(ip) if ip.is_ipv6() == v6 => Ok(engine.address_endpoint(ip)),
            End::Ip(ip) => Err(format!(
                "{ip} is not an {} address",
                if v6 { "IPv6" } else { "IPv4" }
            )),
        }
    }
}

/// Decides every probe.
pub fn decide(probes: &[Probe], engine: &Engine) -> Vec<Outcome> {
    probes
        .iter()
        .map(|p| {
            let Explanation {
                mut verdict,
                egress,
                ingress,
            } = engine.explain(&p.connection, &engine.decide(&p.connection));
            let identity = p
                .dst_pod
                .map(|dst| {
                    let c = &p.connection;
                    engine.decide_identity(dst, c.port, c.protocol, p.peer.as_ref())
                })
                .filter(|d| {
                    d.enforced != IdentityVerdict::NotSelected
                        || d.audited != IdentityVerdict::NotSelected
                });
            if identity.as_ref().is_some_and(|d| !d.enforced.passes()) {
                verdict = Verdict::Deny;
            }
            Outcome {
                from: p.from.clone(),
                to: p.to.clone(),
                port: p.port.clone(),
                protocol: p.protocol.clone(),
                verdict,
                egress,
                ingress,
                identity,
            }
        })
        .collect()
}

/// The identity layer in words: the enforced verdict, then what audit policies would do.
pub fn describe_identity(d: &IdentityDecision) -> String {
    let peer = d.peer.as_deref().unwrap_or("a peer with no identity");
    let verdict = |v: &IdentityVerdict| match v {
        IdentityVerdict::NotSelected => "not selected".to_owned(),
        IdentityVerdict::Allowed { policy, rule } => {
            format!("{peer} allowed by {policy} rule {rule}")
        }
        IdentityVerdict::Denied { policies } => {
            format!(
                "denied: {} selects the pod and none admits {peer}",
                policies.join(", ")
            )
        }
    };
    match &d.audited {
        IdentityVerdict::NotSelected => verdict(&d.enforced),
        audited => format!("{}; audit: {}", verdict(&d.enforced), verdict(audited)),
    }
}

/// JSON Lines: one object per probe, in probe order.
pub fn render_json(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        // Serialising plain strings, numbers and enums cannot fail.
        out.push_str(&serde_json::to_string(o).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// A readable, aligned table with the reasons of both directions, then the notes of each
/// probe (rules that admit pods of another cluster).
pub fn render_text(outcomes: &[Outcome]) -> String {
    // The identity column only when an IdentityPolicy selects a destination.
    let identities = outcomes.iter().any(|o| o.identity.is_some());
    let mut header = vec![
        "FROM",
        "TO",
        "PORT",
        "VERDICT",
        "EGRESS (source)",
        "INGRESS (destination)",
    ];
    if identities {
        header.push("IDENTITY (destination)");
    }
    let rows: Vec<Vec<String>> = outcomes
        .iter()
        .map(|o| {
            let mut row = vec![
                o.from.clone(),
                o.to.clone(),
                format!("{}/{}", o.port, o.protocol),
                o.verdict.to_string(),
                o.egress.to_string(),
                o.ingress.to_string(),
            ];
            if identities {
                row.push(
                    o.identity
                        .as_ref()
                        .map_or_else(|| "not selected".to_owned(), describe_identity),
                );
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header);
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    for (i, o) in outcomes.iter().enumerate() {
        for note in o.egress.notes.iter().chain(&o.ingress.notes) {
            let _ = writeln!(out, "note, probe {}: {note}", i + 1);
        }
    }
    out
}
