//! The gateway leaves no task behind: once `sensorwire::run` has returned, the runtime has as
//! many tasks alive as before it started (tests and tools run several gateways in one process,
//! and a task left over would keep working on a node that is gone). The gateway runs in-process
//! here, unlike the other tests, to count the tasks of its runtime.

mod common;

use std::time::Duration;

use clap::Parser;
use common::{Engine, TestDb};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    serve: sensorwire::config::ServeArgs,
}

/// Runs a gateway on `database_url` (and Redis) for a moment, then asks it to stop; returns once
/// `run` has.
async fn run_once(database_url: &str, redis_url: Option<&str>) {
    let mut argv = vec![
        "sensorwire",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--database-url",
        database_url,
        "--jwt-secret",
        common::SECRET,
    ];
    if let Some(url) = redis_url {
        argv.extend(["--redis-url", url]);
    }
    let args = Args::parse_from(argv);
    let config = sensorwire::Config::from_args(args.serve).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(sensorwire::run(config, listener, async {
        stopped.await.ok();
    }));
    // Long enough for every task to have started and ticked (the sweep, the monitor's timer).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), gateway)
        .await
        .expect("the gateway stops within 20 s")
        .unwrap()
        .expect("a clean stop");
}

/// Tasks of the runtime alive after `run` returned, compared with before it started.
async fn tasks_left(database_url: &str, redis_url: Option<&str>) -> (usize, usize) {
    let metrics = tokio::runtime::Handle::current().metrics();
    // The harness's own tasks (the pool that created the database) end first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = metrics.num_alive_tasks();
    run_once(database_url, redis_url).await;
    // A task aborted or ended is counted out as soon as the runtime has released it.
    let mut alive = metrics.num_alive_tasks();
    for _ in 0..100 {
        if alive <= before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        alive = metrics.num_alive_tasks();
    }
    (before, alive)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_outlives_the_gateway() {
    if std::env::var_os("REDIS_URL").is_some() {
        // `Args` reads the environment like the binary does; this test is of one node.
        eprintln!("SKIPPING: REDIS_URL is set in the environment");
        return;
    }
    let db = TestDb::new(Engine::Sqlite).await;
    let (before, after) = tasks_left(&db.url, None).await;
    // At most: a task of the harness alive before (a database pool's) may have ended meanwhile.
    assert!(
        after <= before,
        "tasks left running after `run` returned: {after} alive, {before} before"
    );
    db.drop_db().await;
}

/// The same with Redis and PostgreSQL: the Redis watch, resubscribers, relay and advertiser are
/// stopped, and the Redis clients closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_outlives_a_cluster_node() {
    let redis = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let unreachable = !common::engines().await.contains(&Engine::Postgres)
        || tokio::net::TcpStream::connect(redis.trim_start_matches("redis://"))
            .await
            .is_err();
    if unreachable {
        // `common::engines` already fails under CI=true without PostgreSQL; so must Redis.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Redis ({redis}) is required under CI=true but unreachable"
        );
        eprintln!("SKIPPING: PostgreSQL or Redis ({redis}) unreachable");
        return;
    }
    let db = TestDb::new(Engine::Postgres).await;
    let (before, after) = tasks_left(&db.url, Some(&redis)).await;
    // At most: a task of the harness alive before (a database pool's) may have ended meanwhile.
    assert!(
        after <= before,
        "tasks left running after `run` returned: {after} alive, {before} before"
    );
    db.drop_db().await;
}
