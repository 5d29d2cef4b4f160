//! Probability calibration: one softmax temperature fitted by minimising the negative
//! log-likelihood on held-out predictions, and the expected calibration error that
//! checks the result.

use super::embedded::inference::prediction_from_logits;

/// Temperatures searched (log-spaced, golden-section on log T).
const T_MIN: f64 = 0.05;
const T_MAX: f64 = 20.0;

/// Mean negative log-likelihood of the true labels at temperature `t`.
pub fn nll(logits: &[Vec<f32>], truth: &[usize], t: f32) -> f64 {
    let mut buf = Vec::new();
    let mut sum = 0.0;
    for (l, &y) in logits.iter().zip(truth) {
        buf.clear();
        buf.extend_from_slice(l);
        prediction_from_logits(&mut buf, t);
        let p = f64::from(buf.get(y).copied().unwrap_or(0.0));
        sum -= p.max(1e-12).ln();
    }
    sum / logits.len().max(1) as f64
}

/// The temperature minimising [`nll`]; 1.0 when there is nothing to fit on.
pub fn fit_temperature(logits: &[Vec<f32>], truth: &[usize]) -> f32 {
    if logits.is_empty() {
        return 1.0;
    }
    // NLL is unimodal in log T for a fixed set of logits.
    let f = |x: f64| nll(logits, truth, x.exp() as f32);
    let (mut a, mut b) = (T_MIN.ln(), T_MAX.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - g * (b - a);
    let mut d = a + g * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..40 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp() as f32
}

/// Expected calibration error of top-label confidences: the support-weighted mean gap
/// between confidence and accuracy over `bins` equal-width confidence bins.
pub fn expected_calibration_error(confidence: &[f32], correct: &[bool], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut n = vec![0usize; bins];
    let mut conf_sum = vec![0f64; bins];
    let mut hits = vec![0usize; bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        let b = ((f64::from(c) * bins as f64) as usize).min(bins - 1);
        n[b] += 1;
        conf_sum[b] += f64::from(c);
        hits[b] += usize::from(ok);
    }
    let total: usize = n.iter().sum();
    if total == 0 {
        return 0.0;
    }
    (0..bins)
        .filter(|&b| n[b] > 0)
        .map(|b| {
            let gap = (conf_sum[b] - hits[b] as f64).abs() / n[b] as f64;
            gap * n[b] as f64 / total as f64
        })
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::classify::embedded::SplitMix64;

    #[test]
    fn ece_of_perfect_and_overconfident_predictions() {
        // 80% confident and right 80% of the time: calibrated.
        let conf = vec![0.8f32; 10];
        let correct: Vec<bool> = (0..10).map(|i| i < 8).collect();
        assert!(expected_calibration_error(&conf, &correct, 10) < 1e-6);
        // 99% confident, right half the time: off by 0.49.
        let conf = vec![0.99f32; 10];
        let correct: Vec<bool> = (0..10).map(|i| i < 5).collect();
        let e = expected_calibration_error(&conf, &correct, 15);
        assert!((e - 0.49).abs() < 1e-6, "{e}");
        assert_eq!(expected_calibration_error(&[], &[], 15), 0.0);
    }

    /// Logits drawn from a known 3-class model, then scaled: the fitted temperature
    /// must undo the scaling and bring the ECE down.
    #[test]
    fn temperature_undoes_overconfidence() {
        let mut rng = SplitMix64::new(9);
        let mut uniform = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (mut logits, mut truth) = (Vec::new(), Vec::new());
        for _ in 0..4000 {
            let l: Vec<f32> = (0..3).map(|_| (uniform() * 3.0) as f32).collect();
            let mut p = l.clone();
            prediction_from_logits(&mut p, 1.0);
            // Sample the label from the true probabilities.
            let u = uniform() as f32;
            let y = if u < p[0] {
                0
            } else if u < p[0] + p[1] {
                1
            } else {
                2
            };
            // The "model" is 4x overconfident.
            logits.push(l.iter().map(|x| x * 4.0).collect::<Vec<f32>>());
            truth.push(y);
        }
        let t = fit_temperature(&logits, &truth);
        assert!((3.3..4.8).contains(&t), "{t}");
        assert!(nll(&logits, &truth, t) < nll(&logits, &truth, 1.0));
        let ece_at = |t: f32| {
            let (mut conf, mut ok) = (Vec::new(), Vec::new());
            for (l, &y) in logits.iter().zip(&truth) {
                let mut p = l.clone();
                prediction_from_logits(&mut p, t);
                let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
                conf.push(p[best]);
                ok.push(best == y);
            }
            expected_calibration_error(&conf, &ok, 15)
        };
        assert!(ece_at(t) < 0.03, "{}", ece_at(t));
        assert!(ece_at(1.0) > 0.1, "{}", ece_at(1.0));
        assert_eq!(fit_temperature(&[], &[]), 1.0);
    }
}
