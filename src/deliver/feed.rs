//! What a node of a cluster takes from Redis: the events of the organisations it has sockets
//! of, and the live readings of the sites it has subscribers of — nothing else.
//!
//! - **Following.** A socket's connect follows its organisation ([`Follows::org`]) and a
//!   `subscribe:*` follows the site ([`Follows::live`]); the handle ([`Following`]) unfollows when
//!   dropped. The first follower of an organisation on this node subscribes to its channel, then
//!   reads where its stream ends: the delivery loop starts there ([`Fed::Started`]), everything
//!   before is in the stream for replays, everything after comes through the channel. The last
//!   one to leave unsubscribes. The connect waits for that start (bounded by [`READY_WAIT`]), so
//!   every event after the dashboard's connect reaches it.
//! - **No gap, no duplicate.** Each announcement carries the id of the entry before it
//!   (`stream.rs`). An announcement that does not follow the last event delivered ([`step`]) is
//!   a gap — lost while the subscriber reconnected, or while this node lagged behind its channel
//!   — and the stream is read from where delivery stands. After every reconnect each followed
//!   organisation is read the same way.
//! - **What Redis lost.** The stream is the truth, but Redis can lose it: a restart without its
//!   data (the organisation's epoch changed), or a failover to a replica that had not received
//!   the last entries (the organisation's master changed, or the stream now ends before what
//!   was delivered). Then the organisation's sockets here are told to refetch ([`Fed::Lost`]):
//!   a replica cannot say what it never received, so a failover is always treated as a loss.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;
use socketioxide_redis::drivers::fred::fred_client as fred;
use tokio::sync::{mpsc, oneshot};

use fred::interfaces::{EventInterface, PubsubInterface};

use super::history::Entry;
use super::offset::{Offset, now_ms};
use super::stream::{Read, RedisLog, events_key, live_channel, parse_announced};
use crate::cluster::RedisHealth;

/// How long a connect or a subscription waits for this node to start following (a Redis that is
/// away does not hold it longer; the organisation's sockets then hear `sync:complete
/// { recovered: false }` once the start succeeds).
const READY_WAIT: Duration = Duration::from_secs(3);

/// How often starts that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The second read of every followed stream after a reconnect.
const RECHECK_AFTER: Duration = Duration::from_secs(3);

/// A change of what this node follows.
pub enum Op {
    Follow {
        org: String,
        ready: Option<oneshot::Sender<()>>,
    },
    Unfollow {
        org: String,
    },
    FollowLive {
        org: String,
        site: String,
        ready: Option<oneshot::Sender<()>>,
    },
    UnfollowLive {
        org: String,
        site: String,
    },
}

/// Where sockets ask to follow; a no-op on a single node. Cheap to clone.
#[derive(Clone, Default)]
pub struct Follows {
    ops: Option<mpsc::UnboundedSender<Op>>,
}

impl Follows {
    /// With `cluster`, also the receiving end for [`run`].
    pub fn new(cluster: bool) -> (Self, Option<mpsc::UnboundedReceiver<Op>>) {
        if !cluster {
            return (Follows::default(), None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        (Follows { ops: Some(tx) }, Some(rx))
    }

    /// Follows `org` until the handle is dropped; returns once this node follows it.
    pub async fn org(&self, org: &str) -> Following {
        let (o, u) = (org.to_string(), org.to_string());
        self.follow(
            |ready| Op::Follow { org: o, ready },
            Op::Unfollow { org: u },
        )
        .await
    }

    /// Follows the live readings of `site` until the handle is dropped.
    pub async fn live(&self, org: &str, site: &str) -> Following {
        let (o, s) = (org.to_string(), site.to_string());
        self.follow(
            |ready| Op::FollowLive {
                org: o,
                site: s,
                ready,
            },
            Op::UnfollowLive {
                org: org.to_string(),
                site: site.to_string(),
            },
        )
        .await
    }

    async fn follow(
        &self,
        op: impl FnOnce(Option<oneshot::Sender<()>>) -> Op,
        undo: Op,
    ) -> Following {
        let Some(ops) = &self.ops else {
            return Following(None);
        };
        let (ready, started) = oneshot::channel();
        if ops.send(op(Some(ready))).is_err() {
            return Following(None);
        }
        tokio::time::timeout(READY_WAIT, started).await.ok();
        Following(Some((ops.clone(), undo)))
    }
}

/// Unfollows when dropped.
pub struct Following(Option<(mpsc::UnboundedSender<Op>, Op)>);

impl Drop for Following {
    fn drop(&mut self) {
        if let Some((ops, undo)) = self.0.take() {
            ops.send(undo).ok();
        }
    }
}

/// What one socket follows: its organisation, and the site of each `subscribe:*` room. Kept in
/// the socket's extensions; dropped with it.
pub struct SocketFollows {
    _org: Following,
    live: Mutex<HashMap<String, Following>>,
}

impl SocketFollows {
    pub fn new(org: Following) -> Self {
        SocketFollows {
            _org: org,
            live: Mutex::default(),
        }
    }

    pub fn add_live(&self, room: String, following: Following) {
        self.live.lock().unwrap().insert(room, following);
    }

    pub fn remove_live(&self, room: &str) {
        self.live.lock().unwrap().remove(room);
    }
}

/// What the feed hands the delivery loop, per organisation in stream order.
pub enum Fed {
    /// This node follows `org` from `at` on (replays of it go up to where delivery stands).
    Started { org: String, at: Offset },
    /// The next event of a followed organisation. `from_here`: from this node's outage
    /// backlog, which its sockets already have.
    Entry {
        org: String,
        entry: Arc<Entry>,
        from_here: bool,
    },
    /// Events of `org` may be missing; delivery goes on from `at`.
    Lost { org: String, at: Offset },
    /// Following `org` could not start (Redis is away): replays asked for meanwhile are
    /// answered `recovered: false` rather than held. The start is retried.
    Unavailable { org: String },
    /// The last socket of `org` left this node.
    Stopped { org: String },
}

/// What to do with an announced event, given where delivery stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// It follows the last event delivered.
    Deliver,
    /// Delivered already (or before this node started following).
    Skip,
    /// Something came between: read the stream.
    Fill,
}

pub fn step(delivered: Offset, prev: Offset, id: Offset) -> Step {
    if id <= delivered {
        Step::Skip
    } else if prev == delivered {
        Step::Deliver
    } else {
        Step::Fill
    }
}

/// Live readings of one site, as published between nodes.
#[derive(Serialize, Deserialize)]
pub struct LiveMessage<'a> {
    /// The node that published (and delivered to its own sockets).
    #[serde(borrow)]
    pub n: Cow<'a, str>,
    /// `(unit, reading)` pairs.
    #[serde(borrow)]
    pub r: Vec<(Cow<'a, str>, &'a RawValue)>,
}

/// Where this node stands in an organisation's stream.
struct Position {
    delivered: Offset,
    epoch: Option<String>,
    server: Option<String>,
}

struct Followed {
    count: usize,
    /// `None` until the start succeeded.
    position: Option<Position>,
    /// Sockets waiting for the start.
    waiting: Vec<oneshot::Sender<()>>,
    /// A start failed while sockets were here: they may have missed events.
    missed: bool,
}

struct LiveFollowed {
    org: String,
    site: String,
    count: usize,
}

/// The feed's task: one per node of a cluster.
pub struct Feed<A: Adapter> {
    pub io: SocketIo<A>,
    pub log: RedisLog,
    pub subscriber: fred::clients::SubscriberClient,
    pub health: RedisHealth,
    pub node: Arc<str>,
    pub out: mpsc::Sender<Fed>,
}

struct State {
    orgs: HashMap<String, Followed>,
    /// Organisation by events channel.
    channels: HashMap<String, String>,
    live: HashMap<String, LiveFollowed>,
}

impl<A: Adapter> Feed<A> {
    /// Runs until `ops` closes (every sender gone) or the delivery loop ends.
    pub async fn run(self, mut ops: mpsc::UnboundedReceiver<Op>) {
        let mut messages = self.subscriber.message_rx();
        let mut reconnects = self.subscriber.reconnect_rx();
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state = State {
            orgs: HashMap::new(),
            channels: HashMap::new(),
            live: HashMap::new(),
        };
        // Zero until something arrives, rather than absent from `/metrics`.
        crate::observe::cluster_org_event_received(0);
        crate::observe::cluster_live_received(0);
        crate::observe::orgs_followed(0);
        let mut recheck = None;
        loop {
            let alive = tokio::select! {
                op = ops.recv() => match op {
                    Some(op) => self.apply(&mut state, op).await,
                    None => false,
                },
                message = messages.recv() => match message {
                    Ok(m) => self.on_message(&mut state, m).await,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "the cluster feed fell behind its channels; reading the streams");
                        self.catch_up_all(&mut state).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => false,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) => {
                        // Resubscribing happens elsewhere (`cluster.rs`); what was published
                        // meanwhile is read from the streams once it is done — and once more a
                        // little later, for what fell between the read and a subscription that
                        // was restored late (an organisation that then goes quiet would
                        // otherwise have it only with its next event).
                        self.wait_resubscribed().await;
                        recheck = Some(tokio::time::Instant::now() + RECHECK_AFTER);
                        self.catch_up_all(&mut state).await
                    }
                    Err(_) => true,
                },
                _ = retry.tick() => {
                    if recheck.is_some_and(|at| at <= tokio::time::Instant::now()) {
                        recheck = None;
                        self.catch_up_all(&mut state).await
                    } else {
                        self.retry_starts(&mut state).await
                    }
                }
            };
            if !alive {
                break;
            }
        }
        crate::observe::orgs_followed(0);
    }

    async fn wait_resubscribed(&self) {
        // The resubscribing task hears of the reconnect at the same time; give it the moment
        // to say it is at work before asking whether it is done.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for _ in 0..100 {
            if self.health.is_up() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `false` once the delivery loop is gone.
    async fn send(&self, fed: Fed) -> bool {
        self.out.send(fed).await.is_ok()
    }

    async fn apply(&self, state: &mut State, op: Op) -> bool {
        match op {
            Op::Follow { org, ready } => {
                let followed = state.orgs.entry(org.clone()).or_insert(Followed {
                    count: 0,
                    position: None,
                    waiting: Vec::new(),
                    missed: false,
                });
                followed.count += 1;
                followed.waiting.extend(ready);
                if followed.count == 1 {
                    state.channels.insert(events_key(&org), org.clone());
                    crate::observe::orgs_followed(state.orgs.len());
                    return self.start(state, &org).await;
                }
                if followed.position.is_some() {
                    for w in followed.waiting.drain(..) {
                        w.send(()).ok();
                    }
                }
                true
            }
            Op::Unfollow { org } => {
                let Some(followed) = state.orgs.get_mut(&org) else {
                    return true;
                };
                followed.count -= 1;
                if followed.count > 0 {
                    return true;
                }
                state.orgs.remove(&org);
                state.channels.remove(&events_key(&org));
                crate::observe::orgs_followed(state.orgs.len());
                if let Err(e) = self.subscriber.sunsubscribe(events_key(&org)).await {
                    tracing::debug!(error = %e, "unsubscribing from an organisation's events failed");
                }
                self.send(Fed::Stopped { org }).await
            }
            Op::FollowLive { org, site, ready } => {
                let channel = live_channel(&org, &site);
                let followed = state.live.entry(channel.clone()).or_insert(LiveFollowed {
                    org,
                    site,
                    count: 0,
                });
                followed.count += 1;
                if followed.count == 1
                    && let Err(e) = self.subscriber.ssubscribe(channel).await
                {
                    // Kept: the resubscription after Redis comes back includes it only if it
                    // is tracked, so it is tried again on the next reconnect or follow.
                    tracing::warn!(error = %e, "subscribing to a site's live readings failed");
                }
                if let Some(ready) = ready {
                    ready.send(()).ok();
                }
                true
            }
            Op::UnfollowLive { org, site } => {
                let channel = live_channel(&org, &site);
                let Some(followed) = state.live.get_mut(&channel) else {
                    return true;
                };
                followed.count -= 1;
                if followed.count == 0 {
                    state.live.remove(&channel);
                    if let Err(e) = self.subscriber.sunsubscribe(channel).await {
                        tracing::debug!(error = %e, "unsubscribing from live readings failed");
                    }
                }
                true
            }
        }
    }

    /// Subscribes to `org`'s channel, then reads where its stream ends: delivery starts there.
    async fn start(&self, state: &mut State, org: &str) -> bool {
        let started = async {
            self.subscriber.ssubscribe(events_key(org)).await?;
            self.log.head(org).await
        }
        .await;
        let Some(followed) = state.orgs.get_mut(org) else {
            return true;
        };
        match started {
            Ok((at, epoch)) => {
                followed.position = Some(Position {
                    delivered: at,
                    epoch,
                    server: self.log.server_of(org),
                });
                let missed = std::mem::take(&mut followed.missed);
                let waiting = std::mem::take(&mut followed.waiting);
                if !self
                    .send(Fed::Started {
                        org: org.to_string(),
                        at,
                    })
                    .await
                {
                    return false;
                }
                for w in waiting {
                    w.send(()).ok();
                }
                if missed {
                    return self
                        .send(Fed::Lost {
                            org: org.to_string(),
                            at,
                        })
                        .await;
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, org, "following an organisation's events failed; retrying");
                followed.missed = true;
                // The sockets go on (their own node's events still reach them); they are told
                // to refetch once the start succeeds.
                for w in followed.waiting.drain(..) {
                    w.send(()).ok();
                }
                self.send(Fed::Unavailable {
                    org: org.to_string(),
                })
                .await
            }
        }
    }

    async fn retry_starts(&self, state: &mut State) -> bool {
        let pending: Vec<String> = state
            .orgs
            .iter()
            .filter(|(_, f)| f.position.is_none())
            .map(|(org, _)| org.clone())
            .collect();
        for org in pending {
            if !self.start(state, &org).await {
                return false;
            }
        }
        true
    }

    async fn on_message(&self, state: &mut State, message: fred::types::Message) -> bool {
        let channel = message.channel.to_string();
        let Some(text) = message.value.as_str() else {
            return true;
        };
        if let Some(org) = state.channels.get(&channel).cloned() {
            crate::observe::cluster_org_event_received(1);
            return self.on_event(state, &org, &text).await;
        }
        if let Some(live) = state.live.get(&channel) {
            self.on_live(&live.org, &live.site, &text).await;
        }
        true
    }

    async fn on_event(&self, state: &mut State, org: &str, text: &str) -> bool {
        let Some(position) = state.orgs.get_mut(org).and_then(|f| f.position.as_mut()) else {
            // Not started yet: the start reads where the stream ends, after this.
            return true;
        };
        let Some(announced) = parse_announced(text) else {
            tracing::warn!(org, "unreadable event announcement; reading the stream");
            return self.fill(state, org).await;
        };
        match step(
            position.delivered,
            announced.prev,
            announced.read.entry.offset,
        ) {
            Step::Skip => true,
            Step::Deliver => {
                position.delivered = announced.read.entry.offset;
                self.send_entry(org, announced.read).await
            }
            Step::Fill => self.fill(state, org).await,
        }
    }

    fn entry(&self, org: &str, read: Read) -> Fed {
        Fed::Entry {
            org: org.to_string(),
            from_here: read.origin.as_deref() == Some(&*self.node),
            entry: Arc::new(read.entry),
        }
    }

    async fn send_entry(&self, org: &str, read: Read) -> bool {
        self.send(self.entry(org, read)).await
    }

    /// Reads `org`'s stream from where delivery stands to its end.
    async fn fill(&self, state: &mut State, org: &str) -> bool {
        loop {
            let Some(position) = state.orgs.get_mut(org).and_then(|f| f.position.as_mut()) else {
                return true;
            };
            let reads = match self.log.after(org, position.delivered).await {
                Ok(reads) => reads,
                Err(e) => {
                    // The next announcement or reconnect tries again.
                    tracing::warn!(error = %e, org, "reading an organisation's stream failed");
                    return true;
                }
            };
            let complete = (reads.len() as u64) < super::stream::READ_COUNT;
            crate::observe::cluster_org_event_received(reads.len());
            for read in reads {
                position.delivered = read.entry.offset;
                if !self.send_entry(org, read).await {
                    return false;
                }
            }
            if complete {
                return true;
            }
        }
    }

    /// After a reconnect or a lag: each followed organisation checked for loss and read up to
    /// the end of its stream.
    async fn catch_up_all(&self, state: &mut State) -> bool {
        self.log.refresh_topology().await;
        let orgs: Vec<String> = state.orgs.keys().cloned().collect();
        for org in orgs {
            if !self.catch_up(state, &org).await {
                return false;
            }
        }
        true
    }

    async fn catch_up(&self, state: &mut State, org: &str) -> bool {
        let Some(position) = state.orgs.get_mut(org).and_then(|f| f.position.as_mut()) else {
            return self.start(state, org).await;
        };
        let (head, epoch) = match self.log.head(org).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, org, "reading an organisation's stream failed");
                return true;
            }
        };
        let server = self.log.server_of(org);
        let expired = head == Offset { ms: 0, seq: 0 }
            && position.delivered.ms + self.log.window_ms() + 1_000 <= now_ms();
        let lost = (position.epoch.is_some() && epoch != position.epoch)
            || (head < position.delivered && !expired)
            || (position.server.is_some() && server != position.server);
        if lost {
            tracing::warn!(
                org,
                "redis lost events of an organisation (restart or failover); its dashboards here refetch"
            );
            position.epoch = epoch;
            position.server = server;
            if head < position.delivered {
                position.delivered = head;
            }
            // What the stream still has (or has anew) is delivered first; the word to refetch
            // covers whatever it lost.
            if !self.fill(state, org).await {
                return false;
            }
            let at = state
                .orgs
                .get(org)
                .and_then(|f| f.position.as_ref())
                .map_or(head, |p| p.delivered);
            return self
                .send(Fed::Lost {
                    org: org.to_string(),
                    at,
                })
                .await;
        }
        if position.epoch.is_none() {
            position.epoch = epoch;
        }
        if expired {
            position.delivered = head;
        }
        self.fill(state, org).await
    }

    /// Delivers live readings another node published to this node's subscribers.
    async fn on_live(&self, org: &str, site: &str, text: &str) {
        let Ok(message) = serde_json::from_str::<LiveMessage<'_>>(text) else {
            tracing::warn!(org, "unreadable live readings skipped");
            return;
        };
        if *message.n == *self.node {
            return;
        }
        crate::observe::cluster_live_received(message.r.len());
        let site_room = crate::rooms::site(org, site);
        for (unit, reading) in message.r {
            let rooms = [crate::rooms::unit(org, &unit), site_room.clone()];
            // A full queue skips a live reading: it is in the unit's next batch.
            self.io
                .to(rooms)
                .local()
                .emit("sensor:reading", reading)
                .await
                .ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(ms: u64, seq: u64) -> Offset {
        Offset { ms, seq }
    }

    #[test]
    fn an_announcement_that_follows_is_delivered() {
        assert_eq!(step(o(10, 0), o(10, 0), o(11, 0)), Step::Deliver);
    }

    #[test]
    fn what_was_delivered_or_came_before_the_start_is_skipped() {
        assert_eq!(step(o(10, 0), o(9, 0), o(10, 0)), Step::Skip);
        assert_eq!(step(o(10, 0), o(8, 0), o(9, 0)), Step::Skip);
    }

    #[test]
    fn a_missing_predecessor_is_read_from_the_stream() {
        // One announcement lost in between.
        assert_eq!(step(o(10, 0), o(11, 0), o(12, 0)), Step::Fill);
        // The stream expired and began again: its first entry names no predecessor.
        assert_eq!(step(o(10, 0), o(0, 0), o(50, 0)), Step::Fill);
    }

    #[tokio::test]
    async fn a_following_unfollows_when_dropped() {
        let (follows, ops) = Follows::new(true);
        let mut ops = ops.unwrap();
        let answer = tokio::spawn(async move {
            let Some(Op::Follow { org, ready }) = ops.recv().await else {
                panic!("expected a follow");
            };
            assert_eq!(org, "o");
            ready.unwrap().send(()).unwrap();
            let Some(Op::Unfollow { org }) = ops.recv().await else {
                panic!("expected an unfollow");
            };
            assert_eq!(org, "o");
        });
        let following = follows.org("o").await;
        drop(following);
        answer.await.unwrap();
    }

    #[tokio::test]
    async fn one_node_follows_nothing() {
        let (follows, ops) = Follows::new(false);
        assert!(ops.is_none());
        let f = follows.live("o", "s").await;
        assert!(f.0.is_none());
    }

    #[test]
    fn live_messages_round_trip() {
        let reading = RawValue::from_string("{\"unitId\":\"u\"}".into()).unwrap();
        let text = serde_json::to_string(&LiveMessage {
            n: "node".into(),
            r: vec![("u".into(), &reading)],
        })
        .unwrap();
        let back: LiveMessage<'_> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.n, "node");
        assert_eq!(back.r[0].0, "u");
        assert_eq!(back.r[0].1.get(), "{\"unitId\":\"u\"}");
    }
}
