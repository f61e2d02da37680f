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

use std::collections::HashSet;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::deliver::outbox::Outbox;
use crate::deliver::relay::Bus;
use crate::ingest::Handover;
use crate::rooms;
use crate::store::{Leased, OutboxEvent, Store, now_ms};

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
    bus: Bus,
    /// The most readings in one batch event (`BATCH_MAX_READINGS`).
    max_per_event: usize,
    in_flight: HashSet<Leased>,
    /// Announced rows whose delete failed (storage away): retried on the next tick.
    to_delete: Vec<Leased>,
}

impl Monitor {
    pub fn new(store: Store, outbox: Outbox, bus: Bus, max_per_event: usize) -> Self {
        Monitor {
            store,
            outbox,
            bus,
            max_per_event,
            in_flight: HashSet::new(),
            to_delete: Vec::new(),
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
        self.in_flight.extend(h.pending.map(Leased::Readings));
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
            if !self.in_flight.insert(Leased::Event(e.id)) {
                continue;
            }
            let (Ok(rooms), Ok(payload)) = (
                serde_json::from_str::<Vec<String>>(&e.rooms),
                RawValue::from_string(e.payload),
            ) else {
                tracing::error!(id = e.id, "malformed outbox event; dropped");
                self.in_flight.remove(&Leased::Event(e.id));
                self.to_delete.push(Leased::Event(e.id));
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
            self.bus.alerts_changed(&org).await;
        }
    }

    /// The emitter sent `first` (and maybe more): delete their rows.
    async fn sent(&mut self, first: Leased, more: &mut mpsc::UnboundedReceiver<Leased>) {
        self.to_delete.push(first);
        while let Ok(id) = more.try_recv() {
            self.to_delete.push(id);
        }
        self.flush_deletes().await;
    }

    async fn flush_deletes(&mut self) {
        if self.to_delete.is_empty() {
            return;
        }
        match self.store.release(&self.to_delete).await {
            Ok(()) => {
                for id in self.to_delete.drain(..) {
                    self.in_flight.remove(&id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "forgetting announced events failed; retrying"),
        }
    }

    async fn relay(&mut self, committed: &mut mpsc::Receiver<Handover>) {
        self.flush_deletes().await;
        if !self.in_flight.is_empty() {
            let leased: Vec<Leased> = self.in_flight.iter().copied().collect();
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
        let orphans: Vec<OutboxEvent> = claimed
            .into_iter()
            .filter(|e| !self.in_flight.contains(&Leased::Event(e.id)))
            .collect();
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
            if self.in_flight.contains(&leased) {
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
            self.in_flight.insert(leased);
            let mut by_unit: std::collections::BTreeMap<(String, String), (String, Vec<_>)> =
                Default::default();
            for p in readings {
                by_unit
                    .entry((p.org_id, p.reading.reading.unit_id.clone()))
                    .or_insert_with(|| (p.site_id, Vec::new()))
                    .1
                    .push(crate::wire::SensorReading::from(p.reading));
            }
            let mut events = Vec::new();
            for ((org, unit), (site, mut readings)) in by_unit {
                readings.sort_by(|a, b| a.recorded_at.cmp(&b.recorded_at));
                for batch in
                    crate::deliver::fanout::batches(&unit, readings.iter(), self.max_per_event)
                {
                    events.push((org.clone(), site.clone(), batch));
                }
            }
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
                self.in_flight.remove(&leased);
                self.to_delete.push(leased);
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
