//! Execution patterns: parallel voting and cascades with programmatic gates.
//!
//! `config` holds the TOML schema (`[routers.X.vote]`, `[routers.X.cascade]`) and its
//! compiled form, `tally` and `gates` the pure decision logic, `run` the async orchestrators
//! over a caller-supplied "call one upstream" closure.

pub mod config;
pub mod gates;
pub mod run;
pub mod tally;

pub use config::{
    CascadeConfig, CompareConfig, CompiledCascade, CompiledGates, CompiledVote, GatesConfig,
    JsonGate, OnInsufficient, Strategy, TieRule, VoteConfig, YesConfig,
};
pub use gates::{check, completion_text, GateFailure, RequestGates};
pub use run::{
    run_cascade, run_vote, CallKind, CallRecord, CallResult, CallSpec, CallState, CascadeError,
    CascadeOutcome, JudgeVerdict, TierAttempt, TierResult, Usage, VoteError, VoteOutcome,
};
pub use tally::{Insufficient, Status, Tally, TallyResult, ThresholdResult};
