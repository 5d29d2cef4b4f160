//! A `kind = "anthropic"` provider (or an Anthropic-speaking mock) behind the
//! chat-completions shape the gateway speaks: the request is translated on the
//! way out, the answer (JSON, stream or error) on the way back, so metering,
//! cache and vote only ever see chat completions.

use super::{BodyStream, UpstreamError, UpstreamResponse};
use crate::protocol::anthropic::{chat_to_messages_request, messages_response_to_chat};
use crate::protocol::anthropic::{MessagesToChatStream, ProtocolError};
use crate::protocol::sse::{frame, SseEvent, SseParser, DONE_FRAME};
use bytes::Bytes;
use futures::StreamExt;
use http::StatusCode;
use serde_json::{json, Value};
use std::collections::VecDeque;

/// Anthropic answers are bounded like any upstream body.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// A chat request translated for the Messages API.
pub struct Outgoing {
    pub body: Bytes,
    pub stream: bool,
}

/// Chat completions body → Messages body. `max_tokens` is required by
/// Anthropic; the gateway fills it from the deployment's `max_output_tokens`
/// before this point, the translator's default covers direct callers.
pub fn translate_request(chat: &[u8]) -> Result<Outgoing, ProtocolError> {
    let v: Value = serde_json::from_slice(chat)
        .map_err(|e| ProtocolError::new("body", format!("invalid JSON: {e}")))?;
    let model = v.get("model").and_then(Value::as_str).unwrap_or_default();
    let out = chat_to_messages_request(&v, model)?;
    let stream = out.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(Outgoing {
        body: Bytes::from(out.to_string()),
        stream,
    })
}

/// Sets `max_tokens` (required by the Messages API) to the deployment's
/// output cap when the chat request names none.
pub fn with_default_max_tokens(chat: Bytes, cap: u64) -> Bytes {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Map<String, Value>>(&chat) else {
        return chat; // the translation reports the broken body
    };
    if v.contains_key("max_tokens") || v.contains_key("max_completion_tokens") {
        return chat;
    }
    v.insert("max_tokens".into(), json!(cap));
    serde_json::to_vec(&v).map(Bytes::from).unwrap_or(chat)
}

/// A 400 in the OpenAI envelope for a request the translation cannot carry.
pub fn refusal(e: &ProtocolError) -> UpstreamResponse {
    let body = json!({"error": {
        "message": e.message, "type": "invalid_request_error", "param": e.param, "code": null,
    }});
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    UpstreamResponse {
        status: StatusCode::BAD_REQUEST,
        headers,
        body: Box::pin(futures::stream::once(async move {
            Ok::<_, UpstreamError>(Bytes::from(body.to_string()))
        })),
    }
}

/// The Messages answer → chat completions. Status and headers stay (a 529
/// is still a failed attempt for the dispatcher); bodies are translated
/// lazily so nothing here waits on the network.
pub fn translate_response(
    resp: UpstreamResponse,
    stream: bool,
    provider: &str,
) -> UpstreamResponse {
    let UpstreamResponse {
        status,
        mut headers,
        body,
    } = resp;
    let provider = provider.to_string();
    let body: BodyStream = if !status.is_success() {
        Box::pin(futures::stream::once(error_body(body, status)))
    } else if stream {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        Box::pin(ChatFrames::new(body, provider).into_stream())
    } else {
        Box::pin(futures::stream::once(json_body(body, provider)))
    };
    headers.remove(http::header::CONTENT_LENGTH);
    UpstreamResponse {
        status,
        headers,
        body,
    }
}

async fn collect(body: BodyStream) -> Result<Bytes, UpstreamError> {
    UpstreamResponse {
        status: StatusCode::OK,
        headers: http::HeaderMap::new(),
        body,
    }
    .collect(MAX_BODY)
    .await
}

async fn json_body(body: BodyStream, provider: String) -> Result<Bytes, UpstreamError> {
    let raw = collect(body).await?;
    let v: Value = serde_json::from_slice(&raw).map_err(|e| UpstreamError::Body {
        provider,
        detail: format!("not an Anthropic message: {e}"),
    })?;
    Ok(Bytes::from(messages_response_to_chat(&v).to_string()))
}

/// Anthropic's `{"type":"error","error":{type,message}}` → OpenAI's envelope,
/// keeping the error type (`overloaded_error`, `rate_limit_error`...).
async fn error_body(body: BodyStream, status: StatusCode) -> Result<Bytes, UpstreamError> {
    let raw = collect(body).await.unwrap_or_default();
    let v: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let kind = v
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("api_error");
    let message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("provider answered {}", status.as_u16()));
    Ok(Bytes::from(
        json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
            .to_string(),
    ))
}

/// Anthropic SSE events → chat completion chunks, ending with `[DONE]`.
struct ChatFrames {
    body: BodyStream,
    parser: SseParser,
    tr: MessagesToChatStream,
    out: VecDeque<Bytes>,
    provider: String,
    ended: bool,
}

impl ChatFrames {
    fn new(body: BodyStream, provider: String) -> Self {
        ChatFrames {
            body,
            parser: SseParser::new(),
            tr: MessagesToChatStream::new(true),
            out: VecDeque::new(),
            provider,
            ended: false,
        }
    }

    fn broken(&self, detail: impl Into<String>) -> UpstreamError {
        UpstreamError::Body {
            provider: self.provider.clone(),
            detail: detail.into(),
        }
    }

    fn take(&mut self, events: Vec<SseEvent>) -> Result<(), UpstreamError> {
        for ev in events {
            if self.ended {
                break;
            }
            let Ok(v) = serde_json::from_slice::<Value>(&ev.data) else {
                continue; // keep-alives and the like
            };
            let chunks = self
                .tr
                .push(&v)
                .map_err(|e| self.broken(format!("stream error {e}")))?;
            for c in chunks {
                self.out.push_back(frame(c.to_string().as_bytes()));
            }
            if self.tr.is_done() {
                self.out.push_back(Bytes::from_static(DONE_FRAME));
                self.ended = true;
            }
        }
        Ok(())
    }

    fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, UpstreamError>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut s = state?;
            loop {
                if let Some(b) = s.out.pop_front() {
                    return Some((Ok(b), Some(s)));
                }
                if s.ended {
                    return None;
                }
                match s.body.next().await {
                    Some(Ok(chunk)) => {
                        let mut evs = Vec::new();
                        if s.parser.push(&chunk, &mut evs).is_err() {
                            let e = s.broken("SSE event too large");
                            return Some((Err(e), None));
                        }
                        if let Err(e) = s.take(evs) {
                            return Some((Err(e), None));
                        }
                    }
                    Some(Err(e)) => return Some((Err(e), None)),
                    None => {
                        let evs: Vec<SseEvent> = s.parser.finish().into_iter().collect();
                        if let Err(e) = s.take(evs) {
                            return Some((Err(e), None));
                        }
                        if !s.ended {
                            // Cut off before `message_stop`: the forwarder
                            // reports a broken stream rather than a clean end.
                            s.ended = true;
                            let e = s.broken("stream ended before message_stop");
                            return Some((Err(e), None));
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(pieces: Vec<&'static str>) -> BodyStream {
        Box::pin(futures::stream::iter(pieces.into_iter().map(|p| {
            Ok::<_, UpstreamError>(Bytes::from_static(p.as_bytes()))
        })))
    }

    #[tokio::test]
    async fn stream_translates_to_chat_chunks_and_done() {
        let sse = stream_of(vec![
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":2}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        ]);
        let resp = UpstreamResponse {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: sse,
        };
        let out = translate_response(resp, true, "p").collect(1 << 20).await;
        let text =
            String::from_utf8(out.map(|b| b.to_vec()).unwrap_or_default()).unwrap_or_default();
        assert!(text.contains("\"content\":\"Hi\""), "{text}");
        assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
        assert!(text.contains("\"prompt_tokens\":5"), "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[tokio::test]
    async fn overloaded_error_keeps_status_and_type() {
        let resp = UpstreamResponse {
            status: StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            headers: http::HeaderMap::new(),
            body: stream_of(vec![
                "{\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}",
            ]),
        };
        let out = translate_response(resp, false, "p");
        assert_eq!(out.status.as_u16(), 529);
        let body = out.collect(1 << 20).await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(v["error"]["type"], "overloaded_error");
        assert_eq!(v["error"]["message"], "Overloaded");
    }
}
