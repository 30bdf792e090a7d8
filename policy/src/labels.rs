//! Resource labels and the selectors roles use to match them.

use std::collections::BTreeMap;

/// A resource's labels, e.g. `{env: prod}`.
pub type Labels = BTreeMap<String, String>;

/// A role's label selector: every key must be present with a matching value;
/// `"*"` as a value matches any value, and `{"*": "*"}` matches everything.
/// An empty selector matches nothing (a role must say what it grants).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(pub BTreeMap<String, String>);

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        if self.0.is_empty() {
            return false;
        }
        self.0.iter().all(|(k, v)| {
            if k == "*" {
                return v == "*";
            }
            labels.get(k).is_some_and(|actual| v == "*" || v == actual)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_semantics() {
        let prod = labels(&[("env", "prod"), ("team", "db")]);
        let sel = |p: &[(&str, &str)]| LabelSelector(labels(p));
        assert!(sel(&[("env", "prod")]).matches(&prod));
        assert!(!sel(&[("env", "dev")]).matches(&prod));
        assert!(sel(&[("env", "*")]).matches(&prod));
        assert!(!sel(&[("region", "*")]).matches(&prod));
        assert!(sel(&[("*", "*")]).matches(&prod));
        assert!(!sel(&[]).matches(&prod));
        assert!(sel(&[("env", "prod"), ("team", "db")]).matches(&prod));
        assert!(!sel(&[("env", "prod"), ("team", "web")]).matches(&prod));
    }
}
