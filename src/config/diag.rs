//! Config problems and where they are. Every problem carries its key path
//! (`store.bogus_key`); when the file is at hand it is also shown as
//! `file:line:column` with the offending line and a caret under the spot.

use std::fmt::Write as _;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// One problem: the key path it is about and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
    /// Byte range in the source, when known; otherwise looked up from `path`.
    pub span: Option<Range<usize>>,
}

impl Problem {
    /// `key.path: message`, the stable one-line form.
    pub fn line(&self) -> String {
        if self.path.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.path, self.message)
        }
    }
}

/// The one collector every section's validation (and parsing) writes into.
#[derive(Debug, Default)]
pub struct Collector {
    pub problems: Vec<Problem>,
    pub warnings: Vec<Problem>,
}

impl Collector {
    pub fn err(&mut self, path: impl AsRef<str>, msg: impl AsRef<str>) {
        self.problems.push(Problem {
            path: path.as_ref().to_string(),
            message: msg.as_ref().to_string(),
            span: None,
        });
    }

    pub fn warn(&mut self, path: impl AsRef<str>, msg: impl AsRef<str>) {
        self.warnings.push(Problem {
            path: path.as_ref().to_string(),
            message: msg.as_ref().to_string(),
            span: None,
        });
    }

    /// Takes `path: message` lines from sections that validate themselves
    /// (`vote`, `cascade`, `guard`), so they are located and rendered like the rest.
    pub fn absorb(&mut self, lines: Vec<String>) {
        for l in lines {
            let (path, msg) = l.split_once(": ").unwrap_or(("", l.as_str()));
            self.err(path, msg);
        }
    }

    pub fn has_errors(&self) -> bool {
        !self.problems.is_empty()
    }
}

/// All problems found in a config file. `errors` holds the stable
/// `key.path: message` lines; `Display` shows them located, one per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .rendered.join("\n"))]
pub struct ConfigErrors {
    pub errors: Vec<String>,
    pub rendered: Vec<String>,
}

impl ConfigErrors {
    pub(crate) fn one(msg: impl Into<String>) -> Self {
        let msg = msg.into();
        Self {
            errors: vec![msg.clone()],
            rendered: vec![msg],
        }
    }

    pub(crate) fn from_problems(problems: &[Problem], src: &Source<'_>) -> Self {
        Self {
            errors: problems.iter().map(Problem::line).collect(),
            rendered: problems.iter().map(|p| src.render(p)).collect(),
        }
    }
}

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

pub(crate) fn format_path(segs: &[Seg]) -> String {
    let mut out = String::new();
    for s in segs {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// `routers.auto.rules[2].tier` back into steps (names with dots are not found; fine).
fn parse_path(path: &str) -> Vec<Seg> {
    let mut segs = Vec::new();
    for part in path.split('.') {
        let (name, mut rest) = part.split_once('[').map_or((part, ""), |(n, r)| (n, r));
        if !name.is_empty() {
            segs.push(Seg::Key(name.to_string()));
        }
        while let Some((idx, after)) = rest.split_once(']') {
            if let Ok(i) = idx.parse() {
                segs.push(Seg::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    segs
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The most specific key or value whose span contains `span`: its path and size.
/// Spans of `[table]` headers cover only the header, so every node is visited.
pub(crate) fn locate(table: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<Seg>> {
    fn walk(
        t: &DeTable<'_>,
        span: &Range<usize>,
        prefix: &mut Vec<Seg>,
        best: &mut Option<(usize, Vec<Seg>)>,
    ) {
        for (k, v) in t.iter() {
            prefix.push(Seg::Key(k.get_ref().to_string()));
            visit(v, Some(k.span()), span, prefix, best);
            prefix.pop();
        }
    }
    fn visit(
        v: &Spanned<DeValue<'_>>,
        key_span: Option<Range<usize>>,
        span: &Range<usize>,
        prefix: &mut Vec<Seg>,
        best: &mut Option<(usize, Vec<Seg>)>,
    ) {
        for s in key_span.into_iter().chain(std::iter::once(v.span())) {
            let size = s.end - s.start;
            if contains(&s, span) && best.as_ref().is_none_or(|(b, _)| size <= *b) {
                *best = Some((size, prefix.clone()));
            }
        }
        match v.get_ref() {
            DeValue::Table(t) => walk(t, span, prefix, best),
            DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    prefix.push(Seg::Index(i));
                    visit(e, None, span, prefix, best);
                    prefix.pop();
                }
            }
            _ => {}
        }
    }
    let mut best = None;
    walk(table, span, &mut Vec::new(), &mut best);
    best.map(|(_, p)| p)
}

/// The span of the key (or array element) a path names.
fn span_of(table: &DeTable<'_>, segs: &[Seg]) -> Option<Range<usize>> {
    let (first, rest) = segs.split_first()?;
    let Seg::Key(k) = first else { return None };
    let (key, val) = table.get_key_value(k.as_str())?;
    let mut span = key.span();
    let mut cur = val;
    for s in rest {
        match (s, cur.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => {
                let (key, val) = t.get_key_value(k.as_str())?;
                span = key.span();
                cur = val;
            }
            (Seg::Index(i), DeValue::Array(a)) => {
                cur = a.get(*i)?;
                span = cur.span();
            }
            _ => break,
        }
    }
    Some(span)
}

/// Removes what `segs` names, so deserialization can go on past it.
pub(crate) fn remove(table: &mut DeTable<'_>, segs: &[Seg]) -> bool {
    match segs {
        [Seg::Key(k)] => table.remove(k.as_str()).is_some(),
        [Seg::Key(k), rest @ ..] => {
            let Some((_, v)) = table.iter_mut().find(|(key, _)| key.get_ref() == k) else {
                return false;
            };
            remove_in(v.get_mut(), rest)
        }
        _ => false,
    }
}

fn remove_in(v: &mut DeValue<'_>, segs: &[Seg]) -> bool {
    match (v, segs) {
        (DeValue::Table(t), _) => remove(t, segs),
        (DeValue::Array(a), [Seg::Index(i)]) if *i < a.len() => {
            // DeArray is a slice underneath: rebuild it without element `i`.
            let kept: toml::de::DeArray<'_> = a
                .iter()
                .enumerate()
                .filter(|(j, _)| j != i)
                .map(|(_, e)| e.clone())
                .collect();
            *a = kept;
            true
        }
        (DeValue::Array(a), [Seg::Index(i), rest @ ..]) => match a.get_mut(*i) {
            Some(e) => remove_in(e.get_mut(), rest),
            None => false,
        },
        _ => false,
    }
}

/// The text of a config and, when it parsed, its spanned tree.
pub(crate) struct Source<'a> {
    /// How the file is named in messages (`config/triage.toml`); `None` for in-memory text.
    pub origin: Option<String>,
    pub text: &'a str,
    pub tree: Option<DeTable<'a>>,
}

impl Source<'_> {
    /// The `[table]` or `[[array]]` header in effect at `offset`, as a path.
    pub fn header_before(&self, offset: usize) -> String {
        // Up to the end of the line holding `offset`: that line may be the header.
        let end = self
            .text
            .get(offset..)
            .and_then(|t| t.find('\n'))
            .map_or(self.text.len(), |i| offset + i);
        let upto = self.text.get(..end).unwrap_or(self.text);
        upto.lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| {
                let inner = l.trim_start_matches('[');
                let inner = inner.split(']').next().unwrap_or("");
                inner
                    .split('.')
                    .map(|p| p.trim().trim_matches('"'))
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .unwrap_or_default()
    }

    fn locate_span(&self, p: &Problem) -> Option<Range<usize>> {
        if let Some(s) = &p.span {
            return Some(s.clone());
        }
        span_of(self.tree.as_ref()?, &parse_path(&p.path))
    }

    /// `file:line:col: path: message`, then the line and a caret.
    pub fn render(&self, p: &Problem) -> String {
        let Some(span) = self.locate_span(p) else {
            return p.line();
        };
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        let line_no = self.text[..start].matches('\n').count() + 1;
        let line = self.text[line_start..line_end].trim_end_matches('\r');
        let col = self.text[line_start..start].chars().count() + 1;
        let width = self
            .text
            .get(start..span.end.min(line_end).max(start))
            .map_or(1, |s| s.chars().count().max(1));
        let place = match &self.origin {
            Some(o) => format!("{o}:{line_no}:{col}"),
            None => format!("line {line_no}, column {col}"),
        };
        let gutter = " ".repeat(line_no.to_string().len());
        format!(
            "{place}: {}\n{gutter} |\n{line_no} | {line}\n{gutter} | {}{}",
            p.line(),
            " ".repeat(col - 1),
            "^".repeat(width)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        let segs = parse_path("routers.auto.rules[2].when.label");
        assert_eq!(format_path(&segs), "routers.auto.rules[2].when.label");
        assert_eq!(segs[2], Seg::Key("rules".into()));
        assert_eq!(segs[3], Seg::Index(2));
    }
}
