//! placeholder
pub mod harness_postgres;
pub mod harness_util;
