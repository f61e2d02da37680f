//! A short-lived cache of which units exist and in which site, for validating ingest and plain
//! WebSocket subscriptions without a query per reading.
//!
//! It only ever short-cuts a lookup: thresholds and alert state are never read from here (the
//! ingest commit reads them from the unit's locked row), and a unit deleted while an entry is
//! still cached is refused at the commit. Entries live a few seconds; this node's own writes
//! invalidate them after the write. Unknown units are not cached, so junk ids cannot grow it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::store::{Result, Store};

const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct UnitInfo {
    pub site_id: String,
}

pub struct Units {
    store: Store,
    cache: RwLock<HashMap<(String, String), (Instant, UnitInfo)>>,
}

impl Units {
    pub fn new(store: Store) -> Self {
        Units {
            store,
            cache: RwLock::new(HashMap::new()),
        }
    }

    pub async fn get(&self, org: &str, unit: &str) -> Result<Option<UnitInfo>> {
        let key = (org.to_string(), unit.to_string());
        if let Some((at, info)) = self.cache.read().unwrap().get(&key)
            && at.elapsed() < TTL
        {
            return Ok(Some(info.clone()));
        }
        let Some(row) = self.store.get_unit(org, unit).await? else {
            self.cache.write().unwrap().remove(&key);
            return Ok(None);
        };
        let info = UnitInfo {
            site_id: row.site_id,
        };
        let mut cache = self.cache.write().unwrap();
        if cache.len() > 100_000 {
            cache.retain(|_, (at, _)| at.elapsed() < TTL);
        }
        cache.insert(key, (Instant::now(), info.clone()));
        Ok(Some(info))
    }

    pub fn invalidate(&self, org: &str, unit: &str) {
        self.cache
            .write()
            .unwrap()
            .remove(&(org.to_string(), unit.to_string()));
    }
}
