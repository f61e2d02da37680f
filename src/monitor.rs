//! Applies the alert state machine ([`crate::alerts`]) to stored readings and to silence, writes
//! the changes, and emits `alert:triggered`, `alert:resolved` and `unit:status`.
//!
//! Storage arbitrates every change (a partial unique index for opening, conditional updates for
//! resolving and for status), and an event is emitted only by the call that made the change — so
//! concurrent requests, or several nodes, yield exactly one event per change. The in-memory state
//! here is a cache of what storage holds; on any storage error it is dropped and reloaded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::alerts::{self, Change, State};
use crate::bus::Bus;
use crate::ingest::Committed;
use crate::realtime::outbox::Outbox;
use crate::realtime::rooms;
use crate::store::{NewAlert, Store, StoreError, now_ms};
use crate::units::{UnitInfo, Units};
use crate::wire::{
    AlertResolved, AlertTriggered, AlertType, Severity, UnitStatus, UnitStatusChanged, format_time,
};

/// A unit's alert state and the newest `recordedAt` evaluated (older readings never move it).
#[derive(Debug, Clone, Copy)]
struct Tracked {
    state: State,
    evaluated_at: i64,
}

pub struct Monitor {
    store: Store,
    units: Arc<Units>,
    outbox: Outbox,
    bus: Bus,
    tracked: HashMap<(String, String), Tracked>,
}

impl Monitor {
    pub fn new(store: Store, units: Arc<Units>, outbox: Outbox, bus: Bus) -> Self {
        Monitor {
            store,
            units,
            outbox,
            bus,
            tracked: HashMap::new(),
        }
    }

    /// Evaluates committed readings as they come, and sweeps for silent units every `sweep_every`.
    pub async fn run(mut self, mut input: mpsc::Receiver<Arc<Committed>>, sweep_every: Duration) {
        let mut tick = tokio::time::interval(sweep_every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                committed = input.recv() => match committed {
                    Some(c) => self.on_committed(&c).await,
                    None => break,
                },
                _ = tick.tick() => self.sweep().await,
            }
        }
        tracing::debug!("monitor stopped");
    }

    async fn load(&mut self, org: &str, unit: &str) -> Result<Tracked, StoreError> {
        let key = (org.to_string(), unit.to_string());
        if let Some(t) = self.tracked.get(&key) {
            return Ok(*t);
        }
        let row = self.store.get_unit(org, unit).await?;
        let open = self.store.active_alert_types(org, unit).await?;
        let state = State {
            status: row
                .as_ref()
                .map(|r| UnitStatus::parse(&r.status))
                .unwrap_or(UnitStatus::Unknown),
            excursion: open
                .iter()
                .filter_map(|t| AlertType::parse(t))
                .find(|t| *t != AlertType::Offline),
            offline: open.iter().any(|t| t == "offline"),
        };
        let evaluated_at = row.and_then(|r| r.status_since).unwrap_or(i64::MIN);
        let t = Tracked {
            state,
            evaluated_at,
        };
        self.tracked.insert(key, t);
        Ok(t)
    }

    async fn on_committed(&mut self, c: &Committed) {
        // Per unit, in recordedAt order.
        let mut by_unit: HashMap<&str, Vec<(i64, f64)>> = HashMap::new();
        for s in &c.readings {
            by_unit
                .entry(&s.reading.unit_id)
                .or_default()
                .push((s.recorded_at, s.reading.temperature));
        }
        for (unit, mut readings) in by_unit {
            readings.sort_by_key(|(at, _)| *at);
            if let Err(e) = self.evaluate(&c.org_id, unit, &readings).await {
                tracing::warn!(error = %e, "alert evaluation failed; state reloads on the next reading");
                self.tracked.remove(&(c.org_id.clone(), unit.to_string()));
            }
        }
    }

    async fn evaluate(
        &mut self,
        org: &str,
        unit: &str,
        readings: &[(i64, f64)],
    ) -> Result<(), StoreError> {
        let Some(info) = self.units.get(org, unit).await? else {
            return Ok(()); // deleted meanwhile
        };
        let mut t = self.load(org, unit).await?;
        for &(at, temperature) in readings {
            if at < t.evaluated_at {
                continue; // out of order: stored and broadcast, but never moves state backwards
            }
            let (next, changes) = alerts::on_reading(t.state, &info.thresholds, temperature);
            self.apply(org, unit, &info, t.state, next, &changes, at)
                .await?;
            t = Tracked {
                state: next,
                evaluated_at: at,
            };
            self.tracked.insert((org.to_string(), unit.to_string()), t);
        }
        Ok(())
    }

    async fn sweep(&mut self) {
        let silent = match self.store.silent_units(now_ms()).await {
            Ok(units) => units,
            Err(e) => {
                tracing::warn!(error = %e, "offline sweep failed");
                return;
            }
        };
        for (org, unit) in silent {
            if let Err(e) = self.go_offline(&org, &unit).await {
                tracing::warn!(error = %e, "offline alert failed");
                self.tracked.remove(&(org, unit));
            }
        }
    }

    async fn go_offline(&mut self, org: &str, unit: &str) -> Result<(), StoreError> {
        let Some(info) = self.units.get(org, unit).await? else {
            return Ok(());
        };
        let mut t = self.load(org, unit).await?;
        if t.state.status == UnitStatus::Unknown {
            // Storage says it has readings; this node has not evaluated them yet.
            t.state.status = UnitStatus::Ok;
        }
        let Some((next, change)) = alerts::on_silence(t.state) else {
            return Ok(());
        };
        let now = now_ms();
        self.apply(org, unit, &info, t.state, next, &[change], now)
            .await?;
        self.tracked.insert(
            (org.to_string(), unit.to_string()),
            Tracked { state: next, ..t },
        );
        Ok(())
    }

    /// Writes each change and emits the events of the changes this call made.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        org: &str,
        unit: &str,
        info: &UnitInfo,
        prev: State,
        next: State,
        changes: &[Change],
        at: i64,
    ) -> Result<(), StoreError> {
        let rooms = || rooms::unit_event_rooms(org, &info.site_id).to_vec();
        for change in changes {
            match *change {
                Change::Open {
                    kind,
                    value,
                    threshold,
                } => {
                    let id = new_alert_id();
                    let severity = match kind {
                        AlertType::Offline => Severity::Warning,
                        _ => Severity::Critical,
                    };
                    let message = describe(info, kind, value, threshold);
                    let alert = NewAlert {
                        id: &id,
                        unit_id: unit,
                        site_id: &info.site_id,
                        alert_type: kind.as_str(),
                        severity: severity_str(severity),
                        message: &message,
                        triggered_at: at,
                        value,
                        threshold,
                    };
                    if self.store.open_alert(org, &alert).await? {
                        tracing::info!(org = %org, alert_type = kind.as_str(), "alert opened");
                        crate::observe::alert_opened(kind.as_str());
                        let event = AlertTriggered {
                            alert_id: id.clone(),
                            unit_id: unit.to_string(),
                            site_id: info.site_id.clone(),
                            alert_type: kind,
                            severity,
                            message,
                            triggered_at: format_time(at),
                            value,
                            threshold,
                            offset: None,
                        };
                        self.outbox
                            .send_to_org(org, rooms(), "alert:triggered", &event)
                            .await;
                        self.bus.alerts_changed(org).await;
                    }
                }
                Change::Resolve { kind } => {
                    if let Some(alert_id) = self
                        .store
                        .resolve_alert(org, unit, kind.as_str(), at)
                        .await?
                    {
                        tracing::info!(org = %org, alert_type = kind.as_str(), "alert resolved");
                        crate::observe::alert_resolved(kind.as_str());
                        let event = AlertResolved {
                            alert_id,
                            unit_id: unit.to_string(),
                            resolved_at: format_time(at),
                            offset: None,
                        };
                        self.outbox
                            .send_to_org(org, rooms(), "alert:resolved", &event)
                            .await;
                        self.bus.alerts_changed(org).await;
                    }
                }
            }
        }
        if next.status != prev.status
            && self
                .store
                .set_unit_status(org, unit, next.status.as_str(), at)
                .await?
        {
            let event = UnitStatusChanged {
                unit_id: unit.to_string(),
                status: next.status,
                since: format_time(at),
                offset: None,
            };
            self.outbox
                .send_to_org(org, rooms(), "unit:status", &event)
                .await;
        }
        Ok(())
    }
}

fn severity_str(s: Severity) -> &'static str {
    match s {
        Severity::Warning => "warning",
        Severity::Critical => "critical",
    }
}

fn new_alert_id() -> String {
    let mut bytes = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    format!("al-{}", hex::encode(bytes))
}

fn describe(
    info: &UnitInfo,
    kind: AlertType,
    value: Option<f64>,
    threshold: Option<f64>,
) -> String {
    let (v, t) = (value.unwrap_or_default(), threshold.unwrap_or_default());
    match kind {
        AlertType::TempHigh => format!("{}: {v} °C is above the maximum of {t} °C", info.name),
        AlertType::TempLow => format!("{}: {v} °C is below the minimum of {t} °C", info.name),
        AlertType::Offline => format!(
            "{}: no reading for {} s",
            info.name, info.offline_after_seconds
        ),
    }
}
