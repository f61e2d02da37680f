//! The embedded engine: one SQLite file in WAL mode, for a single node.

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

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

use super::readings::{StoredKey, latest_per_unit};
use crate::ingest::NewReading;

const INSERT: &str = "INSERT INTO readings (org_id, unit_id, device_id, temperature, humidity, \
    battery, signal_strength, recorded_at, source, received_at) \
    SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, \
    value->>7, value->>8, $2 FROM json_each($1) WHERE true \
    ON CONFLICT DO NOTHING \
    RETURNING id, org_id, unit_id, recorded_at, device_id, source";

const EXISTING: &str = "SELECT r.id, r.org_id, r.unit_id, r.recorded_at, r.device_id, r.source \
    FROM json_each($1) AS j JOIN readings AS r ON r.org_id = j.value->>0 AND r.unit_id = j.value->>1 \
    AND r.recorded_at = j.value->>2 AND r.device_id = j.value->>3 AND r.source = j.value->>4";

const TOUCH_UNITS: &str = "UPDATE units SET \
    last_reading_at = CASE WHEN last_reading_at IS NULL OR last_reading_at <= v.ts THEN v.ts ELSE last_reading_at END, \
    last_temperature = CASE WHEN last_reading_at IS NULL OR last_reading_at <= v.ts THEN v.t ELSE last_temperature END, \
    last_seen_at = $2 \
    FROM (SELECT value->>0 AS o, value->>1 AS u, value->>2 AS ts, value->>3 AS t FROM json_each($1)) AS v \
    WHERE units.org_id = v.o AND units.id = v.u";

/// One group commit (see `store::readings`). Rows travel as one JSON parameter, so the statement
/// is prepared once whatever the group's size, and SQLite's bound-parameter limit never applies.
pub(super) async fn commit(
    pool: &SqlitePool,
    unique: &[(&str, &NewReading)],
    all: &[(&str, &NewReading)],
    received_at: i64,
) -> Result<(Vec<StoredKey>, Vec<StoredKey>), sqlx::Error> {
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
    let mut tx = pool.begin().await?;
    let inserted: Vec<StoredKey> = sqlx::query_as(INSERT)
        .bind(&json)
        .bind(received_at)
        .fetch_all(&mut *tx)
        .await?;
    let existing = if inserted.len() < all.len() {
        let keys: Vec<_> = all
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
    let latest: Vec<_> = latest_per_unit(unique, &inserted)
        .into_iter()
        .map(|l| (l.org_id, l.unit_id, l.recorded_at, l.temperature))
        .collect();
    if !latest.is_empty() {
        let json = serde_json::to_string(&latest).map_err(|e| sqlx::Error::Encode(e.into()))?;
        sqlx::query(TOUCH_UNITS)
            .bind(json)
            .bind(received_at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((inserted, existing))
}
