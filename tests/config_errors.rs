//! Golden output of `triage check` on broken configs: each
//! `tests/config_errors/NAME.toml` is checked by the real binary and its
//! output compared with `NAME.out` (exit code on the first line).
//! `UPDATE_GOLDEN=1 cargo test --test config_errors` rewrites the `.out` files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// The environment the goldens assume: one empty variable, one unset.
fn check(file: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_triage"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["check", "--config", file])
        .env("TRIAGE_GOLDEN_EMPTY", "")
        .env_remove("TRIAGE_GOLDEN_UNSET")
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run triage: {e}"));
    format!(
        "exit {}\n{}{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn broken_configs_match_their_golden_output() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config_errors");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 7, "goldens missing: {names:?}");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for name in &names {
        let got = check(&format!("tests/config_errors/{name}.toml"));
        let golden = dir.join(format!("{name}.out"));
        if update {
            std::fs::write(&golden, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&golden).unwrap_or_default();
        if got != want {
            failed.push(format!("--- {name}.out (want)\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
