//! Liveness as state the working parts publish: the publish stage reports each finished input
//! and each publish it is retrying; `/healthz` fails when events are in flight and none has
//! finished for longer than the stall timeout (a publish retried without end, a stuck engine, a
//! deadlock), naming the last publish error it saw.

use std::sync::Mutex;
use std::time::{Duration, Instant};

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
}

impl Default for Liveness {
    fn default() -> Self {
        Self { state: Mutex::new(State { last_progress: Instant::now(), retrying: None }) }
    }
}

impl Liveness {
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

    /// `Err` with the reason when `inflight` events are waiting and nothing finished within
    /// `stall_timeout`.
    pub fn check(&self, inflight: i64, stall_timeout: Duration) -> Result<(), String> {
        let Ok(s) = self.state.lock() else { return Err("liveness state poisoned".into()) };
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
}
