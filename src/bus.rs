//! Delivery to plain WebSocket clients ([`crate::ws`]): telemetry of stored readings and changes
//! of an organisation's open alerts.
//!
//! Connections register per organisation and get a bounded queue. A connection whose queue is
//! full is a slow consumer: it is dropped from the registry, which closes it (it reconnects and
//! gets the current alert list) — nothing grows without bound and nothing is dropped silently.
//! With Redis, every event is also published on one channel; each node delivers what other
//! nodes published to its own connections, and always delivers its own events directly, so
//! local delivery goes on while Redis is away.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use socketioxide_redis::drivers::fred::fred_client as fred;
use tokio::sync::mpsc;

use fred::interfaces::{EventInterface, PubsubInterface};

use crate::cluster::RedisHealth;
use crate::store::Store;
use crate::wire::{Alert, SensorReading};

const CHANNEL: &str = "sensorwire:ws";
const QUEUE: usize = 1024;

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

type Registry = HashMap<String, HashMap<u64, mpsc::Sender<Arc<Delivery>>>>;

#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    store: Store,
    orgs: RwLock<Registry>,
    next: AtomicU64,
    redis: Option<(fred::clients::Client, RedisHealth)>,
}

impl Bus {
    pub fn new(store: Store, redis: Option<(fred::clients::Client, RedisHealth)>) -> Bus {
        let mut node = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut node);
        Bus {
            inner: Arc::new(Inner {
                node: hex::encode(node),
                store,
                orgs: RwLock::new(HashMap::new()),
                next: AtomicU64::new(0),
                redis,
            }),
        }
    }

    /// Relays what other nodes publish to this node's connections.
    pub fn relay(&self, subscriber: fred::clients::SubscriberClient) {
        let bus = self.clone();
        let mut messages = subscriber.message_rx();
        tokio::spawn(async move {
            if let Err(e) = subscriber.subscribe(CHANNEL).await {
                tracing::warn!(error = %e, "plain WebSocket relay: subscribe failed; retried on reconnect");
            }
            loop {
                match messages.recv().await {
                    Ok(msg) => {
                        let Some(text) = msg.value.as_str() else {
                            continue;
                        };
                        match serde_json::from_str::<Envelope>(&text) {
                            Ok(env) if env.node != bus.inner.node => bus.deliver_remote(env).await,
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
    }

    pub fn register(&self, org: &str) -> (u64, mpsc::Receiver<Arc<Delivery>>) {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(QUEUE);
        self.inner
            .orgs
            .write()
            .unwrap()
            .entry(org.to_string())
            .or_default()
            .insert(id, tx);
        (id, rx)
    }

    pub fn unregister(&self, org: &str, id: u64) {
        let mut orgs = self.inner.orgs.write().unwrap();
        if let Some(conns) = orgs.get_mut(org) {
            conns.remove(&id);
            if conns.is_empty() {
                orgs.remove(org);
            }
        }
    }

    /// Whether readings of `org` can reach any plain WebSocket client: one connected here, or
    /// (with Redis) possibly on another node.
    pub fn wanted(&self, org: &str) -> bool {
        self.inner.redis.is_some() || self.has_connections(org)
    }

    fn has_connections(&self, org: &str) -> bool {
        self.inner.orgs.read().unwrap().contains_key(org)
    }

    fn deliver(&self, org: &str, delivery: Delivery) {
        let delivery = Arc::new(delivery);
        let mut slow = Vec::new();
        if let Some(conns) = self.inner.orgs.read().unwrap().get(org) {
            for (id, tx) in conns {
                if tx.try_send(delivery.clone()).is_err() {
                    slow.push(*id);
                }
            }
        }
        for id in slow {
            tracing::info!(org = %org, "plain WebSocket client too slow; closing it");
            crate::observe::slow_consumer("plain_websocket");
            self.unregister(org, id);
        }
    }

    async fn publish(&self, env: Envelope) {
        // While Redis is away, skip the relay instead of waiting on it: local delivery goes on.
        if let Some((redis, _)) = self.inner.redis.as_ref().filter(|(_, h)| h.is_up()) {
            let Ok(text) = serde_json::to_string(&env) else {
                return;
            };
            if let Err(e) = redis.publish::<(), _, _>(CHANNEL, text).await {
                tracing::debug!(error = %e, "plain WebSocket relay: publish failed");
            }
        }
    }

    /// Stored readings of `org` (with their sites), from this node's pipeline.
    pub async fn readings(&self, org: &str, readings: Vec<(String, SensorReading)>) {
        for (site_id, reading) in &readings {
            self.deliver(
                org,
                Delivery::Reading {
                    site_id: site_id.clone(),
                    reading: reading.clone(),
                },
            );
        }
        self.publish(Envelope {
            node: self.inner.node.clone(),
            org: org.to_string(),
            readings,
            alerts_changed: false,
        })
        .await;
    }

    /// An alert of `org` opened or resolved on this node.
    pub async fn alerts_changed(&self, org: &str) {
        self.push_alert_list(org).await;
        self.publish(Envelope {
            node: self.inner.node.clone(),
            org: org.to_string(),
            readings: Vec::new(),
            alerts_changed: true,
        })
        .await;
    }

    async fn deliver_remote(&self, env: Envelope) {
        if !self.has_connections(&env.org) {
            return;
        }
        for (site_id, reading) in env.readings {
            self.deliver(&env.org, Delivery::Reading { site_id, reading });
        }
        if env.alerts_changed {
            self.push_alert_list(&env.org).await;
        }
    }

    /// Fetches the open alerts once per change and hands them to every connection of the org.
    async fn push_alert_list(&self, org: &str) {
        if !self.has_connections(org) {
            return;
        }
        match self.open_alerts(org).await {
            Ok(alerts) => self.deliver(org, Delivery::Alerts(alerts)),
            Err(e) => {
                tracing::warn!(error = %e, "open alerts could not be read for plain WebSocket clients")
            }
        }
    }

    pub async fn open_alerts(&self, org: &str) -> Result<Vec<Alert>, crate::store::StoreError> {
        let rows = self
            .inner
            .store
            .list_alerts(org, Some(crate::wire::AlertStatus::Active), 5000)
            .await?;
        Ok(rows.into_iter().map(Alert::from).collect())
    }
}
