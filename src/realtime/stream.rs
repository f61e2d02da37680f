//! The organisation event log of a cluster, in Redis streams.
//!
//! Each event is appended by one Lua script (atomic, so both streams agree on order) to
//! - `sensorwire:events`: every organisation's events, which every node tails and delivers to
//!   its own sockets — this, not the Socket.io adapter, carries organisation events, so every
//!   node sees them in one order and can put a replay and live delivery back to back;
//! - `sensorwire:events:{org}`: the organisation's retention for replays, trimmed by length and
//!   age, expiring when the organisation goes quiet.
//!
//! The entry id Redis gives the first `XADD` is the event's offset on every node; the second
//! `XADD` reuses it. Payloads are stored without their offset, which is added when read.
//! Both keys are touched by one script, so this needs one Redis (or one cluster slot), which is
//! what the Socket.io Redis adapter assumes too.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::StreamsInterface;
use fred::types::scripts::Script;
use serde_json::value::RawValue;
use socketioxide_redis::drivers::fred::fred_client as fred;

use super::history::{Entry, Replay, Since, replay_from};
use super::offset::{Offset, stamp};

const GLOBAL: &str = "sensorwire:events";

/// Entries kept in the global stream: only a node that falls this far behind its tail loses
/// events (logged); replays read the per-organisation streams.
const GLOBAL_MAX_LEN: u64 = 100_000;

/// Entries an organisation's stream keeps at most when no cap is configured: retention is by
/// time, this only guards Redis against a runaway organisation.
const ORG_MAX_LEN: u64 = 1_000_000;

/// How many entries one tail read returns at most.
const TAIL_COUNT: u64 = 1_000;

/// How long one tail read waits for new entries (then it simply reads again).
const TAIL_BLOCK_MS: u64 = 1_000;

/// Appends `ARGV[1]` events: `KEYS[1]` is the cluster stream, `KEYS[i + 1]` the organisation
/// stream of event `i`, whose organisation, name, rooms, payload, outbox id (or `""`) and origin
/// node (or `""`) are `ARGV[6 + 6(i-1) ..]`. An event of the storage outbox is appended once: a second copy (another
/// node announcing a row whose lease ran out while its first node was merely slow) gets `""`.
const APPEND: &str = r#"
local n = tonumber(ARGV[1])
local ids = {}
for i = 1, n do
  local b = 5 + (i - 1) * 6
  local stored = ARGV[b + 5]
  if stored ~= '' and not redis.call('SET', 'sensorwire:announced:' .. stored, '1', 'NX', 'PX', 3600000) then
    ids[i] = ''
  else
    local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
      'o', ARGV[b + 1], 'e', ARGV[b + 2], 'r', ARGV[b + 3], 'p', ARGV[b + 4], 'n', ARGV[b + 6])
    redis.call('XADD', KEYS[i + 1], 'MAXLEN', '~', ARGV[3], id,
      'e', ARGV[b + 2], 'r', ARGV[b + 3], 'p', ARGV[b + 4])
    redis.call('XTRIM', KEYS[i + 1], 'MINID', '~', ARGV[4])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[5])
    ids[i] = id
  end
end
return ids
"#;

fn org_key(org: &str) -> String {
    format!("{GLOBAL}:{org}")
}

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
    /// The node whose sockets already have it (an outage backlog), whose tail skips it.
    pub origin: Option<&'a str>,
}

/// Appends and replays; cheap to clone.
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

    /// Logs events, in order, in one round trip; every node's tail then delivers them. `None`
    /// for an outbox event that was logged already.
    pub async fn append(
        &self,
        events: &[Logged<'_>],
    ) -> Result<Vec<Option<Offset>>, fred::error::Error> {
        let oldest = super::offset::now_ms().saturating_sub(self.window_ms);
        let mut keys = Vec::with_capacity(events.len() + 1);
        keys.push(GLOBAL.to_string());
        let mut args: Vec<fred::types::Value> = vec![
            (events.len() as i64).into(),
            (GLOBAL_MAX_LEN as i64).into(),
            (self.max_events as i64).into(),
            oldest.to_string().into(),
            // The organisation's stream outlives its newest entry by one window.
            ((self.window_ms + 1_000) as i64).into(),
        ];
        for e in events {
            keys.push(org_key(e.org));
            args.push(e.org.into());
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
                "" => Ok(None),
                id => id.parse().map(Some).map_err(|_| {
                    fred::error::Error::new(fred::error::ErrorKind::Parse, "bad stream id")
                }),
            })
            .collect()
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
            .xrange(org_key(org), at.to_string(), upto.to_string(), None)
            .await?;
        let log: Vec<Arc<Entry>> = raw
            .into_iter()
            .filter_map(|(id, fields)| decode(&id, fields).map(|(_, e)| Arc::new(e)))
            .collect();
        Ok(replay_from(log.iter(), since, membership))
    }
}

/// Turns a stream entry into an [`Entry`] (and its organisation, when the entry names it).
fn decode(id: &str, mut fields: HashMap<String, String>) -> Option<(Option<String>, Entry)> {
    let offset: Offset = id.parse().ok()?;
    let event = fields.remove("e")?;
    let rooms: Vec<String> = serde_json::from_str(fields.get("r")?).ok()?;
    let payload = RawValue::from_string(fields.remove("p")?).ok()?;
    Some((
        fields.remove("o"),
        Entry {
            offset,
            event: Cow::Owned(event),
            rooms,
            payload: stamp(&payload, offset),
        },
    ))
}

/// The entries of an `XREAD` answer; a block that timed out answers nil: nothing new.
fn entries_of(value: fred::types::Value) -> Result<Vec<StreamEntry>, fred::error::Error> {
    if value.is_null() {
        return Ok(Vec::new());
    }
    let mut streams: HashMap<String, Vec<StreamEntry>> = value.into_xread_response()?;
    Ok(streams.remove(GLOBAL).unwrap_or_default())
}

/// What the tail hands the node's delivery loop, in stream order.
pub enum Tailed {
    /// Where the stream ended when the tail started: this node delivers what comes after.
    Start(Offset),
    /// An event and its organisation; `from_here`: appended by this node from its outage
    /// backlog, so its sockets have it already.
    Entry {
        org: String,
        entry: Arc<Entry>,
        from_here: bool,
    },
    /// Redis lost the stream (it restarted without its data) while this node was reading it.
    Lost,
}

/// A key each node sets once if absent: a different value after Redis comes back means its
/// data is gone.
const EPOCH: &str = "sensorwire:epoch";

/// This Redis' epoch, set now if it has none.
async fn epoch(client: &fred::clients::Client) -> Result<String, fred::error::Error> {
    use fred::interfaces::KeysInterface;
    let mut fresh = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut fresh);
    let _: Option<String> = client
        .set(
            EPOCH,
            hex::encode(fresh),
            None,
            Some(fred::types::SetOptions::NX),
            false,
        )
        .await?;
    let current: Option<String> = client.get(EPOCH).await?;
    Ok(current.unwrap_or_default())
}

/// Reads the global stream from where it ends now, forever. A dedicated connection: `XREAD
/// BLOCK` holds it while it waits.
pub async fn tail(
    client: fred::clients::Client,
    deliver: tokio::sync::mpsc::Sender<Tailed>,
    node: Arc<str>,
) {
    let mut known_epoch = loop {
        match epoch(&client).await {
            Ok(e) => break e,
            Err(e) => {
                tracing::warn!(error = %e, "reading the cluster event stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let mut from = loop {
        match client
            .xrevrange::<Vec<StreamEntry>, _, _, _>(GLOBAL, "+", "-", Some(1))
            .await
        {
            Ok(last) => {
                break last
                    .into_iter()
                    .next()
                    .and_then(|(id, _)| id.parse().ok())
                    .unwrap_or(Offset { ms: 0, seq: 0 });
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the cluster event stream failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    if deliver.send(Tailed::Start(from)).await.is_err() {
        return;
    }
    let mut failing = false;
    loop {
        let read = tokio::time::timeout(
            Duration::from_millis(TAIL_BLOCK_MS + 2_000),
            client.xread::<fred::types::Value, _, _>(
                Some(TAIL_COUNT),
                Some(TAIL_BLOCK_MS),
                GLOBAL,
                from.to_string(),
            ),
        )
        .await
        .map(|r| r.and_then(entries_of));
        let entries = match read {
            Ok(Ok(entries)) => entries,
            failed => {
                if !failing {
                    failing = true;
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(%error, "reading the cluster event stream failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if failing {
            failing = false;
            tracing::info!("reading the cluster event stream again");
            match epoch(&client).await {
                Ok(now) if now != known_epoch => {
                    known_epoch = now;
                    if deliver.send(Tailed::Lost).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => {
                    failing = true;
                    continue;
                }
            }
        }
        for (id, mut fields) in entries {
            let from_here = fields.remove("n").is_some_and(|n| *n == *node);
            match decode(&id, fields) {
                Some((Some(org), entry)) => {
                    from = entry.offset;
                    let entry = Arc::new(entry);
                    if deliver
                        .send(Tailed::Entry {
                            org,
                            entry,
                            from_here,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                _ => {
                    if let Ok(offset) = id.parse() {
                        from = offset;
                    }
                    tracing::warn!(id = %id, "malformed cluster event skipped");
                }
            }
        }
    }
}
