//! Rows as the database returns them, and their conversion to wire types.

use super::NewReading;
use crate::wire::{
    Alert, AlertStatus, AlertType, SensorReading, Severity, Unit, UnitStatus, format_time,
};

pub(super) const UNIT_SELECT: &str = "SELECT id, site_id, name, temp_min, temp_max, \
    offline_after_seconds, status, status_since, last_reading_at, last_temperature FROM units";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnitRow {
    pub id: String,
    pub site_id: String,
    pub name: String,
    pub temp_min: Option<f64>,
    pub temp_max: Option<f64>,
    pub offline_after_seconds: i64,
    pub status: String,
    pub status_since: Option<i64>,
    pub last_reading_at: Option<i64>,
    pub last_temperature: Option<f64>,
}

impl From<UnitRow> for Unit {
    fn from(r: UnitRow) -> Self {
        Unit {
            id: r.id,
            site_id: r.site_id,
            name: r.name,
            temp_min: r.temp_min,
            temp_max: r.temp_max,
            offline_after_seconds: r.offline_after_seconds,
            // A status this build does not know reads as `unknown`.
            status: r.status.parse().unwrap_or(UnitStatus::Unknown),
            last_reading_at: r.last_reading_at.map(format_time),
            last_temperature: r.last_temperature,
        }
    }
}

pub(super) const READING_SELECT: &str = "SELECT id, unit_id, device_id, temperature, humidity, \
    battery, signal_strength, recorded_at, source FROM readings";

/// A stored reading: the validated fields and the id storage gave it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReadingRow {
    pub id: i64,
    #[sqlx(flatten)]
    pub reading: NewReading,
}

impl From<ReadingRow> for SensorReading {
    fn from(r: ReadingRow) -> Self {
        r.reading.into_wire(r.id)
    }
}

pub(super) const ALERT_SELECT: &str = "SELECT id, unit_id, site_id, alert_type, severity, \
    message, status, triggered_at, resolved_at, value, threshold, acknowledged_at, \
    acknowledged_by, note, peak_value FROM alerts";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertRow {
    pub id: String,
    pub unit_id: String,
    pub site_id: String,
    pub alert_type: String,
    pub severity: String,
    pub message: String,
    pub status: String,
    pub triggered_at: i64,
    pub resolved_at: Option<i64>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub note: Option<String>,
    pub peak_value: Option<f64>,
}

impl From<AlertRow> for Alert {
    fn from(r: AlertRow) -> Self {
        Alert {
            alert_id: r.id,
            unit_id: r.unit_id,
            site_id: r.site_id,
            alert_type: r.alert_type.parse().unwrap_or(AlertType::Offline),
            severity: r.severity.parse().unwrap_or(Severity::Warning),
            message: r.message,
            status: r.status.parse().unwrap_or(AlertStatus::Resolved),
            triggered_at: format_time(r.triggered_at),
            resolved_at: r.resolved_at.map(format_time),
            value: r.value,
            threshold: r.threshold,
            acknowledged_at: r.acknowledged_at.map(format_time),
            acknowledged_by: r.acknowledged_by,
            note: r.note,
            peak_value: r.peak_value,
            // Milliseconds to seconds: exact to the millisecond as a decimal number.
            duration_seconds: r
                .resolved_at
                .map(|at| (at - r.triggered_at) as f64 / 1000.0),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApiKeyRow {
    pub id: String,
    pub org_id: String,
    pub scopes: String,
}
