//! Announces the alert and status changes that storage decided, and looks for silent units.
//!
//! Every change is decided and written in a transaction together with the events announcing it
//! (the `event_outbox` rows; see `store::unit_state`). This task sends those events to the
//! emitter and deletes each row once the emitter reports it out. Rows come from three places:
//! - the ingest writer hands over the events of each commit at once;
//! - the offline sweep marks silent units offline, one storage-arbitrated transaction each, so
//!   however many nodes sweep, one `offline` alert opens;
//! - the relay takes rows whose lease ran out — their node died between its commit and the
//!   announcement, or lost its way out — and announces them. With several nodes any live node
//!   may; the organisation's Redis stream keeps each event once (it drops a second copy of one
//!   outbox row).
//!
//! Rows this node has handed to the emitter and not yet deleted are "in flight": it renews their
//! leases, and its own relay skips them, so a slow emitter makes no node announce them twice.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::deliver::outbox::Outbox;
use crate::deliver::relay::Relay;
use crate::ingest::Handover;
use crate::rooms;
use crate::store::{Leased, OutboxEvent, PendingReading, Store, now_ms};
use crate::wire::{ReadingsBatch, SensorReading};

/// How many expired rows one relay round takes.
const RELAY_BATCH: i64 = 500;

/// How often expired rows are looked for, and this node's in-flight leases renewed (well within
/// `LEASE_MS`).
const RELAY_EVERY: Duration = Duration::from_millis(250);

/// How long a shutdown waits for the emitter to report the last events out.
const DRAIN: Duration = Duration::from_secs(3);

pub struct Monitor {
    store: Store,
    outbox: Outbox,
    relay: Relay,
    /// The most readings in one batch event (`BATCH_MAX_READINGS`).
    max_per_event: usize,
    in_flight: InFlight,
}

/// The rows this node has handed to the emitter and not yet deleted ("in flight"), and those
/// to delete. Kept apart from storage so that the lease rules can be tested without it.
#[derive(Default)]
struct InFlight {
    rows: HashSet<Leased>,
    /// Announced rows whose delete failed (storage away): retried on the next tick.
    to_delete: Vec<Leased>,
}

impl InFlight {
    /// Takes `row` on; `false` when it is in flight already (this node announces it once).
    fn claim(&mut self, row: Leased) -> bool {
        self.rows.insert(row)
    }

    fn contains(&self, row: Leased) -> bool {
        self.rows.contains(&row)
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The emitter reported `row` out: its row goes, and until then it stays in flight.
    fn sent(&mut self, row: Leased) {
        self.to_delete.push(row);
    }

    /// A claimed row with nothing to announce (malformed, or none of its readings left): deleted
    /// without going out.
    fn discard(&mut self, row: Leased) {
        self.rows.remove(&row);
        self.to_delete.push(row);
    }

    /// The rows to delete went: they are no longer in flight.
    fn deleted(&mut self) {
        for id in self.to_delete.drain(..) {
            self.rows.remove(&id);
        }
    }

    /// The leases to renew.
    fn leases(&self) -> Vec<Leased> {
        self.rows.iter().copied().collect()
    }

    /// Of the expired events claimed, those that no one on this node is announcing.
    fn orphans(&self, claimed: Vec<OutboxEvent>) -> Vec<OutboxEvent> {
        claimed
            .into_iter()
            .filter(|e| !self.contains(Leased::Event(e.id)))
            .collect()
    }
}

/// Readings of a commit whose node died before its flush, as that flush would have sent them:
/// one unit's readings per event, in `recordedAt` order, split at the cap; units in
/// (organisation, unit) order. Each with its organisation and site.
fn relayed_batches(
    readings: Vec<PendingReading>,
    max_per_event: usize,
) -> Vec<(String, String, ReadingsBatch)> {
    let mut by_unit: BTreeMap<(String, String), (String, Vec<SensorReading>)> = BTreeMap::new();
    for p in readings {
        by_unit
            .entry((p.org_id, p.reading.reading.unit_id.clone()))
            .or_insert_with(|| (p.site_id, Vec::new()))
            .1
            .push(SensorReading::from(p.reading));
    }
    let mut events = Vec::new();
    for ((org, unit), (site, mut readings)) in by_unit {
        readings.sort_by(|a, b| a.recorded_at.cmp(&b.recorded_at));
        for batch in crate::deliver::fanout::batches(&unit, readings.iter(), max_per_event) {
            events.push((org.clone(), site.clone(), batch));
        }
    }
    events
}

impl Monitor {
    pub fn new(store: Store, outbox: Outbox, relay: Relay, max_per_event: usize) -> Self {
        Monitor {
            store,
            outbox,
            relay,
            max_per_event,
            in_flight: InFlight::default(),
        }
    }

    /// `committed`: the events of each commit, from the ingest writer; `sent`: outbox ids the
    /// emitter has sent. Ends when `committed` closes (shutdown), after the emitter has reported
    /// what is in flight (or [`DRAIN`] has passed).
    pub async fn run(
        mut self,
        mut committed: mpsc::Receiver<Handover>,
        mut sent: mpsc::UnboundedReceiver<Leased>,
        sweep_every: Duration,
    ) {
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut relay = tokio::time::interval(RELAY_EVERY);
        relay.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Biased: a commit's handover is taken before the emitter's report that its
                // batches are out, which can only come after it.
                biased;
                handover = committed.recv() => match handover {
                    Some(h) => self.take(h).await,
                    None => break,
                },
                Some(id) = sent.recv() => self.sent(id, &mut sent).await,
                _ = sweep.tick() => self.sweep().await,
                _ = relay.tick() => self.relay(&mut committed).await,
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN;
        while !self.in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, sent.recv()).await {
                Ok(Some(id)) => self.sent(id, &mut sent).await,
                _ => break,
            }
        }
        self.flush_deletes().await;
        tracing::debug!("monitor stopped");
    }

    /// A commit's rows are this node's from here on: in flight, never relayed as orphans.
    async fn take(&mut self, h: Handover) {
        if let Some(pending) = h.pending {
            self.in_flight.claim(Leased::Readings(pending));
        }
        self.announce(h.events).await;
    }

    /// Takes the handovers already queued. Before claiming expired rows: a commit slow enough
    /// to outlive its own lease (SQLite under load) is otherwise claimed as an orphan by its
    /// own node while its handover waits in the channel, and its batches go out twice.
    async fn take_queued(&mut self, committed: &mut mpsc::Receiver<Handover>) {
        while let Ok(h) = committed.try_recv() {
            self.take(h).await;
        }
    }

    async fn announce(&mut self, events: Vec<OutboxEvent>) {
        let mut alerts_changed: Vec<String> = Vec::new();
        for e in events {
            if !self.in_flight.claim(Leased::Event(e.id)) {
                continue;
            }
            let (Ok(rooms), Ok(payload)) = (
                serde_json::from_str::<Vec<String>>(&e.rooms),
                RawValue::from_string(e.payload),
            ) else {
                tracing::error!(id = e.id, "malformed outbox event; dropped");
                self.in_flight.discard(Leased::Event(e.id));
                continue;
            };
            if e.event.starts_with("alert:") && !alerts_changed.contains(&e.org_id) {
                alerts_changed.push(e.org_id.clone());
            }
            self.outbox
                .send_stored(&e.org_id, rooms, e.event, payload, e.id)
                .await;
        }
        // Plain WebSocket subscribers get the open alerts again (storage has them already).
        for org in alerts_changed {
            self.relay.alerts_changed(&org).await;
        }
    }

    /// The emitter sent `first` (and maybe more): delete their rows.
    async fn sent(&mut self, first: Leased, more: &mut mpsc::UnboundedReceiver<Leased>) {
        self.in_flight.sent(first);
        while let Ok(id) = more.try_recv() {
            self.in_flight.sent(id);
        }
        self.flush_deletes().await;
    }

    async fn flush_deletes(&mut self) {
        if self.in_flight.to_delete.is_empty() {
            return;
        }
        match self.store.release(&self.in_flight.to_delete).await {
            Ok(()) => self.in_flight.deleted(),
            Err(e) => tracing::warn!(error = %e, "forgetting announced events failed; retrying"),
        }
    }

    async fn relay(&mut self, committed: &mut mpsc::Receiver<Handover>) {
        self.flush_deletes().await;
        if !self.in_flight.is_empty() {
            let leased = self.in_flight.leases();
            if let Err(e) = self.store.renew_leases(&leased, now_ms()).await {
                tracing::debug!(error = %e, "renewing the leases of what is in flight failed");
            }
        }
        self.take_queued(committed).await;
        self.relay_readings(committed).await;
        self.take_queued(committed).await;
        let claimed = match self.store.claim_outbox(now_ms(), RELAY_BATCH).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::debug!(error = %e, "reading the event outbox failed");
                return;
            }
        };
        // A commit that ended while the claim ran sent its handover right after.
        self.take_queued(committed).await;
        let orphans = self.in_flight.orphans(claimed);
        if !orphans.is_empty() {
            tracing::info!(
                events = orphans.len(),
                "announcing stored events that their node did not send"
            );
            self.announce(orphans).await;
        }
    }

    /// Announces the readings of commits whose node died before its flush: read back from
    /// storage, batched per unit in `recordedAt` order, sent like any batch.
    async fn relay_readings(&mut self, committed: &mut mpsc::Receiver<Handover>) {
        let claimed = match self.store.claim_pending(now_ms(), 20).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::debug!(error = %e, "reading the pending batches failed");
                return;
            }
        };
        self.take_queued(committed).await;
        for (id, ranges) in claimed {
            let leased = Leased::Readings(id);
            if self.in_flight.contains(leased) {
                continue;
            }
            let readings = match self.store.pending_readings(&ranges).await {
                Ok(readings) => readings,
                Err(e) => {
                    tracing::warn!(error = %e, "reading back unannounced readings failed");
                    continue;
                }
            };
            tracing::info!(
                readings = readings.len(),
                "announcing stored readings that their node did not send"
            );
            self.in_flight.claim(leased);
            let events = relayed_batches(readings, self.max_per_event);
            let last = events.len();
            for (i, (org, site, batch)) in events.into_iter().enumerate() {
                let done = if i + 1 == last {
                    vec![leased]
                } else {
                    Vec::new()
                };
                let rooms = rooms::unit_event_rooms(&org, &site).to_vec();
                self.outbox
                    .send_to_org_done(&org, rooms, "sensor:readings:batch", &batch, done)
                    .await;
            }
            if last == 0 {
                // Every unit of it is gone: nothing to announce.
                self.in_flight.discard(leased);
            }
        }
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
            match self.store.go_offline(&org, &unit, now_ms()).await {
                Ok(events) if !events.is_empty() => {
                    tracing::info!(org = %org, "unit offline");
                    self.announce(events).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "offline alert failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{NewReading, ReadingRow};

    fn event(id: i64) -> OutboxEvent {
        OutboxEvent {
            id,
            org_id: "org".into(),
            event: "alert:triggered".into(),
            rooms: "[]".into(),
            payload: "{}".into(),
        }
    }

    fn ids(events: &[OutboxEvent]) -> Vec<i64> {
        events.iter().map(|e| e.id).collect()
    }

    fn pending(org: &str, site: &str, unit: &str, id: i64, at: i64) -> PendingReading {
        PendingReading {
            org_id: org.into(),
            site_id: site.into(),
            reading: ReadingRow {
                id,
                reading: NewReading {
                    unit_id: unit.into(),
                    device_id: String::new(),
                    temperature: 3.0,
                    humidity: None,
                    battery: None,
                    signal_strength: None,
                    recorded_at: at,
                    source: "test".into(),
                },
            },
        }
    }

    #[test]
    fn an_event_is_announced_once_while_in_flight() {
        let mut rows = InFlight::default();
        assert!(rows.claim(Leased::Event(1)));
        assert!(!rows.claim(Leased::Event(1)), "a second copy is skipped");
        // Event and readings rows are numbered apart.
        assert!(rows.claim(Leased::Readings(1)));
    }

    #[test]
    fn the_relay_skips_the_rows_in_flight() {
        let mut rows = InFlight::default();
        rows.claim(Leased::Event(2));
        rows.claim(Leased::Readings(3));
        assert_eq!(
            ids(&rows.orphans(vec![event(1), event(2), event(3)])),
            [1, 3],
            "readings row 3 in flight says nothing of event 3"
        );
    }

    #[test]
    fn a_row_stays_in_flight_leases_renewed_until_its_delete_went_through() {
        let mut rows = InFlight::default();
        rows.claim(Leased::Event(1));
        rows.claim(Leased::Readings(2));
        rows.sent(Leased::Event(1));
        // Sent but not yet deleted (the delete may fail): still this node's.
        assert!(rows.contains(Leased::Event(1)));
        assert!(rows.orphans(vec![event(1)]).is_empty());
        let mut leases = rows.leases();
        leases.sort_by_key(|l| format!("{l:?}"));
        assert_eq!(leases, [Leased::Event(1), Leased::Readings(2)]);
        rows.deleted();
        assert!(!rows.contains(Leased::Event(1)));
        assert_eq!(rows.leases(), [Leased::Readings(2)]);
        assert!(rows.to_delete.is_empty());
    }

    #[test]
    fn a_failed_delete_keeps_every_row_for_the_next_try() {
        let mut rows = InFlight::default();
        rows.claim(Leased::Event(1));
        rows.claim(Leased::Event(2));
        rows.sent(Leased::Event(1));
        // The delete failed: nothing called `deleted`; more reports arrive meanwhile.
        rows.sent(Leased::Event(2));
        assert_eq!(rows.to_delete, [Leased::Event(1), Leased::Event(2)]);
        assert!(!rows.is_empty(), "shutdown keeps waiting for them");
        rows.deleted();
        assert!(rows.is_empty());
    }

    #[test]
    fn a_row_with_nothing_to_announce_is_deleted_without_going_out() {
        let mut rows = InFlight::default();
        rows.claim(Leased::Event(5));
        rows.discard(Leased::Event(5));
        assert!(!rows.contains(Leased::Event(5)));
        assert!(rows.is_empty(), "shutdown does not wait for it");
        assert_eq!(rows.to_delete, [Leased::Event(5)]);
    }

    #[test]
    fn relayed_readings_are_batched_per_unit_in_recorded_at_order() {
        let got = relayed_batches(
            vec![
                pending("org-b", "s1", "u1", 1, 5),
                pending("org-a", "s2", "u2", 2, 30),
                pending("org-a", "s2", "u2", 3, 10),
                pending("org-a", "s1", "u1", 4, 20),
                pending("org-a", "s2", "u2", 5, 20),
            ],
            100,
        );
        let shape: Vec<(&str, &str, &str, Vec<&str>)> = got
            .iter()
            .map(|(org, site, b)| {
                let ids = b.readings.iter().map(|r| r.id.as_str()).collect();
                (org.as_str(), site.as_str(), b.unit_id.as_str(), ids)
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("org-a", "s1", "u1", vec!["4"]),
                ("org-a", "s2", "u2", vec!["3", "5", "2"]),
                ("org-b", "s1", "u1", vec!["1"]),
            ]
        );
    }

    #[test]
    fn relayed_readings_split_at_the_cap_and_none_is_dropped() {
        let readings = (0..5).map(|i| pending("org", "s", "u", i, i)).collect();
        let got = relayed_batches(readings, 2);
        assert_eq!(
            got.iter().map(|(_, _, b)| b.count).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        assert!(relayed_batches(Vec::new(), 2).is_empty());
    }
}
