//! Forwards an upstream SSE stream to the client event by event, as it
//! arrives. Beside the client stream it counts usage, optionally records the
//! chunks (cache fill), and when the stream ends — normally, broken, or
//! because the client went away — reports the outcome exactly once.

use crate::protocol::sse::{SseEvent, SseParser, DONE_FRAME};
use crate::upstream::BodyStream;
use crate::usage::{estimate_tokens, Usage};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use serde::Deserialize;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How a stream ended, handed to the `on_end` callback.
#[derive(Debug, Clone)]
pub struct StreamEnd {
    /// Reported by the provider, or estimated from the text seen so far.
    pub usage: Usage,
    /// `[DONE]` arrived and nothing broke.
    pub completed: bool,
    /// Chunk payloads in order, when recording was asked for.
    pub chunks: Option<Vec<Bytes>>,
    /// Time from request start to the first byte sent to the client.
    pub first_byte: Option<Duration>,
    pub error: Option<String>,
    pub finish_reason: Option<String>,
}

pub type OnEnd = Box<dyn FnOnce(StreamEnd) + Send>;

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(default, borrow)]
    choices: Vec<PeekChoice<'a>>,
    #[serde(default)]
    usage: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PeekChoice<'a> {
    #[serde(default, borrow)]
    delta: Option<PeekDelta<'a>>,
    /// Legacy `/v1/completions` streams carry text here.
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    finish_reason: Option<&'a str>,
}

#[derive(Deserialize)]
struct PeekDelta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    tool_calls: Option<serde_json::Value>,
}

pub struct SseForwarder {
    upstream: BodyStream,
    parser: SseParser,
    scratch: Vec<SseEvent>,
    /// Frames ready for the client; everything one upstream read produced
    /// goes out as one write.
    out: BytesMut,
    strip_usage: bool,
    prompt_estimate: u64,
    completion_estimate: u64,
    usage: Option<Usage>,
    saw_done: bool,
    upstream_error: Option<String>,
    finish_reason: Option<String>,
    ended: bool,
    record: Option<Vec<Bytes>>,
    /// Recording stops (the answer will not be cached) past this many bytes.
    record_limit: usize,
    recorded: usize,
    started: Instant,
    first_byte: Option<Duration>,
    on_end: Option<OnEnd>,
}

impl SseForwarder {
    /// `strip_usage`: the client did not ask for the usage chunk, so it and the
    /// `"usage":null` fields we asked for are removed. `record`: keep the chunk
    /// payloads (for the cache) up to this many bytes.
    pub fn new(
        upstream: BodyStream,
        strip_usage: bool,
        prompt_estimate: u64,
        record: Option<usize>,
        started: Instant,
        on_end: OnEnd,
    ) -> Self {
        SseForwarder {
            upstream,
            parser: SseParser::new(),
            scratch: Vec::new(),
            out: BytesMut::new(),
            strip_usage,
            prompt_estimate,
            completion_estimate: 0,
            usage: None,
            saw_done: false,
            upstream_error: None,
            finish_reason: None,
            ended: false,
            record: record.map(|_| Vec::new()),
            record_limit: record.unwrap_or(0),
            recorded: 0,
            started,
            first_byte: None,
            on_end: Some(on_end),
        }
    }

    fn handle(&mut self, ev: SseEvent) {
        if self.saw_done {
            return; // nothing after [DONE] is part of the answer
        }
        if ev.is_done() {
            self.saw_done = true;
            self.out.extend_from_slice(DONE_FRAME);
            return;
        }
        let mut forward = true;
        match serde_json::from_slice::<Peek>(&ev.data) {
            Ok(p) => {
                if let Some(e) = p.error {
                    self.upstream_error = Some(e.to_string());
                }
                if let Some(u) = p.usage.as_ref().and_then(Usage::from_json) {
                    self.usage = Some(u);
                    if p.choices.is_empty() && self.strip_usage {
                        forward = false;
                    }
                }
                for c in &p.choices {
                    if let Some(t) = &c.text {
                        self.completion_estimate += estimate_tokens(t);
                    }
                    if let Some(d) = &c.delta {
                        if let Some(t) = &d.content {
                            self.completion_estimate += estimate_tokens(t);
                        }
                        if let Some(tc) = &d.tool_calls {
                            self.completion_estimate += estimate_tokens(&tc.to_string());
                        }
                    }
                    if let Some(f) = c.finish_reason {
                        self.finish_reason = Some(f.to_string());
                    }
                }
            }
            Err(_) => {
                // Not JSON: garbage from the provider. Forwarding it would hand
                // the client something no SDK can parse.
                return;
            }
        }
        if let Some(rec) = &mut self.record {
            self.recorded += ev.data.len();
            if self.recorded > self.record_limit {
                // Too big to cache anyway: stop holding a copy of the stream.
                self.record = None;
            } else {
                rec.push(ev.data.clone());
            }
        }
        if forward {
            self.out.extend_from_slice(b"data: ");
            let data: &[u8] = &ev.data;
            match self.strip_usage.then(|| find(data, NULL_USAGE)).flatten() {
                // Drop the `,"usage":null` we caused by asking for usage.
                Some(i) => {
                    self.out.extend_from_slice(&data[..i]);
                    self.out.extend_from_slice(&data[i + NULL_USAGE.len()..]);
                }
                None => self.out.extend_from_slice(data),
            }
            self.out.extend_from_slice(b"\n\n");
        }
    }

    fn fail(&mut self, message: String) {
        tracing::warn!(error = %message, "upstream stream broke");
        let event = crate::protocol::openai::error::sse_event(
            &message,
            "api_error",
            Some("upstream_error"),
        );
        self.out.extend_from_slice(&event);
        self.upstream_error = Some(message);
        self.ended = true;
    }

    fn finish(&mut self) {
        let Some(cb) = self.on_end.take() else {
            return;
        };
        let completed = self.saw_done && self.upstream_error.is_none();
        let usage = self.usage.unwrap_or(Usage {
            prompt_tokens: self.prompt_estimate,
            completion_tokens: self.completion_estimate,
            cached_tokens: 0,
            cache_write_tokens: 0,
            estimated: true,
        });
        cb(StreamEnd {
            usage,
            completed,
            chunks: if completed { self.record.take() } else { None },
            first_byte: self.first_byte,
            error: self
                .upstream_error
                .take()
                .or_else(|| (!completed).then(|| "client disconnected".to_string())),
            finish_reason: self.finish_reason.take(),
        });
    }
}

const NULL_USAGE: &[u8] = b",\"usage\":null";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Stream for SseForwarder {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Take everything the upstream has ready *now* (never waiting for more),
        // so a burst of events becomes one write to the client.
        while !this.ended && !this.saw_done && this.out.len() < COALESCE_LIMIT {
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    let mut events = std::mem::take(&mut this.scratch);
                    let res = this.parser.push(&bytes, &mut events);
                    for ev in events.drain(..) {
                        this.handle(ev);
                    }
                    this.scratch = events;
                    if res.is_err() {
                        this.fail("upstream sent an oversized SSE event".into());
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    // The client is told what happened, not the provider's URL or OS error.
                    tracing::warn!(error = %e, "upstream stream failed");
                    let what = match e {
                        crate::upstream::UpstreamError::Timeout { phase, .. } => {
                            format!("The provider timed out ({phase}).")
                        }
                        _ => "The provider's stream broke off.".to_string(),
                    };
                    this.fail(what)
                }
                Poll::Ready(None) => {
                    if let Some(ev) = this.parser.finish() {
                        this.handle(ev);
                    }
                    if !this.saw_done {
                        this.fail("upstream stream ended before [DONE]".into());
                    }
                    this.ended = true;
                }
                Poll::Pending => break,
            }
        }
        if !this.out.is_empty() {
            if this.first_byte.is_none() {
                this.first_byte = Some(this.started.elapsed());
            }
            return Poll::Ready(Some(Ok(this.out.split().freeze())));
        }
        if this.ended || this.saw_done {
            this.finish();
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

/// Bytes gathered before handing them to the client even if more are ready.
const COALESCE_LIMIT: usize = 64 * 1024;

impl Drop for SseForwarder {
    fn drop(&mut self) {
        // The client went away (or the server is shutting down): dropping the
        // upstream body cancels the provider request; settle what we saw.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};

    fn chunks(parts: Vec<&'static [u8]>) -> BodyStream {
        Box::pin(futures::stream::iter(
            parts.into_iter().map(|p| Ok(Bytes::from_static(p))),
        ))
    }

    async fn run(parts: Vec<&'static [u8]>, strip: bool) -> (String, StreamEnd) {
        let end = Arc::new(Mutex::new(None));
        let e2 = end.clone();
        let fwd = SseForwarder::new(
            chunks(parts),
            strip,
            10,
            Some(1 << 20),
            Instant::now(),
            Box::new(move |e| {
                if let Ok(mut g) = e2.lock() {
                    *g = Some(e);
                }
            }),
        );
        let out: Vec<Bytes> = fwd.map(|r| r.unwrap_or_default()).collect().await;
        let text = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<String>();
        let end = end.lock().ok().and_then(|mut g| g.take());
        (text, end.unwrap_or_else(|| panic!("on_end not called")))
    }

    #[tokio::test]
    async fn strips_usage_when_not_asked_and_keeps_it_for_accounting() {
        let (text, end) = run(vec![
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi there\"}}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        ], true).await;
        assert_eq!(
            text,
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi there\"}}]}\n\ndata: [DONE]\n\n"
        );
        assert!(end.completed);
        assert_eq!(end.usage.prompt_tokens, 7);
        assert!(!end.usage.estimated);
        assert_eq!(end.chunks.map(|c| c.len()), Some(2));
    }

    #[tokio::test]
    async fn recording_stops_past_its_limit_but_the_client_gets_everything() {
        let end = Arc::new(Mutex::new(None));
        let e2 = end.clone();
        let parts: Vec<&'static [u8]> = vec![
            b"data: {\"choices\":[{\"delta\":{\"content\":\"a long enough answer\"}}]}\n\n",
            b"data: [DONE]\n\n",
        ];
        let fwd = SseForwarder::new(
            chunks(parts),
            true,
            10,
            Some(16),
            Instant::now(),
            Box::new(move |e| {
                if let Ok(mut g) = e2.lock() {
                    *g = Some(e);
                }
            }),
        );
        let out: Vec<Bytes> = fwd.map(|r| r.unwrap_or_default()).collect().await;
        let text: String = out
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(text.contains("a long enough answer") && text.ends_with("data: [DONE]\n\n"));
        let end = end
            .lock()
            .ok()
            .and_then(|mut g| g.take())
            .unwrap_or_else(|| panic!("no end"));
        assert!(end.completed);
        assert!(end.chunks.is_none(), "over the limit: nothing to cache");
    }

    #[tokio::test]
    async fn broken_stream_ends_with_an_error_event_and_estimates() {
        let (text, end) = run(
            vec![b"data: {\"choices\":[{\"delta\":{\"content\":\"abcdefgh\"}}]}\n\n"],
            true,
        )
        .await;
        assert!(text.ends_with("\n\n"));
        assert!(text.contains("\"error\""));
        assert!(!end.completed);
        assert!(end.usage.estimated);
        assert_eq!(end.usage.completion_tokens, 2);
        assert!(end.chunks.is_none());
    }
}
