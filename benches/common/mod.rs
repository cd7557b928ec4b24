//! The synthetic clusterset the benchmarks share: 10 clusters, 100,000 pods, 1,000 namespaces
//! and 10,000 policies in a realistic mix, generated deterministically.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use weft::model::labels::{self, CLUSTER_LABELS, METADATA_NAME};
use weft::model::{
    Cluster, ClusterId, ClusterSet, ClusterSettings, ContainerPort, IpBlock, LabelSelector, Labels,
    Namespace, NetworkPolicy, Operator, Peer, Pod, PodPhase, PortRule, PortSpec, Protocol,
    Requirement, Rule,
};

pub const CLUSTERS: usize = 10;
pub const NAMESPACES_PER_CLUSTER: usize = 100;
pub const PODS_PER_NAMESPACE: usize = 100;
pub const POLICIES_PER_NAMESPACE: usize = 10;

/// A small deterministic generator (xorshift64*), so every run measures the same set.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub fn sel(pairs: &[(&str, String)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs).into_iter().collect::<BTreeMap<_, _>>(),
        match_expressions: Vec::new(),
    }
}

pub fn tcp(start: u16, end: u16) -> PortRule {
    PortRule {
        protocol: Protocol::Tcp,
        port: Some(PortSpec::Range { start, end }),
    }
}

pub fn pod_ip(c: usize, n: usize, p: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, c as u8, n as u8, p as u8 + 1))
}

/// A policy's pod selector, ingress rules and egress rules.
pub type PolicySpec = (LabelSelector, Option<Vec<Rule>>, Option<Vec<Rule>>);

/// One namespace's ten policies: a default deny, then allows of every shape.
pub fn namespace_policies(
    cid: &ClusterId,
    c: usize,
    ns: &str,
    rng: &mut Rng,
) -> Vec<NetworkPolicy> {
    let app = |rng: &mut Rng| format!("app-{}", rng.below(10));
    let team = |rng: &mut Rng| format!("team-{}", rng.below(20));
    let other_cluster = |rng: &mut Rng| format!("cluster-{}", rng.below(CLUSTERS));
    let mut specs: Vec<PolicySpec> = vec![
        (LabelSelector::default(), Some(vec![]), None),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![tcp(80, 80)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: None,
                }],
            }]),
            None,
        ),
        (
            sel(&[("tier", "front".into())]),
            Some(vec![Rule {
                ports: vec![PortRule {
                    protocol: Protocol::Tcp,
                    port: Some(PortSpec::Named("http".into())),
                }],
                peers: vec![Peer::Pods {
                    pod_selector: None,
                    namespace_selector: Some(sel(&[("team", team(rng))])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![tcp(8000, 8999)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: Some(sel(&[("env", "prod".into())])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("tier", "db".into())]),
            Some(vec![Rule {
                ports: vec![tcp(5432, 5432)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("tier", "back".into())])),
                    namespace_selector: Some(sel(&[
                        (CLUSTER_LABELS[0], other_cluster(rng)),
                        (
                            METADATA_NAME,
                            format!("ns-{}", rng.below(NAMESPACES_PER_CLUSTER)),
                        ),
                    ])),
                }],
            }]),
            None,
        ),
        (
            LabelSelector::default(),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![Peer::IpBlock(IpBlock {
                    cidr: "172.16.0.0/12".parse().expect("cidr"),
                    except: vec!["172.16.5.0/24".parse().expect("cidr")],
                })],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            None,
            Some(vec![
                Rule {
                    ports: vec![PortRule {
                        protocol: Protocol::Udp,
                        port: Some(PortSpec::Range { start: 53, end: 53 }),
                    }],
                    peers: vec![Peer::Pods {
                        pod_selector: Some(sel(&[("k8s-app", "kube-dns".into())])),
                        namespace_selector: Some(sel(&[(METADATA_NAME, "kube-system".into())])),
                    }],
                },
                Rule {
                    ports: vec![tcp(443, 443), tcp(9000, 9100)],
                    peers: vec![
                        Peer::IpBlock(IpBlock {
                            cidr: "10.0.0.0/8".parse().expect("cidr"),
                            except: vec![format!("10.{c}.0.0/16").parse().expect("cidr")],
                        }),
                        Peer::Pods {
                            pod_selector: None,
                            namespace_selector: Some(sel(&[(
                                CLUSTER_LABELS[1],
                                other_cluster(rng),
                            )])),
                        },
                    ],
                },
            ]),
        ),
        (
            LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![Requirement {
                    key: "version".into(),
                    operator: Operator::In,
                    values: ["v1".to_string(), "v2".to_string()].into(),
                }],
            },
            Some(vec![Rule {
                ports: vec![tcp(80, 80), tcp(443, 443)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(LabelSelector {
                        match_labels: BTreeMap::new(),
                        match_expressions: vec![Requirement {
                            key: "tier".into(),
                            operator: Operator::NotIn,
                            values: ["db".to_string()].into(),
                        }],
                    }),
                    namespace_selector: Some(sel(&[("team", team(rng))])),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng)), ("tier", "back".into())]),
            Some(vec![Rule {
                ports: vec![tcp(9000, 9100)],
                peers: vec![Peer::Pods {
                    pod_selector: Some(sel(&[("app", app(rng))])),
                    namespace_selector: Some(LabelSelector::default()),
                }],
            }]),
            None,
        ),
        (
            sel(&[("app", app(rng))]),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![Peer::Pods {
                    pod_selector: None,
                    namespace_selector: Some(sel(&[(CLUSTER_LABELS[2], other_cluster(rng))])),
                }],
            }]),
            Some(vec![Rule {
                ports: vec![],
                peers: vec![],
            }]),
        ),
    ];
    assert_eq!(specs.len(), POLICIES_PER_NAMESPACE);
    specs
        .drain(..)
        .enumerate()
        .map(|(i, (pod_selector, ingress, egress))| NetworkPolicy {
            cluster: cid.clone(),
            namespace: ns.to_owned(),
            name: format!("policy-{i}"),
            uid: format!("{cid}-{ns}-policy-{i}"),
            pod_selector,
            ingress,
            egress,
        })
        .collect()
}

pub fn clusterset(rng: &mut Rng) -> ClusterSet {
    let mut set = ClusterSet::default();
    for c in 0..CLUSTERS {
        let cid = ClusterId::new(&format!("cluster-{c}")).expect("cluster id");
        let mut cluster = Cluster::new(cid.clone(), ClusterSettings::default());
        for n in 0..NAMESPACES_PER_CLUSTER {
            let name = if n == 0 {
                "kube-system".to_owned()
            } else {
                format!("ns-{n}")
            };
            let declared = labels(&[
                ("team", format!("team-{}", rng.below(20))),
                (
                    "env",
                    if rng.below(2) == 0 { "prod" } else { "staging" }.into(),
                ),
            ]);
            let (ns_labels, _) = labels::namespace_labels(&cid, &name, declared);
            cluster.namespaces.insert(
                name.clone(),
                Namespace {
                    cluster: cid.clone(),
                    name: name.clone(),
                    uid: format!("{cid}-ns-{n}"),
                    labels: ns_labels,
                },
            );
            for p in 0..PODS_PER_NAMESPACE {
                let uid = format!("{cid}-{n}-{p}");
                let mut pod_labels = labels(&[
                    ("app", format!("app-{}", rng.below(10))),
                    ("tier", ["front", "back", "db"][rng.below(3)].into()),
                    ("version", format!("v{}", 1 + rng.below(3))),
                ]);
                if n == 0 && p < 5 {
                    pod_labels.insert("k8s-app".into(), "kube-dns".into());
                }
                cluster.pods.insert(
                    uid.clone(),
                    Pod {
                        cluster: cid.clone(),
                        uid,
                        namespace: name.clone(),
                        name: format!("pod-{p}"),
                        labels: pod_labels,
                        phase: PodPhase::Running,
                        ips: vec![pod_ip(c, n, p)],
                        host_network: false,
                        node_name: Some(format!("node-{}", p % 10)),
                        service_account: "default".into(),
                        ports: vec![ContainerPort {
                            name: Some("http".into()),
                            port: 8080,
                            protocol: Protocol::Tcp,
                        }],
                    },
                );
            }
            for pol in namespace_policies(&cid, c, &name, rng) {
                cluster
                    .policies
                    .insert((pol.namespace.clone(), pol.name.clone()), pol);
            }
        }
        set.clusters.insert(cid, cluster);
    }
    set
}

/// The resident set size of this process.
pub fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
