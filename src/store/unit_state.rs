//! Alert and status changes, decided and written inside one transaction per change.
//!
//! A group commit locks the rows of every unit it touches — in one order, `(org_id, id)`, so
//! concurrent commits from several nodes cannot deadlock — reads their stored state and open
//! alerts, lets [`crate::evaluate::verdict`] decide, and writes the alerts, the units' new state and the
//! events announcing them (the `event_outbox` rows) before it commits. The offline sweep does the
//! same for one silent unit. So whichever node handles a unit's next reading decides from what
//! every other node committed, and a stored change is never without its announcement: the events
//! are rows, announced after the commit by this node or, if it dies first, by any live node
//! (see [`crate::deliver::monitor`]).
//!
//! The statements take their rows as one JSON parameter, which both engines read as a table
//! (`json_each` / `json_array_elements`), so one text serves SQLite and PostgreSQL; only the
//! row locks (`FOR UPDATE`, PostgreSQL) and how the transaction begins differ. SQLite has one
//! writer: `BEGIN IMMEDIATE` takes the write lock up front, which serialises it the same way.

use std::sync::LazyLock;

use serde_json::json;

use crate::evaluate::thresholds::Thresholds;
use crate::evaluate::verdict::{StoredUnit, Verdict};
use crate::wire::{AlertStatus, AlertType, UnitStatus};

/// How long an event is the writing node's to announce before any node may take it. The node
/// renews the lease of what it still has in flight, so a slow emitter does not lose it; a
/// dead node's events are taken over this long after its last renewal.
pub const LEASE_MS: i64 = 2_000;

/// An event of the outbox, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxEvent {
    pub id: i64,
    pub org_id: String,
    pub event: String,
    /// JSON array of room names.
    pub rooms: String,
    pub payload: String,
}

/// What a lease is held on: events to announce, or readings to announce in batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leased {
    /// An `event_outbox` row.
    Event(i64),
    /// A `pending_batches` row.
    Readings(i64),
}

/// A stored reading not yet announced in a batch, with what its batch needs.
#[derive(Debug, sqlx::FromRow)]
pub struct PendingReading {
    pub org_id: String,
    pub site_id: String,
    #[sqlx(flatten)]
    pub reading: super::ReadingRow,
}

/// A commit's new reading ids as the JSON ranges of a `pending_batches` row.
pub(super) fn id_ranges(mut ids: Vec<i64>) -> String {
    ids.sort_unstable();
    let mut ranges: Vec<[i64; 2]> = Vec::new();
    for id in ids {
        match ranges.last_mut() {
            Some(r) if r[1] + 1 == id => r[1] = id,
            _ => ranges.push([id, id]),
        }
    }
    json!(ranges).to_string()
}

/// The statements, in one engine's dialect.
pub(super) struct Sql {
    lock_units: String,
    open_alerts: String,
    write_units: String,
    insert_alerts: String,
    resolve_alerts: String,
    raise_peaks: String,
    insert_outbox: String,
    claim_outbox: String,
    renew_outbox: String,
    delete_outbox: String,
    insert_pending: String,
    claim_pending: String,
    renew_pending: String,
    delete_pending: String,
    pending_readings: String,
}

impl Sql {
    /// `rows`: the JSON parameter `$1` as a table with a `value` column and an ordinal `n`;
    /// `lock`: the row-lock clause.
    fn new(rows: &str, lock: &str, skip_locked: &str) -> Sql {
        Sql {
            lock_units: format!(
                "SELECT u.org_id, u.id, u.site_id, u.name, u.temp_min, u.temp_max, \
                 u.offline_after_seconds, u.status, u.status_since, u.last_reading_at, \
                 u.last_temperature, u.last_seen_at \
                 FROM units AS u JOIN (SELECT value->>0 AS o, value->>1 AS i FROM {rows}) AS k \
                 ON u.org_id = k.o AND u.id = k.i ORDER BY u.org_id, u.id{lock}"
            ),
            open_alerts: format!(
                "SELECT a.org_id, a.unit_id, a.id, a.alert_type, a.peak_value, a.triggered_at \
                 FROM alerts AS a \
                 JOIN (SELECT value->>0 AS o, value->>1 AS i FROM {rows}) AS k \
                 ON a.org_id = k.o AND a.unit_id = k.i WHERE a.status = 'active'"
            ),
            write_units: format!(
                "UPDATE units SET last_reading_at = v.ts, last_temperature = v.t, \
                 last_seen_at = COALESCE(v.seen, units.last_seen_at), status = v.st, \
                 status_since = v.since \
                 FROM (SELECT value->>0 AS o, value->>1 AS i, CAST(value->>2 AS BIGINT) AS ts, \
                 CAST(value->>3 AS DOUBLE PRECISION) AS t, CAST(value->>4 AS BIGINT) AS seen, \
                 value->>5 AS st, CAST(value->>6 AS BIGINT) AS since FROM {rows}) AS v \
                 WHERE units.org_id = v.o AND units.id = v.i"
            ),
            insert_alerts: format!(
                "INSERT INTO alerts (id, org_id, unit_id, site_id, alert_type, severity, message, \
                 status, triggered_at, value, threshold, resolved_at, peak_value) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, \
                 value->>6, value->>7, CAST(value->>8 AS BIGINT), \
                 CAST(value->>9 AS DOUBLE PRECISION), CAST(value->>10 AS DOUBLE PRECISION), \
                 CAST(value->>11 AS BIGINT), CAST(value->>12 AS DOUBLE PRECISION) \
                 FROM {rows} ORDER BY n"
            ),
            // Decided by `verdict` under the unit's row lock, from the stored peak.
            raise_peaks: format!(
                "UPDATE alerts SET peak_value = v.p \
                 FROM (SELECT value->>0 AS id, CAST(value->>1 AS DOUBLE PRECISION) AS p \
                 FROM {rows}) AS v WHERE alerts.id = v.id"
            ),
            resolve_alerts: format!(
                "UPDATE alerts SET status = 'resolved', resolved_at = v.at \
                 FROM (SELECT value->>0 AS id, CAST(value->>1 AS BIGINT) AS at FROM {rows}) AS v \
                 WHERE alerts.id = v.id AND alerts.status = 'active'"
            ),
            insert_outbox: format!(
                "INSERT INTO event_outbox (org_id, event, rooms, payload, created_at, lease_until) \
                 SELECT value->>0, value->>1, value->>2, value->>3, $2, $3 FROM {rows} ORDER BY n \
                 RETURNING id"
            ),
            claim_outbox: format!(
                "UPDATE event_outbox SET lease_until = $2 WHERE id IN (SELECT id FROM event_outbox \
                 WHERE lease_until <= $1 ORDER BY id LIMIT $3{skip_locked}) \
                 RETURNING id, org_id, event, rooms, payload"
            ),
            renew_outbox: format!(
                "UPDATE event_outbox SET lease_until = $2 WHERE id IN \
                 (SELECT CAST(value->>0 AS BIGINT) FROM {rows})"
            ),
            delete_outbox: format!(
                "DELETE FROM event_outbox WHERE id IN \
                 (SELECT CAST(value->>0 AS BIGINT) FROM {rows})"
            ),
            insert_pending: "INSERT INTO pending_batches (ranges, created_at, lease_until) \
                             VALUES ($1, $2, $3) RETURNING id"
                .to_string(),
            claim_pending: format!(
                "UPDATE pending_batches SET lease_until = $2 WHERE id IN (SELECT id \
                 FROM pending_batches WHERE lease_until <= $1 ORDER BY id LIMIT $3{skip_locked}) \
                 RETURNING id, ranges"
            ),
            renew_pending: format!(
                "UPDATE pending_batches SET lease_until = $2 WHERE id IN \
                 (SELECT CAST(value->>0 AS BIGINT) FROM {rows})"
            ),
            delete_pending: format!(
                "DELETE FROM pending_batches WHERE id IN \
                 (SELECT CAST(value->>0 AS BIGINT) FROM {rows})"
            ),
            pending_readings: format!(
                "SELECT r.org_id, u.site_id, r.id, r.unit_id, r.device_id, r.temperature, \
                 r.humidity, r.battery, r.signal_strength, r.recorded_at, r.source \
                 FROM (SELECT CAST(value->>0 AS BIGINT) AS lo, CAST(value->>1 AS BIGINT) AS hi \
                 FROM {rows}) AS k JOIN readings AS r ON r.id BETWEEN k.lo AND k.hi \
                 JOIN units AS u ON u.org_id = r.org_id AND u.id = r.unit_id ORDER BY r.id"
            ),
        }
    }
}

pub(super) static POSTGRES: LazyLock<Sql> = LazyLock::new(|| {
    Sql::new(
        "json_array_elements($1::json) WITH ORDINALITY AS j(value, n)",
        " FOR UPDATE OF u",
        " FOR UPDATE SKIP LOCKED",
    )
});

pub(super) static SQLITE: LazyLock<Sql> =
    LazyLock::new(|| Sql::new("(SELECT value, key AS n FROM json_each($1))", "", ""));

#[derive(sqlx::FromRow)]
struct UnitRow {
    org_id: String,
    id: String,
    site_id: String,
    name: String,
    temp_min: Option<f64>,
    temp_max: Option<f64>,
    offline_after_seconds: i64,
    status: String,
    status_since: Option<i64>,
    last_reading_at: Option<i64>,
    last_temperature: Option<f64>,
    last_seen_at: Option<i64>,
}

/// Builds the stored units from their locked rows and their open alerts.
fn stored_units(
    rows: Vec<UnitRow>,
    open: Vec<(String, String, String, String, Option<f64>, i64)>,
) -> Vec<StoredUnit> {
    let mut units: Vec<StoredUnit> = rows
        .into_iter()
        .map(|r| StoredUnit {
            org_id: r.org_id,
            unit_id: r.id,
            site_id: r.site_id,
            name: r.name,
            thresholds: Thresholds {
                min: r.temp_min,
                max: r.temp_max,
            },
            offline_after_seconds: r.offline_after_seconds,
            // A status this build does not know reads as `unknown`.
            status: r.status.parse().unwrap_or(UnitStatus::Unknown),
            status_since: r.status_since,
            last_reading_at: r.last_reading_at,
            last_temperature: r.last_temperature,
            last_seen_at: r.last_seen_at,
            open: Vec::new(),
            peaks: Vec::new(),
            triggered: Vec::new(),
        })
        .collect();
    for (org, unit, id, kind, peak, triggered_at) in open {
        if let (Some(u), Some(kind)) = (
            units
                .iter_mut()
                .find(|u| u.org_id == org && u.unit_id == unit),
            kind.parse::<AlertType>().ok(),
        ) {
            if let Some(peak) = peak {
                u.peaks.push((id.clone(), peak));
            }
            u.triggered.push((id.clone(), triggered_at));
            u.open.push((id, kind));
        }
    }
    units
}

/// Counts the alert changes of committed verdicts (`sensorwire_alerts_*_total`).
pub(super) fn observe(verdicts: &[(&StoredUnit, Verdict, Option<i64>)]) {
    for (u, v, _) in verdicts {
        for a in &v.opened {
            crate::observe::alert_opened(a.alert_type.into());
            if a.resolved_at.is_some() {
                crate::observe::alert_resolved(a.alert_type.into());
            }
        }
        for (id, _) in &v.resolved {
            if let Some((_, kind)) = u.open.iter().find(|(open, _)| open == id) {
                crate::observe::alert_resolved((*kind).into());
            }
        }
    }
}

/// The JSON parameters of one write.
struct Writes {
    units: String,
    alerts: Option<String>,
    resolved: Option<String>,
    peaks: Option<String>,
    outbox: Option<String>,
    /// Announcements in outbox order (their ids come back from the insert).
    events: Vec<(String, &'static str, String, String)>,
}

/// `verdicts`: each unit with what to write and, for readings, the server time they arrived.
fn writes(verdicts: &[(&StoredUnit, Verdict, Option<i64>)]) -> Writes {
    let mut units = Vec::with_capacity(verdicts.len());
    let mut alerts = Vec::new();
    let mut resolved = Vec::new();
    let mut peaks = Vec::new();
    let mut events = Vec::new();
    for (u, v, seen) in verdicts {
        units.push(json!([
            u.org_id,
            u.unit_id,
            v.last_reading_at,
            v.last_temperature,
            seen,
            v.status.as_ref(),
            v.status_since
        ]));
        for a in &v.opened {
            alerts.push(json!([
                a.id,
                u.org_id,
                u.unit_id,
                u.site_id,
                a.alert_type.as_ref(),
                a.severity.as_ref(),
                a.message,
                <&str>::from(if a.resolved_at.is_some() {
                    AlertStatus::Resolved
                } else {
                    AlertStatus::Active
                }),
                a.triggered_at,
                a.value,
                a.threshold,
                a.resolved_at,
                a.peak_value
            ]));
        }
        for (id, at) in &v.resolved {
            resolved.push(json!([id, at]));
        }
        for (id, peak) in &v.peaks {
            peaks.push(json!([id, peak]));
        }
        for e in &v.events {
            let rooms = serde_json::to_string(&e.rooms).unwrap_or_default();
            events.push((e.org_id.clone(), e.event, rooms, e.payload.clone()));
        }
    }
    let nonempty = |v: Vec<serde_json::Value>| (!v.is_empty()).then(|| json!(v).to_string());
    let outbox = (!events.is_empty()).then(|| {
        json!(
            events
                .iter()
                .map(|(o, e, r, p)| json!([o, e, r, p]))
                .collect::<Vec<_>>()
        )
        .to_string()
    });
    Writes {
        units: json!(units).to_string(),
        alerts: nonempty(alerts),
        resolved: nonempty(resolved),
        peaks: nonempty(peaks),
        outbox,
        events,
    }
}

/// The unit keys `[[org, unit], …]` as the JSON parameter, sorted (the lock order).
pub(super) fn unit_keys<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut keys: Vec<(&str, &str)> = keys.into_iter().collect();
    keys.sort_unstable();
    keys.dedup();
    json!(keys.iter().map(|(o, u)| json!([o, u])).collect::<Vec<_>>()).to_string()
}

/// Expands into the functions of one engine: the same bodies over that engine's connection.
macro_rules! engine_functions {
    ($db:ty, $conn:ty, $sql:expr) => {
        use sqlx::Row;

        use crate::evaluate::verdict::{StoredUnit, Verdict};
        use crate::store::unit_state::{
            LEASE_MS, OutboxEvent, UnitRow, stored_units, unit_keys, writes,
        };

        /// Locks the units' rows (in key order) and reads their state and open alerts.
        pub(in crate::store) async fn lock_units(
            conn: &mut $conn,
            keys: &str,
        ) -> Result<Vec<StoredUnit>, sqlx::Error> {
            let sql = &*$sql;
            let rows: Vec<UnitRow> = sqlx::query_as(&sql.lock_units)
                .bind(keys)
                .fetch_all(&mut *conn)
                .await?;
            // A statement of its own, after the locks are held: in PostgreSQL a subquery of the
            // locking statement would read the snapshot taken before it waited for a lock, and
            // miss an alert the other transaction had just opened.
            let open: Vec<(String, String, String, String, Option<f64>, i64)> =
                sqlx::query_as(&sql.open_alerts)
                    .bind(keys)
                    .fetch_all(&mut *conn)
                    .await?;
            Ok(stored_units(rows, open))
        }

        /// Writes verdicts and their outbox rows; the events come back with their ids.
        pub(in crate::store) async fn write_verdicts(
            conn: &mut $conn,
            verdicts: &[(&StoredUnit, Verdict, Option<i64>)],
            now: i64,
        ) -> Result<Vec<OutboxEvent>, sqlx::Error> {
            let sql = &*$sql;
            let w = writes(verdicts);
            sqlx::query(&sql.write_units)
                .bind(&w.units)
                .execute(&mut *conn)
                .await?;
            if let Some(alerts) = &w.alerts {
                sqlx::query(&sql.insert_alerts)
                    .bind(alerts)
                    .execute(&mut *conn)
                    .await?;
            }
            // Before resolving: an alert may reach its peak and resolve in one commit.
            if let Some(peaks) = &w.peaks {
                sqlx::query(&sql.raise_peaks)
                    .bind(peaks)
                    .execute(&mut *conn)
                    .await?;
            }
            if let Some(resolved) = &w.resolved {
                sqlx::query(&sql.resolve_alerts)
                    .bind(resolved)
                    .execute(&mut *conn)
                    .await?;
            }
            let Some(outbox) = &w.outbox else {
                return Ok(Vec::new());
            };
            let rows = sqlx::query(&sql.insert_outbox)
                .bind(outbox)
                .bind(now)
                .bind(now + LEASE_MS)
                .fetch_all(&mut *conn)
                .await?;
            let mut ids: Vec<i64> = rows
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<_, _>>()?;
            // Identities are handed out in insertion order, which is the events' order.
            ids.sort_unstable();
            Ok(ids
                .into_iter()
                .zip(w.events)
                .map(|(id, (org_id, event, rooms, payload))| OutboxEvent {
                    id,
                    org_id,
                    event: event.to_string(),
                    rooms,
                    payload,
                })
                .collect())
        }

        /// Marks one silent unit offline if storage agrees it is; its events when it did.
        pub(in crate::store) async fn go_offline(
            pool: &sqlx::Pool<$db>,
            begin: &'static str,
            org: &str,
            unit: &str,
            now: i64,
        ) -> Result<Vec<OutboxEvent>, sqlx::Error> {
            let mut tx = pool.begin_with(begin).await?;
            let units = lock_units(&mut tx, &unit_keys([(org, unit)])).await?;
            let Some(u) = units.first() else {
                return Ok(Vec::new());
            };
            let Some(verdict) = crate::evaluate::verdict::on_silence(u, now) else {
                return Ok(Vec::new());
            };
            let verdicts = [(u, verdict, None)];
            let events = write_verdicts(&mut tx, &verdicts, now).await?;
            tx.commit().await?;
            crate::store::unit_state::observe(&verdicts);
            Ok(events)
        }

        /// Takes up to `limit` events whose lease ran out, leasing them to this node.
        pub(in crate::store) async fn claim_outbox(
            pool: &sqlx::Pool<$db>,
            now: i64,
            limit: i64,
        ) -> Result<Vec<OutboxEvent>, sqlx::Error> {
            let mut rows: Vec<OutboxEvent> = sqlx::query_as(&$sql.claim_outbox)
                .bind(now)
                .bind(now + LEASE_MS)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.sort_unstable_by_key(|e| e.id);
            Ok(rows)
        }

        pub(in crate::store) async fn insert_pending(
            conn: &mut $conn,
            ranges: &str,
            now: i64,
        ) -> Result<i64, sqlx::Error> {
            let row = sqlx::query(&$sql.insert_pending)
                .bind(ranges)
                .bind(now)
                .bind(now + LEASE_MS)
                .fetch_one(&mut *conn)
                .await?;
            row.try_get(0)
        }

        pub(in crate::store) async fn claim_pending(
            pool: &sqlx::Pool<$db>,
            now: i64,
            limit: i64,
        ) -> Result<Vec<(i64, String)>, sqlx::Error> {
            let mut rows: Vec<(i64, String)> = sqlx::query_as(&$sql.claim_pending)
                .bind(now)
                .bind(now + LEASE_MS)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.sort_unstable();
            Ok(rows)
        }

        pub(in crate::store) async fn pending_readings(
            pool: &sqlx::Pool<$db>,
            ranges: &str,
        ) -> Result<Vec<crate::store::unit_state::PendingReading>, sqlx::Error> {
            sqlx::query_as(&$sql.pending_readings)
                .bind(ranges)
                .fetch_all(pool)
                .await
        }

        /// Renews (`Some(until)`) or deletes (`None`) leased rows.
        pub(in crate::store) async fn leases(
            pool: &sqlx::Pool<$db>,
            leased: &[crate::store::unit_state::Leased],
            until: Option<i64>,
        ) -> Result<(), sqlx::Error> {
            use crate::store::unit_state::Leased;
            let sql = &*$sql;
            let (events, readings): (Vec<_>, Vec<_>) =
                leased.iter().partition(|l| matches!(l, Leased::Event(_)));
            for (rows, renew, delete) in [
                (events, &sql.renew_outbox, &sql.delete_outbox),
                (readings, &sql.renew_pending, &sql.delete_pending),
            ] {
                if rows.is_empty() {
                    continue;
                }
                let ids = serde_json::json!(
                    rows.iter()
                        .map(|l| match l {
                            Leased::Event(id) | Leased::Readings(id) => [*id],
                        })
                        .collect::<Vec<_>>()
                )
                .to_string();
                match until {
                    Some(until) => sqlx::query(renew).bind(ids).bind(until),
                    None => sqlx::query(delete).bind(ids),
                }
                .execute(pool)
                .await?;
            }
            Ok(())
        }
    };
}

pub(super) mod postgres {
    engine_functions!(
        sqlx::Postgres,
        sqlx::PgConnection,
        crate::store::unit_state::POSTGRES
    );
}

pub(super) mod sqlite {
    engine_functions!(
        sqlx::Sqlite,
        sqlx::SqliteConnection,
        crate::store::unit_state::SQLITE
    );
}
