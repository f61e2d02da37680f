//! Ending sockets whose token runs out: one task for every socket of the node, not a task and a
//! timer per socket (about 0.8 KiB of each idle socket's memory went to its own expiry task).
//!
//! Deadlines wait in one ordered set, one entry per socket: a refresh replaces its socket's
//! entry, a disconnect removes it (so the set holds only live sockets, however many come and
//! go). The task sleeps until the earliest; when it comes, it re-reads the socket's token and
//! ends the socket with `auth:expired` if the deadline really passed.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide::socket::Sid;
use tokio::sync::Notify;

use crate::auth::jwt::now_secs;
use crate::session::Session;
use crate::wire::AuthExpired;

/// The deadlines (seconds since the epoch, see `UserClaims::deadline`) of the node's sockets.
#[derive(Default)]
pub struct Expiry {
    due: Mutex<Due>,
    earlier: Notify,
}

#[derive(Default)]
struct Due {
    by_time: BTreeSet<(i64, Sid)>,
    by_socket: HashMap<Sid, i64>,
}

impl Expiry {
    /// Ends `sid` once `deadline` has passed (replacing the deadline it was watched with).
    pub fn watch(&self, deadline: i64, sid: Sid) {
        let mut due = self.due.lock().unwrap();
        if let Some(old) = due.by_socket.insert(sid, deadline) {
            due.by_time.remove(&(old, sid));
        }
        let first = due.by_time.first().is_none_or(|(d, _)| deadline < *d);
        due.by_time.insert((deadline, sid));
        drop(due);
        if first {
            self.earlier.notify_one();
        }
    }

    /// `sid` has left: nothing to end.
    pub fn forget(&self, sid: Sid) {
        let mut due = self.due.lock().unwrap();
        if let Some(old) = due.by_socket.remove(&sid) {
            due.by_time.remove(&(old, sid));
        }
    }

    /// The entries whose deadline is before `now`, removed.
    fn take_due(&self, now: i64) -> Vec<Sid> {
        let mut due = self.due.lock().unwrap();
        let later = due.by_time.split_off(&(now, Sid::ZERO));
        let passed = std::mem::replace(&mut due.by_time, later);
        passed
            .into_iter()
            .map(|(_, sid)| {
                due.by_socket.remove(&sid);
                sid
            })
            .collect()
    }

    fn next_deadline(&self) -> Option<i64> {
        self.due.lock().unwrap().by_time.first().map(|(d, _)| *d)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let due = self.due.lock().unwrap();
        assert_eq!(due.by_time.len(), due.by_socket.len());
        due.by_time.len()
    }

    /// Runs until `stop` completes.
    pub async fn run<A: Adapter>(self: Arc<Self>, io: SocketIo<A>, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            // One second past the deadline: the handshake accepts a token up to and including it.
            let wait = match self.next_deadline() {
                Some(d) => Duration::from_secs((d + 1 - now_secs()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.earlier.notified() => continue,
                _ = &mut stop => return,
            }
            for sid in self.take_due(now_secs()) {
                end_if_expired(&io, sid);
            }
        }
    }
}

fn end_if_expired<A: Adapter>(io: &SocketIo<A>, sid: Sid) {
    let Some(s) = io.get_socket(sid) else {
        return; // gone already
    };
    let Some(session) = s.extensions.get::<Arc<Session>>() else {
        return;
    };
    if now_secs() <= session.claims().deadline() {
        return; // refreshed meanwhile: its new deadline has replaced this entry
    }
    tracing::info!(sid = %sid, "token expired, disconnecting");
    s.emit("auth:expired", &AuthExpired {}).ok();
    s.disconnect().ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_entries_come_out_in_deadline_order_and_only_once() {
        let e = Expiry::default();
        let (a, b, c) = (Sid::new(), Sid::new(), Sid::new());
        e.watch(30, a);
        e.watch(10, b);
        e.watch(20, c);
        assert_eq!(e.next_deadline(), Some(10));
        assert_eq!(e.take_due(10), Vec::<Sid>::new(), "a deadline is inclusive");
        assert_eq!(e.take_due(21), vec![b, c]);
        assert_eq!(e.take_due(21), Vec::<Sid>::new());
        assert_eq!(e.next_deadline(), Some(30));
    }

    #[test]
    fn a_refresh_replaces_the_entry_and_a_disconnect_removes_it() {
        let e = Expiry::default();
        let (a, b) = (Sid::new(), Sid::new());
        e.watch(10, a);
        e.watch(50, a);
        e.watch(20, b);
        assert_eq!(e.len(), 2, "one entry per socket");
        assert_eq!(e.take_due(30), vec![b], "a's old deadline is gone");
        e.forget(a);
        assert_eq!(e.len(), 0);
        assert_eq!(e.take_due(100), Vec::<Sid>::new());
    }
}
