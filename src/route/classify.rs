//! Runs a router's classifier on a request: picks the text to classify,
//! calls the embedded model, the keyword rules, or an LLM, and always comes
//! back with a `Classification` (failures become `unknown`).

use super::Classification;
use crate::classify::embedded::EmbeddedClassifier;
use crate::config::ModelConfig;
use crate::config::{ClassifierKind, InputMode, RouterConfig, UNKNOWN_LABEL};
use crate::protocol::openai::chat::ChatRequest;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

/// The text a router classifies, per its `input` setting.
pub fn input_text(mode: InputMode, chat: &ChatRequest) -> Cow<'_, str> {
    let last_user = || chat.last_user_text();
    match mode {
        InputMode::LastUser => last_user().unwrap_or(Cow::Borrowed("")),
        InputMode::AllUser => {
            let parts: Vec<Cow<'_, str>> = chat.texts(|r| r == "user").collect();
            if parts.len() == 1 {
                parts.into_iter().next().unwrap_or(Cow::Borrowed(""))
            } else {
                Cow::Owned(parts.join("\n"))
            }
        }
        InputMode::SystemAndLastUser => {
            let sys = chat.text_of(|r| matches!(r, "system" | "developer"), false);
            match (sys, last_user()) {
                (Some(s), Some(u)) => Cow::Owned(format!("{s}\n{u}")),
                (None, Some(u)) => u,
                (Some(s), None) => s,
                (None, None) => Cow::Borrowed(""),
            }
        }
    }
}

/// Keyword/regex rules: the first label with a matching pattern wins.
pub fn classify_rules(router: &RouterConfig, text: &str) -> Classification {
    for (label, pats) in &router.keywords {
        if pats.iter().any(|re| re.is_match(text)) {
            return Classification {
                label: label.clone(),
                confidence: 1.0,
                failed: false,
                bill: None,
            };
        }
    }
    Classification {
        label: UNKNOWN_LABEL.to_string(),
        confidence: 0.0,
        failed: false,
        bill: None,
    }
}

/// Prompts at least this long have their embedded verdict cached.
const LONG_PROMPT: usize = 512;

fn verdict_key(router: &RouterConfig, text: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(router.name.as_bytes());
    h.update(&[0]);
    h.update(text.as_bytes());
    h.finalize().into()
}

fn unknown(failed: bool) -> Classification {
    Classification {
        label: UNKNOWN_LABEL.to_string(),
        confidence: 0.0,
        failed,
        bill: None,
    }
}

/// A small cache of classifier verdicts by prompt hash.
pub type VerdictCache = moka::sync::Cache<[u8; 32], Classification>;

/// Makes the LLM classifier's one upstream call. The gateway supplies it
/// (fallback, health and metrics live there): routing decides, it does not
/// talk to the network.
#[async_trait::async_trait]
pub trait LlmCall: Send + Sync {
    /// Sends a chat-completions `body` to `model`; the deployment that
    /// answered and its raw body, or `None` on any failure.
    async fn call(
        &self,
        model: &Arc<ModelConfig>,
        body: bytes::Bytes,
    ) -> Option<(Arc<ModelConfig>, bytes::Bytes)>;
}

/// What a classifier may use besides the request.
pub struct ClassifyEnv<'a> {
    pub verdicts: &'a VerdictCache,
    /// Embedded classifiers by name; `""` is the shipped default.
    pub embedded: &'a HashMap<String, Arc<EmbeddedClassifier>>,
    pub models: &'a std::collections::BTreeMap<String, Arc<ModelConfig>>,
    pub llm: &'a dyn LlmCall,
}

pub async fn classify(
    env: &ClassifyEnv<'_>,
    router: &RouterConfig,
    chat: &ChatRequest,
) -> Classification {
    let text = input_text(router.input, chat);
    match &router.classifier {
        ClassifierKind::None => Classification {
            label: crate::config::NONE_LABEL.to_string(),
            confidence: 1.0,
            failed: false,
            bill: None,
        },
        ClassifierKind::Rules => classify_rules(router, &text),
        ClassifierKind::Embedded(name) => {
            let Some(model) = env.embedded.get(name.as_deref().unwrap_or("")) else {
                return unknown(true);
            };
            // Long prompts (agents resending a big context) are worth a lookup;
            // short ones classify faster than they hash.
            let key = (text.len() >= LONG_PROMPT).then(|| verdict_key(router, &text));
            if let Some(c) = key.and_then(|k| env.verdicts.get(&k)) {
                return c;
            }
            let p = model.classify(&text);
            let c = match model.label_name(p.label) {
                Some(l) => Classification {
                    label: l.to_string(),
                    confidence: p.confidence,
                    failed: false,
                    bill: None,
                },
                None => return unknown(true),
            };
            if let Some(k) = key {
                env.verdicts.insert(k, c.clone());
            }
            c
        }
        ClassifierKind::Llm { model, timeout } => {
            // The verdict for the same prompt and label set is reused.
            let key = verdict_key(router, &text);
            if let Some(mut c) = env.verdicts.get(&key) {
                c.bill = None;
                return c;
            }
            let c = classify_llm(env, router, model, *timeout, &text).await;
            if !c.failed {
                env.verdicts.insert(key, c.clone());
            }
            c
        }
    }
}

/// Asks a small model to pick one label, constrained by a JSON schema enum.
async fn classify_llm(
    env: &ClassifyEnv<'_>,
    router: &RouterConfig,
    model: &str,
    timeout: std::time::Duration,
    text: &str,
) -> Classification {
    let Some(m) = env.models.get(model) else {
        return unknown(true);
    };
    let labels: Vec<&str> = router.labels.iter().map(String::as_str).collect();
    let system = format!(
        "You are a request classifier for an LLM router. Read the user's message and answer with the one label that fits best. Labels: {}. Reply as JSON: {{\"label\": \"...\"}}.",
        labels.iter().map(|l| format!("{l} ({})", describe(l))).collect::<Vec<_>>().join("; ")
    );
    let truncated: String = text.chars().take(4000).collect();
    let body = serde_json::json!({
        "model": m.upstream_model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": truncated}],
        "temperature": 0,
        "max_tokens": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "route_label", "strict": true, "schema": {
            "type": "object", "properties": {"label": {"type": "string", "enum": labels}},
            "required": ["label"], "additionalProperties": false}}},
    });
    let bytes = bytes::Bytes::from(body.to_string());
    let call = async {
        let (served, body) = env.llm.call(m, bytes).await?;
        let v: Value = serde_json::from_slice(&body).ok()?;
        let usage = v
            .get("usage")
            .and_then(crate::usage::Usage::from_json)
            .unwrap_or_default();
        let content = v
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or("");
        Some((served, usage, parse_label(content, &labels)))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(Some((served, usage, Some(label)))) => Classification {
            label,
            confidence: 1.0,
            failed: false,
            bill: Some((served, usage)),
        },
        Ok(Some((served, usage, None))) => {
            tracing::debug!(router = %router.name, "LLM classifier gave no valid label");
            let mut c = unknown(true);
            c.bill = Some((served, usage));
            c
        }
        Ok(None) | Err(_) => unknown(true),
    }
}

fn parse_label(content: &str, labels: &[&str]) -> Option<String> {
    let trimmed = content
        .trim()
        .trim_start_matches("```json")
        .trim_start_matches("```")
        .trim_end_matches("```")
        .trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        if let Some(l) = v.get("label").and_then(Value::as_str) {
            return labels
                .iter()
                .find(|x| x.eq_ignore_ascii_case(l))
                .map(|x| x.to_string());
        }
    }
    let bare = trimmed.trim_matches('"').trim();
    labels
        .iter()
        .find(|x| x.eq_ignore_ascii_case(bare))
        .map(|x| x.to_string())
}

fn describe(label: &str) -> &'static str {
    match label {
        "code" => "write, fix or explain code",
        "math" => "calculation, word problems, proofs",
        "reasoning" => "logic puzzles and multi-step inference",
        "writing" => "creative writing and drafting prose",
        "extraction" => "summarise or extract from a given text",
        "knowledge" => "factual or domain questions",
        "chat" => "small talk and simple everyday requests",
        _ => "custom label",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyword_labels_are_tried_in_the_order_written() {
        let text = "auth = \"none\"\n[store]\nkind = \"memory\"\n[providers.p]\nkind = \"mock\"\n[models.m]\nprovider = \"p\"\n[tiers.t]\nmodels = [\"m\"]\n[routers.r]\nclassifier = \"rules\"\nunknown_tier = \"t\"\nkeywords = { math = [\"\\\\d\\\\s*[+]\\\\s*\\\\d\"], chat = [\".\"] }\n[[routers.r.rules]]\ntier = \"t\"\n";
        let cfg = crate::config::Config::parse(text, std::path::Path::new("."));
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let r = &cfg.routers["r"];
        assert_eq!(classify_rules(r, "what is 2 + 2").label, "math");
        assert_eq!(classify_rules(r, "hello").label, "chat");
    }

    #[test]
    fn parses_labels_from_llm_answers() {
        let labels = ["code", "math"];
        assert_eq!(
            parse_label("{\"label\": \"math\"}", &labels).as_deref(),
            Some("math")
        );
        assert_eq!(
            parse_label("```json\n{\"label\":\"CODE\"}\n```", &labels).as_deref(),
            Some("code")
        );
        assert_eq!(parse_label("\"code\"", &labels).as_deref(), Some("code"));
        assert_eq!(parse_label("{\"label\": \"poetry\"}", &labels), None);
        assert_eq!(parse_label("I think math", &labels), None);
    }
}
