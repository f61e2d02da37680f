//! The hot path: storing a group commit's readings in one transaction.
//!
//! One statement inserts every reading of the group (SQLite: `json_each` over one JSON
//! parameter; PostgreSQL: `UNNEST` of arrays), `ON CONFLICT DO NOTHING` on the idempotency key,
//! `RETURNING` the keys it stored. Keys it did not store are duplicates, whose first ids are
//! looked up in the same transaction.
//!
//! Before that, the transaction locks the rows of the units it touches (in one order, so
//! commits of several nodes cannot deadlock); after it, each unit's new readings are evaluated
//! against its stored state and the alerts, the unit's status and latest reading, and the events
//! announcing the changes are written — all in the same commit (see `unit_state`). A dashboard
//! that reads `/api/units` or `/api/alerts` after the acknowledgement sees them.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use super::NewReading;
use super::unit_state::{self, OutboxEvent};
use super::{Engine, Result, Store, StoreError, postgres, sqlite};
use crate::evaluate::verdict::{self, StoredUnit, Verdict};

/// The idempotency key of a reading.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadingKey {
    pub org_id: String,
    pub unit_id: String,
    pub recorded_at: i64,
    pub device_id: String,
    pub source: String,
}

impl ReadingKey {
    pub fn of(org: &str, r: &NewReading) -> Self {
        ReadingKey {
            org_id: org.to_string(),
            unit_id: r.unit_id.clone(),
            recorded_at: r.recorded_at,
            device_id: r.device_id.clone(),
            source: r.source.clone(),
        }
    }
}

/// The idempotency key borrowed from a row: the hot path hashes these instead of cloning four
/// strings per reading into a [`ReadingKey`].
pub(super) type KeyRef<'a> = (&'a str, &'a str, i64, &'a str, &'a str);

pub(super) fn key_ref<'a>(org: &'a str, r: &'a NewReading) -> KeyRef<'a> {
    (
        org,
        r.unit_id.as_str(),
        r.recorded_at,
        r.device_id.as_str(),
        r.source.as_str(),
    )
}

/// A key with the id it is stored under.
#[derive(Debug, sqlx::FromRow)]
pub struct StoredKey {
    pub id: i64,
    pub org_id: String,
    pub unit_id: String,
    pub recorded_at: i64,
    pub device_id: String,
    pub source: String,
}

impl StoredKey {
    pub(super) fn key(&self) -> KeyRef<'_> {
        (
            &self.org_id,
            &self.unit_id,
            self.recorded_at,
            &self.device_id,
            &self.source,
        )
    }
}

/// For each input row: its stored id and whether this row stored it (`false`: duplicate).
pub type Outcomes = Vec<(i64, bool)>;

/// What a group commit stored and decided.
#[derive(Debug)]
pub struct Committed {
    pub outcomes: Outcomes,
    /// The alert and status events of the commit, in the outbox (see `unit_state`).
    pub events: Vec<OutboxEvent>,
    /// The `pending_batches` row of the new readings, until their batches are out.
    pub pending: Option<i64>,
}

/// Runs one group commit in one engine: lock the units, store the readings, decide and write
/// the alert and status changes, commit.
macro_rules! commit_in {
    ($pool:expr, $begin:expr, $engine:ident, $unique:expr, $received_at:expr) => {{
        let mut tx = $pool.begin_with($begin).await?;
        let keys = unit_state::unit_keys($unique.iter().map(|(o, r)| (*o, r.unit_id.as_str())));
        let units = unit_state::$engine::lock_units(&mut tx, &keys).await?;
        let gone = units_gone(&units, $unique);
        if !gone.is_empty() {
            return Err(StoreError::UnitsGone(gone));
        }
        let stored = $engine::insert(&mut tx, $unique, $received_at).await?;
        let verdicts = decide(&units, $unique, &stored, $received_at);
        let events = unit_state::$engine::write_verdicts(&mut tx, &verdicts, $received_at).await?;
        let new: Vec<i64> = stored
            .iter()
            .filter(|(_, new)| *new)
            .map(|(id, _)| *id)
            .collect();
        let pending = if new.is_empty() {
            None
        } else {
            let ranges = unit_state::id_ranges(new);
            Some(unit_state::$engine::insert_pending(&mut tx, &ranges, $received_at).await?)
        };
        tx.commit().await?;
        unit_state::observe(&verdicts);
        (stored, events, pending)
    }};
}

impl Store {
    /// Stores `rows` (organisation, reading) in one transaction, with the alert and status
    /// changes they make. Within the group, the first occurrence of a key is the one stored;
    /// later ones are duplicates of it. A unit deleted since validation fails the commit with
    /// [`StoreError::UnitsGone`], storing nothing.
    pub async fn commit_readings(
        &self,
        rows: &[(&str, &NewReading)],
        received_at: i64,
    ) -> Result<Committed> {
        // Keys are borrowed and hashed once per row, to find the first occurrence of each:
        // `slot[i]` is the row of `unique` that row `i` is (or repeats).
        let mut first: HashMap<KeyRef<'_>, usize> = HashMap::with_capacity(rows.len());
        let mut unique = Vec::with_capacity(rows.len());
        let mut slot = Vec::with_capacity(rows.len());
        for (i, (org, r)) in rows.iter().enumerate() {
            match first.entry(key_ref(org, r)) {
                Entry::Vacant(e) => {
                    e.insert(unique.len());
                    slot.push(unique.len());
                    unique.push(rows[i]);
                }
                Entry::Occupied(e) => slot.push(*e.get()),
            }
        }
        drop(first);
        // Locks are taken in one order, so a deadlock should not happen; a serialization
        // failure or deadlock reported anyway is retried rather than failing the whole group:
        // up to 5 times, 10 ms doubling to 160 ms apart.
        let contended = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(10))
            .with_factor(2.0)
            .with_max_times(5);
        let (stored, events, pending) = (|| self.commit_once(&unique, received_at))
            .retry(contended)
            .when(|e| matches!(e, StoreError::Contended(_)))
            .notify(|e, delay| {
                tracing::debug!(error = %e, ?delay, "group commit contended; retrying");
            })
            .await?;
        if stored.len() != unique.len() {
            return Err(super::StoreError::Other(sqlx::Error::RowNotFound));
        }
        // A repeat within the group answers with the first occurrence's id, as a duplicate.
        let mut seen = vec![false; unique.len()];
        let outcomes = slot
            .into_iter()
            .map(|u| {
                let (id, new) = stored[u];
                let first = !std::mem::replace(&mut seen[u], true);
                (id, new && first)
            })
            .collect();
        Ok(Committed {
            outcomes,
            events,
            pending,
        })
    }
}

impl Store {
    async fn commit_once(
        &self,
        unique: &[(&str, &NewReading)],
        received_at: i64,
    ) -> Result<(Vec<(i64, bool)>, Vec<OutboxEvent>, Option<i64>)> {
        Ok(match &self.engine {
            Engine::Sqlite(pool) => {
                commit_in!(pool, sqlite::BEGIN, sqlite, unique, received_at)
            }
            Engine::Postgres(pool) => {
                commit_in!(pool, postgres::BEGIN, postgres, unique, received_at)
            }
        })
    }
}

/// The units of `rows` that have no row any more (deleted since the request was validated).
fn units_gone(units: &[StoredUnit], rows: &[(&str, &NewReading)]) -> Vec<(String, String)> {
    let present: HashSet<(&str, &str)> = units
        .iter()
        .map(|u| (u.org_id.as_str(), u.unit_id.as_str()))
        .collect();
    let mut gone: Vec<(String, String)> = rows
        .iter()
        .filter(|(o, r)| !present.contains(&(*o, r.unit_id.as_str())))
        .map(|(o, r)| (o.to_string(), r.unit_id.clone()))
        .collect();
    gone.sort_unstable();
    gone.dedup();
    gone
}

/// Each locked unit's verdict on the readings this commit inserted for it (the new ones only:
/// duplicates were evaluated when first stored). `stored`: for each row of `unique`, its id and
/// whether this commit stored it.
fn decide<'u>(
    units: &'u [StoredUnit],
    unique: &[(&str, &NewReading)],
    stored: &[(i64, bool)],
    received_at: i64,
) -> Vec<(&'u StoredUnit, Verdict, Option<i64>)> {
    let mut by_unit: HashMap<(&str, &str), Vec<(i64, f64)>> = HashMap::new();
    for ((org, r), (_, new)) in unique.iter().zip(stored) {
        if !new {
            continue;
        }
        by_unit
            .entry((org, r.unit_id.as_str()))
            .or_default()
            .push((r.recorded_at, r.temperature));
    }
    units
        .iter()
        .filter_map(|u| {
            let readings = by_unit.get(&(u.org_id.as_str(), u.unit_id.as_str()))?;
            Some((u, verdict::on_readings(u, readings), Some(received_at)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewUnit;

    fn reading(unit: &str, at: i64, device: &str, t: f64) -> NewReading {
        NewReading {
            unit_id: unit.into(),
            device_id: device.into(),
            temperature: t,
            humidity: None,
            battery: None,
            signal_strength: None,
            recorded_at: at,
            source: "api".into(),
        }
    }

    /// The engines to test on: SQLite, and PostgreSQL when reachable (required under
    /// `CI=true`), each as a fresh database; the PostgreSQL database's name, to drop after.
    async fn fresh_stores(dir: &std::path::Path) -> Vec<(Store, Option<String>)> {
        let url = format!("sqlite:{}", dir.join("t.db").display());
        let mut stores = vec![(Store::open(&url).await.unwrap(), None)];
        let admin = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
        match sqlx::PgPool::connect(&admin).await {
            Ok(pool) => {
                let name = format!(
                    "sw_readings_{}_{}",
                    std::process::id(),
                    crate::store::now_ms() % 1_000_000
                );
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let url = format!("{}/{name}", &admin[..admin.rfind('/').unwrap()]);
                stores.push((Store::open(&url).await.unwrap(), Some(name)));
            }
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL is required under CI=true but unreachable: {e}")
            }
            Err(e) => eprintln!("SKIPPING the PostgreSQL variant: {e}"),
        }
        stores
    }

    async fn drop_db(store: Store, name: Option<String>) {
        store.close().await;
        if let Some(name) = name {
            let admin = std::env::var("TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into());
            let pool = sqlx::PgPool::connect(&admin).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await
                .ok();
            pool.close().await;
        }
    }

    /// First occurrence stores, later ones (in the same group or a later commit) are duplicates
    /// that answer with the first id; the unit's latest reading is the newest stored one. On
    /// both engines: PostgreSQL maps the ids back by position when every row is new, by key
    /// when some were stored before.
    #[tokio::test]
    async fn duplicates_within_and_across_commits() {
        let dir = tempfile::tempdir().unwrap();
        for (store, name) in fresh_stores(dir.path()).await {
            duplicates_on(&store).await;
            drop_db(store, name).await;
        }
    }

    async fn duplicates_on(store: &Store) {
        store.create_site("o", "s", "S").await.unwrap();
        for id in ["u1", "u2"] {
            let unit = NewUnit {
                id,
                site_id: "s",
                name: id,
                temp_min: None,
                temp_max: None,
                offline_after_seconds: 300,
            };
            store.create_unit("o", unit).await.unwrap();
        }
        let a = reading("u1", 1_000, "d", 1.0);
        let b = reading("u2", 1_000, "d", 2.0);
        let a_again = reading("u1", 1_000, "d", 9.0);
        let c = reading("u1", 2_000, "d", 3.0);
        let first = store
            .commit_readings(&[("o", &a), ("o", &b), ("o", &a_again)], 5)
            .await
            .unwrap()
            .outcomes;
        assert!(first[0].1 && first[1].1 && !first[2].1);
        assert_eq!(
            first[2].0, first[0].0,
            "a duplicate answers with the first id"
        );
        assert_ne!(first[0].0, first[1].0);
        let second = store
            .commit_readings(&[("o", &c), ("o", &b)], 6)
            .await
            .unwrap()
            .outcomes;
        assert!(second[0].1);
        assert_eq!(second[1], (first[1].0, false));
        // New rows after a stored one, and a repeat of a new row: ids map to the right rows.
        let d = reading("u2", 3_000, "d", 4.0);
        let e = reading("u1", 4_000, "d", 5.0);
        let third = store
            .commit_readings(&[("o", &d), ("o", &a), ("o", &e), ("o", &d)], 7)
            .await
            .unwrap()
            .outcomes;
        assert!(third[0].1 && third[2].1 && !third[1].1 && !third[3].1);
        assert_eq!(third[1].0, first[0].0);
        assert_eq!(third[3].0, third[0].0);
        assert_ne!(third[0].0, third[2].0);
        let unit = store.get_unit("o", "u1").await.unwrap().unwrap();
        assert_eq!(unit.last_temperature, Some(5.0));
        let unit = store.get_unit("o", "u2").await.unwrap().unwrap();
        assert_eq!(unit.last_temperature, Some(4.0));
        // Every id answered is the id of that very reading.
        // a and b were all new in their commit: PostgreSQL mapped them back by position.
        for (r, (id, _)) in [
            (&a, first[0]),
            (&b, first[1]),
            (&d, third[0]),
            (&e, third[2]),
            (&c, second[0]),
        ] {
            let latest = store
                .readings(
                    "o",
                    &r.unit_id,
                    &crate::store::ReadingsQuery {
                        since: Some(r.recorded_at),
                        until: Some(r.recorded_at),
                        limit: 10,
                    },
                )
                .await
                .unwrap();
            assert_eq!(latest.len(), 1);
            assert_eq!(latest[0].id, id);
            assert_eq!(latest[0].reading.temperature, r.temperature);
        }
    }
}
