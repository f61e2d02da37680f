//! sensorwire: a real-time gateway for sensor dashboards.
//!
//! [`run`] builds the whole gateway from a [`Config`]: storage, the Socket.io server with its
//! adapter, the HTTP API, and serves them on a listener the caller bound, until the caller's
//! shutdown future completes. Nothing here reads the environment; `main.rs` does that once.

// The pipeline, in the order a reading goes through it, then its two edges. A module uses only
// those above it in this list (checked by `tests/layers.rs`); docs/ARCHITECTURE.md explains.
pub mod config;
pub mod fault;
pub mod observe;
pub mod tasks;
pub mod wire;

pub mod auth;
pub mod cluster;
pub mod net;
pub mod rate_limit;
pub mod rooms;
pub mod session;

pub mod evaluate;
pub mod store;

pub mod ingest;

pub mod deliver;

pub mod http;
pub mod socketio;
pub mod web;
pub mod ws;

pub mod demo;
pub mod proto;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use socketioxide::SocketIo;
use socketioxide::adapter::{Adapter, LocalAdapter};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use auth::JwtVerifier;
pub use config::Config;
use store::Store;

/// Where the embedded defaults keep their files (the SQLite database, the development secret).
pub const DATA_DIR: &str = "data";

/// Builds the JWT verifier, falling back to a development secret under `data/` for a single
/// node with no key configured (a cluster must share a configured key).
pub fn jwt_verifier(config: &Config) -> anyhow::Result<JwtVerifier> {
    let j = &config.jwt;
    let configured =
        j.jwt_secret.is_some() || j.jwt_public_key_file.is_some() || j.jwks_file.is_some();
    let dev = if configured || config.redis_url.is_some() {
        None
    } else {
        tracing::warn!(
            "no JWT_SECRET, JWT_PUBLIC_KEY_FILE or JWKS_FILE set: using the development secret in \
             {DATA_DIR}/dev-jwt-secret (set JWT_SECRET in production)"
        );
        Some(
            auth::jwt::dev_secret(Path::new(DATA_DIR))
                .context("creating the development secret")?,
        )
    };
    Ok(JwtVerifier::from_args(j, dev)?)
}

/// rustls is built with two crypto providers (aws-lc-rs for fred, ring for reqwest), so it cannot
/// pick one by itself: fred's TLS (`rediss://`) uses the process default installed here. reqwest
/// needs nothing (it falls back to ring). Installing twice (tests run several gateways) is harmless.
pub fn install_tls_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The process-wide Prometheus recorder, installed once.
fn metrics_handle() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = observe::install()?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

/// Runs the gateway on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    install_tls_provider();
    let config = Arc::new(config);
    let metrics = metrics_handle()?;
    let jwt = Arc::new(jwt_verifier(&config)?);
    let store = Store::open(&config.database_url)
        .await
        .with_context(|| format!("DATABASE_URL: cannot open {}", redact(&config.database_url)))?;
    tracing::info!(engine = store.engine_name(), "storage ready");

    let (commands, commands_rx) = mpsc::channel(1024);
    let expiry = Arc::new(socketio::expiry::Expiry::default());
    let (follows, follow_ops) = deliver::feed::Follows::new(config.redis_url.is_some());
    let ctx = socketio::Ctx {
        follows,
        expiry: expiry.clone(),
        store: store.clone(),
        jwt: jwt.clone(),
        limits: Arc::new(config.limits.clone()),
        allow_token_in_query: config.allow_token_in_query,
        commands: commands.clone(),
    };
    let builder = socketio::builder(&config, ctx);
    // Every long-lived task of the node, from the Redis watch started while connecting to the
    // last pipeline stage, belongs to this owner; `serve` stops them in order (see `tasks`).
    let tasks = tasks::Tasks::new(STOP_GRACE);
    let parts = Parts {
        tasks: tasks.clone(),
        config,
        jwt,
        store,
        metrics,
        commands: (commands, commands_rx),
        expiry,
        follow_ops,
    };
    let served = match parts.config.redis_url.clone() {
        None => {
            let (layer, io) = builder.build_layer();
            io.ns(
                "/",
                socketio::on_connect::<LocalAdapter>.with(socketio::authenticate::<LocalAdapter>),
            );
            serve(parts, io, layer, None, listener, shutdown).await
        }
        Some(url) => {
            let (adapter, cluster) = cluster::connect(&url, &tasks)
                .await
                .with_context(|| format!("REDIS_URL: cannot connect to {}", redact(&url)))?;
            tracing::info!("redis adapter ready: rooms and broadcasts span every node");
            type Fred = cluster::FredAdapter<socketioxide::adapter::Emitter>;
            let (layer, io) = builder.with_adapter::<Fred>(adapter).build_layer();
            let registered = io
                .ns(
                    "/",
                    socketio::on_connect::<Fred>.with(socketio::authenticate::<Fred>),
                )
                .await;
            if let Err(e) = registered {
                // Connected but not serving: the Redis tasks and clients end here.
                tasks.stop_all().await;
                cluster.connections.quit().await;
                return Err(e).context("REDIS_URL: registering the namespace with the adapter");
            }
            serve(parts, io, layer, Some(cluster), listener, shutdown).await
        }
    };
    // `serve` has stopped everything already; this is a safety net for any other way out (and
    // should `run` itself be dropped, the owner aborts what it still holds).
    tasks.stop_all().await;
    served
}

/// How long a task may take to end once told to stop before it is aborted (see `tasks`): well
/// above the emitter's and the webhook worker's own shutdown deadlines (3 s each), and within the
/// 15 s a failed node has to exit in.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What `run` prepared before choosing the adapter.
struct Parts {
    tasks: tasks::Tasks,
    config: Arc<Config>,
    jwt: Arc<JwtVerifier>,
    store: Store,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The emitter's command channel (the sockets hold senders through `Ctx`).
    commands: (
        mpsc::Sender<deliver::emitter::Command>,
        mpsc::Receiver<deliver::emitter::Command>,
    ),
    expiry: Arc<socketio::expiry::Expiry>,
    /// What the sockets ask the cluster feed to follow (with several nodes).
    follow_ops: Option<mpsc::UnboundedReceiver<deliver::feed::Op>>,
}

/// Everything after the adapter is chosen: one code path for one node and for a cluster.
async fn serve<A: Adapter>(
    Parts {
        tasks,
        config,
        jwt,
        store,
        metrics: parts_metrics,
        commands,
        expiry,
        follow_ops,
    }: Parts,
    io: SocketIo<A>,
    socket_layer: SocketIoLayer<A>,
    cluster: Option<cluster::Cluster>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // The pipeline, upstream to downstream: ingest writer (stores readings, decides alerts and
    // status in the same commit) → fanout (live + batches) and monitor (announces the stored
    // alert and status events, offline sweep) → outbox → emitter. Each stage is an essential
    // task of `tasks`.
    use tasks::Role::{Auxiliary, Essential};
    let l = &config.limits;
    let pipeline = tasks.health().clone();
    let units = Arc::new(store::unit_cache::Units::new(store.clone()));
    let (outbox, outgoing) = deliver::outbox::Outbox::new(64 * 1024);
    let (to_fanout, fanout_rx) = mpsc::channel(1024);
    let (to_monitor, monitor_rx) = mpsc::channel(1024);
    let announce = to_monitor.downgrade();
    let (sent, sent_rx) = mpsc::unbounded_channel();
    let (ingest, writer) = ingest::Ingest::start(
        store.clone(),
        l.ingest_queue,
        l.max_buffered_readings,
        ingest::Downstream {
            readings: vec![to_fanout],
            announce: to_monitor,
        },
        pipeline.clone(),
    );
    let writer = tasks.spawn("ingest writer", Essential, |stop| writer.run(stop));
    let retention = deliver::emitter::Retention {
        window: Duration::from_secs(l.recovery_window_secs),
        max_bytes: l.recovery_max_bytes,
        max_events: (l.recovery_max_events > 0).then_some(l.recovery_max_events),
    };
    let connections = cluster.as_ref().map(|c| c.connections.clone());
    let (redis, redis_clients, cluster_log) = match cluster.zip(follow_ops) {
        Some((c, follows)) => {
            let log = deliver::emitter::ClusterLog {
                health: c.health.clone(),
                log: deliver::stream::RedisLog::new(
                    c.client.clone(),
                    retention.window.as_millis() as u64,
                    retention.max_events,
                ),
                subscriber: c.feed,
                follows,
            };
            (Some(c.health), Some((c.client, c.subscriber)), Some(log))
        }
        None => (None, None, None),
    };
    let emitter = {
        let io = io.clone();
        tasks.spawn("emitter", Essential, |stop| {
            deliver::emitter::run(io, outgoing, commands, cluster_log, retention, sent, stop)
        })
    };
    let relay = deliver::relay::Relay::new(
        store.clone(),
        redis_clients
            .as_ref()
            .zip(redis.clone())
            .map(|((c, _), health)| (c.clone(), health)),
    );
    if let Some((_, subscriber)) = redis_clients {
        relay.start_across_nodes(subscriber, &tasks);
    }
    // The fanout and the monitor have no stop of their own: they flush and end once the writer
    // has ended (their inputs close), so their stop is only waited for.
    let fanout = tasks.spawn("fanout", Essential, |_| {
        deliver::fanout::run(
            relay.clone(),
            fanout_rx,
            outbox.clone(),
            config.flush_interval,
            l.batch_max_readings,
            ingest.buffered(),
        )
    });
    let monitor = deliver::monitor::Monitor::new(
        store.clone(),
        outbox.clone(),
        relay.clone(),
        l.batch_max_readings,
    );
    let monitor = tasks.spawn("monitor", Essential, |_| {
        monitor.run(
            monitor_rx,
            sent_rx,
            Duration::from_millis(l.offline_sweep_ms),
        )
    });
    // Webhook deliveries: stored with their events, sent by whichever node claims them.
    let webhooks = {
        let worker = deliver::webhooks::Worker {
            store: store.clone(),
            allow_private: config.webhook_allow_private,
        };
        tasks.spawn("webhooks", Essential, |stop| worker.run(stop))
    };
    // One task for every socket's token deadline (not one per socket): essential, since sockets
    // whose token ran out would otherwise stay connected. Stopped with the other tasks, once
    // every socket is closed.
    {
        let io = io.clone();
        let _ = tasks.spawn("token expiry", Essential, |stop| {
            expiry.run(io, stop.cancelled_owned())
        });
    }
    // Slow consumers: without the sweep they are left to engine.io's heartbeat, so the node
    // carries on, degraded (ERROR logged), should it fail.
    {
        let io = io.clone();
        let _ = tasks.spawn("slow-consumer sweep", Auxiliary, |stop| {
            deliver::slow::sweep(
                io,
                deliver::slow::SweepConfig::default(),
                stop.cancelled_owned(),
            )
        });
    }

    let state = http::AppState {
        config: config.clone(),
        store: store.clone(),
        jwt,
        ingest,
        units,
        redis,
        relay,
        outbox,
        pipeline: pipeline.clone(),
        rate_limits: Arc::new(http::KeyedLimits::new(&config.limits)),
        metrics: parts_metrics,
        announce,
    };
    let plain_ws = ws::router(ws::AppState {
        jwt: state.jwt.clone(),
        relay: state.relay.clone(),
        units: state.units.clone(),
        max_rooms: config.limits.max_rooms_per_socket,
    });
    let app: Router = http::router(state, plain_ws)
        .fallback_service(web::router(&config.web_dir))
        .layer(request_log())
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(socket_layer)
        .layer(tower::util::MapRequestLayer::new(
            socketio::request_head::detach,
        ))
        .layer(http::cors(&config.cors_origins));

    // Shutdown — asked for, or because an essential task failed — in the order `tasks`
    // documents: the writer commits what already queued (later requests are refused with 503;
    // none at all after a failure), the fanout flushes its batches, the monitor reports what the
    // emitter sent, the webhook worker finishes its attempts, the emitter sends the rest; then
    // every socket is closed cleanly — which also ends long-polling requests, so the HTTP
    // server, told to finish only now so that polling clients still get the last events, can
    // finish — and the remaining tasks are stopped.
    let (drained, on_drained) = tokio::sync::oneshot::channel::<()>();
    let closing_io = io.clone();
    let owner = tasks.clone();
    let drain = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {}
            _ = owner.health().wait_failed() => {}
        }
        owner.stopping();
        owner.stop([writer, fanout, monitor, webhooks]).await;
        owner.stop([emitter]).await;
        closing_io.close().await;
        drained.send(()).ok();
    });
    // Connections that the slow-consumer sweep can end (see `deliver::slow` and `net`).
    let served = axum::serve(
        net::Listener::new(listener),
        app.into_make_service_with_connect_info::<net::Connection>(),
    )
    .with_graceful_shutdown(async {
        on_drained.await.ok();
    })
    .await
    .context("serving");
    if served.is_err() {
        // Not drained (the server failed by itself): the tasks are stopped all the same.
        drain.abort();
    }
    drain.await.ok();
    // Relay, advertiser, Redis watch and resubscribers, sweep, expiry — and anything the drain
    // did not get to (should it have panicked) — before storage, which the relay reads.
    tasks.stop_all().await;
    if let Some(connections) = connections {
        connections.quit().await;
    }
    store.close().await;
    served?;
    if let Some(reason) = pipeline.reason() {
        anyhow::bail!("essential task failed ({reason}); exiting so that the node is restarted");
    }
    tracing::info!("stopped");
    Ok(())
}

/// One INFO line per HTTP request with its id, method, path (never the query: it may hold a
/// token), status, latency and — once authenticated — the organisation. Socket.io's own
/// requests are not logged here (its layer sits outside); connections log their lifecycle.
fn request_log() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    impl Fn(&axum::http::Request<axum::body::Body>) -> tracing::Span + Clone,
    (),
    DefaultOnResponse,
> {
    TraceLayer::new_for_http()
        .make_span_with(|req: &axum::http::Request<axum::body::Body>| {
            let id = req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info_span!(
                "request",
                request_id = %id,
                method = %req.method(),
                path = %req.uri().path(),
                org = tracing::field::Empty,
            )
        })
        .on_request(())
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}:***{}", &url[..scheme + 3 + colon], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
