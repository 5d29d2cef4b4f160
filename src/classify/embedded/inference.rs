//! Inference: sums quantized weight rows for a prompt's features and applies softmax.

use super::features::{extract, feature_values, Sink};
use super::{EmbeddedClassifier, Prediction, Weights, MAX_LABELS};

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

pub(crate) fn softmax_in_place(v: &mut [f32]) {
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

impl EmbeddedClassifier {
    /// Labels a prompt. `confidence` is the calibrated probability of the winning label.
    pub fn classify(&self, text: &str) -> Prediction {
        let mut scores = self.logits(text);
        prediction_from_logits(&mut scores, self.temperature);
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

    /// Raw per-label scores before temperature and softmax (what calibration fits on).
    pub fn logits(&self, text: &str) -> Vec<f32> {
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

    /// The softmax temperature applied to [`Self::logits`].
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Sets the softmax temperature (values that are not finite and > 0 are ignored).
    pub fn set_temperature(&mut self, t: f32) {
        if t.is_finite() && t > 0.0 {
            self.temperature = t;
        }
    }

    /// Turns summed quantized weights into logits.
    fn finish(&self, word: &[i32], chr: &[i32], n_word: usize, n_char: usize) -> Vec<f32> {
        let (x_word, x_char) = feature_values(&self.features, n_word, n_char);
        self.bias
            .iter()
            .zip(&self.scales)
            .zip(word.iter().zip(chr))
            .map(|((&b, &s), (&aw, &ac))| b + s * (aw as f32 * x_word + ac as f32 * x_char))
            .collect()
    }
}

/// Divides logits by the temperature and applies softmax, in place.
pub(crate) fn prediction_from_logits(v: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        let inv = 1.0 / temperature;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    softmax_in_place(v);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::test_support::*;

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
}
