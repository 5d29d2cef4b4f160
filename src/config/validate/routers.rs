//! `[routers.NAME]` (rules, votes, cascades) and `[classifiers.NAME]`.

use super::super::diag::Collector;
use super::super::raw::*;
use super::super::types::*;
use super::{confidence, known, positive_duration};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn validate_routers(
    v: &mut Collector,
    raw: &RawConfig,
    models: &BTreeMap<String, Arc<ModelConfig>>,
    tiers: &BTreeMap<String, Arc<TierConfig>>,
) -> BTreeMap<String, Arc<RouterConfig>> {
    let mut out = BTreeMap::new();
    for (name, r) in &raw.routers {
        let path = format!("routers.{name}");
        let classifier = match r.classifier.as_deref() {
            None | Some("embedded") => ClassifierKind::Embedded(None),
            Some("rules") => ClassifierKind::Rules,
            Some("none") => ClassifierKind::None,
            Some("llm") => match &r.classifier_model {
                Some(m) if models.contains_key(m) => ClassifierKind::Llm {
                    model: m.clone(),
                    timeout: positive_duration(
                        v,
                        &format!("{path}.classifier_timeout"),
                        r.classifier_timeout,
                        Duration::from_secs(2),
                    ),
                },
                Some(m) => {
                    v.err(
                        format!("{path}.classifier_model"),
                        format!("unknown model {m:?}"),
                    );
                    ClassifierKind::Rules
                }
                None => {
                    v.err(
                        format!("{path}.classifier_model"),
                        "required when classifier = \"llm\"",
                    );
                    ClassifierKind::Rules
                }
            },
            Some(custom) if raw.classifiers.contains_key(custom) => {
                ClassifierKind::Embedded(Some(custom.to_string()))
            }
            Some(other) => {
                v.err(format!("{path}.classifier"), format!("unknown classifier {other:?} (expected embedded, llm, rules, none or a [classifiers.NAME])"));
                ClassifierKind::Rules
            }
        };
        // The label vocabulary decides which rule labels are valid.
        let labels: Vec<String> = match &classifier {
            ClassifierKind::Embedded(Some(c)) => {
                let set = &raw.classifiers[c];
                if set.examples.is_empty() {
                    Vec::new() // from a model file: checked when the file is loaded
                } else {
                    set.examples.keys().cloned().collect()
                }
            }
            ClassifierKind::Rules if !r.keywords.is_empty() => r.keywords.keys().cloned().collect(),
            ClassifierKind::None => vec![NONE_LABEL.to_string()],
            _ => DEFAULT_LABELS.iter().map(|s| s.to_string()).collect(),
        };
        let mut keywords = Vec::new();
        for (label, pats) in &r.keywords {
            let mut compiled = Vec::new();
            for (i, p) in pats.iter().enumerate() {
                match regex::RegexBuilder::new(p).case_insensitive(true).build() {
                    Ok(re) => compiled.push(re),
                    Err(e) => v.err(
                        format!("{path}.keywords.{label}[{i}]"),
                        format!("invalid regex: {e}"),
                    ),
                }
            }
            keywords.push((label.clone(), compiled));
        }
        if !tiers.contains_key(&r.unknown_tier) {
            v.err(
                format!("{path}.unknown_tier"),
                format!(
                    "unknown tier {:?} (known: {})",
                    r.unknown_tier,
                    known(tiers.keys())
                ),
            );
        }
        let input = r.input.unwrap_or(InputMode::LastUser);
        if r.rules.is_empty() {
            v.err(format!("{path}.rules"), "needs at least one rule");
        }
        let mut rules = Vec::new();
        let mut catch_all_at: Option<usize> = None;
        for (i, rule) in r.rules.iter().enumerate() {
            let rpath = format!("{path}.rules[{i}]");
            if !tiers.contains_key(&rule.tier) {
                v.err(
                    format!("{rpath}.tier"),
                    format!(
                        "unknown tier {:?} (known: {})",
                        rule.tier,
                        known(tiers.keys())
                    ),
                );
            }
            let when = validate_when(
                v,
                &rpath,
                rule.when.clone().unwrap_or_default(),
                &labels,
                &raw.keys,
            );
            if let Some(c) = catch_all_at {
                v.warn(
                    &rpath,
                    format!("unreachable, rule [{c}] before it matches everything"),
                );
            }
            if when.is_catch_all() && catch_all_at.is_none() {
                catch_all_at = Some(i);
            }
            rules.push(RuleConfig {
                when,
                tier: rule.tier.clone(),
                vote: compile_vote(v, &rpath, rule.vote.as_ref(), models),
                cascade: compile_cascade(v, &rpath, rule.cascade.as_ref(), tiers),
            });
        }
        out.insert(
            name.clone(),
            Arc::new(RouterConfig {
                name: name.clone(),
                classifier,
                min_confidence: confidence(
                    v,
                    &format!("{path}.min_confidence"),
                    r.min_confidence,
                    0.5,
                ),
                unknown_tier: r.unknown_tier.clone(),
                input,
                rules,
                labels,
                keywords,
                cache: r.cache.as_ref().map(cache_override),
                vote: compile_vote(v, &path, r.vote.as_ref(), models),
                cascade: compile_cascade(v, &path, r.cascade.as_ref(), tiers),
                guard: r.guard.as_ref().map(|g| {
                    v.absorb(g.validate(&format!("{path}.guard")));
                    g.clone()
                }),
            }),
        );
    }
    out
}

pub(super) fn compile_vote(
    v: &mut Collector,
    path: &str,
    vote: Option<&crate::vote::VoteConfig>,
    models: &BTreeMap<String, Arc<ModelConfig>>,
) -> Option<Arc<crate::vote::CompiledVote>> {
    let vote = vote?;
    let vpath = format!("{path}.vote");
    for (i, m) in vote.models.iter().enumerate() {
        if !models.contains_key(m) {
            v.err(
                format!("{vpath}.models[{i}]"),
                format!("unknown model {m:?}"),
            );
        }
    }
    if let Some(j) = &vote.judge {
        if !models.contains_key(j) {
            v.err(format!("{vpath}.judge"), format!("unknown model {j:?}"));
        }
    }
    match vote.compile(&vpath) {
        Ok(c) => Some(Arc::new(c)),
        Err(errs) => {
            v.absorb(errs);
            None
        }
    }
}

pub(super) fn compile_cascade(
    v: &mut Collector,
    path: &str,
    cascade: Option<&crate::vote::CascadeConfig>,
    tiers: &BTreeMap<String, Arc<TierConfig>>,
) -> Option<Arc<crate::vote::CompiledCascade>> {
    let c = cascade?;
    let cpath = format!("{path}.cascade");
    for (i, t) in c.tiers.iter().enumerate() {
        if !tiers.contains_key(t) {
            v.err(
                format!("{cpath}.tiers[{i}]"),
                format!("unknown tier {t:?} (known: {})", known(tiers.keys())),
            );
        }
    }
    match c.compile(&cpath) {
        Ok(c) => Some(Arc::new(c)),
        Err(errs) => {
            v.absorb(errs);
            None
        }
    }
}

pub(super) fn validate_when(
    v: &mut Collector,
    rpath: &str,
    w: RawWhen,
    labels: &[String],
    keys: &BTreeMap<String, RawKey>,
) -> Condition {
    let label_list = w.label.map(OneOrMany::into_vec);
    if let Some(ls) = &label_list {
        for l in ls {
            if l != UNKNOWN_LABEL && !labels.is_empty() && !labels.contains(l) {
                v.err(
                    format!("{rpath}.when.label"),
                    format!("unknown label {l:?} (known: {})", labels.join(", ")),
                );
            }
        }
    }
    let key_list = w.key.map(OneOrMany::into_vec);
    if let Some(ks) = &key_list {
        for k in ks {
            if !keys.contains_key(k) {
                v.err(format!("{rpath}.when.key"), format!("unknown key {k:?}"));
            }
        }
    }
    if let (Some(a), Some(b)) = (w.min_prompt_tokens, w.max_prompt_tokens) {
        if a > b {
            v.err(
                format!("{rpath}.when"),
                "min_prompt_tokens is greater than max_prompt_tokens",
            );
        }
    }
    let header = match w.header {
        Some(h) => match http::HeaderName::from_bytes(h.name.as_bytes()) {
            Ok(n) => Some((n, h.value)),
            Err(_) => {
                v.err(
                    format!("{rpath}.when.header.name"),
                    format!("not a valid header name: {:?}", h.name),
                );
                None
            }
        },
        None => None,
    };
    let min_conf = w
        .min_confidence
        .map(|c| confidence(v, &format!("{rpath}.when.min_confidence"), Some(c), 0.0));
    Condition {
        labels: label_list,
        min_confidence: min_conf,
        min_prompt_tokens: w.min_prompt_tokens,
        max_prompt_tokens: w.max_prompt_tokens,
        has_tools: w.has_tools,
        has_images: w.has_images,
        json_response: w.json_response,
        min_turns: w.min_turns,
        max_turns: w.max_turns,
        keys: key_list,
        header,
    }
}

pub(super) fn validate_classifiers(
    v: &mut Collector,
    raw: &RawConfig,
    base_dir: &Path,
) -> BTreeMap<String, ClassifierConfig> {
    let mut out = BTreeMap::new();
    for (name, c) in &raw.classifiers {
        let path = format!("classifiers.{name}");
        if c.model_file.is_none() && c.examples.is_empty() {
            v.err(&path, "needs `model_file` or `examples`");
        }
        if let Some(f) = &c.model_file {
            if !base_dir.join(f).exists() {
                v.err(
                    format!("{path}.model_file"),
                    format!("file {f:?} not found"),
                );
            }
        }
        for (label, ex) in &c.examples {
            if ex.is_empty() {
                v.err(
                    format!("{path}.examples.{label}"),
                    "needs at least one example",
                );
            }
        }
        out.insert(
            name.clone(),
            ClassifierConfig {
                model_file: c.model_file.clone(),
                examples: c.examples.clone(),
            },
        );
    }
    out
}

fn cache_override(c: &RawCacheOverride) -> CacheOverride {
    CacheOverride {
        enabled: c.enabled,
        ttl: c.ttl,
    }
}
