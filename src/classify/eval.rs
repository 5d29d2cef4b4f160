//! Evaluation of the embedded classifier: metrics, confusion matrix, and deterministic
//! train/test splits (stratified by label, or holding out whole `source` groups).

use super::calibrate::{expected_calibration_error, fit_temperature};
use super::embedded::inference::prediction_from_logits;
use super::embedded::{
    ClassifierError, EmbeddedClassifier, Example, SplitMix64, TrainOptions, TrainSet,
};
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

/// One prediction on a labelled example, kept whole so the same run can be re-scored at
/// another temperature.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Index of the example in the evaluated data.
    pub index: usize,
    /// True label index.
    pub truth: usize,
    /// Raw model scores (before temperature and softmax).
    pub logits: Vec<f32>,
    /// Temperature used for this row's probabilities.
    pub temperature: f32,
}

impl Outcome {
    /// (predicted label, its probability) at this row's temperature.
    pub fn predicted(&self) -> (usize, f32) {
        let mut p = self.logits.clone();
        prediction_from_logits(&mut p, self.temperature);
        let mut best = 0;
        for (i, &v) in p.iter().enumerate() {
            if v > p[best] {
                best = i;
            }
        }
        (best, p.get(best).copied().unwrap_or(0.0))
    }
}

/// Classifies every example whose label the model knows (the model's own temperature).
pub fn outcomes(model: &EmbeddedClassifier, examples: &[Example]) -> Vec<Outcome> {
    examples
        .iter()
        .enumerate()
        .filter_map(|(index, e)| {
            Some(Outcome {
                index,
                truth: model.label_index(&e.label)?,
                logits: model.logits(&e.text),
                temperature: model.temperature(),
            })
        })
        .collect()
}

/// The result of holding out every source in turn.
#[derive(Debug, Clone)]
pub struct SourceCv {
    /// Label names (model order).
    pub labels: Vec<String>,
    /// Out-of-source predictions, uncalibrated (temperature 1).
    pub outcomes: Vec<Outcome>,
    /// Temperature fitted on all out-of-source predictions (the one to ship).
    pub temperature: f32,
}

/// Trains once per distinct `source` without it and predicts its rows: every prediction
/// is on a source the model never saw. Examples without a source form one group.
/// `progress(done, total)` is called after each fold.
pub fn source_cv(
    examples: &[Example],
    opts: &TrainOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<SourceCv, ClassifierError> {
    let set = TrainSet::new(examples, opts)?;
    let mut by_source: BTreeMap<Option<&str>, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_source.entry(e.source.as_deref()).or_default().push(i);
    }
    if by_source.len() < 2 {
        return Err(ClassifierError::InvalidData(
            "holding out sources needs at least two distinct `source` values".into(),
        ));
    }
    let total = by_source.len();
    let mut outcomes = Vec::with_capacity(examples.len());
    for (done, held) in by_source.values().enumerate() {
        let rows: Vec<usize> = (0..examples.len())
            .filter(|i| held.binary_search(i).is_err())
            .collect();
        let model = set.train(&rows, opts)?;
        for &i in held {
            outcomes.push(Outcome {
                index: i,
                truth: set.label_of(i),
                logits: model.logits(&examples[i].text),
                temperature: 1.0,
            });
        }
        progress(done + 1, total);
    }
    outcomes.sort_by_key(|o| o.index);
    let (logits, truth): (Vec<Vec<f32>>, Vec<usize>) =
        outcomes.iter().map(|o| (o.logits.clone(), o.truth)).unzip();
    Ok(SourceCv {
        labels: set.labels().to_vec(),
        temperature: fit_temperature(&logits, &truth),
        outcomes,
    })
}

/// Sets each outcome's temperature to one fitted on the *other* sources' outcomes, so
/// the calibration error measured afterwards is on sources the temperature never saw.
pub fn cross_fit_temperatures(outcomes: &mut [Outcome], examples: &[Example]) {
    let source = |o: &Outcome| examples.get(o.index).and_then(|e| e.source.clone());
    let sources: BTreeSet<Option<String>> = outcomes.iter().map(source).collect();
    for s in sources {
        let (logits, truth): (Vec<Vec<f32>>, Vec<usize>) = outcomes
            .iter()
            .filter(|o| source(o) != s)
            .map(|o| (o.logits.clone(), o.truth))
            .unzip();
        let t = fit_temperature(&logits, &truth);
        for o in outcomes.iter_mut().filter(|o| source(o) == s) {
            o.temperature = t;
        }
    }
}

/// Accuracy on one source's rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRow {
    /// Source name (`-` for rows without one).
    pub source: String,
    /// Most common true label.
    pub label: String,
    /// Rows.
    pub n: usize,
    /// Fraction right.
    pub accuracy: f64,
    /// Most common wrong prediction, with its count.
    pub top_error: Option<(String, usize)>,
}

/// Everything `classifier eval` prints about one set of predictions.
#[derive(Debug, Clone)]
pub struct FullReport {
    /// Label metrics and confusion matrix.
    pub metrics: EvalReport,
    /// Per-source accuracy, sorted by source.
    pub sources: Vec<SourceRow>,
    /// Unweighted mean of the per-source accuracies.
    pub mean_source_accuracy: f64,
    /// Expected calibration error (15 bins) at the outcomes' temperatures.
    pub ece: f64,
    /// The most confident wrong predictions: (confidence, example index, true, predicted).
    pub mistakes: Vec<(f32, usize, String, String)>,
    /// Texts of the mistakes, shortened for display.
    pub mistake_texts: Vec<String>,
}

/// Rows, right, count per true label, count per wrong prediction.
type SourceTally = (usize, usize, BTreeMap<usize, usize>, BTreeMap<usize, usize>);

/// Builds the report for `outcomes` on `examples` (rows the outcomes point into).
pub fn full_report(labels: &[String], outcomes: &[Outcome], examples: &[Example]) -> FullReport {
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let mut per_source: BTreeMap<String, SourceTally> = BTreeMap::new();
    let mut conf = Vec::with_capacity(outcomes.len());
    let mut correct = Vec::with_capacity(outcomes.len());
    let mut mistakes = Vec::new();
    for o in outcomes {
        let (p, c) = o.predicted();
        if let Some(cell) = confusion.get_mut(o.truth).and_then(|r| r.get_mut(p)) {
            *cell += 1;
        }
        conf.push(c);
        correct.push(p == o.truth);
        let src = examples
            .get(o.index)
            .and_then(|e| e.source.clone())
            .unwrap_or_else(|| "-".into());
        let row = per_source.entry(src).or_default();
        row.0 += 1;
        *row.2.entry(o.truth).or_default() += 1;
        if p == o.truth {
            row.1 += 1;
        } else {
            *row.3.entry(p).or_default() += 1;
            mistakes.push((c, o.index, o.truth, p));
        }
    }
    let name = |i: usize| labels.get(i).cloned().unwrap_or_else(|| "?".into());
    let sources: Vec<SourceRow> = per_source
        .into_iter()
        .map(|(source, (n, right, truths, wrongs))| SourceRow {
            source,
            label: truths
                .iter()
                .max_by_key(|(_, &c)| c)
                .map(|(&l, _)| name(l))
                .unwrap_or_default(),
            n,
            accuracy: ratio(right, n),
            top_error: wrongs
                .iter()
                .max_by_key(|(_, &c)| c)
                .map(|(&l, &c)| (name(l), c)),
        })
        .collect();
    let mean_source_accuracy = if sources.is_empty() {
        0.0
    } else {
        sources.iter().map(|r| r.accuracy).sum::<f64>() / sources.len() as f64
    };
    mistakes.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    mistakes.truncate(20);
    let mistake_texts = mistakes
        .iter()
        .map(|m| {
            let t = examples.get(m.1).map(|e| e.text.as_str()).unwrap_or("");
            let flat: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
            let mut short: String = flat.chars().take(90).collect();
            if flat.chars().count() > 90 {
                short.push('…');
            }
            short
        })
        .collect();
    FullReport {
        metrics: report_from_confusion(labels.to_vec(), confusion, 0),
        sources,
        mean_source_accuracy,
        ece: expected_calibration_error(&conf, &correct, 15),
        mistakes: mistakes
            .into_iter()
            .map(|(c, i, t, p)| (c, i, name(t), name(p)))
            .collect(),
        mistake_texts,
    }
}

impl fmt::Display for FullReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.metrics)?;
        writeln!(
            f,
            "mean per-source accuracy {:.4} over {} sources; expected calibration error {:.4}",
            self.mean_source_accuracy,
            self.sources.len(),
            self.ece
        )?;
        let src_w = self
            .sources
            .iter()
            .map(|r| r.source.chars().count())
            .max()
            .unwrap_or(6)
            .clamp(6, 48);
        writeln!(f, "per source:")?;
        writeln!(
            f,
            "{:<src_w$}  {:<10}  {:>5}  {:>8}  most common error",
            "source", "label", "n", "accuracy"
        )?;
        for r in &self.sources {
            let err = r
                .top_error
                .as_ref()
                .map(|(l, c)| format!("{l} ({c})"))
                .unwrap_or_default();
            writeln!(
                f,
                "{:<src_w$}  {:<10}  {:>5}  {:>8.3}  {err}",
                truncate(&r.source, src_w),
                r.label,
                r.n,
                r.accuracy
            )?;
        }
        writeln!(f, "most confident mistakes:")?;
        for ((c, _, t, p), text) in self.mistakes.iter().zip(&self.mistake_texts) {
            writeln!(f, "  {c:.3}  {t:>10} -> {p:<10}  {text}")?;
        }
        Ok(())
    }
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

    /// Two labels, each from several sources with their own wording on top of shared
    /// label words, so a model must carry the shared words to an unseen source.
    fn sourced() -> Vec<Example> {
        let mut v = Vec::new();
        for (s, extra) in [("m1", "apples"), ("m2", "trains"), ("m3", "coins")] {
            for i in 0..12 {
                v.push(ex(
                    &format!("compute the sum of {i} {extra} plus {} {extra}", i + 2),
                    "math",
                    Some(s),
                ));
            }
        }
        for (s, extra) in [("c1", "friend"), ("c2", "buddy"), ("c3", "pal")] {
            for i in 0..12 {
                v.push(ex(
                    &format!("hello {extra}, how are you doing today {i}"),
                    "chat",
                    Some(s),
                ));
            }
        }
        v
    }

    #[test]
    fn source_cv_predicts_every_row_from_a_model_without_its_source() {
        let data = sourced();
        let opts = TrainOptions {
            features: crate::classify::embedded::FeatureConfig {
                hash_bits: 12,
                ..Default::default()
            },
            ..TrainOptions::default()
        };
        let mut calls = Vec::new();
        let mut cv = source_cv(&data, &opts, |d, t| calls.push((d, t))).unwrap();
        assert_eq!(calls.last(), Some(&(6, 6)));
        assert_eq!(cv.outcomes.len(), data.len());
        assert!(cv.outcomes.iter().enumerate().all(|(i, o)| o.index == i));
        assert!(cv.temperature > 0.0);
        let report = full_report(&cv.labels, &cv.outcomes, &data);
        assert_eq!(report.sources.len(), 6);
        assert!(report.sources.iter().all(|r| r.n == 12));
        // The shared label words carry over to every held-out source.
        assert!(report.metrics.accuracy > 0.9, "{report}");
        cross_fit_temperatures(&mut cv.outcomes, &data);
        assert!(cv.outcomes.iter().all(|o| o.temperature > 0.0));
        let text = full_report(&cv.labels, &cv.outcomes, &data).to_string();
        assert!(
            text.contains("per source:") && text.contains("m2"),
            "{text}"
        );
        // One source only: nothing to hold out against.
        let one: Vec<Example> = data
            .iter()
            .filter(|e| e.source.as_deref() == Some("m1"))
            .cloned()
            .collect();
        assert!(source_cv(&one, &opts, |_, _| {}).is_err());
    }

    #[test]
    fn report_lists_confident_mistakes_and_per_source_errors() {
        let data = vec![
            ex("a", "x", Some("s1")),
            ex("b", "x", Some("s1")),
            ex("c", "y", Some("s2")),
        ];
        let o = |index, truth, logits: Vec<f32>| Outcome {
            index,
            truth,
            logits,
            temperature: 1.0,
        };
        let outcomes = vec![
            o(0, 0, vec![3.0, 0.0]),
            o(1, 0, vec![0.0, 2.0]), // wrong, p(y) = 0.88
            o(2, 1, vec![4.0, 0.0]), // wrong, p(x) = 0.98
        ];
        let r = full_report(&["x".into(), "y".into()], &outcomes, &data);
        assert_eq!(r.mistakes.len(), 2);
        assert_eq!(r.mistakes[0].1, 2, "most confident first");
        assert_eq!(
            (r.mistakes[0].2.as_str(), r.mistakes[0].3.as_str()),
            ("y", "x")
        );
        assert_eq!(r.sources[0].source, "s1");
        assert!((r.sources[0].accuracy - 0.5).abs() < 1e-12);
        assert_eq!(r.sources[0].top_error, Some(("y".into(), 1)));
        assert!((r.mean_source_accuracy - 0.25).abs() < 1e-12);
        assert_eq!(r.metrics.confusion, vec![vec![1, 1], vec![1, 0]]);
        assert!(r.ece > 0.5);
    }
}
