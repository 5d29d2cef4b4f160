pub mod calibrate;
pub mod embedded;
pub mod eval;
