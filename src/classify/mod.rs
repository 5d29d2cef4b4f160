pub mod embedded;
pub mod eval;
