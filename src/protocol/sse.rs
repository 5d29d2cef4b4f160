//! Incremental Server-Sent Events parser. Upstream bytes arrive split at
//! arbitrary positions; events come out whole, in order, with comments
//! (`: ping`) and unknown fields skipped.

use bytes::{Buf, Bytes, BytesMut};

/// One `data:` event (multi-line data joined with `\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: Bytes,
}

impl SseEvent {
    pub fn is_done(&self) -> bool {
        self.data.as_ref() == b"[DONE]"
    }
}

/// Events larger than this are a protocol error (protects memory from a
/// stream that never sends a blank line).
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseParser {
    buf: BytesMut,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SSE event exceeds {MAX_EVENT_BYTES} bytes")]
pub struct EventTooLarge;

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes and appends every completed event to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), EventTooLarge> {
        self.buf.extend_from_slice(chunk);
        while let Some((end, sep)) = find_boundary(&self.buf) {
            let block = self.buf.split_to(end).freeze();
            self.buf.advance(sep);
            if let Some(ev) = parse_block(block) {
                out.push(ev);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(EventTooLarge);
        }
        Ok(())
    }

    /// At end of stream: a final event without its blank line still counts.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.buf.is_empty() {
            return None;
        }
        let block = std::mem::take(&mut self.buf).freeze();
        parse_block(block)
    }

    /// Bytes held that do not yet form a whole event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Position of the first blank line: (end of the event, separator length).
fn find_boundary(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        match buf[i] {
            b'\n' => {
                if buf.get(i + 1) == Some(&b'\n') {
                    return Some((i, 2));
                }
                if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                    return Some((i, 3));
                }
            }
            b'\r' => {
                if buf.get(i + 1) == Some(&b'\n')
                    && buf.get(i + 2) == Some(&b'\r')
                    && buf.get(i + 3) == Some(&b'\n')
                {
                    return Some((i, 4));
                }
                if buf.get(i + 1) == Some(&b'\r') {
                    return Some((i, 2));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_block(block: Bytes) -> Option<SseEvent> {
    let mut event = None;
    let mut data: Option<BytesMut> = None;
    // Fast path: a single `data: ...` line is returned without copying.
    let single = !block.contains(&b'\n') && !block.contains(&b'\r');
    if single {
        if let Some(rest) = strip_field(&block, b"data") {
            let start = block.len() - rest.len();
            return Some(SseEvent {
                event: None,
                data: block.slice(start..),
            });
        }
    }
    for line in block.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line[0] == b':' {
            continue;
        }
        if let Some(v) = strip_field(line, b"data") {
            let d = data.get_or_insert_with(BytesMut::new);
            if !d.is_empty() {
                d.extend_from_slice(b"\n");
            }
            d.extend_from_slice(v);
        } else if let Some(v) = strip_field(line, b"event") {
            event = Some(String::from_utf8_lossy(v).into_owned());
        }
        // id:, retry: and unknown fields are ignored, as the spec says.
    }
    data.map(|d| SseEvent {
        event,
        data: d.freeze(),
    })
}

fn strip_field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let rest = rest.strip_prefix(b":")?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

/// Frames a payload as one SSE `data:` event.
pub fn frame(data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(data.len() + 8);
    b.extend_from_slice(b"data: ");
    b.extend_from_slice(data);
    b.extend_from_slice(b"\n\n");
    b.freeze()
}

pub const DONE_FRAME: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.push(c, &mut out).ok();
        }
        out.extend(p.finish());
        out
    }

    #[test]
    fn parses_events_comments_and_multiline() {
        let evs = parse_all(&[
            b": ping\n\ndata: {\"a\":1}\n\nevent: x\ndata: l1\ndata: l2\r\n\r\ndata: [DONE]\n\n",
        ]);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].data.as_ref(), b"{\"a\":1}");
        assert_eq!(evs[1].event.as_deref(), Some("x"));
        assert_eq!(evs[1].data.as_ref(), b"l1\nl2");
        assert!(evs[2].is_done());
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let evs = parse_all(&[b"garbage line\nmore: junk\n\ndata: ok\n\n"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data.as_ref(), b"ok");
    }

    #[test]
    fn oversize_event_is_an_error() {
        let mut p = SseParser::new();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(p.push(&big, &mut Vec::new()), Err(EventTooLarge));
    }

    const STREAM: &[u8] = b"data: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n: keepalive\n\ndata: {\"id\":\"1\",\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\r\n\r\nevent: done\ndata: a\ndata: b\n\ndata: [DONE]\n\n";

    #[test]
    fn split_at_every_byte_boundary_gives_the_same_events() {
        let whole = parse_all(&[STREAM]);
        assert_eq!(whole.len(), 4);
        for i in 0..=STREAM.len() {
            let (a, b) = STREAM.split_at(i);
            assert_eq!(parse_all(&[a, b]), whole, "split at {i}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), cut in 0usize..2048) {
            let cut = cut.min(data.len());
            let _ = parse_all(&[&data[..cut], &data[cut..]]);
        }

        #[test]
        fn arbitrary_splits_reassemble(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..8)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            let mut pieces = Vec::new();
            let mut last = 0;
            for c in cuts { pieces.push(&STREAM[last..c]); last = c; }
            pieces.push(&STREAM[last..]);
            prop_assert_eq!(parse_all(&pieces), parse_all(&[STREAM]));
        }
    }
}
