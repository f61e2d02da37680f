//! The shared engine: PostgreSQL, for one or many nodes.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;

pub(super) static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

pub(super) async fn connect(url: &str) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(16)
        // Fail fast when the database is gone, so requests get a 503 instead of hanging.
        .acquire_timeout(Duration::from_secs(3))
        .connect(url)
        .await
}
