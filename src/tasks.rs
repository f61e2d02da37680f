//! The one owner of the node's long-lived tasks: every one is started here with a name, kept,
//! and stopped and joined in its turn at shutdown — none is left running when `run` returns
//! (tests start several gateways in one process, and a detached task would outlive its node).
//!
//! **Supervision.** A task runs in a `task` span carrying its name (its start and end are logged
//! at DEBUG). What its death means depends on its [`Role`]:
//! - [`Role::Essential`] (the pipeline stages, the plain-WebSocket relay and its advertiser, the
//!   Redis watch and resubscribers, token expiry): a panic, or an end before its stop, leaves
//!   readings acknowledged but never evaluated or broadcast, or delivery silently broken. So the
//!   node says so at once: an ERROR line, `/readyz` 503, ingest refused with 503 — and then it
//!   shuts down and exits non-zero, so that the orchestrator restarts it. Nothing is lost by
//!   that: alert and status changes and their events are in storage (the outbox), which the
//!   restarted node, or any other, announces.
//! - [`Role::Auxiliary`] (the slow-consumer sweep): its death degrades the node without breaking
//!   delivery, so it is an ERROR line and the node carries on.
//!
//! **Shutdown**, in pipeline order, as `serve` in `lib.rs` runs it — asked for, or because an
//! essential task failed:
//! 1. stop accepting readings: the ingest writer's queue closes, so ingest answers 503 (the
//!    HTTP server itself keeps serving until step 7, so that polling clients get the last
//!    events);
//! 2. the ingest writer commits what already queued, then ends, closing its downstream channels;
//! 3. the fanout flushes its batches and ends; 4. the monitor reports what the emitter sent and
//!    ends; 5. the webhook worker lets its attempts in flight finish (or releases them);
//! 6. the emitter sends the rest of the outbox (on a cluster: appends it to the streams and
//!    delivers it back; its feed and appender are its own and end with it);
//! 7. every socket is closed cleanly (which ends long-polling requests, so the HTTP server can
//!    finish);
//! 8. every other task — plain-WebSocket relay and advertiser, Redis watch and resubscribers,
//!    slow-consumer sweep, token expiry — is stopped and joined ([`Tasks::stop_all`]);
//! 9. the Redis connections are closed (fred would keep reconnecting them otherwise), then
//!    storage.
//!
//! A task is given [`Tasks::grace`] to end once told to; one that does not is aborted and
//! reported (ERROR), so a stuck task cannot hold the process forever.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a task's death means for the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Delivery depends on it: a panic, or an end before its stop, fails the node.
    Essential,
    /// The node works without it, degraded: a panic or an early end is logged as an ERROR.
    Auxiliary,
}

/// The node's state, shared with `/readyz` and ingest; cheap to clone.
#[derive(Clone, Default)]
pub struct Health(Arc<HealthInner>);

#[derive(Default)]
struct HealthInner {
    failed: AtomicBool,
    stopping: AtomicBool,
    reason: Mutex<Option<String>>,
    notify: Notify,
}

impl Health {
    /// Whether an essential task has failed.
    pub fn failed(&self) -> bool {
        self.0.failed.load(Ordering::Acquire)
    }

    /// Which task failed and how, once one has.
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().unwrap().clone()
    }

    /// An ordered shutdown has begun: tasks ending from now on are expected to.
    pub fn stopping(&self) {
        self.0.stopping.store(true, Ordering::Release);
    }

    fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::Acquire)
    }

    /// Resolves when an essential task fails.
    pub async fn wait_failed(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.failed() {
                return;
            }
            notified.await;
        }
    }

    fn fail(&self, task: &str, why: &str) {
        tracing::error!(task, %why, "essential task failed; this node stops accepting readings and exits");
        let mut reason = self.0.reason.lock().unwrap();
        // The first failure is the cause; later ones are usually its consequences.
        if reason.is_none() {
            *reason = Some(format!("{task} {why}"));
        }
        drop(reason);
        self.0.failed.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}

/// A started task, for stopping it in its turn ([`Tasks::stop`]). Dropping it leaves the task to
/// [`Tasks::stop_all`].
#[must_use = "a task not stopped in its turn is only stopped by stop_all"]
#[derive(Debug)]
pub struct Task {
    id: u64,
    name: &'static str,
}

impl Task {
    pub fn name(&self) -> &'static str {
        self.name
    }
}

struct Running {
    id: u64,
    name: &'static str,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

/// The owner of the node's long-lived tasks (see the module's documentation); cheap to clone.
#[derive(Clone)]
pub struct Tasks(Arc<Inner>);

struct Inner {
    health: Health,
    grace: Duration,
    next: AtomicU64,
    running: Mutex<Vec<Running>>,
}

impl Drop for Inner {
    /// The owner going away without a shutdown (an error while building the node, a panic) takes
    /// its tasks with it rather than leaving them detached.
    fn drop(&mut self) {
        for task in self.running.get_mut().unwrap().drain(..) {
            task.handle.abort();
        }
    }
}

impl Tasks {
    /// An owner whose tasks get `grace` to end once told to stop.
    pub fn new(grace: Duration) -> Tasks {
        Tasks(Arc::new(Inner {
            health: Health::default(),
            grace,
            next: AtomicU64::new(0),
            running: Mutex::new(Vec::new()),
        }))
    }

    /// The node's health, as its tasks leave it.
    pub fn health(&self) -> &Health {
        &self.0.health
    }

    /// How long a task may take to end once told to stop.
    pub fn grace(&self) -> Duration {
        self.0.grace
    }

    /// Starts `name`, handing it the token that tells it to stop: it should finish what it holds
    /// and end soon after the token is cancelled (a task that ends by itself once its input is
    /// gone, like the fanout, may ignore it).
    pub fn spawn<F, Fut>(&self, name: &'static str, role: Role, task: F) -> Task
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let fut = task(stop.clone());
        let health = self.0.health.clone();
        let told = stop.clone();
        let span = tracing::info_span!("task", name);
        let handle = tokio::spawn(
            async move {
                tracing::debug!("task started");
                let outcome = AssertUnwindSafe(fut).catch_unwind().await;
                let expected = told.is_cancelled() || health.is_stopping();
                let why = match outcome {
                    Ok(()) if expected => {
                        tracing::debug!("task stopped");
                        return;
                    }
                    Ok(()) => "ended unexpectedly".to_string(),
                    Err(panic) => format!("panicked: {}", panic_message(&*panic)),
                };
                match role {
                    Role::Essential => health.fail(name, &why),
                    Role::Auxiliary => {
                        tracing::error!(task = name, %why, "auxiliary task failed; the node carries on without it")
                    }
                }
            }
            .instrument(span),
        );
        let id = self.0.next.fetch_add(1, Ordering::Relaxed);
        self.0.running.lock().unwrap().push(Running {
            id,
            name,
            stop,
            handle,
        });
        Task { id, name }
    }

    /// Starts `name`, a task with nothing to finish: at its stop it is dropped where it waits.
    pub fn spawn_until_stopped<Fut>(&self, name: &'static str, role: Role, task: Fut) -> Task
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, role, |stop| async move {
            stop.run_until_cancelled_owned(task).await;
        })
    }

    /// An ordered shutdown has begun: tasks ending from now on are expected to.
    pub fn stopping(&self) {
        self.0.health.stopping();
    }

    /// Stops `tasks` one after the other, in the order given: each is told to stop, then joined
    /// before the next is told. Returns those that had to be aborted after [`Tasks::grace`].
    pub async fn stop(&self, tasks: impl IntoIterator<Item = Task>) -> Vec<&'static str> {
        let mut overdue = Vec::new();
        for task in tasks {
            let running = {
                let mut all = self.0.running.lock().unwrap();
                all.iter()
                    .position(|r| r.id == task.id)
                    .map(|i| all.remove(i))
            };
            let Some(running) = running else { continue };
            running.stop.cancel();
            if !self.join(running).await {
                overdue.push(task.name);
            }
        }
        overdue
    }

    /// Stops every task still running, all at once (they do not depend on one another), and
    /// joins them. Returns those that had to be aborted after [`Tasks::grace`].
    pub async fn stop_all(&self) -> Vec<&'static str> {
        let all: Vec<Running> = std::mem::take(&mut *self.0.running.lock().unwrap());
        for r in &all {
            r.stop.cancel();
        }
        let names: Vec<&'static str> = all.iter().map(|r| r.name).collect();
        let joined = futures_util::future::join_all(all.into_iter().map(|r| self.join(r))).await;
        names
            .into_iter()
            .zip(joined)
            .filter(|(_, ended)| !ended)
            .map(|(name, _)| name)
            .collect()
    }

    /// The names of the tasks not stopped yet, in the order they started.
    pub fn running(&self) -> Vec<&'static str> {
        self.0
            .running
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.name)
            .collect()
    }

    /// Waits for a task told to stop; `false` when it had to be aborted.
    async fn join(&self, mut running: Running) -> bool {
        if tokio::time::timeout(self.0.grace, &mut running.handle)
            .await
            .is_ok()
        {
            return true;
        }
        tracing::error!(
            task = running.name,
            grace = ?self.0.grace,
            "task did not stop in time; aborted"
        );
        running.handle.abort();
        running.handle.await.ok();
        false
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks() -> Tasks {
        Tasks::new(Duration::from_millis(200))
    }

    /// Waits for every task of `tasks` to have ended by itself.
    async fn settle(tasks: &Tasks) {
        let handles: Vec<_> = std::mem::take(&mut *tasks.0.running.lock().unwrap());
        for r in handles {
            r.handle.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_panicking_stage_fails_the_pipeline() {
        let tasks = tasks();
        let _fanout = tasks.spawn("fanout", Role::Essential, |_| async { panic!("boom") });
        settle(&tasks).await;
        let health = tasks.health();
        assert!(health.failed());
        assert_eq!(health.reason().unwrap(), "fanout panicked: boom");
        health.wait_failed().await;
    }

    #[tokio::test]
    async fn a_stage_ending_early_fails_it_but_not_during_shutdown() {
        let tasks = self::tasks();
        let _monitor = tasks.spawn("monitor", Role::Essential, |_| async {});
        settle(&tasks).await;
        assert!(tasks.health().failed());
        assert_eq!(
            tasks.health().reason().unwrap(),
            "monitor ended unexpectedly"
        );
        let tasks = self::tasks();
        tasks.stopping();
        let _monitor = tasks.spawn("monitor", Role::Essential, |_| async {});
        settle(&tasks).await;
        assert!(!tasks.health().failed());
    }

    #[tokio::test]
    async fn an_auxiliary_task_failing_leaves_the_node_up() {
        let tasks = tasks();
        let _sweep = tasks.spawn("sweep", Role::Auxiliary, |_| async { panic!("boom") });
        settle(&tasks).await;
        assert!(!tasks.health().failed());
    }

    #[tokio::test]
    async fn a_task_ending_at_its_own_stop_is_not_a_failure() {
        let tasks = tasks();
        let relay = tasks.spawn_until_stopped("relay", Role::Essential, std::future::pending());
        assert_eq!(tasks.running(), ["relay"]);
        assert!(tasks.stop([relay]).await.is_empty());
        assert!(!tasks.health().failed());
        assert!(tasks.running().is_empty());
    }

    #[tokio::test]
    async fn stop_joins_in_the_order_given_each_before_telling_the_next() {
        let tasks = tasks();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut started = Vec::new();
        for name in ["writer", "fanout", "emitter"] {
            let order = order.clone();
            started.push(tasks.spawn(name, Role::Essential, move |stop| async move {
                stop.cancelled().await;
                // Later stages would finish first if they were all told at once.
                let pause = match name {
                    "writer" => 60,
                    "fanout" => 30,
                    _ => 0,
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                order.lock().unwrap().push(name);
            }));
        }
        let relay = tasks.spawn_until_stopped("relay", Role::Essential, std::future::pending());
        let [writer, fanout, emitter]: [Task; 3] = started.try_into().unwrap();
        tasks.stopping();
        assert!(tasks.stop([writer, fanout]).await.is_empty());
        assert_eq!(*order.lock().unwrap(), ["writer", "fanout"]);
        assert_eq!(tasks.running(), ["emitter", "relay"]);
        assert!(tasks.stop([emitter]).await.is_empty());
        assert_eq!(*order.lock().unwrap(), ["writer", "fanout", "emitter"]);
        drop(relay);
        assert!(tasks.stop_all().await.is_empty());
        assert!(tasks.running().is_empty());
        assert!(!tasks.health().failed());
    }

    #[tokio::test]
    async fn a_task_ignoring_its_stop_is_aborted_after_the_grace_and_reported() {
        let tasks = tasks();
        let dropped = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped.clone());
        let _stubborn = tasks.spawn("stubborn", Role::Essential, |_| async move {
            let _flag = flag;
            std::future::pending::<()>().await
        });
        let _fine = tasks.spawn_until_stopped("fine", Role::Auxiliary, std::future::pending());
        tasks.stopping();
        let started = std::time::Instant::now();
        assert_eq!(tasks.stop_all().await, ["stubborn"]);
        assert!(started.elapsed() >= tasks.grace());
        assert!(dropped.load(Ordering::SeqCst), "the stubborn task is gone");
        assert!(tasks.running().is_empty());
    }

    #[tokio::test]
    async fn dropping_the_owner_aborts_what_it_still_holds() {
        let tasks = tasks();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let _held = tasks.spawn_until_stopped("held", Role::Auxiliary, async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(tasks);
        // The sender is dropped with the aborted task.
        assert!(
            tokio::time::timeout(Duration::from_secs(1), rx)
                .await
                .unwrap()
                .is_err()
        );
    }
}
