//! OpenAI's chat, completions and embeddings wire formats.

pub mod chat;
pub mod chunks;
pub mod error;
