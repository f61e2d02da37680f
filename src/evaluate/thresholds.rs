//! The threshold and offline state machine: pure logic over plain data.
//!
//! Given a unit's current state and thresholds, a reading (or a silence) yields the alert changes
//! and the new status. The caller applies the changes to storage, where unique indexes and
//! conditional updates make each change happen once even when several nodes race; this module
//! only decides what *should* change. "Above" and "below" are strict: a reading equal to a limit
//! is in range.

use crate::wire::{AlertType, UnitStatus};

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Thresholds {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// What the monitor knows about a unit's alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub status: UnitStatus,
    /// The open `temp_high` or `temp_low` alert, if any.
    pub excursion: Option<AlertType>,
    /// Whether an `offline` alert is open.
    pub offline: bool,
}

impl State {
    pub const NEW: State = State {
        status: UnitStatus::Unknown,
        excursion: None,
        offline: false,
    };
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    Open {
        kind: AlertType,
        value: Option<f64>,
        threshold: Option<f64>,
    },
    Resolve {
        kind: AlertType,
    },
}

/// Which side of the range a temperature is on, with the limit it crossed.
pub fn classify(t: &Thresholds, temperature: f64) -> Option<(AlertType, f64)> {
    match (t.max, t.min) {
        (Some(max), _) if temperature > max => Some((AlertType::TempHigh, max)),
        (_, Some(min)) if temperature < min => Some((AlertType::TempLow, min)),
        _ => None,
    }
}

/// A reading newer than every reading evaluated so far.
pub fn on_reading(state: State, t: &Thresholds, temperature: f64) -> (State, Vec<Change>) {
    let mut changes = Vec::new();
    if state.offline {
        changes.push(Change::Resolve {
            kind: AlertType::Offline,
        });
    }
    let now = classify(t, temperature);
    match (state.excursion, now) {
        (Some(open), Some((kind, _))) if open == kind => {}
        (open, now) => {
            if let Some(kind) = open {
                changes.push(Change::Resolve { kind });
            }
            if let Some((kind, threshold)) = now {
                changes.push(Change::Open {
                    kind,
                    value: Some(temperature),
                    threshold: Some(threshold),
                });
            }
        }
    }
    let next = State {
        status: if now.is_some() {
            UnitStatus::Excursion
        } else {
            UnitStatus::Ok
        },
        excursion: now.map(|(kind, _)| kind),
        offline: false,
    };
    (next, changes)
}

/// The unit has been silent for its offline timeout. `None` when nothing changes: it is
/// already offline, or it never sent a reading (status `unknown`).
pub fn on_silence(state: State) -> Option<(State, Change)> {
    if state.offline || state.status == UnitStatus::Unknown {
        return None;
    }
    let next = State {
        status: UnitStatus::Offline,
        offline: true,
        ..state
    };
    let open = Change::Open {
        kind: AlertType::Offline,
        value: None,
        threshold: None,
    };
    Some((next, open))
}

#[cfg(test)]
mod tests {
    use super::*;
    use AlertType::*;

    const RANGE: Thresholds = Thresholds {
        min: Some(0.0),
        max: Some(5.0),
    };

    fn open(kind: AlertType, value: f64, threshold: f64) -> Change {
        Change::Open {
            kind,
            value: Some(value),
            threshold: Some(threshold),
        }
    }

    /// Feeds temperatures through the machine, collecting every change.
    fn run(temps: &[f64]) -> (State, Vec<Change>) {
        temps.iter().fold((State::NEW, vec![]), |(s, mut all), &t| {
            let (next, changes) = on_reading(s, &RANGE, t);
            all.extend(changes);
            (next, all)
        })
    }

    #[test]
    fn first_reading_in_range_is_ok_without_alerts() {
        assert_eq!(
            run(&[3.0]),
            (
                State {
                    status: UnitStatus::Ok,
                    excursion: None,
                    offline: false
                },
                vec![]
            )
        );
    }

    #[test]
    fn limits_are_in_range() {
        assert_eq!(run(&[5.0, 0.0]).1, vec![]);
        assert_eq!(run(&[5.0]).0.status, UnitStatus::Ok);
    }

    #[test]
    fn one_alert_per_excursion_then_resolved() {
        let (state, changes) = run(&[7.0, 8.0, 9.0]);
        assert_eq!(changes, vec![open(TempHigh, 7.0, 5.0)]);
        assert_eq!(state.status, UnitStatus::Excursion);
        let (state, changes) = on_reading(state, &RANGE, 4.0);
        assert_eq!(changes, vec![Change::Resolve { kind: TempHigh }]);
        assert_eq!(state.status, UnitStatus::Ok);
    }

    #[test]
    fn temp_low_below_min() {
        assert_eq!(run(&[-1.5]).1, vec![open(TempLow, -1.5, 0.0)]);
    }

    #[test]
    fn jumping_from_high_to_low_resolves_and_opens() {
        let (state, changes) = run(&[9.0, -3.0]);
        assert_eq!(
            changes,
            vec![
                open(TempHigh, 9.0, 5.0),
                Change::Resolve { kind: TempHigh },
                open(TempLow, -3.0, 0.0)
            ]
        );
        assert_eq!(state.status, UnitStatus::Excursion);
        assert_eq!(state.excursion, Some(TempLow));
    }

    #[test]
    fn missing_limits_never_alert() {
        let none = Thresholds::default();
        assert_eq!(on_reading(State::NEW, &none, 1e9).1, vec![]);
        let only_max = Thresholds {
            min: None,
            max: Some(5.0),
        };
        assert_eq!(on_reading(State::NEW, &only_max, -1e9).1, vec![]);
    }

    #[test]
    fn offline_opens_once_and_the_next_reading_resolves_it() {
        assert_eq!(
            on_silence(State::NEW),
            None,
            "a unit without readings is not offline"
        );
        let (ok, _) = run(&[3.0]);
        let (off, change) = on_silence(ok).unwrap();
        assert_eq!(off.status, UnitStatus::Offline);
        assert!(matches!(
            change,
            Change::Open {
                kind: Offline,
                value: None,
                ..
            }
        ));
        assert_eq!(on_silence(off), None, "no second offline alert");
        let (back, changes) = on_reading(off, &RANGE, 3.0);
        assert_eq!(changes, vec![Change::Resolve { kind: Offline }]);
        assert_eq!(back.status, UnitStatus::Ok);
    }

    #[test]
    fn offline_during_an_excursion_keeps_the_excursion_alert() {
        let (high, _) = run(&[9.0]);
        let (off, _) = on_silence(high).unwrap();
        assert_eq!(off.excursion, Some(TempHigh));
        // Still high when it comes back: offline resolves, no second temp_high.
        let (state, changes) = on_reading(off, &RANGE, 9.5);
        assert_eq!(changes, vec![Change::Resolve { kind: Offline }]);
        assert_eq!(state.status, UnitStatus::Excursion);
    }

    #[test]
    fn threshold_changes_apply_to_the_next_reading() {
        let (high, _) = run(&[7.0]);
        let wider = Thresholds {
            min: Some(0.0),
            max: Some(10.0),
        };
        let (state, changes) = on_reading(high, &wider, 7.0);
        assert_eq!(changes, vec![Change::Resolve { kind: TempHigh }]);
        assert_eq!(state.status, UnitStatus::Ok);
    }

    /// Whatever the sequence, at most one excursion alert is open, and the status agrees with it.
    #[test]
    fn invariants_hold_for_many_sequences() {
        let temps = [-5.0, -0.1, 0.0, 2.5, 5.0, 5.1, 12.0];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut state = State::NEW;
            let mut open_alerts: Vec<AlertType> = vec![];
            for _ in 0..12 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                if seed.is_multiple_of(5) {
                    if let Some((next, Change::Open { kind, .. })) = on_silence(state) {
                        open_alerts.push(kind);
                        state = next;
                    }
                    continue;
                }
                let t = temps[(seed % temps.len() as u64) as usize];
                let (next, changes) = on_reading(state, &RANGE, t);
                for c in changes {
                    match c {
                        Change::Open { kind, .. } => {
                            assert!(!open_alerts.contains(&kind), "{kind:?} opened twice");
                            open_alerts.push(kind);
                        }
                        Change::Resolve { kind } => {
                            let i = open_alerts
                                .iter()
                                .position(|k| *k == kind)
                                .expect("resolving an open alert");
                            open_alerts.remove(i);
                        }
                    }
                }
                state = next;
                let excursions = open_alerts.iter().filter(|k| **k != Offline).count();
                assert!(excursions <= 1);
                assert_eq!(state.status == UnitStatus::Excursion, excursions == 1);
                assert!(!open_alerts.contains(&Offline));
                assert_eq!(classify(&RANGE, t).is_some(), excursions == 1);
            }
        }
    }
}
