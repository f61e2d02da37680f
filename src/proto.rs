//! Generates `proto/` from the Rust wire types (stub, filled in below).
use std::path::Path;
pub fn write(_dir: &Path) -> anyhow::Result<()> { Ok(()) }
