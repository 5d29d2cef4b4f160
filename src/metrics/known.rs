//! Config-defined label value sets that keep metric cardinality bounded.

use std::collections::HashSet;

/// Label value for any name that is not in the configured set.
pub const OTHER: &str = "other";
/// Label value for a dimension that does not apply (e.g. no tier on a cache hit).
pub const NONE: &str = "none";
/// Classification label that is always accepted (classifier could not decide).
pub const UNKNOWN: &str = "unknown";

/// The config-defined names allowed as label values; everything else becomes `"other"`.
///
/// `keys` are virtual key *names* from the config, never the secret. As a guard, a key
/// name that looks like a raw secret (`sk-` prefix, 20+ chars) is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownNames {
    /// Virtual key names.
    pub keys: Vec<String>,
    /// Model (deployment) names.
    pub models: Vec<String>,
    /// Router names.
    pub routers: Vec<String>,
    /// Tier names.
    pub tiers: Vec<String>,
    /// Classification labels.
    pub labels: Vec<String>,
}

/// Hash sets built once per config load; lookups borrow the caller's string.
#[derive(Debug, Default)]
pub(crate) struct KnownSets {
    keys: HashSet<Box<str>>,
    models: HashSet<Box<str>>,
    routers: HashSet<Box<str>>,
    tiers: HashSet<Box<str>>,
    labels: HashSet<Box<str>>,
}

fn looks_like_secret(name: &str) -> bool {
    name.starts_with("sk-") && name.len() >= 20
}

fn to_set<'a>(names: impl Iterator<Item = &'a String>) -> HashSet<Box<str>> {
    names
        .filter(|n| !n.is_empty())
        .map(|n| n.as_str().into())
        .collect()
}

fn pick<'a>(set: &HashSet<Box<str>>, v: &'a str) -> &'a str {
    if v.is_empty() || v == NONE {
        NONE
    } else if set.contains(v) {
        v
    } else {
        OTHER
    }
}

impl KnownSets {
    pub(crate) fn from_names(n: &KnownNames) -> Self {
        Self {
            keys: to_set(n.keys.iter().filter(|k| !looks_like_secret(k))),
            models: to_set(n.models.iter()),
            routers: to_set(n.routers.iter()),
            tiers: to_set(n.tiers.iter()),
            labels: to_set(n.labels.iter()),
        }
    }

    pub(crate) fn key<'a>(&self, v: &'a str) -> &'a str {
        pick(&self.keys, v)
    }

    pub(crate) fn model<'a>(&self, v: &'a str) -> &'a str {
        pick(&self.models, v)
    }

    pub(crate) fn router<'a>(&self, v: &'a str) -> &'a str {
        pick(&self.routers, v)
    }

    pub(crate) fn tier<'a>(&self, v: &'a str) -> &'a str {
        pick(&self.tiers, v)
    }

    pub(crate) fn label<'a>(&self, v: &'a str) -> &'a str {
        if v == UNKNOWN {
            UNKNOWN
        } else {
            pick(&self.labels, v)
        }
    }

    /// Whether `v` is a configured key (gauges skip unknown keys: an "other" gauge is meaningless).
    pub(crate) fn has_key(&self, v: &str) -> bool {
        self.keys.contains(v)
    }

    pub(crate) fn has_model(&self, v: &str) -> bool {
        self.models.contains(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> KnownNames {
        KnownNames {
            keys: vec!["alice".into(), "sk-abcdefghijklmnopqrstuvwxyz".into()],
            models: vec!["gpt-4o-mini".into()],
            routers: vec!["default".into()],
            tiers: vec!["cheap".into()],
            labels: vec!["code".into()],
        }
    }

    #[test]
    fn maps_unknown_to_other_and_empty_to_none() {
        let k = KnownSets::from_names(&names());
        assert_eq!(k.key("alice"), "alice");
        assert_eq!(k.key("mallory"), OTHER);
        assert_eq!(k.key(""), NONE);
        assert_eq!(k.model("gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(k.model("gpt-5"), OTHER);
        assert_eq!(k.router("default"), "default");
        assert_eq!(k.tier("cheap"), "cheap");
        assert_eq!(k.tier("none"), NONE);
        assert_eq!(k.label("code"), "code");
        assert_eq!(k.label("unknown"), UNKNOWN);
        assert_eq!(k.label("poetry"), OTHER);
    }

    #[test]
    fn secret_looking_key_names_are_never_labels() {
        let k = KnownSets::from_names(&names());
        assert_eq!(k.key("sk-abcdefghijklmnopqrstuvwxyz"), OTHER);
        assert!(!k.has_key("sk-abcdefghijklmnopqrstuvwxyz"));
    }

    #[test]
    fn empty_sets_map_everything_to_other() {
        let k = KnownSets::default();
        assert_eq!(k.key("alice"), OTHER);
        assert_eq!(k.model("m"), OTHER);
    }
}
