//! Delivery to plain WebSocket clients ([`crate::ws`]): telemetry of stored readings and changes
//! of an organisation's open alerts.
//!
//! **Filtered at the source.** Connections register per organisation with a bounded queue and
//! the sites their token may see, and tell the relay what they subscribe to. Each organisation has
//! an index (unit id → connections, device id → connections, alerts → connections), so a
//! reading is looked up by its unit and device and queued only for the connections that
//! subscribed to one of them and may see its site — once, even when both match — and an alert
//! list only for the `alerts` subscribers. The cost of a reading does not grow with the
//! organisation's other connections, and a client subscribed to little is never flooded by what
//! it did not ask for. A connection whose queue is still full is a slow consumer: it is dropped
//! from the registry, which closes it (1013; it reconnects and subscribes again) — nothing grows
//! without bound and nothing is dropped silently.
//!
//! **Across nodes (Redis).** Envelopes of readings and alert changes go over one pub/sub channel,
//! [`CHANNEL`]; each node delivers what other nodes published to its own connections and always
//! delivers its own events directly, so local delivery never waits on Redis. A node publishes
//! only what some other node wants: every node advertises its interest (per organisation: the
//! subscribed unit and device ids, and whether anyone watches alerts) in a key of its own with a
//! short TTL ([`INTEREST_TTL_MS`]), rewritten when it changes and kept alive every
//! [`ADVERTISE_EVERY`], deleted when its last subscriber leaves; and every node reads the others'
//! keys every [`ADVERTISE_EVERY`] into a cached view consulted per reading. New interest is also
//! announced at once on [`INTEREST_CHANNEL`] before the client's `subscribed` confirmation is
//! sent, so in practice a subscriber receives readings posted to any node from its confirmation
//! on. **Bound:** should that announcement be missed (Redis reconnecting), the advertisement
//! reaches every node's view within 2 × `ADVERTISE_EVERY` (≈ 2 s) of the subscription (plus a
//! Redis command timeout while Redis is slow). Until a node has read the view once after
//! starting, or after a failed read, it publishes everything (the behaviour before filtering).
//! Interest that disappears stops attracting publishes within about 2 s of the last
//! unsubscribe (but not before [`ANNOUNCED_KEEP`] after it was announced), or within
//! TTL + 1 s of a node going away without a word.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use socketioxide_redis::drivers::fred::fred_client as fred;
use tokio::sync::{Notify, mpsc};

use fred::interfaces::{EventInterface, KeysInterface, PubsubInterface, SetsInterface};
use fred::types::Expiration;

use crate::cluster::RedisHealth;
use crate::store::Store;
use crate::tasks::{Role, Tasks};
use crate::wire::{Alert, SensorReading};

/// Envelopes of readings and alert changes between nodes.
const CHANNEL: &str = "sensorwire:ws";
/// Announcements of new interest (a node's first subscriber of a unit, device or alerts).
const INTEREST_CHANNEL: &str = "sensorwire:ws:interest";
/// The set of node ids that may have an interest key. The relay's keys share the hash tag
/// `{ws}`, so a Redis Cluster keeps them in one slot and one `MGET` reads every node's.
const NODES_KEY: &str = "sensorwire:{ws}:nodes";
/// How often a node keeps its advertisement alive and reads the other nodes'.
const ADVERTISE_EVERY: Duration = Duration::from_secs(1);
/// Lifetime of a node's advertisement: a node that dies stops attracting publishes after this.
const INTEREST_TTL_MS: i64 = 5_000;
/// How long an announced interest is kept in the view regardless of the advertisements read
/// (a read started before the announcement may not show it yet).
const ANNOUNCED_KEEP: Duration = Duration::from_secs(3);
const QUEUE: usize = 1024;

fn interest_key(node: &str) -> String {
    format!("sensorwire:{{ws}}:interest:{node}")
}

/// What a connection receives.
#[derive(Debug)]
pub enum Delivery {
    Reading {
        site_id: String,
        reading: SensorReading,
    },
    /// The organisation's open alerts after a change (every site; connections filter).
    Alerts(Vec<Alert>),
}

/// What a connection subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", content = "id", rename_all = "snake_case")]
pub enum Topic {
    Alerts,
    Unit(String),
    Device(String),
}

/// What crosses nodes.
#[derive(Serialize, Deserialize)]
struct Envelope {
    node: String,
    org: String,
    #[serde(default)]
    readings: Vec<(String, SensorReading)>,
    #[serde(default)]
    alerts_changed: bool,
}

/// A node's announcement of a new interest.
#[derive(Serialize, Deserialize)]
struct Announcement {
    node: String,
    org: String,
    topic: Topic,
}

/// What an organisation's subscribers want (of one node, or of several together).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Wants {
    #[serde(default)]
    alerts: bool,
    #[serde(default)]
    units: HashSet<String>,
    #[serde(default)]
    devices: HashSet<String>,
}

impl Wants {
    fn add(&mut self, topic: &Topic) {
        match topic {
            Topic::Alerts => self.alerts = true,
            Topic::Unit(u) => {
                self.units.insert(u.clone());
            }
            Topic::Device(d) => {
                self.devices.insert(d.clone());
            }
        }
    }

    fn merge(&mut self, other: Wants) {
        self.alerts |= other.alerts;
        self.units.extend(other.units);
        self.devices.extend(other.devices);
    }

    fn any_reading(&self) -> bool {
        !self.units.is_empty() || !self.devices.is_empty()
    }

    fn reading(&self, reading: &SensorReading) -> bool {
        self.units.contains(&reading.unit_id)
            || reading
                .device_id
                .as_ref()
                .is_some_and(|d| self.devices.contains(d))
    }
}

/// Per organisation → what its subscribers want.
type Interest = HashMap<String, Wants>;

/// One connection of the registry.
struct Conn {
    tx: mpsc::Sender<Arc<Delivery>>,
    /// The sites the token may see (`None`: every site).
    sites: Option<HashSet<String>>,
    topics: HashSet<Topic>,
}

impl Conn {
    fn can_see(&self, site_id: &str) -> bool {
        self.sites.as_ref().is_none_or(|s| s.contains(site_id))
    }
}

/// An organisation's connections and who subscribed to what.
#[derive(Default)]
struct OrgIndex {
    conns: HashMap<u64, Conn>,
    units: HashMap<String, HashSet<u64>>,
    devices: HashMap<String, HashSet<u64>>,
    alerts: HashSet<u64>,
}

impl OrgIndex {
    /// Adds `id` to `topic`'s entry; true when the entry was empty (new interest of this node).
    fn add(&mut self, id: u64, topic: &Topic) -> bool {
        let set = match topic {
            Topic::Alerts => &mut self.alerts,
            Topic::Unit(u) => self.units.entry(u.clone()).or_default(),
            Topic::Device(d) => self.devices.entry(d.clone()).or_default(),
        };
        let new = set.is_empty();
        set.insert(id);
        new
    }

    /// Removes `id` from `topic`'s entry; true when the entry became empty.
    fn remove(&mut self, id: u64, topic: &Topic) -> bool {
        fn from(map: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) -> bool {
            let Some(set) = map.get_mut(key) else {
                return false;
            };
            let gone = set.remove(&id) && set.is_empty();
            if set.is_empty() {
                map.remove(key);
            }
            gone
        }
        match topic {
            Topic::Alerts => self.alerts.remove(&id) && self.alerts.is_empty(),
            Topic::Unit(u) => from(&mut self.units, u, id),
            Topic::Device(d) => from(&mut self.devices, d, id),
        }
    }

    fn wants(&self) -> Wants {
        Wants {
            alerts: !self.alerts.is_empty(),
            units: self.units.keys().cloned().collect(),
            devices: self.devices.keys().cloned().collect(),
        }
    }

    fn any_reading(&self) -> bool {
        !self.units.is_empty() || !self.devices.is_empty()
    }

    /// Queues the reading for the connections subscribed to its unit or device (once each) that
    /// may see its site; adds the connections whose queue was full to `slow`.
    fn deliver_reading(&self, site_id: &str, reading: &SensorReading, slow: &mut Vec<u64>) {
        let by_unit = self.units.get(&reading.unit_id);
        let by_device = reading.device_id.as_ref().and_then(|d| self.devices.get(d));
        let mut targets: Vec<u64> = by_unit.into_iter().flatten().copied().collect();
        if let Some(by_device) = by_device {
            targets.extend(
                by_device
                    .iter()
                    .filter(|id| by_unit.is_none_or(|u| !u.contains(id))),
            );
        }
        let mut delivery = None;
        for id in targets {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            if !conn.can_see(site_id) {
                continue;
            }
            let d = delivery
                .get_or_insert_with(|| {
                    Arc::new(Delivery::Reading {
                        site_id: site_id.to_string(),
                        reading: reading.clone(),
                    })
                })
                .clone();
            if conn.tx.try_send(d).is_err() {
                slow.push(id);
            }
        }
    }
}

/// This node's cached view of what the other nodes want.
#[derive(Default)]
struct Remote {
    /// The advertisements were read successfully (the view can be trusted).
    loaded: bool,
    /// What the other nodes' advertisements (and recent announcements) say, per organisation.
    view: Interest,
    /// Recent announcements: kept in the view for [`ANNOUNCED_KEEP`].
    announced: Vec<(Instant, String, Topic)>,
}

#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    store: Store,
    orgs: RwLock<HashMap<String, OrgIndex>>,
    next: AtomicU64,
    redis: Option<(fred::clients::Client, RedisHealth)>,
    remote: RwLock<Remote>,
    /// This node's interest changed since it was last advertised.
    changed: AtomicBool,
    /// Wakes the advertiser at once (new interest).
    advertise_now: Notify,
}

impl Relay {
    pub fn new(store: Store, redis: Option<(fred::clients::Client, RedisHealth)>) -> Relay {
        let mut node = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut node);
        Relay {
            inner: Arc::new(Inner {
                node: hex::encode(node),
                store,
                orgs: RwLock::new(HashMap::new()),
                next: AtomicU64::new(0),
                redis,
                remote: RwLock::new(Remote::default()),
                changed: AtomicBool::new(true),
                advertise_now: Notify::new(),
            }),
        }
    }

    /// Relays what other nodes publish to this node's connections, and keeps this node's
    /// advertised interest and its view of the other nodes' up to date: two tasks of `tasks`,
    /// essential (without them plain WebSocket clients silently miss other nodes' readings),
    /// dropped at their stop.
    pub fn start_across_nodes(&self, subscriber: fred::clients::SubscriberClient, tasks: &Tasks) {
        let relay = self.clone();
        let mut messages = subscriber.message_rx();
        let _ = tasks.spawn_until_stopped("ws relay", Role::Essential, async move {
            if let Err(e) = subscriber.subscribe(vec![CHANNEL, INTEREST_CHANNEL]).await {
                tracing::warn!(error = %e, "plain WebSocket relay: subscribe failed; retried on reconnect");
            }
            loop {
                match messages.recv().await {
                    Ok(msg) => {
                        let Some(text) = msg.value.as_str() else {
                            continue;
                        };
                        if &*msg.channel == INTEREST_CHANNEL {
                            match serde_json::from_str::<Announcement>(&text) {
                                Ok(a) if a.node != relay.inner.node => relay.announced(a),
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::warn!(error = %e, "plain WebSocket relay: bad announcement")
                                }
                            }
                            continue;
                        }
                        if &*msg.channel != CHANNEL {
                            continue;
                        }
                        match serde_json::from_str::<Envelope>(&text) {
                            Ok(env) if env.node != relay.inner.node => relay.deliver_remote(env).await,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "plain WebSocket relay: bad message")
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "plain WebSocket relay lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        if self.inner.redis.is_some() {
            let _ = tasks.spawn_until_stopped(
                "ws advertise",
                Role::Essential,
                self.clone().advertise(),
            );
        }
    }

    /// A new connection of `org` that may see `sites` (`None`: every site). It receives nothing
    /// until it subscribes.
    pub fn register(
        &self,
        org: &str,
        sites: Option<Vec<String>>,
    ) -> (u64, mpsc::Receiver<Arc<Delivery>>) {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        let conn = Conn {
            tx,
            sites: sites.map(|s| s.into_iter().collect()),
            topics: HashSet::new(),
        };
        self.inner
            .orgs
            .write()
            .unwrap()
            .entry(org.to_string())
            .or_default()
            .conns
            .insert(id, conn);
        (id, rx)
    }

    /// Connection `id` of `org` now receives `topic`. When it is the first subscriber of that
    /// topic on this node, the other nodes are told before this returns (best effort, bounded by
    /// the Redis command timeout; skipped while Redis is away), so readings posted to any node
    /// from now on reach it.
    pub async fn subscribe(&self, org: &str, id: u64, topic: Topic) {
        let new = {
            let mut orgs = self.inner.orgs.write().unwrap();
            let Some(index) = orgs.get_mut(org) else {
                return;
            };
            let Some(conn) = index.conns.get_mut(&id) else {
                return;
            };
            if !conn.topics.insert(topic.clone()) {
                return;
            }
            index.add(id, &topic)
        };
        if !new {
            return;
        }
        self.inner.changed.store(true, Ordering::Relaxed);
        self.inner.advertise_now.notify_one();
        if let Some((redis, _)) = self.inner.redis.as_ref().filter(|(_, h)| h.is_up()) {
            let a = Announcement {
                node: self.inner.node.clone(),
                org: org.to_string(),
                topic,
            };
            let Ok(text) = serde_json::to_string(&a) else {
                return;
            };
            if let Err(e) = redis.publish::<(), _, _>(INTEREST_CHANNEL, text).await {
                tracing::debug!(error = %e, "plain WebSocket: announcing a subscription failed");
            }
        }
    }

    /// Connection `id` of `org` no longer receives `topic`.
    pub fn unsubscribe(&self, org: &str, id: u64, topic: &Topic) {
        let mut orgs = self.inner.orgs.write().unwrap();
        let Some(index) = orgs.get_mut(org) else {
            return;
        };
        let Some(conn) = index.conns.get_mut(&id) else {
            return;
        };
        if conn.topics.remove(topic) && index.remove(id, topic) {
            self.inner.changed.store(true, Ordering::Relaxed);
        }
    }

    /// Connection `id` of `org` is gone (closed, or dropped as a slow consumer): every entry of
    /// it leaves the index, and its queue closes once drained.
    pub fn unregister(&self, org: &str, id: u64) {
        let mut orgs = self.inner.orgs.write().unwrap();
        let Some(index) = orgs.get_mut(org) else {
            return;
        };
        if let Some(conn) = index.conns.remove(&id) {
            let mut changed = false;
            for topic in &conn.topics {
                changed |= index.remove(id, topic);
            }
            if changed {
                self.inner.changed.store(true, Ordering::Relaxed);
            }
        }
        if index.conns.is_empty() {
            orgs.remove(org);
        }
    }

    /// Whether readings of `org` can reach any plain WebSocket client: one subscribed to a unit
    /// or device here, or (with Redis) on another node as far as this node knows.
    pub fn wanted(&self, org: &str) -> bool {
        self.wanted_here(org) || self.wanted_remotely(org)
    }

    fn wanted_here(&self, org: &str) -> bool {
        self.inner
            .orgs
            .read()
            .unwrap()
            .get(org)
            .is_some_and(OrgIndex::any_reading)
    }

    /// Redis, when it is up (publishing is skipped otherwise).
    fn redis(&self) -> Option<&fred::clients::Client> {
        self.inner
            .redis
            .as_ref()
            .filter(|(_, h)| h.is_up())
            .map(|(c, _)| c)
    }

    fn wanted_remotely(&self, org: &str) -> bool {
        if self.redis().is_none() {
            return false;
        }
        let remote = self.inner.remote.read().unwrap();
        !remote.loaded || remote.view.get(org).is_some_and(Wants::any_reading)
    }

    fn drop_slow(&self, org: &str, slow: Vec<u64>) {
        for id in slow {
            tracing::info!(org = %org, "plain WebSocket client too slow; closing it");
            crate::observe::slow_consumer("plain_websocket");
            self.unregister(org, id);
        }
    }

    /// Queues readings for this node's connections that subscribed to them.
    fn deliver_readings(&self, org: &str, readings: &[(String, SensorReading)]) {
        let mut slow = Vec::new();
        if let Some(index) = self.inner.orgs.read().unwrap().get(org) {
            if !index.any_reading() {
                return;
            }
            for (site_id, reading) in readings {
                index.deliver_reading(site_id, reading, &mut slow);
            }
        }
        slow.sort_unstable();
        slow.dedup();
        self.drop_slow(org, slow);
    }

    async fn publish(&self, env: Envelope) {
        // While Redis is away, skip the relay instead of waiting on it: local delivery goes on.
        if let Some(redis) = self.redis() {
            let Ok(text) = serde_json::to_string(&env) else {
                return;
            };
            if let Err(e) = redis.publish::<(), _, _>(CHANNEL, text).await {
                tracing::debug!(error = %e, "plain WebSocket relay: publish failed");
            }
        }
    }

    /// Stored readings of `org` (with their sites), from this node's pipeline: delivered to the
    /// local subscribers, and published for the ones other nodes want.
    pub async fn readings(&self, org: &str, readings: Vec<(String, SensorReading)>) {
        self.deliver_readings(org, &readings);
        if self.redis().is_none() {
            return;
        }
        let remote: Vec<(String, SensorReading)> = {
            let remote = self.inner.remote.read().unwrap();
            if !remote.loaded {
                readings
            } else if let Some(wants) = remote.view.get(org) {
                readings
                    .into_iter()
                    .filter(|(_, r)| wants.reading(r))
                    .collect()
            } else {
                Vec::new()
            }
        };
        if remote.is_empty() {
            return;
        }
        self.publish(Envelope {
            node: self.inner.node.clone(),
            org: org.to_string(),
            readings: remote,
            alerts_changed: false,
        })
        .await;
    }

    /// An alert of `org` opened or resolved on this node.
    pub async fn alerts_changed(&self, org: &str) {
        self.push_alert_list(org).await;
        let wanted = self.redis().is_some() && {
            let remote = self.inner.remote.read().unwrap();
            !remote.loaded || remote.view.get(org).is_some_and(|w| w.alerts)
        };
        if wanted {
            self.publish(Envelope {
                node: self.inner.node.clone(),
                org: org.to_string(),
                readings: Vec::new(),
                alerts_changed: true,
            })
            .await;
        }
    }

    async fn deliver_remote(&self, env: Envelope) {
        if !env.readings.is_empty() {
            self.deliver_readings(&env.org, &env.readings);
        }
        if env.alerts_changed {
            self.push_alert_list(&env.org).await;
        }
    }

    fn alert_subscribers(&self, org: &str) -> bool {
        self.inner
            .orgs
            .read()
            .unwrap()
            .get(org)
            .is_some_and(|i| !i.alerts.is_empty())
    }

    /// Fetches the open alerts once per change and hands them to the org's `alerts` subscribers.
    async fn push_alert_list(&self, org: &str) {
        if !self.alert_subscribers(org) {
            return;
        }
        let alerts = match self.open_alerts(org).await {
            Ok(alerts) => Arc::new(Delivery::Alerts(alerts)),
            Err(e) => {
                tracing::warn!(error = %e, "open alerts could not be read for plain WebSocket clients");
                return;
            }
        };
        let mut slow = Vec::new();
        if let Some(index) = self.inner.orgs.read().unwrap().get(org) {
            for id in &index.alerts {
                if let Some(conn) = index.conns.get(id)
                    && conn.tx.try_send(alerts.clone()).is_err()
                {
                    slow.push(*id);
                }
            }
        }
        self.drop_slow(org, slow);
    }

    pub async fn open_alerts(&self, org: &str) -> Result<Vec<Alert>, crate::store::StoreError> {
        let rows = self
            .inner
            .store
            .list_alerts(org, Some(crate::wire::AlertStatus::Active), 5000)
            .await?;
        Ok(rows.into_iter().map(Alert::from).collect())
    }

    // -----------------------------------------------------------------------------------------
    // Interest across nodes

    /// What this node's connections want, per organisation (organisations wanting nothing are
    /// left out).
    fn local_interest(&self) -> Interest {
        self.inner
            .orgs
            .read()
            .unwrap()
            .iter()
            .map(|(org, index)| (org.clone(), index.wants()))
            .filter(|(_, w)| w.alerts || w.any_reading())
            .collect()
    }

    /// Another node announced a new interest: publish for it from now on.
    fn announced(&self, a: Announcement) {
        let mut remote = self.inner.remote.write().unwrap();
        remote.view.entry(a.org.clone()).or_default().add(&a.topic);
        remote.announced.push((Instant::now(), a.org, a.topic));
    }

    /// Every [`ADVERTISE_EVERY`] (and at once on new interest): advertise this node's interest,
    /// then read the other nodes'.
    async fn advertise(self) {
        let mut tick = tokio::time::interval(ADVERTISE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether this node's key may exist (so it is deleted when interest ends).
        let mut advertised = false;
        loop {
            let full = tokio::select! {
                _ = tick.tick() => true,
                _ = self.inner.advertise_now.notified() => false,
            };
            let Some(redis) = self.redis().cloned() else {
                // Nothing is published meanwhile; start from a fresh read when Redis is back.
                self.inner.remote.write().unwrap().loaded = false;
                continue;
            };
            if let Err(e) = self.advertise_once(&redis, &mut advertised).await {
                self.inner.changed.store(true, Ordering::Relaxed);
                tracing::debug!(error = %e, "plain WebSocket: advertising interest failed");
            }
            if full && let Err(e) = self.read_interest(&redis).await {
                self.inner.remote.write().unwrap().loaded = false;
                tracing::debug!(error = %e, "plain WebSocket: reading the nodes' interest failed");
            }
        }
    }

    async fn advertise_once(
        &self,
        redis: &fred::clients::Client,
        advertised: &mut bool,
    ) -> Result<(), fred::error::Error> {
        let key = interest_key(&self.inner.node);
        let node = self.inner.node.as_str();
        let mut changed = self.inner.changed.swap(false, Ordering::Relaxed);
        if !changed && *advertised {
            // Unchanged: keep it alive; rewrite it if it is gone (expired, Redis restarted).
            let alive: i64 = redis.pexpire(&key, INTEREST_TTL_MS, None).await?;
            changed = alive == 0;
        }
        if !changed {
            if *advertised {
                // The set lost this node (a reader pruned it while the key was being rewritten,
                // or Redis restarted): adding it again is harmless.
                redis.sadd::<(), _, _>(NODES_KEY, node).await?;
            }
            return Ok(());
        }
        let interest = self.local_interest();
        if interest.is_empty() {
            if *advertised {
                redis.del::<(), _>(&key).await?;
                redis.srem::<(), _, _>(NODES_KEY, node).await?;
                *advertised = false;
            }
            return Ok(());
        }
        let Ok(text) = serde_json::to_string(&interest) else {
            return Ok(());
        };
        redis
            .set::<(), _, _>(
                &key,
                text,
                Some(Expiration::PX(INTEREST_TTL_MS)),
                None,
                false,
            )
            .await?;
        redis.sadd::<(), _, _>(NODES_KEY, node).await?;
        *advertised = true;
        Ok(())
    }

    /// Reads every other node's advertisement into the cached view; prunes nodes whose key
    /// expired.
    async fn read_interest(&self, redis: &fred::clients::Client) -> Result<(), fred::error::Error> {
        let nodes: Vec<String> = redis.smembers(NODES_KEY).await?;
        let others: Vec<String> = nodes
            .into_iter()
            .filter(|n| *n != self.inner.node)
            .collect();
        let mut view = Interest::new();
        if !others.is_empty() {
            let keys: Vec<String> = others.iter().map(|n| interest_key(n)).collect();
            let values: Vec<Option<String>> = if keys.len() == 1 {
                vec![redis.get(keys[0].as_str()).await?]
            } else {
                redis.mget(keys).await?
            };
            let mut gone = Vec::new();
            for (node, value) in others.iter().zip(values) {
                let Some(text) = value else {
                    gone.push(node.clone());
                    continue;
                };
                match serde_json::from_str::<Interest>(&text) {
                    Ok(interest) => {
                        for (org, wants) in interest {
                            view.entry(org).or_default().merge(wants);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, node = %node, "plain WebSocket: bad interest advertisement")
                    }
                }
            }
            if !gone.is_empty() {
                redis.srem::<(), _, _>(NODES_KEY, gone).await?;
            }
        }
        let mut remote = self.inner.remote.write().unwrap();
        remote
            .announced
            .retain(|(at, _, _)| at.elapsed() < ANNOUNCED_KEEP);
        for (_, org, topic) in &remote.announced {
            view.entry(org.clone()).or_default().add(topic);
        }
        remote.view = view;
        remote.loaded = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(unit: &str, device: Option<&str>) -> SensorReading {
        SensorReading {
            id: format!("r-{unit}"),
            unit_id: unit.into(),
            device_id: device.map(Into::into),
            temperature: 4.0,
            humidity: None,
            battery: None,
            signal_strength: None,
            recorded_at: "2024-01-01T00:00:00.000Z".into(),
            source: "api".into(),
        }
    }

    async fn relay() -> (Relay, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
        (Relay::new(store, None), dir)
    }

    fn drain(rx: &mut mpsc::Receiver<Arc<Delivery>>) -> Vec<String> {
        let mut got = Vec::new();
        while let Ok(d) = rx.try_recv() {
            match &*d {
                Delivery::Reading { reading, .. } => got.push(reading.unit_id.clone()),
                Delivery::Alerts(_) => got.push("alerts".into()),
            }
        }
        got
    }

    #[tokio::test]
    async fn readings_go_only_to_their_subscribers_once_and_within_their_sites() {
        let (relay, _dir) = relay().await;
        let (alerts_only, mut rx_alerts) = relay.register("o", None);
        relay.subscribe("o", alerts_only, Topic::Alerts).await;
        let (both, mut rx_both) = relay.register("o", None);
        relay.subscribe("o", both, Topic::Unit("u1".into())).await;
        relay.subscribe("o", both, Topic::Device("d1".into())).await;
        let (restricted, mut rx_restricted) = relay.register("o", Some(vec!["s1".into()]));
        relay
            .subscribe("o", restricted, Topic::Device("d1".into()))
            .await;
        let (_idle, mut rx_idle) = relay.register("o", None);
        assert!(relay.wanted("o"));
        assert!(!relay.wanted("other"));

        let mut burst = Vec::new();
        for i in 0..5000 {
            burst.push(("s2".to_string(), reading(&format!("x{i}"), None)));
        }
        burst.push(("s1".into(), reading("u1", Some("d1"))));
        burst.push(("s2".into(), reading("u2", Some("d1"))));
        relay.readings("o", burst).await;

        assert_eq!(drain(&mut rx_alerts), Vec::<String>::new());
        assert_eq!(drain(&mut rx_idle), Vec::<String>::new());
        assert_eq!(drain(&mut rx_both), vec!["u1", "u2"]);
        assert_eq!(drain(&mut rx_restricted), vec!["u1"]);

        // Unsubscribe and disconnect remove the entries.
        relay.unsubscribe("o", both, &Topic::Unit("u1".into()));
        relay.unregister("o", restricted);
        relay
            .readings("o", vec![("s1".into(), reading("u1", Some("d9")))])
            .await;
        assert_eq!(drain(&mut rx_both), Vec::<String>::new());
        {
            let orgs = relay.inner.orgs.read().unwrap();
            let index = &orgs["o"];
            assert!(index.units.is_empty());
            assert_eq!(index.devices["d1"], HashSet::from([both]));
        }
        relay.unsubscribe("o", both, &Topic::Device("d1".into()));
        assert!(!relay.wanted("o"), "only an alerts subscriber is left");
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_connection_and_its_entries() {
        let (relay, _dir) = relay().await;
        let (id, mut rx) = relay.register("o", None);
        relay.subscribe("o", id, Topic::Unit("u1".into())).await;
        let burst: Vec<_> = (0..QUEUE + 1)
            .map(|_| ("s".to_string(), reading("u1", None)))
            .collect();
        relay.readings("o", burst).await;
        assert!(relay.inner.orgs.read().unwrap().get("o").is_none());
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, QUEUE, "the queue drains, then closes");
    }
}
