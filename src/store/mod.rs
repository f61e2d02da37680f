//! Storage: the queries the gateway needs, on SQLite (embedded, one node) or PostgreSQL (shared).
//!
//! Both engines run the same SQL wherever they can: times are integer milliseconds, placeholders are
//! `$N` (which sqlx accepts for SQLite too), and [`with_pool!`] expands one query body for each
//! engine. What genuinely differs — connecting, migrations, the bulk insert of the hot path — lives
//! in [`sqlite`] and [`postgres`].
//!
//! Every query is scoped by organisation: ids are unique only within one.

mod postgres;
mod reading;
mod readings;
mod rows;
mod sqlite;
mod unit_state;

use std::time::Duration;

use sqlx::{PgPool, SqlitePool};

pub use alerts::{Acknowledge, AlertQuery};
pub use reading::NewReading;
pub use readings::{Committed, Outcomes, ReadingKey};
pub use rows::{AlertRow, ApiKeyRow, ReadingRow, UnitRow};
pub use unit_state::{LEASE_MS, Leased, OutboxEvent, PendingReading};

use crate::wire::{AlertStatus, Site, UpdateUnit};

/// Runs the same expression against whichever pool the store holds.
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.engine {
            Engine::Sqlite($pool) => $body,
            Engine::Postgres($pool) => $body,
        }
    };
}

#[derive(Clone)]
enum Engine {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs a statement on whichever pool the store holds; yields the number of rows affected.
macro_rules! execute {
    ($store:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        with_pool!($store, |p| sqlx::query($sql)
            $(.bind($bind))*
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
    };
}

// After the macros, which they use.
mod alerts;
pub mod unit_cache;
mod webhooks;
pub use webhooks::{AttemptRecord, ClaimedDelivery, DeliveryRow, WebhookRow};

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Engine,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint said no (an id already used, an alert already open).
    #[error("conflict on {0}")]
    Conflict(String),
    /// The database cannot be reached or is overloaded; the caller should retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("storage error: {0}")]
    Other(sqlx::Error),
    /// A deadlock or serialization failure: the transaction may simply be run again.
    #[error("storage contended: {0}")]
    Contended(sqlx::Error),
    /// Units deleted between a request's validation and its commit; nothing was stored.
    #[error("units no longer exist: {0:?}")]
    UnitsGone(Vec<(String, String)>),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.constraint().unwrap_or("unique").to_string())
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40001" | "40P01")) =>
            {
                StoreError::Contended(e)
            }
            sqlx::Error::Database(db) if unavailable_code(db.code().as_deref()) => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

/// Database error codes that mean "not now" rather than "never": SQLite busy/locked;
/// PostgreSQL connection exceptions (08), insufficient resources (53), operator intervention
/// (57P: shutting down, starting up) and a database that is gone (3D000).
fn unavailable_code(code: Option<&str>) -> bool {
    match code {
        Some("5" | "6" | "3D000") => true,
        Some(c) => c.starts_with("08") || c.starts_with("53") || c.starts_with("57P"),
        None => false,
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The fields of a new unit, validated by the caller.
pub struct NewUnit<'a> {
    pub id: &'a str,
    pub site_id: &'a str,
    pub name: &'a str,
    pub temp_min: Option<f64>,
    pub temp_max: Option<f64>,
    pub offline_after_seconds: i64,
}

/// What `DELETE /api/sites/{id}` found.
#[derive(Debug, PartialEq, Eq)]
pub enum DeleteSite {
    Deleted,
    NotFound,
    HasUnits,
}

/// Filters of the readings history.
pub struct ReadingsQuery {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub limit: i64,
}

/// Long ranges for a chart: when the window `[since, until]` holds more than `2 × buckets`
/// readings, it is cut into `buckets` equal spans and each span gives only its lowest and its
/// highest reading — real readings, so an excursion's peak is never averaged away.
pub struct Downsample {
    pub since: i64,
    pub until: i64,
    pub buckets: i64,
}

impl Store {
    /// Connects (creating an SQLite file and its directory if needed) and applies migrations.
    pub async fn open(url: &str) -> Result<Self> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub async fn connect(url: &str) -> Result<Self> {
        let engine = if url.starts_with("sqlite:") {
            Engine::Sqlite(sqlite::connect(url).await?)
        } else {
            Engine::Postgres(postgres::connect(url).await?)
        };
        Ok(Store { engine })
    }

    pub async fn migrate(&self) -> Result<()> {
        match &self.engine {
            Engine::Sqlite(pool) => sqlite::MIGRATOR.run(pool).await?,
            Engine::Postgres(pool) => postgres::MIGRATOR.run(pool).await?,
        }
        Ok(())
    }

    pub fn engine_name(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite(_) => "sqlite",
            Engine::Postgres(_) => "postgres",
        }
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        let fut = async { execute!(self, "SELECT 1") };
        // Well within a second: a probe must answer before the orchestrator's timeout.
        match tokio::time::timeout(Duration::from_millis(500), fut).await {
            Ok(r) => r.map(|_| ()).map_err(Into::into),
            Err(_) => Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    pub async fn close(&self) {
        with_pool!(self, |p| p.close().await)
    }

    async fn ensure_org(&self, org: &str) -> Result<()> {
        const SQL: &str = "INSERT INTO organisations (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";
        execute!(self, SQL, org, now_ms())?;
        Ok(())
    }

    // ---- sites --------------------------------------------------------------------------------

    pub async fn create_site(&self, org: &str, id: &str, name: &str) -> Result<Site> {
        self.ensure_org(org).await?;
        const SQL: &str =
            "INSERT INTO sites (org_id, id, name, created_at) VALUES ($1, $2, $3, $4)";
        execute!(self, SQL, org, id, name, now_ms())?;
        Ok(Site {
            id: id.into(),
            name: name.into(),
        })
    }

    pub async fn list_sites(&self, org: &str) -> Result<Vec<Site>> {
        const SQL: &str = "SELECT id, name FROM sites WHERE org_id = $1 ORDER BY id";
        let rows: Vec<(String, String)> =
            with_pool!(self, |p| sqlx::query_as(SQL).bind(org).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, name)| Site { id, name })
            .collect())
    }

    pub async fn get_site(&self, org: &str, id: &str) -> Result<Option<Site>> {
        const SQL: &str = "SELECT id, name FROM sites WHERE org_id = $1 AND id = $2";
        let row: Option<(String, String)> = with_pool!(self, |p| sqlx::query_as(SQL)
            .bind(org)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        Ok(row.map(|(id, name)| Site { id, name }))
    }

    /// Deletes an empty site. A site with units is refused: deleting it would silently drop
    /// their readings and alerts, so the operator deletes the units first.
    pub async fn delete_site(&self, org: &str, id: &str) -> Result<DeleteSite> {
        const UNITS: &str = "SELECT COUNT(*) FROM units WHERE org_id = $1 AND site_id = $2";
        const DEL: &str = "DELETE FROM sites WHERE org_id = $1 AND id = $2";
        let (units,): (i64,) = with_pool!(self, |p| sqlx::query_as(UNITS)
            .bind(org)
            .bind(id)
            .fetch_one(p)
            .await)?;
        if units > 0 {
            return Ok(DeleteSite::HasUnits);
        }
        let affected = execute!(self, DEL, org, id)?;
        Ok(if affected == 0 {
            DeleteSite::NotFound
        } else {
            DeleteSite::Deleted
        })
    }

    // ---- units --------------------------------------------------------------------------------

    pub async fn create_unit(&self, org: &str, u: NewUnit<'_>) -> Result<UnitRow> {
        const SQL: &str = "INSERT INTO units (org_id, id, site_id, name, temp_min, temp_max, \
                           offline_after_seconds, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
        execute!(
            self,
            SQL,
            org,
            u.id,
            u.site_id,
            u.name,
            u.temp_min,
            u.temp_max,
            u.offline_after_seconds,
            now_ms()
        )?;
        self.get_unit(org, u.id)
            .await?
            .ok_or_else(|| StoreError::Other(sqlx::Error::RowNotFound))
    }

    pub async fn list_units(&self, org: &str) -> Result<Vec<UnitRow>> {
        let sql = format!(
            "{} WHERE org_id = $1 ORDER BY site_id, id",
            rows::UNIT_SELECT
        );
        with_pool!(self, |p| sqlx::query_as(&sql).bind(org).fetch_all(p).await).map_err(Into::into)
    }

    pub async fn get_unit(&self, org: &str, id: &str) -> Result<Option<UnitRow>> {
        let sql = format!("{} WHERE org_id = $1 AND id = $2", rows::UNIT_SELECT);
        with_pool!(self, |p| sqlx::query_as(&sql)
            .bind(org)
            .bind(id)
            .fetch_optional(p)
            .await)
        .map_err(Into::into)
    }

    /// The site a unit belongs to, for authorisation.
    pub async fn unit_site(&self, org: &str, unit: &str) -> Result<Option<String>> {
        const SQL: &str = "SELECT site_id FROM units WHERE org_id = $1 AND id = $2";
        let row: Option<(String,)> = with_pool!(self, |p| sqlx::query_as(SQL)
            .bind(org)
            .bind(unit)
            .fetch_optional(p)
            .await)?;
        Ok(row.map(|(s,)| s))
    }

    /// Applies a validated patch; `None` when the unit does not exist.
    pub async fn update_unit(
        &self,
        org: &str,
        id: &str,
        patch: &UpdateUnit,
    ) -> Result<Option<UnitRow>> {
        let Some(current) = self.get_unit(org, id).await? else {
            return Ok(None);
        };
        let name = patch.name.as_deref().unwrap_or(&current.name);
        let temp_min = patch.temp_min.unwrap_or(current.temp_min);
        let temp_max = patch.temp_max.unwrap_or(current.temp_max);
        let offline = patch
            .offline_after_seconds
            .unwrap_or(current.offline_after_seconds);
        const SQL: &str = "UPDATE units SET name = $3, temp_min = $4, temp_max = $5, \
                           offline_after_seconds = $6 WHERE org_id = $1 AND id = $2";
        execute!(self, SQL, org, id, name, temp_min, temp_max, offline)?;
        self.get_unit(org, id).await
    }

    /// Deletes a unit with its readings and alerts, in one transaction. The unit's row goes
    /// first: that waits for any commit holding its lock, so no reading of a commit racing the
    /// delete is left behind for a unit re-created with the same id.
    pub async fn delete_unit(&self, org: &str, id: &str) -> Result<bool> {
        const STEPS: [&str; 3] = [
            "DELETE FROM units WHERE org_id = $1 AND id = $2",
            "DELETE FROM readings WHERE org_id = $1 AND unit_id = $2",
            "DELETE FROM alerts WHERE org_id = $1 AND unit_id = $2",
        ];
        let deleted = with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let mut first = None;
            for sql in STEPS {
                let n = sqlx::query(sql)
                    .bind(org)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                first.get_or_insert(n);
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(first.unwrap_or(0))
        })?;
        Ok(deleted > 0)
    }

    // ---- readings -----------------------------------------------------------------------------

    pub async fn latest_reading(&self, org: &str, unit: &str) -> Result<Option<ReadingRow>> {
        let sql = format!(
            "{} WHERE org_id = $1 AND unit_id = $2 ORDER BY recorded_at DESC, id DESC LIMIT 1",
            rows::READING_SELECT
        );
        with_pool!(self, |p| sqlx::query_as(&sql)
            .bind(org)
            .bind(unit)
            .fetch_optional(p)
            .await)
        .map_err(Into::into)
    }

    /// The newest `limit` readings of a unit within `[since, until]`, oldest first.
    pub async fn readings(
        &self,
        org: &str,
        unit: &str,
        q: &ReadingsQuery,
    ) -> Result<Vec<ReadingRow>> {
        let sql = format!(
            "{} WHERE org_id = $1 AND unit_id = $2 AND recorded_at >= $3 AND recorded_at <= $4 \
             ORDER BY recorded_at DESC, id DESC LIMIT $5",
            rows::READING_SELECT
        );
        let mut rows: Vec<ReadingRow> = with_pool!(self, |p| sqlx::query_as(&sql)
            .bind(org)
            .bind(unit)
            .bind(q.since.unwrap_or(i64::MIN))
            .bind(q.until.unwrap_or(i64::MAX))
            .bind(q.limit)
            .fetch_all(p)
            .await)?;
        rows.reverse();
        Ok(rows)
    }

    /// A unit's readings in a window, at most two per bucket (see [`Downsample`]), oldest
    /// first.
    pub async fn readings_downsampled(
        &self,
        org: &str,
        unit: &str,
        d: &Downsample,
    ) -> Result<Vec<ReadingRow>> {
        let width = ((d.until - d.since) / d.buckets.max(1)).max(1);
        let sql = "SELECT id, unit_id, device_id, temperature, humidity, battery, \
             signal_strength, recorded_at, source FROM (SELECT *, \
             ROW_NUMBER() OVER (PARTITION BY (recorded_at - $3) / $5 \
             ORDER BY temperature ASC, recorded_at, id) AS low, \
             ROW_NUMBER() OVER (PARTITION BY (recorded_at - $3) / $5 \
             ORDER BY temperature DESC, recorded_at, id) AS high, \
             COUNT(*) OVER () AS total \
             FROM readings WHERE org_id = $1 AND unit_id = $2 \
             AND recorded_at >= $3 AND recorded_at <= $4) AS b \
             WHERE total <= $6 OR low = 1 OR high = 1 ORDER BY recorded_at, id";
        with_pool!(self, |p| sqlx::query_as(sql)
            .bind(org)
            .bind(unit)
            .bind(d.since)
            .bind(d.until)
            .bind(width)
            .bind(d.buckets * 2)
            .fetch_all(p)
            .await)
        .map_err(Into::into)
    }

    // ---- alerts -------------------------------------------------------------------------------

    /// An organisation's alerts, newest first, optionally by status.
    pub async fn list_alerts(
        &self,
        org: &str,
        status: Option<AlertStatus>,
        limit: i64,
    ) -> Result<Vec<AlertRow>> {
        let status = status.map(<&str>::from);
        let sql = format!(
            "{} WHERE org_id = $1 AND ($2 IS NULL OR status = $2) \
             ORDER BY triggered_at DESC, id DESC LIMIT $3",
            rows::ALERT_SELECT
        );
        with_pool!(self, |p| sqlx::query_as(&sql)
            .bind(org)
            .bind(status)
            .bind(limit)
            .fetch_all(p)
            .await)
        .map_err(Into::into)
    }

    /// Marks a silent unit offline — if, under its row lock, storage agrees it is silent and
    /// not offline yet — with its `offline` alert and the events announcing them.
    pub async fn go_offline(&self, org: &str, unit: &str, now: i64) -> Result<Vec<OutboxEvent>> {
        Ok(match &self.engine {
            Engine::Sqlite(p) => {
                unit_state::sqlite::go_offline(p, sqlite::BEGIN, org, unit, now).await?
            }
            Engine::Postgres(p) => {
                unit_state::postgres::go_offline(p, postgres::BEGIN, org, unit, now).await?
            }
        })
    }

    /// Outbox events whose lease ran out (their node did not announce them), leased to the
    /// caller for [`LEASE_MS`].
    pub async fn claim_outbox(&self, now: i64, limit: i64) -> Result<Vec<OutboxEvent>> {
        Ok(match &self.engine {
            Engine::Sqlite(p) => unit_state::sqlite::claim_outbox(p, now, limit).await?,
            Engine::Postgres(p) => unit_state::postgres::claim_outbox(p, now, limit).await?,
        })
    }

    /// Keeps what this node is still announcing its own for another [`LEASE_MS`].
    pub async fn renew_leases(&self, leased: &[Leased], now: i64) -> Result<()> {
        let until = Some(now + LEASE_MS);
        match &self.engine {
            Engine::Sqlite(p) => unit_state::sqlite::leases(p, leased, until).await?,
            Engine::Postgres(p) => unit_state::postgres::leases(p, leased, until).await?,
        }
        Ok(())
    }

    /// Forgets what has been announced.
    pub async fn release(&self, leased: &[Leased]) -> Result<()> {
        match &self.engine {
            Engine::Sqlite(p) => unit_state::sqlite::leases(p, leased, None).await?,
            Engine::Postgres(p) => unit_state::postgres::leases(p, leased, None).await?,
        }
        Ok(())
    }

    /// Commits whose readings no node announced within the lease (their node died before its
    /// flush): their ids as JSON ranges, leased to the caller.
    pub async fn claim_pending(&self, now: i64, limit: i64) -> Result<Vec<(i64, String)>> {
        Ok(match &self.engine {
            Engine::Sqlite(p) => unit_state::sqlite::claim_pending(p, now, limit).await?,
            Engine::Postgres(p) => unit_state::postgres::claim_pending(p, now, limit).await?,
        })
    }

    /// The readings of a pending row (those whose unit still exists), in id order.
    pub async fn pending_readings(&self, ranges: &str) -> Result<Vec<PendingReading>> {
        Ok(match &self.engine {
            Engine::Sqlite(p) => unit_state::sqlite::pending_readings(p, ranges).await?,
            Engine::Postgres(p) => unit_state::postgres::pending_readings(p, ranges).await?,
        })
    }

    /// Units that have sent readings but none for their offline timeout, and are not offline yet.
    pub async fn silent_units(&self, now: i64) -> Result<Vec<(String, String)>> {
        const SQL: &str = "SELECT org_id, id FROM units WHERE last_seen_at IS NOT NULL \
                           AND status <> 'offline' AND last_seen_at + offline_after_seconds * 1000 <= $1";
        with_pool!(self, |p| sqlx::query_as(SQL).bind(now).fetch_all(p).await).map_err(Into::into)
    }

    // ---- API keys -----------------------------------------------------------------------------

    pub async fn create_api_key(
        &self,
        org: &str,
        id: &str,
        name: &str,
        hash: &str,
        scopes: &str,
    ) -> Result<()> {
        self.ensure_org(org).await?;
        const SQL: &str = "INSERT INTO api_keys (id, org_id, name, key_hash, scopes, created_at) \
                           VALUES ($1, $2, $3, $4, $5, $6)";
        execute!(self, SQL, id, org, name, hash, scopes, now_ms())?;
        Ok(())
    }

    /// The live (not revoked) key with this hash.
    pub async fn find_api_key(&self, hash: &str) -> Result<Option<ApiKeyRow>> {
        const SQL: &str = "SELECT id, org_id, scopes FROM api_keys \
                           WHERE key_hash = $1 AND revoked_at IS NULL";
        with_pool!(self, |p| sqlx::query_as(SQL)
            .bind(hash)
            .fetch_optional(p)
            .await)
        .map_err(Into::into)
    }

    /// Revokes a key of this organisation; false when there is no such live key.
    pub async fn revoke_api_key(&self, org: &str, id: &str) -> Result<bool> {
        const SQL: &str = "UPDATE api_keys SET revoked_at = $3 \
                           WHERE org_id = $1 AND id = $2 AND revoked_at IS NULL";
        let affected = execute!(self, SQL, org, id, now_ms())?;
        Ok(affected > 0)
    }
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
