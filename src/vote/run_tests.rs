//! Async tests for `run_vote` / `run_cascade` (virtual time via `start_paused`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::vote::config::{CascadeConfig, VoteConfig};

fn vote_cfg(src: &str) -> CompiledVote {
    toml::from_str::<VoteConfig>(src)
        .unwrap()
        .compile("t")
        .unwrap()
}

fn completion(content: &str) -> Value {
    json!({"object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": content}}]})
}

fn ok(content: &str, completion_tokens: u64) -> CallResult {
    CallResult {
        completion: completion(content),
        usage: Usage {
            prompt_tokens: 10,
            completion_tokens,
            cached_tokens: 2,
            cache_write_tokens: 0,
            estimated: false,
        },
    }
}

/// Counts futures dropped before they finished.
struct DropFlag {
    done: bool,
    dropped_early: Arc<AtomicUsize>,
}

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.done {
            self.dropped_early.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A scripted upstream: call i answers `answers[i]` after `delays_ms[i]` of virtual time
/// (`None` answer = error).
#[derive(Clone)]
struct Script {
    answers: Vec<Option<&'static str>>,
    delays_ms: Vec<u64>,
    dropped_early: Arc<AtomicUsize>,
    completed: Arc<Mutex<Vec<usize>>>,
    specs: Arc<Mutex<Vec<CallSpec>>>,
    judge_reply: Option<&'static str>,
}

impl Script {
    fn new(answers: Vec<Option<&'static str>>, delays_ms: Vec<u64>) -> Self {
        Script {
            answers,
            delays_ms,
            dropped_early: Arc::default(),
            completed: Arc::default(),
            specs: Arc::default(),
            judge_reply: None,
        }
    }

    fn call(
        &self,
        spec: CallSpec,
    ) -> impl Future<Output = Result<CallResult, String>> + Send + 'static {
        self.specs.lock().unwrap().push(spec.clone());
        let i = spec.index;
        let (answer, delay) = match spec.kind {
            CallKind::Candidate => (self.answers[i], self.delays_ms[i]),
            CallKind::Judge => (self.judge_reply, 1),
            CallKind::Fallback => (Some("fallback answer"), 1),
        };
        let guard = DropFlag {
            done: false,
            dropped_early: self.dropped_early.clone(),
        };
        let completed = self.completed.clone();
        async move {
            let mut guard = guard;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            guard.done = true;
            completed.lock().unwrap().push(i);
            match answer {
                Some(a) => Ok(ok(a, i as u64 + 1)),
                None => Err(format!("call {i} failed")),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn majority_early_exit_drops_stragglers() {
    let cfg = vote_cfg("n = 5");
    let s = Script::new(
        vec![Some("42"), Some(" 42"), Some("41"), Some("42"), Some("41")],
        vec![10, 20, 30, 40, 500],
    );
    // Arrivals: 42, 42, 41, 42 -> 3 vs 1 + 1 remaining: decided; call 4 is dropped.
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!(out.winner, 0);
    assert_eq!((out.agree, out.of, out.valid, out.cancelled), (3, 5, 4, 1));
    assert_eq!(out.header(), "strategy=majority agree=3 of=5 cancelled=1");
    assert_eq!(s.dropped_early.load(Ordering::SeqCst), 1);
    assert_eq!(*s.completed.lock().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(out.calls[4].state, CallState::Cancelled);
    assert_eq!(out.calls[4].usage, Usage::default());
    assert_eq!(out.completion, completion("42"));
}

#[tokio::test(start_paused = true)]
async fn unanimous_quorum_cancels_two() {
    let cfg = vote_cfg("n = 5");
    let s = Script::new(vec![Some("a"); 5], vec![1, 2, 3, 1000, 2000]);
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!(out.cancelled, 2);
    assert_eq!(s.dropped_early.load(Ordering::SeqCst), 2);
    assert_eq!(s.completed.lock().unwrap().len(), 3);
    // Usage sums only the three completed calls: completion tokens 1 + 2 + 3.
    assert_eq!(
        out.usage,
        Usage {
            prompt_tokens: 30,
            completion_tokens: 6,
            cached_tokens: 6,
            cache_write_tokens: 0,
            estimated: false,
        }
    );
    let per_call: u64 = out.calls.iter().map(|c| c.usage.completion_tokens).sum();
    assert_eq!(per_call, 6);
}

#[tokio::test(start_paused = true)]
async fn models_and_temperatures_round_robin() {
    let cfg = vote_cfg("n = 3\nmodels = [\"big\", \"small\"]\ntemperatures = [0.0, 1.0]");
    let s = Script::new(vec![Some("x"); 3], vec![1, 1, 1]);
    run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    let specs = s.specs.lock().unwrap();
    let got: Vec<(Option<&str>, Option<usize>, Option<f64>)> = specs
        .iter()
        .map(|s| (s.model.as_deref(), s.model_index, s.temperature))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some("big"), Some(0), Some(0.0)),
            (Some("small"), Some(1), Some(1.0)),
            (Some("big"), Some(0), Some(0.0)),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn threshold_flags_and_cancels() {
    let cfg = vote_cfg("n = 5\nstrategy = \"threshold\"\nk = 2\nyes = { pattern = \"^yes\" }");
    let s = Script::new(
        vec![
            Some("no"),
            Some("Yes."),
            Some("yes"),
            Some("no"),
            Some("yes"),
        ],
        vec![1, 2, 3, 100, 100],
    );
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    let t = out.threshold.unwrap();
    assert!(t.flagged);
    assert_eq!(out.winner, 1);
    assert_eq!(
        out.header(),
        "strategy=threshold yes=2 of=5 k=2 flagged=true cancelled=2"
    );
    assert_eq!(s.dropped_early.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn min_valid_failure_returns_errors() {
    let cfg = vote_cfg("n = 3\nmin_valid = 2");
    let s = Script::new(vec![None, Some("a"), None], vec![1, 2, 3]);
    match run_vote(&cfg, "q", |spec| s.call(spec)).await {
        Err(VoteError::InsufficientValid {
            valid,
            needed,
            errors,
        }) => {
            assert_eq!((valid, needed), (1, 2));
            assert_eq!(errors, vec!["call 0 failed", "call 2 failed"]);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn insufficient_falls_back_to_single_call() {
    let cfg = vote_cfg(
        "n = 3\ncompare = { regex = '\\d+' }\nmin_valid = 2\non_insufficient = \"single_call\"",
    );
    // Two answers without a number are invalid for comparison.
    let s = Script::new(vec![Some("seven"), Some("7"), Some("eight")], vec![1, 2, 3]);
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert!(out.fallback);
    assert_eq!(out.winner, 3);
    assert_eq!(out.completion, completion("fallback answer"));
    assert_eq!(
        out.header(),
        "strategy=majority valid=1 of=3 fallback=single_call"
    );
    assert_eq!(out.calls.len(), 4);
    assert_eq!(out.calls[3].kind, CallKind::Fallback);
    assert_eq!(out.calls[0].state, CallState::Invalid);
    assert_eq!(out.usage.completion_tokens, 1 + 2 + 3 + 4);
}

#[tokio::test(start_paused = true)]
async fn best_of_uses_judge_choice() {
    let cfg =
        vote_cfg("n = 3\nstrategy = \"best_of\"\njudge = \"judge-model\"\nrubric = \"Be exact.\"");
    let mut s = Script::new(vec![Some("A"), None, Some("B")], vec![3, 1, 2]);
    s.judge_reply = Some("After careful thought, Candidate #2 is the best.");
    let out = run_vote(&cfg, "What is it?", |spec| s.call(spec))
        .await
        .unwrap();
    // Candidates are numbered by call index over valid answers: 1 = call 0, 2 = call 2.
    assert_eq!(out.judge, Some(JudgeVerdict::Chose(2)));
    assert_eq!(out.winner, 2);
    assert_eq!(out.completion, completion("B"));
    assert_eq!(
        out.header(),
        "strategy=best_of winner=2 agree=1 valid=2 of=3 judge=ok cancelled=0"
    );
    let specs = s.specs.lock().unwrap();
    let judge = specs.iter().find(|s| s.kind == CallKind::Judge).unwrap();
    assert_eq!(judge.model.as_deref(), Some("judge-model"));
    assert_eq!(judge.index, 3);
    let msgs = judge.messages.as_ref().unwrap();
    let sys = msgs[0]["content"].as_str().unwrap();
    let user = msgs[1]["content"].as_str().unwrap();
    assert!(sys.contains("Be exact."));
    assert!(user.contains("What is it?"));
    assert!(user.contains("Candidate 1:\n<<<\nA\n>>>"));
    assert!(user.contains("Candidate 2:\n<<<\nB\n>>>"));
    // Judge usage is included: candidates 1 + 3, judge 4.
    assert_eq!(out.usage.completion_tokens, 8);
}

#[tokio::test(start_paused = true)]
async fn best_of_falls_back_on_garbage_or_error() {
    let cfg = vote_cfg("n = 2\nstrategy = \"best_of\"\njudge = \"j\"");
    let mut s = Script::new(vec![Some("A"), Some("B")], vec![2, 1]);
    s.judge_reply = Some("I cannot decide between 1 and 2.");
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!((out.judge, out.winner), (Some(JudgeVerdict::Unparsed), 0));

    s.judge_reply = None; // judge call errors
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!((out.judge, out.winner), (Some(JudgeVerdict::Failed), 0));
    assert!(out.header().contains("judge=failed"));

    let s = Script::new(vec![None, Some("B")], vec![1, 1]);
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!((out.judge, out.winner), (Some(JudgeVerdict::Skipped), 1));
    assert!(s
        .specs
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.kind != CallKind::Judge));
}

#[test]
fn judge_parsing() {
    for (reply, want) in [
        ("2", Some(2)),
        ("**3**", Some(3)),
        (" 1.\n", Some(1)),
        ("Candidate 2", Some(2)),
        (
            "The best is candidate #3. Candidate 3 is clearly right.",
            Some(3),
        ),
        ("answer no. 1", Some(1)),
        ("{\"choice\": 2}", Some(2)),
        ("{\"best\": \"3\"}", Some(3)),
        ("<think>1 or 2? maybe 3</think>\n2", Some(2)),
        ("I pick 2 because it is right", Some(2)),
        ("Candidate 1 is wrong; candidate 3 is best", None),
        ("between 1 and 2", None),
        ("7", None),
        ("0", None),
        ("none of them", None),
        ("", None),
        ("99999999999999999999999", None),
    ] {
        assert_eq!(parse_judge_choice(reply, 3), want, "{reply:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn tie_most_capable_end_to_end() {
    let cfg = vote_cfg("n = 4\nmodels = [\"big\", \"small\"]\ntie = \"most_capable\"");
    // Calls 0,2 -> big; 1,3 -> small. small's answer arrives first; big's answer ties it.
    let s = Script::new(
        vec![Some("b"), Some("s"), Some("b"), Some("s")],
        vec![3, 1, 4, 2],
    );
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!((out.winner, out.agree), (0, 2));
    let cfg = vote_cfg("n = 4\nmodels = [\"big\", \"small\"]");
    let out = run_vote(&cfg, "q", |spec| s.call(spec)).await.unwrap();
    assert_eq!((out.winner, out.agree), (1, 2));
}

#[test]
fn run_vote_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let cfg = vote_cfg("n = 2");
    let s = Script::new(vec![Some("a"); 2], vec![1, 1]);
    let fut = run_vote(&cfg, "q", |spec| s.call(spec));
    assert_send(&fut);
    let cc = toml::from_str::<CascadeConfig>("tiers = [\"a\"]")
        .unwrap()
        .compile("c")
        .unwrap();
    let req = json!({});
    let fut = run_cascade(&cc, &req, |_| async { Ok::<_, String>(ok("x", 1)) });
    assert_send(&fut);
}

fn cascade(src: &str) -> CompiledCascade {
    toml::from_str::<CascadeConfig>(src)
        .unwrap()
        .compile("c")
        .unwrap()
}

fn schema_request() -> Value {
    json!({"messages": [], "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
        "required": ["n"]}}}})
}

#[tokio::test]
async fn cascade_escalates_on_schema_failure() {
    let cfg = cascade("tiers = [\"small\", \"large\"]");
    let tried = AtomicUsize::new(0);
    let out = run_cascade(&cfg, &schema_request(), |tier| {
        tried.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, String>(match tier {
                0 => ok(r#"{"n": "five"}"#, 5),
                _ => ok(r#"{"n": 5}"#, 7),
            })
        }
    })
    .await
    .unwrap();
    assert!(out.passed);
    assert_eq!(out.tier, 1);
    assert_eq!(out.completion, completion(r#"{"n": 5}"#));
    assert_eq!(
        out.header(),
        "tried=small,large passed=large gate_failed=json_schema"
    );
    assert_eq!(out.usage.completion_tokens, 12);
    assert_eq!(tried.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cascade_stops_at_first_pass() {
    let cfg = cascade("tiers = [\"small\", \"large\"]");
    let tried = AtomicUsize::new(0);
    let out = run_cascade(&cfg, &json!({}), |_| {
        tried.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(ok("fine", 3)) }
    })
    .await
    .unwrap();
    assert_eq!(out.header(), "tried=small passed=small");
    assert_eq!(tried.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cascade_all_fail_returns_last_answer() {
    let cfg = cascade("tiers = [\"s\", \"m\", \"l\"]\ngates = { refusal_phrases = [\"I can't\"] }");
    let out = run_cascade(&cfg, &json!({}), |tier| async move {
        match tier {
            0 => Ok(ok("", 1)),
            1 => Err("boom".to_string()),
            _ => Ok(ok("Sorry, I can't do that.", 2)),
        }
    })
    .await
    .unwrap();
    assert!(!out.passed);
    assert_eq!(out.tier, 2);
    assert_eq!(
        out.gate_failure.as_ref().map(GateFailure::name),
        Some("refusal")
    );
    assert_eq!(
        out.header(),
        "tried=s,m,l passed=none gate_failed=non_empty,error,refusal"
    );
    assert_eq!(out.usage.completion_tokens, 3);
}

#[tokio::test]
async fn cascade_all_errors() {
    let cfg = cascade("tiers = [\"s\", \"l\"]");
    let r = run_cascade(&cfg, &json!({}), |tier| async move {
        Err::<CallResult, _>(format!("e{tier}"))
    })
    .await;
    match r {
        Err(CascadeError::AllFailed { errors }) => assert_eq!(errors, vec!["e0", "e1"]),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn cascade_length_and_regex_gates() {
    let cfg = cascade("tiers = [\"a\", \"b\", \"c\"]\ngates = { must_match = '^\\d+$' }");
    let out = run_cascade(&cfg, &json!({}), |tier| async move {
        Ok::<_, String>(match tier {
            0 => CallResult {
                completion: json!({"choices": [{"finish_reason": "length",
                    "message": {"content": "12"}}]}),
                usage: Usage::default(),
            },
            1 => ok("twelve", 1),
            _ => ok("12", 1),
        })
    })
    .await
    .unwrap();
    assert_eq!(
        out.header(),
        "tried=a,b,c passed=c gate_failed=finish_length,regex"
    );
}
