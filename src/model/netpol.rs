//! NetworkPolicy (`networking.k8s.io/v1`): validated as the API server does, with the
//! defaults applied, into a typed form the policy engine compiles.

use ipnet::IpNet;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::objects::{self, Protocol};
use super::selector::LabelSelector;
use super::{ClusterId, FieldError, ObjectError};

/// A validated NetworkPolicy of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Cluster it belongs to (and applies to).
    pub cluster: ClusterId,
    /// Namespace it belongs to (and applies to).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID (derived when the manifest has none).
    pub uid: String,
    /// Which pods of its namespace it applies to.
    pub pod_selector: LabelSelector,
    /// Ingress rules, or `None` when the policy does not apply to ingress.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules, or `None` when the policy does not apply to egress.
    pub egress: Option<Vec<Rule>>,
}

/// One rule: traffic matching any port and any peer of it is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Ports; empty means every port of every protocol.
    pub ports: Vec<PortRule>,
    /// Peers; empty means every peer.
    pub peers: Vec<Peer>,
}

/// A port entry of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRule {
    /// Protocol (TCP when unset).
    pub protocol: Protocol,
    /// Port(s); `None` means every port of the protocol.
    pub port: Option<PortSpec>,
}

/// Which port(s) a port entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// `port` through `endPort` (both inclusive; equal without `endPort`).
    Range {
        /// First port.
        start: u16,
        /// Last port.
        end: u16,
    },
    /// A container port name, resolved on the destination pod.
    Named(String),
}

/// A peer of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by labels: with only a pod selector, pods of the policy's own namespace
    /// and cluster; with a namespace selector, pods of matching namespaces of every cluster.
    Pods {
        /// Pod labels to match (`None`: every pod).
        pod_selector: Option<LabelSelector>,
        /// Namespace labels to match (`None`: the policy's own namespace).
        namespace_selector: Option<LabelSelector>,
    },
    /// Addresses, pod addresses included.
    IpBlock(IpBlock),
}

/// A CIDR minus exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpBlock {
    /// The range.
    pub cidr: IpNet,
    /// Ranges strictly inside `cidr` that are excluded.
    pub except: Vec<IpNet>,
}

impl IpBlock {
    /// Whether `ip` is in the block (a different family never is).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        self.cidr.contains(&ip) && !self.except.iter().any(|e| e.contains(&ip))
    }
}

impl NetworkPolicy {
    /// Converts and validates the API object; `warnings` receives non-fatal findings (a CIDR
    /// with host bits set, which is masked), each prefixed with the field's path.
    pub fn from_api(
        cluster: &ClusterId,
        np: &net::NetworkPolicy,
        warnings: &mut Vec<String>,
    ) -> Result<Self, ObjectError> {
        let (namespace, name, _) = objects::namespaced(&np.metadata, "NetworkPolicy")?;
        let err = |field| ObjectError {
            kind: "NetworkPolicy",
            name: format!("{namespace}/{name}"),
            field,
        };
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = LabelSelector::from_api(
            &spec.pod_selector.clone().unwrap_or_default(),
            "spec.podSelector",
        )
        .map_err(err)?;
        let (affects_ingress, affects_egress) = match &spec.policy_types {
            Some(types) if !types.is_empty() => {
                let (mut i, mut e) = (false, false);
                for (n, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => i = true,
                        "Egress" => e = true,
                        other => {
                            return Err(err(FieldError::new(
                                format!("spec.policyTypes[{n}]"),
                                format!(
                                    "unsupported policy type {other:?}: must be Ingress or Egress"
                                ),
                            )));
                        }
                    }
                }
                (i, e)
            }
            // Upstream defaulting: Ingress always, Egress only when there are egress rules.
            _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
        };
        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{i}]");
            ingress.push(
                rule(&at, "from", r.ports.as_deref(), r.from.as_deref(), warnings).map_err(err)?,
            );
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{i}]");
            egress
                .push(rule(&at, "to", r.ports.as_deref(), r.to.as_deref(), warnings).map_err(err)?);
        }
        Ok(Self {
            cluster: cluster.clone(),
            uid: objects::uid_of(&np.metadata, cluster, "NetworkPolicy", &namespace, &name),
            namespace,
            name,
            pod_selector,
            ingress: affects_ingress.then_some(ingress),
            egress: affects_egress.then_some(egress),
        })
    }
}

fn rule(
    at: &str,
    peers_field: &str,
    ports: Option<&[net::NetworkPolicyPort]>,
    peers: Option<&[net::NetworkPolicyPeer]>,
    warnings: &mut Vec<String>,
) -> Result<Rule, FieldError> {
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, p)| port_rule(&format!("{at}.ports[{j}]"), p))
        .collect::<Result<_, _>>()?;
    let peers = peers
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(j, p)| peer(&format!("{at}.{peers_field}[{j}]"), p, warnings))
        .collect::<Result<_, _>>()?;
    Ok(Rule { ports, peers })
}

fn port_rule(at: &str, p: &net::NetworkPolicyPort) -> Result<PortRule, FieldError> {
    let protocol = objects::protocol_field(at, p.protocol.as_deref())?;
    let port_number = |n: i32, field: &str| objects::port_field(&format!("{at}.{field}"), n);
    let port = match &p.port {
        None => {
            if p.end_port.is_some() {
                return Err(FieldError::new(
                    format!("{at}.endPort"),
                    "endPort needs a numeric port",
                ));
            }
            None
        }
        Some(IntOrString::Int(n)) => {
            let start = port_number(*n, "port")?;
            let end = match p.end_port {
                None => start,
                Some(e) => {
                    let end = port_number(e, "endPort")?;
                    if end < start {
                        return Err(FieldError::new(
                            format!("{at}.endPort"),
                            format!("{end} is below port {start}"),
                        ));
                    }
                    end
                }
            };
            Some(PortSpec::Range { start, end })
        }
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                return Err(FieldError::new(
                    format!("{at}.endPort"),
                    "endPort needs a numeric port, not a named one",
                ));
            }
            validate_port_name(name).map_err(|m| FieldError::new(format!("{at}.port"), m))?;
            Some(PortSpec::Named(name.clone()))
        }
    };
    Ok(PortRule { protocol, port })
}

/// Checks an IANA service name, as named container ports must be.
fn validate_port_name(name: &str) -> Result<(), String> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid port name {name:?}: 1 to 15 lowercase letters, digits and single '-', with a letter"
        ))
    }
}

fn peer(
    at: &str,
    p: &net::NetworkPolicyPeer,
    warnings: &mut Vec<String>,
) -> Result<Peer, FieldError> {
    let has_selector = p.pod_selector.is_some() || p.namespace_selector.is_some();
    match &p.ip_block {
        Some(_) if has_selector => Err(FieldError::new(
            at,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        Some(b) => Ok(Peer::IpBlock(ip_block(
            &format!("{at}.ipBlock"),
            b,
            warnings,
        )?)),
        None if !has_selector => Err(FieldError::new(
            at,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        None => Ok(Peer::Pods {
            pod_selector: p
                .pod_selector
                .as_ref()
                .map(|s| LabelSelector::from_api(s, &format!("{at}.podSelector")))
                .transpose()?,
            namespace_selector: p
                .namespace_selector
                .as_ref()
                .map(|s| LabelSelector::from_api(s, &format!("{at}.namespaceSelector")))
                .transpose()?,
        }),
    }
}

fn cidr(at: &str, s: &str, warnings: &mut Vec<String>) -> Result<IpNet, FieldError> {
    let net: IpNet = s
        .parse()
        .map_err(|_| FieldError::new(at, format!("invalid CIDR {s:?}")))?;
    let masked = net.trunc();
    if masked != net {
        warnings.push(format!(
            "{at}: CIDR {s:?} has host bits set; using {masked}"
        ));
    }
    Ok(masked)
}

fn ip_block(at: &str, b: &net::IPBlock, warnings: &mut Vec<String>) -> Result<IpBlock, FieldError> {
    let outer = cidr(&format!("{at}.cidr"), &b.cidr, warnings)?;
    let mut except = Vec::new();
    for (k, e) in b.except.iter().flatten().enumerate() {
        let at = format!("{at}.except[{k}]");
        let inner = cidr(&at, e, warnings)?;
        let same_family = inner.addr().is_ipv4() == outer.addr().is_ipv4();
        if !same_family {
            return Err(FieldError::new(
                at,
                format!(
                    "{e:?} is not of the same address family as cidr {:?}",
                    b.cidr
                ),
            ));
        }
        if !(outer.contains(&inner) && inner.prefix_len() > outer.prefix_len()) {
            return Err(FieldError::new(
                at,
                format!("{e:?} is not strictly inside cidr {:?}", b.cidr),
            ));
        }
        except.push(inner);
    }
    Ok(IpBlock {
        cidr: outer,
        except,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(spec: serde_json::Value) -> (Result<NetworkPolicy, ObjectError>, Vec<String>) {
        let np: net::NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"},
            "spec": spec
        }))
        .unwrap();
        let mut w = Vec::new();
        let r = NetworkPolicy::from_api(&ClusterId::new("c").unwrap(), &np, &mut w);
        (r, w)
    }

    #[test]
    fn policy_types_defaulting() {
        let cases = [
            (json!({}), true, false),
            (json!({"egress": []}), true, false),
            (json!({"egress": [{}]}), true, true),
            (json!({"policyTypes": [], "egress": [{}]}), true, true),
            (
                json!({"policyTypes": ["Egress"], "ingress": [{}]}),
                false,
                true,
            ),
            (json!({"policyTypes": ["Ingress", "Egress"]}), true, true),
        ];
        for (spec, i, e) in cases {
            let p = parse(spec.clone()).0.unwrap();
            assert_eq!((p.ingress.is_some(), p.egress.is_some()), (i, e), "{spec}");
        }
        let p = parse(json!({"policyTypes": ["Egress"], "ingress": [{}]}))
            .0
            .unwrap();
        assert_eq!(
            p.egress,
            Some(vec![]),
            "explicit types ignore the other direction"
        );
    }

    #[test]
    fn host_bits_are_masked_with_a_warning() {
        let (p, w) = parse(
            json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.1.2.3/8", "except": ["10.1.0.0/16"]}}]}]}),
        );
        let p = p.unwrap();
        let Peer::IpBlock(b) = &p.ingress.unwrap()[0].peers[0] else {
            panic!()
        };
        assert_eq!(b.cidr.to_string(), "10.0.0.0/8");
        assert_eq!(w.len(), 1);
        assert!(
            w[0].starts_with("spec.ingress[0].from[0].ipBlock.cidr"),
            "{w:?}"
        );
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]}]}),
                "spec.ingress[0].from[0].ipBlock.cidr",
                "invalid CIDR \"10.0.0/8\"",
            ),
            (
                json!({"ingress": [{"from": [{}]}]}),
                "spec.ingress[0].from[0]",
                "needs",
            ),
            (
                json!({"egress": [{"to": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]}),
                "spec.egress[0].to[1]",
                "cannot be combined",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "strictly inside",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "strictly inside",
            ),
            (
                json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["fd00::/64"]}}]}]}),
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "family",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 0}]}]}),
                "spec.ingress[0].ports[0].port",
                "between 1 and 65535",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 65536}]}]}),
                "spec.ingress[0].ports[0].port",
                "between 1 and 65535",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "below",
            ),
            (
                json!({"ingress": [{"ports": [{"endPort": 90}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "numeric",
            ),
            (
                json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "numeric",
            ),
            (
                json!({"ingress": [{"ports": [{"port": 80, "endPort": 70000}]}]}),
                "spec.ingress[0].ports[0].endPort",
                "between",
            ),
            (
                json!({"ingress": [{"ports": [{"port": "Not_A_Name"}]}]}),
                "spec.ingress[0].ports[0].port",
                "invalid port name",
            ),
            (
                json!({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
                "spec.ingress[0].ports[0].protocol",
                "unsupported protocol",
            ),
            (
                json!({"policyTypes": ["ingress"]}),
                "spec.policyTypes[0]",
                "unsupported policy type",
            ),
            (
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}}),
                "spec.podSelector.matchExpressions[0].values",
                "must be empty",
            ),
        ];
        for (spec, path, msg) in cases {
            let e = parse(spec.clone()).0.unwrap_err();
            assert_eq!(e.field.path, path, "{spec}");
            assert!(e.field.message.contains(msg), "{spec}: {}", e.field.message);
            assert_eq!(e.name, "n/p");
        }
    }

    #[test]
    fn error_display_matches_the_documented_form() {
        let e = parse(json!({"ingress": [{"from": [{"podSelector": {}}, {"ipBlock": {"cidr": "10.0.0/8"}}]}]})).0.unwrap_err();
        assert_eq!(
            e.to_string(),
            "NetworkPolicy n/p: spec.ingress[0].from[1].ipBlock.cidr: invalid CIDR \"10.0.0/8\""
        );
    }
}
