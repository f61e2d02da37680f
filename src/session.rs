//! Per-socket state, kept in the socket's extensions for the life of the connection.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

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
    turn_changed: Notify,
}

#[derive(Default)]
struct Turns {
    issued: u64,
    serving: u64,
    done: BTreeSet<u64>,
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
                Instant::now(),
            )),
            subscriptions: Mutex::new(HashSet::new()),
            turns: Mutex::new(Turns::default()),
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

    pub fn admit(&self) -> Verdict {
        self.limiter.lock().unwrap().check(Instant::now())
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
pub struct Turn {
    session: Arc<Session>,
    ticket: u64,
}

impl Turn {
    pub fn take(session: Arc<Session>) -> Turn {
        let ticket = {
            let mut t = session.turns.lock().unwrap();
            t.issued += 1;
            t.issued - 1
        };
        Turn { session, ticket }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Waits until every earlier event of this socket has been handled.
    pub async fn wait(&self) {
        loop {
            let notified = self.session.turn_changed.notified();
            if self.session.turns.lock().unwrap().serving == self.ticket {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Turn {
    /// Done (or never run): let the next event go.
    fn drop(&mut self) {
        let mut t = self.session.turns.lock().unwrap();
        t.done.insert(self.ticket);
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
            .map(Turn::take)
            .ok_or(NoSession)
    }
}

/// An event arrived on a socket without a session (cannot happen after the middleware).
#[derive(Debug, thiserror::Error)]
#[error("socket has no session")]
pub struct NoSession;
