//! Embedded request classifier: hashed word and character n-gram features fed to a
//! multinomial logistic regression, small enough to ship inside the binary and fast
//! enough to run on every request (a few microseconds per prompt).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Most labels a model may have (keeps per-request scoring on the stack).
pub const MAX_LABELS: usize = 64;
/// Longest character n-gram supported (size of the rolling window).
const MAX_NGRAM: usize = 8;
const MAGIC: &[u8; 8] = b"TRGCLSF\0";
const FORMAT_VERSION: u16 = 1;
const MAX_LABEL_BYTES: usize = 256;
/// Largest weight table (buckets x labels) training will allocate.
const MAX_TRAIN_WEIGHTS: usize = 1 << 25;

/// Errors from loading data, training, or decoding a model.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// The data file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A JSONL line could not be parsed.
    #[error("line {line}: {message}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        message: String,
    },
    /// Training data is unusable (empty, one label, too many labels...).
    #[error("invalid training data: {0}")]
    InvalidData(String),
    /// Training options are out of range.
    #[error("invalid training options: {0}")]
    InvalidOptions(String),
    /// Model bytes are truncated, corrupt or of an unknown version.
    #[error("invalid model file: {0}")]
    InvalidModel(String),
}

/// One labelled prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The prompt text.
    pub text: String,
    /// Label name.
    pub label: String,
    /// Origin of the row (`dataset` or `dataset/subset`), used for group splits.
    #[serde(default)]
    pub source: Option<String>,
}

/// Reads labelled examples from a JSONL file (`text`, `label`, optional `source`; other fields ignored).
pub fn load_jsonl(path: &Path) -> Result<Vec<Example>, ClassifierError> {
    let data = std::fs::read_to_string(path).map_err(|source| ClassifierError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_jsonl(&data)
}

/// Parses JSONL text into examples; blank lines are skipped, a bad line is an error naming it.
pub fn parse_jsonl(data: &str) -> Result<Vec<Example>, ClassifierError> {
    let data = data.strip_prefix('\u{feff}').unwrap_or(data);
    let mut out = Vec::new();
    for (i, line) in data.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let ex: Example = serde_json::from_str(line).map_err(|e| ClassifierError::BadLine {
            line: i + 1,
            message: e.to_string(),
        })?;
        if ex.label.trim().is_empty() {
            return Err(ClassifierError::BadLine {
                line: i + 1,
                message: "empty label".into(),
            });
        }
        out.push(ex);
    }
    Ok(out)
}

/// Trains on a JSONL file and writes the model to `out` (what `triage classifier train` runs).
pub fn train_from_jsonl(
    data: &Path,
    out: &Path,
    opts: &TrainOptions,
) -> Result<EmbeddedClassifier, ClassifierError> {
    let examples = load_jsonl(data)?;
    let model = EmbeddedClassifier::train(&examples, opts)?;
    model.save(out)?;
    Ok(model)
}

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
        }
    }
}

impl FeatureConfig {
    fn validate(&self) -> Result<(), String> {
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

    fn flags(&self) -> u8 {
        u8::from(self.word_unigrams)
            | (u8::from(self.word_bigrams) << 1)
            | (u8::from(self.length_feature) << 2)
    }
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Passes over the data (raised automatically for tiny sets, see `min_updates`).
    pub epochs: usize,
    /// AdaGrad base learning rate.
    pub learning_rate: f32,
    /// L2 penalty applied to the weights an example touches.
    pub l2: f32,
    /// Seed for the example shuffle.
    pub seed: u64,
    /// Class weight = (n / (k * n_class))^power: 0 = unweighted, 1 = fully balanced.
    pub class_weight_power: f32,
    /// Average the weights of the later epochs (usually generalises better).
    pub average: bool,
    /// Minimum number of SGD steps, so 20-example sets still converge.
    pub min_updates: usize,
    /// Feature extraction parameters.
    pub features: FeatureConfig,
    /// Fixed label order; empty = sorted unique labels of the data.
    pub labels: Vec<String>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 10,
            learning_rate: 0.2,
            l2: 1e-6,
            seed: 42,
            class_weight_power: 1.0,
            min_updates: 3000,
            average: true,
            features: FeatureConfig::default(),
            labels: Vec::new(),
        }
    }
}

/// Result of classifying one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Index of the winning label in [`EmbeddedClassifier::labels`].
    pub label: usize,
    /// Softmax probability of the winning label.
    pub confidence: f32,
    /// Softmax probability per label.
    pub scores: Vec<f32>,
}

/// A trained classifier; immutable, cheap to share across threads.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddedClassifier {
    labels: Vec<String>,
    features: FeatureConfig,
    bias: Vec<f32>,
    /// Per-label dequantization factor for `weights`.
    scales: Vec<f32>,
    weights: Weights,
}

/// Quantized weights, row-major `[bucket][label]` so one feature reads one contiguous row.
#[derive(Debug, Clone, PartialEq)]
enum Weights {
    /// Up to 8 labels: rows padded to 8 bytes for vectorised scoring.
    Narrow(Vec<[i8; 8]>),
    /// More labels: rows of exactly `k` bytes.
    Wide(Vec<i8>),
}

impl Weights {
    /// Builds from unpadded rows of `k` values.
    fn from_rows(k: usize, flat: impl ExactSizeIterator<Item = i8>) -> Self {
        if k <= 8 {
            let mut rows = Vec::with_capacity(flat.len() / k.max(1));
            let mut row = [0i8; 8];
            for (i, v) in flat.enumerate() {
                row[i % k] = v;
                if i % k == k - 1 {
                    rows.push(row);
                    row = [0; 8];
                }
            }
            Weights::Narrow(rows)
        } else {
            Weights::Wide(flat.collect())
        }
    }

    /// Appends the unpadded rows (`k` bytes each) to `out`.
    fn write(&self, k: usize, out: &mut Vec<u8>) {
        match self {
            Weights::Narrow(rows) => {
                for row in rows {
                    out.extend(row.iter().take(k).map(|&v| v as u8));
                }
            }
            Weights::Wide(w) => out.extend(w.iter().map(|&v| v as u8)),
        }
    }

    /// Number of unpadded values (`buckets * k`).
    fn len(&self, k: usize) -> usize {
        match self {
            Weights::Narrow(rows) => rows.len() * k,
            Weights::Wide(w) => w.len(),
        }
    }
}

// ---------------------------------------------------------------------------
// Hashing and feature extraction

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
const DOMAIN_CHAR: u64 = 0x6368_6172_5f6e_6772;
const DOMAIN_WORD: u64 = 0x776f_7264_5f74_6f6b;
const DOMAIN_BIGRAM: u64 = 0x6269_6772_616d_5f5f;
const DOMAIN_LEN: u64 = 0x6c65_6e67_7468_5f5f;
const DOMAIN_GAP: u64 = 0x6761_705f_5f5f_5f5f;
const DOMAIN_HEAD: u64 = 0x6865_6164_5f5f_5f5f;
const DOMAIN_TAIL: u64 = 0x7461_696c_5f5f_5f5f;
// Word boundary markers, outside the Unicode range so they never collide with text.
const WORD_START: u32 = 0x11_0001;
const WORD_END: u32 = 0x11_0002;
const PUNCT_TAG: u64 = 1 << 40;
const NEWLINE: u32 = 0x11_0003;
/// Set on emitted buckets that are character n-grams (buckets use at most 24 bits).
const CHAR_FLAG: u32 = 1 << 31;

#[inline(always)]
fn mix(h: u64, v: u64) -> u64 {
    (h.rotate_left(5) ^ v).wrapping_mul(MUL)
}

#[inline(always)]
fn fmix(mut h: u64) -> u64 {
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
trait Sink {
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
        self.sink
    }
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
fn head_tail(text: &str, head: usize, tail: usize) -> (&str, Option<&str>) {
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
fn extract<S: Sink>(cfg: &FeatureConfig, text: &str, sink: S) -> S {
    Extractor::new(cfg, sink).run(text)
}

/// Collects buckets for training; character n-grams are tagged with `CHAR_FLAG`.
struct Collect<'a>(&'a mut Vec<u32>);

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

/// Bucket indices buffered before summing, so the sums stay in registers in a tight loop
/// instead of round-tripping through memory on every feature.
const BATCH: usize = 64;

/// Scores with up to 8 labels: one 8-byte row per bucket, summed in fixed-width
/// arrays the compiler vectorises.
struct Narrow<'a> {
    rows: &'a [[i8; 8]],
    word: [i32; 8],
    chr: [i32; 8],
    n_word: usize,
    n_char: usize,
    word_buf: [u32; BATCH],
    char_buf: [u32; BATCH],
    word_len: usize,
    char_len: usize,
}

impl<'a> Narrow<'a> {
    fn new(rows: &'a [[i8; 8]]) -> Self {
        Self {
            rows,
            word: [0; 8],
            chr: [0; 8],
            n_word: 0,
            n_char: 0,
            word_buf: [0; BATCH],
            char_buf: [0; BATCH],
            word_len: 0,
            char_len: 0,
        }
    }

    #[inline(always)]
    fn sum(rows: &[[i8; 8]], buckets: &[u32], acc: &mut [i32; 8]) {
        let mut a = *acc;
        for &b in buckets {
            if let Some(row) = rows.get(b as usize) {
                for (x, &v) in a.iter_mut().zip(row) {
                    *x += i32::from(v);
                }
            }
        }
        *acc = a;
    }

    fn flush(&mut self) {
        let n = self.word_len.min(BATCH);
        Self::sum(self.rows, &self.word_buf[..n], &mut self.word);
        self.n_word += n;
        self.word_len = 0;
        let n = self.char_len.min(BATCH);
        Self::sum(self.rows, &self.char_buf[..n], &mut self.chr);
        self.n_char += n;
        self.char_len = 0;
    }
}

impl Sink for Narrow<'_> {
    #[inline(always)]
    fn word(&mut self, bucket: u32) {
        if self.word_len >= BATCH {
            self.flush();
        }
        self.word_buf[self.word_len] = bucket;
        self.word_len += 1;
    }
    #[inline(always)]
    fn char_gram(&mut self, bucket: u32) {
        if self.char_len >= BATCH {
            self.flush();
        }
        self.char_buf[self.char_len] = bucket;
        self.char_len += 1;
    }
}

/// Scores with any label count (row stride = label count).
struct Wide<'a> {
    weights: &'a [i8],
    k: usize,
    word: [i32; MAX_LABELS],
    chr: [i32; MAX_LABELS],
    n_word: usize,
    n_char: usize,
}

impl Sink for Wide<'_> {
    fn word(&mut self, bucket: u32) {
        self.n_word += 1;
        let base = bucket as usize * self.k;
        if let Some(row) = self.weights.get(base..base + self.k) {
            for (a, &v) in self.word.iter_mut().zip(row) {
                *a += i32::from(v);
            }
        }
    }
    fn char_gram(&mut self, bucket: u32) {
        self.n_char += 1;
        let base = bucket as usize * self.k;
        if let Some(row) = self.weights.get(base..base + self.k) {
            for (a, &v) in self.chr.iter_mut().zip(row) {
                *a += i32::from(v);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Training

/// SplitMix64: tiny deterministic PRNG, so training is reproducible for a seed.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the tiny modulo bias is irrelevant for shuffling.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// Per-feature values for word and character features: L2-normalised so long and short
/// prompts produce logits on the same scale.
#[inline]
fn feature_values(cfg: &FeatureConfig, n_word: usize, n_char: usize) -> (f32, f32) {
    let cw = cfg.char_weight;
    let norm = (n_word as f32 + cw * cw * n_char as f32).sqrt();
    if norm > 0.0 {
        (1.0 / norm, cw / norm)
    } else {
        (0.0, 0.0)
    }
}

fn softmax_in_place(v: &mut [f32]) {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    if sum > 0.0 && sum.is_finite() {
        for x in v.iter_mut() {
            *x /= sum;
        }
    } else {
        let u = 1.0 / v.len().max(1) as f32;
        v.iter_mut().for_each(|x| *x = u);
    }
}

fn validate_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "label {label:?} must be 1..={MAX_LABEL_BYTES} bytes"
        ));
    }
    Ok(())
}

impl TrainOptions {
    fn validate(&self) -> Result<(), ClassifierError> {
        let bad = |m: String| Err(ClassifierError::InvalidOptions(m));
        self.features.validate().or_else(bad)?;
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("learning_rate {} must be > 0", self.learning_rate));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return bad(format!("l2 {} must be >= 0", self.l2));
        }
        if !(self.class_weight_power.is_finite() && (0.0..=2.0).contains(&self.class_weight_power))
        {
            return bad(format!(
                "class_weight_power {} not in 0..=2",
                self.class_weight_power
            ));
        }
        if self.epochs == 0 || self.epochs > 1000 {
            return bad(format!("epochs {} not in 1..=1000", self.epochs));
        }
        Ok(())
    }
}

impl EmbeddedClassifier {
    /// Trains a model; deterministic for a given data order and `opts.seed`.
    pub fn train(examples: &[Example], opts: &TrainOptions) -> Result<Self, ClassifierError> {
        opts.validate()?;
        if examples.is_empty() {
            return Err(ClassifierError::InvalidData("no examples".into()));
        }
        let labels: Vec<String> = if opts.labels.is_empty() {
            let set: std::collections::BTreeSet<&str> =
                examples.iter().map(|e| e.label.as_str()).collect();
            set.into_iter().map(str::to_owned).collect()
        } else {
            opts.labels.clone()
        };
        if labels.len() < 2 || labels.len() > MAX_LABELS {
            return Err(ClassifierError::InvalidData(format!(
                "need 2..={MAX_LABELS} labels, got {}",
                labels.len()
            )));
        }
        for l in &labels {
            validate_label(l).map_err(ClassifierError::InvalidData)?;
        }
        let index: std::collections::HashMap<&str, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        if index.len() != labels.len() {
            return Err(ClassifierError::InvalidData("duplicate label names".into()));
        }
        let mut ys = Vec::with_capacity(examples.len());
        for (i, e) in examples.iter().enumerate() {
            match index.get(e.label.as_str()) {
                Some(&y) => ys.push(y),
                None => {
                    return Err(ClassifierError::InvalidData(format!(
                        "example {} has unknown label {:?}",
                        i + 1,
                        e.label
                    )))
                }
            }
        }

        let k = labels.len();
        let n = examples.len();
        // Training keeps three f32 tables of this size; refuse sizes that would exhaust memory.
        if (1usize << opts.features.hash_bits).saturating_mul(k) > MAX_TRAIN_WEIGHTS {
            return Err(ClassifierError::InvalidOptions(format!(
                "2^{} buckets x {k} labels exceeds {MAX_TRAIN_WEIGHTS} weights",
                opts.features.hash_bits
            )));
        }
        let mut counts = vec![0usize; k];
        for &y in &ys {
            counts[y] += 1;
        }
        // Balanced weights softened by `class_weight_power`, normalised to mean 1 per example.
        let mut class_w: Vec<f32> = counts
            .iter()
            .map(|&c| {
                if c == 0 {
                    0.0
                } else {
                    (n as f64 / (k as f64 * c as f64)).powf(f64::from(opts.class_weight_power))
                        as f32
                }
            })
            .collect();
        let mean: f32 = ys.iter().map(|&y| class_w[y]).sum::<f32>() / n as f32;
        if mean > 0.0 {
            class_w.iter_mut().for_each(|w| *w /= mean);
        }

        let cfg = opts.features;
        let buckets = 1usize << cfg.hash_bits;
        let mut w = vec![0f32; buckets * k];
        let mut g2 = vec![0f32; buckets * k];
        let mut bias = vec![0f32; k];
        let mut bias_g2 = vec![0f32; k];
        let lr = opts.learning_rate;
        let l2 = opts.l2;
        const EPS: f32 = 1e-6;

        let epochs = opts.epochs.max(opts.min_updates.div_ceil(n)).min(1000);
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix64::new(opts.seed);
        let mut feats: Vec<u32> = Vec::with_capacity(4096);
        let mut probs = vec![0f32; k];
        let mut grad = vec![0f32; k];

        // Averaging the per-epoch weights of the second half smooths SGD noise.
        let mut avg_w: Vec<f32> = Vec::new();
        let mut avg_b = vec![0f32; k];
        let mut avg_n = 0f32;
        for epoch in 0..epochs {
            if opts.average && epoch > 0 && epoch >= epochs / 2 {
                if avg_w.is_empty() {
                    avg_w = vec![0f32; w.len()];
                }
                avg_w.iter_mut().zip(&w).for_each(|(a, &v)| *a += v);
                avg_b.iter_mut().zip(&bias).for_each(|(a, &v)| *a += v);
                avg_n += 1.0;
            }
            rng.shuffle(&mut order);
            for &i in &order {
                let y = ys[i];
                feats.clear();
                extract(&cfg, &examples[i].text, Collect(&mut feats));
                let n_char = feats.iter().filter(|&&b| b & CHAR_FLAG != 0).count();
                let (x_word, x_char) = feature_values(&cfg, feats.len() - n_char, n_char);
                probs.copy_from_slice(&bias);
                for &b in &feats {
                    let x = if b & CHAR_FLAG != 0 { x_char } else { x_word };
                    let base = (b & !CHAR_FLAG) as usize * k;
                    let row = &w[base..base + k];
                    for (p, &wv) in probs.iter_mut().zip(row) {
                        *p += wv * x;
                    }
                }
                softmax_in_place(&mut probs);
                let cw = class_w[y];
                let mut max_g = 0f32;
                for (c, (g, &p)) in grad.iter_mut().zip(&probs).enumerate() {
                    let target = if c == y { 1.0 } else { 0.0 };
                    *g = (p - target) * cw;
                    max_g = max_g.max(g.abs());
                }
                if max_g < 1e-5 {
                    continue;
                }
                for c in 0..k {
                    let g = grad[c];
                    bias_g2[c] += g * g;
                    bias[c] -= lr * g / (bias_g2[c].sqrt() + EPS);
                }
                for &b in &feats {
                    let x = if b & CHAR_FLAG != 0 { x_char } else { x_word };
                    let base = (b & !CHAR_FLAG) as usize * k;
                    let row = &mut w[base..base + k];
                    let acc = &mut g2[base..base + k];
                    for ((wv, a), &g) in row.iter_mut().zip(acc.iter_mut()).zip(&grad) {
                        let gr = g * x + l2 * *wv;
                        *a += gr * gr;
                        *wv -= lr * gr / (a.sqrt() + EPS);
                    }
                }
            }
        }

        if avg_n > 0.0 {
            avg_w
                .iter_mut()
                .zip(&w)
                .for_each(|(a, &v)| *a = (*a + v) / (avg_n + 1.0));
            avg_b
                .iter_mut()
                .zip(&bias)
                .for_each(|(a, &v)| *a = (*a + v) / (avg_n + 1.0));
            return Ok(Self::quantize(labels, cfg, avg_b, &avg_w));
        }
        Ok(Self::quantize(labels, cfg, bias, &w))
    }

    /// Converts trained f32 weights to per-label-scaled i8.
    fn quantize(labels: Vec<String>, features: FeatureConfig, bias: Vec<f32>, w: &[f32]) -> Self {
        let k = labels.len();
        let mut max_abs = vec![0f32; k];
        for row in w.chunks_exact(k) {
            for (m, &v) in max_abs.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let scales: Vec<f32> = max_abs
            .iter()
            .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
            .collect();
        let weights = Weights::from_rows(
            k,
            w.iter()
                .enumerate()
                .map(|(i, &v)| (v / scales[i % k]).round().clamp(-127.0, 127.0) as i8),
        );
        Self {
            labels,
            features,
            bias,
            scales,
            weights,
        }
    }

    /// Reads a model from a file.
    pub fn load(path: &Path) -> Result<Self, ClassifierError> {
        let bytes = std::fs::read(path).map_err(|source| ClassifierError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Writes the model to a file.
    pub fn save(&self, path: &Path) -> Result<(), ClassifierError> {
        std::fs::write(path, self.to_bytes()).map_err(|source| ClassifierError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// The model shipped with triage (trained on the default 7-label set).
    pub fn default_model() -> Result<Self, ClassifierError> {
        Self::from_bytes(include_bytes!("../../models/classifier.bin"))
    }

    /// Label names, indexed by [`Prediction::label`].
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Name of label `index`, if in range.
    pub fn label_name(&self, index: usize) -> Option<&str> {
        self.labels.get(index).map(String::as_str)
    }

    /// Index of the label called `name`.
    pub fn label_index(&self, name: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == name)
    }

    /// Feature parameters this model was trained with.
    pub fn feature_config(&self) -> &FeatureConfig {
        &self.features
    }

    /// Labels a prompt; only the returned score vector is allocated.
    pub fn classify(&self, text: &str) -> Prediction {
        // Word and character features are summed apart because they carry different values.
        match &self.weights {
            Weights::Narrow(rows) => {
                let mut a = extract(&self.features, text, Narrow::new(rows));
                a.flush();
                self.finish(&a.word, &a.chr, a.n_word, a.n_char)
            }
            Weights::Wide(weights) => {
                let a = extract(
                    &self.features,
                    text,
                    Wide {
                        weights,
                        k: self.labels.len(),
                        word: [0; MAX_LABELS],
                        chr: [0; MAX_LABELS],
                        n_word: 0,
                        n_char: 0,
                    },
                );
                self.finish(&a.word, &a.chr, a.n_word, a.n_char)
            }
        }
    }

    /// Turns summed quantized weights into softmax scores.
    fn finish(&self, word: &[i32], chr: &[i32], n_word: usize, n_char: usize) -> Prediction {
        let (x_word, x_char) = feature_values(&self.features, n_word, n_char);
        let mut scores: Vec<f32> = self
            .bias
            .iter()
            .zip(&self.scales)
            .zip(word.iter().zip(chr))
            .map(|((&b, &s), (&aw, &ac))| b + s * (aw as f32 * x_word + ac as f32 * x_char))
            .collect();
        softmax_in_place(&mut scores);
        let mut best = 0;
        for (i, &s) in scores.iter().enumerate() {
            if s > scores[best] {
                best = i;
            }
        }
        Prediction {
            label: best,
            confidence: scores.get(best).copied().unwrap_or(0.0),
            scores,
        }
    }

    // -----------------------------------------------------------------------
    // Serialization

    /// Encodes the model: header, labels, feature parameters, i8 weights, checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let k = self.labels.len();
        let mut out = Vec::with_capacity(64 + self.weights.len(k) + k * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let f = &self.features;
        out.push(f.hash_bits);
        out.push(f.char_ngram_min);
        out.push(f.char_ngram_max);
        out.extend_from_slice(&f.char_weight.to_le_bytes());
        out.push(f.flags());
        out.extend_from_slice(&f.edge_bytes.to_le_bytes());
        out.extend_from_slice(&f.hash_seed.to_le_bytes());
        out.extend_from_slice(&f.max_head_bytes.to_le_bytes());
        out.extend_from_slice(&f.max_tail_bytes.to_le_bytes());
        out.extend_from_slice(&(k as u16).to_le_bytes());
        for l in &self.labels {
            out.extend_from_slice(&(l.len() as u16).to_le_bytes());
            out.extend_from_slice(l.as_bytes());
        }
        for v in self.bias.iter().chain(&self.scales) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.weights.len(k) as u64).to_le_bytes());
        self.weights.write(k, &mut out);
        let sum = checksum(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes a model written by [`Self::to_bytes`]; corrupt input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ClassifierError> {
        let bad = |m: &str| ClassifierError::InvalidModel(m.to_owned());
        if bytes.len() < MAGIC.len() + 2 + 8 || !bytes.starts_with(MAGIC) {
            return Err(bad("not a triage classifier (bad magic)"));
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        let mut r = Reader { buf: body, pos: 0 };
        r.take(MAGIC.len())?;
        let version = r.u16()?;
        if version != FORMAT_VERSION {
            return Err(ClassifierError::InvalidModel(format!(
                "unsupported format version {version} (expected {FORMAT_VERSION})"
            )));
        }
        let stored = u64::from_le_bytes(sum.try_into().map_err(|_| bad("truncated"))?);
        if checksum(body) != stored {
            return Err(bad("checksum mismatch (file corrupt or truncated)"));
        }
        let hash_bits = r.u8()?;
        let char_ngram_min = r.u8()?;
        let char_ngram_max = r.u8()?;
        let char_weight = r.f32()?;
        let flags = r.u8()?;
        if flags & !0b111 != 0 {
            return Err(bad("unknown feature flags"));
        }
        let edge_bytes = r.u16()?;
        let hash_seed = r.u64()?;
        let max_head_bytes = r.u32()?;
        let max_tail_bytes = r.u32()?;
        let features = FeatureConfig {
            hash_bits,
            char_ngram_min,
            char_ngram_max,
            char_weight,
            word_unigrams: flags & 1 != 0,
            word_bigrams: flags & 2 != 0,
            length_feature: flags & 4 != 0,
            edge_bytes,
            hash_seed,
            max_head_bytes,
            max_tail_bytes,
        };
        features.validate().map_err(ClassifierError::InvalidModel)?;
        let k = usize::from(r.u16()?);
        if !(2..=MAX_LABELS).contains(&k) {
            return Err(bad("label count out of range"));
        }
        let mut labels = Vec::with_capacity(k);
        for _ in 0..k {
            let len = usize::from(r.u16()?);
            let s = std::str::from_utf8(r.take(len)?).map_err(|_| bad("label is not UTF-8"))?;
            validate_label(s).map_err(ClassifierError::InvalidModel)?;
            if labels.iter().any(|l: &String| l == s) {
                return Err(bad("duplicate label"));
            }
            labels.push(s.to_owned());
        }
        let mut floats = Vec::with_capacity(2 * k);
        for _ in 0..2 * k {
            let v = r.f32()?;
            if !v.is_finite() {
                return Err(bad("non-finite parameter"));
            }
            floats.push(v);
        }
        let scales = floats.split_off(k);
        let bias = floats;
        let n = r.u64()?;
        let expected = (1u64 << hash_bits) * k as u64;
        if n != expected {
            return Err(bad("weight count does not match header"));
        }
        let weights = Weights::from_rows(k, r.take(n as usize)?.iter().map(|&b| b as i8));
        if r.pos != body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            labels,
            features,
            bias,
            scales,
            weights,
        })
    }
}

/// 64-bit checksum over 8-byte words (fast enough for a few MB at startup).
fn checksum(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ data.len() as u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        h = mix(h, u64::from_le_bytes(word));
    }
    for &b in chunks.remainder() {
        h = mix(h, u64::from(b));
    }
    fmix(h)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ClassifierError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| ClassifierError::InvalidModel("truncated".into()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ClassifierError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ClassifierError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, ClassifierError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ClassifierError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ClassifierError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn f32(&mut self) -> Result<f32, ClassifierError> {
        Ok(f32::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ex(text: &str, label: &str) -> Example {
        Example {
            text: text.to_owned(),
            label: label.to_owned(),
            source: None,
        }
    }

    /// A small three-label set with clearly separable vocabulary.
    fn small_set() -> Vec<Example> {
        let mut v = Vec::new();
        for t in [
            "write a python function to reverse a list",
            "fix this rust compile error in my struct",
            "how do I sort a dict by value in python",
            "convert this javascript loop to a map call",
            "why does my java code throw a null pointer exception",
            "implement binary search in c++",
        ] {
            v.push(ex(t, "code"));
        }
        for t in [
            "what is 12 times 7 plus 3",
            "solve for x: 2x + 5 = 17",
            "compute the derivative of x^2 + 3x",
            "what is the probability of rolling two sixes",
            "a train travels 60 km in 1.5 hours, what is its speed",
            "find the sum of the first 100 integers",
        ] {
            v.push(ex(t, "math"));
        }
        for t in [
            "hello there",
            "thanks a lot",
            "good morning, how are you",
            "tell me a joke",
            "bye, see you later",
            "what is your name",
        ] {
            v.push(ex(t, "chat"));
        }
        v
    }

    fn small_opts() -> TrainOptions {
        TrainOptions {
            features: FeatureConfig {
                hash_bits: 14,
                ..FeatureConfig::default()
            },
            ..TrainOptions::default()
        }
    }

    fn tricky_texts() -> Vec<String> {
        vec![
            String::new(),
            "   \n\t ".to_owned(),
            "?!".to_owned(),
            "héllo wörld ÇA VA? 日本語のテキストです 🤖🚀 Ωμέγα".to_owned(),
            "e\u{301}\u{200d}\u{0}\u{feff}x".to_owned(),
            "ǅ İstanbul ß ﬁ".to_owned(),
            "é".repeat(3000),
            "🤖".repeat(2000),
            "word ".repeat(300_000),
            "x".repeat(100_000),
        ]
    }

    #[test]
    fn send_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<EmbeddedClassifier>();
    }

    #[test]
    fn round_trip_preserves_predictions() {
        let data = small_set();
        let m = EmbeddedClassifier::train(&data, &small_opts()).unwrap();
        let bytes = m.to_bytes();
        let back = EmbeddedClassifier::from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.labels(), m.labels());
        assert_eq!(back.feature_config(), m.feature_config());
        for t in data.iter().map(|e| e.text.clone()).chain(tricky_texts()) {
            assert_eq!(m.classify(&t), back.classify(&t), "{t:.40}");
        }
        assert_eq!(back.to_bytes(), bytes);
    }

    #[test]
    fn training_is_deterministic() {
        let data = small_set();
        let a = EmbeddedClassifier::train(&data, &small_opts()).unwrap();
        let b = EmbeddedClassifier::train(&data, &small_opts()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let c = EmbeddedClassifier::train(
            &data,
            &TrainOptions {
                seed: 7,
                ..small_opts()
            },
        )
        .unwrap();
        // A different seed changes the SGD order, hence the weights.
        assert_ne!(a.to_bytes(), c.to_bytes());
    }

    #[test]
    fn tiny_custom_labels_learn_their_utterances() {
        let mut data = Vec::new();
        let sets = [
            (
                "billing",
                &[
                    "I was charged twice on my invoice",
                    "refund my last payment please",
                    "why is my credit card bill so high",
                    "update the billing address on my account",
                    "cancel my subscription charge",
                ][..],
            ),
            (
                "outage",
                &[
                    "the service is down again",
                    "your api returns 503 errors",
                    "site not loading for me",
                    "is there an outage right now",
                    "the dashboard keeps timing out",
                ][..],
            ),
            (
                "sales",
                &[
                    "I want a quote for the enterprise plan",
                    "can I talk to someone about pricing for 500 seats",
                    "do you offer volume discounts",
                    "book a demo with your sales team",
                    "what does the premium tier cost",
                ][..],
            ),
        ];
        for (label, texts) in sets {
            for t in texts {
                data.push(ex(t, label));
            }
        }
        // Default options, as the gateway would use for labels from its config file.
        let m = EmbeddedClassifier::train(&data, &TrainOptions::default()).unwrap();
        assert_eq!(m.labels(), ["billing", "outage", "sales"]);
        for e in &data {
            let p = m.classify(&e.text);
            assert_eq!(m.label_name(p.label), Some(e.label.as_str()), "{}", e.text);
            assert!(p.confidence > 1.0 / 3.0);
        }
        let p = m.classify("I got charged twice, please refund");
        assert_eq!(m.label_name(p.label), Some("billing"));
        let p = m.classify("the api is down and returns errors");
        assert_eq!(m.label_name(p.label), Some("outage"));
    }

    #[test]
    fn small_model_separates_classes() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        for (text, want) in [
            ("write a python function to merge two lists", "code"),
            ("what is 15 times 4 plus 2", "math"),
            ("hello, thanks a lot", "chat"),
        ] {
            let p = m.classify(text);
            assert_eq!(m.label_name(p.label), Some(want), "{text}");
        }
    }

    #[test]
    fn explicit_label_order_is_kept() {
        let opts = TrainOptions {
            labels: vec!["math".into(), "chat".into(), "code".into()],
            ..small_opts()
        };
        let m = EmbeddedClassifier::train(&small_set(), &opts).unwrap();
        assert_eq!(m.labels(), ["math", "chat", "code"]);
        assert_eq!(m.label_index("code"), Some(2));
        assert_eq!(m.label_index("nope"), None);
    }

    #[test]
    fn bad_training_input_is_an_error() {
        let opts = small_opts();
        assert!(EmbeddedClassifier::train(&[], &opts).is_err());
        let one_label = vec![ex("a", "x"), ex("b", "x")];
        assert!(EmbeddedClassifier::train(&one_label, &opts).is_err());
        let unknown = TrainOptions {
            labels: vec!["code".into(), "math".into()],
            ..small_opts()
        };
        assert!(EmbeddedClassifier::train(&small_set(), &unknown).is_err());
        for bad in [
            TrainOptions {
                learning_rate: f32::NAN,
                ..small_opts()
            },
            TrainOptions {
                epochs: 0,
                ..small_opts()
            },
            TrainOptions {
                features: FeatureConfig {
                    hash_bits: 40,
                    ..FeatureConfig::default()
                },
                ..small_opts()
            },
            TrainOptions {
                features: FeatureConfig {
                    char_ngram_min: 5,
                    char_ngram_max: 3,
                    ..FeatureConfig::default()
                },
                ..small_opts()
            },
        ] {
            assert!(matches!(
                EmbeddedClassifier::train(&small_set(), &bad),
                Err(ClassifierError::InvalidOptions(_))
            ));
        }
    }

    #[test]
    fn corrupt_bytes_are_errors() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        let bytes = m.to_bytes();
        assert!(EmbeddedClassifier::from_bytes(&[]).is_err());
        assert!(EmbeddedClassifier::from_bytes(b"not a model at all").is_err());
        assert!(EmbeddedClassifier::from_bytes(MAGIC).is_err());
        for cut in [
            9,
            10,
            20,
            40,
            bytes.len() / 2,
            bytes.len() - 9,
            bytes.len() - 1,
        ] {
            assert!(
                EmbeddedClassifier::from_bytes(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
        for pos in [8, 12, 30, bytes.len() / 2, bytes.len() - 3] {
            let mut b = bytes.clone();
            b[pos] ^= 0x5a;
            assert!(EmbeddedClassifier::from_bytes(&b).is_err(), "flip {pos}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(EmbeddedClassifier::from_bytes(&longer).is_err());
    }

    #[test]
    fn corrupt_fields_with_valid_checksum_are_errors() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        let bytes = m.to_bytes();
        // Re-seal after patching so the field checks, not the checksum, must catch it.
        let reseal = |patch: &dyn Fn(&mut Vec<u8>)| {
            let mut body = bytes[..bytes.len() - 8].to_vec();
            patch(&mut body);
            let sum = checksum(&body);
            body.extend_from_slice(&sum.to_le_bytes());
            EmbeddedClassifier::from_bytes(&body)
        };
        assert!(reseal(&|_| {}).is_ok());
        assert!(reseal(&|b| b[8] = 99).is_err()); // version
        assert!(reseal(&|b| b[10] = 60).is_err()); // hash bits
        assert!(reseal(&|b| b[12] = 200).is_err()); // n-gram max
        assert!(reseal(&|b| b[17] = 0xff).is_err()); // flags
        assert!(reseal(&|b| b.truncate(b.len() - 1)).is_err());
    }

    #[test]
    fn odd_text_never_panics() {
        let m = EmbeddedClassifier::train(&small_set(), &small_opts()).unwrap();
        for t in tricky_texts() {
            let p = m.classify(&t);
            assert_eq!(p.scores.len(), 3);
            assert!(p.label < 3);
            let sum: f32 = p.scores.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "{sum}");
            assert!(p.scores.iter().all(|s| s.is_finite() && *s >= 0.0));
            assert_eq!(p.confidence, p.scores[p.label]);
        }
        // Training on odd text works too.
        let mut data = small_set();
        data.extend(tricky_texts().into_iter().map(|t| ex(&t, "chat")));
        assert!(EmbeddedClassifier::train(&data, &small_opts()).is_ok());
    }

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
        let cfg = FeatureConfig::default();
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
    fn parse_jsonl_reports_line_numbers() {
        let good = "{\"text\":\"hi\",\"label\":\"chat\",\"extra\":1}\n\n{\"text\":\"x\",\"label\":\"code\",\"source\":\"conala\"}\n";
        let v = parse_jsonl(good).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].source, None);
        assert_eq!(v[1].source.as_deref(), Some("conala"));
        let bad = "{\"text\":\"hi\",\"label\":\"chat\"}\n{\"text\":\"oops\"}\n";
        match parse_jsonl(bad) {
            Err(ClassifierError::BadLine { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected BadLine, got {other:?}"),
        }
        let empty_label = "\n\n{\"text\":\"hi\",\"label\":\" \"}\n";
        assert!(matches!(
            parse_jsonl(empty_label),
            Err(ClassifierError::BadLine { line: 3, .. })
        ));
        assert!(load_jsonl(Path::new("/nonexistent/triage/data.jsonl")).is_err());
    }

    #[test]
    fn train_from_jsonl_writes_a_loadable_model() {
        let dir = std::env::temp_dir().join(format!("triage-classify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("train.jsonl");
        let out = dir.join("model.bin");
        let lines: Vec<String> = small_set()
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect();
        std::fs::write(&data, lines.join("\n")).unwrap();
        let m = train_from_jsonl(&data, &out, &small_opts()).unwrap();
        assert_eq!(EmbeddedClassifier::load(&out).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_model_loads_and_routes_obvious_prompts() {
        let m = EmbeddedClassifier::default_model().unwrap();
        for l in [
            "chat",
            "code",
            "extraction",
            "knowledge",
            "math",
            "reasoning",
            "writing",
        ] {
            assert!(m.label_index(l).is_some(), "{l}");
        }
        for (text, want) in [
            ("hi there! how are you today?", "chat"),
            ("How do I reverse a list in Python?", "code"),
            ("Solve for x: 3x + 7 = 22", "math"),
            ("Write a short poem about autumn leaves.", "writing"),
        ] {
            let p = m.classify(text);
            assert_eq!(m.label_name(p.label), Some(want), "{text}");
        }
    }
}
