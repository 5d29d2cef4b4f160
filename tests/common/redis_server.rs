//! The one `redis-server` launcher of the test suites: integration tests reach it as
//! `common::redis_server`, the Redis limit store's unit tests include this file by path.
//!
//! Without `redis-server` a test prints `SKIPPED: …` and returns early, unless
//! `TRIAGE_REQUIRE_REDIS=1` (set by `.ci/run`), where a missing server fails the test: CI must
//! never pass Redis tests that did not run.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` child on 127.0.0.1, without persistence; killed on drop.
pub struct Redis {
    child: Child,
    /// Its port.
    pub port: u16,
}

/// Whether a missing `redis-server` fails the test instead of skipping it.
pub fn redis_required() -> bool {
    std::env::var("TRIAGE_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

fn skip(why: &str) -> Option<Redis> {
    assert!(
        !redis_required(),
        "TRIAGE_REQUIRE_REDIS=1 but {why}: install redis-server"
    );
    // Straight to stderr: libtest hides `eprintln!` output of passing tests.
    use std::io::Write;
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    None
}

impl Redis {
    /// A server on a free port; `None` (after printing SKIPPED) when redis-server is missing.
    pub async fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port).await
    }

    /// A server on `port` (to restart one in place).
    pub async fn start_on(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            // `DEBUG SLEEP` stalls the server in the stall tests.
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            return skip("redis-server is not installed");
        };
        let r = Redis { child, port };
        let client = ::redis::Client::open(r.url()).unwrap();
        for _ in 0..300 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let pong: Result<String, _> = ::redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return Some(r);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain synchronous connection, for tests that inspect keys.
    pub fn connection(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Stalls the server for `secs` (`DEBUG SLEEP`, sent from a connection of its own on a
    /// thread, since the call only returns when the sleep ends). Returns once the server has
    /// begun sleeping.
    pub async fn stall(&self, secs: f64) -> std::thread::JoinHandle<()> {
        let mut con = self.connection();
        let h = std::thread::spawn(move || {
            let _: () = ::redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(secs)
                .query(&mut con)
                .unwrap();
        });
        // Give the command time to reach the server.
        tokio::time::sleep(Duration::from_millis(50)).await;
        h
    }

    /// Kills the server (it can be restarted with [`Redis::start_on`]).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
