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

use super::feed::{Fed, Feed, LiveMessage};
use super::history::{Entry, History, Replay, Since};
use super::offset::{Clock, Offset, now_ms, stamp};
use super::outbox::Outgoing;
use crate::session::Turn;
use super::stream::{Appended, Logged, RedisLog};
use crate::cluster::RedisHealth;
use crate::store::Leased;
use crate::wire::{MissedEvent, SyncAck, SyncComplete};

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
    pub follows: mpsc::UnboundedReceiver<super::feed::Op>,
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

/// Where the emitter reports stored rows whose announcement is out (logged to the cluster
/// stream, or broadcast on one node), so they can be deleted.
pub type Sent = mpsc::UnboundedSender<Leased>;

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
    let mut history = History::new(
        retention.window.as_millis() as u64,
        retention.max_bytes,
        retention.max_events,
    );
    let mut clock = Clock::default();
    let mut sweep = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            biased;
            Some(command) = commands.recv() => {
                handle(&io, command, &requeue, |org, since, membership| {
                    let replay = history.replay(org, since, membership, now_ms());
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
                        let history = &mut history;
                        deliver(&io, &org, &entry, &requeue, None, |org, since, membership| {
                            let replay = history.replay(org, since, membership, now_ms());
                            async move { Ok(replay) }
                        })
                        .await;
                        for done in out.done {
                            sent.send(done).ok();
                        }
                    }
                    None => {
                        // The live `sensor:reading` stream is not logged: a socket that misses
                        // one gets the reading in its unit's batch.
                        broadcast(&io, &out.rooms, &out.event, &out.payload, None).await;
                    }
                }
            }
            _ = sweep.tick() => {
                history.expire_all(now_ms());
                crate::observe::replay_log(history.len(), history.bytes());
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
    let ClusterLog {
        health,
        log,
        subscriber,
        follows,
    } = cluster;
    // Names this node's entries in the streams (see the outage backlog in `append`) and its
    // live readings (see `feed.rs`).
    let node: Arc<str> = {
        let mut id = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        hex::encode(id).into()
    };
    let (fed_tx, mut fed) = mpsc::channel(4096);
    let feed = tokio::spawn(
        Feed {
            io: io.clone(),
            log: log.clone(),
            subscriber,
            health: health.clone(),
            node: node.clone(),
            out: fed_tx,
        }
        .run(follows),
    );
    let mut appender = tokio::spawn(append(
        io.clone(),
        outgoing,
        log.clone(),
        health.clone(),
        sent,
        node,
        stop,
    ));
    // Where this node's delivery stands in the stream of each organisation it follows;
    // replays go up to here.
    let mut delivered: HashMap<String, Offset> = HashMap::new();
    // Replays asked for before their organisation's start was through.
    let mut deferred: HashMap<String, Vec<Command>> = HashMap::new();
    // Once the appender has ended (shutdown): deliver up to its last events, then stop.
    let mut last_appended: Option<HashMap<String, Offset>> = None;
    let mut deadline = std::pin::pin!(tokio::time::sleep(Duration::MAX));
    loop {
        if let Some(last) = &last_appended
            && last
                .iter()
                .all(|(org, at)| delivered.get(org).is_none_or(|d| d >= at))
        {
            break;
        }
        tokio::select! {
            biased;
            f = fed.recv() => match f {
                Some(Fed::Started { org, at }) => {
                    delivered.insert(org.clone(), at);
                    for command in deferred.remove(&org).unwrap_or_default() {
                        replay_from_log(&io, command, &requeue, &log, at).await;
                    }
                }
                Some(Fed::Entry { org, entry, from_here: true }) => {
                    // This node's outage backlog: its sockets got these while Redis was away.
                    delivered.insert(org, entry.offset);
                }
                Some(Fed::Entry { org, entry, .. }) => {
                    crate::observe::emitted(crate::observe::event_label(&entry.event));
                    delivered.insert(org.clone(), entry.offset);
                    // Every following node delivers the stream itself: local sockets only.
                    let upto = entry.offset;
                    deliver(&io, &org, &entry, &requeue, Some(true), |org, since, membership| {
                        let log = log.clone();
                        let (org, membership) = (org.to_string(), membership.to_vec());
                        async move { log.replay(&org, since, upto, &membership).await }
                    })
                    .await;
                }
                Some(Fed::Lost { org, at }) => {
                    delivered.insert(org.clone(), at);
                    let sockets = io.to(crate::rooms::org(&org)).local().sockets();
                    for socket in sockets {
                        crate::observe::resync("redis_outage");
                        socket
                            .emit("sync:complete", &SyncComplete { recovered: false, offset: None })
                            .ok();
                    }
                }
                Some(Fed::Unavailable { org } | Fed::Stopped { org }) => {
                    delivered.remove(&org);
                    // Redis is away, or their sockets left before the start was through: no
                    // replay can be trusted, and nothing is held waiting for one.
                    for command in deferred.remove(&org).unwrap_or_default() {
                        handle(&io, command, &requeue, |_, _, _| async { Ok(Replay::Lost) }).await;
                    }
                }
                None => break,
            },
            Some(command) = commands.recv() => {
                let org = command.org().to_string();
                match delivered.get(&org) {
                    Some(&upto) => replay_from_log(&io, command, &requeue, &log, upto).await,
                    None => deferred.entry(org).or_default().push(command),
                }
            }
            done = &mut appender, if last_appended.is_none() => {
                last_appended = Some(done.unwrap_or_default());
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3));
            }
            _ = &mut deadline => {
                tracing::warn!("shutdown: the cluster streams did not deliver the last events back in time");
                break;
            }
        }
    }
    feed.abort();
}

/// Carries out a replay command from an organisation's stream, up to `upto`.
async fn replay_from_log<A: Adapter>(
    io: &SocketIo<A>,
    command: Command,
    requeue: &mpsc::Sender<Command>,
    log: &RedisLog,
    upto: Offset,
) {
    handle(io, command, requeue, |org, since, membership| {
        let log = log.clone();
        let (org, membership) = (org.to_string(), membership.to_vec());
        async move { log.replay(&org, since, upto, &membership).await }
    })
    .await;
}

/// How many queued events one append takes at most.
const APPEND_MAX: usize = 256;

/// Logs organisation events to their streams (the following nodes deliver them), as many as
/// are queued in one round trip per organisation; delivers live readings to this node's
/// subscribers and publishes them, one message per site, to the nodes following the site.
/// Returns the offset of the last event it logged per organisation.
///
/// While an organisation's Redis is away, its events go to this node's sockets at once (so
/// alerts keep reaching them) and into an outage backlog, appended in order as soon as Redis is
/// back, marked as this node's: its own feed then skips them (its sockets have them), every
/// other node delivers them. A backlog over its budget drops its oldest events, and the
/// organisations that lost some get `sync:complete { recovered: false }` on every node once
/// Redis is back.
async fn append<A: Adapter>(
    io: SocketIo<A>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    log: RedisLog,
    health: RedisHealth,
    sent: Sent,
    node: Arc<str>,
    stop: oneshot::Receiver<()>,
) -> HashMap<String, Offset> {
    let mut stop = Some(stop);
    let mut last = HashMap::new();
    let mut queued = Vec::with_capacity(APPEND_MAX);
    let mut backlog = Backlog::new(OUTAGE_BACKLOG_BYTES);
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            out = next_outgoing(&mut outgoing, &mut stop) => match out {
                Some(out) => out,
                None => break,
            },
            _ = retry.tick(), if !backlog.is_empty() => {
                backlog.flush(&log, &health, &sent, &node, &mut last).await;
                continue;
            }
        };
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
        let (org_events, live): (Vec<Outgoing>, Vec<Outgoing>) =
            queued.drain(..).partition(|o| o.org.is_some());
        if !live.is_empty() {
            publish_live(&io, &log, &health, &node, live).await;
        }
        if org_events.is_empty() {
            continue;
        }
        // Nothing overtakes the backlog: each organisation's stream keeps this node's order.
        let failed = if backlog.is_empty() {
            log_run(&log, &health, &sent, org_events, None, &mut last).await
        } else {
            org_events
        };
        for out in &failed {
            crate::observe::emitted(crate::observe::event_label(&out.event));
            local_only(&io, out).await;
        }
        backlog.push(failed, &sent);
    }
    // Shutdown: one last try to hand the backlog to the other nodes.
    backlog.flush(&log, &health, &sent, &node, &mut last).await;
    last
}

/// One site's live readings of a run: organisation, site, `(unit, reading)` pairs.
type SiteReadings<'a> = (
    &'a str,
    &'a str,
    Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>,
);

/// Live readings: to this node's subscribers at once, and one message per site to the nodes
/// that follow it. They are not logged (a reading missed live is in its unit's batch), so a
/// failed publish is only logged.
async fn publish_live<A: Adapter>(
    io: &SocketIo<A>,
    log: &RedisLog,
    health: &RedisHealth,
    node: &str,
    live: Vec<Outgoing>,
) {
    let mut by_site: Vec<SiteReadings<'_>> = Vec::new();
    for out in &live {
        crate::observe::emitted(crate::observe::event_label(&out.event));
        broadcast(io, &out.rooms, &out.event, &out.payload, Some(true)).await;
        let Some(target) = &out.live else { continue };
        let pair = (
            std::borrow::Cow::Borrowed(target.unit.as_str()),
            &*out.payload,
        );
        match by_site
            .iter_mut()
            .find(|(org, site, _)| *org == target.org && *site == target.site)
        {
            Some((_, _, readings)) => readings.push(pair),
            None => by_site.push((&target.org, &target.site, vec![pair])),
        }
    }
    if !health.is_up() {
        return;
    }
    let publishes = by_site.into_iter().map(|(org, site, r)| {
        let message = serde_json::to_string(&LiveMessage { n: node.into(), r }).unwrap_or_default();
        log.publish_live(org, site, message)
    });
    for result in futures_util::future::join_all(publishes).await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "publishing live readings to other nodes failed");
        }
    }
}

/// The most bytes of organisation events a node keeps while Redis is away.
const OUTAGE_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

/// Organisation events produced while Redis was away, in order (see [`append`]).
struct Backlog {
    events: std::collections::VecDeque<Outgoing>,
    bytes: usize,
    budget: usize,
    /// Organisations whose oldest events were dropped for the budget.
    lost: std::collections::BTreeSet<String>,
}

impl Backlog {
    fn new(budget: usize) -> Self {
        Backlog {
            events: Default::default(),
            bytes: 0,
            budget,
            lost: Default::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.lost.is_empty()
    }

    fn push(&mut self, run: Vec<Outgoing>, sent: &Sent) {
        for out in run {
            self.bytes += out.payload.get().len();
            self.events.push_back(out);
        }
        while self.bytes > self.budget {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.bytes -= old.payload.get().len();
            // It reached this node's sockets; its stored rows can go (the other nodes' sockets
            // are told to refetch instead).
            for done in &old.done {
                sent.send(*done).ok();
            }
            if let Some(org) = old.org {
                self.lost.insert(org);
            }
        }
    }

    /// Appends what it can (marked as this node's), oldest first; then the organisations that
    /// lost events get their `sync:complete { recovered: false }`.
    async fn flush(
        &mut self,
        log: &RedisLog,
        health: &RedisHealth,
        sent: &Sent,
        node: &str,
        last: &mut HashMap<String, Offset>,
    ) {
        while !self.events.is_empty() {
            if !health.is_up() {
                return;
            }
            let n = self.events.len().min(APPEND_MAX);
            let run: Vec<Outgoing> = self.events.drain(..n).collect();
            let bytes: usize = run.iter().map(|o| o.payload.get().len()).sum();
            let failed = log_run(log, health, sent, run, Some(node), last).await;
            self.bytes -= bytes;
            if !failed.is_empty() {
                tracing::debug!("appending the outage backlog failed; retrying");
                for out in failed.into_iter().rev() {
                    self.bytes += out.payload.get().len();
                    self.events.push_front(out);
                }
                return;
            }
        }
        if !self.lost.is_empty() && health.is_up() {
            let resyncs: Vec<Outgoing> = self
                .lost
                .iter()
                .map(|org| Outgoing {
                    org: Some(org.clone()),
                    live: None,
                    rooms: vec![crate::rooms::org(org)],
                    event: "sync:complete".into(),
                    payload: serde_json::value::to_raw_value(&SyncComplete {
                        recovered: false,
                        offset: None,
                    })
                    .expect("serialises"),
                    done: Vec::new(),
                })
                .collect();
            tracing::warn!(
                organisations = resyncs.len(),
                "the Redis outage backlog overflowed; those organisations' dashboards refetch"
            );
            // Not marked as this node's: its own sockets had every event, but telling them to
            // refetch once costs little and keeps one rule.
            let failed = log_run(log, health, sent, resyncs, None, last).await;
            self.lost = failed.into_iter().filter_map(|o| o.org).collect();
        }
    }
}

/// Appends a run of organisation events, reporting the stored rows of those logged and their
/// offsets in `last`; returns those not logged (their organisation's Redis is away), in order.
/// `origin`: the node whose sockets already have them (its feed skips them).
async fn log_run(
    log: &RedisLog,
    health: &RedisHealth,
    sent: &Sent,
    run: Vec<Outgoing>,
    origin: Option<&str>,
    last: &mut HashMap<String, Offset>,
) -> Vec<Outgoing> {
    if !health.is_up() {
        return run;
    }
    let events: Vec<Logged<'_>> = run
        .iter()
        .map(|o| Logged {
            org: o.org.as_deref().unwrap_or_default(),
            event: &o.event,
            rooms: &o.rooms,
            payload: &o.payload,
            stored: o.done.iter().find_map(|d| match d {
                Leased::Event(id) => Some(*id),
                Leased::Readings(_) => None,
            }),
            origin,
        })
        .collect();
    let (appended, error) = log.append(&events).await;
    drop(events);
    if let Some(e) = error {
        health.mark_down();
        tracing::debug!(error = %e, "logging to an organisation's stream failed; delivered locally and kept for later");
    }
    let mut failed = Vec::new();
    for (out, appended) in run.into_iter().zip(appended) {
        match appended {
            Appended::Failed => failed.push(out),
            Appended::Logged(offset) => {
                if let Some(org) = &out.org {
                    last.insert(org.clone(), offset);
                }
                for done in &out.done {
                    sent.send(*done).ok();
                }
            }
            Appended::Duplicate => {
                for done in &out.done {
                    sent.send(*done).ok();
                }
            }
        }
    }
    failed
}

/// Delivers an organisation event to this node's sockets while Redis is away: it has no offset
/// yet, so there is no log to catch a full socket up from; such a socket is told to refetch.
async fn local_only<A: Adapter>(io: &SocketIo<A>, out: &Outgoing) {
    let behind = fall_behind(io, &out.rooms);
    broadcast(io, &out.rooms, &out.event, &out.payload, Some(true)).await;
    for (sid, membership) in behind {
        let Some(socket) = io.get_socket(sid) else {
            continue;
        };
        crate::observe::resync("redis_outage");
        let complete = SyncComplete {
            recovered: false,
            offset: None,
        };
        tokio::spawn(async move {
            // Back in its rooms once it can take the word, so that its refetch is followed by
            // every later event.
            if wait_for_room(&socket, |s| s.emit("sync:complete", &complete)).await {
                socket.join(membership);
            }
            crate::observe::caught_up(Duration::ZERO);
        });
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
    // A full socket queue: for organisation events `deliver` has caught the socket up already;
    // a live `sensor:reading` it missed is in its unit's batch. The slow-consumer sweep is not
    // woken for it: its probes, run while the emitter broadcasts, hold slots of nearly full
    // queues and made broadcasts fail for sockets the emitter had just found free. Its periodic
    // look still closes a socket full for the grace. Anything else is worth a line.
    match &e {
        BroadcastError::Socket(errors) => {
            if !errors
                .iter()
                .all(|e| matches!(e, SocketError::InternalChannelFull))
            {
                tracing::warn!(event, error = %e, "broadcast did not reach every socket");
            }
            errors
                .iter()
                .any(|e| matches!(e, SocketError::InternalChannelFull))
        }
        _ => {
            tracing::warn!(event, error = %e, "broadcast did not reach every socket");
            false
        }
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
        if super::slow::probe(&socket) != super::slow::Room::Full {
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

/// Sends the rest of a replay as fast as the client reads it, then hands the replay back to the
/// emitter to send what came meanwhile. A client that reads nothing for the slow-consumer grace
/// is let go.
async fn drain_then_resume<A: Adapter>(
    socket: socketioxide::extract::SocketRef<A>,
    events: Vec<Arc<Entry>>,
    again: Command,
    requeue: mpsc::Sender<Command>,
) {
    socket.extensions.insert(super::slow::Replaying);
    for e in &events {
        if !wait_for_room(&socket, |s| send_replayed(s, e)).await {
            if let Command::Recover { cause, .. } = again {
                finish(cause);
            }
            return;
        }
    }
    socket.extensions.remove::<super::slow::Replaying>();
    requeue.send(again).await.ok();
}

/// Retries `send` while the socket's queue is full, for up to the slow-consumer grace of no
/// progress; then the client is let go as a slow consumer. `false` when the send did not happen.
async fn wait_for_room<A: Adapter>(
    socket: &socketioxide::extract::SocketRef<A>,
    send: impl Fn(&socketioxide::extract::SocketRef<A>) -> Result<(), SendError>,
) -> bool {
    let mut waited = Duration::ZERO;
    loop {
        match send(socket) {
            Ok(()) => return true,
            Err(SendError::Socket(SocketError::InternalChannelFull))
                if waited < super::slow::GRACE =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
                waited += Duration::from_millis(10);
            }
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                tracing::info!(sid = %socket.id, "socket stopped reading while being caught up; disconnecting");
                super::slow::evict(socket.clone());
                return false;
            }
            Err(_) => return false,
        }
    }
}

/// Free slots a replay leaves in a socket's queue: for engine.io's heartbeat ping (dropped with
/// the session when the queue is full) and the socket's live `sensor:reading`s.
const REPLAY_HEADROOM: usize = 4;

/// Sends one missed event, keeping [`REPLAY_HEADROOM`] free.
fn send_replayed<A: Adapter>(
    socket: &socketioxide::extract::SocketRef<A>,
    e: &Entry,
) -> Result<(), SendError> {
    super::slow::emit_leaving_room(socket, REPLAY_HEADROOM, &|| {
        socket.emit(e.event.as_ref(), &e.payload)
    })
}

/// A replay ended without rejoining live delivery (the socket is gone): a catch-up is over.
fn finish(cause: Cause) {
    if let Cause::Behind(since) = cause {
        crate::observe::caught_up(since.elapsed());
    }
}

/// Carries out a replay command, `replay` reading the log.
async fn handle<A, F, Fut>(
    io: &SocketIo<A>,
    command: Command,
    requeue: &mpsc::Sender<Command>,
    replay: F,
) where
    A: Adapter,
    F: FnOnce(&str, Since, &[String]) -> Fut,
    Fut: std::future::Future<
            Output = Result<Replay, socketioxide_redis::drivers::fred::fred_client::error::Error>,
        >,
{
    let (org, membership, since) = match &command {
        Command::Recover {
            org,
            membership,
            since,
            ..
        } => (org.clone(), membership.as_slice(), *since),
        Command::Sync {
            org,
            membership,
            after,
            ..
        } => (org.clone(), membership.as_slice(), after.map(Since::After)),
    };
    let outcome = match since {
        None => Replay::Lost,
        Some(since) => match replay(&org, since, membership).await {
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
            cause,
            ..
        } => {
            let Some(socket) = io.get_socket(sid) else {
                finish(cause);
                return;
            };
            let complete = match outcome {
                Replay::Recovered { events, head } => {
                    if cause == Cause::Reconnect {
                        crate::observe::replay(true, events.len());
                    }
                    for (i, e) in events.iter().enumerate() {
                        match send_replayed(&socket, e) {
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
                                    since: Some(Since::After(head)),
                                    turn,
                                    cause,
                                };
                                tokio::spawn(drain_then_resume(
                                    socket,
                                    rest,
                                    again,
                                    requeue.clone(),
                                ));
                                return;
                            }
                            Err(_) => {
                                finish(cause);
                                return;
                            }
                        }
                    }
                    match cause {
                        Cause::Reconnect => Some(SyncComplete {
                            recovered: true,
                            offset: Some(head.to_string()),
                        }),
                        // Caught up: back to live delivery, silently.
                        Cause::Behind(_) => None,
                    }
                }
                Replay::Lost => {
                    match cause {
                        Cause::Reconnect => crate::observe::replay(false, 0),
                        Cause::Behind(_) => crate::observe::resync("behind_retention"),
                    }
                    Some(SyncComplete {
                        recovered: false,
                        offset: None,
                    })
                }
            };
            // Joining and telling happen here, between two events, so the client refetches
            // (on `recovered: false`) only once it is back in live delivery: nothing can fall
            // between its refetch and the next live event.
            socket.join(membership);
            if let Some(complete) = complete
                && socket.emit("sync:complete", &complete).is_err()
            {
                // A queue still full (a client that fell behind the log is reading slowly): it
                // gets the word as soon as it has room, before anything else of ours that
                // does not fit.
                let socket = socket.clone();
                tokio::spawn(async move {
                    wait_for_room(&socket, |s| s.emit("sync:complete", &complete)).await;
                });
            }
            if let Cause::Behind(since) = cause {
                crate::observe::caught_up(since.elapsed());
            }
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
