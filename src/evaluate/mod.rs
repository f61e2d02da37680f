//! Evaluation: the pure rules that turn a unit's stored state and a reading into alert and
//! status changes. Storage applies them inside the ingest commit (`store::unit_state`), so the
//! decision and the stored state can never disagree, whichever node commits.

pub mod thresholds;
pub mod verdict;
