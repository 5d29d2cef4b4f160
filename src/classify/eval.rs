//! Evaluation of the embedded classifier: metrics, confusion matrix, and deterministic
//! train/test splits (stratified by label, or holding out whole `source` groups).

use super::embedded::{EmbeddedClassifier, Example, SplitMix64};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Precision/recall/F1 for one label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMetrics {
    /// Label name.
    pub label: String,
    /// Correct predictions of this label / all predictions of it.
    pub precision: f64,
    /// Correct predictions of this label / all examples of it.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Number of test examples with this label.
    pub support: usize,
}

/// Result of evaluating a model on labelled examples.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// Label names in model order (rows/columns of `confusion`).
    pub labels: Vec<String>,
    /// Examples evaluated (those whose label the model knows).
    pub total: usize,
    /// Examples skipped because the model has no such label.
    pub skipped: usize,
    /// Fraction classified correctly.
    pub accuracy: f64,
    /// Unweighted mean of per-label F1 over labels with support or predictions.
    pub macro_f1: f64,
    /// Metrics per label, in model order.
    pub per_label: Vec<LabelMetrics>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Classifies every example and compares with its label.
pub fn evaluate(model: &EmbeddedClassifier, examples: &[Example]) -> EvalReport {
    let labels = model.labels().to_vec();
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let mut skipped = 0;
    for e in examples {
        let Some(t) = model.label_index(&e.label) else {
            skipped += 1;
            continue;
        };
        let p = model.classify(&e.text).label;
        if let Some(cell) = confusion.get_mut(t).and_then(|row| row.get_mut(p)) {
            *cell += 1;
        }
    }
    report_from_confusion(labels, confusion, skipped)
}

/// Builds metrics from a confusion matrix (`confusion[true][predicted]`).
pub fn report_from_confusion(
    labels: Vec<String>,
    confusion: Vec<Vec<usize>>,
    skipped: usize,
) -> EvalReport {
    let k = labels.len();
    let total: usize = confusion.iter().flatten().sum();
    let correct: usize = (0..k)
        .map(|i| {
            confusion
                .get(i)
                .and_then(|r| r.get(i))
                .copied()
                .unwrap_or(0)
        })
        .sum();
    let mut per_label = Vec::with_capacity(k);
    let mut f1_sum = 0.0;
    let mut f1_n = 0usize;
    for (i, label) in labels.iter().enumerate() {
        let tp = confusion
            .get(i)
            .and_then(|r| r.get(i))
            .copied()
            .unwrap_or(0);
        let support: usize = confusion.get(i).map(|r| r.iter().sum()).unwrap_or(0);
        let predicted: usize = confusion
            .iter()
            .map(|r| r.get(i).copied().unwrap_or(0))
            .sum();
        let precision = ratio(tp, predicted);
        let recall = ratio(tp, support);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        // Labels absent from both truth and predictions would drag macro-F1 down for nothing.
        if support > 0 || predicted > 0 {
            f1_sum += f1;
            f1_n += 1;
        }
        per_label.push(LabelMetrics {
            label: label.clone(),
            precision,
            recall,
            f1,
            support,
        });
    }
    EvalReport {
        labels,
        total,
        skipped,
        accuracy: ratio(correct, total),
        macro_f1: if f1_n == 0 { 0.0 } else { f1_sum / f1_n as f64 },
        per_label,
        confusion,
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "accuracy {:.4}  macro-F1 {:.4}  ({} examples{})",
            self.accuracy,
            self.macro_f1,
            self.total,
            if self.skipped > 0 {
                format!(", {} skipped: unknown label", self.skipped)
            } else {
                String::new()
            }
        )?;
        let name_w = self
            .labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(5)
            .clamp(5, 24);
        writeln!(
            f,
            "{:<name_w$}  {:>9}  {:>6}  {:>6}  {:>7}",
            "label", "precision", "recall", "f1", "support"
        )?;
        for m in &self.per_label {
            writeln!(
                f,
                "{:<name_w$}  {:>9.4}  {:>6.4}  {:>6.4}  {:>7}",
                truncate(&m.label, name_w),
                m.precision,
                m.recall,
                m.f1,
                m.support
            )?;
        }
        writeln!(
            f,
            "confusion matrix (rows = true label, columns = predicted):"
        )?;
        let col_w = self
            .confusion
            .iter()
            .flatten()
            .map(|v| v.to_string().len())
            .max()
            .unwrap_or(1)
            .max(6);
        write!(f, "{:<name_w$}", "")?;
        for l in &self.labels {
            write!(f, " {:>col_w$}", truncate(l, col_w))?;
        }
        writeln!(f)?;
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            write!(f, "{:<name_w$}", truncate(l, name_w))?;
            for v in row {
                write!(f, " {v:>col_w$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// Number of items out of `n` that go to the test side (at least one when `n >= 2` and
/// the fraction is positive, never all of them).
fn test_count(n: usize, test_fraction: f64) -> usize {
    if n < 2 || test_fraction.is_nan() || test_fraction <= 0.0 {
        return 0;
    }
    let t = (n as f64 * test_fraction.min(1.0)).round() as usize;
    t.clamp(1, n - 1)
}

/// Splits into (train, test) with about `test_fraction` of each label in test.
/// Deterministic for a seed; both halves keep the input order.
pub fn stratified_split(
    examples: &[Example],
    test_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_label.entry(e.label.as_str()).or_default().push(i);
    }
    let mut rng = SplitMix64::new(seed);
    let mut is_test = vec![false; examples.len()];
    for idx in by_label.values_mut() {
        rng.shuffle(idx);
        for &i in idx.iter().take(test_count(idx.len(), test_fraction)) {
            is_test[i] = true;
        }
    }
    partition(examples, &is_test)
}

/// Splits into (train, test) holding out whole `source` groups: for each label, about
/// `test_fraction` of its distinct sources go entirely to test. A label with a single
/// source stays entirely in train. Examples without a source form one group per label.
pub fn source_holdout_split(
    examples: &[Example],
    test_fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let mut sources: BTreeMap<&str, BTreeSet<Option<&str>>> = BTreeMap::new();
    for e in examples {
        sources
            .entry(e.label.as_str())
            .or_default()
            .insert(e.source.as_deref());
    }
    let mut rng = SplitMix64::new(seed);
    let mut held: BTreeSet<(&str, Option<&str>)> = BTreeSet::new();
    for (label, set) in &sources {
        let mut list: Vec<Option<&str>> = set.iter().copied().collect();
        rng.shuffle(&mut list);
        for s in list.iter().take(test_count(list.len(), test_fraction)) {
            held.insert((label, *s));
        }
    }
    let is_test: Vec<bool> = examples
        .iter()
        .map(|e| held.contains(&(e.label.as_str(), e.source.as_deref())))
        .collect();
    partition(examples, &is_test)
}

fn partition(examples: &[Example], is_test: &[bool]) -> (Vec<Example>, Vec<Example>) {
    let mut train = Vec::new();
    let mut test = Vec::new();
    for (e, &t) in examples.iter().zip(is_test) {
        if t {
            test.push(e.clone());
        } else {
            train.push(e.clone());
        }
    }
    (train, test)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::TrainOptions;

    fn ex(text: &str, label: &str, source: Option<&str>) -> Example {
        Example {
            text: text.to_owned(),
            label: label.to_owned(),
            source: source.map(str::to_owned),
        }
    }

    fn dataset() -> Vec<Example> {
        let mut v = Vec::new();
        for i in 0..50 {
            v.push(ex(&format!("a{i}"), "a", Some(&format!("sa{}", i % 5))));
        }
        for i in 0..20 {
            v.push(ex(&format!("b{i}"), "b", Some(&format!("sb{}", i % 10))));
        }
        for i in 0..7 {
            v.push(ex(&format!("c{i}"), "c", Some("only")));
        }
        v
    }

    #[test]
    fn metrics_from_confusion() {
        // true a: 8 right, 2 as b; true b: 1 as a, 4 right.
        let r = report_from_confusion(
            vec!["a".into(), "b".into()],
            vec![vec![8, 2], vec![1, 4]],
            0,
        );
        assert_eq!(r.total, 15);
        assert!((r.accuracy - 12.0 / 15.0).abs() < 1e-12);
        let a = &r.per_label[0];
        assert!((a.precision - 8.0 / 9.0).abs() < 1e-12);
        assert!((a.recall - 0.8).abs() < 1e-12);
        assert_eq!(a.support, 10);
        let b = &r.per_label[1];
        assert!((b.precision - 4.0 / 6.0).abs() < 1e-12);
        assert!((b.recall - 0.8).abs() < 1e-12);
        let f1 = |p: f64, r: f64| 2.0 * p * r / (p + r);
        let want = (f1(8.0 / 9.0, 0.8) + f1(4.0 / 6.0, 0.8)) / 2.0;
        assert!((r.macro_f1 - want).abs() < 1e-12);
        let text = r.to_string();
        assert!(text.contains("accuracy 0.8000"), "{text}");
        assert!(text.contains("confusion matrix"));
    }

    #[test]
    fn empty_report_is_zero_not_nan() {
        let r = report_from_confusion(vec!["a".into(), "b".into()], vec![vec![0; 2]; 2], 3);
        assert_eq!(r.accuracy, 0.0);
        assert_eq!(r.macro_f1, 0.0);
        assert!(r.to_string().contains("3 skipped"));
    }

    #[test]
    fn stratified_split_is_deterministic_and_proportional() {
        let d = dataset();
        let (train, test) = stratified_split(&d, 0.2, 3);
        assert_eq!(train.len() + test.len(), d.len());
        let count = |v: &[Example], l: &str| v.iter().filter(|e| e.label == l).count();
        assert_eq!(count(&test, "a"), 10);
        assert_eq!(count(&test, "b"), 4);
        assert_eq!(count(&test, "c"), 1);
        assert_eq!(stratified_split(&d, 0.2, 3), (train.clone(), test.clone()));
        assert_ne!(stratified_split(&d, 0.2, 4).1, test);
        for e in &test {
            assert!(!train.contains(e));
        }
    }

    #[test]
    fn source_holdout_keeps_groups_whole() {
        let d = dataset();
        let (train, test) = source_holdout_split(&d, 0.2, 1);
        assert_eq!(train.len() + test.len(), d.len());
        let sources = |v: &[Example]| -> BTreeSet<(String, Option<String>)> {
            v.iter()
                .map(|e| (e.label.clone(), e.source.clone()))
                .collect()
        };
        let (tr, te) = (sources(&train), sources(&test));
        assert!(tr.is_disjoint(&te));
        // 20% of 5 sources of a, 20% of 10 sources of b, none of c's single source.
        assert_eq!(te.iter().filter(|(l, _)| l == "a").count(), 1);
        assert_eq!(te.iter().filter(|(l, _)| l == "b").count(), 2);
        assert!(te.iter().all(|(l, _)| l != "c"));
        assert_eq!(source_holdout_split(&d, 0.2, 1), (train, test));
    }

    #[test]
    fn evaluate_counts_predictions() {
        let mut data = Vec::new();
        for i in 0..10 {
            data.push(ex(&format!("the cat sat on mat {i}"), "cats", None));
            data.push(ex(&format!("stock market price rose {i}"), "money", None));
        }
        let opts = TrainOptions::default();
        let m = EmbeddedClassifier::train(&data, &opts).unwrap();
        let mut test = data.clone();
        test.push(ex("unknown", "dogs", None));
        let r = evaluate(&m, &test);
        assert_eq!(r.total, 20);
        assert_eq!(r.skipped, 1);
        assert_eq!(r.accuracy, 1.0);
        assert_eq!(r.confusion, vec![vec![10, 0], vec![0, 10]]);
    }
}
