//! Label selectors: validated from the API's form, matched against labels.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

use super::FieldError;
use super::labels::{self, Labels};

/// A selector operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The label is present and its value is one of the values.
    In,
    /// The label is absent, or its value is none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// Label key.
    pub key: String,
    /// How the key is tested.
    pub operator: Operator,
    /// Values for `In`/`NotIn`; empty for the others.
    pub values: BTreeSet<String>,
}

/// A validated label selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LabelSelector {
    /// Labels that must be present with exactly these values.
    pub match_labels: BTreeMap<String, String>,
    /// Further requirements, all of which must hold.
    pub match_expressions: Vec<Requirement>,
}

impl LabelSelector {
    /// Whether this selector selects everything.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector pins the cluster: it requires a cluster label to equal, or be
    /// one of, given values. One that does not matches namespaces of every cluster.
    pub fn names_cluster(&self) -> bool {
        let is_cluster_label = |k: &str| labels::CLUSTER_LABELS.contains(&k);
        self.match_labels.keys().any(|k| is_cluster_label(k))
            || self
                .match_expressions
                .iter()
                .any(|r| r.operator == Operator::In && is_cluster_label(&r.key))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }

    /// Validates the API form at `path` as the API server would.
    pub fn from_api(sel: &meta::LabelSelector, path: &str) -> Result<Self, FieldError> {
        let match_labels = sel.match_labels.clone().unwrap_or_default();
        labels::validate_labels(&match_labels).map_err(|(key, msg)| {
            let at = if key.is_empty() {
                format!("{path}.matchLabels")
            } else {
                format!("{path}.matchLabels.{key}")
            };
            FieldError::new(at, msg)
        })?;
        let mut match_expressions = Vec::new();
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            labels::validate_key(&e.key).map_err(|m| {
                FieldError::new(format!("{at}.key"), format!("invalid key {:?}: {m}", e.key))
            })?;
            let operator = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(FieldError::new(
                        format!("{at}.operator"),
                        format!(
                            "unsupported operator {other:?}: must be In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                }
            };
            let values: Vec<String> = e.values.clone().unwrap_or_default();
            match operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("must be non-empty when operator is {:?}", e.operator),
                    ));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("must be empty when operator is {:?}", e.operator),
                    ));
                }
                _ => {}
            }
            for (j, v) in values.iter().enumerate() {
                labels::validate_value(v).map_err(|m| {
                    FieldError::new(
                        format!("{at}.values[{j}]"),
                        format!("invalid value {v:?}: {m}"),
                    )
                })?;
            }
            match_expressions.push(Requirement {
                key: e.key.clone(),
                operator,
                values: values.into_iter().collect(),
            });
        }
        Ok(Self {
            match_labels,
            match_expressions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, op: &str, values: Option<&[&str]>) -> meta::LabelSelector {
        meta::LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![meta::LabelSelectorRequirement {
                key: key.into(),
                operator: op.into(),
                values: values.map(|v| v.iter().map(|s| s.to_string()).collect()),
            }]),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn operators_follow_upstream() {
        let l = labels(&[("app", "web"), ("tier", "front")]);
        let cases: &[(meta::LabelSelector, bool)] = &[
            (req("app", "In", Some(&["web", "db"])), true),
            (req("app", "In", Some(&["db"])), false),
            (req("app", "NotIn", Some(&["db"])), true),
            (req("app", "NotIn", Some(&["web"])), false),
            (req("missing", "NotIn", Some(&["web"])), true),
            (req("missing", "In", Some(&["web"])), false),
            (req("app", "Exists", None), true),
            (req("missing", "Exists", None), false),
            (req("missing", "DoesNotExist", None), true),
            (req("app", "DoesNotExist", None), false),
            (meta::LabelSelector::default(), true),
        ];
        for (i, (sel, want)) in cases.iter().enumerate() {
            let s = LabelSelector::from_api(sel, "s").unwrap();
            assert_eq!(s.matches(&l), *want, "case {i}");
        }
        let ml = meta::LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "back")])),
            match_expressions: None,
        };
        assert!(!LabelSelector::from_api(&ml, "s").unwrap().matches(&l));
    }

    #[test]
    fn bad_selectors_name_the_field() {
        let cases: &[(meta::LabelSelector, &str)] = &[
            (
                req("app", "Equals", Some(&["a"])),
                "s.matchExpressions[0].operator",
            ),
            (req("app", "In", None), "s.matchExpressions[0].values"),
            (
                req("app", "NotIn", Some(&[])),
                "s.matchExpressions[0].values",
            ),
            (
                req("app", "Exists", Some(&["a"])),
                "s.matchExpressions[0].values",
            ),
            (
                req("app", "DoesNotExist", Some(&["a"])),
                "s.matchExpressions[0].values",
            ),
            (req("bad key", "Exists", None), "s.matchExpressions[0].key"),
            (
                req("app", "In", Some(&["ok", "not ok"])),
                "s.matchExpressions[0].values[1]",
            ),
            (
                meta::LabelSelector {
                    match_labels: Some(labels(&[("app", "-x")])),
                    match_expressions: None,
                },
                "s.matchLabels.app",
            ),
        ];
        for (sel, path) in cases {
            assert_eq!(LabelSelector::from_api(sel, "s").unwrap_err().path, *path);
        }
    }
}
