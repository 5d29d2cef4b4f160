//! Client wire formats and their pure translations to and from the chat-completions shape the
//! pipeline speaks internally. Nothing here does I/O or knows about HTTP.
pub mod responses;
