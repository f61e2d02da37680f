//! Slow consumers: a Socket.io client that stops reading (a frozen tab, a stalled network) is
//! disconnected once its outgoing buffer stays full, instead of holding server memory or
//! silently missing events; everyone else is unaffected.
//!
//! What socketioxide 0.18 gives us, and what it does not:
//! - Each socket has a bounded queue (`SOCKET_BUFFER_SIZE` packets). A broadcast that finds it
//!   full skips that socket and reports `BroadcastError::Socket([InternalChannelFull, ..])` —
//!   without saying *which* socket. Memory is bounded by that queue; the socket is not closed.
//! - `Socket::disconnect` must queue a DISCONNECT packet, so on a full socket it fails with
//!   `InternalChannelFull` and closes nothing. Only engine.io's heartbeat would end it, when
//!   its next ping cannot be queued — up to `SOCKET_PING_INTERVAL_MS` later.
//!
//! So, two parts:
//! 1. **Finding full sockets without sending anything**: [`probe`] asks a socket to emit a value
//!    whose serialisation always fails. socketioxide reserves a queue slot *before* encoding, so
//!    a full queue answers `InternalChannelFull`, and one with room answers a serialisation error
//!    and releases the slot unused: nothing reaches the wire and nothing is encoded per
//!    recipient. The [`sweep`] task probes this node's sockets when the emitter reports a full
//!    queue ([`broadcast_failed`]), at most four times a second, and every `every` regardless.
//!    A socket full at every probe for `grace` is a slow consumer: one that drains a burst is
//!    left alone.
//! 2. **Closing it anyway**: [`crate::net::Listener`] wraps the gateway's TCP listener so that every
//!    connection carries a [`crate::net::Connection`] handle in the request's `ConnectInfo`, which engine.io
//!    keeps in the socket's request parts. Killing it makes the connection's reads and writes
//!    fail, so engine.io ends the session (its queue is dropped with it) and the client sees the
//!    connection close. That applies to sockets that opened over WebSocket; a long-polling
//!    socket (or one upgraded from polling, whose request parts belong to the polling
//!    handshake) stops polling when it stops reading, and the heartbeat ends it.
//!
//! An evicted socket first leaves all its rooms, so no broadcast spends time on it or reports it
//! again; it is counted once (`sensorwire_slow_consumer_disconnects_total{client="socketio"}`).
//!
//! Wiring (the one place that builds the server, `lib.rs`):
//! - `axum::serve(net::Listener::new(listener), app.into_make_service_with_connect_info::<net::Connection>())`
//!   instead of `axum::serve(listener, app)`;
//! - `slow::sweep(io.clone(), SweepConfig::default(), stop)` as a task of the node's task owner
//!   (`tasks.rs`), next to the pipeline's, `stop` resolving at shutdown;
//! - optional, in the emitter where a broadcast returns `Err(e)`: `slow::broadcast_failed(&e)`.
//!   Without it, full queues are still found by the periodic sweep, up to `every` later.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use serde::{Serialize, Serializer};
use socketioxide::adapter::Adapter;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};
use tokio::sync::Notify;

/// How often to look, and how long a queue must stay full before its socket is let go.
#[derive(Clone, Copy, Debug)]
pub struct SweepConfig {
    pub every: Duration,
    pub grace: Duration,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            // A safety net: broadcasts that meet a full queue wake the sweep, so looking at every
            // socket of the node often would only cost CPU.
            every: Duration::from_secs(10),
            grace: GRACE,
        }
    }
}

/// How long a queue may stay full, with nothing taken from it, before its client is let go —
/// whether it is live (the sweep) or being caught up (the emitter).
pub const GRACE: Duration = Duration::from_secs(2);

/// Wakes every sweep of the process: broadcasts report full queues without carrying a handle.
/// A wake that finds a sweep busy is lost, and harmless: the next tick looks anyway.
static WAKE: Notify = Notify::const_new();

/// The emitter's side: call with any error a broadcast returned; a full socket queue among its
/// causes makes the sweep look now rather than at its next tick.
pub fn broadcast_failed(error: &BroadcastError) {
    if let BroadcastError::Socket(errors) = error
        && errors
            .iter()
            .any(|e| matches!(e, SocketError::InternalChannelFull))
    {
        WAKE.notify_waiters();
    }
}

/// Marks a socket whose missed events are being sent (see `emitter/replay.rs`): its queue is full by
/// design while the client catches up.
#[derive(Clone, Copy, Debug)]
pub struct Replaying;

/// What a socket's outgoing queue looks like right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Room {
    Free,
    Full,
    Gone,
}

/// A value that never serialises: the probe's payload.
struct Nothing;

impl Serialize for Nothing {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("slow-consumer probe"))
    }
}

/// Sends with `emit` only if `socket`'s queue keeps at least `headroom` free slots after it:
/// otherwise `InternalChannelFull`, as if it were full. A socket being caught up is fed this way,
/// so that its queue always has room for engine.io's heartbeat ping (which is not queued but
/// dropped when the queue is full, and the session with it) and for its live `sensor:reading`s.
///
/// socketioxide says nothing of a queue's length, so the room is held, not measured: each level
/// reserves a slot (a probe, see [`probe`]) and, while it holds it, serialises the next level;
/// the innermost sends; then every held slot is given back unused.
pub fn emit_leaving_room<A: Adapter>(
    socket: &SocketRef<A>,
    headroom: usize,
    emit: &dyn Fn() -> Result<(), SendError>,
) -> Result<(), SendError> {
    if headroom == 0 {
        return emit();
    }
    let outcome = std::cell::RefCell::new(None);
    let hold = Hold {
        socket,
        headroom: headroom - 1,
        emit,
        outcome: &outcome,
    };
    if let Err(SendError::Socket(e)) = socket.emit("sensorwire:probe", &hold) {
        return Err(SendError::Socket(e));
    }
    outcome
        .into_inner()
        .unwrap_or(Err(SendError::Socket(SocketError::InternalChannelFull)))
}

/// One held slot of [`emit_leaving_room`]: serialising it runs the next level, then fails so
/// that the slot is released.
struct Hold<'a, A: Adapter> {
    socket: &'a SocketRef<A>,
    headroom: usize,
    emit: &'a dyn Fn() -> Result<(), SendError>,
    outcome: &'a std::cell::RefCell<Option<Result<(), SendError>>>,
}

impl<A: Adapter> Serialize for Hold<'_, A> {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        // The parser may serialise a value more than once (a first pass looks for binary
        // attachments): the next level runs on the first pass only.
        if self.outcome.borrow().is_none() {
            let result = emit_leaving_room(self.socket, self.headroom, self.emit);
            *self.outcome.borrow_mut() = Some(result);
        }
        Err(serde::ser::Error::custom("slot held"))
    }
}

/// Whether `socket`'s queue has room, without sending anything: socketioxide reserves a slot,
/// then fails to encode [`Nothing`] and gives the slot back.
pub fn probe<A: Adapter>(socket: &SocketRef<A>) -> Room {
    match socket.emit("sensorwire:probe", &Nothing) {
        Err(SendError::Socket(SocketError::InternalChannelFull)) => Room::Full,
        Err(SendError::Socket(SocketError::Closed)) => Room::Gone,
        // The slot was free (the encoding failed after reserving it); `Ok` cannot happen.
        Err(SendError::Serialize(_)) | Ok(()) => Room::Free,
    }
}

/// Probes this node's sockets until `stop` resolves; evicts those full for `grace`.
pub async fn sweep<A: Adapter>(
    io: SocketIo<A>,
    config: SweepConfig,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(config.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = Sweep::default();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
            _ = WAKE.notified() => {
                // Every broadcast to a stalled client wakes us: look at most four times a
                // second, since each look probes every socket of the node.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        state.once(&io, config.grace, Instant::now());
    }
}

/// What one sweep remembers for the next.
#[derive(Default)]
struct Sweep {
    /// Sockets found full, since when (continuously).
    full_since: HashMap<Sid, Instant>,
    /// Sockets already counted and closing.
    evicted: HashSet<Sid>,
}

impl Sweep {
    fn once<A: Adapter>(&mut self, io: &SocketIo<A>, grace: Duration, now: Instant) {
        let sockets = io.sockets();
        let mut seen = HashSet::with_capacity(self.full_since.len() + self.evicted.len());
        for socket in sockets {
            let sid = socket.id;
            // A replay fills the queue at the pace the client reads, on purpose; it gives up on
            // a client that stops reading by itself.
            if socket.extensions.get::<Replaying>().is_some() {
                continue;
            }
            let room = probe(&socket);
            if self.evicted.contains(&sid) {
                seen.insert(sid);
                // Still here: the heartbeat or the killed connection will end it; the
                // DISCONNECT packet goes out as soon as the queue has room for it.
                if room == Room::Free {
                    socket.disconnect().ok();
                }
                continue;
            }
            match room {
                Room::Full => {
                    seen.insert(sid);
                    let since = *self.full_since.entry(sid).or_insert(now);
                    if now.duration_since(since) >= grace {
                        self.full_since.remove(&sid);
                        self.evicted.insert(sid);
                        evict(socket);
                    }
                }
                Room::Free | Room::Gone => {
                    self.full_since.remove(&sid);
                }
            }
        }
        // Forget sockets that are gone (or drained) since.
        self.full_since.retain(|sid, _| seen.contains(sid));
        self.evicted.retain(|sid| seen.contains(sid));
    }
}

/// Lets a slow socket go: out of every room, counted once, then closed as directly as the
/// transport allows.
pub(super) fn evict<A: Adapter>(socket: SocketRef<A>) {
    socket.leave_all();
    crate::observe::slow_consumer("socketio");
    let killed = match socket.clone().disconnect() {
        Ok(()) => false,
        Err(_) => kill_connection(&socket),
    };
    tracing::info!(
        sid = %socket.id,
        transport = ?socket.transport_type(),
        killed,
        "socket stopped reading; disconnecting it"
    );
}

/// Ends the TCP connection of a socket that opened over WebSocket. `false` when there is no such
/// connection to end (long-polling, or upgraded from it): the heartbeat ends those.
fn kill_connection<A: Adapter>(socket: &SocketRef<A>) -> bool {
    let parts = socket.req_parts();
    let opened_over_websocket = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "transport=websocket"));
    match parts
        .extensions
        .get::<ConnectInfo<crate::net::Connection>>()
    {
        Some(ConnectInfo(conn)) if opened_over_websocket => {
            conn.kill();
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_a_full_queue_wakes_the_sweep() {
        let woken = |error: BroadcastError| {
            let notified = WAKE.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            broadcast_failed(&error);
            futures_util::FutureExt::now_or_never(notified).is_some()
        };
        assert!(!woken(BroadcastError::Socket(vec![SocketError::Closed])));
        assert!(woken(BroadcastError::Socket(vec![
            SocketError::Closed,
            SocketError::InternalChannelFull,
        ])));
    }
}
