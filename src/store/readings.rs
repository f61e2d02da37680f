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

use super::unit_state::{self, OutboxEvent};
use super::{Engine, Result, Store, StoreError, postgres, sqlite};
use crate::ingest::NewReading;
use crate::verdict::{self, StoredUnit, Verdict};

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
    fn key(&self) -> KeyRef<'_> {
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
    ($pool:expr, $begin:expr, $engine:ident, $unique:expr, $all:expr, $received_at:expr) => {{
        let mut tx = $pool.begin_with($begin).await?;
        let keys = unit_state::unit_keys($unique.iter().map(|(o, r)| (*o, r.unit_id.as_str())));
        let units = unit_state::$engine::lock_units(&mut tx, &keys).await?;
        let gone = units_gone(&units, $unique);
        if !gone.is_empty() {
            return Err(StoreError::UnitsGone(gone));
        }
        let (inserted, existing) = $engine::insert(&mut tx, $unique, $all, $received_at).await?;
        let verdicts = decide(&units, $unique, &inserted, $received_at);
        let events = unit_state::$engine::write_verdicts(&mut tx, &verdicts, $received_at).await?;
        let pending = if inserted.is_empty() {
            None
        } else {
            let ranges = unit_state::id_ranges(inserted.iter().map(|k| k.id).collect());
            Some(unit_state::$engine::insert_pending(&mut tx, &ranges, $received_at).await?)
        };
        tx.commit().await?;
        unit_state::observe(&verdicts);
        (inserted, existing, events, pending)
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
        // Keys are borrowed, and hashed three times per row (first occurrence, the stored ids,
        // the lookup) rather than cloned and hashed eight times: this runs for every reading.
        let mut first: HashMap<KeyRef<'_>, usize> = HashMap::with_capacity(rows.len());
        let mut unique = Vec::with_capacity(rows.len());
        for (i, (org, r)) in rows.iter().enumerate() {
            if let Entry::Vacant(e) = first.entry(key_ref(org, r)) {
                e.insert(i);
                unique.push(rows[i]);
            }
        }
        let has_duplicates = unique.len() < rows.len();
        // Locks are taken in one order, so a deadlock should not happen; a serialization
        // failure or deadlock reported anyway is retried rather than failing the whole group.
        let mut attempt = 0;
        let (inserted, existing, events, pending) = loop {
            match self.commit_once(&unique, rows, received_at).await {
                Err(StoreError::Contended(e)) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "group commit contended; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(5 << attempt)).await;
                }
                other => break other?,
            }
        };
        // key -> (id, stored by this commit)
        let mut ids: HashMap<KeyRef<'_>, (i64, bool)> =
            HashMap::with_capacity(inserted.len() + existing.len());
        for k in &inserted {
            ids.insert(k.key(), (k.id, true));
        }
        for k in &existing {
            ids.entry(k.key()).or_insert((k.id, false));
        }
        let outcomes = rows
            .iter()
            .enumerate()
            .map(|(i, (org, r))| {
                let k = key_ref(org, r);
                match ids.get(&k) {
                    Some(&(id, new)) => Ok((id, new && (!has_duplicates || first[&k] == i))),
                    None => Err(super::StoreError::Other(sqlx::Error::RowNotFound)),
                }
            })
            .collect::<Result<_>>()?;
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
        rows: &[(&str, &NewReading)],
        received_at: i64,
    ) -> Result<(
        Vec<StoredKey>,
        Vec<StoredKey>,
        Vec<OutboxEvent>,
        Option<i64>,
    )> {
        Ok(match &self.engine {
            Engine::Sqlite(pool) => {
                commit_in!(pool, sqlite::BEGIN, sqlite, unique, rows, received_at)
            }
            Engine::Postgres(pool) => {
                commit_in!(pool, postgres::BEGIN, postgres, unique, rows, received_at)
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
/// duplicates were evaluated when first stored).
fn decide<'u>(
    units: &'u [StoredUnit],
    unique: &[(&str, &NewReading)],
    inserted: &[StoredKey],
    received_at: i64,
) -> Vec<(&'u StoredUnit, Verdict, Option<i64>)> {
    // The common case: every row was new, so there is nothing to filter.
    let stored: Option<HashSet<KeyRef<'_>>> =
        (inserted.len() < unique.len()).then(|| inserted.iter().map(StoredKey::key).collect());
    let mut by_unit: HashMap<(&str, &str), Vec<(i64, f64)>> = HashMap::new();
    for (org, r) in unique {
        if let Some(stored) = &stored
            && !stored.contains(&key_ref(org, r))
        {
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

    /// First occurrence stores, later ones (in the same group or a later commit) are duplicates
    /// that answer with the first id; the unit's latest reading is the newest stored one.
    #[tokio::test]
    async fn duplicates_within_and_across_commits() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("t.db").display());
        let store = Store::open(&url).await.unwrap();
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
        let unit = store.get_unit("o", "u1").await.unwrap().unwrap();
        assert_eq!(unit.last_temperature, Some(3.0));
    }
}
