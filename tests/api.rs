//! The HTTP API against a real gateway process, on SQLite and on PostgreSQL.

mod common;

use common::{Engine, Gateway, engines, token};
use reqwest::Method;
use sensorwire::auth::Role;
use serde_json::{Value, json};

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
                json!({ "id": id, "siteId": site, "name": format!("Fridge {id}"), "tempMin": 0, "tempMax": 5 }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn admins_create_sites_and_units_that_each_org_reads_alone() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        seed(&gw, "acme").await;
        seed(&gw, "other").await; // the same ids in another organisation
        let viewer = gw.token("acme", Role::Viewer, None);

        let (status, sites) = gw.get("/api/sites", &viewer).await;
        assert_eq!(status, 200);
        assert_eq!(
            sites,
            json!([{ "id": "s-1", "name": "Store 1" }, { "id": "s-2", "name": "Store 2" }])
        );

        let (status, unit) = gw.get("/api/units/u-1", &viewer).await;
        assert_eq!(status, 200, "{engine:?}");
        assert_eq!(
            unit,
            json!({
                "id": "u-1", "siteId": "s-1", "name": "Fridge u-1", "tempMin": 0.0, "tempMax": 5.0,
                "offlineAfterSeconds": 300, "status": "unknown", "lastReadingAt": null,
                "lastTemperature": null
            })
        );
        assert_eq!(
            gw.get("/api/units/u-1/latest", &viewer).await,
            (200, Value::Null)
        );
        assert_eq!(
            gw.get("/api/units/u-1/readings", &viewer).await,
            (200, json!([]))
        );
        assert_eq!(gw.get("/api/alerts", &viewer).await, (200, json!([])));
        assert_eq!(
            gw.get("/api/alerts?status=active", &viewer).await,
            (200, json!([]))
        );

        // A generated id when the caller gives none.
        let admin = gw.token("acme", Role::Admin, None);
        let (status, site) = gw
            .post("/api/sites", &admin, json!({ "name": "Depot" }))
            .await;
        assert_eq!(status, 201);
        assert!(site["id"].as_str().unwrap().starts_with("s-"));

        // site_ids restricts reads to those sites.
        let restricted = gw.token("acme", Role::Viewer, Some(&["s-1"]));
        let (_, sites) = gw.get("/api/sites", &restricted).await;
        assert_eq!(ids(&sites), ["s-1"]);
        let (_, units) = gw.get("/api/units", &restricted).await;
        assert_eq!(ids(&units), ["u-1"]);
        assert_eq!(gw.get("/api/units/u-2", &restricted).await.0, 404);

        // Another organisation's unit is simply not found.
        let (_, other_units) = gw
            .get("/api/units", &gw.token("other", Role::Viewer, None))
            .await;
        assert_eq!(ids(&other_units), ["u-1", "u-2"]);
        assert_eq!(gw.get("/api/units/u-9", &viewer).await.0, 404);
        gw.stop().await;
    }
}

#[tokio::test]
async fn refusals_carry_the_contract_error_shape() {
    for engine in engines().await {
        let gw = Gateway::start_with(engine, &[("MAX_BODY_BYTES", "2048")]).await;
        seed(&gw, "acme").await;
        let admin = gw.token("acme", Role::Admin, None);
        let viewer = gw.token("acme", Role::Viewer, None);
        let expect = |(status, body): (u16, Value), want_status: u16, want_code: &str| {
            assert_eq!(status, want_status, "{engine:?}: {body}");
            assert_eq!(body["error"], want_code, "{body}");
            assert!(
                body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        };

        expect(
            gw.call(Method::GET, "/api/sites", None, None).await,
            401,
            "unauthorized",
        );
        expect(
            gw.get("/api/sites", "not-a-token").await,
            401,
            "unauthorized",
        );
        let expired = token("acme", "u", Role::Admin, None, -120);
        let (status, body) = gw.get("/api/sites", &expired).await;
        assert_eq!(
            (status, body["message"].as_str()),
            (401, Some("unauthorized: token expired"))
        );
        expect(
            gw.post("/api/sites", &viewer, json!({ "name": "x" })).await,
            403,
            "forbidden",
        );
        expect(
            gw.post(
                "/api/sites",
                &admin,
                json!({ "id": "s-1", "name": "again" }),
            )
            .await,
            409,
            "conflict",
        );
        expect(
            gw.post(
                "/api/sites",
                &admin,
                json!({ "id": "bad id!", "name": "x" }),
            )
            .await,
            422,
            "validation_failed",
        );
        expect(
            gw.post("/api/sites", &admin, json!({ "name": 42 })).await,
            422,
            "validation_failed",
        );
        expect(
            gw.post(
                "/api/units",
                &admin,
                json!({ "siteId": "nope", "name": "x" }),
            )
            .await,
            422,
            "validation_failed",
        );
        let (status, body) = gw
            .post(
                "/api/units",
                &admin,
                json!({ "siteId": "s-1", "name": "x", "tempMin": 9, "tempMax": 2 }),
            )
            .await;
        expect((status, body.clone()), 422, "validation_failed");
        assert_eq!(body["details"][0]["field"], "tempMin");
        expect(
            gw.post(
                "/api/units",
                &admin,
                json!({ "siteId": "s-1", "name": "x", "offlineAfterSeconds": 0 }),
            )
            .await,
            422,
            "validation_failed",
        );
        expect(
            gw.get("/api/units/u-1/readings?since=yesterday", &viewer)
                .await,
            422,
            "validation_failed",
        );
        expect(
            gw.get("/api/units/u-1/readings?limit=0", &viewer).await,
            422,
            "validation_failed",
        );
        expect(gw.get("/api/nope", &viewer).await, 404, "not_found");

        let malformed = gw
            .http
            .post(format!("{}/api/sites", gw.url))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body("{\"name\": ")
            .send()
            .await
            .unwrap();
        assert_eq!(malformed.status(), 400);
        assert_eq!(
            malformed.json::<Value>().await.unwrap()["error"],
            "bad_request"
        );

        let big = json!({ "name": "x".repeat(4096) });
        expect(
            gw.post("/api/sites", &admin, big).await,
            413,
            "payload_too_large",
        );

        // Nothing of a refused request was stored.
        let (_, sites) = gw.get("/api/sites", &viewer).await;
        assert_eq!(ids(&sites), ["s-1", "s-2"]);
        gw.stop().await;
    }
}

#[tokio::test]
async fn units_are_patched_and_deleted_and_sites_only_when_empty() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        seed(&gw, "acme").await;
        let admin = gw.token("acme", Role::Admin, None);

        let (status, unit) = gw
            .call(
                Method::PATCH,
                "/api/units/u-1",
                Some(&admin),
                Some(json!({ "tempMax": 8, "tempMin": null, "offlineAfterSeconds": 60 })),
            )
            .await;
        assert_eq!(status, 200, "{unit}");
        assert_eq!(
            (unit["tempMin"].clone(), unit["tempMax"].clone()),
            (Value::Null, json!(8.0))
        );
        assert_eq!(unit["offlineAfterSeconds"], 60);
        assert_eq!(unit["name"], "Fridge u-1", "absent fields are left alone");
        let (status, _) = gw
            .call(
                Method::PATCH,
                "/api/units/u-1",
                Some(&admin),
                Some(json!({ "tempMin": 20 })),
            )
            .await;
        assert_eq!(status, 422, "tempMin above the current tempMax");

        let (status, body) = gw
            .call(Method::DELETE, "/api/sites/s-1", Some(&admin), None)
            .await;
        assert_eq!((status, body["error"].as_str()), (409, Some("conflict")));
        assert_eq!(
            gw.call(Method::DELETE, "/api/units/u-1", Some(&admin), None)
                .await
                .0,
            204
        );
        assert_eq!(gw.get("/api/units/u-1", &admin).await.0, 404);
        assert_eq!(
            gw.call(Method::DELETE, "/api/units/u-1", Some(&admin), None)
                .await
                .0,
            404
        );
        assert_eq!(
            gw.call(Method::DELETE, "/api/sites/s-1", Some(&admin), None)
                .await
                .0,
            204
        );
        assert_eq!(gw.get("/api/sites/s-1", &admin).await.0, 404);
        gw.stop().await;
    }
}

#[tokio::test]
async fn api_keys_are_shown_once_stored_hashed_and_revocable() {
    for engine in engines().await {
        let gw = Gateway::start(engine).await;
        let admin = gw.token("acme", Role::Admin, None);
        let (status, created) = gw
            .post(
                "/api/keys",
                &admin,
                json!({ "name": "freezer-gw", "scopes": ["publish", "ingest"] }),
            )
            .await;
        assert_eq!(status, 201, "{created}");
        assert_eq!(created["scopes"], json!(["ingest", "publish"]));
        let key = created["key"].as_str().unwrap().to_string();
        let id = created["id"].as_str().unwrap().to_string();

        // The key authenticates (a device may not read: 403, not 401).
        let as_key = |k: &str| {
            gw.http
                .get(format!("{}/api/sites", gw.url))
                .header("x-api-key", k.to_string())
                .send()
        };
        assert_eq!(as_key(&key).await.unwrap().status(), 403);
        assert_eq!(as_key("sw_not-a-real-key").await.unwrap().status(), 401);

        // Only the hash is stored.
        const SQL: &str = "SELECT key_hash FROM api_keys";
        let stored: Vec<(String,)> = match engine {
            Engine::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&gw.db.url).await.unwrap();
                sqlx::query_as(SQL).fetch_all(&pool).await.unwrap()
            }
            Engine::Postgres => {
                let pool = sqlx::PgPool::connect(&gw.db.url).await.unwrap();
                sqlx::query_as(SQL).fetch_all(&pool).await.unwrap()
            }
        };
        assert_eq!(stored.len(), 1);
        assert_ne!(stored[0].0, key);
        assert!(!stored[0].0.contains(&key[3..]));

        assert_eq!(
            gw.call(
                Method::DELETE,
                &format!("/api/keys/{id}"),
                Some(&admin),
                None
            )
            .await
            .0,
            204
        );
        assert_eq!(
            as_key(&key).await.unwrap().status(),
            401,
            "a revoked key is refused at once"
        );
        let viewer = gw.token("acme", Role::Viewer, None);
        assert_eq!(
            gw.post("/api/keys", &viewer, json!({ "name": "x" }))
                .await
                .0,
            403
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn health_readiness_and_cors() {
    let gw = Gateway::start(Engine::Sqlite).await;
    let get = |p: &str| gw.http.get(format!("{}{p}", gw.url)).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let ready: Value = get("/readyz").await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");

    let preflight = |origin: &'static str| {
        gw.http
            .request(Method::OPTIONS, format!("{}/api/units", gw.url))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("http://localhost:5173").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://localhost:5173"
    );
    let evil = preflight("https://evil.example").await.unwrap();
    assert!(evil.headers().get("access-control-allow-origin").is_none());
    gw.stop().await;
}

fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sensorwire"));
    cmd.args(args)
        .env_remove("REDIS_URL")
        .env_remove("JWT_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_bad_setting_stops_the_start_with_one_line_naming_it() {
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("DATABASE_URL", "mysql://x")], "DATABASE_URL"),
        (&[("JWT_SECRET", "short")], "JWT_SECRET"),
        (&[("PORT", "70000")], "PORT"),
        (
            &[
                ("REDIS_URL", "redis://127.0.0.1:6379"),
                ("JWT_SECRET", "0123456789abcdef0"),
            ],
            "DATABASE_URL",
        ),
        (
            &[
                ("CORS_ORIGINS", "localhost:5173"),
                ("JWT_SECRET", "0123456789abcdef0"),
            ],
            "CORS_ORIGINS",
        ),
    ];
    for (env, setting) in cases {
        let out = run_cli(&["serve", "--port", "0"], env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} should not start");
        assert!(stderr.contains(setting), "{env:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        // clap adds a "For more information, try '--help'." hint under its own errors.
        let lines = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
            .count();
        assert_eq!(lines, 1, "one clear line, got: {stderr}");
    }
}

#[tokio::test]
async fn cli_migrates_and_creates_keys_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/cli.db", dir.path().display());
    let out = run_cli(&["migrate"], &[("DATABASE_URL", &url)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_cli(
        &[
            "apikey",
            "create",
            "--org",
            "acme",
            "--name",
            "dev",
            "--database-url",
            &url,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key:"))
        .unwrap()
        .trim()
        .to_string();
    assert!(key.starts_with("sw_"));

    let out = run_cli(
        &["token", "--org", "acme", "--role", "viewer", "--sub", "ann"],
        &[("JWT_SECRET", common::SECRET)],
    );
    let minted = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let claims = sensorwire::auth::JwtVerifier::with_secret(common::SECRET)
        .verify(&minted)
        .unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.org_id.as_str(), claims.role),
        ("ann", "acme", Role::Viewer)
    );
    let _ = dir;
}
