//! The embedded engine: one SQLite file in WAL mode, for a single node.
//!
//! The same steps as `postgres.rs` in this engine's SQL and binding style: the two engine files are
//! parallel on purpose (what they share is in `readings.rs`), so each reads on its own.

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Takes the write lock up front: the commit reads units, then writes them.
pub(super) const BEGIN: &str = "BEGIN IMMEDIATE";

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

pub(super) async fn connect(url: &str) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(url)?
        .create_if_missing(true)
        // WAL lets readers run beside the single writer; FULL makes a commit durable before the
        // ingest request that waits on it is answered.
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(5))
        .foreign_keys(true);
    let path = options.get_filename();
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
    }
    SqlitePoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

use std::collections::HashMap;

use super::NewReading;
use super::readings::{KeyRef, StoredKey, key_ref};

const INSERT: &str = "INSERT INTO readings (org_id, unit_id, device_id, temperature, humidity, \
    battery, signal_strength, recorded_at, source, received_at) \
    SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, \
    value->>7, value->>8, $2 FROM json_each($1) WHERE true \
    ON CONFLICT DO NOTHING \
    RETURNING id, org_id, unit_id, recorded_at, device_id, source";

const EXISTING: &str = "SELECT r.id, r.org_id, r.unit_id, r.recorded_at, r.device_id, r.source \
    FROM json_each($1) AS j JOIN readings AS r ON r.org_id = j.value->>0 AND r.unit_id = j.value->>1 \
    AND r.recorded_at = j.value->>2 AND r.device_id = j.value->>3 AND r.source = j.value->>4";

/// The readings of one group commit (see `store::readings`), inside the caller's transaction.
/// Rows travel as one JSON parameter, so the statement is prepared once whatever the group's
/// size, and SQLite's bound-parameter limit never applies.
/// For each row of `unique` (no key twice): its id and whether this statement stored it.
/// SQLite returns `RETURNING` rows in no promised order, so they map back by key.
pub(super) async fn insert(
    tx: &mut sqlx::SqliteConnection,
    unique: &[(&str, &NewReading)],
    received_at: i64,
) -> Result<Vec<(i64, bool)>, sqlx::Error> {
    let rows: Vec<_> = unique
        .iter()
        .map(|(org, r)| {
            (
                org,
                &r.unit_id,
                &r.device_id,
                r.temperature,
                r.humidity,
                r.battery,
                r.signal_strength,
                r.recorded_at,
                &r.source,
            )
        })
        .collect();
    let json = serde_json::to_string(&rows).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let inserted: Vec<StoredKey> = sqlx::query_as(INSERT)
        .bind(&json)
        .bind(received_at)
        .fetch_all(&mut *tx)
        .await?;
    let existing: Vec<StoredKey> = if inserted.len() < unique.len() {
        let keys: Vec<_> = unique
            .iter()
            .map(|(org, r)| (org, &r.unit_id, r.recorded_at, &r.device_id, &r.source))
            .collect();
        let json = serde_json::to_string(&keys).map_err(|e| sqlx::Error::Encode(e.into()))?;
        sqlx::query_as(EXISTING)
            .bind(json)
            .fetch_all(&mut *tx)
            .await?
    } else {
        Vec::new()
    };
    let new: HashMap<KeyRef<'_>, i64> = inserted.iter().map(|k| (k.key(), k.id)).collect();
    let old: HashMap<KeyRef<'_>, i64> = existing.iter().map(|k| (k.key(), k.id)).collect();
    unique
        .iter()
        .map(|(org, r)| {
            let k = key_ref(org, r);
            match (new.get(&k), old.get(&k)) {
                (Some(&id), _) => Ok((id, true)),
                (None, Some(&id)) => Ok((id, false)),
                (None, None) => Err(sqlx::Error::RowNotFound),
            }
        })
        .collect()
}
