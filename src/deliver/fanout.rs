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
use std::time::{Duration, Instant};

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

/// What the fanout holds between two flushes. Kept apart from the task's channels and timer so
/// that the flush rules (per unit, in `recordedAt` order, split at the cap, nothing dropped, the
/// release on the last event) can be tested without an emitter.
#[derive(Default)]
struct Buffers {
    units: HashMap<(String, String), UnitBuffer>,
    /// Commits whose readings are all in `units`: done once the next flush is out.
    release: Vec<Leased>,
}

/// One unit's share of a flush.
struct UnitFlush {
    org: String,
    site: String,
    /// Its batch events in order, each with the stored rows it completes.
    batches: Vec<(ReadingsBatch, Vec<Leased>)>,
    /// How many readings it flushes: the buffered count goes down by this.
    readings: usize,
    /// When the oldest of them was committed, for the flush-latency metric.
    oldest: Option<Instant>,
}

impl Buffers {
    fn add(&mut self, c: &Committed) {
        for s in &c.readings {
            self.units
                .entry((c.org_id.clone(), s.reading.unit_id.clone()))
                .or_insert_with(|| UnitBuffer {
                    site_id: s.site_id.clone(),
                    readings: Vec::new(),
                })
                .readings
                .push(s.clone());
        }
        self.release.extend(c.release.map(Leased::Readings));
    }

    /// Empties the buffers into batch events; the last event carries `release`, the commits
    /// whose readings are all announced once it is out.
    fn take(&mut self, max_per_event: usize) -> Vec<UnitFlush> {
        // One organisation's batches back to back, in unit order: a socket's engine.io writer
        // then finds the window's events queued together and sends them in one write (with the
        // map's order, an organisation's events were spread over the whole window: ~3.6 events
        // per `send()` at 10,000 sockets instead of one write per socket and window).
        let mut drained: Vec<_> = self.units.drain().collect();
        drained.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut flushes: Vec<UnitFlush> = drained
            .into_iter()
            .map(|((org, unit), mut buf)| {
                // Stable sort: readings with the same time keep their arrival order.
                buf.readings.sort_by_key(|s| s.recorded_at);
                let batches = batches(
                    &unit,
                    buf.readings.iter().map(|s| &s.reading),
                    max_per_event,
                );
                UnitFlush {
                    org,
                    site: buf.site_id,
                    batches: batches.into_iter().map(|b| (b, Vec::new())).collect(),
                    readings: buf.readings.len(),
                    oldest: buf.readings.iter().map(|s| s.committed_at).min(),
                }
            })
            .collect();
        if let Some((_, done)) = flushes.last_mut().and_then(|u| u.batches.last_mut()) {
            *done = std::mem::take(&mut self.release);
        }
        flushes
    }
}

pub async fn run(
    relay: crate::deliver::relay::Relay,
    mut input: mpsc::Receiver<Arc<Committed>>,
    outbox: Outbox,
    flush_every: Duration,
    max_per_event: usize,
    buffered: Arc<AtomicUsize>,
) {
    let mut buffers = Buffers::default();
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
                }
                buffers.add(&c);
                // Plain WebSocket delivery copies every reading: only when someone may want it.
                if relay.wanted(&c.org_id) {
                    let plain = c.readings.iter().map(|s| (s.site_id.clone(), s.reading.clone())).collect();
                    relay.readings(&c.org_id, plain).await;
                }
            }
            _ = tick.tick() => flush(&mut buffers, &outbox, max_per_event, &buffered).await,
        }
    }
    flush(&mut buffers, &outbox, max_per_event, &buffered).await;
    tracing::debug!("fanout stopped");
}

/// Sends every buffered unit's batches (see [`Buffers::take`]).
async fn flush(
    buffers: &mut Buffers,
    outbox: &Outbox,
    max_per_event: usize,
    buffered: &AtomicUsize,
) {
    for unit in buffers.take(max_per_event) {
        let rooms = rooms::unit_event_rooms(&unit.org, &unit.site);
        for (batch, done) in unit.batches {
            outbox
                .send_to_org_done(
                    &unit.org,
                    rooms.to_vec(),
                    "sensor:readings:batch",
                    &batch,
                    done,
                )
                .await;
        }
        if let Some(oldest) = unit.oldest {
            crate::observe::flushed(oldest.elapsed());
        }
        let left = buffered.fetch_sub(unit.readings, Ordering::Relaxed) - unit.readings;
        crate::observe::buffered(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::outbox::Outgoing;

    /// A stored reading of `unit`, named by its id, recorded at `at` ms.
    fn stored(unit: &str, id: &str, at: i64) -> Stored {
        Stored {
            committed_at: Instant::now(),
            site_id: format!("site-of-{unit}"),
            recorded_at: at,
            reading: SensorReading {
                id: id.into(),
                unit_id: unit.into(),
                device_id: None,
                temperature: 4.0,
                humidity: None,
                battery: None,
                signal_strength: None,
                recorded_at: crate::wire::format_time(at),
                source: "test".into(),
            },
        }
    }

    fn committed(org: &str, readings: Vec<Stored>, release: Option<i64>) -> Committed {
        Committed {
            committed_at: Instant::now(),
            org_id: org.into(),
            readings,
            release,
        }
    }

    /// Each event's reading ids, as (org, unit, ids).
    fn events(flushes: &[UnitFlush]) -> Vec<(&str, &str, Vec<&str>)> {
        flushes
            .iter()
            .flat_map(|u| {
                u.batches.iter().map(|(b, _)| {
                    let ids = b.readings.iter().map(|r| r.id.as_str()).collect();
                    (u.org.as_str(), b.unit_id.as_str(), ids)
                })
            })
            .collect()
    }

    #[test]
    fn batches_split_at_the_cap_in_the_order_given() {
        let readings: Vec<Stored> = (1..=5).map(|i| stored("u", &i.to_string(), i)).collect();
        let got = batches("u", readings.iter().map(|s| &s.reading), 2);
        let shape: Vec<(usize, Vec<&str>)> = got
            .iter()
            .map(|b| (b.count, b.readings.iter().map(|r| r.id.as_str()).collect()))
            .collect();
        assert_eq!(
            shape,
            vec![(2, vec!["1", "2"]), (2, vec!["3", "4"]), (1, vec!["5"])]
        );
        assert!(got.iter().all(|b| b.unit_id == "u" && b.offset.is_none()));
    }

    #[test]
    fn a_cap_of_zero_still_sends_every_reading() {
        let readings = [stored("u", "a", 1), stored("u", "b", 2)];
        let got = batches("u", readings.iter().map(|s| &s.reading), 0);
        assert_eq!(got.iter().map(|b| b.count).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn a_flush_sends_each_unit_in_recorded_at_order_ties_in_arrival_order() {
        let mut buffers = Buffers::default();
        buffers.add(&committed(
            "org",
            vec![stored("u", "late", 30), stored("u", "first-10", 10)],
            None,
        ));
        buffers.add(&committed(
            "org",
            vec![stored("u", "second-10", 10), stored("u", "mid", 20)],
            None,
        ));
        let flushed = buffers.take(100);
        assert_eq!(
            events(&flushed),
            vec![("org", "u", vec!["first-10", "second-10", "mid", "late"])]
        );
    }

    #[test]
    fn a_flush_sends_one_organisations_units_back_to_back_in_order() {
        let mut buffers = Buffers::default();
        buffers.add(&committed("org-b", vec![stored("u1", "b1", 1)], None));
        buffers.add(&committed(
            "org-a",
            vec![stored("u2", "a2", 1), stored("u1", "a1", 1)],
            None,
        ));
        // The same unit id in another organisation is another buffer.
        buffers.add(&committed("org-a", vec![stored("u2", "a2'", 2)], None));
        let flushed = buffers.take(100);
        assert_eq!(
            events(&flushed),
            vec![
                ("org-a", "u1", vec!["a1"]),
                ("org-a", "u2", vec!["a2", "a2'"]),
                ("org-b", "u1", vec!["b1"]),
            ]
        );
        assert_eq!(flushed[0].site, "site-of-u1");
    }

    #[test]
    fn a_flush_splits_at_the_cap_and_drops_nothing() {
        let mut buffers = Buffers::default();
        let many: Vec<Stored> = (0..7).map(|i| stored("u", &i.to_string(), i)).collect();
        buffers.add(&committed("org", many, None));
        buffers.add(&committed("org", vec![stored("v", "v", 0)], None));
        let flushed = buffers.take(3);
        let counts: Vec<(&str, usize)> = flushed
            .iter()
            .flat_map(|u| u.batches.iter().map(|(b, _)| (b.unit_id.as_str(), b.count)))
            .collect();
        assert_eq!(counts, [("u", 3), ("u", 3), ("u", 1), ("v", 1)]);
        assert_eq!(
            flushed.iter().map(|u| u.readings).collect::<Vec<_>>(),
            [7, 1]
        );
        assert!(buffers.take(3).is_empty(), "a flush empties the buffers");
    }

    #[test]
    fn the_commits_released_ride_on_the_last_event_of_the_flush_only() {
        let mut buffers = Buffers::default();
        buffers.add(&committed("org-a", vec![stored("u", "1", 1)], Some(7)));
        buffers.add(&committed(
            "org-b",
            vec![stored("u", "2", 1), stored("u", "3", 2)],
            Some(8),
        ));
        let flushed = buffers.take(1);
        let done: Vec<&Vec<Leased>> = flushed
            .iter()
            .flat_map(|u| u.batches.iter().map(|(_, d)| d))
            .collect();
        assert_eq!(
            done,
            [
                &vec![],
                &vec![],
                &vec![Leased::Readings(7), Leased::Readings(8)]
            ]
        );
        // Released once: the next flush carries nothing of them.
        buffers.add(&committed("org-a", vec![stored("u", "4", 3)], None));
        assert_eq!(buffers.take(1)[0].batches[0].1, vec![]);
    }

    #[tokio::test]
    async fn a_flush_sends_the_batches_and_lowers_the_buffered_count_by_them() {
        let (outbox, mut out) = Outbox::new(16);
        let buffered = AtomicUsize::new(5);
        let mut buffers = Buffers::default();
        buffers.add(&committed(
            "org",
            vec![
                stored("u", "1", 1),
                stored("u", "2", 2),
                stored("v", "3", 3),
            ],
            Some(9),
        ));
        flush(&mut buffers, &outbox, 2, &buffered).await;
        // Two more readings were buffered meanwhile elsewhere: only the three flushed come off.
        assert_eq!(buffered.load(Ordering::Relaxed), 2);
        let mut sent = Vec::new();
        while let Ok(o) = out.try_recv() {
            let batch: ReadingsBatch = serde_json::from_str(o.payload.get()).unwrap();
            assert_eq!(o.event, "sensor:readings:batch");
            assert_eq!(o.org.as_deref(), Some("org"));
            assert_eq!(
                o.rooms,
                rooms::unit_event_rooms("org", &format!("site-of-{}", batch.unit_id))
            );
            sent.push((batch.unit_id, batch.count, o.done));
        }
        assert_eq!(
            sent,
            [
                ("u".to_string(), 2, vec![]),
                ("v".to_string(), 1, vec![Leased::Readings(9)])
            ]
        );
    }

    #[tokio::test]
    async fn on_shutdown_the_fanout_flushes_what_it_holds() {
        // The relay is only asked whether plain WebSocket clients want the organisation (none
        // do): its store is never used.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let relay = crate::deliver::relay::Relay::new(
            crate::store::Store::connect(&url).await.unwrap(),
            None,
        );
        let (outbox, mut out) = Outbox::new(16);
        let (input, commits) = mpsc::channel(4);
        let buffered = Arc::new(AtomicUsize::new(2));
        input
            .send(Arc::new(committed(
                "org",
                vec![stored("u", "2", 20), stored("u", "1", 10)],
                Some(4),
            )))
            .await
            .unwrap();
        drop(input);
        // No flush is due for an hour: only the shutdown sends the batch.
        let fanout = run(
            relay,
            commits,
            outbox,
            Duration::from_secs(3600),
            100,
            buffered.clone(),
        );
        tokio::time::timeout(Duration::from_secs(5), fanout)
            .await
            .unwrap();
        let sent: Vec<Outgoing> = std::iter::from_fn(|| out.try_recv().ok()).collect();
        let events: Vec<&str> = sent.iter().map(|o| o.event.as_ref()).collect();
        assert_eq!(
            events,
            ["sensor:reading", "sensor:reading", "sensor:readings:batch"]
        );
        let batch: ReadingsBatch = serde_json::from_str(sent[2].payload.get()).unwrap();
        let ids: Vec<&str> = batch.readings.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["1", "2"]);
        assert_eq!(sent[2].done, [Leased::Readings(4)]);
        assert_eq!(buffered.load(Ordering::Relaxed), 0);
    }
}
