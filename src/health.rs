//! Liveness as state the working parts publish: the publish stage reports each finished input
//! and each publish it is retrying, the score stage each batch the model failed on, the engine
//! its stage threads (a watch channel, as TEI's backend does). `/healthz` fails while the model
//! fails on batches, when an engine stage thread has died, and when events are in flight and
//! none has finished for longer than the stall timeout (a publish retried without end, a stuck
//! engine, a deadlock), naming the last publish error it saw.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Progress of the pipeline, shared by the publish stage (writer) and `/healthz` (reader).
#[derive(Debug)]
pub struct Liveness {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// When an input last finished (acked), or when the worker started.
    last_progress: Instant,
    /// The error of the publish being retried now, if any.
    retrying: Option<String>,
    /// The model's error on the last batch, until a batch succeeds.
    engine_failed: Option<String>,
    /// The engine's stage threads: `Some(reason)` once one has died.
    stages: Option<watch::Receiver<Option<String>>>,
    /// The model has not loaded yet (the worker's start).
    loading: bool,
}

impl Default for Liveness {
    /// A pipeline's liveness with its model loaded.
    fn default() -> Self {
        let state =
            State { last_progress: Instant::now(), retrying: None, engine_failed: None, stages: None, loading: false };
        Self { state: Mutex::new(state) }
    }
}

impl Liveness {
    /// At the worker's start: unhealthy until [`Liveness::model_loaded`], so that a startup
    /// probe on `/healthz` waits for the load.
    pub fn loading() -> Self {
        let l = Self::default();
        if let Ok(mut s) = l.state.lock() {
            s.loading = true;
        }
        l
    }

    /// The model has loaded; the stall clock starts now.
    pub(crate) fn model_loaded(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.loading = false;
            s.last_progress = Instant::now();
        }
    }

    /// An input finished (its output confirmed and the input acknowledged).
    pub fn progress(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.last_progress = Instant::now();
            s.retrying = None;
        }
    }

    /// A publish failed with a transient error and is being retried.
    pub fn retrying(&self, error: String) {
        if let Ok(mut s) = self.state.lock() {
            s.retrying = Some(error);
        }
    }

    /// The model failed on a batch (which is retried): unhealthy until a batch succeeds.
    pub(crate) fn engine_failed(&self, error: String) {
        if let Ok(mut s) = self.state.lock() {
            s.engine_failed = Some(error);
        }
    }

    /// The model scored a batch.
    pub(crate) fn engine_ok(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.engine_failed = None;
        }
    }

    /// Follow the engine's stage threads from now on ([`crate::engine::Engine::stage_health`]).
    pub(crate) fn watch_stages(&self, stages: watch::Receiver<Option<String>>) {
        if let Ok(mut s) = self.state.lock() {
            s.stages = Some(stages);
        }
    }

    /// `Err` with the reason when an engine stage thread has died, when the model failed on the
    /// last batch, or when `inflight` events are waiting and nothing finished within
    /// `stall_timeout`.
    pub fn check(&self, inflight: i64, stall_timeout: Duration) -> Result<(), String> {
        let Ok(s) = self.state.lock() else { return Err("liveness state poisoned".into()) };
        if s.loading {
            return Err("the model is loading".into());
        }
        if let Some(dead) = s.stages.as_ref().and_then(|rx| rx.borrow().clone()) {
            return Err(format!("an engine stage has stopped: {dead}"));
        }
        if let Some(e) = &s.engine_failed {
            return Err(format!("the model failed on the last batch: {e}"));
        }
        let idle = s.last_progress.elapsed();
        if inflight <= 0 || idle <= stall_timeout {
            return Ok(());
        }
        let mut reason = format!("no event finished for {}s with {inflight} in flight", idle.as_secs());
        if let Some(e) = &s.retrying {
            reason.push_str(&format!("; retrying a publish: {e}"));
        }
        Err(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalls_only_with_work_waiting() {
        let l = Liveness::default();
        std::thread::sleep(Duration::from_millis(30));
        assert!(l.check(0, Duration::from_millis(10)).is_ok(), "idle without work is healthy");
        l.retrying("broker away".into());
        let e = l.check(3, Duration::from_millis(10)).unwrap_err();
        assert!(e.contains("3 in flight") && e.contains("broker away"), "{e}");
        l.progress();
        assert!(l.check(3, Duration::from_millis(10)).is_ok());
    }

    #[test]
    fn unhealthy_until_the_model_has_loaded() {
        let l = Liveness::loading();
        assert_eq!(l.check(0, Duration::from_secs(60)).unwrap_err(), "the model is loading");
        l.model_loaded();
        assert!(l.check(0, Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn a_failing_model_or_a_dead_stage_is_unhealthy_even_when_idle() {
        let l = Liveness::default();
        l.engine_failed("CUDA error".into());
        let e = l.check(0, Duration::from_secs(60)).unwrap_err();
        assert!(e.contains("CUDA error"), "{e}");
        l.engine_ok();
        assert!(l.check(0, Duration::from_secs(60)).is_ok());
        let (tx, rx) = watch::channel(None);
        l.watch_stages(rx);
        assert!(l.check(0, Duration::from_secs(60)).is_ok());
        tx.send_replace(Some("stage 1 (cpu) panicked".into()));
        let e = l.check(0, Duration::from_secs(60)).unwrap_err();
        assert!(e.contains("stage 1 (cpu) panicked"), "{e}");
    }
}
