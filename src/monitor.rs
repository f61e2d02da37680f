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
//!   may; the cluster stream keeps each event once (it drops a second copy of one outbox row).
//!
//! Rows this node has handed to the emitter and not yet deleted are "in flight": it renews their
//! leases, and its own relay skips them, so a slow emitter makes no node announce them twice.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use crate::bus::Bus;
use crate::realtime::outbox::Outbox;
use crate::store::{OutboxEvent, Store, now_ms};

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
    in_flight: HashSet<i64>,
    /// Announced rows whose delete failed (storage away): retried on the next tick.
    to_delete: Vec<i64>,
}

impl Monitor {
    pub fn new(store: Store, outbox: Outbox, bus: Bus) -> Self {
        Monitor {
            store,
            outbox,
            bus,
            in_flight: HashSet::new(),
            to_delete: Vec::new(),
        }
    }

    /// `committed`: the events of each commit, from the ingest writer; `sent`: outbox ids the
    /// emitter has sent. Ends when `committed` closes (shutdown), after the emitter has reported
    /// what is in flight (or [`DRAIN`] has passed).
    pub async fn run(
        mut self,
        mut committed: mpsc::Receiver<Vec<OutboxEvent>>,
        mut sent: mpsc::UnboundedReceiver<i64>,
        sweep_every: Duration,
    ) {
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut relay = tokio::time::interval(RELAY_EVERY);
        relay.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                events = committed.recv() => match events {
                    Some(events) => self.announce(events).await,
                    None => break,
                },
                Some(id) = sent.recv() => self.sent(id, &mut sent).await,
                _ = sweep.tick() => self.sweep().await,
                _ = relay.tick() => self.relay().await,
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

    async fn announce(&mut self, events: Vec<OutboxEvent>) {
        let mut alerts_changed: Vec<String> = Vec::new();
        for e in events {
            if !self.in_flight.insert(e.id) {
                continue;
            }
            let (Ok(rooms), Ok(payload)) = (
                serde_json::from_str::<Vec<String>>(&e.rooms),
                RawValue::from_string(e.payload),
            ) else {
                tracing::error!(id = e.id, "malformed outbox event; dropped");
                self.in_flight.remove(&e.id);
                self.to_delete.push(e.id);
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

    /// The emitter sent `first` (and maybe more): delete their rows, in one statement.
    async fn sent(&mut self, first: i64, more: &mut mpsc::UnboundedReceiver<i64>) {
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
        match self.store.delete_outbox(&self.to_delete).await {
            Ok(()) => {
                for id in self.to_delete.drain(..) {
                    self.in_flight.remove(&id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "forgetting announced events failed; retrying"),
        }
    }

    async fn relay(&mut self) {
        self.flush_deletes().await;
        if !self.in_flight.is_empty() {
            let ids: Vec<i64> = self.in_flight.iter().copied().collect();
            if let Err(e) = self.store.renew_outbox(&ids, now_ms()).await {
                tracing::debug!(error = %e, "renewing the leases of events in flight failed");
            }
        }
        let claimed = match self.store.claim_outbox(now_ms(), RELAY_BATCH).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::debug!(error = %e, "reading the event outbox failed");
                return;
            }
        };
        let orphans: Vec<OutboxEvent> = claimed
            .into_iter()
            .filter(|e| !self.in_flight.contains(&e.id))
            .collect();
        if !orphans.is_empty() {
            tracing::info!(
                events = orphans.len(),
                "announcing stored events that their node did not send"
            );
            self.announce(orphans).await;
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
