//! The hot path: storing a group commit's readings in one transaction.
//!
//! One statement inserts every reading of the group (SQLite: `json_each` over one JSON
//! parameter; PostgreSQL: `UNNEST` of arrays), `ON CONFLICT DO NOTHING` on the idempotency key,
//! `RETURNING` the keys it stored. Keys it did not store are duplicates, whose first ids are
//! looked up in the same transaction. The units' latest reading moves in the same commit, so a
//! dashboard that reads `/api/units` after the acknowledgement sees it.

use std::collections::HashMap;

use super::{Engine, Result, Store, postgres, sqlite};
use crate::ingest::NewReading;

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
    fn into_pair(self) -> (ReadingKey, i64) {
        (
            ReadingKey {
                org_id: self.org_id,
                unit_id: self.unit_id,
                recorded_at: self.recorded_at,
                device_id: self.device_id,
                source: self.source,
            },
            self.id,
        )
    }
}

/// The newest new reading of a unit in one commit.
pub struct UnitLatest<'a> {
    pub org_id: &'a str,
    pub unit_id: &'a str,
    pub recorded_at: i64,
    pub temperature: f64,
}

/// For each input row: its stored id and whether this row stored it (`false`: duplicate).
pub type Outcomes = Vec<(i64, bool)>;

impl Store {
    /// Stores `rows` (organisation, reading) in one transaction. Within the group, the first
    /// occurrence of a key is the one stored; later ones are duplicates of it.
    pub async fn commit_readings(
        &self,
        rows: &[(&str, &NewReading)],
        received_at: i64,
    ) -> Result<Outcomes> {
        let keys: Vec<ReadingKey> = rows.iter().map(|(org, r)| ReadingKey::of(org, r)).collect();
        let mut first: HashMap<&ReadingKey, usize> = HashMap::with_capacity(rows.len());
        let mut unique = Vec::with_capacity(rows.len());
        for (i, k) in keys.iter().enumerate() {
            if !first.contains_key(k) {
                first.insert(k, i);
                unique.push(rows[i]);
            }
        }
        let (inserted, existing) = match &self.engine {
            Engine::Sqlite(pool) => sqlite::commit(pool, &unique, &keys, received_at).await?,
            Engine::Postgres(pool) => postgres::commit(pool, &unique, &keys, received_at).await?,
        };
        let inserted: HashMap<ReadingKey, i64> =
            inserted.into_iter().map(StoredKey::into_pair).collect();
        let existing: HashMap<ReadingKey, i64> =
            existing.into_iter().map(StoredKey::into_pair).collect();
        keys.iter()
            .enumerate()
            .map(|(i, k)| match (inserted.get(k), existing.get(k)) {
                (Some(id), _) => Ok((*id, first[k] == i)),
                (None, Some(id)) => Ok((*id, false)),
                (None, None) => Err(super::StoreError::Other(sqlx::Error::RowNotFound)),
            })
            .collect()
    }
}

/// The newest reading per unit among the rows that were actually inserted.
pub(super) fn latest_per_unit<'a>(
    rows: &[(&'a str, &'a NewReading)],
    inserted: &[StoredKey],
) -> Vec<UnitLatest<'a>> {
    let stored: std::collections::HashSet<(&str, &str, i64, &str, &str)> = inserted
        .iter()
        .map(|k| {
            (
                k.org_id.as_str(),
                k.unit_id.as_str(),
                k.recorded_at,
                k.device_id.as_str(),
                k.source.as_str(),
            )
        })
        .collect();
    let mut latest: HashMap<(&str, &str), UnitLatest<'a>> = HashMap::new();
    for (org, r) in rows {
        let key = (
            *org,
            r.unit_id.as_str(),
            r.recorded_at,
            r.device_id.as_str(),
            r.source.as_str(),
        );
        if !stored.contains(&key) {
            continue;
        }
        let entry = latest
            .entry((org, r.unit_id.as_str()))
            .or_insert(UnitLatest {
                org_id: org,
                unit_id: &r.unit_id,
                recorded_at: r.recorded_at,
                temperature: r.temperature,
            });
        if r.recorded_at >= entry.recorded_at {
            entry.recorded_at = r.recorded_at;
            entry.temperature = r.temperature;
        }
    }
    latest.into_values().collect()
}
