//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (the process answers), `/readyz`
//! (model loaded, warm-up batch done, source connected; 503 with the missing parts otherwise).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What `/readyz` checks. Shared between the worker's start-up and the server.
#[derive(Default)]
pub struct Readiness {
    model_loaded: AtomicBool,
    warmed_up: AtomicBool,
    source: Mutex<Option<watch::Receiver<bool>>>,
}

impl Readiness {
    pub fn set_model_loaded(&self) {
        self.model_loaded.store(true, Ordering::Release);
    }
    pub fn set_warmed_up(&self) {
        self.warmed_up.store(true, Ordering::Release);
    }
    /// Follow the source's connection state from now on.
    pub fn set_source(&self, connected: watch::Receiver<bool>) {
        if let Ok(mut s) = self.source.lock() {
            *s = Some(connected);
        }
    }

    /// The parts that are not ready yet; empty when ready.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if !self.model_loaded.load(Ordering::Acquire) {
            missing.push("model not loaded");
        }
        if !self.warmed_up.load(Ordering::Acquire) {
            missing.push("warm-up batch not done");
        }
        let connected = self.source.lock().ok().and_then(|s| s.as_ref().map(|rx| *rx.borrow())).unwrap_or(false);
        if !connected {
            missing.push("source not connected");
        }
        missing
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Bind `addr` and serve until `stop` turns true. Returns the bound address (port 0 picks one)
/// and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness });
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "the HTTP server stopped");
        }
    });
    Ok((bound, task))
}

async fn metrics_handler(State(s): State<AppState>) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    const CT: [(&str, &str); 1] = [("content-type", "text/plain; version=0.0.4")];
    match s.metrics.render() {
        Ok(text) => (StatusCode::OK, CT, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, CT, e.to_string()),
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let missing = s.readiness.missing();
    if missing.is_empty() {
        (StatusCode::OK, "ready\n".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", missing.join(", ")))
    }
}
