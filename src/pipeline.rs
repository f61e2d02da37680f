//! Supervision of the pipeline's stages (ingest writer, fanout, monitor, emitter).
//!
//! A stage that panics or ends before the node is shutting down leaves readings acknowledged
//! but never evaluated or broadcast. So the node says so at once: an ERROR line, `/readyz` 503,
//! ingest refused with 503 — and then shuts down and exits non-zero, so that the orchestrator
//! restarts it. Nothing is lost by that: alert and status changes and their events are in
//! storage (the outbox), which the restarted node, or any other, announces.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The pipeline's state, shared with `/readyz` and ingest; cheap to clone.
#[derive(Clone, Default)]
pub struct Health(Arc<Inner>);

#[derive(Default)]
struct Inner {
    failed: AtomicBool,
    stopping: AtomicBool,
    reason: Mutex<Option<String>>,
    notify: Notify,
}

impl Health {
    /// Whether a stage has failed.
    pub fn failed(&self) -> bool {
        self.0.failed.load(Ordering::Acquire)
    }

    /// Which stage failed and how, once one has.
    pub fn reason(&self) -> Option<String> {
        self.0.reason.lock().unwrap().clone()
    }

    /// An ordered shutdown has begun: stages ending from now on are expected to.
    pub fn stopping(&self) {
        self.0.stopping.store(true, Ordering::Release);
    }

    /// Resolves when a stage fails.
    pub async fn wait_failed(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.failed() {
                return;
            }
            notified.await;
        }
    }

    fn fail(&self, stage: &str, why: String) {
        tracing::error!(stage, %why, "pipeline stage failed; this node stops accepting readings and exits");
        *self.0.reason.lock().unwrap() = Some(format!("{stage} {why}"));
        self.0.failed.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Spawns a stage: if it panics, or ends before the shutdown, the pipeline has failed.
    pub fn spawn<F>(&self, stage: &'static str, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let health = self.clone();
        tokio::spawn(async move {
            let outcome = AssertUnwindSafe(fut).catch_unwind().await;
            if health.0.stopping.load(Ordering::Acquire) && outcome.is_ok() {
                return;
            }
            let why = match outcome {
                Ok(()) => "ended unexpectedly".to_string(),
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            };
            health.fail(stage, why);
        })
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

    #[tokio::test]
    async fn a_panicking_stage_fails_the_pipeline() {
        let health = Health::default();
        health
            .spawn("fanout", async { panic!("boom") })
            .await
            .unwrap();
        assert!(health.failed());
        assert_eq!(health.reason().unwrap(), "fanout panicked: boom");
        health.wait_failed().await;
    }

    #[tokio::test]
    async fn a_stage_ending_early_fails_it_but_not_during_shutdown() {
        let health = Health::default();
        health.spawn("monitor", async {}).await.unwrap();
        assert!(health.failed());
        let health = Health::default();
        health.stopping();
        health.spawn("monitor", async {}).await.unwrap();
        assert!(!health.failed());
    }
}
