//! Token usage and the cheap token estimate used where a provider reports none.

use serde::{Deserialize, Serialize};

/// Token counts of one upstream call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Part of `prompt_tokens` served from the provider's prompt cache.
    pub cached_tokens: u64,
    /// Part of `prompt_tokens` written to the provider's prompt cache
    /// (Anthropic bills these above the input price; OpenAI reports none).
    #[serde(default)]
    pub cache_write_tokens: u64,
    /// True when counted by our estimate rather than reported by the provider.
    pub estimated: bool,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.add(&o);
    }
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn add(&mut self, o: &Usage) {
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(o.cached_tokens);
        self.cache_write_tokens = self.cache_write_tokens.saturating_add(o.cache_write_tokens);
        self.estimated |= o.estimated;
    }

    /// Reads a `usage` object leniently: missing numbers count as 0 (what a
    /// cached answer stored is shown back, not trusted for billing).
    pub fn from_json_lenient(v: &serde_json::Value) -> Usage {
        Usage::from_json(v).unwrap_or_else(|| {
            let n = |p: &str| {
                v.pointer(p)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            Usage {
                prompt_tokens: n("/prompt_tokens"),
                completion_tokens: n("/completion_tokens"),
                cached_tokens: n("/prompt_tokens_details/cached_tokens"),
                cache_write_tokens: 0,
                estimated: false,
            }
        })
    }

    /// Reads OpenAI's `usage` object.
    pub fn from_json(v: &serde_json::Value) -> Option<Usage> {
        let prompt = v.get("prompt_tokens")?.as_u64()?;
        let completion = v
            .get("completion_tokens")
            .and_then(|c| c.as_u64())
            .unwrap_or(0);
        let cached = v
            .pointer("/prompt_tokens_details/cached_tokens")
            .and_then(|c| c.as_u64())
            .unwrap_or(0)
            .min(prompt);
        // Not an OpenAI field: written by our Anthropic translation so cache
        // writes survive the trip through chat-shaped usage.
        let written = v
            .pointer("/prompt_tokens_details/cache_write_tokens")
            .and_then(|c| c.as_u64())
            .unwrap_or(0)
            .min(prompt - cached);
        Some(Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
            cache_write_tokens: written,
            estimated: false,
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut details = serde_json::json!({ "cached_tokens": self.cached_tokens });
        if self.cache_write_tokens > 0 {
            details["cache_write_tokens"] = self.cache_write_tokens.into();
        }
        serde_json::json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total(),
            "prompt_tokens_details": details,
        })
    }
}

/// Token estimate for text: about four bytes per token for English and code,
/// one per character for CJK-like scripts. Cheap, allocation-free, and
/// biased slightly high so that reservations err on the safe side.
pub fn estimate_tokens(text: &str) -> u64 {
    let mut ascii = 0u64;
    let mut wide = 0u64;
    for b in text.bytes() {
        if b < 0x80 {
            ascii += 1;
        } else if b & 0xC0 != 0x80 {
            // Count the lead byte of each non-ASCII character once.
            wide += 1;
        }
    }
    if ascii == 0 && wide == 0 {
        return 0;
    }
    ascii.div_ceil(4) + wide
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_are_plausible() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("hi"), 1);
        assert_eq!(
            estimate_tokens("The quick brown fox jumps over the lazy dog"),
            11
        );
        assert_eq!(estimate_tokens("日本語"), 3);
    }

    #[test]
    fn reads_openai_usage() {
        let v = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}});
        let u = Usage::from_json(&v);
        assert_eq!(
            u,
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 5,
                cached_tokens: 4,
                cache_write_tokens: 0,
                estimated: false
            })
        );
    }
}
