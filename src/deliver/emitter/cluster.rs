//! The emitter of a node in a cluster: organisation events are logged to their organisation's
//! Redis stream and delivered from this node's feed; live readings go to the nodes following
//! their site.

use super::*;

use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

pub(super) async fn run_cluster<A: Adapter>(
    io: SocketIo<A>,
    outgoing: mpsc::Receiver<Outgoing>,
    (requeue, mut commands): (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    cluster: ClusterLog,
    sent: Sent,
    stop: CancellationToken,
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
    // The feed and the appender are the emitter's own tasks: they run while it does and end with
    // it — aborted if it unwinds (a handle that aborts on drop), joined when it returns — so none
    // outlives the emitter, which the task owner (`tasks.rs`) supervises and joins. A panic in
    // either is raised again in the emitter, so the node fails naming it.
    let (fed_tx, mut fed) = mpsc::channel(4096);
    let feed = AbortOnDropHandle::new(tokio::spawn(
        Feed {
            io: io.clone(),
            log: log.clone(),
            subscriber,
            health: health.clone(),
            node: node.clone(),
            out: fed_tx,
        }
        .run(follows)
        .instrument(tracing::info_span!("task", name = "emitter feed")),
    ));
    let mut appender = AbortOnDropHandle::new(tokio::spawn(
        append(
            io.clone(),
            outgoing,
            log.clone(),
            health.clone(),
            sent,
            node,
            stop,
        )
        .instrument(tracing::info_span!("task", name = "emitter appender")),
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
                last_appended = Some(match done {
                    Ok(last) => last,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => HashMap::new(),
                });
                deadline.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3));
            }
            _ = &mut deadline => {
                tracing::warn!("shutdown: the cluster streams did not deliver the last events back in time");
                break;
            }
        }
    }
    feed.abort();
    // A feed that ended early by panicking ended the loop above: the node fails naming it.
    if let Err(e) = feed.await
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    if last_appended.is_none() {
        appender.abort();
        appender.await.ok();
    }
}

/// Carries out a replay command from an organisation's stream, up to `upto`.
pub(super) async fn replay_from_log<A: Adapter>(
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
pub(super) const APPEND_MAX: usize = 256;

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
pub(super) async fn append<A: Adapter>(
    io: SocketIo<A>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    log: RedisLog,
    health: RedisHealth,
    sent: Sent,
    node: Arc<str>,
    stop: CancellationToken,
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
pub(super) type SiteReadings<'a> = (
    &'a str,
    &'a str,
    Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>,
);

/// Live readings: to this node's subscribers at once, and one message per site to the nodes
/// that follow it. They are not logged (a reading missed live is in its unit's batch), so a
/// failed publish is only logged.
pub(super) async fn publish_live<A: Adapter>(
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
pub(super) const OUTAGE_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

/// Organisation events produced while Redis was away, in order (see [`append`]).
pub(super) struct Backlog {
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
pub(super) async fn log_run(
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
pub(super) async fn local_only<A: Adapter>(io: &SocketIo<A>, out: &Outgoing) {
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
        // A short task of its own, not an owned one: it ends by itself once the word is out,
        // the socket is gone, or after the slow-consumer grace (`wait_for_room`).
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
