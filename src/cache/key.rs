//! Cache key: blake3 over a canonical, allocation-free walk of the request.
//!
//! Canonical form: object keys sorted bytewise at every depth, so field order never
//! matters; numbers as serde_json prints them (`1` and `1.0` differ); every value is
//! type-tagged and length-prefixed so distinct JSON documents cannot collide by
//! concatenation.

use std::fmt;
use std::io::Write as _;

use serde_json::{Map, Value};

/// Top-level request fields that do not change the generated answer and are left out
/// of the key.
///
/// - `stream`, `stream_options`: transport only; a cached answer can be replayed either way.
/// - `user`, `metadata`, `safety_identifier`: end-user tagging / bookkeeping.
/// - `store`: whether OpenAI keeps the completion for distillation/evals.
/// - `service_tier`: latency/price tier of the same model.
/// - `prompt_cache_key`, `prompt_cache_retention`: hints for the provider's prefix cache.
///
/// Everything else (messages, model, temperature, top_p, max_tokens,
/// max_completion_tokens, tools, tool_choice, parallel_tool_calls, response_format,
/// seed, n, stop, logit_bias, logprobs, reasoning_effort, ...) is part of the key.
pub const IGNORED_FIELDS: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "safety_identifier",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Bumped whenever the canonical encoding changes, so old and new keys never alias.
const DOMAIN: &[u8] = b"triage.response-cache.v1";

/// 32-byte blake3 digest identifying one cacheable request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex (64 chars), for logs and headers.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        s
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short prefix is plenty to tell keys apart in debug output.
        write!(f, "CacheKey({}…)", &self.to_hex()[..12])
    }
}

/// Key for `body` sent by `scope` (tenant key name or `"shared"`) to `target`
/// (resolved router or model name), ignoring [`IGNORED_FIELDS`].
pub fn cache_key(scope: &str, target: &str, body: &Map<String, Value>) -> CacheKey {
    cache_key_with(scope, target, body, &[])
}

/// Like [`cache_key`], additionally ignoring the top-level fields in `extra_ignored`
/// (e.g. gateway-specific extension fields).
pub fn cache_key_with(
    scope: &str,
    target: &str,
    body: &Map<String, Value>,
    extra_ignored: &[&str],
) -> CacheKey {
    let mut h = Sink::new();
    h.update(DOMAIN);
    put_str(&mut h, b'S', scope);
    put_str(&mut h, b'T', target);
    let keep = |k: &str| !IGNORED_FIELDS.contains(&k) && !extra_ignored.contains(&k);
    put_object(&mut h, body, &keep);
    CacheKey(h.finalize())
}

/// Batches the many tiny writes of the walk (tags, lengths) so blake3's per-call
/// `update` overhead is paid once per KiB instead of per token.
struct Sink {
    hasher: blake3::Hasher,
    buf: [u8; 1024],
    len: usize,
}

impl Sink {
    fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            buf: [0; 1024],
            len: 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        if data.len() > self.buf.len() - self.len {
            self.flush_buf();
            if data.len() >= self.buf.len() {
                self.hasher.update(data);
                return;
            }
        }
        self.buf[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    fn flush_buf(&mut self) {
        self.hasher.update(&self.buf[..self.len]);
        self.len = 0;
    }

    fn finalize(mut self) -> [u8; 32] {
        self.flush_buf();
        *self.hasher.finalize().as_bytes()
    }
}

impl std::io::Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.update(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn put_len(h: &mut Sink, n: usize) {
    h.update(&(n as u64).to_le_bytes());
}

fn put_str(h: &mut Sink, tag: u8, s: &str) {
    h.update(&[tag]);
    put_len(h, s.len());
    h.update(s.as_bytes());
}

fn put_value(h: &mut Sink, v: &Value) {
    match v {
        Value::Null => {
            h.update(b"z");
        }
        Value::Bool(b) => {
            h.update(if *b { b"t" } else { b"f" });
        }
        Value::Number(n) => {
            h.update(b"n");
            // Writing into the hasher cannot fail; Display of Number does not allocate.
            let _ = write!(h, "{n}");
            // Terminator: no digit/sign/exponent character is ';'.
            h.update(b";");
        }
        Value::String(s) => put_str(h, b's', s),
        Value::Array(items) => {
            h.update(b"[");
            put_len(h, items.len());
            for item in items {
                put_value(h, item);
            }
        }
        Value::Object(map) => put_object(h, map, &|_| true),
    }
}

fn put_object(h: &mut Sink, map: &Map<String, Value>, keep: &dyn Fn(&str) -> bool) {
    h.update(b"{");
    // serde_json's default Map is a BTreeMap (already sorted); only sort when a
    // feature such as `preserve_order` hands us insertion order.
    let mut prev: Option<&str> = None;
    let mut sorted = true;
    for k in map.keys() {
        if prev.is_some_and(|p| p > k.as_str()) {
            sorted = false;
            break;
        }
        prev = Some(k);
    }
    if sorted {
        for (k, v) in map.iter().filter(|(k, _)| keep(k)) {
            put_str(h, b'k', k);
            put_value(h, v);
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| keep(k)).collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (k, v) in entries {
            put_str(h, b'k', k);
            put_value(h, v);
        }
    }
    // Close marker keeps `{a:{}} ,b` distinct from `{a:{b}}`.
    h.update(b"}");
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    fn base() -> Value {
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"}
            ],
            "temperature": 0.2
        })
    }

    fn k(v: Value) -> CacheKey {
        cache_key("shared", "fast", &obj(v))
    }

    #[test]
    fn stable_and_field_order_independent() {
        let a = k(base());
        assert_eq!(a, k(base()));
        let reordered: Map<String, Value> = serde_json::from_str(
            r#"{"temperature":0.2,"messages":[{"content":"be brief","role":"system"},{"content":"hi","role":"user"}],"model":"gpt-4o-mini"}"#,
        )
        .unwrap();
        assert_eq!(a, cache_key("shared", "fast", &reordered));
        assert_eq!(a.to_hex().len(), 64);
    }

    #[test]
    fn ignored_fields_do_not_change_key() {
        let a = k(base());
        for (field, val) in [
            ("stream", json!(true)),
            ("stream_options", json!({"include_usage": true})),
            ("user", json!("u-1")),
            ("metadata", json!({"x": "y"})),
            ("store", json!(true)),
            ("service_tier", json!("flex")),
            ("safety_identifier", json!("abc")),
            ("prompt_cache_key", json!("p")),
        ] {
            let mut v = base();
            v[field] = val;
            assert_eq!(a, k(v), "{field} must not change the key");
        }
        let mut v = base();
        v["stream"] = json!(false);
        assert_eq!(a, k(v));
        let mut v = base();
        v["x_triage"] = json!(1);
        assert_eq!(
            a,
            cache_key_with("shared", "fast", &obj(v.clone()), &["x_triage"])
        );
        assert_ne!(a, k(v));
    }

    #[test]
    fn every_parameter_changes_key() {
        let a = k(base());
        let cases: Vec<(&str, Value)> = vec![
            ("temperature", json!(0.3)),
            ("top_p", json!(0.9)),
            ("max_tokens", json!(100)),
            ("max_completion_tokens", json!(100)),
            (
                "tools",
                json!([{"type":"function","function":{"name":"f","parameters":{}}}]),
            ),
            ("tool_choice", json!("required")),
            ("parallel_tool_calls", json!(false)),
            ("response_format", json!({"type": "json_object"})),
            ("seed", json!(7)),
            ("n", json!(2)),
            ("stop", json!(["\n"])),
            ("logit_bias", json!({"50256": -100})),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(0.5)),
            ("reasoning_effort", json!("low")),
            ("model", json!("gpt-4o")),
        ];
        let mut seen = std::collections::HashSet::new();
        seen.insert(a);
        for (field, val) in cases {
            let mut v = base();
            v[field] = val;
            assert!(seen.insert(k(v)), "{field} must change the key");
        }
        // Message content, role, and order.
        let mut v = base();
        v["messages"][1]["content"] = json!("hi!");
        assert!(seen.insert(k(v)));
        let mut v = base();
        v["messages"][0]["role"] = json!("developer");
        assert!(seen.insert(k(v)));
        let mut v = base();
        let msgs = v["messages"].as_array().unwrap().clone();
        v["messages"] = json!([msgs[1], msgs[0]]);
        assert!(seen.insert(k(v)));
        // Number spelling: 1 vs 1.0 are different serde_json prints.
        let mut v1 = base();
        v1["temperature"] = json!(1);
        let mut v2 = base();
        v2["temperature"] = json!(1.0);
        assert_ne!(k(v1), k(v2));
    }

    #[test]
    fn scope_and_target_isolate() {
        let body = obj(base());
        let a = cache_key("shared", "fast", &body);
        assert_ne!(a, cache_key("tenant-a", "fast", &body));
        assert_ne!(a, cache_key("shared", "smart", &body));
        // Length prefixes: moving bytes between scope and target must not collide.
        assert_ne!(cache_key("ab", "c", &body), cache_key("a", "bc", &body));
    }

    #[test]
    fn structure_is_unambiguous() {
        // Nesting, strings vs numbers, null vs missing.
        assert_ne!(k(json!({"a": "1"})), k(json!({"a": 1})));
        assert_ne!(k(json!({"a": null})), k(json!({})));
        assert_ne!(k(json!({"a": [[1], 2]})), k(json!({"a": [[1, 2]]})));
        assert_ne!(k(json!({"a": {"b": 1}})), k(json!({"a": {}, "b": 1})));
        assert_ne!(k(json!({"a": ["x", "y"]})), k(json!({"a": ["xy"]})));
    }

    /// `cargo test --release -- --ignored key_speed --nocapture`
    #[test]
    #[ignore]
    fn key_speed() {
        let long = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(28);
        let body = obj(json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": long},
            ],
            "temperature": 0.7,
            "max_tokens": 512,
            "stream": true,
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
        }));
        let size = serde_json::to_vec(&body).unwrap().len();
        let iters = 200_000u32;
        let t = std::time::Instant::now();
        let mut acc = 0u8;
        for _ in 0..iters {
            acc ^= cache_key("shared", "fast", std::hint::black_box(&body)).0[0];
        }
        let el = t.elapsed();
        let raw = serde_json::to_vec(&body).unwrap();
        let t2 = std::time::Instant::now();
        for _ in 0..iters {
            acc ^= blake3::hash(std::hint::black_box(&raw)).as_bytes()[0];
        }
        println!(
            "baseline blake3 of the serialized body: {:?}",
            t2.elapsed() / iters
        );
        let t3 = std::time::Instant::now();
        for _ in 0..iters {
            let v = serde_json::to_vec(std::hint::black_box(&body)).unwrap();
            acc ^= blake3::hash(&v).as_bytes()[0];
        }
        println!("baseline to_vec + blake3: {:?}", t3.elapsed() / iters);
        println!("body {size} B: {:?}/key ({acc})", el / iters);
    }
}
