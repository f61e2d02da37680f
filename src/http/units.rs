//! `/api/units` (reads for any role, writes for admins) and a unit's readings.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json as JsonBody, Router};
use serde::Deserialize;

use super::sites::{resolve_id, valid_name};
use super::{Admin, AppError, AppState, Json, Query, User, parse_time_param};
use crate::auth::UserClaims;
use crate::store::{Downsample, NewUnit, ReadingsQuery, UnitRow, now_ms};
use crate::wire::{CreateUnit, SensorReading, Unit, UpdateUnit};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/units", get(list).post(create))
        .route("/api/units/{id}", get(get_one).patch(update).delete(remove))
        .route("/api/units/{id}/latest", get(latest))
        .route("/api/units/{id}/readings", get(readings))
}

/// The unit if it exists in the caller's org and lies within the caller's sites.
async fn visible_unit(app: &AppState, user: &UserClaims, id: &str) -> Result<UnitRow, AppError> {
    app.store
        .get_unit(&user.org_id, id)
        .await?
        .filter(|u| user.can_see_site(&u.site_id))
        .ok_or_else(|| AppError::NotFound(format!("no unit {id:?}")))
}

#[utoipa::path(get, path = "/api/units", tag = "units", security(("bearer" = [])),
    responses((status = 200, body = [Unit]), (status = 401, body = crate::wire::ApiError)))]
pub async fn list(
    State(app): State<AppState>,
    User(user): User,
) -> Result<JsonBody<Vec<Unit>>, AppError> {
    let units = app.store.list_units(&user.org_id).await?;
    Ok(JsonBody(
        units
            .into_iter()
            .filter(|u| user.can_see_site(&u.site_id))
            .map(Unit::from)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/units/{id}", tag = "units", security(("bearer" = [])),
    params(("id" = String, Path, description = "Unit id")),
    responses((status = 200, body = Unit), (status = 404, body = crate::wire::ApiError)))]
pub async fn get_one(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<JsonBody<Unit>, AppError> {
    Ok(JsonBody(visible_unit(&app, &user, &id).await?.into()))
}

/// The unit's newest reading, or `null` before its first.
#[utoipa::path(get, path = "/api/units/{id}/latest", tag = "units", security(("bearer" = [])),
    params(("id" = String, Path, description = "Unit id")),
    responses((status = 200, body = Option<SensorReading>), (status = 404, body = crate::wire::ApiError)))]
pub async fn latest(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<JsonBody<Option<SensorReading>>, AppError> {
    visible_unit(&app, &user, &id).await?;
    let latest = app.store.latest_reading(&user.org_id, &id).await?;
    Ok(JsonBody(latest.map(SensorReading::from)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ReadingsParams {
    /// Earliest `recordedAt` (RFC 3339), inclusive.
    since: Option<String>,
    /// Latest `recordedAt` (RFC 3339), inclusive.
    until: Option<String>,
    /// How many of the newest readings in the window (default 1000, at most 10000).
    limit: Option<i64>,
    /// For a chart of a long range (2–10000; needs `since`): at most this many readings over the
    /// whole window — every reading when it holds no more, otherwise the window is cut into
    /// `points / 2` equal spans and each span gives its lowest and highest reading, so an
    /// excursion's extreme is always among them. `limit` does not apply.
    points: Option<i64>,
}

/// A unit's readings in a time window: the newest `limit`, oldest first.
#[utoipa::path(get, path = "/api/units/{id}/readings", tag = "units", security(("bearer" = [])),
    params(("id" = String, Path, description = "Unit id"), ReadingsParams),
    responses((status = 200, body = [SensorReading]), (status = 404, body = crate::wire::ApiError),
              (status = 422, body = crate::wire::ApiError)))]
pub async fn readings(
    State(app): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
    Query(p): Query<ReadingsParams>,
) -> Result<JsonBody<Vec<SensorReading>>, AppError> {
    visible_unit(&app, &user, &id).await?;
    let limit = p.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(AppError::validation("limit", "must be between 1 and 10000"));
    }
    let q = ReadingsQuery {
        since: parse_time_param("since", p.since.as_deref())?,
        until: parse_time_param("until", p.until.as_deref())?,
        limit,
    };
    let rows = match p.points {
        None => app.store.readings(&user.org_id, &id, &q).await?,
        Some(points) => {
            if !(2..=10_000).contains(&points) {
                return Err(AppError::validation(
                    "points",
                    "must be between 2 and 10000",
                ));
            }
            let Some(since) = q.since else {
                return Err(AppError::validation("since", "is required with points"));
            };
            let until = q.until.unwrap_or_else(now_ms);
            let d = Downsample {
                since,
                until,
                buckets: points / 2,
            };
            app.store
                .readings_downsampled(&user.org_id, &id, &d)
                .await?
        }
    };
    Ok(JsonBody(
        rows.into_iter().map(SensorReading::from).collect(),
    ))
}

/// Checks thresholds and the offline timeout of a create or a patch.
fn check_thresholds(
    min: Option<f64>,
    max: Option<f64>,
    offline: Option<i64>,
) -> Result<(), AppError> {
    for (field, v) in [("tempMin", min), ("tempMax", max)] {
        if v.is_some_and(|v| !v.is_finite()) {
            return Err(AppError::validation(field, "must be a finite number"));
        }
    }
    if let (Some(min), Some(max)) = (min, max)
        && min > max
    {
        return Err(AppError::validation("tempMin", "must not be above tempMax"));
    }
    if offline.is_some_and(|s| !(1..=31_536_000).contains(&s)) {
        return Err(AppError::validation(
            "offlineAfterSeconds",
            "must be between 1 and 31536000",
        ));
    }
    Ok(())
}

#[utoipa::path(post, path = "/api/units", tag = "units", security(("bearer" = [])),
    request_body = CreateUnit,
    responses((status = 201, body = Unit), (status = 403, body = crate::wire::ApiError),
              (status = 409, body = crate::wire::ApiError), (status = 422, body = crate::wire::ApiError)))]
pub async fn create(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Json(req): Json<CreateUnit>,
) -> Result<(StatusCode, JsonBody<Unit>), AppError> {
    let id = resolve_id(req.id, "u")?;
    let name = valid_name(&req.name)?;
    check_thresholds(req.temp_min, req.temp_max, req.offline_after_seconds)?;
    let site_known = admin.can_see_site(&req.site_id)
        && app
            .store
            .get_site(&admin.org_id, &req.site_id)
            .await?
            .is_some();
    if !site_known {
        return Err(AppError::validation("siteId", "no such site"));
    }
    let unit = app
        .store
        .create_unit(
            &admin.org_id,
            NewUnit {
                id: &id,
                site_id: &req.site_id,
                name,
                temp_min: req.temp_min,
                temp_max: req.temp_max,
                offline_after_seconds: req.offline_after_seconds.unwrap_or(300),
            },
        )
        .await
        .map_err(|e| match AppError::from(e) {
            AppError::Conflict(_) => AppError::Conflict(format!("unit {id:?} already exists")),
            other => other,
        })?;
    Ok((StatusCode::CREATED, JsonBody(unit.into())))
}

/// Changes a unit's name, thresholds or offline timeout (admin); the next reading uses them.
#[utoipa::path(patch, path = "/api/units/{id}", tag = "units", security(("bearer" = [])),
    params(("id" = String, Path, description = "Unit id")), request_body = UpdateUnit,
    responses((status = 200, body = Unit), (status = 404, body = crate::wire::ApiError),
              (status = 422, body = crate::wire::ApiError)))]
pub async fn update(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Json(patch): Json<UpdateUnit>,
) -> Result<JsonBody<Unit>, AppError> {
    let current = visible_unit(&app, &admin, &id).await?;
    if let Some(name) = &patch.name {
        valid_name(name)?;
    }
    check_thresholds(
        patch.temp_min.unwrap_or(current.temp_min),
        patch.temp_max.unwrap_or(current.temp_max),
        patch.offline_after_seconds,
    )?;
    let unit = app
        .store
        .update_unit(&admin.org_id, &id, &patch)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no unit {id:?}")))?;
    app.units.invalidate(&admin.org_id, &id);
    Ok(JsonBody(unit.into()))
}

/// Deletes a unit with its readings and alerts (admin).
#[utoipa::path(delete, path = "/api/units/{id}", tag = "units", security(("bearer" = [])),
    params(("id" = String, Path, description = "Unit id")),
    responses((status = 204), (status = 404, body = crate::wire::ApiError)))]
pub async fn remove(
    State(app): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    visible_unit(&app, &admin, &id).await?;
    let deleted = app.store.delete_unit(&admin.org_id, &id).await?;
    // After the write, so a concurrent request cannot put the old entry back; a request that
    // validated against it meanwhile is refused at its commit, which reads the unit's row.
    app.units.invalidate(&admin.org_id, &id);
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::NotFound(format!("no unit {id:?}")))
    }
}
