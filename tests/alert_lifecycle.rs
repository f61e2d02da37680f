//! The alert lifecycle over HTTP against a real gateway, on SQLite and on PostgreSQL: peak and
//! duration of excursions, history filters and paging, the CSV export, acknowledgement (roles,
//! once only, notes).

mod common;

use common::{Gateway, engines, token};
use reqwest::Method;
use sensorwire::auth::Role;
use serde_json::{Value, json};

/// An hour ago, to the millisecond, plus `ms`.
fn at(base: i64, ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(base + ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

async fn seed(gw: &Gateway, org: &str) {
    let admin = gw.token(org, Role::Admin, None);
    for (id, name) in [("s-1", "Store 1"), ("s-2", "Store 2")] {
        let (status, body) = gw
            .post("/api/sites", &admin, json!({ "id": id, "name": name }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    for (id, site) in [("u-1", "s-1"), ("u-2", "s-2")] {
        let (status, body) = gw
            .post(
                "/api/units",
                &admin,
                json!({ "id": id, "siteId": site, "name": id, "tempMin": 0, "tempMax": 5 }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

/// One ingest request (one commit) per call.
async fn ingest(gw: &Gateway, tok: &str, unit: &str, readings: &[(i64, f64)], base: i64) {
    let readings: Vec<Value> = readings
        .iter()
        .map(|(ms, t)| json!({ "unitId": unit, "temperature": t, "recordedAt": at(base, *ms) }))
        .collect();
    let (status, body) = gw
        .post("/api/readings/ingest", tok, json!({ "readings": readings }))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// `GET` with the response headers.
async fn get_full(
    gw: &Gateway,
    path: &str,
    tok: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let res = gw
        .http
        .get(format!("{}{path}", gw.url))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, headers, res.text().await.unwrap())
}

fn alert_ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| a["alertId"].as_str().unwrap().to_string())
        .collect()
}

/// Three excursions: u-1 high (opened at 7, peaks at 9.5 over three commits, resolved after
/// 12.345 s), u-1 low (still active, lowest -4), u-2 high (resolved after 1 s).
async fn excursions(gw: &Gateway, org: &str, base: i64) -> (String, String, String) {
    let admin = gw.token(org, Role::Admin, None);
    ingest(gw, &admin, "u-1", &[(0, 7.0)], base).await;
    ingest(gw, &admin, "u-1", &[(1_000, 9.5), (2_000, 8.0)], base).await;
    ingest(gw, &admin, "u-1", &[(3_000, 6.0)], base).await;
    ingest(gw, &admin, "u-1", &[(12_345, 3.0)], base).await;
    ingest(gw, &admin, "u-2", &[(500, 6.0)], base).await;
    ingest(gw, &admin, "u-2", &[(1_500, 2.0)], base).await;
    ingest(gw, &admin, "u-1", &[(20_000, -2.0), (21_000, -4.0)], base).await;
    ingest(gw, &admin, "u-1", &[(22_000, -3.0)], base).await;
    let (status, list) = gw.get("/api/alerts", &admin).await;
    assert_eq!(status, 200, "{list}");
    let ids = alert_ids(&list);
    assert_eq!(ids.len(), 3, "{list}");
    // Newest first: u-1 low (t+20 s), u-2 high (t+0.5 s), u-1 high (t+0).
    (ids[2].clone(), ids[0].clone(), ids[1].clone())
}

#[tokio::test]
async fn history_has_peaks_durations_filters_pages_and_csv() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        seed(&gw, "acme").await;
        let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
        let (high, low, other) = excursions(&gw, "acme", base).await;
        let viewer = gw.token("acme", Role::Viewer, None);

        let (_, list) = gw.get("/api/alerts", &viewer).await;
        let by_id = |id: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|a| a["alertId"] == id)
                .unwrap()
                .clone()
        };
        let h = by_id(&high);
        assert_eq!(h["alertType"], "temp_high", "{engine:?}: {h}");
        assert_eq!(h["value"], 7.0);
        assert_eq!(
            h["peakValue"], 9.5,
            "{engine:?}: the peak across commits: {h}"
        );
        assert_eq!(h["durationSeconds"], 12.345, "{h}");
        assert_eq!(h["status"], "resolved");
        assert_eq!(h["acknowledgedAt"], Value::Null);
        assert_eq!(h["acknowledgedBy"], Value::Null);
        assert_eq!(h["note"], Value::Null);
        let l = by_id(&low);
        assert_eq!(l["alertType"], "temp_low");
        assert_eq!(l["peakValue"], -4.0, "{l}");
        assert_eq!(l["durationSeconds"], Value::Null, "active: no duration");
        assert_eq!(by_id(&other)["durationSeconds"], 1.0);
        assert_eq!(by_id(&other)["peakValue"], 6.0);

        // Filters.
        let q = |query: String| {
            let gw = &gw;
            let viewer = &viewer;
            async move {
                let (status, body) = gw.get(&format!("/api/alerts?{query}"), viewer).await;
                assert_eq!(status, 200, "{query}: {body}");
                alert_ids(&body)
            }
        };
        assert_eq!(q("status=active".into()).await, [low.as_str()]);
        assert_eq!(
            q("status=resolved".into()).await,
            [other.clone(), high.clone()]
        );
        assert_eq!(q("unitId=u-2".into()).await, [other.as_str()]);
        assert_eq!(q("siteId=s-1".into()).await, [low.clone(), high.clone()]);
        let enc = |ms| at(base, ms).replace(':', "%3A");
        assert_eq!(
            q(format!("since={}", enc(500))).await,
            [low.clone(), other.clone()],
            "since is inclusive"
        );
        assert_eq!(
            q(format!("until={}", enc(500))).await,
            [other.clone(), high.clone()]
        );
        assert_eq!(
            q(format!("since={}&until={}", enc(0), enc(0))).await,
            [high.as_str()]
        );

        // Paging: limit 1, following Link, all three once, the last page without a cursor.
        let mut path = "/api/alerts?limit=1".to_string();
        let mut seen = Vec::new();
        loop {
            let (status, headers, body) = get_full(&gw, &path, &viewer).await;
            assert_eq!(status, 200, "{body}");
            let page: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(page.as_array().unwrap().len(), 1, "{path}: {body}");
            seen.extend(alert_ids(&page));
            let Some(link) = headers.get("link") else {
                assert!(headers.get("x-next-cursor").is_none());
                break;
            };
            let link = link.to_str().unwrap();
            let cursor = headers["x-next-cursor"].to_str().unwrap();
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            assert!(link.contains(&format!("cursor={cursor}")), "{link}");
            assert!(link.contains("limit=1"), "the same query: {link}");
            path = link[1..link.find('>').unwrap()].to_string();
        }
        assert_eq!(seen, [low.clone(), other.clone(), high.clone()]);
        let (_, headers, _) = get_full(&gw, "/api/alerts?limit=3", &viewer).await;
        assert!(
            headers.get("x-next-cursor").is_none(),
            "exactly all: no next page"
        );

        // site_ids filter in the query: a full page, and no cursor when nothing more is visible.
        let restricted = gw.token("acme", Role::Viewer, Some(&["s-2"]));
        let (status, headers, body) = get_full(&gw, "/api/alerts?limit=1", &restricted).await;
        assert_eq!(status, 200);
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(alert_ids(&page), [other.as_str()]);
        assert!(headers.get("link").is_none(), "{headers:?}");
        // Another organisation sees none of them.
        let (_, none) = gw
            .get("/api/alerts", &gw.token("other", Role::Admin, None))
            .await;
        assert_eq!(none, json!([]));

        // Query errors are the contract's 422.
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=abc",
            "since=yesterday",
            "until=2026-13-01",
            "status=open",
            "cursor=garbage!",
        ] {
            let (status, body) = gw.get(&format!("/api/alerts?{bad}"), &viewer).await;
            assert_eq!(status, 422, "{bad}: {body}");
            assert_eq!(body["error"], "validation_failed", "{bad}: {body}");
        }

        // CSV: the same filters, every field as a column in JSON order, parsed back.
        let (status, headers, body) =
            get_full(&gw, "/api/alerts/export.csv?siteId=s-1", &viewer).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["content-type"], "text/csv; charset=utf-8");
        assert_eq!(
            headers["content-disposition"],
            "attachment; filename=\"alerts.csv\""
        );
        let mut reader = csv::Reader::from_reader(body.as_bytes());
        let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
        let json_keys: Vec<String> = {
            let text = serde_json::to_string(&list[0]).unwrap();
            let obj: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
            let mut keys: Vec<String> = obj.keys().cloned().collect();
            keys.sort_by_key(|k| text.find(&format!("\"{k}\":")).unwrap());
            keys
        };
        assert_eq!(header.len(), 16, "{header:?}");
        assert_eq!(header.len(), json_keys.len());
        let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
        assert_eq!(rows.len(), 2);
        let col = |name: &str| header.iter().position(|h| h == name).unwrap();
        assert_eq!(&rows[0][col("alertId")], low);
        assert_eq!(&rows[1][col("alertId")], high);
        assert_eq!(rows[1][col("peakValue")].parse::<f64>().unwrap(), 9.5);
        assert_eq!(
            rows[1][col("durationSeconds")].parse::<f64>().unwrap(),
            12.345
        );
        assert_eq!(
            &rows[0][col("durationSeconds")],
            "",
            "null is an empty field"
        );
        assert_eq!(&rows[1][col("message")], h["message"].as_str().unwrap());
        let (status, body) = gw.get("/api/alerts/export.csv?limit=abc", &viewer).await;
        assert_eq!((status, &body["error"]), (422, &json!("validation_failed")));
        gw.stop().await;
    }
}

#[tokio::test]
async fn acknowledge_once_by_operators_of_the_alerts_sites() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        seed(&gw, "acme").await;
        seed(&gw, "other").await;
        let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
        let (high, low, other) = excursions(&gw, "acme", base).await;
        let ack = |id: &str| format!("/api/alerts/{id}/acknowledge");
        let olga = token("acme", "olga", Role::Operator, None, 3600);
        let viewer = gw.token("acme", Role::Viewer, None);

        // Refusals first: nothing is acknowledged by them.
        let (status, body) = gw.post(&ack(&high), &viewer, json!({})).await;
        assert_eq!(
            (status, &body["error"]),
            (403, &json!("forbidden")),
            "{body}"
        );
        let admin = gw.token("acme", Role::Admin, None);
        let (_, key) = gw
            .post(
                "/api/keys",
                &admin,
                json!({ "name": "k", "scopes": ["ingest", "publish"] }),
            )
            .await;
        let (status, _) = gw
            .call(
                Method::POST,
                &ack(&high),
                Some(key["key"].as_str().unwrap()),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, 403, "API keys cannot acknowledge");
        let (status, body) = gw.post(&ack("al-nope"), &olga, json!({})).await;
        assert_eq!((status, &body["error"]), (404, &json!("not_found")));
        let other_org = token("other", "olga", Role::Admin, None, 3600);
        assert_eq!(gw.post(&ack(&high), &other_org, json!({})).await.0, 404);
        let site_2 = token("acme", "sam", Role::Operator, Some(&["s-2"]), 3600);
        assert_eq!(
            gw.post(&ack(&high), &site_2, json!({})).await.0,
            404,
            "unseen site"
        );
        let long = "x".repeat(1001);
        let (status, body) = gw.post(&ack(&high), &olga, json!({ "note": long })).await;
        assert_eq!(
            (status, &body["error"]),
            (422, &json!("validation_failed")),
            "{body}"
        );
        assert_eq!(body["details"][0]["field"], "note", "{body}");
        let (status, body) = gw.post(&ack(&high), &olga, json!({ "note": 5 })).await;
        assert_eq!(status, 422, "{body}");
        let (_, list) = gw
            .get("/api/alerts?unitId=u-1&status=resolved", &viewer)
            .await;
        assert_eq!(
            list[0]["acknowledgedAt"],
            Value::Null,
            "no refusal acknowledged it"
        );

        // Once: 200 with the Alert, then 409.
        let before = chrono::Utc::now().timestamp_millis();
        let (status, alert) = gw
            .post(
                &ack(&high),
                &olga,
                json!({ "note": "door was open, closed it" }),
            )
            .await;
        assert_eq!(status, 200, "{engine:?}: {alert}");
        assert_eq!(alert["alertId"], high.as_str());
        assert_eq!(alert["acknowledgedBy"], "olga");
        assert_eq!(alert["note"], "door was open, closed it");
        assert_eq!(alert["peakValue"], 9.5);
        let acked = chrono::DateTime::parse_from_rfc3339(alert["acknowledgedAt"].as_str().unwrap())
            .unwrap()
            .timestamp_millis();
        assert!(acked >= before - 1000, "{alert}");
        let (status, body) = gw
            .post(&ack(&high), &olga, json!({ "note": "again" }))
            .await;
        assert_eq!(
            (status, &body["error"]),
            (409, &json!("conflict")),
            "{body}"
        );
        let (status, _) = gw.post(&ack(&high), &admin, json!({})).await;
        assert_eq!(status, 409, "once, whoever asks");
        let (_, list) = gw
            .get("/api/alerts?unitId=u-1&status=resolved", &viewer)
            .await;
        assert_eq!(
            list[0], alert,
            "the list shows what the acknowledgement answered"
        );

        // Active alerts too; a note of exactly 1000 characters; the site's own operator.
        let (status, body) = gw
            .post(&ack(&low), &olga, json!({ "note": "y".repeat(1000) }))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "active");
        // No body at all: no note.
        let (status, body) = gw
            .call(Method::POST, &ack(&other), Some(&site_2), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["note"], Value::Null);
        assert_eq!(body["acknowledgedBy"], "sam");
        gw.stop().await;
    }
}

/// The chart's long ranges: `points` gives at most that many real readings over the window,
/// and the excursion's extremes are among them.
#[tokio::test]
async fn long_ranges_come_back_downsampled_with_their_extremes() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        seed(&gw, "acme").await;
        let op = gw.token("acme", Role::Operator, None);
        let viewer = gw.token("acme", Role::Viewer, None);
        let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
        // 600 readings a second apart around 3 °C, with one spike to 9.5 and one dip to -1.
        let readings: Vec<(i64, f64)> = (0..600)
            .map(|i| {
                let t = match i {
                    200 => 9.5,
                    400 => -1.0,
                    _ => 3.0 + f64::from(i % 7) / 10.0,
                };
                (i64::from(i) * 1_000, t)
            })
            .collect();
        for chunk in readings.chunks(200) {
            ingest(&gw, &op, "u-1", chunk, base).await;
        }
        let since = at(base, 0);
        let until = at(base, 600_000);
        let (status, body) = gw
            .get(
                &format!("/api/units/u-1/readings?since={since}&until={until}&points=20"),
                &viewer,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let list = body.as_array().unwrap();
        assert!(
            !list.is_empty() && list.len() <= 20,
            "{} readings",
            list.len()
        );
        let temps: Vec<f64> = list
            .iter()
            .map(|r| r["temperature"].as_f64().unwrap())
            .collect();
        assert!(temps.contains(&9.5) && temps.contains(&-1.0), "{temps:?}");
        let times: Vec<&str> = list
            .iter()
            .map(|r| r["recordedAt"].as_str().unwrap())
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first");
        // `points` needs a window and a sane count.
        for bad in [
            "/api/units/u-1/readings?points=20".to_string(),
            format!("/api/units/u-1/readings?since={since}&points=1"),
        ] {
            let (status, body) = gw.get(&bad, &viewer).await;
            assert_eq!(status, 422, "{bad}: {body}");
            assert_eq!(body["error"], "validation_failed");
        }
        gw.stop().await;
    }
}
