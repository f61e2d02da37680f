//! The shared engine: PostgreSQL, for one or many nodes.
//!
//! The same steps as `sqlite.rs` in this engine's SQL and binding style: the two engine files are
//! parallel on purpose (what they share is in `readings.rs`), so each reads on its own.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

pub(super) const BEGIN: &str = "BEGIN";

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

pub(super) async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        // Fail fast when the database is gone, so requests get a 503 within a second instead of
        // hanging (a connection to a live database takes a few milliseconds on a LAN).
        .acquire_timeout(Duration::from_millis(500))
        .connect(url)
        .await
}

use super::NewReading;

/// The group's rows, `ON CONFLICT DO NOTHING` on the idempotency key. Only the ids come back:
/// PostgreSQL inserts the rows of `INSERT … SELECT` in the order the `SELECT` yields them (here
/// the arrays' order) and returns each one's `RETURNING` row as it inserts it, so when every row
/// was stored the ids map back to the rows by position — no key columns to send back, decode
/// and hash for every reading.
const INSERT: &str = "INSERT INTO readings (org_id, unit_id, device_id, temperature, humidity, \
    battery, signal_strength, recorded_at, source, received_at) \
    SELECT o, u, d, t, h, b, s, r, src, $10 FROM UNNEST($1::text[], $2::text[], $3::text[], \
    $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::int8[], $9::text[]) \
    AS x(o, u, d, t, h, b, s, r, src) \
    ON CONFLICT DO NOTHING \
    RETURNING id";

/// When some rows were already stored: every row's id (the new ones included, this transaction
/// sees them), by the row's position (1-based).
const EXISTING: &str = "SELECT k.n, r.id \
    FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) \
    WITH ORDINALITY AS k(o, u, ts, d, s, n) \
    JOIN readings AS r ON r.org_id = k.o AND r.unit_id = k.u AND r.recorded_at = k.ts \
    AND r.device_id = k.d AND r.source = k.s";

/// The readings of one group commit (see `store::readings`), with columns bound as arrays for
/// `UNNEST`, inside the caller's transaction. For each row of `unique` (no key twice): its id
/// and whether this statement stored it (`false`: stored before).
pub(super) async fn insert(
    tx: &mut sqlx::PgConnection,
    unique: &[(&str, &NewReading)],
    received_at: i64,
) -> Result<Vec<(i64, bool)>, sqlx::Error> {
    // Text columns are bound as borrowed `&str` arrays: no copy of every string per reading.
    let col = |f: for<'a> fn(&'a (&'a str, &'a NewReading)) -> &'a str| {
        unique.iter().map(f).collect::<Vec<&str>>()
    };
    let num =
        |f: fn(&NewReading) -> Option<f64>| unique.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
    let recorded_at = unique
        .iter()
        .map(|(_, r)| r.recorded_at)
        .collect::<Vec<_>>();
    let ids: Vec<i64> = sqlx::query_scalar(INSERT)
        .bind(col(|(o, _)| o))
        .bind(col(|(_, r)| &r.unit_id))
        .bind(col(|(_, r)| &r.device_id))
        .bind(
            unique
                .iter()
                .map(|(_, r)| r.temperature)
                .collect::<Vec<_>>(),
        )
        .bind(num(|r| r.humidity))
        .bind(num(|r| r.battery))
        .bind(num(|r| r.signal_strength))
        .bind(&recorded_at)
        .bind(col(|(_, r)| &r.source))
        .bind(received_at)
        .fetch_all(&mut *tx)
        .await?;
    if ids.len() == unique.len() {
        // Every row stored, in order.
        return Ok(ids.into_iter().map(|id| (id, true)).collect());
    }
    // Some were duplicates of stored readings: look every row's id up by key.
    let new: std::collections::HashSet<i64> = ids.into_iter().collect();
    let found: Vec<(i64, i64)> = sqlx::query_as(EXISTING)
        .bind(col(|(o, _)| o))
        .bind(col(|(_, r)| &r.unit_id))
        .bind(&recorded_at)
        .bind(col(|(_, r)| &r.device_id))
        .bind(col(|(_, r)| &r.source))
        .fetch_all(&mut *tx)
        .await?;
    let mut out: Vec<Option<(i64, bool)>> = vec![None; unique.len()];
    for (n, id) in found {
        if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some((id, new.contains(&id)));
        }
    }
    out.into_iter()
        .map(|o| o.ok_or(sqlx::Error::RowNotFound))
        .collect()
}
