//! Live delivery and batching of stored readings.
//!
//! Each reading goes at once to its unit and site rooms (`sensor:reading`), and into its unit's
//! buffer. Every flush interval the buffers become `sensor:readings:batch` events to the
//! organisation rooms: one per unit, readings in `recordedAt` order, split at the per-event cap,
//! never dropped. This task alone owns the buffers, so no locks; when its input closes (shutdown)
//! it flushes what it holds before ending.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::outbox::Outbox;
use crate::ingest::{Committed, Stored};
use crate::rooms;
use crate::store::Leased;
use crate::wire::{ReadingsBatch, SensorReading};

/// One unit's readings, in the order given, as batch events of at most `max_per_event`.
pub fn batches<'a>(
    unit: &str,
    readings: impl Iterator<Item = &'a SensorReading>,
    max_per_event: usize,
) -> Vec<ReadingsBatch> {
    let readings: Vec<&SensorReading> = readings.collect();
    readings
        .chunks(max_per_event.max(1))
        .map(|chunk| ReadingsBatch {
            unit_id: unit.to_string(),
            readings: chunk.iter().map(|r| (*r).clone()).collect(),
            count: chunk.len(),
            offset: None,
        })
        .collect()
}

struct UnitBuffer {
    site_id: String,
    readings: Vec<Stored>,
}

pub async fn run(
    bus: crate::deliver::relay::Bus,
    mut input: mpsc::Receiver<Arc<Committed>>,
    outbox: Outbox,
    flush_every: Duration,
    max_per_event: usize,
    buffered: Arc<AtomicUsize>,
) {
    let mut buffers: HashMap<(String, String), UnitBuffer> = HashMap::new();
    // Commits whose readings are all in `buffers`: done once the next flush is out.
    let mut release: Vec<Leased> = Vec::new();
    let mut tick = tokio::time::interval(flush_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            committed = input.recv() => {
                let Some(c) = committed else { break };
                if crate::fault::active("panic-fanout") {
                    panic!("fault switch panic-fanout");
                }
                for s in &c.readings {
                    outbox.send_live(&c.org_id, &s.site_id, &s.reading.unit_id, &s.reading).await;
                    buffers
                        .entry((c.org_id.clone(), s.reading.unit_id.clone()))
                        .or_insert_with(|| UnitBuffer { site_id: s.site_id.clone(), readings: Vec::new() })
                        .readings
                        .push(s.clone());
                }
                release.extend(c.release.map(Leased::Readings));
                // Plain WebSocket delivery copies every reading: only when someone may want it.
                if bus.wanted(&c.org_id) {
                    let plain = c.readings.iter().map(|s| (s.site_id.clone(), s.reading.clone())).collect();
                    bus.readings(&c.org_id, plain).await;
                }
            }
            _ = tick.tick() => flush(&mut buffers, &mut release, &outbox, max_per_event, &buffered).await,
        }
    }
    flush(
        &mut buffers,
        &mut release,
        &outbox,
        max_per_event,
        &buffered,
    )
    .await;
    tracing::debug!("fanout stopped");
}

/// Sends every buffered unit's batches; the last event carries `release`, the commits whose
/// readings are all announced once it is out.
async fn flush(
    buffers: &mut HashMap<(String, String), UnitBuffer>,
    release: &mut Vec<Leased>,
    outbox: &Outbox,
    max_per_event: usize,
    buffered: &AtomicUsize,
) {
    // One organisation's batches back to back, in unit order: a socket's engine.io writer then
    // finds the window's events queued together and sends them in one write (with the map's
    // order, an organisation's events were spread over the whole window: ~3.6 events per
    // `send()` at 10,000 sockets instead of one write per socket and window).
    let mut drained: Vec<_> = buffers.drain().collect();
    drained.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let units = drained.len();
    for (i, ((org, unit), mut buf)) in drained.into_iter().enumerate() {
        // Stable sort: readings with the same time keep their arrival order.
        buf.readings.sort_by_key(|s| s.recorded_at);
        let batches = batches(
            &unit,
            buf.readings.iter().map(|s| &s.reading),
            max_per_event,
        );
        let count = batches.len();
        for (j, batch) in batches.into_iter().enumerate() {
            let rooms = rooms::unit_event_rooms(&org, &buf.site_id).to_vec();
            let done = if i + 1 == units && j + 1 == count {
                std::mem::take(release)
            } else {
                Vec::new()
            };
            outbox
                .send_to_org_done(&org, rooms, "sensor:readings:batch", &batch, done)
                .await;
        }
        if let Some(oldest) = buf.readings.iter().map(|s| s.committed_at).min() {
            crate::observe::flushed(oldest.elapsed());
        }
        let left = buffered.fetch_sub(buf.readings.len(), Ordering::Relaxed) - buf.readings.len();
        crate::observe::buffered(left);
    }
}
