//! A reading that passed validation, before and after storage gives it an id. Its own file so
//! that the fuzz target can compile the validator with it, without the rest of storage.

use crate::wire::{SensorReading, format_time};

/// A reading that passed validation (`ingest::validate`), ready to store.
// The fuzz target (`fuzz/`) compiles this file in without sqlx, under `--cfg fuzzing`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(not(fuzzing), derive(sqlx::FromRow))]
pub struct NewReading {
    pub unit_id: String,
    /// `""` when the sender gave none (the idempotency key needs a value).
    pub device_id: String,
    pub temperature: f64,
    pub humidity: Option<f64>,
    pub battery: Option<f64>,
    pub signal_strength: Option<f64>,
    /// Epoch milliseconds.
    pub recorded_at: i64,
    pub source: String,
}

impl NewReading {
    /// The contract's shape, once storage gave the reading its id.
    pub fn into_wire(self, id: i64) -> SensorReading {
        SensorReading {
            id: id.to_string(),
            unit_id: self.unit_id,
            device_id: (!self.device_id.is_empty()).then_some(self.device_id),
            temperature: self.temperature,
            humidity: self.humidity,
            battery: self.battery,
            signal_strength: self.signal_strength,
            recorded_at: format_time(self.recorded_at),
            source: self.source,
        }
    }
}
