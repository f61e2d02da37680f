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
    let mut delivered = Delivered::default();
    // Once the appender has ended (shutdown): deliver up to its last events, then stop.
    let mut last_appended: Option<HashMap<String, Offset>> = None;
    let mut deadline = std::pin::pin!(tokio::time::sleep(Duration::MAX));
    loop {
        if let Some(last) = &last_appended
            && delivered.reached(last)
        {
            break;
        }
        tokio::select! {
            biased;
            f = fed.recv() => match f {
                Some(Fed::Started { org, at }) => {
                    for command in delivered.started(org, at) {
                        replay_from_log(&io, command, &requeue, &log, at).await;
                    }
                }
                Some(Fed::Entry { org, entry, from_here: true }) => {
                    // This node's outage backlog: its sockets got these while Redis was away.
                    delivered.delivered(org, entry.offset);
                }
                Some(Fed::Entry { org, entry, .. }) => {
                    crate::observe::emitted(crate::observe::event_label(&entry.event));
                    delivered.delivered(org.clone(), entry.offset);
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
                    delivered.delivered(org.clone(), at);
                    let sockets = io.to(crate::rooms::org(&org)).local().sockets();
                    for socket in sockets {
                        crate::observe::resync("redis_outage");
                        socket
                            .emit("sync:complete", &SyncComplete { recovered: false, offset: None })
                            .ok();
                    }
                }
                Some(Fed::Unavailable { org } | Fed::Stopped { org }) => {
                    // Redis is away, or their sockets left before the start was through: no
                    // replay can be trusted, and nothing is held waiting for one.
                    for command in delivered.gone(&org) {
                        handle(&io, command, &requeue, |_, _, _| async { Ok(Replay::Lost) }).await;
                    }
                }
                None => break,
            },
            Some(command) = commands.recv() => {
                if let Some((command, upto)) = delivered.replay(command) {
                    replay_from_log(&io, command, &requeue, &log, upto).await;
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

/// Where this node's delivery stands in the stream of each organisation it follows, and the
/// replays waiting for it. Apart from the delivery loop so that its rules can be tested: a
/// replay goes up to the event last delivered (the next live one follows it), and waits while
/// that is not known.
#[derive(Default)]
pub(super) struct Delivered {
    /// Replays go up to here.
    at: HashMap<String, Offset>,
    /// Replays asked for before their organisation's start was through.
    deferred: HashMap<String, Vec<Command>>,
}

impl Delivered {
    /// The organisation's feed starts at `at`: the replays held for it go up to there.
    pub(super) fn started(&mut self, org: String, at: Offset) -> Vec<Command> {
        let held = self.deferred.remove(&org).unwrap_or_default();
        self.at.insert(org, at);
        held
    }

    /// Delivery reached `at` in the organisation's stream.
    pub(super) fn delivered(&mut self, org: String, at: Offset) {
        self.at.insert(org, at);
    }

    /// The organisation's stream cannot be followed (Redis away, or no socket wants it): the
    /// replays held for it, to be answered as lost; later ones wait for a new start.
    pub(super) fn gone(&mut self, org: &str) -> Vec<Command> {
        self.at.remove(org);
        self.deferred.remove(org).unwrap_or_default()
    }

    /// A replay to carry out now, up to the offset given; `None`: held until its
    /// organisation's start.
    pub(super) fn replay(&mut self, command: Command) -> Option<(Command, Offset)> {
        match self.at.get(command.org()) {
            Some(&upto) => Some((command, upto)),
            None => {
                let org = command.org().to_string();
                self.deferred.entry(org).or_default().push(command);
                None
            }
        }
    }

    /// Shutdown: whether delivery reached the last events the appender logged (organisations
    /// this node does not follow have no sockets here to wait for).
    pub(super) fn reached(&self, last: &HashMap<String, Offset>) -> bool {
        last.iter()
            .all(|(org, at)| self.at.get(org).is_none_or(|d| d >= at))
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
        let (org_events, live) = gather(&mut queued, first, &mut outgoing);
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

/// One append round: `first` and what is queued behind it, at most [`APPEND_MAX`] in all (the
/// rest wait for the next round), as organisation events and live readings, each in order.
pub(super) fn gather(
    queued: &mut Vec<Outgoing>,
    first: Outgoing,
    outgoing: &mut mpsc::Receiver<Outgoing>,
) -> (Vec<Outgoing>, Vec<Outgoing>) {
    queued.push(first);
    while queued.len() < APPEND_MAX {
        match outgoing.try_recv() {
            Ok(more) => queued.push(more),
            Err(_) => break,
        }
    }
    queued.drain(..).partition(|o| o.org.is_some())
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
    for out in &live {
        crate::observe::emitted(crate::observe::event_label(&out.event));
        broadcast(io, &out.rooms, &out.event, &out.payload, Some(true)).await;
    }
    if !health.is_up() {
        return;
    }
    let publishes = by_site(&live).into_iter().map(|(org, site, r)| {
        let message = serde_json::to_string(&LiveMessage { n: node.into(), r }).unwrap_or_default();
        log.publish_live(org, site, message)
    });
    for result in futures_util::future::join_all(publishes).await {
        if let Err(e) = result {
            tracing::debug!(error = %e, "publishing live readings to other nodes failed");
        }
    }
}

/// Live readings grouped per site for the nodes following it, sites in the order first seen,
/// readings in order; what has no live target is not published.
pub(super) fn by_site(live: &[Outgoing]) -> Vec<SiteReadings<'_>> {
    let mut by_site: Vec<SiteReadings<'_>> = Vec::new();
    for out in live {
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
    by_site
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

    /// One `sync:complete { recovered: false }` per organisation that lost events, to all its
    /// sockets, logged like any event so that every node's sockets get it.
    fn resyncs(&self) -> Vec<Outgoing> {
        self.lost
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
            .collect()
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
            let resyncs = self.resyncs();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::outbox::LiveTarget;

    /// An organisation event of `bytes` payload bytes, completing outbox row `id`.
    fn org_event(org: &str, bytes: usize, id: i64) -> Outgoing {
        let payload = format!("\"{}\"", "x".repeat(bytes - 2));
        Outgoing {
            org: Some(org.into()),
            live: None,
            rooms: vec![crate::rooms::org(org)],
            event: "alert:triggered".into(),
            payload: RawValue::from_string(payload).unwrap(),
            done: vec![Leased::Event(id)],
        }
    }

    fn live(org: &str, site: &str, unit: &str) -> Outgoing {
        Outgoing {
            org: None,
            live: Some(LiveTarget {
                org: org.into(),
                site: site.into(),
                unit: unit.into(),
            }),
            rooms: vec![crate::rooms::unit(org, unit)],
            event: "sensor:reading".into(),
            payload: RawValue::from_string(format!("\"{unit}\"")).unwrap(),
            done: Vec::new(),
        }
    }

    fn done_ids<'a>(events: impl IntoIterator<Item = &'a Outgoing>) -> Vec<Leased> {
        events.into_iter().flat_map(|o| o.done.clone()).collect()
    }

    fn reported(rx: &mut mpsc::UnboundedReceiver<Leased>) -> Vec<Leased> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// A `sync` command of `org`, told apart by `tag`; its reply channel is dropped.
    fn sync(org: &str, tag: u64) -> Command {
        Command::Sync {
            org: org.into(),
            membership: Vec::new(),
            after: Some(Offset { ms: tag, seq: 0 }),
            reply: oneshot::channel().0,
        }
    }

    fn tag(command: &Command) -> (&str, u64) {
        match command {
            Command::Sync {
                org,
                after: Some(o),
                ..
            } => (org, o.ms),
            _ => unreachable!(),
        }
    }

    fn at(ms: u64) -> Offset {
        Offset { ms, seq: 0 }
    }

    #[test]
    fn the_outage_backlog_keeps_every_event_within_its_budget_in_order() {
        let (sent, mut reports) = mpsc::unbounded_channel();
        let mut backlog = Backlog::new(30);
        backlog.push(vec![org_event("a", 10, 1), org_event("b", 10, 2)], &sent);
        backlog.push(vec![org_event("a", 10, 3)], &sent);
        assert_eq!(
            done_ids(&backlog.events),
            [Leased::Event(1), Leased::Event(2), Leased::Event(3)]
        );
        assert_eq!(backlog.bytes, 30);
        assert!(backlog.lost.is_empty());
        assert!(reported(&mut reports).is_empty(), "not out yet: rows kept");
    }

    #[test]
    fn an_overflowing_backlog_drops_its_oldest_and_remembers_whose() {
        let (sent, mut reports) = mpsc::unbounded_channel();
        let mut backlog = Backlog::new(25);
        backlog.push(
            vec![
                org_event("a", 10, 1),
                org_event("b", 10, 2),
                org_event("c", 10, 3),
            ],
            &sent,
        );
        assert_eq!(
            done_ids(&backlog.events),
            [Leased::Event(2), Leased::Event(3)]
        );
        assert_eq!(backlog.bytes, 20);
        assert_eq!(backlog.lost, ["a".to_string()].into());
        // Its own sockets had it: its stored row can go.
        assert_eq!(reported(&mut reports), [Leased::Event(1)]);
    }

    #[test]
    fn an_event_over_the_whole_budget_is_dropped_itself() {
        let (sent, mut reports) = mpsc::unbounded_channel();
        let mut backlog = Backlog::new(25);
        backlog.push(vec![org_event("a", 10, 1), org_event("b", 40, 2)], &sent);
        assert!(backlog.events.is_empty());
        assert_eq!(backlog.bytes, 0);
        assert_eq!(backlog.lost, ["a".to_string(), "b".to_string()].into());
        assert_eq!(reported(&mut reports), [Leased::Event(1), Leased::Event(2)]);
    }

    #[test]
    fn organisations_that_lost_events_keep_the_backlog_busy_until_told_to_refetch() {
        let (sent, _reports) = mpsc::unbounded_channel();
        let mut backlog = Backlog::new(5);
        assert!(backlog.is_empty());
        backlog.push(vec![org_event("b", 10, 1), org_event("a", 10, 2)], &sent);
        assert!(backlog.events.is_empty());
        assert!(!backlog.is_empty(), "the flush still owes them a word");
        let resyncs: Vec<(Option<String>, Vec<String>, String, String)> = backlog
            .resyncs()
            .into_iter()
            .map(|o| (o.org, o.rooms, o.event.into(), o.payload.get().to_string()))
            .collect();
        let word = r#"{"recovered":false}"#.to_string();
        assert_eq!(
            resyncs,
            [
                (
                    Some("a".into()),
                    vec![crate::rooms::org("a")],
                    "sync:complete".into(),
                    word.clone()
                ),
                (
                    Some("b".into()),
                    vec![crate::rooms::org("b")],
                    "sync:complete".into(),
                    word
                ),
            ]
        );
    }

    #[test]
    fn one_append_takes_at_most_append_max_queued_events() {
        let (tx, mut rx) = mpsc::channel(APPEND_MAX * 2);
        for i in 1..APPEND_MAX as i64 + 10 {
            let out = if i % 3 == 0 {
                live("o", "s", "u")
            } else {
                org_event("o", 4, i)
            };
            tx.try_send(out).unwrap();
        }
        let mut queued = Vec::new();
        let (orgs, lives) = gather(&mut queued, org_event("o", 4, 0), &mut rx);
        assert_eq!(orgs.len() + lives.len(), APPEND_MAX);
        assert!(orgs.iter().all(|o| o.org.is_some()) && lives.iter().all(|o| o.live.is_some()));
        let ids = done_ids(&orgs);
        assert_eq!(
            ids[..3],
            [Leased::Event(0), Leased::Event(1), Leased::Event(2)]
        );
        assert!(
            ids.windows(2).all(|w| match w {
                [Leased::Event(a), Leased::Event(b)] => a < b,
                _ => false,
            }),
            "organisation events keep their order"
        );
        assert!(queued.is_empty());
        // What did not fit waits for the next round, in order.
        let next = rx.try_recv().unwrap();
        assert_eq!(next.done, vec![Leased::Event(APPEND_MAX as i64)]);
    }

    #[test]
    fn live_readings_are_published_once_per_site_in_order() {
        let mut no_target = live("o", "s1", "x");
        no_target.live = None;
        let live = [
            live("o", "s1", "u1"),
            live("o", "s2", "u2"),
            no_target,
            live("p", "s1", "u3"),
            live("o", "s1", "u4"),
        ];
        // One line per message: "org/site: unit=payload ...".
        let grouped: Vec<String> = by_site(&live)
            .into_iter()
            .map(|(org, site, readings)| {
                let r: Vec<String> = readings
                    .iter()
                    .map(|(u, p)| format!("{u}={}", p.get()))
                    .collect();
                format!("{org}/{site}: {}", r.join(" "))
            })
            .collect();
        assert_eq!(
            grouped,
            [
                r#"o/s1: u1="u1" u4="u4""#,
                r#"o/s2: u2="u2""#,
                r#"p/s1: u3="u3""#,
            ]
        );
    }

    #[test]
    fn a_replay_waits_for_its_organisations_start_then_goes_up_to_it() {
        let mut delivered = Delivered::default();
        assert!(delivered.replay(sync("a", 1)).is_none());
        assert!(delivered.replay(sync("a", 2)).is_none());
        assert!(delivered.replay(sync("b", 3)).is_none());
        let released = delivered.started("a".into(), at(50));
        assert_eq!(
            released.iter().map(tag).collect::<Vec<_>>(),
            [("a", 1), ("a", 2)]
        );
        // Another organisation's replays still wait for theirs.
        assert!(delivered.started("c".into(), at(60)).is_empty());
        let (command, upto) = delivered.replay(sync("a", 4)).unwrap();
        assert_eq!((tag(&command), upto), (("a", 4), at(50)));
    }

    #[test]
    fn a_replay_goes_up_to_the_event_last_delivered() {
        let mut delivered = Delivered::default();
        delivered.started("a".into(), at(50));
        delivered.delivered("a".into(), at(70));
        assert_eq!(delivered.replay(sync("a", 1)).unwrap().1, at(70));
    }

    #[test]
    fn when_a_stream_is_gone_its_held_replays_are_answered_and_new_ones_wait() {
        let mut delivered = Delivered::default();
        delivered.replay(sync("a", 1));
        delivered.started("b".into(), at(10));
        assert_eq!(
            delivered.gone("a").iter().map(tag).collect::<Vec<_>>(),
            [("a", 1)]
        );
        assert!(delivered.gone("a").is_empty(), "answered once");
        delivered.gone("b");
        assert!(
            delivered.replay(sync("b", 2)).is_none(),
            "no position to replay up to: it waits for a new start"
        );
        assert_eq!(
            delivered
                .started("b".into(), at(20))
                .iter()
                .map(tag)
                .collect::<Vec<_>>(),
            [("b", 2)]
        );
    }

    #[test]
    fn shutdown_waits_until_each_followed_organisation_delivered_its_last_event() {
        let mut delivered = Delivered::default();
        delivered.started("a".into(), at(10));
        let last: HashMap<String, Offset> = [
            ("a".to_string(), at(20)),
            ("not-followed".to_string(), at(99)),
        ]
        .into();
        assert!(!delivered.reached(&last));
        delivered.delivered("a".into(), at(20));
        assert!(delivered.reached(&last));
        delivered.delivered("a".into(), at(30));
        assert!(delivered.reached(&last));
        assert!(Delivered::default().reached(&HashMap::new()));
    }
}
