//! The hot path: storing a group commit's readings in one transaction.
//!
//! One statement inserts every reading of the group (SQLite: `json_each` over one JSON
//! parameter; PostgreSQL: `UNNEST` of arrays), `ON CONFLICT DO NOTHING` on the idempotency key,
//! `RETURNING` the keys it stored. Keys it did not store are duplicates, whose first ids are
//! looked up in the same transaction. The units' latest reading moves in the same commit, so a
//! dashboard that reads `/api/units` after the acknowledgement sees it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

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
        let (inserted, existing) = match &self.engine {
            Engine::Sqlite(pool) => sqlite::commit(pool, &unique, rows, received_at).await?,
            Engine::Postgres(pool) => postgres::commit(pool, &unique, rows, received_at).await?,
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
        rows.iter()
            .enumerate()
            .map(|(i, (org, r))| {
                let k = key_ref(org, r);
                match ids.get(&k) {
                    Some(&(id, new)) => Ok((id, new && (!has_duplicates || first[&k] == i))),
                    None => Err(super::StoreError::Other(sqlx::Error::RowNotFound)),
                }
            })
            .collect()
    }
}

/// The newest reading per unit among the rows that were actually inserted.
pub(super) fn latest_per_unit<'a>(
    rows: &[(&'a str, &'a NewReading)],
    inserted: &[StoredKey],
) -> Vec<UnitLatest<'a>> {
    // The common case: every row was new, so there is nothing to filter.
    let stored: Option<HashSet<KeyRef<'_>>> =
        (inserted.len() < rows.len()).then(|| inserted.iter().map(StoredKey::key).collect());
    let mut latest: HashMap<(&str, &str), UnitLatest<'a>> = HashMap::new();
    for (org, r) in rows {
        if let Some(stored) = &stored
            && !stored.contains(&key_ref(org, r))
        {
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
            .unwrap();
        assert!(first[0].1 && first[1].1 && !first[2].1);
        assert_eq!(
            first[2].0, first[0].0,
            "a duplicate answers with the first id"
        );
        assert_ne!(first[0].0, first[1].0);
        let second = store
            .commit_readings(&[("o", &c), ("o", &b)], 6)
            .await
            .unwrap();
        assert!(second[0].1);
        assert_eq!(second[1], (first[1].0, false));
        let unit = store.get_unit("o", "u1").await.unwrap().unwrap();
        assert_eq!(unit.last_temperature, Some(3.0));
    }
}
