//! Shared test harness: starts the real `sensorwire` binary on an ephemeral port with a fresh
//! database (an SQLite file in a temp dir, or a new PostgreSQL database), and stops it after.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use sensorwire::auth::{JwtVerifier, Role, UserClaims, jwt::now_secs};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const SECRET: &str = "test-secret-0123456789abcdef";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// The engines to run against: SQLite always, PostgreSQL when reachable. Under `CI=true` an
/// unreachable PostgreSQL fails the test instead of skipping it.
pub async fn engines() -> Vec<Engine> {
    match sqlx::PgPool::connect(&admin_url()).await {
        Ok(pool) => {
            pool.close().await;
            vec![Engine::Sqlite, Engine::Postgres]
        }
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("PostgreSQL is required under CI=true but unreachable: {e}");
            }
            eprintln!("SKIPPING the PostgreSQL variant: {e}");
            vec![Engine::Sqlite]
        }
    }
}

fn admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// A fresh, empty database URL for `engine`.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(engine: Engine) -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        match engine {
            Engine::Sqlite => TestDb {
                url: format!("sqlite://{}/test.db", dir.path().display()),
                pg_name: None,
                _dir: dir,
            },
            Engine::Postgres => {
                let name = format!("sw_rs_{}_{}", std::process::id(), rand_suffix());
                let pool = sqlx::PgPool::connect(&admin_url()).await.unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let base = admin_url();
                let url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
                TestDb {
                    url,
                    pg_name: Some(name),
                    _dir: dir,
                }
            }
        }
    }

    pub async fn drop_db(&self) {
        if let Some(name) = &self.pg_name {
            let pool = sqlx::PgPool::connect(&admin_url()).await.unwrap();
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&pool)
                .await
                .ok();
            pool.close().await;
        }
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos}_{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A running gateway process.
pub struct Gateway {
    pub url: String,
    pub child: Child,
    pub db: TestDb,
    pub http: reqwest::Client,
}

impl Gateway {
    pub async fn start(engine: Engine) -> Gateway {
        Self::start_with(engine, &[]).await
    }

    pub async fn start_with(engine: Engine, env: &[(&str, &str)]) -> Gateway {
        let db = TestDb::new(engine).await;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorwire"));
        cmd.arg("serve")
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("JWT_SECRET", SECRET)
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the sensorwire binary starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("sensorwire listening on ") {
                    return url.to_string();
                }
            }
            panic!("the gateway exited before listening");
        })
        .await
        .expect("the gateway starts within 30 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let gw = Gateway {
            url,
            child,
            db,
            http: reqwest::Client::new(),
        };
        gw.wait_ready().await;
        gw
    }

    async fn wait_ready(&self) {
        for _ in 0..100 {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.url)).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway never became ready");
    }

    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM, so the gateway shuts down the way it does in production.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        self.db.drop_db().await;
    }

    pub fn token(&self, org: &str, role: Role, site_ids: Option<&[&str]>) -> String {
        token(org, "user-1", role, site_ids, 3600)
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, json)
    }

    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(token), Some(body))
            .await
    }
}

pub fn token(org: &str, sub: &str, role: Role, site_ids: Option<&[&str]>, ttl: i64) -> String {
    JwtVerifier::with_secret(SECRET)
        .mint(&UserClaims {
            sub: sub.into(),
            org_id: org.into(),
            role,
            site_ids: site_ids.map(|s| s.iter().map(|x| x.to_string()).collect()),
            exp: now_secs() + ttl,
        })
        .unwrap()
}
