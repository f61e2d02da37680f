//! Per-socket state, kept in the socket's extensions for the life of the connection.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::auth::UserClaims;
use crate::config::Limits;
use crate::rate_limit::{RateLimiter, Verdict};

pub struct Session {
    /// The transport at connect, so the connected-sockets gauge goes down under the same label.
    transport: socketioxide::TransportType,
    claims: RwLock<UserClaims>,
    limiter: Mutex<RateLimiter>,
    /// Site and unit rooms joined through `subscribe:*`, counted against the per-socket cap.
    subscriptions: Mutex<HashSet<String>>,
    /// Client events are handled in arrival order (see [`Turn`]).
    turns: Mutex<Turns>,
    /// Events that may wait for their turn at once; more are refused (see [`Turn::admit`]).
    max_waiting: u64,
    turn_changed: Notify,
}

#[derive(Default)]
struct Turns {
    issued: u64,
    serving: u64,
    done: BTreeSet<u64>,
    /// A disconnect for flooding has its turn: later events are only refused.
    disconnecting: bool,
}

impl Session {
    pub fn new(
        claims: UserClaims,
        limits: &Limits,
        transport: socketioxide::TransportType,
    ) -> Arc<Self> {
        Arc::new(Session {
            transport,
            claims: RwLock::new(claims),
            limiter: Mutex::new(RateLimiter::new(
                limits.socket_events_per_second,
                limits.socket_events_burst,
                limits.socket_abuse_limit,
            )),
            subscriptions: Mutex::new(HashSet::new()),
            turns: Mutex::new(Turns::default()),
            // As many as a burst: a client within its rate never meets this cap unless a turn
            // is held (a replay, a slow query) while it keeps sending.
            max_waiting: u64::from(limits.socket_events_burst.max(1)),
            turn_changed: Notify::new(),
        })
    }

    pub fn transport(&self) -> socketioxide::TransportType {
        self.transport
    }

    pub fn claims(&self) -> UserClaims {
        self.claims.read().unwrap().clone()
    }

    pub fn set_claims(&self, claims: UserClaims) {
        *self.claims.write().unwrap() = claims;
    }

    /// Records a subscription unless the cap is reached; re-subscribing is always fine.
    pub fn add_subscription(&self, room: &str, cap: usize) -> bool {
        let mut subs = self.subscriptions.lock().unwrap();
        if subs.contains(room) {
            return true;
        }
        if subs.len() >= cap {
            return false;
        }
        subs.insert(room.to_string());
        true
    }

    /// The site and unit rooms joined through `subscribe:*`.
    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.lock().unwrap().iter().cloned().collect()
    }

    pub fn remove_subscription(&self, room: &str) {
        self.subscriptions.lock().unwrap().remove(room);
    }
}

/// A client event's place in line. socketioxide runs every event handler as its own task, so
/// two events of one socket could otherwise run in either order (an `unsubscribe` overtaking
/// the `subscribe` before it). The ticket is taken when the event is extracted — synchronously,
/// in arrival order — and the handler waits for its turn before doing anything.
///
/// The rate limit is decided at the same moment, before any waiting: a refused event gets no
/// ticket and its handler answers at once. So does an event that finds [`Session`]'s cap of
/// waiting events reached, which bounds the tasks one socket can leave waiting behind a held
/// turn (a replay, a slow query).
pub struct Turn {
    session: Arc<Session>,
    /// `None` for a refused event: it never waits.
    ticket: Option<u64>,
    verdict: Verdict,
}

impl Turn {
    /// The next turn, unconditionally (the replay of a reconnect takes the first).
    pub fn take(session: Arc<Session>) -> Turn {
        let ticket = session.turns.lock().unwrap().issue();
        Turn {
            session,
            ticket: Some(ticket),
            verdict: Verdict::Allow,
        }
    }

    /// A client event's turn, if the rate limit allows it and fewer than the cap of events are
    /// already waiting; otherwise a refused turn (see [`Turn::verdict`]) that holds no place.
    pub fn admit(session: Arc<Session>) -> Turn {
        let mut turns = session.turns.lock().unwrap();
        let mut limiter = session.limiter.lock().unwrap();
        let mut verdict = if turns.waiting() >= session.max_waiting {
            limiter.refuse()
        } else {
            limiter.check()
        };
        drop(limiter);
        let ticket = match verdict {
            Verdict::Allow => Some(turns.issue()),
            Verdict::Refuse => None,
            // The disconnect takes its place in line (the one place beyond the cap), so the
            // client first gets the answers to everything it sent before, refusals included.
            Verdict::Disconnect if !turns.disconnecting => {
                turns.disconnecting = true;
                Some(turns.issue())
            }
            Verdict::Disconnect => {
                verdict = Verdict::Refuse;
                None
            }
        };
        drop(turns);
        Turn {
            session,
            ticket,
            verdict,
        }
    }

    /// Whether the rate limit let this event through.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Waits until every earlier event of this socket has been handled (at once for a refused
    /// event, which has no place in line).
    pub async fn wait(&self) {
        let Some(ticket) = self.ticket else { return };
        loop {
            let notified = self.session.turn_changed.notified();
            if self.session.turns.lock().unwrap().serving == ticket {
                break;
            }
            notified.await;
        }
        if self.verdict == Verdict::Disconnect {
            // Refused events hold no place in line: their handlers, spawned before this one,
            // may still be queued (tokio runs the newest task first). Yielding lets them send
            // their refusals before the socket goes.
            tokio::task::yield_now().await;
        }
    }
}

impl Turns {
    fn issue(&mut self) -> u64 {
        self.issued += 1;
        self.issued - 1
    }

    /// Tickets issued behind the one being served: the events waiting for their turn.
    fn waiting(&self) -> u64 {
        self.issued.saturating_sub(self.serving + 1)
    }
}

impl Drop for Turn {
    /// Done (or never run): let the next event go.
    fn drop(&mut self) {
        let Some(ticket) = self.ticket else { return };
        let mut t = self.session.turns.lock().unwrap();
        t.done.insert(ticket);
        loop {
            let serving = t.serving;
            if !t.done.remove(&serving) {
                break;
            }
            t.serving += 1;
        }
        drop(t);
        self.session.turn_changed.notify_waiters();
    }
}

impl<A: socketioxide::adapter::Adapter> socketioxide::handler::FromMessageParts<A> for Turn {
    type Error = NoSession;

    fn from_message_parts(
        s: &Arc<socketioxide::socket::Socket<A>>,
        _: &mut socketioxide::handler::Value,
        _: &Option<i64>,
    ) -> Result<Self, NoSession> {
        s.extensions
            .get::<Arc<Session>>()
            .map(Turn::admit)
            .ok_or(NoSession)
    }
}

/// An event arrived on a socket without a session (cannot happen after the middleware).
#[derive(Debug, thiserror::Error)]
#[error("socket has no session")]
pub struct NoSession;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        limits: Limits,
    }

    fn session(per_second: &str, burst: &str) -> Arc<Session> {
        let args = Args::parse_from([
            "test",
            "--socket-events-per-second",
            per_second,
            "--socket-events-burst",
            burst,
            "--socket-abuse-limit",
            "1000",
        ]);
        let claims = UserClaims {
            sub: "u".into(),
            org_id: "o".into(),
            role: Default::default(),
            site_ids: None,
            exp: i64::MAX,
        };
        Session::new(claims, &args.limits, socketioxide::TransportType::Websocket)
    }

    #[tokio::test]
    async fn turns_waiting_behind_a_held_turn_are_capped_and_the_rest_run_in_order() {
        // A generous rate, so only the cap of waiting events (the burst, 4) refuses.
        let s = session("1000000", "4");
        let held = Turn::take(s.clone()); // a replay holding the first turn
        let waiting: Vec<Turn> = (0..4).map(|_| Turn::admit(s.clone())).collect();
        assert!(waiting.iter().all(|t| t.verdict() == Verdict::Allow));
        let over = Turn::admit(s.clone());
        assert_eq!(over.verdict(), Verdict::Refuse);
        // A refused event never waits, even while the turn is held.
        tokio::time::timeout(std::time::Duration::from_secs(1), over.wait())
            .await
            .expect("a refused turn does not wait");
        drop(over);

        // Released, the waiting events run one at a time, in the order they arrived.
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = waiting
            .into_iter()
            .enumerate()
            .rev() // spawned last first: the order comes from the turns, not the spawning
            .map(|(i, turn)| {
                let order = order.clone();
                tokio::spawn(async move {
                    turn.wait().await;
                    order.lock().unwrap().push(i);
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(
            order.lock().unwrap().is_empty(),
            "nothing runs before the held turn ends"
        );
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        // With nothing waiting, events are admitted again.
        assert_eq!(Turn::admit(s.clone()).verdict(), Verdict::Allow);
    }

    #[test]
    fn one_disconnect_takes_its_place_in_line_and_later_events_are_refused() {
        let s = session("1", "1");
        let held = Turn::take(s.clone());
        assert_eq!(Turn::admit(s.clone()).verdict(), Verdict::Allow);
        // The abuse limit is 1000; refuse up to it, then the next one disconnects.
        for _ in 0..1000 {
            assert_eq!(Turn::admit(s.clone()).verdict(), Verdict::Refuse);
        }
        let disconnect = Turn::admit(s.clone());
        assert_eq!(disconnect.verdict(), Verdict::Disconnect);
        assert!(
            disconnect.ticket.is_some(),
            "it waits for the events before it"
        );
        let later = Turn::admit(s.clone());
        assert_eq!((later.verdict(), later.ticket), (Verdict::Refuse, None));
        drop(held);
    }

    #[test]
    fn the_rate_limit_is_decided_when_the_event_arrives() {
        let s = session("1", "2");
        let held = Turn::take(s.clone());
        let first = Turn::admit(s.clone());
        let second = Turn::admit(s.clone());
        // Refused at once, though the two before it are still waiting behind `held`.
        assert_eq!(Turn::admit(s.clone()).verdict(), Verdict::Refuse);
        assert_eq!(
            (first.verdict(), second.verdict()),
            (Verdict::Allow, Verdict::Allow)
        );
        drop((held, first, second));
    }
}
