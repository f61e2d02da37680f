//! The emitter: the one place where events leave for the sockets, and so the one place that can
//! put a reconnecting socket's replay and its live delivery back to back with nothing lost or
//! sent twice in between.
//!
//! - One node: a single task takes each event from the outbox, gives organisation events the
//!   next offset, records them in the in-memory [`History`], and broadcasts.
//! - Several nodes: an appender task logs organisation events to the Redis streams
//!   (`stream.rs`); every node's delivery task tails the cluster stream and broadcasts each event
//!   to its own sockets, in the stream's order. The live `sensor:reading` stream, which is not
//!   logged, still goes through the Socket.io Redis adapter.
//!
//! Replays are commands to the delivering task, handled between two events: the socket gets
//! what it missed up to the event last delivered, then joins its rooms, then `sync:complete`.
//! A socket that reconnects with an offset joins its organisation rooms only then, so no live
//! event can reach it before its replay, and none after the replay can be one it already got.

use std::sync::Arc;
use std::time::Duration;

use socketioxide::adapter::Adapter;
use socketioxide::socket::Sid;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};
use tokio::sync::{mpsc, oneshot};

use super::history::{Entry, History, Replay};
use super::offset::{Clock, Offset, now_ms, stamp};
use super::outbox::Outgoing;
use super::session::Turn;
use super::stream::{Logged, RedisLog, Tailed};
use crate::cluster::RedisHealth;
use crate::wire::{MissedEvent, SyncAck, SyncComplete};

/// What a socket asks of the emitter.
pub enum Command {
    /// After a connect with `auth.offset`: replay, join `membership`, `sync:complete`. The
    /// socket's first [`Turn`] is held until then, so its own events wait for the replay.
    Recover {
        sid: Sid,
        org: String,
        membership: Vec<String>,
        /// `None`: the client sent something that is not an offset.
        after: Option<Offset>,
        turn: Turn,
    },
    /// The `sync` event: the same replay, as an ack.
    Sync {
        org: String,
        membership: Vec<String>,
        after: Option<Offset>,
        reply: oneshot::Sender<SyncAck>,
    },
}

/// How long organisation events stay available for replay, and how many per organisation.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub window: Duration,
    pub max_events: usize,
}

/// The Redis side of a cluster's emitter.
pub struct ClusterLog {
    pub health: RedisHealth,
    pub log: RedisLog,
    /// A connection of its own for the tail's blocking reads.
    pub tail: socketioxide_redis::drivers::fred::fred_client::clients::Client,
}

/// Runs until `stop` fires (after the pipeline stages have ended): then it refuses new events,
/// sends what is already queued, and ends — it cannot wait for every sender to go, since
/// request handlers hold one until the server itself is gone.
pub async fn run<A: Adapter>(
    io: SocketIo<A>,
    outgoing: mpsc::Receiver<Outgoing>,
    commands: (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    cluster: Option<ClusterLog>,
    retention: Retention,
    sent: Sent,
    stop: oneshot::Receiver<()>,
) {
    match cluster {
        None => run_single(io, outgoing, commands, retention, sent, stop).await,
        Some(cluster) => run_cluster(io, outgoing, commands, cluster, sent, stop).await,
    }
    tracing::debug!("emitter stopped");
}

/// Where the emitter reports events of the storage outbox once they are out (logged to the
/// cluster stream, or broadcast on one node), so their rows can be deleted.
pub type Sent = mpsc::UnboundedSender<i64>;

/// The next event from the outbox; after `stop`, only what was already queued.
async fn next_outgoing(
    rx: &mut mpsc::Receiver<Outgoing>,
    stop: &mut Option<oneshot::Receiver<()>>,
) -> Option<Outgoing> {
    loop {
        let Some(signal) = stop.as_mut() else {
            return rx.recv().await;
        };
        tokio::select! {
            biased;
            out = rx.recv() => return out,
            _ = signal => {
                rx.close();
                *stop = None;
            }
        }
    }
}

async fn run_single<A: Adapter>(
    io: SocketIo<A>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    (requeue, mut commands): (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    retention: Retention,
    sent: Sent,
    stop: oneshot::Receiver<()>,
) {
    let mut stop = Some(stop);
    let mut history = History::new(retention.window.as_millis() as u64, retention.max_events);
    let mut clock = Clock::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            biased;
            Some(command) = commands.recv() => {
                handle(&io, command, &requeue, |org, after, membership| {
                    let replay = history.replay(org, after, membership, now_ms());
                    async move { Ok(replay) }
                })
                .await;
            }
            out = next_outgoing(&mut outgoing, &mut stop) => {
                let Some(out) = out else { break };
                if crate::fault::active("panic-emitter") {
                    panic!("fault switch panic-emitter");
                }
                crate::observe::emitted(crate::observe::event_label(&out.event));
                match out.org {
                    Some(org) => {
                        let now = now_ms();
                        let offset = clock.next(now);
                        let entry = Arc::new(Entry {
                            offset,
                            payload: stamp(&out.payload, offset),
                            event: out.event,
                            rooms: out.rooms,
                        });
                        history.record(&org, entry.clone(), now);
                        broadcast(&io, &entry.rooms, &entry.event, &entry.payload, None).await;
                        if let Some(id) = out.stored {
                            sent.send(id).ok();
                        }
                    }
                    None => broadcast(&io, &out.rooms, &out.event, &out.payload, None).await,
                }
            }
            _ = sweep.tick() => {
                history.expire_all(now_ms());
                crate::observe::replay_log(history.len());
            }
        }
    }
}

async fn run_cluster<A: Adapter>(
    io: SocketIo<A>,
    outgoing: mpsc::Receiver<Outgoing>,
    (requeue, mut commands): (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    cluster: ClusterLog,
    sent: Sent,
    stop: oneshot::Receiver<()>,
) {
    let ClusterLog { health, log, tail } = cluster;
    let (tailed_tx, mut tailed) = mpsc::channel(4096);
    let tail = tokio::spawn(super::stream::tail(tail, tailed_tx));
    let mut appender = tokio::spawn(append(
        io.clone(),
        outgoing,
        log.clone(),
        health.clone(),
        sent,
        stop,
    ));
    // Where this node's delivery stands in the cluster stream; replays go up to here.
    let mut delivered: Option<Offset> = None;
    // Once the appender has ended (shutdown): deliver up to its last event, then stop.
    let mut last_appended: Option<Option<Offset>> = None;
    let mut deadline = std::pin::pin!(tokio::time::sleep(Duration::MAX));
    loop {
        if let Some(last) = last_appended
            && (last.is_none() || delivered >= last)
        {
            break;
        }
        tokio::select! {
            biased;
            t = tailed.recv() => match t {
                Some(Tailed::Start(at)) => delivered = Some(at),
                Some(Tailed::Entry(entry)) => {
                    crate::observe::emitted(crate::observe::event_label(&entry.event));
                    // Every node delivers the stream itself: local sockets only.
                    broadcast(&io, &entry.rooms, &entry.event, &entry.payload, Some(true)).await;
                    delivered = Some(entry.offset);
                }
                None => break,
            },
            Some(command) = commands.recv(), if delivered.is_some() => {
                let upto = delivered.unwrap_or(Offset { ms: 0, seq: 0 });
                handle(&io, command, &requeue, |org, after, membership| {
                    let log = log.clone();
                    let (org, membership) = (org.to_string(), membership.to_vec());
                    async move { log.replay(&org, after, upto, &membership).await }
                })
                .await;
            }
            done = &mut appender, if last_appended.is_none() => {
                last_appended = Some(done.unwrap_or(None));
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3));
            }
            _ = &mut deadline => {
                tracing::warn!("shutdown: the cluster stream did not deliver the last events back in time");
                break;
            }
        }
    }
    tail.abort();
}

/// How many queued events one append to the cluster stream takes at most.
const APPEND_MAX: usize = 256;

/// Logs organisation events to the cluster stream (the tail delivers them), as many as are
/// queued in one round trip; sends the rest through the Socket.io adapter. Returns the offset of
/// the last event it logged.
async fn append<A: Adapter>(
    io: SocketIo<A>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    log: RedisLog,
    health: RedisHealth,
    sent: Sent,
    stop: oneshot::Receiver<()>,
) -> Option<Offset> {
    let mut stop = Some(stop);
    let mut last = None;
    let mut queued = Vec::with_capacity(APPEND_MAX);
    while let Some(first) = next_outgoing(&mut outgoing, &mut stop).await {
        if crate::fault::active("panic-emitter") {
            panic!("fault switch panic-emitter");
        }
        queued.push(first);
        while queued.len() < APPEND_MAX {
            match outgoing.try_recv() {
                Ok(more) => queued.push(more),
                Err(_) => break,
            }
        }
        let mut rest = queued.drain(..).peekable();
        while let Some(out) = rest.next() {
            if out.org.is_none() {
                crate::observe::emitted(crate::observe::event_label(&out.event));
                broadcast(
                    &io,
                    &out.rooms,
                    &out.event,
                    &out.payload,
                    Some(!health.is_up()),
                )
                .await;
                continue;
            }
            // A run of organisation events, appended together.
            let mut run = vec![out];
            while let Some(next) = rest.next_if(|o| o.org.is_some()) {
                run.push(next);
            }
            if let Some(offset) = log_run(&io, &log, &health, &sent, run).await {
                last = Some(offset);
            }
        }
    }
    last
}

/// Appends a run of organisation events; returns the last offset. While Redis is away nothing
/// can be logged or reach other nodes: this node's sockets get the events at once, without an
/// offset (a client that reconnects later with an older offset finds it unknown and refetches).
async fn log_run<A: Adapter>(
    io: &SocketIo<A>,
    log: &RedisLog,
    health: &RedisHealth,
    sent: &Sent,
    run: Vec<Outgoing>,
) -> Option<Offset> {
    let report = |run: &[Outgoing]| {
        for id in run.iter().filter_map(|o| o.stored) {
            sent.send(id).ok();
        }
    };
    if health.is_up() {
        let events: Vec<Logged<'_>> = run
            .iter()
            .map(|o| Logged {
                org: o.org.as_deref().unwrap_or_default(),
                event: &o.event,
                rooms: &o.rooms,
                payload: &o.payload,
                stored: o.stored,
            })
            .collect();
        match log.append(&events).await {
            Ok(offsets) => {
                report(&run);
                return offsets.into_iter().flatten().next_back();
            }
            Err(e) => {
                health.mark_down();
                tracing::debug!(error = %e, "logging to the cluster stream failed; delivered locally");
            }
        }
    }
    report(&run);
    for out in run {
        crate::observe::emitted(crate::observe::event_label(&out.event));
        broadcast(io, &out.rooms, &out.event, &out.payload, Some(true)).await;
    }
    None
}

/// Broadcasts one event. `local`: `None` on a single node; `Some(true)` for this node's sockets
/// only; `Some(false)` through the cluster adapter, falling back to local delivery when that
/// fails (the Redis adapter publishes before it delivers locally, and skips the local part when
/// publishing fails).
async fn broadcast<A: Adapter>(
    io: &SocketIo<A>,
    rooms: &[String],
    event: &str,
    payload: &serde_json::value::RawValue,
    local: Option<bool>,
) {
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
    if let Err(e) = result {
        // A full socket queue is a client that stopped reading: the slow-consumer sweep finds
        // and closes it (and is woken now); anything else is worth a line.
        super::slow::broadcast_failed(&e);
        if !matches!(&e, BroadcastError::Socket(errors) if errors.iter().all(|e| matches!(e, SocketError::InternalChannelFull)))
        {
            tracing::warn!(event, error = %e, "broadcast did not reach every socket");
        }
    }
}

/// Sends the rest of a replay as fast as the client reads it, then hands the replay back to the
/// emitter to send what came meanwhile. A client that reads nothing for 10 s is let go.
async fn drain_then_resume<A: Adapter>(
    socket: socketioxide::extract::SocketRef<A>,
    events: Vec<Arc<Entry>>,
    again: Command,
    requeue: mpsc::Sender<Command>,
) {
    socket.extensions.insert(super::slow::Replaying);
    for e in &events {
        let mut waited = Duration::ZERO;
        loop {
            match socket.emit(e.event.as_ref(), &e.payload) {
                Ok(()) => break,
                Err(SendError::Socket(SocketError::InternalChannelFull))
                    if waited < Duration::from_secs(10) =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    waited += Duration::from_millis(10);
                }
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                    tracing::info!(sid = %socket.id, "socket stopped reading during its replay; disconnecting");
                    crate::observe::slow_consumer("socketio");
                    socket.disconnect().ok();
                    return;
                }
                Err(_) => return,
            }
        }
    }
    socket.extensions.remove::<super::slow::Replaying>();
    requeue.send(again).await.ok();
}

/// Carries out a replay command, `replay` reading the log.
async fn handle<A, F, Fut>(
    io: &SocketIo<A>,
    command: Command,
    requeue: &mpsc::Sender<Command>,
    replay: F,
) where
    A: Adapter,
    F: FnOnce(&str, Offset, &[String]) -> Fut,
    Fut: std::future::Future<
            Output = Result<Replay, socketioxide_redis::drivers::fred::fred_client::error::Error>,
        >,
{
    let (org, membership, after) = match &command {
        Command::Recover {
            org,
            membership,
            after,
            ..
        }
        | Command::Sync {
            org,
            membership,
            after,
            ..
        } => (org.clone(), membership.as_slice(), *after),
    };
    let outcome = match after {
        None => Replay::Lost,
        Some(after) => match replay(&org, after, membership).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the event log for a replay failed");
                Replay::Lost
            }
        },
    };
    match command {
        Command::Recover {
            sid,
            membership,
            turn,
            ..
        } => {
            let Some(socket) = io.get_socket(sid) else {
                return;
            };
            let complete = match outcome {
                Replay::Recovered { events, head } => {
                    crate::observe::replay(true, events.len());
                    for (i, e) in events.iter().enumerate() {
                        match socket.emit(e.event.as_ref(), &e.payload) {
                            Ok(()) => {}
                            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                                // More missed events than the socket's buffer holds: the rest
                                // go out at the pace the client reads them, off this loop;
                                // then the replay resumes from `head` (and only then does the
                                // socket join its rooms).
                                let rest = events[i..].to_vec();
                                let again = Command::Recover {
                                    sid,
                                    org: org.to_string(),
                                    membership,
                                    after: Some(head),
                                    turn,
                                };
                                tokio::spawn(drain_then_resume(
                                    socket,
                                    rest,
                                    again,
                                    requeue.clone(),
                                ));
                                return;
                            }
                            Err(_) => return,
                        }
                    }
                    SyncComplete {
                        recovered: true,
                        offset: Some(head.to_string()),
                    }
                }
                Replay::Lost => {
                    crate::observe::replay(false, 0);
                    SyncComplete {
                        recovered: false,
                        offset: None,
                    }
                }
            };
            socket.join(membership);
            socket.emit("sync:complete", &complete).ok();
            drop(turn);
        }
        Command::Sync { reply, .. } => {
            let ack = match outcome {
                Replay::Recovered { events, head } => SyncAck {
                    recovered: true,
                    events: events
                        .iter()
                        .map(|e| MissedEvent {
                            event: e.event.to_string(),
                            data: serde_json::from_str(e.payload.get()).unwrap_or_default(),
                        })
                        .collect(),
                    offset: Some(head.to_string()),
                },
                Replay::Lost => SyncAck {
                    recovered: false,
                    events: Vec::new(),
                    offset: None,
                },
            };
            reply.send(ack).ok();
        }
    }
}
