//! Wire formats: pure data and conversions between the APIs clients and
//! upstreams speak. Nothing here knows about the gateway, HTTP or app state.
pub mod anthropic;
