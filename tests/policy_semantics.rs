//! NetworkPolicy semantics, table-driven: the upstream e2e truth tables
//! (kubernetes/test/e2e/network/netpol, on its x/y/z × a/b/c model), the rules of the
//! `networking.k8s.io/v1` API reference, and weft's multi-cluster rules.
//!
//! Every probe is decided by the incrementally updated engine, a fresh engine built from the
//! clusterset and the reference evaluator, which must all agree (see `common::Fixture::check`);
//! then the verdict, and for some the reasons, are checked against the table.

mod common;

use common::{Fixture, cid, namespace, pod, policy};
use serde_json::json;
use weft::model::labels::CLUSTER_LABELS;
use weft::model::{Namespace, Protocol};
use weft::policy::{DirectionExplanation, Endpoint, EndpointError, Engine, Verdict, Why};

use Protocol::{Sctp, Tcp, Udp};
use Verdict::{Allow, Deny};

/// Every pod.
const ALL: &str = "*/*/*";

/// The upstream model in one cluster, `c1`.
fn xyz() -> Fixture {
    Fixture::xyz(&["c1"])
}

/// The upstream model in two clusters, `c1` and `c2`.
fn xyz2() -> Fixture {
    Fixture::xyz(&["c1", "c2"])
}

fn reasons(d: &DirectionExplanation) -> (Why, Vec<&str>, Vec<&str>) {
    (
        d.why,
        d.policies.iter().map(String::as_str).collect(),
        d.rules.iter().map(String::as_str).collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Upstream e2e truth tables (test/e2e/network/netpol/network_policy.go), one cluster.
// Upstream ignores loopback; weft always allows a pod's traffic to itself.
// ---------------------------------------------------------------------------------------------

#[test]
fn default_deny_ingress_isolates_only_its_namespace_on_tcp_udp_and_sctp() {
    for proto in [Tcp, Udp, Sctp] {
        let mut f = xyz();
        f.apply(
            "c1",
            policy(
                "x",
                "deny-ingress",
                json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
            ),
        );
        let mut r = f.reachability();
        r.expect(ALL, "x/*", false);
        f.validate(&r, 80, proto);
    }
}

#[test]
fn default_deny_all_blocks_ingress_and_egress_of_its_namespace() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect(ALL, "x/*", false).expect("x/*", ALL, false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn pod_selector_peer_allows_only_that_pod_of_the_policy_namespace() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "x-a-allows-x-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn allow_policy_for_a_target_overrides_namespace_default_deny() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all-to-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect(ALL, "x/*", false).expect_all_ingress("x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn empty_namespace_selector_allows_pods_of_all_namespaces() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-from-another-ns",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {}}}]}]}),
        ),
    );
    f.validate(&f.reachability(), 80, Tcp);
}

#[test]
fn namespace_selector_by_metadata_name_allows_only_that_namespace() {
    for selector in [
        json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}}),
        json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]}),
    ] {
        let mut f = xyz();
        f.apply(
            "c1",
            policy(
                "x",
                "allow-client-a-via-ns-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": selector}]}]}),
            ),
        );
        let mut r = f.reachability();
        r.expect("x/*", "x/a", false).expect("z/*", "x/a", false);
        f.validate(&r, 80, Tcp);
    }
}

#[test]
fn pod_selector_match_expressions_in() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "x-a-allows-x-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn separate_pod_selector_and_namespace_selector_peers_are_a_union() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ns-y-match-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [
                       {"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]}},
                       {"podSelector": {"matchLabels": {"pod": "b"}}}
                   ]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect("x/c", "x/a", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn pod_selector_and_namespace_selector_in_one_peer_are_anded() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ns-y-podselector-and-nsselector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
                       "podSelector": {"matchLabels": {"pod": "b"}}
                   }]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false)
        .expect("y/b", "x/a", true)
        .expect("z/b", "x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn multiple_values_in_pod_and_namespace_selectors() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ns-y-z-pod-b-c",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{
                       "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
                       "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["b", "c"]}]}
                   }]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false);
    for from in ["y/b", "y/c", "z/b", "z/c"] {
        r.expect(from, "x/a", true);
    }
    f.validate(&r, 80, Tcp);
}

#[test]
fn any_of_several_pod_selector_peers_allows() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ns-x-pod-b-c",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}},
                                         {"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false)
        .expect("x/b", "x/a", true)
        .expect("x/c", "x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn both_selectors_allow_one_pod_of_another_namespace_on_tcp_udp_and_sctp() {
    for proto in [Tcp, Udp, Sctp] {
        let mut f = xyz();
        f.apply(
            "c1",
            policy(
                "x",
                "allow-ns-y-pod-a-via-namespace-pod-selector",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                    "podSelector": {"matchLabels": {"pod": "a"}}
                }]}]}),
            ),
        );
        let mut r = f.reachability();
        r.expect_all_ingress("x/a", false)
            .expect("y/a", "x/a", true);
        f.validate(&r, 80, proto);
    }
}

#[test]
fn port_rule_allows_only_that_port_on_tcp_udp_and_sctp() {
    for proto in [Tcp, Udp, Sctp] {
        let mut f = xyz();
        f.apply(
            "c1",
            policy(
                "x",
                "allow-port-81",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                       "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                    "ports": [{"port": 81, "protocol": proto.as_str()}]}]}),
            ),
        );
        let mut on81 = f.reachability();
        on81.expect("x/*", "x/a", false).expect("z/*", "x/a", false);
        f.validate(&on81, 81, proto);
        let mut on80 = f.reachability();
        on80.expect_all_ingress("x/a", false);
        f.validate(&on80, 80, proto);
    }
}

#[test]
fn stacked_policies_with_overlapping_pod_selectors_are_a_union() {
    let mut f = xyz();
    let allow = |name: &str, port: u16| {
        policy(
            "x",
            name,
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                "ports": [{"port": port, "protocol": "TCP"}]}]}),
        )
    };
    f.apply("c1", allow("allow-client-a-via-ns-selector", 81));
    let mut allowed = f.reachability();
    allowed
        .expect("x/*", "x/a", false)
        .expect("z/*", "x/a", false);
    f.validate(&allowed, 81, Tcp);
    let mut denied = f.reachability();
    denied.expect_all_ingress("x/a", false);
    f.validate(&denied, 80, Tcp);
    f.apply("c1", allow("allow-client-a-via-ns-selector-80", 80));
    f.validate(&allowed, 80, Tcp);
    f.validate(&allowed, 81, Tcp);
}

#[test]
fn allow_all_ingress_rule_restricts_nothing() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all",
            json!({"podSelector": {}, "ingress": [{}]}),
        ),
    );
    f.validate(&f.reachability(), 80, Tcp);
    f.validate(&f.reachability(), 81, Tcp);
    f.validate(&f.reachability(), 81, Sctp);
}

#[test]
fn named_ingress_port_allows_only_that_port() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
        ),
    );
    f.validate(&f.reachability(), 81, Tcp);
    let mut on80 = f.reachability();
    on80.expect(ALL, "x/*", false);
    f.validate(&on80, 80, Tcp);
    // The name is resolved per protocol: serve-81-tcp is not UDP 81.
    let mut udp81 = f.reachability();
    udp81.expect(ALL, "x/*", false);
    f.validate(&udp81, 81, Udp);
}

#[test]
fn named_ingress_port_from_one_namespace() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-client-a-via-ns-selector-80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                                "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]}),
        ),
    );
    let mut on80 = f.reachability();
    on80.expect("x/*", "x/a", false).expect("z/*", "x/a", false);
    f.validate(&on80, 80, Tcp);
    let mut on81 = f.reachability();
    on81.expect_all_ingress("x/a", false);
    f.validate(&on81, 81, Tcp);
}

#[test]
fn named_egress_port_is_resolved_on_the_destination() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy("x", "allow-egress", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})),
    );
    f.validate(&f.reachability(), 80, Tcp);
    let mut on81 = f.reachability();
    on81.expect("x/*", ALL, false);
    f.validate(&on81, 81, Tcp);
}

#[test]
fn updated_policy_from_allow_all_to_deny_all() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all-mutate-to-deny-all",
            json!({"podSelector": {}, "ingress": [{}]}),
        ),
    );
    f.validate(&f.reachability(), 81, Tcp);
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all-mutate-to-deny-all",
            json!({"podSelector": {}, "ingress": []}),
        ),
    );
    let mut r = f.reachability();
    r.expect(ALL, "x/*", false);
    f.validate(&r, 81, Tcp);
}

#[test]
fn ingress_follows_a_namespace_relabel() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-client-a-via-ns-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns2": "updated"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false);
    f.validate(&r, 80, Tcp);
    f.apply("c1", namespace("y", json!({"ns": "y", "ns2": "updated"})));
    r.expect("y/*", ALL, true);
    f.validate(&r, 80, Tcp);
    f.apply("c1", namespace("y", json!({"ns": "y"})));
    r.expect("y/*", "x/a", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn ingress_follows_a_pod_relabel() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-client-a-via-pod-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b", "pod2": "updated"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false);
    f.validate(&r, 80, Tcp);
    f.apply(
        "c1",
        pod(
            "x",
            "b",
            json!({"pod": "b", "pod2": "updated"}),
            &["10.1.0.2", "fd00:1:0::2"],
        ),
    );
    r.expect("x/b", "x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn empty_pod_selector_peer_denies_other_namespaces() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-empty-policy",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect("y/*", "x/*", false).expect("z/*", "x/*", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn relabelled_pod_becomes_isolated() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-ingress-via-label-selector",
            json!({"podSelector": {"matchLabels": {"target": "isolated"}}}),
        ),
    );
    f.validate(&f.reachability(), 80, Tcp);
    f.apply(
        "c1",
        pod(
            "x",
            "a",
            json!({"pod": "a", "target": "isolated"}),
            &["10.1.0.1", "fd00:1:0::1"],
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn egress_policy_without_rules_denies_egress_of_selected_pods() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-egress-pod-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_egress("x/a", false);
    f.validate(&r, 80, Tcp);
    f.apply(
        "c1",
        policy(
            "x",
            "deny-egress-ns-x",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect("x/*", ALL, false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn ingress_and_egress_specified_together() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-client-a-via-pod-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "policyTypes": ["Egress", "Ingress"],
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}],
                   "egress": [{"ports": [{"port": 80}]}]}),
        ),
    );
    let mut on80 = f.reachability();
    on80.expect_all_ingress("x/a", false)
        .expect("x/b", "x/a", true);
    f.validate(&on80, 80, Tcp);
    let mut on81 = f.reachability();
    on81.expect_all_ingress("x/a", false)
        .expect_all_egress("x/a", false)
        .expect("x/b", "x/a", true);
    f.validate(&on81, 81, Tcp);
}

#[test]
fn client_egress_deny_wins_over_server_ingress_allow() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-to-ns-y-pod-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                                       "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    );
    let from_xa = json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                          "podSelector": {"matchLabels": {"pod": "a"}}}]);
    for (name, target) in [
        ("allow-from-xa-on-ya-match-selector", "a"),
        ("allow-from-xa-on-yb-match-selector", "b"),
    ] {
        f.apply(
            "c1",
            policy("y", name, json!({"podSelector": {"matchLabels": {"pod": target}}, "ingress": [{"from": from_xa}]})),
        );
    }
    let mut r = f.reachability();
    r.expect("x/a", ALL, false)
        .expect(ALL, "y/a", false)
        .expect("x/a", "y/a", true)
        .expect(ALL, "y/b", false);
    f.validate(&r, 80, Tcp);
    let e = f.check("c1/x/a", "c1/y/b", 80, Tcp);
    assert_eq!(
        reasons(&e.egress),
        (Why::Denied, vec!["c1/x/allow-to-ns-y-pod-a"], vec![])
    );
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Allowed,
            vec!["c1/y/allow-from-xa-on-yb-match-selector"],
            vec!["c1/y/allow-from-xa-on-yb-match-selector rule 0"]
        )
    );
}

#[test]
fn egress_to_one_pod_of_another_namespace_by_both_selectors() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-to-ns-y-pod-a",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                                       "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_egress("x/a", false).expect("x/a", "y/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn protocol_only_port_entry_allows_every_port_of_that_protocol() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy("x", "allow-ingress-by-proto", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"protocol": "TCP"}]}]})),
    );
    f.validate(&f.reachability(), 80, Tcp);
    f.validate(&f.reachability(), 81, Tcp);
    let mut udp = f.reachability();
    udp.expect_all_ingress("x/a", false);
    f.validate(&udp, 80, Udp);
}

#[test]
fn added_allow_all_ingress_policy_takes_precedence() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ingress-port-80",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect(ALL, "x/*", false);
    f.validate(&r, 81, Tcp);
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ingress",
            json!({"podSelector": {}, "ingress": [{}]}),
        ),
    );
    f.validate(&f.reachability(), 81, Tcp);
}

#[test]
fn added_allow_all_egress_policy_takes_precedence() {
    let mut f = xyz();
    f.apply("c1", policy("x", "allow-egress-port-80", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]})));
    let mut r = f.reachability();
    r.expect("x/*", ALL, false);
    f.validate(&r, 81, Tcp);
    f.apply(
        "c1",
        policy(
            "x",
            "allow-egress",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        ),
    );
    f.validate(&f.reachability(), 81, Tcp);
}

#[test]
fn deleted_policy_stops_being_enforced() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect("x/*", ALL, false).expect(ALL, "x/*", false);
    f.validate(&r, 80, Tcp);
    f.remove_policy("c1", "x", "deny-all");
    f.validate(&f.reachability(), 80, Tcp);
}

#[test]
fn egress_to_a_host_cidr_of_a_pod() {
    let mut f = xyz();
    // y/b is 10.1.1.2.
    f.apply(
        "c1",
        policy(
            "x",
            "allow-client-a-via-cidr-egress-rule",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.1.1.2/32"}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_egress("x/a", false).expect("x/a", "y/b", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn ip_block_except_excludes_a_pod_and_a_replacing_policy_or_second_policy_readmits_it() {
    let mut f = xyz();
    // x/b is 10.1.0.2; every pod of the model is in 10.1.0.0/16.
    let around_b = json!({"podSelector": {"matchLabels": {"pod": "a"}},
                          "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.1.0.2/32"]}}]}]});
    let just_b = json!({"podSelector": {"matchLabels": {"pod": "a"}},
                        "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "10.1.0.2/32"}}]}]});
    f.apply(
        "c1",
        policy("x", "allow-client-a-via-cidr-egress-rule", around_b.clone()),
    );
    let mut r = f.reachability();
    r.expect("x/a", "x/b", false);
    f.validate(&r, 80, Tcp);
    // Upstream updates the same policy: it then allows only x/b.
    f.apply(
        "c1",
        policy("x", "allow-client-a-via-cidr-egress-rule", just_b.clone()),
    );
    let mut r = f.reachability();
    r.expect_all_egress("x/a", false).expect("x/a", "x/b", true);
    f.validate(&r, 80, Tcp);
    // Both at once: their union allows everything.
    f.apply("c1", policy("x", "around-b", around_b));
    f.validate(&f.reachability(), 80, Tcp);
}

#[test]
fn ingress_and_egress_policies_are_independent() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy("x", "allow-egress-for-target", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{}]})),
    );
    f.validate(&f.reachability(), 80, Tcp);
    f.apply(
        "c1",
        policy(
            "x",
            "deny-ingress-via-label-selector",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn sctp_port_rule_is_not_tcp() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-ingress",
            json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "allow-only-sctp-ingress-on-port-81",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": 81, "protocol": "SCTP"}]}]}),
        ),
    );
    let mut tcp = f.reachability();
    tcp.expect(ALL, "x/*", false);
    f.validate(&tcp, 81, Tcp);
    let mut sctp = f.reachability();
    sctp.expect(ALL, "x/*", false)
        .expect_all_ingress("x/a", true);
    f.validate(&sctp, 81, Sctp);
}

#[test]
fn policy_allowing_only_sctp_or_udp_isolates_the_pod_for_tcp() {
    for (proto, port) in [("SCTP", 80), ("UDP", 81)] {
        let mut f = xyz();
        f.apply(
            "c1",
            policy(
                "x",
                "allow-only-other-protocol",
                json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"ports": [{"port": port, "protocol": proto}]}]}),
            ),
        );
        let mut r = f.reachability();
        r.expect_all_ingress("x/a", false);
        f.validate(&r, 81, Tcp);
    }
}

#[test]
fn egress_namespace_selector_not_in_by_metadata_name() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-ns-y-match-selector-for-immutable-ns-label",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["y"]}]}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect("x/a", "y/*", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn policy_in_another_namespace_does_not_affect_this_one() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "y",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let e = f.check("c1/x/a", "c1/x/b", 80, Tcp);
    assert_eq!(
        (e.egress.why, e.ingress.why),
        (Why::NotSelected, Why::NotSelected)
    );
    let mut r = f.reachability();
    r.expect("y/*", ALL, false).expect(ALL, "y/*", false);
    f.validate(&r, 80, Tcp);
}

// ---------------------------------------------------------------------------------------------
// The API reference's rules.
// ---------------------------------------------------------------------------------------------

#[test]
fn policy_types_default_from_the_rules_present() {
    // (spec besides the pod selector, why of x/a's ingress, why of x/a's egress), probing
    // x/b -> x/a and x/a -> x/b on TCP 80.
    let cases = [
        (json!({}), Why::Denied, Why::NotSelected),
        (json!({"ingress": []}), Why::Denied, Why::NotSelected),
        (json!({"ingress": [{}]}), Why::Allowed, Why::NotSelected),
        (json!({"egress": []}), Why::Denied, Why::NotSelected),
        (json!({"egress": [{}]}), Why::Denied, Why::Allowed),
        (
            json!({"egress": [{"ports": [{"port": 81}]}]}),
            Why::Denied,
            Why::Denied,
        ),
        (
            json!({"policyTypes": [], "egress": [{}]}),
            Why::Denied,
            Why::Allowed,
        ),
        (
            json!({"policyTypes": ["Egress"]}),
            Why::NotSelected,
            Why::Denied,
        ),
        (
            json!({"policyTypes": ["Egress"], "ingress": []}),
            Why::NotSelected,
            Why::Denied,
        ),
        (
            json!({"policyTypes": ["Egress"], "ingress": [{"ports": [{"port": 81}]}], "egress": [{}]}),
            Why::NotSelected,
            Why::Allowed,
        ),
        (
            json!({"policyTypes": ["Ingress"], "egress": [{"ports": [{"port": 81}]}]}),
            Why::Denied,
            Why::NotSelected,
        ),
        (
            json!({"policyTypes": ["Ingress", "Egress"], "ingress": [{}]}),
            Why::Allowed,
            Why::Denied,
        ),
        (
            json!({"policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}),
            Why::Allowed,
            Why::Allowed,
        ),
    ];
    for (extra, ingress, egress) in cases {
        let mut spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}});
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let mut f = xyz();
        f.apply("c1", policy("x", "p", spec.clone()));
        let got_in = f.check("c1/x/b", "c1/x/a", 80, Tcp).ingress.why;
        let got_out = f.check("c1/x/a", "c1/x/b", 80, Tcp).egress.why;
        assert_eq!((got_in, got_out), (ingress, egress), "{spec}");
    }
}

#[test]
fn absent_and_empty_ingress_allow_nothing_while_one_empty_rule_allows_everything() {
    for (ingress, want) in [
        (None, Deny),
        (Some(json!([])), Deny),
        (Some(json!([{}])), Allow),
    ] {
        let mut spec = json!({"podSelector": {}, "policyTypes": ["Ingress"]});
        if let Some(i) = &ingress {
            spec["ingress"] = i.clone();
        }
        let mut f = xyz();
        f.apply("c1", policy("x", "p", spec));
        for (from, port, proto) in [
            ("c1/y/a", 80, Tcp),
            ("c1/x/b", 81, Udp),
            ("203.0.113.7", 9999, Sctp),
        ] {
            assert_eq!(
                f.verdict(from, "c1/x/a", port, proto),
                want,
                "ingress {ingress:?} from {from}"
            );
        }
    }
}

#[test]
fn end_port_ranges_are_inclusive_and_per_protocol() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "ranges",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP", "port": 1000, "endPort": 2000}, {"protocol": "SCTP", "port": 5000}]}]}),
        ),
    );
    let cases = [
        (79, Tcp, Deny),
        (80, Tcp, Allow),
        (85, Tcp, Allow),
        (90, Tcp, Allow),
        (91, Tcp, Deny),
        (85, Udp, Deny),
        (999, Udp, Deny),
        (1000, Udp, Allow),
        (2000, Udp, Allow),
        (2001, Udp, Deny),
        (1500, Tcp, Deny),
        (5000, Sctp, Allow),
        (5001, Sctp, Deny),
        (5000, Tcp, Deny),
    ];
    for (port, proto, want) in cases {
        assert_eq!(
            f.verdict("c1/y/a", "c1/x/a", port, proto),
            want,
            "{port}/{proto}"
        );
    }
}

#[test]
fn port_protocol_defaults_to_tcp() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "p",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}),
        ),
    );
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Allow);
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Udp), Deny);
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Sctp), Deny);
}

#[test]
fn rule_with_ports_but_no_peers_admits_every_peer_and_with_peers_but_no_ports_every_port() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "p",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"ports": [{"port": 8080}]},
                               {"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    );
    let cases = [
        ("c1/z/c", 8080, Tcp, Allow),
        ("198.51.100.1", 8080, Tcp, Allow),
        ("c1/z/c", 8081, Tcp, Deny),
        ("c1/y/b", 8081, Tcp, Allow),
        ("c1/y/b", 53, Udp, Allow),
        ("c1/y/b", 9, Sctp, Allow),
    ];
    for (from, port, proto, want) in cases {
        assert_eq!(
            f.verdict(from, "c1/x/a", port, proto),
            want,
            "{from} {port}/{proto}"
        );
    }
}

/// A pod in `x` whose ports exercise named-port resolution.
fn named_ports_pod() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"namespace": "x", "name": "ports", "labels": {"app": "ports"}},
        "spec": {
            "initContainers": [
                {"name": "setup", "image": "i", "ports": [{"name": "admin", "containerPort": 7000}]},
                {"name": "sidecar", "image": "i", "restartPolicy": "Always",
                 "ports": [{"name": "metrics", "containerPort": 9000}]}
            ],
            "containers": [
                {"name": "one", "image": "i", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}
                ]},
                {"name": "two", "image": "i", "ports": [
                    {"name": "http", "containerPort": 9090},
                    {"name": "dns", "containerPort": 5353, "protocol": "TCP"},
                    {"containerPort": 6000}
                ]}
            ]
        },
        "status": {"phase": "Running", "podIP": "10.1.0.50"}
    })
}

#[test]
fn named_ports_resolve_on_containers_and_sidecars_per_protocol_first_wins() {
    // (port entry, probe port, protocol, verdict)
    let cases = [
        (json!({"port": "http"}), 8080, Tcp, Allow),
        (json!({"port": "http"}), 9090, Tcp, Deny),
        (json!({"port": "metrics"}), 9000, Tcp, Allow),
        (json!({"port": "admin"}), 7000, Tcp, Deny),
        (json!({"port": "dns", "protocol": "UDP"}), 53, Udp, Allow),
        (json!({"port": "dns", "protocol": "UDP"}), 5353, Udp, Deny),
        (json!({"port": "dns"}), 5353, Tcp, Allow),
        (json!({"port": "dns"}), 53, Tcp, Deny),
        (json!({"port": "dns"}), 53, Udp, Deny),
        (json!({"port": "nope"}), 6000, Tcp, Deny),
    ];
    for (entry, port, proto, want) in cases {
        let mut f = xyz();
        f.apply("c1", named_ports_pod());
        f.apply(
            "c1",
            policy("x", "named", json!({"podSelector": {"matchLabels": {"app": "ports"}}, "ingress": [{"ports": [entry]}]})),
        );
        assert_eq!(
            f.verdict("c1/y/a", "c1/x/ports", port, proto),
            want,
            "{entry} on {port}/{proto}"
        );
    }
}

#[test]
fn named_port_never_matches_an_external_destination() {
    let mut f = xyz();
    f.apply("c1", policy("x", "named-egress", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})));
    let e = f.check("c1/x/a", "192.0.2.80", 80, Tcp);
    assert_eq!(
        reasons(&e.egress),
        (Why::Denied, vec!["c1/x/named-egress"], vec![])
    );
    assert_eq!(e.ingress.why, Why::NotAPod);
    assert_eq!(f.verdict("c1/x/a", "c1/y/a", 80, Tcp), Allow);
    // An address of the pod network that no pod owns is no pod either.
    assert_eq!(f.verdict("c1/x/a", "10.1.9.9", 80, Tcp), Deny);
    // On ingress the name is resolved on the destination pod, which an external source reaches.
    f.apply("c1", policy("y", "named-ingress", json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})));
    assert_eq!(f.verdict("192.0.2.80", "c1/y/c", 81, Udp), Allow);
    assert_eq!(f.verdict("192.0.2.80", "c1/y/c", 80, Udp), Deny);
}

#[test]
fn named_egress_port_uses_the_destination_pods_number_not_the_sources() {
    let mut f = Fixture::new();
    let web = |name: &str, port: u16, ip: &str| {
        json!({"kind": "Pod", "metadata": {"namespace": "w", "name": name, "labels": {"app": name}},
               "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"name": "web", "containerPort": port}]}]},
               "status": {"phase": "Running", "podIP": ip}})
    };
    f.apply("c1", web("client", 8080, "10.5.0.1"));
    f.apply("c1", web("server", 9090, "10.5.0.2"));
    f.apply("c1", policy("w", "egress-web", json!({"podSelector": {"matchLabels": {"app": "client"}}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "web"}]}]})));
    assert_eq!(f.verdict("c1/w/client", "c1/w/server", 9090, Tcp), Allow);
    assert_eq!(f.verdict("c1/w/client", "c1/w/server", 8080, Tcp), Deny);
}

#[test]
fn match_expressions_operators_select_pods() {
    let labelled = [
        ("p1", json!({"app": "web", "tier": "front"})),
        ("p2", json!({"app": "web"})),
        ("p3", json!({"app": "db", "tier": "back"})),
        ("p4", json!({})),
    ];
    // (podSelector of a deny-ingress policy, the pods it isolates)
    let cases = [
        (json!({}), vec!["p1", "p2", "p3", "p4"]),
        (json!({"matchLabels": {"app": "web"}}), vec!["p1", "p2"]),
        (
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["db", "cache"]}]}),
            vec!["p3"],
        ),
        (
            json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["back"]}]}),
            vec!["p1", "p2", "p4"],
        ),
        (
            json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            vec!["p1", "p3"],
        ),
        (
            json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
            vec!["p2", "p4"],
        ),
        (
            json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
            vec!["p2"],
        ),
        (
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}, {"key": "app", "operator": "Exists"}]}),
            vec!["p3"],
        ),
    ];
    for (selector, isolated) in cases {
        let mut f = Fixture::new();
        for (i, (name, labels)) in labelled.iter().enumerate() {
            f.apply(
                "c1",
                pod("m", name, labels.clone(), &[&format!("10.7.0.{}", i + 1)]),
            );
        }
        f.apply("c1", policy("m", "deny", json!({"podSelector": selector})));
        for (name, _) in &labelled {
            let why = f
                .check("192.0.2.1", &format!("c1/m/{name}"), 80, Tcp)
                .ingress
                .why;
            let want = if isolated.contains(name) {
                Why::Denied
            } else {
                Why::NotSelected
            };
            assert_eq!(why, want, "{selector} on {name}");
        }
    }
}

#[test]
fn match_expressions_operators_select_peer_namespaces() {
    let mut f = xyz();
    f.apply("c1", namespace("y", json!({"ns": "y", "env": "prod"})));
    f.apply("c1", namespace("z", json!({"ns": "z", "env": "dev"})));
    // (namespaceSelector, namespaces admitted into x/a)
    let cases = [
        (
            json!({"matchExpressions": [{"key": "env", "operator": "Exists"}]}),
            vec!["y", "z"],
        ),
        (
            json!({"matchExpressions": [{"key": "env", "operator": "DoesNotExist"}]}),
            vec!["x"],
        ),
        (
            json!({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]}),
            vec!["x", "z"],
        ),
        (
            json!({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "qa"]}]}),
            vec!["y"],
        ),
    ];
    for (selector, admitted) in cases {
        f.apply(
            "c1",
            policy("x", "p", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": selector}]}]})),
        );
        for ns in ["x", "y", "z"] {
            let want = if admitted.contains(&ns) { Allow } else { Deny };
            assert_eq!(
                f.verdict(&format!("c1/{ns}/b"), "c1/x/a", 80, Tcp),
                want,
                "{selector} from {ns}"
            );
        }
    }
}

#[test]
fn ip_block_matches_pod_addresses_too() {
    let mut f = xyz();
    // Namespace y's pods are 10.1.1.0/24.
    f.apply(
        "c1",
        policy("x", "from-y-subnet", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.1.1.0/24", "except": ["10.1.1.3/32"]}}]}]})),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("x/a", false)
        .expect("y/a", "x/a", true)
        .expect("y/b", "x/a", true);
    f.validate(&r, 80, Tcp);
    let e = f.check("c1/y/a", "c1/x/a", 80, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Allowed,
            vec!["c1/x/from-y-subnet"],
            vec!["c1/x/from-y-subnet rule 0"]
        )
    );
    assert_eq!(e.egress.why, Why::NotSelected);
}

#[test]
fn external_addresses_have_no_policies_and_are_matched_only_by_ip_blocks() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "from-anywhere-pods",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        ),
    );
    let e = f.check("203.0.113.9", "c1/x/a", 80, Tcp);
    assert_eq!(e.verdict, Deny);
    assert_eq!(e.egress.why, Why::NotAPod);
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Denied,
            vec!["c1/x/deny-all", "c1/x/from-anywhere-pods"],
            vec![]
        )
    );
    let e = f.check("c1/y/a", "203.0.113.9", 80, Tcp);
    assert_eq!(
        (e.verdict, e.egress.why, e.ingress.why),
        (Allow, Why::NotSelected, Why::NotAPod)
    );
    f.apply("c1", policy("x", "from-doc-net", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]}]})));
    assert_eq!(f.verdict("203.0.113.9", "c1/x/a", 80, Tcp), Allow);
}

#[test]
fn a_pods_traffic_to_itself_is_always_allowed() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    for (from, to) in [
        ("c1/x/a", "c1/x/a"),
        ("c1/x/a", "10.1.0.1"),
        ("10.1.0.1", "c1/x/a"),
    ] {
        let e = f.check(from, to, 80, Tcp);
        assert_eq!(
            (e.verdict, e.egress.why, e.ingress.why),
            (Allow, Why::SelfTraffic, Why::SelfTraffic),
            "{from} -> {to}"
        );
    }
    let e = f.check6("c1/x/a", "c1/x/a", 81, Udp);
    assert_eq!((e.verdict, e.egress.why), (Allow, Why::SelfTraffic));
    assert_eq!(f.verdict("c1/x/a", "c1/x/b", 80, Tcp), Deny);
}

#[test]
fn reasons_list_every_allowing_rule_sorted_and_every_denying_policy() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "x",
            "b-second",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]},
                               {"ports": [{"port": 80}]},
                               {"from": [{"podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "a-first",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81}]}, {"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "c-deny",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "egress-only",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}),
        ),
    );
    let e = f.check("c1/x/b", "c1/x/a", 80, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Allowed,
            vec!["c1/x/a-first", "c1/x/b-second"],
            vec![
                "c1/x/a-first rule 1",
                "c1/x/b-second rule 0",
                "c1/x/b-second rule 1"
            ]
        )
    );
    assert_eq!(
        e.ingress.to_string(),
        "allowed by c1/x/a-first rule 1, c1/x/b-second rule 0, c1/x/b-second rule 1"
    );
    assert_eq!(
        reasons(&e.egress),
        (
            Why::Allowed,
            vec!["c1/x/egress-only"],
            vec!["c1/x/egress-only rule 0"]
        )
    );
    let e = f.check("c1/y/a", "c1/x/a", 82, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Denied,
            vec!["c1/x/a-first", "c1/x/b-second", "c1/x/c-deny"],
            vec![]
        )
    );
    assert_eq!(e.verdict, Deny);
}

#[test]
fn rule_numbers_sort_numerically() {
    let mut f = xyz();
    let rules: Vec<_> = (0..12).map(|_| json!({"ports": [{"port": 80}]})).collect();
    f.apply(
        "c1",
        policy("x", "many", json!({"podSelector": {}, "ingress": rules})),
    );
    let e = f.check("c1/y/a", "c1/x/a", 80, Tcp);
    let want: Vec<String> = (0..12).map(|i| format!("c1/x/many rule {i}")).collect();
    assert_eq!(e.ingress.rules, want);
}

#[test]
fn finished_pods_own_no_address() {
    let mut f = xyz();
    let done = json!({"kind": "Pod", "metadata": {"namespace": "x", "name": "done", "labels": {"pod": "done"}},
                      "spec": {"containers": []},
                      "status": {"phase": "Succeeded", "podIP": "10.1.1.1"}});
    f.apply("c1", done);
    // y/a keeps its address: the finished pod does not make it ambiguous.
    let e = f.check("10.1.1.1", "c1/x/a", 80, Tcp);
    assert_eq!(e.egress.why, Why::NotSelected);
    let id = f.engine.pod_by_name("c1", "x", "done").unwrap();
    assert!(matches!(
        f.engine.pod_endpoint(id, false),
        Err(EndpointError::NotLive { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// weft's multi-cluster rules.
// ---------------------------------------------------------------------------------------------

#[test]
fn policy_applies_only_to_pods_of_its_own_cluster() {
    let mut f = xyz2();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let mut r = f.reachability();
    r.expect(ALL, "c1/x/*", false).expect("c1/x/*", ALL, false);
    f.validate(&r, 80, Tcp);
    let e = f.check("c2/y/a", "c2/x/a", 80, Tcp);
    assert_eq!(
        (e.egress.why, e.ingress.why),
        (Why::NotSelected, Why::NotSelected)
    );
}

#[test]
fn pod_selector_only_peer_does_not_reach_the_same_namespace_of_another_cluster() {
    let mut f = xyz2();
    f.apply(
        "c1",
        policy("x", "x-a-allows-x-b", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]})),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("c1/x/a", false)
        .expect("c1/x/b", "c1/x/a", true);
    f.validate(&r, 80, Tcp);
    // Same for egress, and for an empty pod selector.
    f.apply("c2", policy("x", "egress-local", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"podSelector": {}}]}]})));
    assert_eq!(f.verdict("c2/x/a", "c2/x/b", 80, Tcp), Allow);
    assert_eq!(f.verdict("c2/x/a", "c1/x/b", 80, Tcp), Deny);
}

#[test]
fn empty_namespace_selector_admits_every_cluster_and_the_reason_names_the_rule() {
    let mut f = xyz2();
    f.apply(
        "c1",
        policy(
            "x",
            "allow-all-namespaces",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"ports": [{"port": 81}]}, {"from": [{"namespaceSelector": {}}]}]}),
        ),
    );
    f.validate(&f.reachability(), 80, Tcp);
    let e = f.check("c2/z/c", "c1/x/a", 80, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (
            Why::Allowed,
            vec!["c1/x/allow-all-namespaces"],
            vec!["c1/x/allow-all-namespaces rule 1"]
        )
    );
    // That the rule reaches another cluster is spelled out, and why.
    assert_eq!(
        e.ingress.notes,
        [
            "c1/x/allow-all-namespaces rule 1 admits c2/z/c of another cluster: peer 0's \
          namespaceSelector names no cluster, so it matches namespaces of every cluster"
        ]
    );
    // From its own cluster there is nothing to point out.
    assert!(
        f.check("c1/z/c", "c1/x/a", 80, Tcp)
            .ingress
            .notes
            .is_empty()
    );
    // External addresses are not pods of any namespace.
    assert_eq!(f.verdict("198.51.100.7", "c1/x/a", 80, Tcp), Deny);
}

#[test]
fn same_namespace_name_in_two_clusters_with_different_labels() {
    let mut f = xyz2();
    f.apply("c1", namespace("y", json!({"ns": "y", "env": "dev"})));
    f.apply("c2", namespace("y", json!({"ns": "y", "env": "prod"})));
    let from = |sel: serde_json::Value| {
        policy(
            "x",
            "from",
            json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": sel}]}]}),
        )
    };
    f.apply("c1", from(json!({"matchLabels": {"env": "prod"}})));
    let mut r = f.reachability();
    r.expect_all_ingress("c1/x/a", false)
        .expect("c2/y/*", "c1/x/a", true);
    f.validate(&r, 80, Tcp);
    // By name, both clusters' y match ...
    f.apply(
        "c1",
        from(json!({"matchLabels": {"kubernetes.io/metadata.name": "y"}})),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("c1/x/a", false)
        .expect("y/*", "c1/x/a", true);
    f.validate(&r, 80, Tcp);
    // ... and the cluster label picks one.
    f.apply("c1", from(json!({"matchLabels": {"kubernetes.io/metadata.name": "y", "cluster.clusterset.k8s.io": "c1"}})));
    let mut r = f.reachability();
    r.expect_all_ingress("c1/x/a", false)
        .expect("c1/y/*", "c1/x/a", true);
    f.validate(&r, 80, Tcp);
}

#[test]
fn every_cluster_label_name_works_in_selectors() {
    for label in CLUSTER_LABELS {
        let mut f = xyz2();
        f.apply(
            "c1",
            policy("x", "from-c2", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {label: "c2"}}}]}]})),
        );
        let mut r = f.reachability();
        r.expect("c1/*/*", "c1/x/a", false);
        f.validate(&r, 80, Tcp);
        // In an egress rule with a pod selector too, and with matchExpressions.
        f.apply(
            "c2",
            policy(
                "z",
                "to-c1-b",
                json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{
                    "namespaceSelector": {"matchExpressions": [{"key": label, "operator": "In", "values": ["c1"]}]},
                    "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
            ),
        );
        assert_eq!(f.verdict("c2/z/a", "c1/y/b", 80, Tcp), Allow, "{label}");
        assert_eq!(f.verdict("c2/z/a", "c2/y/b", 80, Tcp), Deny, "{label}");
        assert_eq!(f.verdict("c2/z/a", "c1/y/a", 80, Tcp), Deny, "{label}");
    }
}

#[test]
fn cross_cluster_connection_needs_egress_of_the_source_and_ingress_of_the_destination() {
    let egress_allow = json!({"podSelector": {"matchLabels": {"pod": "a"}},
                              "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"cluster.clusterset.k8s.io": "c2"}}}]}]});
    let egress_deny =
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]});
    let ingress_allow = json!({"podSelector": {"matchLabels": {"pod": "a"}},
                               "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"clusterset.k8s.io/cluster-name": "c1", "kubernetes.io/metadata.name": "x"}},
                                                      "podSelector": {"matchLabels": {"pod": "a"}}}]}]});
    let ingress_deny =
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Ingress"]});
    // (c1/x policy, c2/y policy, verdict, why of egress, why of ingress) for c1/x/a -> c2/y/a.
    let cases = [
        (None, None, Allow, Why::NotSelected, Why::NotSelected),
        (
            Some(&egress_deny),
            Some(&ingress_allow),
            Deny,
            Why::Denied,
            Why::Allowed,
        ),
        (
            Some(&egress_allow),
            Some(&ingress_deny),
            Deny,
            Why::Allowed,
            Why::Denied,
        ),
        (
            Some(&egress_allow),
            Some(&ingress_allow),
            Allow,
            Why::Allowed,
            Why::Allowed,
        ),
        (
            Some(&egress_deny),
            Some(&ingress_deny),
            Deny,
            Why::Denied,
            Why::Denied,
        ),
        (
            Some(&egress_allow),
            None,
            Allow,
            Why::Allowed,
            Why::NotSelected,
        ),
        (
            None,
            Some(&ingress_deny),
            Deny,
            Why::NotSelected,
            Why::Denied,
        ),
    ];
    for (i, (c1, c2, verdict, egress, ingress)) in cases.into_iter().enumerate() {
        let mut f = xyz2();
        if let Some(spec) = c1 {
            f.apply("c1", policy("x", "c1-egress", spec.clone()));
        }
        if let Some(spec) = c2 {
            f.apply("c2", policy("y", "c2-ingress", spec.clone()));
        }
        let e = f.check("c1/x/a", "c2/y/a", 80, Tcp);
        assert_eq!(
            (e.verdict, e.egress.why, e.ingress.why),
            (verdict, egress, ingress),
            "case {i}"
        );
        // The same names in the other direction are not selected by these policies.
        let back = f.check("c2/y/b", "c1/x/b", 80, Tcp);
        assert_eq!(back.verdict, Allow, "case {i}");
    }
}

#[test]
fn forged_cluster_label_is_corrected_and_never_believed() {
    let c1 = cid("c1");
    let api = serde_json::from_value(json!({
        "metadata": {"name": "x", "labels": {"cluster.clusterset.k8s.io": "c2", "networking.k8s.io/multicluster-name": "c2", "team": "a"}}
    }))
    .unwrap();
    let (ns, corrections) = Namespace::from_api(&c1, &api).unwrap();
    let claimed: Vec<(&str, &str)> = corrections
        .iter()
        .map(|c| (c.label, c.claimed.as_str()))
        .collect();
    assert_eq!(
        claimed,
        vec![
            ("cluster.clusterset.k8s.io", "c2"),
            ("networking.k8s.io/multicluster-name", "c2")
        ]
    );
    for label in CLUSTER_LABELS {
        assert_eq!(ns.labels[label], "c1", "{label}");
    }
    assert_eq!(ns.labels["team"], "a");

    let mut f = xyz2();
    f.upsert_namespace(ns);
    assert_eq!(
        f.engine.namespace_labels(&c1, "x").unwrap()["cluster.clusterset.k8s.io"],
        "c1"
    );
    let from = |cluster: &str| json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"cluster.clusterset.k8s.io": cluster, "team": "a"}}}]}]});
    f.apply("c2", policy("y", "from-team-a-of-c2", from("c2")));
    assert_eq!(
        f.verdict("c1/x/a", "c2/y/a", 80, Tcp),
        Deny,
        "the forged claim must not admit c1/x"
    );
    f.apply("c2", policy("y", "from-team-a-of-c2", from("c1")));
    assert_eq!(
        f.verdict("c1/x/a", "c2/y/a", 80, Tcp),
        Allow,
        "the real cluster admits c1/x"
    );
    assert_eq!(f.verdict("c2/x/a", "c2/y/a", 80, Tcp), Deny);
}

#[test]
fn ip_blocks_of_one_family_never_match_the_other() {
    let mut f = xyz();
    let from_block = |cidr: &str| json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}]});
    f.apply("c1", policy("x", "any-v4", from_block("0.0.0.0/0")));
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Allow);
    assert_eq!(f.check6("c1/y/a", "c1/x/a", 80, Tcp).verdict, Deny);
    assert_eq!(f.verdict("2001:db8::1", "c1/x/a", 80, Tcp), Deny);
    // An IPv4-mapped IPv6 address is the IPv4 address: y/a's, and matched by 0.0.0.0/0.
    let e = f.check("::ffff:10.1.1.1", "c1/x/a", 80, Tcp);
    assert_eq!(
        (e.verdict, e.egress.why, e.ingress.why),
        (Allow, Why::NotSelected, Why::Allowed)
    );
    assert_eq!(f.verdict("::ffff:198.51.100.1", "c1/x/a", 80, Tcp), Allow);
    assert!(matches!(
        f.engine.address_endpoint("::ffff:10.1.1.1".parse().unwrap()),
        Endpoint::Pod { ip, .. } if ip == "10.1.1.1".parse::<std::net::IpAddr>().unwrap()
    ));

    f.apply("c1", policy("x", "any-v4", from_block("::/0")));
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Deny);
    assert_eq!(f.check6("c1/y/a", "c1/x/a", 80, Tcp).verdict, Allow);
    assert_eq!(f.verdict("2001:db8::1", "c1/x/a", 80, Tcp), Allow);
    assert_eq!(f.verdict("::ffff:10.1.1.1", "c1/x/a", 80, Tcp), Deny);

    // Egress, and an IPv6 block with an exception.
    f.apply(
        "c1",
        policy("y", "v6-egress", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"ipBlock": {"cidr": "fd00:1::/32", "except": ["fd00:1:2::/48"]}}]}]})),
    );
    assert_eq!(f.check6("c1/y/a", "c1/x/b", 80, Tcp).verdict, Allow);
    assert_eq!(f.check6("c1/y/a", "c1/z/b", 80, Tcp).verdict, Deny);
    assert_eq!(f.verdict("c1/y/a", "c1/x/b", 80, Tcp), Deny);
}

#[test]
fn duplicate_address_in_a_cluster_is_ambiguous_and_denied() {
    let mut f = xyz();
    // x/dup claims y/a's IPv4 address (10.1.1.1) but not its IPv6 one.
    f.apply("c1", pod("x", "dup", json!({"pod": "dup"}), &["10.1.1.1"]));
    f.apply("c1", policy("z", "egress", json!({"podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {}}]}, {"to": [{"ipBlock": {"cidr": "10.1.1.0/24"}}], "ports": [{"port": 81}]}]})));

    let e = f.check("10.1.1.1", "c1/x/a", 80, Tcp);
    assert_eq!(
        (e.verdict, e.egress.why, e.ingress.why),
        (Deny, Why::Ambiguous, Why::NotSelected)
    );
    assert_eq!(
        e.egress.to_string(),
        "denied: address claimed by several pods"
    );
    assert_eq!(
        e.egress.notes,
        ["address 10.1.1.1 is claimed by c1/x/dup, c1/y/a: it matches none of them"]
    );
    // Either claimant, asked for by name, is on the ambiguous address.
    let e = f.check("c1/y/a", "c1/x/a", 80, Tcp);
    assert_eq!(e.egress.why, Why::Ambiguous);
    let e = f.check("c1/x/dup", "c1/x/a", 80, Tcp);
    assert_eq!(e.egress.why, Why::Ambiguous);
    // As a destination: ingress is ambiguous, and as a peer it matches only ipBlocks.
    let e = f.check("c1/z/a", "10.1.1.1", 80, Tcp);
    assert_eq!((e.verdict, e.ingress.why), (Deny, Why::Ambiguous));
    assert_eq!(
        reasons(&e.egress),
        (Why::Denied, vec!["c1/z/egress"], vec![])
    );
    let e = f.check("c1/z/a", "10.1.1.1", 81, Tcp);
    assert_eq!((e.verdict, e.ingress.why), (Deny, Why::Ambiguous));
    assert_eq!(
        reasons(&e.egress),
        (
            Why::Allowed,
            vec!["c1/z/egress"],
            vec!["c1/z/egress rule 1"]
        )
    );
    // The unique IPv6 address still names y/a.
    assert_eq!(
        f.check6("c1/y/a", "c1/x/a", 80, Tcp).egress.why,
        Why::NotSelected
    );
    // Once the duplicate goes, the address is y/a's again.
    f.remove_pod("c1", "x", "dup");
    assert_eq!(
        f.check("10.1.1.1", "c1/x/a", 80, Tcp).egress.why,
        Why::NotSelected
    );
    assert_eq!(f.verdict("c1/z/a", "10.1.1.1", 80, Tcp), Allow);
}

#[test]
fn duplicate_address_across_clusters_is_ambiguous_too() {
    let mut f = xyz2();
    f.apply("c2", pod("x", "dup", json!({"pod": "dup"}), &["10.1.0.1"]));
    assert_eq!(
        f.check("10.1.0.1", "c1/y/a", 80, Tcp).egress.why,
        Why::Ambiguous
    );
    assert_eq!(
        f.check("c1/y/a", "c1/x/a", 80, Tcp).ingress.why,
        Why::Ambiguous
    );
}

#[test]
fn late_removal_of_an_old_pod_does_not_erase_a_new_pod_reusing_its_address() {
    let mut f = xyz();
    f.apply(
        "c1",
        policy(
            "y",
            "deny-ingress",
            json!({"podSelector": {"matchLabels": {"pod": "new"}}}),
        ),
    );
    let old = json!({"kind": "Pod", "metadata": {"namespace": "x", "name": "old", "uid": "uid-old", "labels": {"pod": "old"}},
                     "spec": {"containers": []}, "status": {"phase": "Running", "podIP": "10.1.9.9"}});
    let new = json!({"kind": "Pod", "metadata": {"namespace": "y", "name": "new", "uid": "uid-new", "labels": {"pod": "new"}},
                     "spec": {"containers": []}, "status": {"phase": "Running", "podIP": "10.1.9.9"}});
    f.apply("c1", old);
    assert_eq!(
        f.check("c1/z/a", "10.1.9.9", 80, Tcp).ingress.why,
        Why::NotSelected
    );
    // The new pod's add arrives before the old pod's delete.
    f.apply("c1", new);
    assert_eq!(
        f.check("c1/z/a", "10.1.9.9", 80, Tcp).ingress.why,
        Why::Ambiguous
    );
    f.remove_pod_uid("c1", "uid-old");
    let e = f.check("c1/z/a", "10.1.9.9", 80, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (Why::Denied, vec!["c1/y/deny-ingress"], vec![])
    );
    // A repeated late delete of the old pod changes nothing.
    f.remove_pod_uid("c1", "uid-old");
    assert_eq!(
        f.check("c1/z/a", "10.1.9.9", 80, Tcp).ingress.why,
        Why::Denied
    );
}

#[test]
fn host_network_pods_are_not_isolated_and_count_as_their_nodes_address() {
    let mut f = xyz();
    let host = |name: &str, status: serde_json::Value| {
        json!({"kind": "Pod", "metadata": {"namespace": "x", "name": name, "labels": {"pod": "a"}},
               "spec": {"hostNetwork": true, "nodeName": "node-1", "containers": [{"name": "c", "image": "i", "ports": [{"name": "serve-80-tcp", "containerPort": 80}]}]},
               "status": status})
    };
    f.apply(
        "c1",
        host("agent", json!({"phase": "Running", "podIP": "192.168.1.1"})),
    );
    f.apply("c1", host("agent-no-ip", json!({"phase": "Running"})));
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    for agent in ["c1/x/agent", "c1/x/agent-no-ip"] {
        let id = f
            .engine
            .pod_by_name("c1", "x", agent.rsplit('/').next().unwrap())
            .unwrap();
        assert_eq!(
            f.engine.pod_endpoint(id, false).unwrap(),
            Endpoint::Address("192.168.1.1".parse().unwrap()),
            "{agent}"
        );
        assert_eq!(
            f.engine.pod_endpoint(id, true).unwrap(),
            Endpoint::Address("fd99:1::1".parse().unwrap()),
            "{agent}"
        );
        let e = f.check(agent, "c1/y/a", 80, Tcp);
        assert_eq!((e.verdict, e.egress.why), (Allow, Why::NotAPod), "{agent}");
        let e = f.check("c1/y/a", agent, 80, Tcp);
        assert_eq!((e.verdict, e.ingress.why), (Allow, Why::NotAPod), "{agent}");
    }
    // x/a (pod=a, same labels) is isolated; the host-network pods are not.
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Deny);
    // Selectors never match them; an ipBlock of the node's address does.
    f.apply("c1", policy("y", "from-pods", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}, "podSelector": {}}]}]})));
    let e = f.check("c1/x/agent", "c1/y/a", 80, Tcp);
    assert_eq!(
        reasons(&e.ingress),
        (Why::Denied, vec!["c1/y/from-pods"], vec![])
    );
    f.apply("c1", policy("y", "from-node", json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.1.0/24"}}]}]})));
    assert_eq!(f.verdict("c1/x/agent", "c1/y/a", 80, Tcp), Allow);
    assert_eq!(f.check6("c1/x/agent", "c1/y/a", 80, Tcp).verdict, Deny);
    // The node's address is no pod: its traffic is the same.
    assert_eq!(f.verdict("192.168.1.1", "c1/y/a", 80, Tcp), Allow);
    // A named port on a host-network destination never matches.
    f.apply("c1", policy("y", "named-egress", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "serve-80-tcp"}]}]})));
    assert_eq!(f.verdict("c1/y/a", "c1/x/agent", 80, Tcp), Deny);
    assert_eq!(f.verdict("c1/y/a", "c1/z/a", 80, Tcp), Allow);
}

// ---------------------------------------------------------------------------------------------
// Incremental updates decide as a fresh engine does (every `check` and `validate` compares the
// incremental engine with a fresh one; these walk through the updates explicitly).
// ---------------------------------------------------------------------------------------------

/// Checks every pair of pods on a few ports and protocols three ways, and returns the verdicts.
fn all_verdicts(f: &Fixture) -> Vec<Verdict> {
    let pods = f.pod_names();
    let mut v = Vec::new();
    for (port, proto) in [(80, Tcp), (81, Udp), (80, Sctp)] {
        for a in &pods {
            for b in &pods {
                v.push(f.verdict(a, b, port, proto));
            }
        }
    }
    v
}

#[test]
fn incremental_updates_decide_as_a_fresh_engine() {
    let mut f = xyz2();
    f.apply(
        "c1",
        policy(
            "x",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    f.apply(
        "c1",
        policy("x", "from-team", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "serve-80-tcp"}]}]})),
    );
    f.apply("c2", policy("y", "to-x", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}]}]})));
    let before = all_verdicts(&f);

    // Namespace relabel: c2/z joins team blue.
    f.apply("c2", namespace("z", json!({"ns": "z", "team": "blue"})));
    assert_eq!(
        f.verdict("c2/z/b", "c1/x/a", 80, Tcp),
        Deny,
        "needs the role label too"
    );
    // Pod relabel.
    f.apply(
        "c2",
        pod(
            "z",
            "b",
            json!({"pod": "b", "role": "client"}),
            &["10.2.2.2", "fd00:2:2::2"],
        ),
    );
    assert_eq!(f.verdict("c2/z/b", "c1/x/a", 80, Tcp), Allow);
    assert_eq!(f.verdict("c2/z/c", "c1/x/a", 80, Tcp), Deny);
    // Policy replace: the egress rule now names UDP.
    f.apply(
        "c1",
        policy("x", "from-team", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]})),
    );
    assert_eq!(f.verdict("c1/x/a", "c1/x/b", 80, Tcp), Deny);
    assert_eq!(
        f.verdict("c1/x/a", "c1/x/b", 81, Udp),
        Deny,
        "x/b's ingress is still denied"
    );
    // Namespace removal: c2/z keeps its pods, loses its labels.
    f.remove_namespace("c2", "z");
    assert_eq!(f.verdict("c2/z/b", "c1/x/a", 80, Tcp), Deny);
    assert_eq!(
        f.engine
            .namespace_labels(&cid("c2"), "z")
            .unwrap()
            .get("team"),
        None
    );
    f.apply("c2", namespace("z", json!({"ns": "z", "team": "blue"})));
    assert_eq!(f.verdict("c2/z/b", "c1/x/a", 80, Tcp), Allow);
    // Pod removal and re-adding.
    f.remove_pod("c2", "z", "b");
    f.apply(
        "c2",
        pod("z", "b", json!({"pod": "b"}), &["10.2.2.2", "fd00:2:2::2"]),
    );
    assert_eq!(f.verdict("c2/z/b", "c1/x/a", 80, Tcp), Deny);
    all_verdicts(&f);
    // Removing every policy, namespace change and pod change undone, restores the start.
    f.apply("c2", namespace("z", json!({"ns": "z"})));
    f.apply("c1", policy("x", "from-team", json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "blue"}}, "podSelector": {"matchExpressions": [{"key": "role", "operator": "Exists"}]}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": "serve-80-tcp"}]}]})));
    assert_eq!(all_verdicts(&f), before);
    for (c, ns, name) in [
        ("c1", "x", "deny-all"),
        ("c1", "x", "from-team"),
        ("c2", "y", "to-x"),
    ] {
        f.remove_policy(c, ns, name);
    }
    assert!(all_verdicts(&f).iter().all(|v| *v == Allow));
    assert_eq!(f.engine.counts(), Engine::from_clusterset(&f.set).counts());
}

#[test]
fn namespace_removal_reverts_to_automatic_labels_while_pods_remain() {
    let mut f = xyz();
    f.apply("c1", policy("x", "from-ns-label", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]})));
    f.apply("c1", policy("z", "from-ns-name", json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}]}]})));
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Allow);
    f.remove_namespace("c1", "y");
    assert_eq!(f.verdict("c1/y/a", "c1/x/a", 80, Tcp), Deny);
    assert_eq!(f.verdict("c1/y/a", "c1/z/a", 80, Tcp), Allow);
    // A policy and pods in a namespace never declared work the same.
    f.apply("c1", pod("w", "a", json!({"pod": "a"}), &["10.1.5.1"]));
    f.apply("c1", policy("w", "deny", json!({"podSelector": {}})));
    assert_eq!(f.verdict("c1/y/a", "c1/w/a", 80, Tcp), Deny);
    f.remove_policy("c1", "w", "deny");
    assert_eq!(f.verdict("c1/y/a", "c1/w/a", 80, Tcp), Allow);
}

#[test]
fn the_engine_sets_cluster_labels_itself_whatever_it_is_given() {
    let c2 = weft::model::ClusterId::new("c2").expect("cluster id");
    let forged = weft::model::Namespace {
        cluster: c2.clone(),
        name: "x".into(),
        uid: "u".into(),
        labels: CLUSTER_LABELS
            .iter()
            .map(|l| (l.to_string(), "c1".to_string()))
            .chain([("kubernetes.io/metadata.name".to_string(), "y".to_string())])
            .collect(),
    };
    let mut engine = Engine::new();
    engine.upsert_namespace(&forged);
    let labels = engine.namespace_labels(&c2, "x").expect("namespace");
    for l in CLUSTER_LABELS {
        assert_eq!(labels[l], "c2", "{l}");
    }
    assert_eq!(labels["kubernetes.io/metadata.name"], "x");
}

#[test]
fn pod_labels_that_mimic_namespace_or_cluster_labels_are_never_namespace_labels() {
    let mut f = xyz2();
    // A pod of c2 dresses up as a pod of c1's kube-system.
    f.apply(
        "c2",
        pod(
            "y",
            "spoof",
            json!({"cluster.clusterset.k8s.io": "c1", "kubernetes.io/metadata.name": "kube-system"}),
            &["10.2.9.9"],
        ),
    );
    f.apply(
        "c1",
        policy(
            "x",
            "from-c1-kube-system",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                "cluster.clusterset.k8s.io": "c1", "kubernetes.io/metadata.name": "kube-system"}}}]}]}),
        ),
    );
    assert_eq!(f.verdict("c2/y/spoof", "c1/x/a", 80, Tcp), Deny);
    // A selector that resolves to nothing (a cluster no one has) admits nothing.
    f.apply(
        "c1",
        policy(
            "x",
            "from-ghost",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                "cluster.clusterset.k8s.io": "ghost"}}}]}]}),
        ),
    );
    let mut r = f.reachability();
    r.expect_all_ingress("c1/x/*", false);
    f.validate(&r, 80, Tcp);
}

#[test]
fn an_expired_clusters_pods_match_no_selector_but_denies_stay() {
    let mut f = xyz2();
    f.apply(
        "c1",
        policy(
            "x",
            "from-y-anywhere",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
        ),
    );
    f.apply(
        "c2",
        policy(
            "z",
            "deny-all",
            json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ),
    );
    let mut engine = Engine::from_clusterset(&f.set);
    let decide = |engine: &Engine, from: &str, to: &str| {
        let end = |name: &str| {
            let parts: Vec<&str> = name.split('/').collect();
            let pod = engine
                .pod_by_name(parts[0], parts[1], parts[2])
                .expect("pod");
            engine.pod_endpoint(pod, false).expect("endpoint")
        };
        let c = weft::policy::Connection {
            src: end(from),
            dst: end(to),
            port: 80,
            protocol: Tcp,
        };
        engine.explain(&c, &engine.decide(&c))
    };
    let c2 = weft::model::ClusterId::new("c2").expect("id");
    assert_eq!(decide(&engine, "c2/y/b", "c1/x/a").verdict, Allow);
    engine.set_cluster_expired(&c2, true);
    // An allow that depends on c2's data fails closed, and says why.
    let e = decide(&engine, "c2/y/b", "c1/x/a");
    assert_eq!(e.verdict, Deny);
    assert!(
        e.ingress
            .notes
            .iter()
            .any(|n| n.contains("older than the maximum staleness")),
        "{:?}",
        e.ingress.notes
    );
    // c1's own pods still match.
    assert_eq!(decide(&engine, "c1/y/b", "c1/x/a").verdict, Allow);
    // c2's own policies still isolate its pods: denies stay.
    assert_eq!(decide(&engine, "c1/x/b", "c2/z/a").verdict, Deny);
    engine.set_cluster_expired(&c2, false);
    assert_eq!(decide(&engine, "c2/y/b", "c1/x/a").verdict, Allow);
}
