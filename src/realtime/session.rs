//! Per-socket state, kept in the socket's extensions for the life of the connection.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::task::AbortHandle;

use super::limiter::{RateLimiter, Verdict};
use crate::auth::UserClaims;
use crate::config::Limits;

pub struct Session {
    claims: RwLock<UserClaims>,
    limiter: Mutex<RateLimiter>,
    /// Site and unit rooms joined through `subscribe:*`, counted against the per-socket cap.
    subscriptions: Mutex<HashSet<String>>,
    /// The task that ends the socket when its token runs out; aborted on disconnect.
    expiry: Mutex<Option<AbortHandle>>,
}

impl Session {
    pub fn new(claims: UserClaims, limits: &Limits) -> Arc<Self> {
        Arc::new(Session {
            claims: RwLock::new(claims),
            limiter: Mutex::new(RateLimiter::new(
                limits.socket_events_per_second,
                limits.socket_events_burst,
                limits.socket_abuse_limit,
                Instant::now(),
            )),
            subscriptions: Mutex::new(HashSet::new()),
            expiry: Mutex::new(None),
        })
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

    pub fn remove_subscription(&self, room: &str) {
        self.subscriptions.lock().unwrap().remove(room);
    }

    pub fn set_expiry_task(&self, handle: AbortHandle) {
        if let Some(old) = self.expiry.lock().unwrap().replace(handle) {
            old.abort();
        }
    }

    pub fn end(&self) {
        if let Some(task) = self.expiry.lock().unwrap().take() {
            task.abort();
        }
    }
}
