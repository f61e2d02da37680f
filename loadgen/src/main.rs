//! `sensorwire-loadgen`: drives a running sensorwire gateway the way production does and prints
//! one JSON line per scenario on stdout (progress on stderr).
//!
//! It does not start gateways: `bench/load.sh` (`make bench-load`) starts them with a fresh
//! database and passes their URLs and pids. Scenarios:
//!
//! - `idle`: many Socket.io connections over many organisations, held; server RSS per connection.
//! - `fanout`: the same clients, devices posting readings at a set rate through the ingest API;
//!   every reading must reach every client of its organisation exactly once, inside a
//!   `sensor:readings:batch`; latency from `recordedAt` (set at send time) to arrival.
//! - `ingest`: concurrent posters of large requests, no clients: durable readings per second.
//! - `two-node`: `fanout` against several gateways sharing Redis and PostgreSQL, clients split
//!   over them; compared with a one-node `fanout` line given by `--baseline`.
//! - `compare`: no load; reads the `idle` and `fanout` lines of a run (`--baseline FILE`) and
//!   prints sensorwire's figures as ratios to the reference servers' (`--server-name floor`,
//!   `node`) measured in the same run.
//!
//! `idle` and `fanout` also drive the reference servers of `bench/`: the Node socket.io server
//! (`--protocol socketio`, as sensorwire) and the minimal Rust floor (`--protocol raw`: a plain
//! WebSocket, one batch JSON object per text frame).

#![recursion_limit = "256"]

mod gateway;
mod sio;
mod stats;
mod sys;
mod time;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use gateway::{Org, Posted, Rng};
use stats::{Percentiles, percentiles, round1, round2};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Idle,
    Fanout,
    Ingest,
    TwoNode,
    Compare,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Ingest => "ingest",
            Scenario::TwoNode => "two-node",
            Scenario::Compare => "compare",
        }
    }
}

/// Scale flags left unset take the scenario's full value, or its `--quick` value.
#[derive(Debug, Parser)]
#[command(version, about = "Load generator for sensorwire (see bench/README.md)")]
struct Args {
    /// What to run.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Gateway base URL(s), comma-separated (`http://127.0.0.1:PORT`); two-node needs several
    /// (every scenario but compare needs one).
    #[arg(long, value_delimiter = ',')]
    url: Vec<String>,
    /// What the server speaks: Socket.io v4 (sensorwire, the Node reference) or a plain
    /// WebSocket at `/ws?token=` with one batch JSON object per text frame (the Rust floor).
    #[arg(long, value_enum, default_value = "socketio")]
    protocol: sio::Protocol,
    /// The server measured, printed as `server` in the line (`sensorwire`, `node`, `floor`);
    /// compare: the one whose figures are divided by the others'.
    #[arg(long, default_value = "sensorwire")]
    server_name: String,
    /// The gateways' pids, for CPU and RSS from /proc (same order as --url).
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// redis-server's pid (two-node), for its CPU.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The gateways' HS256 secret, to mint admin and dashboard tokens (every scenario but
    /// compare).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true, default_value = "")]
    jwt_secret: String,
    /// The database engine the gateways run on (reported only; the references: `memory`).
    /// compare: the engine of the lines of `--server-name` to compare.
    #[arg(long, default_value = "sqlite")]
    engine: String,
    /// Small scale and short durations (about 1–2 minutes for every scenario together).
    #[arg(long)]
    quick: bool,
    /// Socket.io clients [idle, fanout: 10000; quick 2000].
    #[arg(long)]
    clients: Option<usize>,
    /// Organisations [idle, fanout: 100, quick 20; ingest: one per poster].
    #[arg(long)]
    orgs: Option<usize>,
    /// Units over all organisations [fanout: 1000, quick 200; ingest: 50 per poster].
    #[arg(long)]
    units: Option<usize>,
    /// Readings per second posted over all organisations [fanout: 2000 (what Node.js socket.io, one core, still delivers exactly once at 10,000 clients), quick 1000].
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of posting [fanout: 60, quick 15; ingest: 20, quick 5].
    #[arg(long)]
    duration: Option<f64>,
    /// fanout: each organisation's device posts every this many ms (the readings of the
    /// interval in one request).
    #[arg(long, default_value_t = 200)]
    post_interval_ms: u64,
    /// idle: seconds to hold the connections after the last one connected [10, quick 5].
    #[arg(long)]
    hold: Option<f64>,
    /// ingest: concurrent posters, each waiting for its answer before the next request.
    #[arg(long, default_value_t = 10)]
    posters: usize,
    /// ingest: readings per request (the performance goal is stated for 1,000).
    #[arg(long, default_value_t = 1000)]
    request_size: usize,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// The gateways' FLUSH_INTERVAL_MS (for the drain and the latency target).
    #[arg(long, default_value_t = 1000)]
    flush_interval_ms: u64,
    /// Worker threads holding the Socket.io clients (posting has its own thread).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// A shell command printing the number of stored readings (checked against `accepted`).
    #[arg(long)]
    verify_cmd: Option<String>,
    /// two-node: a file of earlier JSON lines; the last one-node `fanout` line of the same
    /// engine is the comparison. compare: the run's JSON lines.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

impl Args {
    fn pick<T: Copy>(&self, v: Option<T>, full: T, quick: T) -> T {
        v.unwrap_or(if self.quick { quick } else { full })
    }
    fn addrs(&self) -> Vec<Arc<str>> {
        self.url
            .iter()
            .map(|u| {
                let hostport = u
                    .trim_start_matches("http://")
                    .trim_start_matches("ws://")
                    .trim_end_matches('/');
                Arc::from(hostport)
            })
            .collect()
    }
    fn base(&self, node: usize) -> String {
        self.url[node].trim_end_matches('/').to_string()
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.scenario == Scenario::Compare {
        println!("{}", ordered(&compare(&args)?));
        return Ok(());
    }
    if args.url.is_empty() {
        bail!("--url is required (every scenario but compare)");
    }
    if args.jwt_secret.is_empty() {
        bail!("--jwt-secret (or JWT_SECRET) is required (every scenario but compare)");
    }
    if args.scenario == Scenario::TwoNode && args.url.len() < 2 {
        bail!("two-node needs --url with at least two gateways");
    }
    if !args.server_pid.is_empty() && args.server_pid.len() != args.url.len() {
        bail!("--server-pid needs one pid per --url");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let mut line = rt.block_on(async {
        match args.scenario {
            Scenario::Idle => idle(&args).await,
            Scenario::Fanout | Scenario::TwoNode => fanout(&args).await,
            Scenario::Ingest => ingest(&args).await,
            Scenario::Compare => unreachable!("handled above"),
        }
    })?;
    line["server"] = json!(args.server_name);
    println!("{}", ordered(&line));
    // Thousands of client tasks may still be closing: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// The order of the fields in the printed line (serde_json's map is sorted by key; the shape of
/// a scenario reads better from its name down). Fields not listed follow, sorted.
const FIELD_ORDER: &[&str] = &[
    "scenario",
    "server",
    "engine",
    "references",
    "idle",
    "fanout",
    "nodes",
    "clients",
    "orgs",
    "units",
    "posters",
    "readings_per_request",
    "flush_interval_ms",
    "connections_held",
    "connect_errors",
    "disconnected",
    "connect_s",
    "connects_per_s",
    "server_rss_before_mib",
    "server_rss_connected_mib",
    "server_rss_mib",
    "server_rss_per_connection_kib",
    "target_rss_per_connection_kib",
    "target_met",
    "server_rss_end_mib",
    "server_rss_peak_mib",
    "target_readings_per_s",
    "post_interval_ms",
    "duration_s",
    "requests",
    "ok_requests",
    "readings_sent",
    "readings_accepted",
    "accepted",
    "duplicates",
    "accepted_per_s",
    "errors",
    "post_errors",
    "post_late_ticks",
    "post_skipped_ticks",
    "post_latency_ms",
    "request_latency_ms",
    "stored",
    "stored_matches_accepted",
    "expected_deliveries",
    "received_deliveries",
    "deliveries_per_s",
    "completeness",
    "exactly_once",
    "clients_exact",
    "clients_incomplete",
    "clients_wrong_set",
    "missing_deliveries",
    "extra_deliveries",
    "received_per_node",
    "batch_events",
    "bad_batch_events",
    "broadcasts",
    "latency_ms",
    "drain_s",
    "server_cpu_connect_s",
    "hold",
    "cpu",
    "server_cpu_s_per_million_deliveries",
    "redis_cpu_s",
    "targets",
    "vs_one_node",
    // compare: the servers' figures, then the ratios.
    "sensorwire",
    "node",
    "floor",
    "vs_node",
    "vs_floor",
    "minus_floor_ms",
    "le_floor_plus_100ms",
];

/// Nested objects too (unlisted keys keep serde_json's sorted order).
fn ordered(line: &Value) -> String {
    let map = match line {
        Value::Object(map) => map,
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(ordered).collect();
            return format!("[{}]", items.join(","));
        }
        other => return other.to_string(),
    };
    let mut keys: Vec<&String> = map.keys().collect();
    let rank = |k: &str| {
        FIELD_ORDER
            .iter()
            .position(|f| *f == k)
            .unwrap_or(usize::MAX)
    };
    keys.sort_by_key(|k| (rank(k), k.as_str()));
    let fields: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:{}", Value::from(k.as_str()), ordered(&map[k.as_str()])))
        .collect();
    format!("{{{}}}", fields.join(","))
}

fn log(msg: impl AsRef<str>) {
    eprintln!("loadgen: {}", msg.as_ref());
}

/// CPU counters at one instant: the gateways, Redis, this process, the whole machine.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    server: f64,
    redis: f64,
    own: f64,
    machine: f64,
}

impl Cpu {
    fn now(a: &Args) -> Cpu {
        Cpu {
            at: Instant::now(),
            server: sys::cpu_seconds_all(&a.server_pid),
            redis: a.redis_pid.and_then(sys::cpu_seconds).unwrap_or(0.0),
            own: sys::cpu_seconds(sys::self_pid()).unwrap_or(0.0),
            machine: sys::machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// The window from `self` to `end` as JSON fields.
    fn window(&self, end: &Cpu) -> (f64, Value) {
        let secs = (end.at - self.at).as_secs_f64();
        let server = end.server - self.server;
        let own = end.own - self.own;
        let redis = end.redis - self.redis;
        let machine = end.machine - self.machine;
        let v = json!({
            "window_s": round2(secs),
            "server_cpu_s": round2(server),
            "server_cpu_cores": round2(server / secs),
            "loadgen_cpu_s": round2(own),
            "machine_busy_cores": round2(machine / secs),
            "other_processes_cpu_cores": round2(((machine - server - own - redis) / secs).max(0.0)),
        });
        (server, v)
    }
}

fn pct_json(p: &Percentiles) -> Value {
    json!({ "p50": p.p50, "p95": p.p95, "p99": p.p99, "max": p.max })
}

fn mib(kib: u64) -> f64 {
    round1(kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Clients

struct Clients {
    handles: Vec<JoinHandle<sio::Outcome>>,
    stop: watch::Sender<bool>,
    shared: Arc<sio::Shared>,
    connect_s: f64,
    /// Clients of each organisation.
    planned: Vec<u64>,
}

/// Connects `n` dashboards: client i belongs to organisation i mod orgs and connects to node
/// (i / orgs) mod nodes, so every organisation's clients are split evenly over the nodes.
async fn connect_clients(a: &Args, orgs: &[Org], n: usize) -> Result<Clients> {
    let addrs = a.addrs();
    let shared = sio::Shared::new();
    let (stop, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
    let mut planned = vec![0u64; orgs.len()];
    let started = Instant::now();
    log(format!(
        "connecting {n} clients over {} organisation(s) to {} node(s)",
        orgs.len(),
        addrs.len()
    ));
    let handles = (0..n)
        .map(|i| {
            let org = i % orgs.len();
            let node = (i / orgs.len()) % addrs.len();
            planned[org] += 1;
            let token = gateway::mint(
                &a.jwt_secret,
                &format!("dash-{i}"),
                &orgs[org].id,
                "viewer",
                6 * 3600,
            );
            tokio::spawn(sio::run(
                addrs[node].clone(),
                a.protocol,
                token,
                org as u32,
                node as u16,
                gate.clone(),
                shared.clone(),
                stop_rx.clone(),
            ))
        })
        .collect();
    let mut last_report = Instant::now();
    loop {
        let done = shared.connected.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= n as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("connecting took more than 10 minutes");
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            log(format!("  {done}/{n} connected or refused"));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = started.elapsed().as_secs_f64();
    log(format!(
        "{} connected, {} refused in {connect_s:.1} s",
        shared.connected.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed)
    ));
    Ok(Clients {
        handles,
        stop,
        shared,
        connect_s,
        planned,
    })
}

async fn stop_clients(c: Clients) -> Vec<sio::Outcome> {
    c.stop.send(true).ok();
    let mut out = Vec::with_capacity(c.handles.len());
    for h in c.handles {
        if let Ok(o) = h.await {
            out.push(o);
        }
    }
    out
}

fn error_counts(outcomes: &[sio::Outcome]) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut connect = BTreeMap::new();
    let mut lost = BTreeMap::new();
    for o in outcomes {
        if let Some(e) = &o.connect_error {
            *connect.entry(e.clone()).or_insert(0) += 1;
        }
        if let Some(e) = &o.lost {
            *lost
                .entry(e.chars().take(80).collect::<String>())
                .or_insert(0) += 1;
        }
    }
    (connect, lost)
}

// ---------------------------------------------------------------------------------------------
// Scenario: idle

async fn idle(a: &Args) -> Result<Value> {
    let n = a.pick(a.clients, 10_000, 2_000);
    let org_count = a.pick(a.orgs, 100, 20);
    let hold = a.pick(a.hold, 10.0, 5.0);
    let http = gateway::http_client(16)?;
    let orgs = gateway::create_orgs(
        &http,
        &a.base(0),
        &a.jwt_secret,
        "idle",
        org_count,
        org_count,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = sys::rss_kib_all(&a.server_pid);
    let own_base = sys::status_kib(sys::self_pid(), "VmRSS").unwrap_or(0);
    let cpu_connect0 = Cpu::now(a);
    let clients = connect_clients(a, &orgs, n).await?;
    let cpu_connect1 = Cpu::now(a);
    log(format!("holding for {hold} s"));
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let cpu_hold = Cpu::now(a);
    let rss = sys::rss_kib_all(&a.server_pid);
    let hwm: u64 = a
        .server_pid
        .iter()
        .filter_map(|p| sys::status_kib(*p, "VmHWM"))
        .sum();
    let own = sys::status_kib(sys::self_pid(), "VmRSS").unwrap_or(0);
    let held = clients.shared.connected.load(Ordering::Relaxed);
    let connect_s = clients.connect_s;
    let outcomes = stop_clients(clients).await;
    let (connect_errors, lost) = error_counts(&outcomes);
    let per_conn = (rss.saturating_sub(rss_base)) as f64 / held.max(1) as f64;
    let (connect_cpu, _) = cpu_connect0.window(&cpu_connect1);
    let (_, hold_window) = cpu_connect1.window(&cpu_hold);
    Ok(json!({
        "scenario": "idle",
        "engine": a.engine,
        "nodes": a.url.len(),
        "clients": n,
        "orgs": org_count,
        "connections_held": held,
        "connect_errors": connect_errors,
        "disconnected": lost,
        "connect_s": round2(connect_s),
        "connects_per_s": round1(held as f64 / connect_s),
        "server_cpu_connect_s": round2(connect_cpu),
        "server_rss_before_mib": mib(rss_base),
        "server_rss_mib": mib(rss),
        "server_rss_peak_mib": mib(hwm),
        "server_rss_per_connection_kib": round2(per_conn),
        "target_rss_per_connection_kib": 16,
        "target_met": per_conn <= 16.0 && held == n as u64,
        "hold": hold_window,
        "loadgen_rss_per_connection_kib": round2(own.saturating_sub(own_base) as f64 / held.max(1) as f64),
    }))
}

// ---------------------------------------------------------------------------------------------
// Scenario: fanout (and two-node)

/// What the posting thread reports.
struct PostRun {
    per_org: Vec<Posted>,
    schedule_s: f64,
    late_ticks: u64,
    skipped_ticks: u64,
}

/// Runs the devices on a thread of their own (a current-thread runtime), so a busy client side
/// does not delay the posting schedule. Organisation o posts to node o mod nodes every
/// `interval`, phases staggered over the interval, the readings of that interval in one request.
fn post_at_rate(
    a: &Args,
    orgs: &[Org],
    rate: f64,
    duration: f64,
) -> std::thread::JoinHandle<Result<PostRun>> {
    let urls: Vec<String> = (0..a.url.len())
        .map(|n| format!("{}/api/readings/ingest", a.base(n)))
        .collect();
    let orgs = orgs.to_vec();
    let interval = Duration::from_millis(a.post_interval_ms.max(1));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let http = gateway::http_client(64)?;
            let per_tick = rate * interval.as_secs_f64() / orgs.len() as f64;
            let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
            let deadline = t0 + Duration::from_secs_f64(duration);
            let results: Vec<Arc<Mutex<Posted>>> = orgs
                .iter()
                .map(|_| Arc::new(Mutex::new(Posted::default())))
                .collect();
            let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let skipped = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut devices = tokio::task::JoinSet::new();
            for (o, org) in orgs.into_iter().enumerate() {
                let url = urls[o % urls.len()].clone();
                let http = http.clone();
                let into = results[o].clone();
                let (late, skipped) = (late.clone(), skipped.clone());
                let phase = interval.mul_f64(o as f64 / results.len() as f64);
                devices.spawn(async move {
                    let mut tick = tokio::time::interval_at(t0 + phase, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    let inflight = Arc::new(Semaphore::new(16));
                    let mut requests = tokio::task::JoinSet::new();
                    let mut rng = Rng::new(o as u64 + 1);
                    let (mut owed, mut cursor, mut last_ms) = (0.0f64, 0usize, 0i64);
                    loop {
                        let scheduled = tick.tick().await;
                        if scheduled >= deadline {
                            break;
                        }
                        if scheduled.elapsed() > interval {
                            late.fetch_add(1, Ordering::Relaxed);
                        }
                        owed += per_tick;
                        let n = owed.floor() as usize;
                        if n == 0 {
                            continue;
                        }
                        owed -= n as f64;
                        let Ok(permit) = inflight.clone().try_acquire_owned() else {
                            skipped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        // recordedAt = send time; never the same millisecond twice per device.
                        let at = time::now_ms().max(last_ms + 1);
                        last_ms = at;
                        let body = gateway::ingest_body(&org.units, cursor, n, at, &mut rng);
                        cursor = (cursor + n) % org.units.len();
                        let (http, url, key, into) =
                            (http.clone(), url.clone(), org.key.clone(), into.clone());
                        requests.spawn(async move {
                            let mut one = Posted::default();
                            gateway::post_readings(&http, &url, &key, body, n as u64, &mut one)
                                .await;
                            into.lock().expect("posted").merge(one);
                            drop(permit);
                        });
                        while requests.try_join_next().is_some() {}
                    }
                    while requests.join_next().await.is_some() {}
                });
            }
            while devices.join_next().await.is_some() {}
            let per_org = results
                .into_iter()
                .map(|r| std::mem::take(&mut *r.lock().expect("posted")))
                .collect();
            Ok(PostRun {
                per_org,
                schedule_s: duration,
                late_ticks: late.load(Ordering::Relaxed),
                skipped_ticks: skipped.load(Ordering::Relaxed),
            })
        })
    })
}

/// The readings each organisation's clients must receive: how many, and the sum of their id
/// hashes (each stored id once, whatever the duplicates).
fn expected(p: &Posted) -> (u64, u64) {
    let mut ids = p.id_hashes.clone();
    ids.sort_unstable();
    ids.dedup();
    (
        ids.len() as u64,
        ids.iter().fold(0u64, |s, h| s.wrapping_add(*h)),
    )
}

async fn broadcasts(http: &reqwest::Client, a: &Args) -> Option<f64> {
    let mut sum = 0.0;
    for n in 0..a.url.len() {
        sum += gateway::metric(
            http,
            &a.base(n),
            "sensorwire_events_emitted_total",
            "event=\"sensor:readings:batch\"",
        )
        .await?;
    }
    Some(sum)
}

fn verify_stored(a: &Args, accepted: u64) -> Value {
    let Some(cmd) = &a.verify_cmd else {
        return json!({ "stored": null, "stored_matches_accepted": null });
    };
    let out = std::process::Command::new("sh").arg("-c").arg(cmd).output();
    let stored = out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok());
    json!({ "stored": stored, "stored_matches_accepted": stored.map(|s| s == accepted) })
}

async fn fanout(a: &Args) -> Result<Value> {
    let n = a.pick(a.clients, 10_000, 2_000);
    let org_count = a.pick(a.orgs, 100, 20);
    let unit_count = a.pick(a.units, 1_000, 200);
    let rate = a.pick(a.rate, 2_000.0, 1_000.0);
    let duration = a.pick(a.duration, 60.0, 15.0);
    let nodes = a.url.len();
    let flush = a.flush_interval_ms as f64;
    let http = gateway::http_client(16)?;
    let orgs = gateway::create_orgs(
        &http,
        &a.base(0),
        &a.jwt_secret,
        "org",
        org_count,
        unit_count,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_base = sys::rss_kib_all(&a.server_pid);
    let clients = connect_clients(a, &orgs, n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = sys::rss_kib_all(&a.server_pid);
    let shared = clients.shared.clone();
    let broadcasts0 = broadcasts(&http, a).await;

    log(format!("posting {rate} readings/s for {duration} s"));
    let cpu0 = Cpu::now(a);
    shared.timing.store(true, Ordering::Relaxed);
    let poster = post_at_rate(a, &orgs, rate, duration);
    let run = tokio::task::spawn_blocking(move || poster.join())
        .await?
        .map_err(|_| anyhow::anyhow!("posting thread panicked"))??;
    let posting_done = Instant::now();

    // The deliveries owed: each organisation's stored readings, to each of its clients.
    let exp: Vec<(u64, u64)> = run.per_org.iter().map(expected).collect();
    let expected_total: u64 = exp
        .iter()
        .zip(&clients.planned)
        .map(|((count, _), clients)| count * clients)
        .sum();
    // Drain: until everything arrived, or nothing arrived for three flush intervals + 2 s.
    let stall = Duration::from_millis(3 * a.flush_interval_ms + 2000);
    let (mut last, mut last_change) = (shared.deliveries.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = shared.deliveries.load(Ordering::Relaxed);
        if now >= expected_total
            || last_change.elapsed() > stall
            || posting_done.elapsed() > Duration::from_secs(120)
        {
            break;
        }
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu1 = Cpu::now(a);
    let drain_s = posting_done.elapsed().as_secs_f64();
    let broadcasts1 = broadcasts(&http, a).await;
    let rss_end = sys::rss_kib_all(&a.server_pid);
    let hwm: u64 = a
        .server_pid
        .iter()
        .filter_map(|p| sys::status_kib(*p, "VmHWM"))
        .sum();
    let held = shared.connected.load(Ordering::Relaxed);
    let connect_s = clients.connect_s;
    let latency = shared.latency.summary();
    let batch_events = shared.batch_events.load(Ordering::Relaxed);
    let bad_events = shared.bad_events.load(Ordering::Relaxed);
    let outcomes = stop_clients(clients).await;
    let (connect_errors, lost) = error_counts(&outcomes);

    // Exactly once, per client: its count and id-hash sum against its organisation's.
    let (mut received, mut missing, mut extra) = (0u64, 0u64, 0u64);
    let (mut exact, mut wrong_set, mut incomplete) = (0u64, 0u64, 0u64);
    let mut per_node = vec![json!({ "received": 0, "missing": 0 }); nodes];
    for o in outcomes.iter().filter(|o| o.connected) {
        let (count, sum) = exp[o.org as usize];
        let node = &mut per_node[o.node as usize];
        node["received"] = json!(node["received"].as_u64().unwrap_or(0) + o.received);
        node["missing"] =
            json!(node["missing"].as_u64().unwrap_or(0) + count.saturating_sub(o.received));
        received += o.received;
        missing += count.saturating_sub(o.received);
        extra += o.received.saturating_sub(count);
        if o.received == count && o.id_hash_sum == sum {
            exact += 1;
        } else if o.received == count {
            wrong_set += 1;
        } else {
            incomplete += 1;
        }
    }
    // Deliveries owed to the clients that never connected count as missing too.
    let never: u64 = outcomes
        .iter()
        .filter(|o| !o.connected)
        .map(|o| exp[o.org as usize].0)
        .sum();
    let mut posted = Posted::default();
    for p in run.per_org {
        posted.merge(p);
    }
    let stored = verify_stored(a, posted.accepted);
    let post_latency = percentiles(std::mem::take(&mut posted.latencies_ms));
    let (server_cpu, window) = cpu0.window(&cpu1);
    let redis_cpu = cpu1.redis - cpu0.redis;
    let window_s = (cpu1.at - cpu0.at).as_secs_f64();
    let per_million = server_cpu / (received as f64 / 1e6).max(1e-9);
    let completeness = if expected_total == 0 {
        0.0
    } else {
        received.min(expected_total) as f64 / expected_total as f64
    };
    let exactly_once =
        missing == 0 && extra == 0 && wrong_set == 0 && never == 0 && expected_total > 0;
    let p99_target = flush + 50.0;
    let emitted = match (broadcasts0, broadcasts1) {
        (Some(b0), Some(b1)) => Some(b1 - b0),
        _ => None,
    };
    let mut line = json!({
        "scenario": a.scenario.name(),
        "engine": a.engine,
        "nodes": nodes,
        "clients": n,
        "orgs": org_count,
        "units": unit_count,
        "flush_interval_ms": a.flush_interval_ms,
        "connections_held": held,
        "connect_errors": connect_errors,
        "disconnected": lost,
        "connect_s": round2(connect_s),
        "server_rss_before_mib": mib(rss_base),
        "server_rss_connected_mib": mib(rss_connected),
        "server_rss_per_connection_kib": round2(rss_connected.saturating_sub(rss_base) as f64 / held.max(1) as f64),
        "server_rss_end_mib": mib(rss_end),
        "server_rss_peak_mib": mib(hwm),
        "target_readings_per_s": rate,
        "post_interval_ms": a.post_interval_ms,
        "duration_s": duration,
        "requests": posted.requests,
        "readings_sent": posted.readings_sent,
        "readings_accepted": posted.accepted,
        "duplicates": posted.duplicates,
        "accepted_per_s": round1(posted.accepted as f64 / run.schedule_s),
        "post_errors": posted.errors,
        "post_late_ticks": run.late_ticks,
        "post_skipped_ticks": run.skipped_ticks,
        "post_latency_ms": pct_json(&post_latency),
        "stored": stored["stored"],
        "stored_matches_accepted": stored["stored_matches_accepted"],
        "expected_deliveries": expected_total,
        "received_deliveries": received,
        "deliveries_per_s": round1(received as f64 / run.schedule_s),
        "completeness": (completeness * 1e6).round() / 1e6,
        "exactly_once": exactly_once,
        "clients_exact": exact,
        "clients_incomplete": incomplete,
        "clients_wrong_set": wrong_set,
        "missing_deliveries": missing + never,
        "extra_deliveries": extra,
        "batch_events": batch_events,
        "bad_batch_events": bad_events,
        "broadcasts": emitted,
        "latency_ms": pct_json(&latency),
        "drain_s": round2(drain_s),
        "cpu": window,
        "server_cpu_s_per_million_deliveries": round2(per_million),
        "targets": {
            "completeness_100": exactly_once,
            "p99_le_flush_plus_50ms": latency.p99.is_some_and(|p| p <= p99_target),
            "p99_over_target_ms": latency.p99.map(|p| (p - p99_target).max(0.0)),
            "server_cpu_le_0_5_core": server_cpu / window_s <= 0.5,
        },
    });
    if nodes > 1 {
        line["received_per_node"] = json!(per_node);
    }
    if a.redis_pid.is_some() {
        line["redis_cpu_s"] = json!(round2(redis_cpu));
    }
    if a.scenario == Scenario::TwoNode {
        line["vs_one_node"] = compare_with_baseline(a, &line, server_cpu + redis_cpu);
    }
    Ok(line)
}

/// The two-node line against the one-node `fanout` line of the same engine in `--baseline`:
/// throughput, latency and CPU ratios, and the CPU the Redis adapter adds per broadcast.
fn compare_with_baseline(a: &Args, line: &Value, cpu_with_redis: f64) -> Value {
    let Some(path) = &a.baseline else {
        return Value::Null;
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let base = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["scenario"] == "fanout" && v["engine"] == a.engine && v["nodes"] == 1);
    let Some(b) = base else {
        return json!({ "note": format!("no one-node fanout line for {} in {}", a.engine, path.display()) });
    };
    let f = |v: &Value, k: &str| v[k].as_f64();
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(round2(x / y)),
        _ => None,
    };
    let base_cpu = b["cpu"]["server_cpu_s"].as_f64();
    let base_broadcasts = b["broadcasts"].as_f64();
    // The CPU that two gateways and Redis spend beyond what one gateway spent on the same load,
    // per distinct broadcast (one-node count: with two nodes the counter also counts the events
    // a node relays for the other).
    let adapter_us = match (base_cpu, base_broadcasts) {
        (Some(c1), Some(b1)) if b1 > 0.0 => Some(round1((cpu_with_redis - c1) / b1 * 1e6)),
        _ => None,
    };
    let redis_us = match (line["redis_cpu_s"].as_f64(), base_broadcasts) {
        (Some(r), Some(b1)) if b1 > 0.0 => Some(round1(r / b1 * 1e6)),
        _ => None,
    };
    json!({
        "one_node_deliveries_per_s": b["deliveries_per_s"],
        "deliveries_per_s_ratio": ratio(f(line, "deliveries_per_s"), f(&b, "deliveries_per_s")),
        "one_node_latency_ms": b["latency_ms"],
        "one_node_server_cpu_s_per_million_deliveries": b["server_cpu_s_per_million_deliveries"],
        "server_cpu_per_delivery_ratio": ratio(f(line, "server_cpu_s_per_million_deliveries"), f(&b, "server_cpu_s_per_million_deliveries")),
        "extra_cpu_us_per_broadcast": adapter_us,
        "redis_cpu_us_per_broadcast": redis_us,
        "one_node_exactly_once": b["exactly_once"],
    })
}

// ---------------------------------------------------------------------------------------------
// Scenario: compare

/// The reference servers `bench/load.sh` measures next to sensorwire, in the order printed.
const REFERENCES: &[&str] = &["node", "floor"];

/// sensorwire's `idle` and `fanout` figures against the reference servers' of the same run
/// (`--baseline FILE`): for each metric the raw figure of every server, `vs_<ref>` =
/// sensorwire / reference, and for the fanout p99 the gap to the floor's, whose target is
/// "p99 ≤ the floor's p99 + 100 ms". The last one-node line of each server counts; for
/// `--server-name` only those of `--engine`. A scenario no server ran is left out.
fn compare(a: &Args) -> Result<Value> {
    let path = a
        .baseline
        .as_ref()
        .context("compare needs --baseline FILE (the JSON lines of the run)")?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let me = a.server_name.as_str();
    // Lines of before the `server` field are sensorwire's.
    let server_of = |v: &Value| v["server"].as_str().unwrap_or("sensorwire").to_string();
    let pick = |scenario: &str, server: &str| -> Option<&Value> {
        lines.iter().rev().find(|v| {
            v["scenario"] == scenario
                && v["nodes"].as_u64().unwrap_or(1) == 1
                && server_of(v) == server
                && (server != me || v["engine"] == a.engine.as_str())
        })
    };
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if y > 0.0 => Some(round2(x / y)),
        _ => None,
    };
    // One metric over the servers: {"sensorwire": x, "floor": y, ..., "vs_floor": x/y, ...}.
    let metric = |mine: &Value, refs: &[(&str, &Value)], get: &dyn Fn(&Value) -> Option<f64>| {
        let mut m = serde_json::Map::new();
        m.insert(me.to_string(), json!(get(mine)));
        for (name, line) in refs {
            m.insert(name.to_string(), json!(get(line)));
        }
        for (name, line) in refs {
            m.insert(format!("vs_{name}"), json!(ratio(get(mine), get(line))));
        }
        Value::Object(m)
    };
    let each = |mine: &Value, refs: &[(&str, &Value)], key: &str| {
        let mut m = serde_json::Map::new();
        m.insert(me.to_string(), mine[key].clone());
        for (name, line) in refs {
            m.insert(name.to_string(), line[key].clone());
        }
        Value::Object(m)
    };
    let mut out = json!({ "scenario": "compare", "server": me, "engine": a.engine });
    let mut found: Vec<&str> = Vec::new();
    for scenario in ["idle", "fanout"] {
        let Some(mine) = pick(scenario, me) else {
            continue;
        };
        let refs: Vec<(&str, &Value)> = REFERENCES
            .iter()
            .filter(|r| **r != me)
            .filter_map(|r| pick(scenario, r).map(|l| (*r, l)))
            .collect();
        for (r, _) in &refs {
            if !found.contains(r) {
                found.push(r);
            }
        }
        let mut s = json!({ "connections_held": each(mine, &refs, "connections_held") });
        if scenario == "idle" {
            s["server_rss_per_connection_kib"] = metric(mine, &refs, &|v| {
                v["server_rss_per_connection_kib"].as_f64()
            });
        } else {
            s["server_cpu_s_per_million_deliveries"] = metric(mine, &refs, &|v| {
                v["server_cpu_s_per_million_deliveries"].as_f64()
            });
            let p99 = |v: &Value| v["latency_ms"]["p99"].as_f64();
            let mut lat = metric(mine, &refs, &p99);
            if let Some((_, floor)) = refs.iter().find(|(r, _)| *r == "floor") {
                let gap = p99(mine).zip(p99(floor)).map(|(m, f)| round1(m - f));
                lat["minus_floor_ms"] = json!(gap);
                lat["le_floor_plus_100ms"] = json!(gap.map(|g| g <= 100.0));
            }
            s["latency_p99_ms"] = lat;
            s["completeness"] = each(mine, &refs, "completeness");
            s["exactly_once"] = each(mine, &refs, "exactly_once");
        }
        out[scenario] = s;
    }
    out["references"] = json!(found);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Scenario: ingest

async fn ingest(a: &Args) -> Result<Value> {
    let posters = a.posters.max(1);
    let per_org_units = 50;
    let unit_count = a.pick(a.units, posters * per_org_units, posters * per_org_units);
    let duration = a.pick(a.duration, 20.0, 5.0);
    let size = a.request_size;
    let http = gateway::http_client(posters + 4)?;
    let orgs = gateway::create_orgs(
        &http,
        &a.base(0),
        &a.jwt_secret,
        "ingest",
        posters,
        unit_count,
    )
    .await?;
    let url = format!("{}/api/readings/ingest", a.base(0));
    log(format!(
        "{posters} posters × {size}-reading requests for {duration} s"
    ));
    let cpu0 = Cpu::now(a);
    let deadline = Instant::now() + Duration::from_secs_f64(duration);
    let tasks: Vec<JoinHandle<Posted>> = orgs
        .iter()
        .enumerate()
        .map(|(p, org)| {
            let (http, url, org) = (http.clone(), url.clone(), org.clone());
            tokio::spawn(async move {
                let mut mine = Posted::default();
                let mut rng = Rng::new(p as u64 + 7);
                let (mut cursor, mut last_ms) = (0usize, 0i64);
                while Instant::now() < deadline {
                    let at = time::now_ms().max(last_ms + 1);
                    last_ms = at;
                    let body = gateway::ingest_body(&org.units, cursor, size, at, &mut rng);
                    cursor = (cursor + size) % org.units.len();
                    let before = mine.ok;
                    gateway::post_readings(&http, &url, &org.key, body, size as u64, &mut mine)
                        .await;
                    if mine.ok == before {
                        // 429/503: wait as a device would before retrying.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                mine
            })
        })
        .collect();
    let mut posted = Posted::default();
    for t in tasks {
        posted.merge(t.await.context("poster")?);
    }
    let cpu1 = Cpu::now(a);
    let elapsed = (cpu1.at - cpu0.at).as_secs_f64();
    let rss = sys::rss_kib_all(&a.server_pid);
    let hwm: u64 = a
        .server_pid
        .iter()
        .filter_map(|p| sys::status_kib(*p, "VmHWM"))
        .sum();
    let stored = verify_stored(a, posted.accepted);
    let lat = percentiles(std::mem::take(&mut posted.latencies_ms));
    let (_, window) = cpu0.window(&cpu1);
    let per_s = posted.accepted as f64 / elapsed;
    let target = if a.engine == "postgres" {
        100_000.0
    } else {
        30_000.0
    };
    Ok(json!({
        "scenario": "ingest",
        "engine": a.engine,
        "posters": posters,
        "readings_per_request": size,
        "units": unit_count,
        "duration_s": round2(elapsed),
        "requests": posted.requests,
        "ok_requests": posted.ok,
        "accepted": posted.accepted,
        "duplicates": posted.duplicates,
        "accepted_per_s": per_s.round(),
        "request_latency_ms": pct_json(&lat),
        "errors": posted.errors,
        "stored": stored["stored"],
        "stored_matches_accepted": stored["stored_matches_accepted"],
        "server_rss_mib": mib(rss),
        "server_rss_peak_mib": mib(hwm),
        "cpu": window,
        "targets": {
            "accepted_per_s_target": target,
            "throughput_met": per_s >= target,
            "p99_le_250ms": lat.p99.is_some_and(|p| p <= 250.0),
        },
    }))
}
