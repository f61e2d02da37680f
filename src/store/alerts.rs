//! The alert lifecycle in storage: history queries (filtered, paged by a keyset cursor) and
//! acknowledgement.
//!
//! An acknowledgement is decided by storage, like every other alert change: one conditional
//! `UPDATE … WHERE acknowledged_at IS NULL`, so of two requests (or two nodes) racing exactly one
//! changes the row and the other finds it acknowledged. The `alert:acknowledged` event is written
//! to `event_outbox` in the same transaction, so it is announced — with an offset, replayable,
//! and seen by the webhooks' trigger — even if the node dies right after its commit.

use super::unit_state::{LEASE_MS, OutboxEvent};
use super::{AlertRow, Engine, Result, Store, postgres, rows, sqlite};
use crate::rooms;
use crate::wire::{AlertAcknowledged, AlertStatus, format_time};

/// The filters of `GET /api/alerts` and its CSV export. Bounds are inclusive, on `triggeredAt`.
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    pub status: Option<AlertStatus>,
    pub unit_id: Option<String>,
    pub site_id: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// The caller's `site_ids`: only alerts of those sites (filtered in the query, so pages
    /// are full).
    pub site_ids: Option<Vec<String>>,
    /// Keyset cursor: only alerts strictly after `(triggeredAt, id)` in newest-first order.
    pub after: Option<(i64, String)>,
    pub limit: i64,
}

/// What an acknowledgement found.
#[derive(Debug)]
pub enum Acknowledge {
    /// Acknowledged now: the alert as stored, and the outbox row announcing it.
    Done(Box<AlertRow>, OutboxEvent),
    /// No such alert in the organisation, or not one of the caller's sites.
    NotFound,
    /// Acknowledged before (by this or another node).
    Already,
}

/// The history statement; `set` turns the JSON array parameter `$9` into a set of strings.
fn history_sql(set: &str) -> String {
    format!(
        "{} WHERE org_id = $1 AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR unit_id = $3) \
         AND ($4 IS NULL OR site_id = $4) AND triggered_at >= $5 AND triggered_at <= $6 \
         AND ($7 IS NULL OR triggered_at < $7 OR (triggered_at = $7 AND id < $8)) \
         AND ($9 IS NULL OR site_id IN (SELECT value FROM {set})) \
         ORDER BY triggered_at DESC, id DESC LIMIT $10",
        rows::ALERT_SELECT
    )
}

/// Runs one acknowledgement in one engine's transaction.
macro_rules! acknowledge_in {
    ($pool:expr, $begin:expr, $org:expr, $id:expr, $site_ids:expr, $by:expr, $note:expr, $now:expr) => {{
        let mut tx = $pool.begin_with($begin).await?;
        let select = format!("{} WHERE org_id = $1 AND id = $2", rows::ALERT_SELECT);
        let row: Option<AlertRow> = sqlx::query_as(&select)
            .bind($org)
            .bind($id)
            .fetch_optional(&mut *tx)
            .await?;
        let visible = |r: &AlertRow| {
            $site_ids.is_none_or(|ids: &Vec<String>| ids.iter().any(|s| *s == r.site_id))
        };
        let Some(mut row) = row.filter(visible) else {
            return Ok(Acknowledge::NotFound);
        };
        let updated = sqlx::query(
            "UPDATE alerts SET acknowledged_at = $3, acknowledged_by = $4, note = $5 \
             WHERE org_id = $1 AND id = $2 AND acknowledged_at IS NULL",
        )
        .bind($org)
        .bind($id)
        .bind($now)
        .bind($by)
        .bind($note)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            return Ok(Acknowledge::Already);
        }
        row.acknowledged_at = Some($now);
        row.acknowledged_by = Some($by.to_string());
        row.note = $note.map(str::to_string);
        let payload = serde_json::to_string(&AlertAcknowledged {
            alert_id: row.id.clone(),
            unit_id: row.unit_id.clone(),
            acknowledged_at: format_time($now),
            acknowledged_by: $by.to_string(),
            note: row.note.clone(),
            offset: None,
        })
        .expect("event payloads serialise");
        let rooms = serde_json::to_string(&rooms::unit_event_rooms($org, &row.site_id))
            .expect("room names serialise");
        let (outbox_id,): (i64,) = sqlx::query_as(
            "INSERT INTO event_outbox (org_id, event, rooms, payload, created_at, lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind($org)
        .bind(EVENT)
        .bind(&rooms)
        .bind(&payload)
        .bind($now)
        .bind($now + LEASE_MS)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        let event = OutboxEvent {
            id: outbox_id,
            org_id: $org.to_string(),
            event: EVENT.to_string(),
            rooms,
            payload,
        };
        Ok(Acknowledge::Done(Box::new(row), event))
    }};
}

const EVENT: &str = "alert:acknowledged";

impl Store {
    /// A page of an organisation's alerts, newest first (`triggeredAt`, then id, descending).
    pub async fn alert_history(&self, org: &str, q: &AlertQuery) -> Result<Vec<AlertRow>> {
        let status = q.status.map(<&str>::from);
        let site_ids = q
            .site_ids
            .as_ref()
            .map(|ids| serde_json::to_string(ids).expect("strings serialise"));
        let (after_at, after_id) = match &q.after {
            Some((at, id)) => (Some(*at), Some(id.as_str())),
            None => (None, None),
        };
        let sql = match &self.engine {
            Engine::Sqlite(_) => history_sql("json_each($9)"),
            Engine::Postgres(_) => history_sql("json_array_elements_text($9::json) AS j(value)"),
        };
        with_pool!(self, |p| sqlx::query_as(&sql)
            .bind(org)
            .bind(status)
            .bind(q.unit_id.as_deref())
            .bind(q.site_id.as_deref())
            .bind(q.since.unwrap_or(i64::MIN))
            .bind(q.until.unwrap_or(i64::MAX))
            .bind(after_at)
            .bind(after_id)
            .bind(site_ids.as_deref())
            .bind(q.limit)
            .fetch_all(p)
            .await)
        .map_err(Into::into)
    }

    /// Acknowledges an alert once, by `by` (a user's `sub`), writing its `alert:acknowledged`
    /// event in the same transaction. `site_ids`: the caller's sites, when restricted.
    pub async fn acknowledge_alert(
        &self,
        org: &str,
        id: &str,
        site_ids: Option<&Vec<String>>,
        by: &str,
        note: Option<&str>,
        now: i64,
    ) -> Result<Acknowledge> {
        match &self.engine {
            Engine::Sqlite(p) => {
                acknowledge_in!(p, sqlite::BEGIN, org, id, site_ids, by, note, now)
            }
            Engine::Postgres(p) => {
                acknowledge_in!(p, postgres::BEGIN, org, id, site_ids, by, note, now)
            }
        }
    }
}
