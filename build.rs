// `sqlx::migrate!` embeds `migrations/` at compile time, but cargo does not know that: without
// this, editing or adding a migration leaves a stale binary (sqlx's recommended build script).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
