//! What a unit's new readings, or its silence, change — decided from the state storage holds for
//! that unit, never from a node's memory.
//!
//! The store reads the unit under its row lock inside the transaction that stores the readings
//! (or marks it offline), calls [`on_readings`] or [`on_silence`], and writes the returned
//! [`Verdict`] — alert rows, the unit's new status and latest reading, and the events announcing
//! them (the transactional outbox) — in that same transaction. Two nodes touching one unit
//! therefore take turns on its row, and each decides from what the other committed.
//!
//! Pure: no I/O, so every rule is unit-tested below in microseconds.

use crate::evaluate::thresholds::{self, Change, State, Thresholds};
use crate::rooms;
use crate::wire::{
    AlertResolved, AlertTriggered, AlertType, Severity, UnitStatus, UnitStatusChanged, format_time,
};

/// A unit as storage holds it, read under its row lock.
#[derive(Debug, Clone)]
pub struct StoredUnit {
    pub org_id: String,
    pub unit_id: String,
    pub site_id: String,
    pub name: String,
    pub thresholds: Thresholds,
    pub offline_after_seconds: i64,
    pub status: UnitStatus,
    pub status_since: Option<i64>,
    /// The newest `recordedAt` stored (and so evaluated): older readings never move state.
    pub last_reading_at: Option<i64>,
    pub last_temperature: Option<f64>,
    /// Server time of the last reading received, what silence is measured by.
    pub last_seen_at: Option<i64>,
    /// The unit's open alerts: id and type.
    pub open: Vec<(String, AlertType)>,
    /// The stored `peakValue` of open alerts that have one: id and peak.
    pub peaks: Vec<(String, f64)>,
    /// The `triggeredAt` of open alerts: id and time.
    pub triggered: Vec<(String, i64)>,
}

impl StoredUnit {
    fn state(&self) -> State {
        State {
            status: self.status,
            excursion: self
                .open
                .iter()
                .map(|(_, t)| *t)
                .find(|t| *t != AlertType::Offline),
            offline: self.open.iter().any(|(_, t)| *t == AlertType::Offline),
        }
    }
}

/// An alert to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    pub id: String,
    pub alert_type: AlertType,
    pub severity: Severity,
    pub message: String,
    pub triggered_at: i64,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// Set when the same commit also resolved it.
    pub resolved_at: Option<i64>,
    /// The most extreme reading of the excursion within this commit (the opening one, or a
    /// later one further out); `None` for `offline`.
    pub peak_value: Option<f64>,
}

/// An event to announce to the organisation, serialised once.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub org_id: String,
    pub rooms: Vec<String>,
    pub event: &'static str,
    pub payload: String,
}

/// Everything to write for one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub status: UnitStatus,
    pub status_since: Option<i64>,
    pub last_reading_at: Option<i64>,
    pub last_temperature: Option<f64>,
    pub opened: Vec<NewAlert>,
    /// Alerts open before this verdict that it resolves: id and `resolvedAt`.
    pub resolved: Vec<(String, i64)>,
    /// Alerts open before this verdict whose peak it moves further out: id and new peak.
    pub peaks: Vec<(String, f64)>,
    pub events: Vec<Announcement>,
}

impl Verdict {
    fn unchanged(unit: &StoredUnit) -> Self {
        Verdict {
            status: unit.status,
            status_since: unit.status_since,
            last_reading_at: unit.last_reading_at,
            last_temperature: unit.last_temperature,
            opened: Vec::new(),
            resolved: Vec::new(),
            peaks: Vec::new(),
            events: Vec::new(),
        }
    }
}

/// Evaluates new readings `(recordedAt, temperature)`, in `recordedAt` order, against the stored
/// state. A reading older than the stored latest is stored and broadcast but changes nothing;
/// one equal to it is evaluated (it may be another device's).
pub fn on_readings(unit: &StoredUnit, readings: &[(i64, f64)]) -> Verdict {
    let mut sorted = readings.to_vec();
    sorted.sort_by_key(|(at, _)| *at);
    let mut v = Verdict::unchanged(unit);
    let mut open = unit.open.clone();
    let mut state = unit.state();
    for (at, temperature) in sorted {
        if v.last_reading_at.is_some_and(|latest| at < latest) {
            // Older than the latest: it moves no state, but out of range on the side of the
            // open excursion and recorded after it opened, it is one of that excursion's
            // readings (arrived late, or committed after a newer one by another node).
            if let Some(kind) = state.excursion
                && thresholds::classify(&unit.thresholds, temperature)
                    .is_some_and(|(k, _)| k == kind)
                && opened_at(unit, &v, &open, kind).is_some_and(|t| at >= t)
            {
                raise_peak(unit, &mut v, &open, kind, temperature);
            }
            continue;
        }
        let (next, changes) = thresholds::on_reading(state, &unit.thresholds, temperature);
        apply(unit, &mut v, &mut open, &changes, at);
        if let Some(kind) = next.excursion {
            raise_peak(unit, &mut v, &open, kind, temperature);
        }
        if next.status != state.status {
            set_status(unit, &mut v, next.status, at);
        }
        state = next;
        v.last_reading_at = Some(at);
        v.last_temperature = Some(temperature);
    }
    v
}

/// The unit has been silent since `last_seen_at`; `None` when that does not make it offline
/// (not silent long enough, already offline, or it never reported).
pub fn on_silence(unit: &StoredUnit, now: i64) -> Option<Verdict> {
    let seen = unit.last_seen_at?;
    if seen + unit.offline_after_seconds * 1000 > now {
        return None;
    }
    let (next, change) = thresholds::on_silence(unit.state())?;
    let mut v = Verdict::unchanged(unit);
    let mut open = unit.open.clone();
    apply(unit, &mut v, &mut open, &[change], now);
    set_status(unit, &mut v, next.status, now);
    Some(v)
}

fn set_status(unit: &StoredUnit, v: &mut Verdict, status: UnitStatus, at: i64) {
    v.status = status;
    v.status_since = Some(at);
    v.events.push(announce(
        unit,
        "unit:status",
        &UnitStatusChanged {
            unit_id: unit.unit_id.clone(),
            status,
            since: format_time(at),
            offset: None,
        },
    ));
}

/// Turns state-machine changes into alert rows and their events; `open` tracks the unit's open
/// alerts as they change.
fn apply(
    unit: &StoredUnit,
    v: &mut Verdict,
    open: &mut Vec<(String, AlertType)>,
    changes: &[Change],
    at: i64,
) {
    for change in changes {
        match *change {
            Change::Open {
                kind,
                value,
                threshold,
            } => {
                let severity = match kind {
                    AlertType::Offline => Severity::Warning,
                    _ => Severity::Critical,
                };
                let alert = NewAlert {
                    id: new_alert_id(),
                    alert_type: kind,
                    severity,
                    message: describe(unit, kind, value, threshold),
                    triggered_at: at,
                    value,
                    threshold,
                    resolved_at: None,
                    peak_value: value,
                };
                v.events.push(announce(
                    unit,
                    "alert:triggered",
                    &AlertTriggered {
                        alert_id: alert.id.clone(),
                        unit_id: unit.unit_id.clone(),
                        site_id: unit.site_id.clone(),
                        alert_type: kind,
                        severity,
                        message: alert.message.clone(),
                        triggered_at: format_time(at),
                        value,
                        threshold,
                        offset: None,
                    },
                ));
                open.push((alert.id.clone(), kind));
                v.opened.push(alert);
            }
            Change::Resolve { kind } => {
                // The state machine resolves only what the stored state says is open.
                let Some(i) = open.iter().position(|(_, t)| *t == kind) else {
                    continue;
                };
                let (id, _) = open.remove(i);
                v.events.push(announce(
                    unit,
                    "alert:resolved",
                    &AlertResolved {
                        alert_id: id.clone(),
                        unit_id: unit.unit_id.clone(),
                        resolved_at: format_time(at),
                        offset: None,
                    },
                ));
                // Opened and resolved in one commit: the row is inserted already resolved (so a
                // second excursion of the same type in the commit cannot clash with it).
                match v.opened.iter_mut().find(|a| a.id == id) {
                    Some(a) => a.resolved_at = Some(at),
                    None => v.resolved.push((id, at)),
                }
            }
        }
    }
}

/// When the open `kind` alert was triggered.
fn opened_at(
    unit: &StoredUnit,
    v: &Verdict,
    open: &[(String, AlertType)],
    kind: AlertType,
) -> Option<i64> {
    let (id, _) = open.iter().find(|(_, k)| *k == kind)?;
    v.opened
        .iter()
        .find(|a| &a.id == id)
        .map(|a| a.triggered_at)
        .or_else(|| {
            unit.triggered
                .iter()
                .find(|(i, _)| i == id)
                .map(|(_, t)| *t)
        })
}

/// A reading out of range on the side of the open `kind` excursion: moves that alert's peak
/// further out if it is (highest for `temp_high`, lowest for `temp_low`). The peak is decided
/// here, from the stored one, like the rest of the alert state: never from a node's memory.
fn raise_peak(
    unit: &StoredUnit,
    v: &mut Verdict,
    open: &[(String, AlertType)],
    kind: AlertType,
    temperature: f64,
) {
    let Some((id, _)) = open.iter().find(|(_, k)| *k == kind) else {
        return;
    };
    let further = |peak: Option<f64>| match peak {
        None => true,
        Some(p) if kind == AlertType::TempLow => temperature < p,
        Some(p) => temperature > p,
    };
    if let Some(a) = v.opened.iter_mut().find(|a| &a.id == id) {
        if further(a.peak_value) {
            a.peak_value = Some(temperature);
        }
        return;
    }
    let current = v
        .peaks
        .iter()
        .chain(&unit.peaks)
        .find(|(i, _)| i == id)
        .map(|(_, p)| *p);
    if further(current) {
        v.peaks.retain(|(i, _)| i != id);
        v.peaks.push((id.clone(), temperature));
    }
}

fn announce<T: serde::Serialize>(
    unit: &StoredUnit,
    event: &'static str,
    payload: &T,
) -> Announcement {
    Announcement {
        org_id: unit.org_id.clone(),
        rooms: rooms::unit_event_rooms(&unit.org_id, &unit.site_id).to_vec(),
        event,
        payload: serde_json::to_string(payload).expect("event payloads serialise"),
    }
}

fn new_alert_id() -> String {
    let mut bytes = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    format!("al-{}", hex::encode(bytes))
}

fn describe(
    unit: &StoredUnit,
    kind: AlertType,
    value: Option<f64>,
    threshold: Option<f64>,
) -> String {
    let (v, t) = (value.unwrap_or_default(), threshold.unwrap_or_default());
    match kind {
        AlertType::TempHigh => format!("{}: {v} °C is above the maximum of {t} °C", unit.name),
        AlertType::TempLow => format!("{}: {v} °C is below the minimum of {t} °C", unit.name),
        AlertType::Offline => format!(
            "{}: no reading for {} s",
            unit.name, unit.offline_after_seconds
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AlertType::*;

    fn unit() -> StoredUnit {
        StoredUnit {
            org_id: "o".into(),
            unit_id: "u".into(),
            site_id: "s".into(),
            name: "Fridge".into(),
            thresholds: Thresholds {
                min: Some(0.0),
                max: Some(5.0),
            },
            offline_after_seconds: 60,
            status: UnitStatus::Unknown,
            status_since: None,
            last_reading_at: None,
            last_temperature: None,
            last_seen_at: None,
            open: Vec::new(),
            peaks: Vec::new(),
            triggered: Vec::new(),
        }
    }

    /// What storage holds after writing `v` (as the store does).
    fn commit(mut u: StoredUnit, v: &Verdict, seen: i64) -> StoredUnit {
        u.status = v.status;
        u.status_since = v.status_since;
        u.last_reading_at = v.last_reading_at;
        u.last_temperature = v.last_temperature;
        u.last_seen_at = Some(seen);
        for a in v.opened.iter().filter(|a| a.resolved_at.is_none()) {
            u.open.push((a.id.clone(), a.alert_type));
        }
        u.open
            .retain(|(id, _)| !v.resolved.iter().any(|(r, _)| r == id));
        for a in v.opened.iter().filter(|a| a.resolved_at.is_none()) {
            u.triggered.push((a.id.clone(), a.triggered_at));
            if let Some(p) = a.peak_value {
                u.peaks.push((a.id.clone(), p));
            }
        }
        for (id, p) in &v.peaks {
            u.peaks.retain(|(i, _)| i != id);
            u.peaks.push((id.clone(), *p));
        }
        u.peaks
            .retain(|(id, _)| u.open.iter().any(|(o, _)| o == id));
        u
    }

    fn peak_of(u: &StoredUnit, id: &str) -> Option<f64> {
        u.peaks.iter().find(|(i, _)| i == id).map(|(_, p)| *p)
    }

    /// The opening reading sets the peak; later readings further out raise (temp_high) or
    /// lower (temp_low) it, across commits; readings back towards the limit leave it.
    #[test]
    fn peak_follows_the_most_extreme_reading_of_the_excursion() {
        let opened = on_readings(&unit(), &[(1000, 7.0)]);
        assert_eq!(opened.opened[0].peak_value, Some(7.0));
        let id = opened.opened[0].id.clone();
        let stored = commit(unit(), &opened, 1000);
        assert_eq!(peak_of(&stored, &id), Some(7.0));
        let v = on_readings(&stored, &[(2000, 9.5), (3000, 8.0)]);
        assert_eq!(v.peaks, vec![(id.clone(), 9.5)]);
        let stored = commit(stored, &v, 3000);
        // Lower than the peak but still out of range: unchanged, nothing to write.
        let v = on_readings(&stored, &[(4000, 6.0)]);
        assert!(v.peaks.is_empty());
        // An older reading from before the excursion opened is not one of its readings.
        let v = on_readings(&stored, &[(500, 20.0)]);
        assert!(v.peaks.is_empty());
        // One recorded during the excursion but committed late (by another node) is: it
        // raises the peak, and moves no other state.
        let v = on_readings(&stored, &[(2500, 12.0)]);
        assert_eq!(v.peaks, vec![(id.clone(), 12.0)]);
        assert!(v.events.is_empty() && v.opened.is_empty() && v.resolved.is_empty());
        assert_eq!(v.last_reading_at, Some(3000));
        // Late but in range, or on the other side: nothing.
        assert!(
            on_readings(&stored, &[(2600, 4.0), (2700, -9.0)])
                .peaks
                .is_empty()
        );
        // Back in range: resolved, the peak stays what it was.
        let v = on_readings(&stored, &[(5000, 3.0)]);
        assert!(v.peaks.is_empty());
        assert_eq!(v.resolved.len(), 1);
    }

    #[test]
    fn peak_of_a_low_excursion_is_its_lowest_reading() {
        let v = on_readings(&unit(), &[(1000, -1.0), (2000, -4.0), (3000, -2.0)]);
        assert_eq!(v.opened.len(), 1);
        assert_eq!(v.opened[0].peak_value, Some(-4.0));
        let stored = commit(unit(), &v, 3000);
        let id = v.opened[0].id.clone();
        let v = on_readings(&stored, &[(4000, -6.5)]);
        assert_eq!(v.peaks, vec![(id, -6.5)]);
        // A jump from low straight to high: the new temp_high alert starts its own peak.
        let stored = commit(stored, &v, 4000);
        let v = on_readings(&stored, &[(5000, 8.0), (6000, 11.0)]);
        assert!(v.peaks.is_empty());
        assert_eq!(v.opened[0].alert_type, TempHigh);
        assert_eq!(v.opened[0].peak_value, Some(11.0));
    }

    #[test]
    fn offline_alerts_have_no_peak() {
        let stored = commit(unit(), &on_readings(&unit(), &[(1000, 3.0)]), 1000);
        let off = on_silence(&stored, 61_000).expect("offline");
        assert_eq!(off.opened[0].peak_value, None);
        assert!(off.peaks.is_empty());
    }

    fn events(v: &Verdict) -> Vec<&'static str> {
        v.events.iter().map(|e| e.event).collect()
    }

    #[test]
    fn first_reading_sets_status_without_alert() {
        let v = on_readings(&unit(), &[(1000, 3.0)]);
        assert_eq!(v.status, UnitStatus::Ok);
        assert_eq!(v.status_since, Some(1000));
        assert_eq!(events(&v), vec!["unit:status"]);
        assert!(v.opened.is_empty());
    }

    /// The bug two nodes with their own memory had: storage says an excursion is open, this
    /// evaluation must resolve it, whoever opened it.
    #[test]
    fn resolves_an_alert_opened_elsewhere() {
        let opened = on_readings(&unit(), &[(1000, 9.0)]);
        assert_eq!(events(&opened), vec!["alert:triggered", "unit:status"]);
        let stored = commit(unit(), &opened, 1000);
        let back = on_readings(&stored, &[(2000, 3.0)]);
        assert_eq!(back.resolved, vec![(opened.opened[0].id.clone(), 2000)]);
        assert_eq!(back.status, UnitStatus::Ok);
        assert_eq!(events(&back), vec!["alert:resolved", "unit:status"]);
        // And a second excursion opens a second alert.
        let stored = commit(stored, &back, 2000);
        let again = on_readings(&stored, &[(3000, 9.0)]);
        assert_eq!(again.opened.len(), 1);
        assert_ne!(again.opened[0].id, opened.opened[0].id);
    }

    #[test]
    fn older_readings_never_move_state() {
        let stored = commit(unit(), &on_readings(&unit(), &[(5000, 3.0)]), 5000);
        let v = on_readings(&stored, &[(4000, 9.0)]);
        assert!(v.events.is_empty() && v.opened.is_empty());
        assert_eq!(v.last_reading_at, Some(5000));
        assert_eq!(v.last_temperature, Some(3.0));
        // Equal time is evaluated.
        let v = on_readings(&stored, &[(5000, 9.0)]);
        assert_eq!(v.opened.len(), 1);
    }

    /// A re-created unit has no stored latest: any first reading is evaluated.
    #[test]
    fn a_new_unit_evaluates_any_first_reading() {
        let v = on_readings(&unit(), &[(1, -4.0)]);
        assert_eq!(v.opened[0].alert_type, TempLow);
        assert_eq!(v.status, UnitStatus::Excursion);
    }

    #[test]
    fn readings_of_one_commit_are_evaluated_in_time_order() {
        // Arrived out of order: 3.0 @2000 is the newest, so the unit ends ok with one
        // excursion opened and resolved on the way.
        let v = on_readings(&unit(), &[(2000, 3.0), (1000, 9.0)]);
        assert_eq!(
            events(&v),
            vec![
                "alert:triggered",
                "unit:status",
                "alert:resolved",
                "unit:status"
            ]
        );
        assert_eq!(v.status, UnitStatus::Ok);
        assert_eq!(v.last_temperature, Some(3.0));
        assert_eq!(v.opened[0].resolved_at, Some(2000));
        assert!(v.resolved.is_empty());
        // Two excursions of one type in one commit: two rows, the first already resolved.
        let v = on_readings(&unit(), &[(1000, 9.0), (2000, 3.0), (3000, 9.0)]);
        assert_eq!(v.opened.len(), 2);
        assert_eq!(v.opened[0].resolved_at, Some(2000));
        assert_eq!(v.opened[1].resolved_at, None);
    }

    #[test]
    fn jump_from_high_to_low() {
        let stored = commit(unit(), &on_readings(&unit(), &[(1000, 9.0)]), 1000);
        let v = on_readings(&stored, &[(2000, -3.0)]);
        assert_eq!(events(&v), vec!["alert:resolved", "alert:triggered"]);
        assert_eq!(v.status, UnitStatus::Excursion);
        assert_eq!(v.opened[0].alert_type, TempLow);
    }

    #[test]
    fn silence_opens_one_offline_alert_and_a_reading_resolves_it() {
        assert_eq!(on_silence(&unit(), 1_000_000), None, "never reported");
        let stored = commit(unit(), &on_readings(&unit(), &[(1000, 3.0)]), 1000);
        assert_eq!(on_silence(&stored, 60_999), None, "not silent long enough");
        let off = on_silence(&stored, 61_000).expect("offline");
        assert_eq!(off.status, UnitStatus::Offline);
        assert_eq!(off.opened[0].alert_type, Offline);
        assert_eq!(off.opened[0].severity, Severity::Warning);
        assert_eq!(
            off.last_reading_at,
            Some(1000),
            "silence does not move the latest"
        );
        let stored = commit(stored, &off, 1000);
        assert_eq!(on_silence(&stored, 200_000), None, "already offline");
        let back = on_readings(&stored, &[(70_000, 3.0)]);
        assert_eq!(back.resolved, vec![(off.opened[0].id.clone(), 70_000)]);
        assert_eq!(back.status, UnitStatus::Ok);
    }

    #[test]
    fn events_go_to_the_units_organisation_rooms() {
        let v = on_readings(&unit(), &[(1000, 9.0)]);
        let e = &v.events[0];
        assert_eq!(e.org_id, "o");
        assert_eq!(e.rooms, rooms::unit_event_rooms("o", "s").to_vec());
        let payload: serde_json::Value = serde_json::from_str(&e.payload).unwrap();
        assert_eq!(payload["alertType"], "temp_high");
        assert_eq!(payload["threshold"], 5.0);
        assert_eq!(payload["triggeredAt"], "1970-01-01T00:00:01.000Z");
    }
}
