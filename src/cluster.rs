//! Several nodes: the Socket.io Redis adapter (socketioxide-redis over fred) and a Redis health
//! watch.
//!
//! fred needs deliberate settings to survive a Redis restart (see PITFALLS): an explicit
//! reconnect policy that never gives up, unresponsive-connection detection, and re-subscribing
//! after a reconnect — done here ([`resubscribe_on_reconnect`]) because the adapter's driver does
//! not, and fred's own `manage_subscriptions` stops at an empty `SUBSCRIBE` that Redis refuses
//! before it reaches the sharded channels the adapter uses. Until every subscription is back the
//! node reports itself unready. The adapter's pub/sub relay hands messages to a bounded
//! buffer and panics when it overflows; the buffer is sized far above our bursts, and a panic
//! there marks the node unready (`/readyz`) with an ERROR log instead of degrading silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use socketioxide_redis::drivers::fred::fred_client as fred;
use socketioxide_redis::{RedisAdapterConfig, RedisAdapterCtr};

use fred::prelude::{ClientLike, Config as FredConfig};
use fred::types::config::{ReconnectPolicy, UnresponsiveConfig};
use fred::types::{Builder, RespVersion};

use crate::tasks::{Role, Tasks};

pub use socketioxide_redis::FredAdapter;

/// Pub/sub messages fred buffers for a consumer that is momentarily behind.
const BROADCAST_CAPACITY: usize = 8 * 1024;

/// Pub/sub messages the adapter may hold per namespace before its relay overflows.
const STREAM_BUFFER: usize = 64 * 1024;

/// The node's view of Redis, for `/readyz` and for logging state changes once.
#[derive(Clone, Default)]
pub struct RedisHealth {
    up: Arc<AtomicBool>,
    relay_failed: Arc<AtomicBool>,
    /// Subscriber clients whose subscriptions are not (yet) restored after a reconnect.
    resubscribing: Arc<std::sync::atomic::AtomicUsize>,
}

impl RedisHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && !self.relay_failed.load(Ordering::Relaxed)
            && self.resubscribing.load(Ordering::Relaxed) == 0
    }

    /// A publish just failed: treat Redis as away until the next successful ping, so delivery
    /// stops waiting on it at once.
    pub fn mark_down(&self) {
        self.up.store(false, Ordering::Relaxed);
    }

    pub fn describe(&self) -> &'static str {
        if self.relay_failed.load(Ordering::Relaxed) {
            "pub/sub relay failed; restart the node"
        } else if self.up.load(Ordering::Relaxed) && self.resubscribing.load(Ordering::Relaxed) > 0
        {
            "reconnected; restoring subscriptions"
        } else if self.up.load(Ordering::Relaxed) {
            "ok"
        } else {
            "unreachable"
        }
    }
}

/// `REDIS_URL` as fred reads it. A cluster may be given as fred spells it
/// (`redis-cluster://h1:p1?node=h2:p2&node=h3:p3`) or as a comma list of its nodes
/// (`redis-cluster://h1:p1,h2:p2,h3:p3`); any one reachable node is enough to find the others.
pub fn fred_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    if !scheme.ends_with("-cluster") {
        return url.to_string();
    }
    let (creds, hosts) = match rest.rsplit_once('@') {
        Some((creds, hosts)) => (format!("{creds}@"), hosts),
        None => (String::new(), rest),
    };
    let (hosts, query) = match hosts.split_once('?') {
        Some((hosts, query)) => (hosts, Some(query)),
        None => (hosts, None),
    };
    let mut nodes = hosts
        .trim_end_matches('/')
        .split(',')
        .filter(|h| !h.is_empty());
    let Some(first) = nodes.next() else {
        return url.to_string();
    };
    let mut params: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
    params.extend(query.map(str::to_string));
    if params.is_empty() {
        format!("{scheme}://{creds}{first}")
    } else {
        format!("{scheme}://{creds}{first}?{}", params.join("&"))
    }
}

fn builder(url: &str) -> Result<Builder, fred::error::Error> {
    let mut config = FredConfig::from_url(&fred_url(url))?;
    config.version = RespVersion::RESP3;
    let mut builder = Builder::from_config(config);
    builder
        // Never give up: 100 ms doubling up to 5 s between attempts.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        // A command waits at most a second, also while reconnecting: nothing on the delivery
        // path may hang on a Redis that went away before the health watch noticed.
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(1);
            // fred hands pub/sub messages to its consumers through a broadcast channel of 32 by
            // default; a consumer that falls behind by more loses messages (logged as "lagged"
            // by the adapter). Bursts of cross-node batches need far more room.
            p.broadcast_channel_capacity = BROADCAST_CAPACITY;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(3);
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(Duration::from_secs(5)),
                interval: Duration::from_secs(1),
            };
        });
    Ok(builder)
}

/// The Redis connections of a node besides the adapter's.
pub struct Cluster {
    pub health: RedisHealth,
    /// Commands and publishing (health pings, the plain WebSocket relay).
    pub client: fred::clients::Client,
    /// Subscriptions of the plain WebSocket relay.
    pub subscriber: fred::clients::SubscriberClient,
    /// The emitter's feed: the channels of the organisations and sites this node follows.
    pub feed: fred::clients::SubscriberClient,
    /// All of the above and the adapter's, for closing them at the end of a shutdown.
    pub connections: Connections,
}

/// The node's Redis clients. fred runs a task per client that reconnects for ever (as
/// configured above) until the client is told to quit, so a shutdown ends with [`Self::quit`],
/// once nothing uses them; without it each node would leave its connections behind.
#[derive(Clone)]
pub struct Connections {
    client: fred::clients::Client,
    subscribers: Vec<fred::clients::SubscriberClient>,
}

impl Connections {
    pub async fn quit(&self) {
        use fred::interfaces::ClientLike as _;
        for subscriber in &self.subscribers {
            subscriber.quit().await.ok();
        }
        self.client.quit().await.ok();
    }
}

/// The Socket.io adapter over Redis.
pub type Adapter = RedisAdapterCtr<socketioxide_redis::drivers::fred::FredDriver>;

/// Connects the adapter's subscriber client and the node's other Redis clients.
/// Its tasks (the health watch, one resubscriber per subscriber client) are essential tasks of
/// `tasks`: without them a Redis restart would silently end cross-node delivery.
pub async fn connect(url: &str, tasks: &Tasks) -> anyhow::Result<(Adapter, Cluster)> {
    let health = RedisHealth::default();
    let subscriber = builder(url)?.build_subscriber_client()?;
    resubscribe_on_reconnect(
        "redis resubscribe (adapter)",
        subscriber.clone(),
        health.clone(),
        tasks,
    );
    let adapter_subscriber = subscriber.clone();
    let adapter = RedisAdapterCtr::new_with_fred_config(
        subscriber,
        RedisAdapterConfig::new().with_stream_buffer(STREAM_BUFFER),
    )
    .await?;
    let client = builder(url)?.build()?;
    client.init().await?;
    let subscriber = builder(url)?.build_subscriber_client()?;
    subscriber.init().await?;
    resubscribe_on_reconnect(
        "redis resubscribe (ws relay)",
        subscriber.clone(),
        health.clone(),
        tasks,
    );
    let feed = builder(url)?.build_subscriber_client()?;
    feed.init().await?;
    resubscribe_on_reconnect(
        "redis resubscribe (feed)",
        feed.clone(),
        health.clone(),
        tasks,
    );
    health.up.store(true, Ordering::Relaxed);
    watch_relay_panics(health.clone());
    let _ = tasks.spawn_until_stopped(
        "redis watch",
        Role::Essential,
        watch(client.clone(), health.clone()),
    );
    let connections = Connections {
        client: client.clone(),
        subscribers: vec![adapter_subscriber, subscriber.clone(), feed.clone()],
    };
    let cluster = Cluster {
        health,
        client,
        subscriber,
        feed,
        connections,
    };
    Ok((adapter, cluster))
}

/// After every reconnect, subscribes again to each tracked channel, pattern and shard channel —
/// skipping empty kinds — retrying until it succeeds; the node is unready meanwhile.
fn resubscribe_on_reconnect(
    name: &'static str,
    client: fred::clients::SubscriberClient,
    health: RedisHealth,
    tasks: &Tasks,
) {
    use fred::interfaces::{EventInterface, PubsubInterface};
    let mut reconnects = client.reconnect_rx();
    let _ = tasks.spawn_until_stopped(name, Role::Essential, async move {
        // Subscribing again to what is already subscribed is harmless, so every (re)connect
        // notification is handled alike, the first included.
        while reconnects.recv().await.is_ok() {
            health.resubscribing.fetch_add(1, Ordering::Relaxed);
            let resubscribe = || async {
                let channels: Vec<String> = client
                    .tracked_channels()
                    .into_iter()
                    .map(|c| c.to_string())
                    .collect();
                let patterns: Vec<String> = client
                    .tracked_patterns()
                    .into_iter()
                    .map(|c| c.to_string())
                    .collect();
                let shards: Vec<String> = client
                    .tracked_shard_channels()
                    .into_iter()
                    .map(|c| c.to_string())
                    .collect();
                if !channels.is_empty() {
                    client.subscribe(channels).await?;
                }
                if !patterns.is_empty() {
                    client.psubscribe(patterns).await?;
                }
                // One by one: on a Redis Cluster each may live on another master.
                for shard in shards {
                    client.ssubscribe(shard).await?;
                }
                Ok::<_, fred::error::Error>(())
            };
            // Every 500 ms until it succeeds (the node is unready meanwhile).
            let every_half_second = ConstantBuilder::default()
                .with_delay(Duration::from_millis(500))
                .without_max_times();
            resubscribe
                .retry(every_half_second)
                .notify(|e, _| {
                    tracing::warn!(error = %e, "re-subscribing after a Redis reconnect failed; retrying");
                })
                .await
                .ok(); // never gives up, so never an error
            health.resubscribing.fetch_sub(1, Ordering::Relaxed);
            tracing::info!("redis subscriptions restored");
        }
    });
}

/// Pings Redis every second and logs each change of state once (not once per message).
async fn watch(client: fred::clients::Client, health: RedisHealth) {
    use fred::interfaces::ClientLike as _;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), client.ping::<String>(None)).await,
            Ok(Ok(_))
        );
        let was = health.up.swap(ok, Ordering::Relaxed);
        match (was, ok) {
            (true, false) => {
                crate::observe::redis_outage();
                tracing::error!(
                    "redis unreachable: cross-node delivery paused, local delivery continues"
                );
            }
            (false, true) => tracing::info!("redis reachable again: cross-node delivery resumed"),
            _ => {}
        }
    }
}

/// The adapter's relay task panics when its buffer overflows; it then stops relaying. Mark the
/// node unready so the operator (or orchestrator) restarts it, and log it loudly.
fn watch_relay_panics(health: RedisHealth) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let in_relay = info
            .location()
            .is_some_and(|l| l.file().contains("socketioxide-redis"));
        if in_relay {
            health.relay_failed.store(true, Ordering::Relaxed);
            tracing::error!(panic = %info, "redis pub/sub relay failed; node marked unready");
        }
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::fred_url;

    #[test]
    fn a_cluster_given_as_a_comma_list_is_spelled_for_fred() {
        assert_eq!(
            fred_url("redis-cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"),
            "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001&node=127.0.0.1:7002"
        );
        assert_eq!(
            fred_url("rediss-cluster://u:p@a:1,b:2"),
            "rediss-cluster://u:p@a:1?node=b:2"
        );
        assert_eq!(
            fred_url("redis-cluster://a:1?node=b:2"),
            "redis-cluster://a:1?node=b:2"
        );
        assert_eq!(fred_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        for url in [
            fred_url("redis-cluster://127.0.0.1:7000,127.0.0.1:7001"),
            fred_url("redis://127.0.0.1:6379/0"),
        ] {
            super::FredConfig::from_url(&url).expect("fred reads it");
        }
    }
}
