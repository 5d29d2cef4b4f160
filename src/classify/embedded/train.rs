//! Training: AdaGrad SGD on a multinomial logistic regression over hashed features,
//! then per-label i8 quantization.

use std::collections::HashMap;

use super::features::{extract, feature_values, Collect, FeatureConfig, CHAR_FLAG};
use super::inference::softmax_in_place;
use super::{validate_label, ClassifierError, EmbeddedClassifier, Example, Weights, MAX_LABELS};

/// Largest weight table (buckets x labels) training will allocate.
const MAX_TRAIN_WEIGHTS: usize = 1 << 25;

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
    /// Within a label, each source's rows are weighted by (rows of that source)^-power, so
    /// one big dataset does not define the label: 0 = off, 1 = every source counts equally.
    /// Rows without a source form one group per label.
    pub source_weight_power: f32,
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
            source_weight_power: 0.0,
            min_updates: 3000,
            average: true,
            features: FeatureConfig::default(),
            labels: Vec::new(),
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

impl TrainOptions {
    /// Sets one option from `key=value` text (the `--set` flag of `classifier train/eval`),
    /// so experiments need no rebuild.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ClassifierError> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, ClassifierError> {
            v.parse()
                .map_err(|_| ClassifierError::InvalidOptions(format!("{key}: bad value {v:?}")))
        }
        let f = &mut self.features;
        match key {
            "epochs" => self.epochs = num(key, value)?,
            "learning_rate" => self.learning_rate = num(key, value)?,
            "l2" => self.l2 = num(key, value)?,
            "seed" => self.seed = num(key, value)?,
            "class_weight_power" => self.class_weight_power = num(key, value)?,
            "source_weight_power" => self.source_weight_power = num(key, value)?,
            "average" => self.average = num(key, value)?,
            "hash_bits" => f.hash_bits = num(key, value)?,
            "char_ngram_min" => f.char_ngram_min = num(key, value)?,
            "char_ngram_max" => f.char_ngram_max = num(key, value)?,
            "char_weight" => f.char_weight = num(key, value)?,
            "word_unigrams" => f.word_unigrams = num(key, value)?,
            "word_bigrams" => f.word_bigrams = num(key, value)?,
            "length_feature" => f.length_feature = num(key, value)?,
            "edge_bytes" => f.edge_bytes = num(key, value)?,
            "normalize" => f.normalize = num(key, value)?,
            "shape_features" => f.shape_features = num(key, value)?,
            _ => {
                return Err(ClassifierError::InvalidOptions(format!(
                    "unknown option {key:?}"
                )))
            }
        }
        self.validate()
    }

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
        if !(self.source_weight_power.is_finite()
            && (0.0..=1.0).contains(&self.source_weight_power))
        {
            return bad(format!(
                "source_weight_power {} not in 0..=1",
                self.source_weight_power
            ));
        }
        if self.epochs == 0 || self.epochs > 1000 {
            return bad(format!("epochs {} not in 1..=1000", self.epochs));
        }
        Ok(())
    }
}

/// Labelled examples ready for training: label indices, source groups and the hashed
/// features of every row, extracted once so cross-validation folds reuse them.
pub struct TrainSet {
    labels: Vec<String>,
    features: FeatureConfig,
    ys: Vec<usize>,
    /// Group id per row: rows share an id when they share label and source.
    groups: Vec<usize>,
    /// Source name per group id.
    group_sources: Vec<Option<String>>,
    /// Row `i`'s buckets are `buckets[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<usize>,
    buckets: Vec<u32>,
    /// (word value, char value) per row.
    values: Vec<(f32, f32)>,
}

impl TrainSet {
    /// Validates the examples against `opts` and extracts their features.
    pub fn new(examples: &[Example], opts: &TrainOptions) -> Result<Self, ClassifierError> {
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
        let index: HashMap<&str, usize> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.as_str(), i))
            .collect();
        if index.len() != labels.len() {
            return Err(ClassifierError::InvalidData("duplicate label names".into()));
        }
        let k = labels.len();
        // Training keeps three f32 tables of this size; refuse sizes that would exhaust memory.
        if (1usize << opts.features.hash_bits).saturating_mul(k) > MAX_TRAIN_WEIGHTS {
            return Err(ClassifierError::InvalidOptions(format!(
                "2^{} buckets x {k} labels exceeds {MAX_TRAIN_WEIGHTS} weights",
                opts.features.hash_bits
            )));
        }
        let cfg = opts.features;
        let mut ys = Vec::with_capacity(examples.len());
        let mut groups = Vec::with_capacity(examples.len());
        let mut group_ids: HashMap<(usize, Option<&str>), usize> = HashMap::new();
        let mut group_sources = Vec::new();
        let mut offsets = Vec::with_capacity(examples.len() + 1);
        let mut buckets = Vec::new();
        let mut values = Vec::with_capacity(examples.len());
        offsets.push(0);
        for (i, e) in examples.iter().enumerate() {
            let Some(&y) = index.get(e.label.as_str()) else {
                return Err(ClassifierError::InvalidData(format!(
                    "example {} has unknown label {:?}",
                    i + 1,
                    e.label
                )));
            };
            ys.push(y);
            let next = group_ids.len();
            let g = *group_ids.entry((y, e.source.as_deref())).or_insert(next);
            if g == next {
                group_sources.push(e.source.clone());
            }
            groups.push(g);
            let start = buckets.len();
            extract(&cfg, &e.text, Collect(&mut buckets));
            let n_char = buckets[start..]
                .iter()
                .filter(|&&b| b & CHAR_FLAG != 0)
                .count();
            values.push(feature_values(&cfg, buckets.len() - start - n_char, n_char));
            offsets.push(buckets.len());
        }
        Ok(Self {
            labels,
            features: cfg,
            ys,
            groups,
            group_sources,
            offsets,
            buckets,
            values,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ys.len()
    }

    /// True when there are no rows (never, after a successful [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.ys.is_empty()
    }

    /// Label names in model order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Label index of row `i`.
    pub fn label_of(&self, i: usize) -> usize {
        self.ys[i]
    }

    /// Per-row weights on the rows given: source-balanced within each label, then
    /// class-balanced, normalised to mean 1.
    fn row_weights(&self, rows: &[usize], opts: &TrainOptions) -> Vec<f32> {
        let k = self.labels.len();
        let mut class_n = vec![0f64; k];
        let mut group_n = vec![0f64; self.group_sources.len()];
        for &i in rows {
            class_n[self.ys[i]] += 1.0;
            group_n[self.groups[i]] += 1.0;
        }
        let sp = f64::from(opts.source_weight_power);
        // Rescale so each label keeps its row count as total weight after source weighting.
        let mut class_mass = vec![0f64; k];
        for &i in rows {
            class_mass[self.ys[i]] += group_n[self.groups[i]].powf(-sp);
        }
        let n = rows.len() as f64;
        let present = class_n.iter().filter(|&&c| c > 0.0).count().max(1) as f64;
        let mut w: Vec<f32> = rows
            .iter()
            .map(|&i| {
                let y = self.ys[i];
                let src = group_n[self.groups[i]].powf(-sp) * class_n[y] / class_mass[y];
                let cls = (n / (present * class_n[y])).powf(f64::from(opts.class_weight_power));
                (src * cls) as f32
            })
            .collect();
        let mean = w.iter().sum::<f32>() / w.len().max(1) as f32;
        if mean > 0.0 {
            w.iter_mut().for_each(|x| *x /= mean);
        }
        w
    }

    /// Trains on the rows given (all rows for the shipped model; the rest of the data
    /// when a source is held out). Deterministic for the same rows and `opts.seed`.
    pub fn train(
        &self,
        rows: &[usize],
        opts: &TrainOptions,
    ) -> Result<EmbeddedClassifier, ClassifierError> {
        if rows.is_empty() {
            return Err(ClassifierError::InvalidData("no examples".into()));
        }
        if opts.features != self.features {
            return Err(ClassifierError::InvalidOptions(
                "feature options differ from the ones the rows were extracted with".into(),
            ));
        }
        let k = self.labels.len();
        let n = rows.len();
        let row_w = self.row_weights(rows, opts);
        let buckets = 1usize << self.features.hash_bits;
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
            for &j in &order {
                let i = rows[j];
                let y = self.ys[i];
                let feats = &self.buckets[self.offsets[i]..self.offsets[i + 1]];
                let (x_word, x_char) = self.values[i];
                probs.copy_from_slice(&bias);
                for &b in feats {
                    let x = if b & CHAR_FLAG != 0 { x_char } else { x_word };
                    let base = (b & !CHAR_FLAG) as usize * k;
                    let row = &w[base..base + k];
                    for (p, &wv) in probs.iter_mut().zip(row) {
                        *p += wv * x;
                    }
                }
                softmax_in_place(&mut probs);
                let cw = row_w[j];
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
                for &b in feats {
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

        let labels = self.labels.clone();
        if avg_n > 0.0 {
            avg_w
                .iter_mut()
                .zip(&w)
                .for_each(|(a, &v)| *a = (*a + v) / (avg_n + 1.0));
            avg_b
                .iter_mut()
                .zip(&bias)
                .for_each(|(a, &v)| *a = (*a + v) / (avg_n + 1.0));
            return Ok(EmbeddedClassifier::quantize(
                labels,
                self.features,
                avg_b,
                &avg_w,
            ));
        }
        Ok(EmbeddedClassifier::quantize(
            labels,
            self.features,
            bias,
            &w,
        ))
    }
}

impl EmbeddedClassifier {
    /// Trains a model; deterministic for a given data order and `opts.seed`.
    pub fn train(examples: &[Example], opts: &TrainOptions) -> Result<Self, ClassifierError> {
        let set = TrainSet::new(examples, opts)?;
        let rows: Vec<usize> = (0..set.len()).collect();
        set.train(&rows, opts)
    }

    /// Converts trained f32 weights to per-label-scaled i8.
    pub(super) fn quantize(
        labels: Vec<String>,
        features: FeatureConfig,
        bias: Vec<f32>,
        w: &[f32],
    ) -> Self {
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
            temperature: 1.0,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::test_support::*;

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
}
