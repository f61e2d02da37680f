//! The emitter: the one place where events leave for the sockets, and so the one place that can
//! put a reconnecting socket's replay and its live delivery back to back with nothing lost or
//! sent twice in between.
//!
//! - One node: a single task takes each event from the outbox, gives organisation events the
//!   next offset, records them in the in-memory [`History`], and broadcasts.
//! - Several nodes: an appender task logs organisation events to their organisation's Redis
//!   stream (`stream.rs`); each node's delivery task takes the events of the organisations it
//!   has sockets of from its feed (`feed.rs`) and broadcasts them to its own sockets, in each
//!   stream's order. The live `sensor:reading` stream, which is not logged, goes to the local
//!   subscribers at once and, per site, to the nodes following the site.
//!
//! Replays are commands to the delivering task, handled between two events: the socket gets
//! what it missed up to the event last delivered, then joins its rooms, then `sync:complete`.
//! A socket that reconnects with an offset joins its organisation rooms only then, so no live
//! event can reach it before its replay, and none after the replay can be one it already got.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use socketioxide::adapter::Adapter;
use socketioxide::socket::Sid;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::RedisHealth;
use crate::deliver::feed::{Fed, Feed, LiveMessage};
use crate::deliver::history::{Entry, History, Replay, Since};
use crate::deliver::offset::{Clock, Offset, now_ms, stamp};
use crate::deliver::outbox::Outgoing;
use crate::deliver::stream::{Appended, Logged, RedisLog};
use crate::session::Turn;
use crate::store::Leased;
use crate::wire::{MissedEvent, SyncAck, SyncComplete};

mod cluster;
mod replay;
mod single;

use cluster::run_cluster;
use replay::{handle, wait_for_room};
use single::run_single;

/// What a socket asks of the emitter.
pub enum Command {
    /// Replay, join `membership`, then — after a reconnect — `sync:complete`.
    Recover {
        sid: Sid,
        org: String,
        membership: Vec<String>,
        /// `None`: the client sent something that is not an offset.
        since: Option<Since>,
        /// After a connect with `auth.offset`, the socket's first [`Turn`], held until then so
        /// its own events wait for the replay.
        turn: Option<Turn>,
        /// Why the socket is being caught up.
        cause: Cause,
    },
    /// The `sync` event: the same replay, as an ack.
    Sync {
        org: String,
        membership: Vec<String>,
        after: Option<Offset>,
        reply: oneshot::Sender<SyncAck>,
    },
}

impl Command {
    fn org(&self) -> &str {
        match self {
            Command::Recover { org, .. } | Command::Sync { org, .. } => org,
        }
    }
}

/// Why a socket is replayed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// It reconnected with an offset: `sync:complete` ends the replay either way.
    Reconnect,
    /// It was live but its queue was full for an event (since `Instant`): it catches up
    /// silently, and only hears `sync:complete { recovered: false }` if the log no longer
    /// reaches back to where it fell behind.
    Behind(std::time::Instant),
}

/// How long organisation events stay available for replay, and how many per organisation.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub window: Duration,
    /// Memory for the one-node log, all organisations together.
    pub max_bytes: usize,
    /// An optional cap per organisation.
    pub max_events: Option<usize>,
}

/// The Redis side of a cluster's emitter.
pub struct ClusterLog {
    pub health: RedisHealth,
    pub log: RedisLog,
    /// The feed's subscriber connection (organisation events, live readings).
    pub subscriber: socketioxide_redis::drivers::fred::fred_client::clients::SubscriberClient,
    /// What this node's sockets follow (`feed.rs`).
    pub follows: mpsc::UnboundedReceiver<crate::deliver::feed::Op>,
}

/// Runs until `stop` is cancelled (after the pipeline stages have ended): then it refuses new
/// events, sends what is already queued, and ends — it cannot wait for every sender to go, since
/// request handlers hold one until the server itself is gone.
pub async fn run<A: Adapter>(
    io: SocketIo<A>,
    outgoing: mpsc::Receiver<Outgoing>,
    commands: (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    cluster: Option<ClusterLog>,
    retention: Retention,
    sent: Sent,
    stop: CancellationToken,
) {
    match cluster {
        None => run_single(io, outgoing, commands, retention, sent, stop).await,
        Some(cluster) => run_cluster(io, outgoing, commands, cluster, sent, stop).await,
    }
    tracing::debug!("emitter stopped");
}

/// Where the emitter reports stored rows whose announcement is out (logged to the cluster
/// stream, or broadcast on one node), so they can be deleted.
pub type Sent = mpsc::UnboundedSender<Leased>;

/// The next event from the outbox; after `stop`, only what was already queued.
async fn next_outgoing(
    rx: &mut mpsc::Receiver<Outgoing>,
    stop: &mut Option<CancellationToken>,
) -> Option<Outgoing> {
    loop {
        let Some(signal) = stop.clone() else {
            return rx.recv().await;
        };
        tokio::select! {
            biased;
            out = rx.recv() => return out,
            _ = signal.cancelled() => {
                rx.close();
                *stop = None;
            }
        }
    }
}

/// Broadcasts one event. `local`: `None` on a single node; `Some(true)` for this node's sockets
/// only; `Some(false)` through the cluster adapter, falling back to local delivery when that
/// fails (the Redis adapter publishes before it delivers locally, and skips the local part when
/// publishing fails).
/// `true` when some socket's queue was full (and so that socket did not get it).
async fn broadcast<A: Adapter>(
    io: &SocketIo<A>,
    rooms: &[String],
    event: &str,
    payload: &serde_json::value::RawValue,
    local: Option<bool>,
) -> bool {
    let mut to = io.to(rooms.to_vec());
    if local == Some(true) {
        to = to.local();
    }
    let result = match to.emit(event, payload).await {
        Err(BroadcastError::Adapter(e)) if local == Some(false) => {
            tracing::debug!(event, error = %e, "cross-node broadcast failed; delivered locally");
            io.to(rooms.to_vec()).local().emit(event, payload).await
        }
        other => other,
    };
    let Err(e) = result else {
        return false;
    };
    let (full, worth_a_line) = judge(&e);
    if worth_a_line {
        tracing::warn!(event, error = %e, "broadcast did not reach every socket");
    }
    full
}

/// What a failed broadcast means: whether some socket's queue was full (so it did not get the
/// event), and whether anything else went wrong (worth a line). Apart so it can be tested.
///
/// A full socket queue: for organisation events `deliver` has caught the socket up already; a
/// live `sensor:reading` it missed is in its unit's batch. The slow-consumer sweep is not woken
/// for it: its probes, run while the emitter broadcasts, hold slots of nearly full queues and
/// made broadcasts fail for sockets the emitter had just found free. Its periodic look still
/// closes a socket full for the grace. Anything else is worth a line.
fn judge(e: &BroadcastError) -> (bool, bool) {
    match e {
        BroadcastError::Socket(errors) => (
            errors
                .iter()
                .any(|e| matches!(e, SocketError::InternalChannelFull)),
            !errors
                .iter()
                .all(|e| matches!(e, SocketError::InternalChannelFull)),
        ),
        _ => (false, true),
    }
}

/// This node's sockets in `rooms` whose queue is full right now. They leave their organisation
/// rooms before the event is broadcast, so they are not skipped: the caller catches them up
/// from the log, starting with this event, at the pace they read.
///
/// A probe is one slot reservation per recipient, no encoding; socketioxide's broadcast skips a
/// full socket without saying which, so this is the only way to know before it happens. (A
/// queue filled by another sender between the probe and the broadcast is caught by
/// [`broadcast`]'s report and handled the same way, see `deliver`.)
fn fall_behind<A: Adapter>(io: &SocketIo<A>, rooms: &[String]) -> Vec<(Sid, Vec<String>)> {
    let mut behind = Vec::new();
    for socket in io.to(rooms.to_vec()).local().sockets() {
        if crate::deliver::slow::probe(&socket) != crate::deliver::slow::Room::Full {
            continue;
        }
        let Some(session) = socket.extensions.get::<Arc<crate::session::Session>>() else {
            continue;
        };
        let membership = crate::rooms::membership(&session.claims());
        socket.leave(membership.clone());
        crate::observe::delivery_deferred();
        tracing::debug!(sid = %socket.id, "socket queue full; catching it up from the log");
        behind.push((socket.id, membership));
    }
    behind
}

/// Delivers an organisation event to this node's sockets; those that cannot take it now are
/// caught up from the log (`replay`) instead of skipped.
async fn deliver<A, F, Fut>(
    io: &SocketIo<A>,
    org: &str,
    entry: &Entry,
    requeue: &mpsc::Sender<Command>,
    local: Option<bool>,
    mut replay: F,
) where
    A: Adapter,
    F: FnMut(&str, Since, &[String]) -> Fut,
    Fut: std::future::Future<
            Output = Result<Replay, socketioxide_redis::drivers::fred::fred_client::error::Error>,
        >,
{
    let mut behind = fall_behind(io, &entry.rooms);
    if broadcast(io, &entry.rooms, &entry.event, &entry.payload, local).await {
        // Some queue filled between the probe and the broadcast (another sender took its last
        // slot). Those full now are caught up from this event: at worst one of them gets it
        // twice, never not at all.
        behind.extend(fall_behind(io, &entry.rooms));
    }
    for (sid, membership) in behind {
        let command = Command::Recover {
            sid,
            org: org.to_string(),
            membership,
            since: Some(Since::From(entry.offset)),
            turn: None,
            cause: Cause::Behind(std::time::Instant::now()),
        };
        handle(io, command, requeue, &mut replay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socketioxide::AdapterError;

    fn event(id: i64) -> Outgoing {
        Outgoing {
            org: Some("org".into()),
            live: None,
            rooms: vec![crate::rooms::org("org")],
            event: "alert:triggered".into(),
            payload: RawValue::from_string("{}".into()).unwrap(),
            done: vec![Leased::Event(id)],
        }
    }

    fn id(out: Option<Outgoing>) -> Option<Leased> {
        out.map(|o| o.done[0])
    }

    #[tokio::test]
    async fn after_stop_only_what_was_queued_goes_out() {
        let (tx, mut rx) = mpsc::channel(8);
        let fire = CancellationToken::new();
        let mut stop = Some(fire.clone());
        tx.send(event(1)).await.unwrap();
        assert_eq!(
            id(next_outgoing(&mut rx, &mut stop).await),
            Some(Leased::Event(1))
        );
        tx.send(event(2)).await.unwrap();
        tx.send(event(3)).await.unwrap();
        fire.cancel();
        assert_eq!(
            id(next_outgoing(&mut rx, &mut stop).await),
            Some(Leased::Event(2))
        );
        assert_eq!(
            id(next_outgoing(&mut rx, &mut stop).await),
            Some(Leased::Event(3))
        );
        // `tx` is alive (request handlers hold one until the server is gone): no waiting for it.
        assert!(next_outgoing(&mut rx, &mut stop).await.is_none());
        assert!(tx.try_send(event(4)).is_err(), "new events are refused");
    }

    #[tokio::test]
    async fn before_stop_the_emitter_waits_for_events() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut stop = Some(CancellationToken::new());
        let next = next_outgoing(&mut rx, &mut stop);
        tokio::pin!(next);
        assert!(futures_util::poll!(next.as_mut()).is_pending());
        tx.send(event(1)).await.unwrap();
        assert_eq!(id(next.await), Some(Leased::Event(1)));
    }

    #[test]
    fn only_a_full_queue_counts_as_missed_and_anything_else_is_worth_a_line() {
        use SocketError::{Closed, InternalChannelFull as Full};
        let adapter = BroadcastError::from(AdapterError::from(Box::new(std::io::Error::other(
            "redis away",
        ))
            as Box<dyn std::error::Error + Send>));
        // (error, some queue full, worth a line)
        let cases = [
            (BroadcastError::Socket(vec![Full, Full]), true, false),
            (BroadcastError::Socket(vec![Closed, Full]), true, true),
            (BroadcastError::Socket(vec![Closed]), false, true),
            (adapter, false, true),
        ];
        for (error, full, worth_a_line) in cases {
            assert_eq!(judge(&error), (full, worth_a_line), "{error:?}");
        }
    }
}
