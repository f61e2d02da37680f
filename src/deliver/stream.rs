//! The organisation event log of a cluster: a Redis stream per organisation, and beside it a
//! sharded pub/sub channel that carries each appended event to the nodes following it.
//!
//! Every key and channel of an organisation carries its id as a hash tag
//! (`sensorwire:{org}:…`), so a Redis Cluster keeps them in one slot (one script may touch them
//! all) and spreads organisations over its masters. No key or channel is touched by every event.
//! - `sensorwire:{org}:events`, a stream: the organisation's events in order, trimmed by age and
//!   length, expiring when the organisation goes quiet. An entry's id is the event's offset on
//!   every node.
//! - `sensorwire:{org}:events`, a sharded channel of the same name: every appended event with the
//!   id of the entry before it, so a follower (`feed.rs`) sees a gap in the chain and reads the
//!   stream to fill it. The stream is the truth; the channel saves each follower a read.
//! - `sensorwire:{org}:epoch`: set once; a different value later means Redis lost the stream.
//! - `sensorwire:{org}:announced:<row>`: an outbox row already appended (see [`APPEND`]).
//! - `sensorwire:{org}:live:<site>`, a sharded channel: the live `sensor:reading` stream of one
//!   site, not logged, for nodes with subscribers of that site or its units.
//!
//! Payloads are stored without their offset, which is added when read.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use fred::interfaces::{KeysInterface, PubsubInterface, StreamsInterface};
use fred::types::scripts::Script;
use serde_json::value::RawValue;
use socketioxide_redis::drivers::fred::fred_client as fred;

use super::history::{Entry, Replay, Since, replay_from};
use super::offset::{Offset, stamp};

/// Entries an organisation's stream keeps at most when no cap is configured: retention is by
/// time, this only guards Redis against a runaway organisation.
const ORG_MAX_LEN: u64 = 1_000_000;

/// How many entries one read of a stream returns at most.
pub const READ_COUNT: u64 = 1_000;

/// The stream of `org`, and the channel its appends are announced on.
pub fn events_key(org: &str) -> String {
    format!("sensorwire:{{{org}}}:events")
}

fn epoch_key(org: &str) -> String {
    format!("sensorwire:{{{org}}}:epoch")
}

/// The channel of the live `sensor:reading` stream of one site of `org`.
pub fn live_channel(org: &str, site: &str) -> String {
    format!("sensorwire:{{{org}}}:live:{site}")
}

/// Appends `ARGV[1]` events of one organisation: `KEYS[1]` is its stream (and channel),
/// `KEYS[2]` its epoch. `ARGV[2..6]`: length cap, oldest id kept, time to live, a fresh epoch
/// (kept only if none is set), the prefix of its `announced` keys. Then per event: name, rooms,
/// payload, outbox row (or `""`), origin node (or `""`).
///
/// An outbox row is appended once: a second copy (another node announcing a row whose lease ran
/// out while its first node was merely slow) gets `""` and is not announced. Each appended
/// event is published as `id \n previous id \n origin \n rooms \n payload \n name` (JSON has no
/// raw newline, and the name comes last, whole).
const APPEND: &str = r#"
local n = tonumber(ARGV[1])
redis.call('SET', KEYS[2], ARGV[5], 'NX')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if #last > 0 then prev = last[1][1] end
local ids = {}
local added = false
for i = 1, n do
  local b = 6 + (i - 1) * 5
  local stored = ARGV[b + 4]
  if stored ~= '' and not redis.call('SET', ARGV[6] .. stored, '1', 'NX', 'PX', 3600000) then
    ids[i] = ''
  else
    local id
    if ARGV[b + 5] == '' then
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
        'e', ARGV[b + 1], 'r', ARGV[b + 2], 'p', ARGV[b + 3])
    else
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
        'e', ARGV[b + 1], 'r', ARGV[b + 2], 'p', ARGV[b + 3], 'n', ARGV[b + 5])
    end
    redis.call('SPUBLISH', KEYS[1], id .. '\n' .. prev .. '\n' .. ARGV[b + 5] .. '\n' ..
      ARGV[b + 2] .. '\n' .. ARGV[b + 3] .. '\n' .. ARGV[b + 1])
    prev = id
    ids[i] = id
    added = true
  end
end
if added then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return ids
"#;

/// A stream entry as Redis gives it: its id and its fields.
type StreamEntry = (String, HashMap<String, String>);

/// One event to log.
pub struct Logged<'a> {
    pub org: &'a str,
    pub event: &'a str,
    pub rooms: &'a [String],
    pub payload: &'a RawValue,
    /// Its `event_outbox` row, if it comes from one.
    pub stored: Option<i64>,
    /// The node whose sockets already have it (an outage backlog): its feed skips it.
    pub origin: Option<&'a str>,
}

/// What became of one event given to [`RedisLog::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Logged(Offset),
    /// An outbox row that was logged before.
    Duplicate,
    /// Its organisation's append failed (its Redis master is away): not logged.
    Failed,
}

/// An event read from a stream or its channel, with the node it came from (when marked).
pub struct Read {
    pub entry: Entry,
    pub origin: Option<String>,
}

/// Appends, reads and replays; cheap to clone.
#[derive(Clone)]
pub struct RedisLog {
    client: fred::clients::Client,
    script: Arc<Script>,
    window_ms: u64,
    max_events: u64,
}

impl RedisLog {
    /// `max_events`: a cap per organisation stream, if configured (retention is by time).
    pub fn new(client: fred::clients::Client, window_ms: u64, max_events: Option<usize>) -> Self {
        RedisLog {
            client,
            script: Arc::new(Script::from_lua(APPEND)),
            window_ms,
            max_events: max_events.map_or(ORG_MAX_LEN, |m| m.max(1) as u64),
        }
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Logs events, each organisation's in order, one script per organisation, all at once;
    /// the followers then deliver them. An error is the first failure, if any.
    pub async fn append(
        &self,
        events: &[Logged<'_>],
    ) -> (Vec<Appended>, Option<fred::error::Error>) {
        let mut by_org: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            match by_org.iter_mut().find(|(org, _)| *org == e.org) {
                Some((_, at)) => at.push(i),
                None => by_org.push((e.org, vec![i])),
            }
        }
        let results = futures_util::future::join_all(
            by_org
                .iter()
                .map(|(org, at)| self.append_org(org, at.iter().map(|&i| &events[i]))),
        )
        .await;
        let mut out = vec![Appended::Failed; events.len()];
        let mut error = None;
        for ((_, at), result) in by_org.iter().zip(results) {
            match result {
                Ok(ids) => {
                    for (&i, id) in at.iter().zip(ids) {
                        out[i] = id;
                    }
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (out, error)
    }

    async fn append_org<'a>(
        &self,
        org: &str,
        events: impl ExactSizeIterator<Item = &'a Logged<'a>>,
    ) -> Result<Vec<Appended>, fred::error::Error> {
        let oldest = super::offset::now_ms().saturating_sub(self.window_ms);
        let mut fresh = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut fresh);
        let keys = vec![events_key(org), epoch_key(org)];
        let mut args: Vec<fred::types::Value> = Vec::with_capacity(6 + events.len() * 5);
        args.push((events.len() as i64).into());
        args.push((self.max_events as i64).into());
        args.push(oldest.to_string().into());
        // The stream outlives its newest entry by one window.
        args.push(((self.window_ms + 1_000) as i64).into());
        args.push(hex::encode(fresh).into());
        args.push(format!("sensorwire:{{{org}}}:announced:").into());
        for e in events {
            args.push(e.event.into());
            args.push(serde_json::to_string(e.rooms).unwrap_or_default().into());
            args.push(e.payload.get().into());
            args.push(e.stored.map(|id| id.to_string()).unwrap_or_default().into());
            args.push(e.origin.unwrap_or_default().into());
        }
        let ids: Vec<String> = self
            .script
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        ids.iter()
            .map(|id| match id.as_str() {
                "" => Ok(Appended::Duplicate),
                id => id.parse().map(Appended::Logged).map_err(|_| {
                    fred::error::Error::new(fred::error::ErrorKind::Parse, "bad stream id")
                }),
            })
            .collect()
    }

    /// Where `org`'s stream ends now (`0-0` when it has none) and its epoch (none before its
    /// first append).
    pub async fn head(&self, org: &str) -> Result<(Offset, Option<String>), fred::error::Error> {
        let (last, epoch) = tokio::try_join!(
            self.client
                .xrevrange::<Vec<StreamEntry>, _, _, _>(events_key(org), "+", "-", Some(1)),
            self.client.get::<Option<String>, _>(epoch_key(org)),
        )?;
        let at = last
            .into_iter()
            .next()
            .and_then(|(id, _)| id.parse().ok())
            .unwrap_or(Offset { ms: 0, seq: 0 });
        Ok((at, epoch))
    }

    /// Up to [`READ_COUNT`] events of `org` after `after`, in order.
    pub async fn after(&self, org: &str, after: Offset) -> Result<Vec<Read>, fred::error::Error> {
        let raw: Vec<StreamEntry> = self
            .client
            .xrange(events_key(org), format!("({after}"), "+", Some(READ_COUNT))
            .await?;
        Ok(raw
            .into_iter()
            .filter_map(|(id, fields)| decode(&id, fields))
            .collect())
    }

    /// The events of `org` since `since` up to and including `upto` (where this node's
    /// delivery stands), that `membership` may see.
    pub async fn replay(
        &self,
        org: &str,
        since: Since,
        upto: Offset,
        membership: &[String],
    ) -> Result<Replay, fred::error::Error> {
        let at = since.offset();
        if at > upto || at.ms < super::offset::now_ms().saturating_sub(self.window_ms) {
            return Ok(Replay::Lost);
        }
        let raw: Vec<StreamEntry> = self
            .client
            .xrange(events_key(org), at.to_string(), upto.to_string(), None)
            .await?;
        let log: Vec<Arc<Entry>> = raw
            .into_iter()
            .filter_map(|(id, fields)| decode(&id, fields).map(|r| Arc::new(r.entry)))
            .collect();
        Ok(replay_from(log.iter(), since, membership))
    }

    /// Publishes live readings of one site to the nodes that follow it.
    pub async fn publish_live(
        &self,
        org: &str,
        site: &str,
        message: String,
    ) -> Result<(), fred::error::Error> {
        self.client
            .spublish::<(), _, _>(live_channel(org, site), message)
            .await
    }

    /// On a Redis Cluster, reads which master holds which slots now (after a failover the
    /// cached map may still name the failed master).
    pub async fn refresh_topology(&self) {
        use fred::interfaces::ClusterInterface;
        if self.client.cached_cluster_state().is_some()
            && let Err(e) = self.client.sync_cluster().await
        {
            tracing::debug!(error = %e, "reading the cluster's slots failed");
        }
    }

    /// The Redis server that holds `org`'s keys, on a Redis Cluster (`None` otherwise).
    pub fn server_of(&self, org: &str) -> Option<String> {
        use fred::interfaces::ClusterInterface;
        let state = self.client.cached_cluster_state()?;
        let slot = fred::util::redis_keyslot(events_key(org).as_bytes());
        state.get_server(slot).map(|s| s.to_string())
    }
}

/// Turns a stream entry into a [`Read`].
fn decode(id: &str, mut fields: HashMap<String, String>) -> Option<Read> {
    let offset: Offset = id.parse().ok()?;
    let event = fields.remove("e")?;
    let rooms: Vec<String> = serde_json::from_str(fields.get("r")?).ok()?;
    let payload = RawValue::from_string(fields.remove("p")?).ok()?;
    Some(Read {
        entry: Entry {
            offset,
            event: Cow::Owned(event),
            rooms,
            payload: stamp(&payload, offset),
        },
        origin: fields.remove("n"),
    })
}

/// An appended event as its channel announces it (see [`APPEND`]).
pub struct Announced {
    pub prev: Offset,
    pub read: Read,
}

/// Parses an announcement; `None` when it is not one (the follower then reads the stream).
pub fn parse_announced(text: &str) -> Option<Announced> {
    let mut parts = text.splitn(6, '\n');
    let offset: Offset = parts.next()?.parse().ok()?;
    let prev: Offset = parts.next()?.parse().ok()?;
    let origin = parts.next()?;
    let rooms: Vec<String> = serde_json::from_str(parts.next()?).ok()?;
    let payload: &RawValue = serde_json::from_str(parts.next()?).ok()?;
    let event = parts.next()?;
    Some(Announced {
        prev,
        read: Read {
            entry: Entry {
                offset,
                event: Cow::Owned(event.to_string()),
                rooms,
                payload: stamp(payload, offset),
            },
            origin: (!origin.is_empty()).then(|| origin.to_string()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_organisation_share_a_hash_slot() {
        let slot = |k: &str| fred::util::redis_keyslot(k.as_bytes());
        let org = "org-1";
        assert_eq!(slot(&events_key(org)), slot(&epoch_key(org)));
        assert_eq!(slot(&events_key(org)), slot(&live_channel(org, "site:a")));
        assert_eq!(
            slot(&events_key(org)),
            slot(&format!("sensorwire:{{{org}}}:announced:42"))
        );
    }

    #[test]
    fn an_announcement_parses_back_whole() {
        let text = "1700000000000-3\n1700000000000-2\nnode-a\n[\"org|o\"]\n{\"a\":\"x\\ny\"}\nservice:status\nmore";
        let a = parse_announced(text).expect("parses");
        assert_eq!(a.prev.to_string(), "1700000000000-2");
        assert_eq!(a.read.entry.offset.to_string(), "1700000000000-3");
        assert_eq!(a.read.origin.as_deref(), Some("node-a"));
        assert_eq!(a.read.entry.rooms, vec!["org|o".to_string()]);
        // The name comes last and whole, whatever it holds.
        assert_eq!(a.read.entry.event, "service:status\nmore");
        let stamped: serde_json::Value = serde_json::from_str(a.read.entry.payload.get()).unwrap();
        assert_eq!(stamped["a"], "x\ny");
        assert_eq!(stamped["offset"], "1700000000000-3");
        assert!(parse_announced("garbage").is_none());
        let first = parse_announced("5-0\n0-0\n\n[]\n{}\ne").expect("parses");
        assert_eq!(first.read.origin, None);
    }
}
