//! Virtual keys: presented as `Authorization: Bearer ...` (or `x-api-key`),
//! stored only as SHA-256 digests and looked up by digest.

pub mod failures;

use crate::config::KeyConfig;
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct KeyIdentity {
    pub name: String,
    pub team: Option<String>,
    pub allow: Vec<String>,
}

impl KeyIdentity {
    pub fn may_use(&self, target: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|a| a == target)
    }
}

/// Keys by the SHA-256 digest of their secret.
///
/// A hash-map probe is not constant time, but what it compares is the digest
/// of the presented secret: timing can tell an attacker at most how many
/// leading digest bytes of *their own guess* match a stored digest, which says
/// nothing about a secret's bytes (preimage resistance). One lookup costs one
/// SHA-256 plus one probe, whatever the number of keys.
#[derive(Debug, Default)]
pub struct KeyTable {
    by_digest: HashMap<[u8; 32], KeyIdentity>,
}

impl KeyTable {
    pub fn new(keys: &[KeyConfig]) -> Self {
        KeyTable {
            by_digest: keys
                .iter()
                .map(|k| {
                    (
                        k.sha256,
                        KeyIdentity {
                            name: k.name.clone(),
                            team: k.team.clone(),
                            allow: k.allow.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Looks a presented secret up by its digest.
    pub fn authenticate(&self, secret: &str) -> Option<&KeyIdentity> {
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        self.by_digest.get(&digest)
    }
}

/// The secret from `Authorization: Bearer`, `x-api-key` or `api-key`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        if !token.is_empty() {
            return Some(token);
        }
    }
    for h in ["x-api-key", "api-key"] {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            if !v.trim().is_empty() {
                return Some(v.trim());
            }
        }
    }
    None
}

/// A fresh random key and its hash, for `triage keys new`.
pub fn new_key() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("sk-triage-{}", hex::encode(bytes));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    (key, hash)
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LimitsConfig;

    #[test]
    fn authenticates_by_hash_only() {
        let (key, hash) = new_key();
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&hex::decode(&hash).unwrap_or_default());
        let table = KeyTable::new(&[KeyConfig {
            name: "app".into(),
            sha256: sha,
            team: None,
            allow: vec![],
            limits: LimitsConfig::default(),
            guard: None,
        }]);
        assert_eq!(
            table.authenticate(&key).map(|k| k.name.as_str()),
            Some("app")
        );
        assert!(table.authenticate("sk-wrong").is_none());
        assert!(table.authenticate(&hash).is_none());
    }

    #[test]
    fn reads_the_usual_headers() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            http::HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(presented_key(&h), Some("abc"));
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", http::HeaderValue::from_static("xyz"));
        assert_eq!(presented_key(&h), Some("xyz"));
        assert_eq!(presented_key(&http::HeaderMap::new()), None);
    }
}
