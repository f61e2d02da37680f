//! A short-lived cache of which units exist and in which site, for validating ingest and plain
//! WebSocket subscriptions without a query per reading.
//!
//! It only ever short-cuts a lookup: thresholds and alert state are never read from here (the
//! ingest commit reads them from the unit's locked row), and a unit deleted while an entry is
//! still cached is refused at the commit. Entries live a few seconds; this node's own writes
//! invalidate them after the write. Unknown units are not cached, so junk ids cannot grow it.

use std::time::Duration;

use crate::store::{Result, Store};

const TTL: Duration = Duration::from_secs(5);
/// Entries kept at most; past it the least used go (a lookup then reads the database again).
const CAPACITY: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct UnitInfo {
    pub site_id: String,
}

pub struct Units {
    store: Store,
    /// `moka`'s synchronous cache: its lookups never block, so async callers use it directly,
    /// and `invalidate` stays a plain call. A hit costs about 250 ns against 190 ns for the
    /// hand-written `RwLock<HashMap>` it replaced (release build, 50 units, key allocation
    /// included); ingest looks up each distinct unit once per request, next to a database
    /// commit of milliseconds, so the difference does not show.
    cache: moka::sync::Cache<(String, String), UnitInfo>,
}

impl Units {
    pub fn new(store: Store) -> Self {
        Units {
            store,
            cache: moka::sync::Cache::builder()
                .max_capacity(CAPACITY)
                .time_to_live(TTL)
                .build(),
        }
    }

    pub async fn get(&self, org: &str, unit: &str) -> Result<Option<UnitInfo>> {
        let key = (org.to_string(), unit.to_string());
        if let Some(info) = self.cache.get(&key) {
            return Ok(Some(info));
        }
        let Some(row) = self.store.get_unit(org, unit).await? else {
            self.cache.invalidate(&key);
            return Ok(None);
        };
        let info = UnitInfo {
            site_id: row.site_id,
        };
        self.cache.insert(key, info.clone());
        Ok(Some(info))
    }

    pub fn invalidate(&self, org: &str, unit: &str) {
        self.cache.invalidate(&(org.to_string(), unit.to_string()));
    }
}
