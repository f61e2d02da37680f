//! Webhooks and their deliveries (see `migrations/*/0005_webhooks.sql`).
//!
//! Delivery rows are never written here: the database makes them, by a trigger, in the
//! transaction that stores an alert event. This module reads them, leases the due ones to one
//! node's worker, and records each attempt.

use super::{Engine, Result, Store, now_ms};

/// A webhook as listed (no secret).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookRow {
    pub id: String,
    pub url: String,
    /// JSON array of event names.
    pub events: String,
    pub created_at: i64,
}

/// A delivery as listed by `GET /api/webhooks/{id}/deliveries`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub event: String,
    pub attempts: i32,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<i64>,
    pub delivered_at: Option<i64>,
}

/// A due delivery leased to this node, with what its attempt needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    pub webhook_id: String,
    pub org_id: String,
    pub event: String,
    /// The event's payload as stored in the outbox (JSON text).
    pub payload: String,
    pub attempts: i32,
    pub first_attempt_at: Option<i64>,
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub attempts: i32,
    pub first_attempt_at: i64,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    /// `None`: delivered or given up.
    pub next_attempt_at: Option<i64>,
    pub delivered_at: Option<i64>,
}

impl Store {
    pub async fn create_webhook(
        &self,
        org: &str,
        id: &str,
        url: &str,
        events: &str,
        secret: &str,
    ) -> Result<()> {
        self.ensure_org(org).await?;
        const SQL: &str = "INSERT INTO webhooks (id, org_id, url, events, secret, created_at) \
                           VALUES ($1, $2, $3, $4, $5, $6)";
        execute!(self, SQL, id, org, url, events, secret, now_ms())?;
        Ok(())
    }

    pub async fn list_webhooks(&self, org: &str) -> Result<Vec<WebhookRow>> {
        const SQL: &str = "SELECT id, url, events, created_at FROM webhooks WHERE org_id = $1 \
                           ORDER BY created_at, id";
        with_pool!(self, |p| sqlx::query_as(SQL).bind(org).fetch_all(p).await).map_err(Into::into)
    }

    /// Deletes a webhook of this organisation with its deliveries; false when there is none.
    pub async fn delete_webhook(&self, org: &str, id: &str) -> Result<bool> {
        const DELIVERIES: &str = "DELETE FROM webhook_deliveries WHERE webhook_id IN \
                                  (SELECT id FROM webhooks WHERE org_id = $1 AND id = $2)";
        const HOOK: &str = "DELETE FROM webhooks WHERE org_id = $1 AND id = $2";
        let deleted = with_pool!(self, |p| {
            let mut tx = p.begin().await?;
            sqlx::query(DELIVERIES)
                .bind(org)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let n = sqlx::query(HOOK)
                .bind(org)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok::<_, sqlx::Error>(n)
        })?;
        Ok(deleted > 0)
    }

    /// The newest `limit` deliveries of a webhook of this organisation, newest first; `None`
    /// when the organisation has no such webhook.
    pub async fn webhook_deliveries(
        &self,
        org: &str,
        id: &str,
        limit: i64,
    ) -> Result<Option<Vec<DeliveryRow>>> {
        const HOOK: &str = "SELECT id FROM webhooks WHERE org_id = $1 AND id = $2";
        const SQL: &str = "SELECT id, event, attempts, last_status, last_error, next_attempt_at, \
                           delivered_at FROM webhook_deliveries WHERE webhook_id = $1 \
                           ORDER BY seq DESC LIMIT $2";
        let hook: Option<(String,)> = with_pool!(self, |p| sqlx::query_as(HOOK)
            .bind(org)
            .bind(id)
            .fetch_optional(p)
            .await)?;
        if hook.is_none() {
            return Ok(None);
        }
        let rows = with_pool!(self, |p| sqlx::query_as(SQL)
            .bind(id)
            .bind(limit)
            .fetch_all(p)
            .await)?;
        Ok(Some(rows))
    }

    /// Leases up to `limit` due deliveries to the caller until `lease_until`. On PostgreSQL
    /// rows another node is claiming are skipped (`SKIP LOCKED`), and a row claimed meanwhile
    /// no longer matches `lease_until <= now` when re-checked: each is leased to one node.
    pub async fn claim_deliveries(
        &self,
        now: i64,
        lease_until: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedDelivery>> {
        const SELECT: &str = "SELECT id FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL \
                              AND next_attempt_at <= $1 AND lease_until <= $1 \
                              ORDER BY next_attempt_at, seq LIMIT $3";
        const RETURNING: &str = "RETURNING id, webhook_id, org_id, event, payload, attempts, \
                                 first_attempt_at";
        let rows = match &self.engine {
            Engine::Sqlite(p) => {
                let sql = format!(
                    "UPDATE webhook_deliveries SET lease_until = $2 WHERE id IN ({SELECT}) \
                     {RETURNING}"
                );
                sqlx::query_as(&sql)
                    .bind(now)
                    .bind(lease_until)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
            Engine::Postgres(p) => {
                let sql = format!(
                    "UPDATE webhook_deliveries SET lease_until = $2 WHERE id IN \
                     ({SELECT} FOR UPDATE SKIP LOCKED) AND lease_until <= $1 {RETURNING}"
                );
                sqlx::query_as(&sql)
                    .bind(now)
                    .bind(lease_until)
                    .bind(limit)
                    .fetch_all(p)
                    .await?
            }
        };
        Ok(rows)
    }

    /// Where a delivery goes: the webhook's URL and secret, `None` once it was deleted.
    pub async fn webhook_target(&self, id: &str) -> Result<Option<(String, String)>> {
        const SQL: &str = "SELECT url, secret FROM webhooks WHERE id = $1";
        with_pool!(self, |p| sqlx::query_as(SQL)
            .bind(id)
            .fetch_optional(p)
            .await)
        .map_err(Into::into)
    }

    /// Records an attempt and releases the lease.
    pub async fn record_attempt(&self, id: &str, r: &AttemptRecord) -> Result<()> {
        const SQL: &str = "UPDATE webhook_deliveries SET attempts = $2, first_attempt_at = $3, \
                           last_status = $4, last_error = $5, next_attempt_at = $6, \
                           delivered_at = $7, lease_until = 0 WHERE id = $1";
        execute!(
            self,
            SQL,
            id,
            r.attempts,
            r.first_attempt_at,
            r.last_status,
            r.last_error.as_deref(),
            r.next_attempt_at,
            r.delivered_at
        )?;
        Ok(())
    }

    /// Gives up the leases of deliveries whose attempts were cut off, so that they are due at
    /// once for any node.
    pub async fn release_deliveries(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let json = serde_json::to_string(ids).unwrap_or_default();
        let sql = match &self.engine {
            Engine::Sqlite(_) => {
                "UPDATE webhook_deliveries SET lease_until = 0 \
                 WHERE id IN (SELECT value FROM json_each($1))"
            }
            Engine::Postgres(_) => {
                "UPDATE webhook_deliveries SET lease_until = 0 \
                 WHERE id IN (SELECT json_array_elements_text($1::json))"
            }
        };
        execute!(self, sql, json)?;
        Ok(())
    }
}
