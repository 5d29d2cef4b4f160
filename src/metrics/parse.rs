//! Minimal Prometheus text-format parser, so tests can assert exact values.

use std::collections::BTreeMap;

/// One sample line of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Series name, including `_bucket`/`_sum`/`_count` suffixes.
    pub name: String,
    /// Label pairs, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Sample value.
    pub value: f64,
}

impl Sample {
    /// Whether this sample has `name` and every `(label, value)` pair in `labels`.
    pub fn matches(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.name == name
            && labels
                .iter()
                .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// Parses Prometheus text format; comments and malformed lines are skipped.
pub fn parse_text(s: &str) -> Vec<Sample> {
    s.lines().filter_map(parse_line).collect()
}

/// Sum of all samples matching `name` and the label subset, or `None` if none match.
pub fn sum_samples(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for s in samples.iter().filter(|s| s.matches(name, labels)) {
        found = true;
        sum += s.value;
    }
    found.then_some(sum)
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, tail) = parse_labels(after)?;
        labels = parsed;
        rest = tail;
    }
    // A timestamp may follow the value; it is ignored.
    let value = parse_value(rest.split_whitespace().next()?)?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns the labels plus the text after `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start();
        if let Some(tail) = s.strip_prefix('}') {
            return Some((labels, tail));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = s[end + 1..].trim_start();
        if let Some(tail) = s.strip_prefix(',') {
            s = tail;
        }
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let text = r#"# HELP x_total help
# TYPE x_total counter
x_total{a="1",b="q\"uo\\te\nnl"} 42
plain 3.5 1700000000000
h_bucket{le="+Inf"} 7
neg -Inf
nan NaN
garbage{a="unterminated 1
{a="1"} 2
"#;
        let s = parse_text(text);
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].labels["a"], "1");
        assert_eq!(s[0].labels["b"], "q\"uo\\te\nnl");
        assert_eq!(s[0].value, 42.0);
        assert_eq!(s[1].name, "plain");
        assert_eq!(s[1].value, 3.5);
        assert!(s[1].labels.is_empty());
        assert_eq!(s[2].labels["le"], "+Inf");
        assert_eq!(s[2].value, 7.0);
        assert_eq!(s[3].value, f64::NEG_INFINITY);
        assert!(s[4].value.is_nan());
    }

    #[test]
    fn sum_samples_matches_label_subsets() {
        let s =
            parse_text("r{k=\"a\",c=\"2xx\"} 2\nr{k=\"a\",c=\"5xx\"} 1\nr{k=\"b\",c=\"2xx\"} 4\n");
        assert_eq!(sum_samples(&s, "r", &[("k", "a")]), Some(3.0));
        assert_eq!(sum_samples(&s, "r", &[]), Some(7.0));
        assert_eq!(sum_samples(&s, "r", &[("k", "z")]), None);
        assert_eq!(sum_samples(&s, "missing", &[]), None);
    }

    #[test]
    fn tolerates_trailing_comma_and_spaces() {
        let s = parse_text("m{ a = \"x\" , } 1\n");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].labels["a"], "x");
    }
}
