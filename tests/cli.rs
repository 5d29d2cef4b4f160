//! The `triage` binary as operators meet it: error messages, exit codes, the
//! container's command line, and output into pipes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn triage() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_triage"));
    c.env_remove("RUST_LOG").env_remove("TRIAGE_LISTEN");
    c
}

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_missing_config_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let o = triage()
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    let cwd = dir.path().canonicalize().unwrap();
    let want = format!(
        "config/triage.toml: config file not found (looked for {}; working directory {})",
        cwd.join("config/triage.toml").display(),
        cwd.display()
    );
    assert!(out.contains(&want), "{out}");
}

/// Keys and providers whose secrets are not in the environment.
const NO_SECRETS: &str = r#"
[providers.real]
kind = "openai"
base_url = "https://api.example.com/v1"
api_key_env = "TRIAGE_CLI_TEST_UNSET_A"
[models.fast]
provider = "real"
[keys.alpha]
key_env = "TRIAGE_CLI_TEST_UNSET_B"
[store]
kind = "sqlite"
state_dir = "state"
"#;

#[test]
fn spend_needs_no_secrets_and_names_unknown_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.toml"), NO_SECRETS).unwrap();
    let spend = |key: &str| {
        triage()
            .args(["spend", "-c", "t.toml", "--key", key])
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let o = spend("nosuch");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(r#"error: unknown key "nosuch" (keys in t.toml: alpha)"#),
        "{err}"
    );
    // A known key gets as far as the (absent) ledger: the config was accepted.
    let (_, err) = text(&spend("alpha"));
    assert!(!err.contains("environment variable"), "{err}");
    assert!(
        err.contains("ledger.sqlite3") || err.contains("state"),
        "{err}"
    );

    // `serve` does need them, and says which variable is missing.
    let o = triage()
        .args(["serve", "-c", "t.toml", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(
            "providers.real.api_key_env: environment variable TRIAGE_CLI_TEST_UNSET_A is not set"
        ),
        "{err}"
    );
    assert!(
        err.contains("keys.alpha.key_env: environment variable TRIAGE_CLI_TEST_UNSET_B is not set"),
        "{err}"
    );
}

fn jsonl(dir: &Path, rows: &[(&str, &str)]) -> PathBuf {
    let p = dir.join("data.jsonl");
    let body: String = rows
        .iter()
        .map(|(t, l)| format!("{}\n", serde_json::json!({"text": t, "label": l})))
        .collect();
    std::fs::write(&p, body).unwrap();
    p
}

const ROWS: &[(&str, &str)] = &[
    ("Write a Python function that reverses a list", "code"),
    ("What is 17 times 23?", "math"),
    ("Write a haiku about autumn", "writing"),
    ("Fix this Rust borrow checker error", "code"),
];

#[test]
fn source_split_without_sources_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let data = jsonl(dir.path(), ROWS);
    let o = triage()
        .args(["classifier", "eval", "--split", "source", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        err.contains("--split source needs a \"source\" field on the examples; none of the 4"),
        "{err}"
    );
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = jsonl(dir.path(), ROWS);
    let mut child = triage()
        .args(["classifier", "eval", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Like `| head -0`: the reader is gone before the first line is written.
    drop(child.stdout.take());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?} {err}");
}

/// `ENTRYPOINT` + `CMD` of the Dockerfile, as argument lists.
fn docker_command() -> Vec<String> {
    let file = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        !file.contains("sed "),
        "the listen address is set by flag, not by editing the config"
    );
    let json_line = |word: &str| -> Vec<String> {
        let line = file
            .lines()
            .find(|l| l.starts_with(word))
            .unwrap_or_else(|| panic!("no {word} in the Dockerfile"));
        serde_json::from_str(line[word.len()..].trim()).unwrap()
    };
    let mut cmd = json_line("ENTRYPOINT");
    cmd.extend(json_line("CMD"));
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_container_command_line_serves() {
    let cmd = docker_command();
    assert_eq!(cmd[0], "/usr/local/bin/triage");
    let args = &cmd[1..];
    assert_eq!(
        args,
        [
            "serve",
            "--config",
            "/etc/triage/triage.toml",
            "--listen",
            "0.0.0.0:8080"
        ]
    );
    // The flags parse as written.
    let o = triage().args(args).arg("--help").output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));

    // And serve: the image's /etc/triage is the repo's config/, and the address
    // becomes loopback on a free port (tests bind 127.0.0.1 only).
    let port = free_port();
    let state = tempfile::tempdir().unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| match a.as_str() {
            "/etc/triage/triage.toml" => repo("config/triage.toml").display().to_string(),
            "0.0.0.0:8080" => format!("127.0.0.1:{port}"),
            other => other.to_string(),
        })
        .collect();
    let server = Server(
        triage()
            .args(&args)
            .current_dir(state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "gateway did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The key's windows say when they reset in seconds and as a timestamp.
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-triage-demo")
        .json(
            &serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = client
        .get(format!("{base}/v1/triage/keys/self"))
        .bearer_auth("sk-triage-demo")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = v.to_string();
    assert!(!body.contains("\"nanos\""), "{body}");
    assert!(body.contains("\"reset_seconds\""), "{body}");
    let at = body
        .split("\"reset_at\":\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no reset_at in {body}"));
    humantime::parse_rfc3339(at).unwrap();

    // Logs into a pipe carry no colour codes.
    let mut server = server;
    let _ = server.0.kill();
    let _ = server.0.wait();
    let mut logs = String::new();
    server
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("triage listening"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in piped logs: {logs:?}"
    );
}

#[test]
fn the_listen_address_can_come_from_the_environment() {
    let o = triage().args(["serve", "--help"]).output().unwrap();
    let (out, _) = text(&o);
    assert!(out.contains("TRIAGE_LISTEN"), "{out}");
}

#[tokio::test]
async fn a_rejected_reload_is_located_and_says_the_environment_is_not_reread() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("triage.toml");
    let good = std::fs::read_to_string(repo("config/triage.toml")).unwrap();
    std::fs::write(&cfg, &good).unwrap();
    let port = free_port();
    let mut server = Server(
        triage()
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("TRIAGE_LISTEN", format!("127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "gateway did not come up on TRIAGE_LISTEN"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&cfg, format!("{good}\n[store]\nbogus_key = 1\n")).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = server.0.kill();
    let _ = server.0.wait();
    let mut logs = String::new();
    server
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("config reload rejected"), "{logs}");
    assert!(
        logs.contains("store: table [store] is defined twice"),
        "{logs}"
    );
    assert!(
        logs.contains(
            "environment variables (api_key_env, key_env) keep the values the process started with"
        ),
        "{logs}"
    );
}
