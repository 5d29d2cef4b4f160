//! Reading a config: file → TOML tree → `RawConfig` → validated `Config`.
//! Parsing does not stop at the first problem: syntax errors (duplicate keys
//! included) come from toml's recovering parser, and each schema error
//! (unknown key, wrong type, unknown word) is recorded, the offending entry
//! removed from the tree, and deserialization retried.

use super::diag::{format_path, locate, remove, Collector, ConfigErrors, Problem, Seg, Source};
use super::raw::RawConfig;
use super::types::Config;
use super::validate::validate_into;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::de::DeTable;

/// Whether secrets named by `api_key_env` / `key_env` must be in the environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Secrets {
    /// Serving: a missing secret is an error.
    #[default]
    Required,
    /// `triage check` and `triage spend`: they never use a secret, so a missing
    /// one is a warning. Such a config must never serve (keys without their
    /// secret hash to all zeros, which no client key matches).
    Optional,
}

/// Enough schema errors for any real file; stops a pathological one from looping long.
const MAX_SCHEMA_ERRORS: usize = 100;

impl Config {
    /// Reads and validates a config file; secrets must be set.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with(path, Secrets::Required)
    }

    /// Reads and validates a config file.
    pub fn load_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigErrors> {
        let text = read(path)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        parse_source(
            &text,
            &base,
            Some(path.display().to_string()),
            &|k| std::env::var(k).ok(),
            secrets,
        )
    }

    /// Parses and validates TOML text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        parse_source(
            text,
            base_dir,
            None,
            &|k| std::env::var(k).ok(),
            Secrets::Required,
        )
    }

    /// Names users may put in `model`: routers first, then models.
    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.routers
            .keys()
            .chain(self.models.keys())
            .map(String::as_str)
    }
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            let cwd = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "?".into());
            ConfigErrors::one(format!(
                "{}: config file not found (looked for {}; working directory {cwd}); pass --config PATH",
                path.display(),
                abs.display()
            ))
        } else {
            ConfigErrors::one(format!("{}: cannot read: {e}", path.display()))
        }
    })
}

/// Parses, then validates; every problem in one go. `env` is injectable for tests.
pub fn parse_source(
    text: &str,
    base_dir: &Path,
    origin: Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<Config, ConfigErrors> {
    let mut src = Source {
        origin,
        text,
        tree: None,
    };
    let (tree, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let mut problems: Vec<Problem> = Vec::new();
        for e in &syntax {
            let p = syntax_problem(&src, e);
            // A table written twice repeats its keys too; the table is the one problem.
            let repeat = problems.iter().any(|q| {
                q.message.starts_with("table [")
                    && p.path
                        .strip_prefix(q.path.as_str())
                        .is_some_and(|r| r.starts_with('.'))
            });
            if !repeat {
                problems.push(p);
            }
        }
        return Err(ConfigErrors::from_problems(&problems, &src));
    }
    let tree = tree.into_inner();
    let mut c = Collector::default();
    let mut removed = Vec::new();
    let raw = deserialize_all(&tree, &mut c, &mut removed);
    // In file order, whatever order serde met them in.
    c.problems
        .sort_by_key(|p| p.span.as_ref().map_or(usize::MAX, |s| s.start));
    src.tree = Some(tree);
    let Some(raw) = raw else {
        return Err(ConfigErrors::from_problems(&c.problems, &src));
    };
    // Validation still runs on what parsed, so a file with a typo also shows its
    // other problems; but nothing about (or above) an entry that was dropped.
    let schema = c.problems.len();
    let cfg = validate_into(raw, base_dir, env, secrets, &mut c);
    let later = c.problems.split_off(schema);
    c.problems.extend(later.into_iter().filter(|p| {
        p.path.is_empty()
            || !removed.iter().any(|r| {
                under(&p.path, r) || under(r, &p.path) || (r == "auth" && p.path == "keys")
            })
    }));
    if c.has_errors() {
        return Err(ConfigErrors::from_problems(&c.problems, &src));
    }
    let mut cfg = cfg.ok_or_else(|| ConfigErrors::one("config is not valid"))?;
    cfg.warnings = c.warnings.iter().map(Problem::line).collect();
    Ok(cfg)
}

/// `path` is `root` or inside it (`a.b[0]` is inside `a.b`, `a.bc` is not).
fn under(path: &str, root: &str) -> bool {
    path.strip_prefix(root)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// A syntax error: toml's message, plus the key it is about where one can be named.
fn syntax_problem(src: &Source<'_>, e: &toml::de::Error) -> Problem {
    let span = e.span();
    let table = span
        .as_ref()
        .map(|s| src.header_before(s.start))
        .unwrap_or_default();
    let key = span
        .as_ref()
        .and_then(|s| src.text.get(s.clone()))
        .map(|k| k.trim().trim_matches('"'))
        .unwrap_or("");
    let (path, message) = if e.message() == "duplicate key" {
        // Either a key repeated in one table or a `[table]` header written twice.
        let header_line = span
            .as_ref()
            .and_then(|s| src.text[..s.start].rsplit('\n').next())
            .is_some_and(|l| l.trim_start().starts_with('['));
        let path = if header_line || table.is_empty() {
            if header_line {
                table.clone()
            } else {
                key.to_string()
            }
        } else {
            format!("{table}.{key}")
        };
        let message = if header_line {
            format!("table [{path}] is defined twice")
        } else {
            format!("duplicate key `{key}`")
        };
        (path, message)
    } else {
        (table, e.message().to_string())
    };
    Problem {
        path,
        message,
        span,
    }
}

/// Deserializes `RawConfig`, collecting every schema error instead of the first.
/// `removed` gets the path of every entry dropped on the way.
fn deserialize_all(
    tree: &DeTable<'_>,
    c: &mut Collector,
    removed_paths: &mut Vec<String>,
) -> Option<RawConfig> {
    let mut work = tree.clone();
    // Entries removed after a type error: their "missing field" follow-up is noise.
    let mut removed: Vec<Vec<Seg>> = Vec::new();
    for _ in 0..MAX_SCHEMA_ERRORS {
        let de = toml::de::Deserializer::from(toml::Spanned::new(0..0, work.clone()));
        let e = match RawConfig::deserialize(de) {
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let Some(span) = e.span() else {
            c.err("", e.message());
            return None;
        };
        // Located in the working tree (for removal) and the original (for the path shown);
        // spans are shared, so both find the same entry.
        let at = locate(&work, &span).unwrap_or_default();
        let shown = locate(tree, &span).unwrap_or_default();
        let follow_up = e
            .message()
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
            .is_some_and(|field| {
                let mut p = at.clone();
                p.push(Seg::Key(field.to_string()));
                removed.contains(&p)
            });
        if !follow_up {
            c.problems.push(Problem {
                path: format_path(&shown),
                message: e.message().to_string(),
                span: Some(span),
            });
        }
        if at.is_empty() || !remove(&mut work, &at) {
            return None;
        }
        removed_paths.push(format_path(&shown));
        removed.push(at);
    }
    None
}
