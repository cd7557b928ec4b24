//! The fields the API knows, to reject unknown or misspelled ones that k8s-openapi would drop.

use serde_json::Value;

use super::FieldError;

/// What a field holds, as far as the check goes.
enum Shape {
    /// Anything: not checked further (labels, annotations, values, scalars).
    Any,
    /// An object with exactly these field names.
    Object(&'static [(&'static str, Shape)]),
    /// A list of items of one shape.
    List(&'static Shape),
}

use Shape::{Any, List, Object};

const REQUIREMENT: Shape = Object(&[("key", Any), ("operator", Any), ("values", Any)]);

const SELECTOR: Shape = Object(&[
    ("matchLabels", Any),
    ("matchExpressions", List(&REQUIREMENT)),
]);

const IP_BLOCK: Shape = Object(&[("cidr", Any), ("except", Any)]);

const PEER: Shape = Object(&[
    ("podSelector", SELECTOR),
    ("namespaceSelector", SELECTOR),
    ("ipBlock", IP_BLOCK),
]);

const PORT: Shape = Object(&[("protocol", Any), ("port", Any), ("endPort", Any)]);

const INGRESS_RULE: Shape = Object(&[("from", List(&PEER)), ("ports", List(&PORT))]);

const EGRESS_RULE: Shape = Object(&[("to", List(&PEER)), ("ports", List(&PORT))]);

const SPEC: Shape = Object(&[
    ("podSelector", SELECTOR),
    ("policyTypes", Any),
    ("ingress", List(&INGRESS_RULE)),
    ("egress", List(&EGRESS_RULE)),
]);

/// `ObjectMeta`: every field name, so that a misspelled one (`namespce`) is caught.
const METADATA: Shape = Object(&[
    ("name", Any),
    ("generateName", Any),
    ("namespace", Any),
    ("selfLink", Any),
    ("uid", Any),
    ("resourceVersion", Any),
    ("generation", Any),
    ("creationTimestamp", Any),
    ("deletionTimestamp", Any),
    ("deletionGracePeriodSeconds", Any),
    ("labels", Any),
    ("annotations", Any),
    ("ownerReferences", Any),
    ("finalizers", Any),
    ("managedFields", Any),
]);

const NETWORK_POLICY: Shape = Object(&[
    ("apiVersion", Any),
    ("kind", Any),
    ("metadata", METADATA),
    ("spec", SPEC),
    ("status", Any),
]);

/// Any object weft reads, down to its metadata.
const OBJECT: Shape = Object(&[
    ("apiVersion", Any),
    ("kind", Any),
    ("metadata", METADATA),
    ("spec", Any),
    ("status", Any),
]);

/// An EndpointSlice, whose fields sit at the top level.
const ENDPOINT_SLICE: Shape = Object(&[
    ("apiVersion", Any),
    ("kind", Any),
    ("metadata", METADATA),
    ("addressType", Any),
    ("endpoints", Any),
    ("ports", Any),
]);

/// Checks that an object of `kind` uses only the fields the API knows — everywhere in a
/// NetworkPolicy, down to the metadata in the other kinds; the error names the first unknown
/// field's path.
pub fn check_fields(kind: &str, value: &Value) -> Result<(), FieldError> {
    let shape = match kind {
        "NetworkPolicy" => &NETWORK_POLICY,
        "EndpointSlice" => &ENDPOINT_SLICE,
        _ => &OBJECT,
    };
    check(shape, value, "")
}

fn check(shape: &Shape, value: &Value, path: &str) -> Result<(), FieldError> {
    match (shape, value) {
        (Object(fields), Value::Object(map)) => {
            for (key, v) in map {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match fields.iter().find(|(name, _)| name == key) {
                    Some((_, shape)) => check(shape, v, &at)?,
                    None => return Err(FieldError::new(at, unknown_field(key, fields))),
                }
            }
            Ok(())
        }
        (List(item), Value::Array(items)) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check(item, v, &format!("{path}[{i}]"))),
        _ => Ok(()),
    }
}

/// The message for an unknown field, with the known one it probably meant.
fn unknown_field(key: &str, fields: &[(&'static str, Shape)]) -> String {
    let names = || fields.iter().map(|(name, _)| *name);
    let meant = names()
        .find(|name| name.eq_ignore_ascii_case(key))
        .or_else(|| names().find(|name| one_edit_apart(name, key)));
    match meant {
        Some(name) => format!("unknown field {key:?}; did you mean {name:?}?"),
        None => format!("unknown field {key:?}"),
    }
}

/// Whether `b` is `a` with one character inserted, deleted or replaced, or two adjacent
/// characters swapped (`exept` for `except`, `form` for `from`).
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (ra, rb) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    match (ra.len(), rb.len()) {
        (0, 1) | (1, 0) | (1, 1) => true,
        (2, 2) => ra[0] == rb[1] && ra[1] == rb[0],
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: Value) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "n", "labels": {"any": "thing"}},
            "spec": spec
        })
    }

    #[test]
    fn known_fields_pass() {
        let full = policy(json!({
            "podSelector": {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "a", "operator": "In", "values": ["x"]}]},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [
                    {"podSelector": {}, "namespaceSelector": {"matchLabels": {"x": "y"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}
                ],
                "ports": [{"protocol": "TCP", "port": 80, "endPort": 90}]
            }],
            "egress": [{"to": [{"podSelector": {}}], "ports": [{"port": "http"}]}]
        }));
        assert_eq!(check_fields("NetworkPolicy", &full), Ok(()));
        let mut meta = full.clone();
        meta["metadata"] = json!({
            "name": "p", "generateName": "p-", "namespace": "n", "selfLink": "/x", "uid": "u",
            "resourceVersion": "1", "generation": 1, "creationTimestamp": "2024-01-01T00:00:00Z",
            "deletionTimestamp": null, "deletionGracePeriodSeconds": 0, "labels": {}, "annotations": {"a": "b"},
            "ownerReferences": [{"whatever": 1}], "finalizers": ["f"], "managedFields": [{"manager": "kubectl"}]
        });
        meta["status"] = json!({"anything": true});
        assert_eq!(check_fields("NetworkPolicy", &meta), Ok(()));
    }

    #[test]
    fn wrong_types_are_left_to_the_deserializer() {
        for spec in [
            json!([]),
            json!({"ingress": {"from": 1}}),
            json!({"ingress": [null, 3]}),
            json!(null),
        ] {
            assert_eq!(
                check_fields("NetworkPolicy", &policy(spec.clone())),
                Ok(()),
                "{spec}"
            );
        }
    }

    #[test]
    fn other_objects_are_checked_down_to_their_metadata() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "lables": {"app": "db"}}, "spec": {"anything": 1}});
        let e = check_fields("Pod", &pod).unwrap_err();
        assert_eq!(e.path, "metadata.lables");
        assert_eq!(
            e.message,
            "unknown field \"lables\"; did you mean \"labels\"?"
        );
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metdata": {"name": "a"}});
        assert_eq!(check_fields("Namespace", &ns).unwrap_err().path, "metdata");
        let fine = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n"},
            "spec": {"podCIDR": "10.0.0.0/24"}, "status": {"addresses": []}});
        assert!(check_fields("Node", &fine).is_ok());
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "s"}, "addressType": "IPv4", "endpoint": []});
        assert_eq!(
            check_fields("EndpointSlice", &slice).unwrap_err().path,
            "endpoint"
        );
    }

    #[test]
    fn unknown_fields_are_named_by_path() {
        let cases = [
            (
                policy(json!({"ingress": [{"from": [{"ipblock": {"cidr": "10.0.0.0/8"}}]}]})),
                "spec.ingress[0].from[0].ipblock",
                "unknown field \"ipblock\"; did you mean \"ipBlock\"?",
            ),
            (
                policy(
                    json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "exept": ["10.1.0.0/16"]}}]}]}),
                ),
                "spec.egress[0].to[0].ipBlock.exept",
                "unknown field \"exept\"; did you mean \"except\"?",
            ),
            (
                policy(json!({"ingress": [{"form": []}]})),
                "spec.ingress[0].form",
                "unknown field \"form\"; did you mean \"from\"?",
            ),
            (
                policy(json!({"ingress": [{"to": []}]})),
                "spec.ingress[0].to",
                "unknown field \"to\"",
            ),
            (
                policy(json!({"egress": [{"from": []}]})),
                "spec.egress[0].from",
                "unknown field \"from\"",
            ),
            (
                policy(json!({"ingress": [{"ports": [{"port": 80, "endport": 90}]}]})),
                "spec.ingress[0].ports[0].endport",
                "unknown field \"endport\"; did you mean \"endPort\"?",
            ),
            (
                policy(
                    json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "value": []}]}}),
                ),
                "spec.podSelector.matchExpressions[0].value",
                "unknown field \"value\"; did you mean \"values\"?",
            ),
            (
                policy(json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabel": {}}}]}]})),
                "spec.ingress[0].from[0].namespaceSelector.matchLabel",
                "unknown field \"matchLabel\"; did you mean \"matchLabels\"?",
            ),
            (
                policy(json!({"policyType": ["Ingress"]})),
                "spec.policyType",
                "unknown field \"policyType\"; did you mean \"policyTypes\"?",
            ),
            (
                policy(json!({"ingres": [{}]})),
                "spec.ingres",
                "unknown field \"ingres\"; did you mean \"ingress\"?",
            ),
            (
                policy(json!({"podSelector": {}, "selector": {}})),
                "spec.selector",
                "unknown field \"selector\"",
            ),
            (
                json!({"kind": "NetworkPolicy", "metadata": {"name": "p", "namespce": "n"}}),
                "metadata.namespce",
                "unknown field \"namespce\"; did you mean \"namespace\"?",
            ),
            (
                json!({"kind": "NetworkPolicy", "metadata": {"name": "p"}, "Spec": {}}),
                "Spec",
                "unknown field \"Spec\"; did you mean \"spec\"?",
            ),
        ];
        for (value, path, message) in cases {
            let e = check_fields("NetworkPolicy", &value).unwrap_err();
            assert_eq!(
                (e.path.as_str(), e.message.as_str()),
                (path, message),
                "{value}"
            );
        }
    }

    #[test]
    fn one_edit() {
        let cases = [
            ("except", "exept", true),
            ("from", "form", true),
            ("ports", "port", true),
            ("cidr", "cidrs", true),
            ("cidr", "cider", true),
            ("from", "to", false),
            ("ports", "pots1", false),
            ("ab", "ba", true),
            ("abc", "cba", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(one_edit_apart(a, b), want, "{a} {b}");
        }
    }
}
