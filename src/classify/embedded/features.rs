//! Feature extraction: hashed word, bigram, character n-gram, edge and length features,
//! streamed into a sink without allocating (a prompt with template artefacts to strip is
//! copied once).

use std::borrow::Cow;

/// Longest character n-gram supported (size of the rolling window).
pub(super) const MAX_NGRAM: usize = 8;

/// Feature-hashing parameters; stored in the model file so inference matches training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureConfig {
    /// log2 of the number of hash buckets.
    pub hash_bits: u8,
    /// Shortest character n-gram within a word (0 disables character n-grams).
    pub char_ngram_min: u8,
    /// Longest character n-gram within a word.
    pub char_ngram_max: u8,
    /// Value of a character n-gram feature relative to a word feature (1.0).
    pub char_weight: f32,
    /// Emit word (and punctuation) unigrams.
    pub word_unigrams: bool,
    /// Emit word bigrams.
    pub word_bigrams: bool,
    /// Emit a log2(length) bucket feature.
    pub length_feature: bool,
    /// Words in the first and last this-many bytes also get position-tagged unigrams and
    /// bigrams, since instructions usually open or close a prompt (0 disables).
    pub edge_bytes: u16,
    /// Seed mixed into every hash.
    pub hash_seed: u64,
    /// Only the first this-many bytes of a long prompt are read (0 = whole prompt).
    pub max_head_bytes: u32,
    /// ...plus the last this-many bytes, where instructions often sit.
    pub max_tail_bytes: u32,
    /// Strip template artefacts (answer-option markers such as `(A)` or `B.`, `Options:`
    /// headers, list numbering) so the model learns content, not a benchmark's format.
    pub normalize: bool,
    /// Emit prompt-shape features: shares of digits, code symbols and uppercase letters,
    /// line count, code fences. They carry across sources where the vocabulary doesn't.
    pub shape_features: bool,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self {
            hash_bits: 18,
            char_ngram_min: 3,
            char_ngram_max: 4,
            char_weight: 0.2,
            word_unigrams: true,
            word_bigrams: true,
            length_feature: true,
            edge_bytes: 160,
            hash_seed: 0x7472_6961_6765_0001,
            max_head_bytes: 4096,
            max_tail_bytes: 1024,
            // Both measured worse on held-out sources with the shipped data (models/README.md);
            // kept as options for other data.
            normalize: false,
            shape_features: false,
        }
    }
}

impl FeatureConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        if !(8..=24).contains(&self.hash_bits) {
            return Err(format!("hash_bits {} not in 8..=24", self.hash_bits));
        }
        if !(self.char_weight.is_finite() && (0.0..=16.0).contains(&self.char_weight)) {
            return Err(format!("char_weight {} not in 0..=16", self.char_weight));
        }
        if self.char_ngram_min != 0
            && (self.char_ngram_min > self.char_ngram_max
                || usize::from(self.char_ngram_max) > MAX_NGRAM)
        {
            return Err(format!(
                "char n-gram range {}..={} invalid (max {MAX_NGRAM})",
                self.char_ngram_min, self.char_ngram_max
            ));
        }
        Ok(())
    }

    pub(super) fn flags(&self) -> u8 {
        u8::from(self.word_unigrams)
            | (u8::from(self.word_bigrams) << 1)
            | (u8::from(self.length_feature) << 2)
            | (u8::from(self.normalize) << 3)
            | (u8::from(self.shape_features) << 4)
    }

    /// Inverse of [`Self::flags`] for the boolean fields.
    pub(super) fn set_flags(&mut self, flags: u8) {
        self.word_unigrams = flags & 1 != 0;
        self.word_bigrams = flags & 2 != 0;
        self.length_feature = flags & 4 != 0;
        self.normalize = flags & 8 != 0;
        self.shape_features = flags & 16 != 0;
    }
}

// ---------------------------------------------------------------------------
// Hashing and feature extraction

pub(super) const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const DOMAIN_CHAR: u64 = 0x6368_6172_5f6e_6772;
const DOMAIN_WORD: u64 = 0x776f_7264_5f74_6f6b;
const DOMAIN_BIGRAM: u64 = 0x6269_6772_616d_5f5f;
const DOMAIN_LEN: u64 = 0x6c65_6e67_7468_5f5f;
const DOMAIN_GAP: u64 = 0x6761_705f_5f5f_5f5f;
const DOMAIN_HEAD: u64 = 0x6865_6164_5f5f_5f5f;
const DOMAIN_TAIL: u64 = 0x7461_696c_5f5f_5f5f;
const DOMAIN_SHAPE: u64 = 0x7368_6170_655f_5f5f;
// Word boundary markers, outside the Unicode range so they never collide with text.
const WORD_START: u32 = 0x11_0001;
const WORD_END: u32 = 0x11_0002;
const PUNCT_TAG: u64 = 1 << 40;
const NEWLINE: u32 = 0x11_0003;
/// Set on emitted buckets that are character n-grams (buckets use at most 24 bits).
pub(super) const CHAR_FLAG: u32 = 1 << 31;

#[inline(always)]
pub(super) fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(5) ^ v).wrapping_mul(MUL)
}

#[inline(always)]
pub(super) fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

enum CharKind {
    Word(u32),
    Space,
    Token(u32),
}

#[inline(always)]
fn char_kind(ch: char) -> CharKind {
    if ch.is_ascii() {
        let b = ch as u8;
        match b {
            b'a'..=b'z' | b'_' => CharKind::Word(u32::from(b)),
            b'A'..=b'Z' => CharKind::Word(u32::from(b + 32)),
            // Digits collapse to one symbol: the shape of a number matters, not its value.
            b'0'..=b'9' => CharKind::Word(u32::from(b'0')),
            b'\n' => CharKind::Token(NEWLINE),
            _ if b.is_ascii_whitespace() || b.is_ascii_control() => CharKind::Space,
            _ => CharKind::Token(u32::from(b)),
        }
    } else if ch.is_alphanumeric() {
        if ch.is_numeric() {
            CharKind::Word(u32::from(b'0'))
        } else {
            CharKind::Word(ch.to_lowercase().next().unwrap_or(ch) as u32)
        }
    } else if ch.is_whitespace() || ch.is_control() {
        CharKind::Space
    } else {
        CharKind::Token(ch as u32)
    }
}

/// Receives the hash buckets of a text's features.
pub(super) trait Sink {
    /// A word, punctuation, bigram or length feature.
    fn word(&mut self, bucket: u32);
    /// A character n-gram feature.
    fn char_gram(&mut self, bucket: u32);
}

/// Streams hashed feature buckets for a text without allocating.
struct Extractor<'a, S: Sink> {
    cfg: &'a FeatureConfig,
    shift: u32,
    sink: S,
    ring: [u64; MAX_NGRAM],
    ring_pos: usize,
    word_len: usize,
    in_word: bool,
    word_hash: u64,
    prev: Option<u64>,
    /// Mixed into token hashes: distinguishes body, head-edge and tail-edge tokens.
    token_domain: u64,
    /// Character n-grams are only emitted for the body pass.
    chars_on: bool,
    /// Per-position multipliers of the character n-gram hash.
    char_keys: [u64; MAX_NGRAM],
    /// Per-length offsets, so n-grams of different lengths land apart.
    len_keys: [u64; MAX_NGRAM + 1],
    seed_word: u64,
    seed_bigram: u64,
}

impl<'a, S: Sink> Extractor<'a, S> {
    fn new(cfg: &'a FeatureConfig, sink: S) -> Self {
        let s = cfg.hash_seed;
        let seed_char = mix(s, DOMAIN_CHAR);
        let mut char_keys = [0u64; MAX_NGRAM];
        for (i, key) in char_keys.iter_mut().enumerate() {
            *key = fmix(seed_char.wrapping_add(i as u64)) | 1;
        }
        let mut len_keys = [0u64; MAX_NGRAM + 1];
        for (i, key) in len_keys.iter_mut().enumerate() {
            *key = fmix(seed_char ^ ((i as u64 + 1) << 32));
        }
        Self {
            cfg,
            shift: 64 - u32::from(cfg.hash_bits),
            sink,
            ring: [0; MAX_NGRAM],
            ring_pos: 0,
            word_len: 0,
            in_word: false,
            word_hash: 0,
            prev: None,
            token_domain: 0,
            chars_on: true,
            char_keys,
            len_keys,
            seed_word: mix(s, DOMAIN_WORD),
            seed_bigram: mix(s, DOMAIN_BIGRAM),
        }
    }

    #[inline(always)]
    fn bucket(&self, h: u64) -> u32 {
        // High bits of the finalized hash; shift < 64 because hash_bits >= 8.
        (fmix(h) >> self.shift) as u32
    }

    #[inline(always)]
    fn push_char(&mut self, c: u32) {
        self.ring[self.ring_pos % MAX_NGRAM] = u64::from(c);
        self.ring_pos = self.ring_pos.wrapping_add(1);
        self.word_len += 1;
        let lo = usize::from(self.cfg.char_ngram_min);
        if lo == 0 || !self.chars_on {
            return;
        }
        let hi = usize::from(self.cfg.char_ngram_max).min(self.word_len);
        // Sum of char * per-position key: the products are independent (no serial hash
        // chain), and every n-gram ending here extends the shorter one's sum.
        let mut h = 0u64;
        for n in 1..=hi {
            let ch = self.ring[self.ring_pos.wrapping_sub(n) % MAX_NGRAM];
            h = h.wrapping_add(ch.wrapping_mul(self.char_keys[n - 1]));
            if n >= lo {
                let b = ((h ^ self.len_keys[n]).wrapping_mul(MUL) >> self.shift) as u32;
                self.sink.char_gram(b);
            }
        }
    }

    #[inline(always)]
    fn word_char(&mut self, c: u32) {
        if !self.in_word {
            self.in_word = true;
            self.word_len = 0;
            self.word_hash = self.seed_word;
            self.push_char(WORD_START);
        }
        self.word_hash = mix(self.word_hash, u64::from(c));
        self.push_char(c);
    }

    #[inline(always)]
    fn end_word(&mut self) {
        if !self.in_word {
            return;
        }
        self.in_word = false;
        self.push_char(WORD_END);
        let h = self.word_hash;
        self.token(h);
    }

    #[inline(always)]
    fn token(&mut self, h: u64) {
        let h = h ^ self.token_domain;
        if self.cfg.word_unigrams {
            let b = self.bucket(h);
            self.sink.word(b);
        }
        if self.cfg.word_bigrams {
            if let Some(p) = self.prev {
                let b = self.bucket(mix(mix(self.seed_bigram, p), h));
                self.sink.word(b);
            }
        }
        self.prev = Some(h);
    }

    fn feed(&mut self, s: &str) {
        for ch in s.chars() {
            match char_kind(ch) {
                CharKind::Word(c) => self.word_char(c),
                CharKind::Space => self.end_word(),
                CharKind::Token(c) => {
                    self.end_word();
                    let h = mix(self.seed_word, u64::from(c) | PUNCT_TAG);
                    self.token(h);
                }
            }
        }
        self.end_word();
    }

    fn run(mut self, text: &str) -> S {
        let normalized = if self.cfg.normalize {
            normalize_text(text)
        } else {
            Cow::Borrowed(text)
        };
        let text: &str = &normalized;
        let (head, tail) = head_tail(
            text,
            self.cfg.max_head_bytes as usize,
            self.cfg.max_tail_bytes as usize,
        );
        self.feed(head);
        if let Some(tail) = tail {
            // No bigram across the skipped middle; mark the gap instead.
            self.prev = Some(mix(self.cfg.hash_seed, DOMAIN_GAP));
            self.feed(tail);
        }
        let edge = usize::from(self.cfg.edge_bytes);
        if edge > 0 {
            self.chars_on = false;
            self.edge_pass(text.get(..floor_boundary(text, edge)), DOMAIN_HEAD);
            let start = ceil_boundary(text, text.len().saturating_sub(edge));
            self.edge_pass(text.get(start..), DOMAIN_TAIL);
        }
        if self.cfg.length_feature {
            let len_bucket = u64::from(usize::BITS - text.len().leading_zeros());
            let b = self.bucket(mix(mix(self.cfg.hash_seed, DOMAIN_LEN), len_bucket));
            self.sink.word(b);
        }
        if self.cfg.shape_features {
            self.shape(head);
            if let Some(tail) = tail {
                self.shape(tail);
            }
        }
        self.sink
    }

    /// One feature per (property, bucket) of the text's shape.
    fn shape(&mut self, text: &str) {
        let (mut digits, mut code, mut upper, mut lines, mut latex) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        for &b in text.as_bytes() {
            match b {
                b'0'..=b'9' => digits += 1,
                b'{' | b'}' | b'[' | b']' | b'(' | b')' | b';' | b'=' | b'<' | b'>' | b'_'
                | b'#' | b'&' | b'|' | b'*' | b'/' => code += 1,
                b'A'..=b'Z' => upper += 1,
                b'\n' => lines += 1,
                b'\\' | b'$' | b'^' => latex += 1,
                _ => {}
            }
        }
        let len = text.len().max(1);
        let fence = u64::from(text.contains("```"));
        let question = u64::from(text.trim_end().ends_with('?'));
        for (kind, bucket) in [
            (1u64, share_bucket(digits, len)),
            (2, share_bucket(code, len)),
            (3, share_bucket(upper, len)),
            (4, share_bucket(latex, len)),
            (5, u64::from(usize::BITS - lines.leading_zeros()).min(8)),
            (6, fence),
            (7, question),
        ] {
            let b = self.bucket(mix(
                mix(self.cfg.hash_seed, DOMAIN_SHAPE),
                kind << 8 | bucket,
            ));
            self.sink.word(b);
        }
    }
}

/// 0 for none, then roughly doubling bands: up to 1%, 2%, 4%, 8%, 16%, 32%, more.
fn share_bucket(count: usize, len: usize) -> u64 {
    if count == 0 {
        return 0;
    }
    let per_mille = count.saturating_mul(1000) / len;
    let mut bucket = 1u64;
    let mut limit = 10usize;
    while per_mille > limit && bucket < 7 {
        bucket += 1;
        limit *= 2;
    }
    bucket
}

/// Length of an answer-option or list marker opening `line` (`(A) `, `B. `, `C) `, `12. `),
/// including the space after it; 0 if there is none.
fn marker_len(line: &str) -> usize {
    let b = line.as_bytes();
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    let n = if b.first() == Some(&b'(') {
        let inner = b[1..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count();
        if (1..=2).contains(&inner) && b.get(1 + inner) == Some(&b')') {
            inner + 2
        } else {
            return 0;
        }
    } else if (1..=2).contains(&digits) && matches!(b.get(digits), Some(b'.' | b')')) {
        digits + 1
    } else if b.first().is_some_and(u8::is_ascii_uppercase) && matches!(b.get(1), Some(b'.' | b')'))
    {
        2
    } else {
        return 0;
    };
    match b.get(n) {
        Some(b' ' | b'\t') => n + 1,
        None => n,
        _ => 0,
    }
}

/// Removes template artefacts line by line: option and list markers, and `Options:`
/// headers. Borrows when there is nothing to remove (the usual case for real prompts).
pub(super) fn normalize_text(text: &str) -> Cow<'_, str> {
    let artefact = |line: &str| {
        let t = line.trim_start();
        t.trim_end().eq_ignore_ascii_case("options:") || marker_len(t) > 0
    };
    if !text.split('\n').any(artefact) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        let t = line.trim_start();
        if t.trim_end().eq_ignore_ascii_case("options:") {
            continue;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(t.get(marker_len(t)..).unwrap_or(t));
    }
    Cow::Owned(out)
}

impl<S: Sink> Extractor<'_, S> {
    fn edge_pass(&mut self, part: Option<&str>, domain: u64) {
        if let Some(part) = part {
            self.in_word = false;
            self.prev = None;
            self.token_domain = mix(self.cfg.hash_seed, domain);
            self.feed(part);
        }
    }
}

/// Largest char boundary <= `i`.
fn floor_boundary(text: &str, i: usize) -> usize {
    let mut i = i.min(text.len());
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Smallest char boundary >= `i`.
fn ceil_boundary(text: &str, i: usize) -> usize {
    let mut i = i;
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i.min(text.len())
}

/// Splits a long text into the part to read from the start and an optional tail.
pub(super) fn head_tail(text: &str, head: usize, tail: usize) -> (&str, Option<&str>) {
    if head == 0 || text.len() <= head.saturating_add(tail) {
        return (text, None);
    }
    let h = floor_boundary(text, head);
    let t = ceil_boundary(text, text.len() - tail);
    let head_part = text.get(..h).unwrap_or("");
    let tail_part = if tail == 0 { None } else { text.get(t..) };
    (head_part, tail_part)
}

/// Feeds the hash bucket of every feature of `text` to `sink` and returns it.
pub(super) fn extract<S: Sink>(cfg: &FeatureConfig, text: &str, sink: S) -> S {
    Extractor::new(cfg, sink).run(text)
}

/// Collects buckets for training; character n-grams are tagged with `CHAR_FLAG`.
pub(super) struct Collect<'a>(pub(super) &'a mut Vec<u32>);

impl Sink for Collect<'_> {
    #[inline(always)]
    fn word(&mut self, bucket: u32) {
        self.0.push(bucket);
    }
    #[inline(always)]
    fn char_gram(&mut self, bucket: u32) {
        self.0.push(bucket | CHAR_FLAG);
    }
}

/// Per-feature values for word and character features: L2-normalised so long and short
/// prompts produce logits on the same scale.
#[inline]
pub(super) fn feature_values(cfg: &FeatureConfig, n_word: usize, n_char: usize) -> (f32, f32) {
    let cw = cfg.char_weight;
    let norm = (n_word as f32 + cw * cw * n_char as f32).sqrt();
    if norm > 0.0 {
        (1.0 / norm, cw / norm)
    } else {
        (0.0, 0.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn head_tail_respects_char_boundaries() {
        let text = "é".repeat(10); // 20 bytes
        for head in 0..22 {
            for tail in 0..22 {
                let (h, t) = head_tail(&text, head, tail);
                assert!(h.len() <= text.len());
                if let Some(t) = t {
                    assert!(h.len() + t.len() <= text.len());
                }
            }
        }
        assert_eq!(head_tail("abcdef", 2, 2), ("ab", Some("ef")));
        assert_eq!(head_tail("abcd", 2, 2), ("abcd", None));
    }

    #[test]
    fn features_ignore_case_and_digit_values() {
        // Shape features count uppercase letters on purpose; the rest ignores case.
        let cfg = FeatureConfig {
            shape_features: false,
            ..FeatureConfig::default()
        };
        let collect = |t: &str| {
            let mut v = Vec::new();
            extract(&cfg, t, Collect(&mut v));
            v
        };
        assert_eq!(collect("Hello World 42"), collect("hello world 17"));
        assert_ne!(collect("hello world"), collect("hello there"));
        assert!(collect("").len() <= 1);
    }

    #[test]
    fn normalization_strips_option_markers_and_headers() {
        let bbh = "Which is heavier?\nOptions:\n(A) a feather\n(B) a brick";
        assert_eq!(normalize_text(bbh), "Which is heavier?\na feather\na brick");
        let mmlu = "What is 2+2?\nA. 3\nB. 4\n  C) 5\n10. ten";
        assert_eq!(normalize_text(mmlu), "What is 2+2?\n3\n4\n5\nten");
        // Real prose is left alone, and borrowed (no copy on the hot path).
        for text in [
            "A cat sat on the mat.\nI.e. nothing here",
            "Write a function f(x) that returns x.",
            "(see below) and 3.5 apples",
            "",
        ] {
            assert!(matches!(normalize_text(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn normalized_and_plain_formats_share_features() {
        let cfg = FeatureConfig {
            normalize: true,
            ..FeatureConfig::default()
        };
        let collect = |t: &str| {
            let mut v = Vec::new();
            extract(&cfg, t, Collect(&mut v));
            v.sort_unstable();
            v
        };
        // The same options written two ways give the same features once normalised.
        assert_eq!(
            collect("Pick one:\n(A) red\n(B) blue"),
            collect("Pick one:\nA. red\nB. blue")
        );
        let off = FeatureConfig {
            normalize: false,
            ..cfg
        };
        let mut a = Vec::new();
        extract(&off, "Pick one:\n(A) red\n(B) blue", Collect(&mut a));
        let mut b = Vec::new();
        extract(&off, "Pick one:\nA. red\nB. blue", Collect(&mut b));
        a.sort_unstable();
        b.sort_unstable();
        assert_ne!(a, b);
    }

    #[test]
    fn shape_features_tell_code_from_prose() {
        assert_eq!(share_bucket(0, 100), 0);
        assert_eq!(share_bucket(1, 1000), 1);
        assert_eq!(share_bucket(500, 1000), 7);
        assert!(share_bucket(30, 1000) < share_bucket(200, 1000));
        let cfg = FeatureConfig {
            shape_features: true,
            ..FeatureConfig::default()
        };
        let no_shape = FeatureConfig {
            shape_features: false,
            ..cfg
        };
        let count = |c: &FeatureConfig, t: &str| {
            let mut v = Vec::new();
            extract(c, t, Collect(&mut v));
            v
        };
        let code = "```rust\nfn main() { let x = [1, 2]; }\n```";
        let prose = "Tell me a story about a brave knight";
        // Seven shape features each, and they differ between code and prose.
        assert_eq!(count(&cfg, prose).len(), count(&no_shape, prose).len() + 7);
        let shape = |t: &str| -> Vec<u32> {
            let with = count(&cfg, t);
            with[with.len() - 7..].to_vec()
        };
        assert_ne!(shape(code), shape(prose));
    }
}
