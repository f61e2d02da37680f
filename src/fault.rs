//! Fault switches for the failure tests: `SENSORWIRE_FAULT=<name>` makes one pipeline stage fail
//! on purpose, so a test can watch the node notice it. Debug builds only: in a release build
//! [`active`] is a constant `false` and the checks compile away.
//!
//! - `panic-fanout`: the fanout panics on its first stored readings;
//! - `panic-emitter`: the emitter panics on its first event;
//! - `stall-announce`: committed alert and status events are not announced by this node (as if
//!   it died between the commit and the announcement); another node, or this one after its
//!   restart, announces them from the outbox.

/// Whether the fault `name` is switched on.
#[cfg(debug_assertions)]
pub fn active(name: &str) -> bool {
    static FAULT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FAULT
        .get_or_init(|| std::env::var("SENSORWIRE_FAULT").ok())
        .as_deref()
        == Some(name)
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn active(_name: &str) -> bool {
    false
}
