//! Embedded request classifier: hashed word and character n-gram features fed to a
//! multinomial logistic regression, small enough to ship inside the binary and fast
//! enough to run on every request (a few microseconds per prompt).
//!
//! - `features`: text normalisation and feature hashing (shared by training and inference);
//! - `inference`: scoring a prompt against the quantized weights, temperature, softmax;
//! - `train`: AdaGrad training with class- and source-balanced weights, quantization;
//! - `format`: the model file (versioned, checksummed).

use serde::{Deserialize, Serialize};
use std::path::Path;

/// Most labels a model may have (keeps per-request scoring on the stack).
pub const MAX_LABELS: usize = 64;
const MAX_LABEL_BYTES: usize = 256;

mod features;
mod format;
pub(crate) mod inference;
mod train;

pub use features::FeatureConfig;
pub(crate) use train::SplitMix64;
pub use train::{TrainOptions, TrainSet};

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
    /// Logits are divided by this before softmax; fitted on held-out sources so that
    /// `confidence` reads as a probability (1.0 = uncalibrated).
    temperature: f32,
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
    pub(super) fn from_rows(k: usize, flat: impl ExactSizeIterator<Item = i8>) -> Self {
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
    pub(super) fn write(&self, k: usize, out: &mut Vec<u8>) {
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
    pub(super) fn len(&self, k: usize) -> usize {
        match self {
            Weights::Narrow(rows) => rows.len() * k,
            Weights::Wide(w) => w.len(),
        }
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

impl EmbeddedClassifier {
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
        Self::from_bytes(include_bytes!("../../../models/classifier.bin"))
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod test_support {
    use super::*;

    pub(crate) fn ex(text: &str, label: &str) -> Example {
        Example {
            text: text.to_owned(),
            label: label.to_owned(),
            source: None,
        }
    }

    /// A small three-label set with clearly separable vocabulary.
    pub(crate) fn small_set() -> Vec<Example> {
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

    pub(crate) fn small_opts() -> TrainOptions {
        TrainOptions {
            features: FeatureConfig {
                hash_bits: 14,
                ..FeatureConfig::default()
            },
            ..TrainOptions::default()
        }
    }

    pub(crate) fn tricky_texts() -> Vec<String> {
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::test_support::*;

    #[test]
    fn send_sync() {
        fn assert<T: Send + Sync>() {}
        assert::<EmbeddedClassifier>();
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
        // Shipped calibrated: confidence below 1 even on the plainest prompts.
        assert!((m.temperature() - 1.84).abs() < 0.01, "{}", m.temperature());
        for (text, want) in [
            ("hi there! how are you today?", "chat"),
            ("How do I reverse a list in Python?", "code"),
            ("Solve for x: 3x + 7 = 22", "math"),
            ("Write a short poem about autumn leaves.", "writing"),
            ("What is the capital of Australia?", "knowledge"),
        ] {
            let p = m.classify(text);
            assert_eq!(m.label_name(p.label), Some(want), "{text}");
            assert!(
                p.confidence > 0.5 && p.confidence < 1.0,
                "{text}: {}",
                p.confidence
            );
        }
    }
}
