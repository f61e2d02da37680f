//! The shared engine: PostgreSQL, for one or many nodes.

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

use super::readings::StoredKey;
use crate::ingest::NewReading;

const INSERT: &str = "INSERT INTO readings (org_id, unit_id, device_id, temperature, humidity, \
    battery, signal_strength, recorded_at, source, received_at) \
    SELECT o, u, d, t, h, b, s, r, src, $10 FROM UNNEST($1::text[], $2::text[], $3::text[], \
    $4::float8[], $5::float8[], $6::float8[], $7::float8[], $8::int8[], $9::text[]) \
    AS x(o, u, d, t, h, b, s, r, src) \
    ON CONFLICT DO NOTHING \
    RETURNING id, org_id, unit_id, recorded_at, device_id, source";

const EXISTING: &str = "SELECT r.id, r.org_id, r.unit_id, r.recorded_at, r.device_id, r.source \
    FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[]) AS k(o, u, ts, d, s) \
    JOIN readings AS r ON r.org_id = k.o AND r.unit_id = k.u AND r.recorded_at = k.ts \
    AND r.device_id = k.d AND r.source = k.s";

/// The readings of one group commit (see `store::readings`), with columns bound as arrays for
/// `UNNEST`, inside the caller's transaction.
pub(super) async fn insert(
    tx: &mut sqlx::PgConnection,
    unique: &[(&str, &NewReading)],
    all: &[(&str, &NewReading)],
    received_at: i64,
) -> Result<(Vec<StoredKey>, Vec<StoredKey>), sqlx::Error> {
    // Text columns are bound as borrowed `&str` arrays: no copy of every string per reading.
    let col = |f: for<'a> fn(&'a (&'a str, &'a NewReading)) -> &'a str| {
        unique.iter().map(f).collect::<Vec<&str>>()
    };
    let num =
        |f: fn(&NewReading) -> Option<f64>| unique.iter().map(|(_, r)| f(r)).collect::<Vec<_>>();
    let inserted: Vec<StoredKey> = sqlx::query_as(INSERT)
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
        .bind(
            unique
                .iter()
                .map(|(_, r)| r.recorded_at)
                .collect::<Vec<_>>(),
        )
        .bind(col(|(_, r)| &r.source))
        .bind(received_at)
        .fetch_all(&mut *tx)
        .await?;
    let existing = if inserted.len() < all.len() {
        let text = |f: for<'a> fn(&'a (&'a str, &'a NewReading)) -> &'a str| {
            all.iter().map(f).collect::<Vec<&str>>()
        };
        sqlx::query_as(EXISTING)
            .bind(text(|(o, _)| o))
            .bind(text(|(_, r)| &r.unit_id))
            .bind(all.iter().map(|(_, r)| r.recorded_at).collect::<Vec<_>>())
            .bind(text(|(_, r)| &r.device_id))
            .bind(text(|(_, r)| &r.source))
            .fetch_all(&mut *tx)
            .await?
    } else {
        Vec::new()
    };
    Ok((inserted, existing))
}
