//! What a reconnecting client may have missed: the organisation events a node logged, kept for
//! the retention window, and the replay of those after an offset.
//!
//! On one node the log is here, in memory ([`History`]); with several nodes it is a Redis
//! stream per organisation (`stream.rs`), read back into the same [`Entry`] values.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde_json::value::RawValue;

use super::offset::Offset;

/// One logged event, its payload already carrying its offset.
pub struct Entry {
    pub offset: Offset,
    pub event: Cow<'static, str>,
    /// The internal rooms it was sent to; a replay sends it only to sockets in one of them.
    pub rooms: Vec<String>,
    pub payload: Box<RawValue>,
}

impl Entry {
    pub fn visible_in(&self, membership: &[String]) -> bool {
        self.rooms.iter().any(|r| membership.contains(r))
    }
}

/// The answer to "what came after this offset?".
pub enum Replay {
    /// Every event after the offset that the socket may see, in order; `head` is the newest
    /// offset of the organisation's log (what the client has now seen up to).
    Recovered {
        events: Vec<Arc<Entry>>,
        head: Offset,
    },
    /// The offset is not in the log: unknown, of another organisation or process, or older than
    /// the retention window. The client refetches through the REST reads.
    Lost,
}

/// Where a replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// After this offset: what a reconnecting client last saw.
    After(Offset),
    /// At this offset, included: the first event a live socket could not take.
    From(Offset),
}

impl Since {
    pub fn offset(self) -> Offset {
        match self {
            Since::After(o) | Since::From(o) => o,
        }
    }
}

/// Picks the events since `since` out of an organisation's log, which is in offset order.
/// The offset itself must still be in the log: otherwise something after it may already be
/// gone.
pub fn replay_from<'a>(
    log: impl IntoIterator<Item = &'a Arc<Entry>>,
    since: Since,
    membership: &[String],
) -> Replay {
    let at = since.offset();
    let mut found = false;
    let mut head = at;
    let mut events = Vec::new();
    for entry in log {
        if !found {
            if entry.offset > at {
                break;
            }
            if entry.offset < at {
                continue;
            }
            found = true;
            if since == Since::After(at) {
                continue;
            }
        }
        head = entry.offset;
        if entry.visible_in(membership) {
            events.push(entry.clone());
        }
    }
    if found {
        Replay::Recovered { events, head }
    } else {
        Replay::Lost
    }
}

/// The in-memory log of one node: per organisation, nothing older than `window_ms`; all
/// organisations together within `max_bytes` (the oldest events go first), and — only when
/// configured — at most `max_events` per organisation.
pub struct History {
    window_ms: u64,
    max_bytes: usize,
    max_events: Option<usize>,
    orgs: HashMap<String, VecDeque<Arc<Entry>>>,
    /// Every entry held, oldest first: what the byte budget evicts.
    order: VecDeque<(String, Offset)>,
    bytes: usize,
}

/// What an entry costs in memory: its payload, rooms and bookkeeping.
fn cost(e: &Entry) -> usize {
    e.payload.get().len() + e.rooms.iter().map(|r| r.len() + 24).sum::<usize>() + 128
}

impl History {
    pub fn new(window_ms: u64, max_bytes: usize, max_events: Option<usize>) -> Self {
        History {
            window_ms,
            max_bytes,
            max_events: max_events.map(|m| m.max(1)),
            orgs: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }

    pub fn record(&mut self, org: &str, entry: Arc<Entry>, now_ms: u64) {
        self.bytes += cost(&entry);
        self.order.push_back((org.to_string(), entry.offset));
        let log = match self.orgs.get_mut(org) {
            Some(log) => log,
            None => self.orgs.entry(org.to_string()).or_default(),
        };
        log.push_back(entry);
        if let Some(max) = self.max_events {
            while log.len() > max {
                if let Some(e) = log.pop_front() {
                    self.bytes -= cost(&e);
                }
            }
        }
        let oldest = now_ms.saturating_sub(self.window_ms);
        self.bytes -= expire(log, oldest);
        while self.bytes > self.max_bytes {
            let Some((org, offset)) = self.order.pop_front() else {
                break;
            };
            if let Some(log) = self.orgs.get_mut(&org)
                && log.front().is_some_and(|e| e.offset == offset)
                && let Some(e) = log.pop_front()
            {
                self.bytes -= cost(&e);
            }
        }
    }

    pub fn replay(
        &mut self,
        org: &str,
        since: Since,
        membership: &[String],
        now_ms: u64,
    ) -> Replay {
        let Some(log) = self.orgs.get_mut(org) else {
            return Replay::Lost;
        };
        self.bytes -= expire(log, now_ms.saturating_sub(self.window_ms));
        // Binary search to the offset, then walk forward from there.
        let start = log.partition_point(|e| e.offset < since.offset());
        replay_from(log.range(start..), since, membership)
    }

    /// Drops what has aged out everywhere, and organisations left with nothing (called now and
    /// then, so a quiet organisation's log does not stay in memory).
    pub fn expire_all(&mut self, now_ms: u64) {
        let oldest = now_ms.saturating_sub(self.window_ms);
        let mut freed = 0;
        self.orgs.retain(|_, log| {
            freed += expire(log, oldest);
            !log.is_empty()
        });
        self.bytes -= freed;
        // The eviction order forgets what is gone from the logs.
        let orgs = &self.orgs;
        self.order.retain(|(org, offset)| {
            orgs.get(org)
                .and_then(|log| log.front())
                .is_some_and(|front| front.offset <= *offset)
        });
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.orgs.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.orgs.is_empty()
    }
}

/// Drops what is older than `oldest_ms`; the bytes freed.
fn expire(log: &mut VecDeque<Arc<Entry>>, oldest_ms: u64) -> usize {
    let mut freed = 0;
    while log.front().is_some_and(|e| e.offset.ms < oldest_ms) {
        if let Some(e) = log.pop_front() {
            freed += cost(&e);
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ms: u64, seq: u64, room: &str) -> Arc<Entry> {
        Arc::new(Entry {
            offset: Offset { ms, seq },
            event: Cow::Borrowed("e"),
            rooms: vec![room.to_string()],
            payload: RawValue::from_string("{}".into()).unwrap(),
        })
    }

    fn offsets(r: &Replay) -> Vec<(u64, u64)> {
        match r {
            Replay::Recovered { events, .. } => {
                events.iter().map(|e| (e.offset.ms, e.offset.seq)).collect()
            }
            Replay::Lost => panic!("lost"),
        }
    }

    #[test]
    fn replays_what_came_after_in_order_and_only_what_the_socket_may_see() {
        let mut h = History::new(60_000, usize::MAX, None);
        for (i, room) in ["a", "b", "a", "a"].iter().enumerate() {
            h.record("org", entry(1000, i as u64, room), 1000);
        }
        let mine = vec!["a".to_string()];
        let r = h.replay(
            "org",
            Since::After(Offset { ms: 1000, seq: 0 }),
            &mine,
            1000,
        );
        assert_eq!(offsets(&r), vec![(1000, 2), (1000, 3)]);
        let Replay::Recovered { head, .. } = r else {
            unreachable!()
        };
        assert_eq!(head, Offset { ms: 1000, seq: 3 });
        // Nothing missed: recovered, nothing to send, head is the offset itself.
        let r = h.replay(
            "org",
            Since::After(Offset { ms: 1000, seq: 3 }),
            &mine,
            1000,
        );
        assert_eq!(offsets(&r), Vec::<(u64, u64)>::new());
    }

    #[test]
    fn unknown_other_org_and_aged_out_offsets_are_lost() {
        let mut h = History::new(1_000, usize::MAX, None);
        h.record("org", entry(1000, 0, "a"), 1000);
        h.record("org", entry(1500, 0, "a"), 1500);
        let mine = vec!["a".to_string()];
        assert!(matches!(
            h.replay(
                "org",
                Since::After(Offset { ms: 1200, seq: 0 }),
                &mine,
                1500
            ),
            Replay::Lost
        ));
        assert!(matches!(
            h.replay(
                "other",
                Since::After(Offset { ms: 1000, seq: 0 }),
                &mine,
                1500
            ),
            Replay::Lost
        ));
        assert!(matches!(
            h.replay(
                "org",
                Since::After(Offset { ms: 1000, seq: 0 }),
                &mine,
                1500
            ),
            Replay::Recovered { .. }
        ));
        // 1000 is now older than the one-second window.
        assert!(matches!(
            h.replay(
                "org",
                Since::After(Offset { ms: 1000, seq: 0 }),
                &mine,
                2100
            ),
            Replay::Lost
        ));
        assert!(matches!(
            h.replay(
                "org",
                Since::After(Offset { ms: 1500, seq: 0 }),
                &mine,
                2100
            ),
            Replay::Recovered { .. }
        ));
        h.expire_all(3000);
        assert!(h.is_empty());
    }

    #[test]
    fn a_catch_up_starts_at_the_event_it_missed() {
        let mut h = History::new(60_000, usize::MAX, None);
        for i in 0..4 {
            h.record("org", entry(1000, i, "a"), 1000);
        }
        let mine = vec!["a".to_string()];
        let r = h.replay("org", Since::From(Offset { ms: 1000, seq: 2 }), &mine, 1000);
        assert_eq!(offsets(&r), vec![(1000, 2), (1000, 3)]);
        assert!(matches!(
            h.replay("org", Since::From(Offset { ms: 999, seq: 0 }), &mine, 1000),
            Replay::Lost
        ));
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_events_of_any_organisation() {
        let one = cost(&entry(0, 0, "a"));
        let mut h = History::new(60_000, 3 * one, None);
        h.record("x", entry(1000, 0, "a"), 1000);
        h.record("y", entry(1000, 1, "a"), 1000);
        h.record("x", entry(1000, 2, "a"), 1000);
        h.record("y", entry(1000, 3, "a"), 1000);
        assert_eq!(h.len(), 3);
        assert_eq!(h.bytes(), 3 * one);
        let mine = vec!["a".to_string()];
        // x's first event is gone: an offset at it cannot be replayed from.
        assert!(matches!(
            h.replay("x", Since::After(Offset { ms: 1000, seq: 0 }), &mine, 1000),
            Replay::Lost
        ));
        assert_eq!(
            offsets(&h.replay("y", Since::After(Offset { ms: 1000, seq: 1 }), &mine, 1000)),
            vec![(1000, 3)]
        );
        h.expire_all(70_000);
        assert_eq!((h.len(), h.bytes()), (0, 0));
    }

    #[test]
    fn keeps_at_most_max_events_per_org() {
        let mut h = History::new(60_000, usize::MAX, Some(3));
        for i in 0..5 {
            h.record("org", entry(1000, i, "a"), 1000);
        }
        assert_eq!(h.len(), 3);
        let mine = vec!["a".to_string()];
        assert!(matches!(
            h.replay(
                "org",
                Since::After(Offset { ms: 1000, seq: 1 }),
                &mine,
                1000
            ),
            Replay::Lost
        ));
        assert_eq!(
            offsets(&h.replay(
                "org",
                Since::After(Offset { ms: 1000, seq: 2 }),
                &mine,
                1000
            )),
            vec![(1000, 3), (1000, 4)]
        );
    }
}
