//! Validation of an ingest body: pure, all-or-nothing, and precise.
//!
//! Every problem is reported as `{ index, field, message }` so a device developer sees all of
//! them at once; a body with any problem is refused whole.

use serde_json::{Map, Value};

use crate::store::NewReading;
use crate::wire::{FieldError, valid_id};

/// How far in the future a `recordedAt` may be.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;
/// 2000-01-01T00:00:00Z: anything older is a device clock that was never set.
const MIN_TIME_MS: i64 = 946_684_800_000;

#[derive(Debug, PartialEq)]
pub enum Invalid {
    /// Not `{ "readings": [...] }`, or problems in the readings (422).
    Fields(Vec<FieldError>),
    /// More readings than allowed in one request (413).
    TooMany { count: usize, max: usize },
}

fn err(index: Option<usize>, field: &str, message: &str) -> FieldError {
    FieldError {
        index,
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a parsed body; `now_ms` bounds `recordedAt`.
pub fn validate(
    body: &Value,
    max_readings: usize,
    now_ms: i64,
) -> Result<Vec<NewReading>, Invalid> {
    let Some(items) = body.get("readings").and_then(Value::as_array) else {
        return Err(Invalid::Fields(vec![err(
            None,
            "readings",
            "the body must be { \"readings\": [ ... ] }",
        )]));
    };
    if items.is_empty() {
        return Err(Invalid::Fields(vec![err(
            None,
            "readings",
            "must not be empty",
        )]));
    }
    if items.len() > max_readings {
        return Err(Invalid::TooMany {
            count: items.len(),
            max: max_readings,
        });
    }
    let mut errors = Vec::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match item.as_object() {
            Some(obj) => {
                if let Some(r) = reading(i, obj, now_ms, &mut errors) {
                    out.push(r);
                }
            }
            None => errors.push(err(Some(i), "readings", "must be an object")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(Invalid::Fields(errors))
    }
}

fn reading(
    i: usize,
    o: &Map<String, Value>,
    now_ms: i64,
    errors: &mut Vec<FieldError>,
) -> Option<NewReading> {
    let before = errors.len();
    let mut e = |field: &str, message: &str| errors.push(err(Some(i), field, message));

    let unit_id = match o.get("unitId") {
        Some(Value::String(s)) if valid_id(s) => s.clone(),
        Some(Value::String(_)) => {
            e("unitId", "must be 1-64 characters of A-Z a-z 0-9 _ . : -");
            String::new()
        }
        None | Some(Value::Null) => {
            e("unitId", "is required");
            String::new()
        }
        Some(_) => {
            e("unitId", "must be a string");
            String::new()
        }
    };

    let temperature = match o.get("temperature") {
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if (-273.15..=1000.0).contains(&t) => t,
            _ => {
                e("temperature", "must be between -273.15 and 1000");
                0.0
            }
        },
        None | Some(Value::Null) => {
            e("temperature", "is required");
            0.0
        }
        Some(_) => {
            e("temperature", "must be a number");
            0.0
        }
    };

    let mut optional = |field: &str, range: Option<(f64, f64)>| -> Option<f64> {
        match o.get(field) {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                let v = n.as_f64().filter(|v| v.is_finite());
                match (v, range) {
                    (Some(v), Some((lo, hi))) if !(lo..=hi).contains(&v) => {
                        e(field, &format!("must be between {lo} and {hi}"));
                        None
                    }
                    (Some(v), _) => Some(v),
                    (None, _) => {
                        e(field, "must be a finite number");
                        None
                    }
                }
            }
            Some(_) => {
                e(field, "must be a number or null");
                None
            }
        }
    };
    let humidity = optional("humidity", Some((0.0, 100.0)));
    let battery = optional("battery", Some((0.0, 100.0)));
    let signal_strength = optional("signalStrength", None);

    let recorded_at = match o.get("recordedAt") {
        Some(Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) => {
                let ms = t.timestamp_millis();
                if ms > now_ms + MAX_FUTURE_MS {
                    e("recordedAt", "is more than 5 minutes in the future");
                } else if ms < MIN_TIME_MS {
                    e("recordedAt", "is before the year 2000");
                }
                ms
            }
            Err(_) => {
                e(
                    "recordedAt",
                    "must be an RFC 3339 time like 2026-01-02T03:04:05.678Z",
                );
                0
            }
        },
        None | Some(Value::Null) => {
            e("recordedAt", "is required");
            0
        }
        Some(_) => {
            e("recordedAt", "must be an RFC 3339 string");
            0
        }
    };

    let mut text = |field: &str, max: usize, default: &str| -> String {
        match o.get(field) {
            None | Some(Value::Null) => default.to_string(),
            Some(Value::String(s))
                if !s.is_empty() && s.len() <= max && !s.chars().any(char::is_control) =>
            {
                s.clone()
            }
            Some(Value::String(_)) => {
                e(field, &format!("must be 1-{max} printable characters"));
                String::new()
            }
            Some(_) => {
                e(field, "must be a string or null");
                String::new()
            }
        }
    };
    let source = text("source", 64, "api");
    let device_id = text("deviceId", 128, "");

    (errors.len() == before).then_some(NewReading {
        unit_id,
        device_id,
        temperature,
        humidity,
        battery,
        signal_strength,
        recorded_at,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000; // 2027-01-15

    fn fields(r: Result<Vec<NewReading>, Invalid>) -> Vec<(Option<usize>, String)> {
        match r {
            Err(Invalid::Fields(errs)) => errs.into_iter().map(|e| (e.index, e.field)).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_reading_with_defaults() {
        let body = json!({ "readings": [{ "unitId": "u-1", "temperature": 4, "recordedAt": "2027-01-15T08:00:00.123Z" }] });
        let r = validate(&body, 10, NOW).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].source, "api");
        assert_eq!(r[0].device_id, "");
        assert_eq!(r[0].temperature, 4.0);
        assert_eq!(
            crate::wire::format_time(r[0].recorded_at),
            "2027-01-15T08:00:00.123Z"
        );
    }

    #[test]
    fn times_keep_their_milliseconds_and_offsets() {
        let body = json!({ "readings": [{ "unitId": "u", "temperature": 1, "recordedAt": "2026-01-01T01:00:00.250+01:00" }] });
        let r = validate(&body, 10, NOW).unwrap();
        assert_eq!(r[0].recorded_at, 1_767_225_600_250);
    }

    #[test]
    fn every_problem_is_named_by_index_and_field() {
        let body = json!({ "readings": [
            { "unitId": "u-1", "temperature": 4, "recordedAt": "2027-01-15T08:00:00Z" },
            { "unitId": 7, "temperature": "hot", "recordedAt": "yesterday", "humidity": 140 },
            { "temperature": 4, "recordedAt": "2027-01-16T08:00:00Z", "deviceId": "" },
            "nope"
        ]});
        assert_eq!(
            fields(validate(&body, 10, NOW)),
            vec![
                (Some(1), "unitId".into()),
                (Some(1), "temperature".into()),
                (Some(1), "humidity".into()),
                (Some(1), "recordedAt".into()),
                (Some(2), "unitId".into()),
                (Some(2), "recordedAt".into()),
                (Some(2), "deviceId".into()),
                (Some(3), "readings".into()),
            ]
        );
    }

    #[test]
    fn future_limit_is_five_minutes() {
        let at = |ms: i64| json!({ "readings": [{ "unitId": "u", "temperature": 1, "recordedAt": crate::wire::format_time(ms) }] });
        assert!(validate(&at(NOW + MAX_FUTURE_MS), 10, NOW).is_ok());
        assert_eq!(
            fields(validate(&at(NOW + MAX_FUTURE_MS + 1), 10, NOW)),
            vec![(Some(0), "recordedAt".into())]
        );
    }

    #[test]
    fn shape_and_size() {
        assert_eq!(
            fields(validate(&json!([1, 2]), 10, NOW)),
            vec![(None, "readings".into())]
        );
        assert_eq!(
            fields(validate(&json!({ "readings": [] }), 10, NOW)),
            vec![(None, "readings".into())]
        );
        let many = json!({ "readings": vec![json!({}); 11] });
        assert_eq!(
            validate(&many, 10, NOW),
            Err(Invalid::TooMany { count: 11, max: 10 })
        );
    }
}
