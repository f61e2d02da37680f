//! A short-lived cache of units (site and thresholds), for validating ingest and evaluating
//! alerts without a query per reading.
//!
//! Entries live a few seconds, and this node's own writes (`PATCH`, `DELETE`) invalidate them at
//! once, so a threshold change applies to the next reading here and within seconds on other
//! nodes. Unknown units are not cached, so junk ids cannot grow it.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use crate::alerts::Thresholds;
use crate::store::{Result, Store};

const TTL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct UnitInfo {
    pub site_id: String,
    pub name: String,
    pub thresholds: Thresholds,
    pub offline_after_seconds: i64,
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
            name: row.name,
            thresholds: Thresholds {
                min: row.temp_min,
                max: row.temp_max,
            },
            offline_after_seconds: row.offline_after_seconds,
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
