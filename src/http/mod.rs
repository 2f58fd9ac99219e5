//! HTTP endpoints: `/metrics` (Prometheus text), `/healthz` (503 when an engine stage thread
//! has died, while the model fails on batches, or when events wait and none finished within the
//! stall timeout: [`Liveness::check`]), `/readyz` (model loaded,
//! warm-up batch done, source connected; 503 with the missing parts otherwise), and with
//! `http.score_api` `POST /v1/score` ([`score_api`]), on `http.api_listen` when set.
//!
//! Slow clients hold only their own connection: a request header must arrive within
//! `http.header_timeout`, a `/v1/score` body within `http.body_timeout` (408), a response write
//! that makes no progress for `http.write_timeout` closes the connection ([`WriteTimeout`]), and
//! no connection lives longer than [`CONNECTION_LIFETIME`].

pub mod config;
pub mod score_api;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Semaphore};

use crate::health::Liveness;
use crate::metrics::Metrics;

pub use config::HttpConfig;

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
    liveness: Arc<Liveness>,
    stall_timeout: Duration,
}

/// What the endpoints report on.
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub liveness: Arc<Liveness>,
    /// `POST /v1/score`, when served.
    pub score: Option<score_api::ScoreApi>,
}

/// Bind `config.listen` (and `config.api_listen` when set) and serve until `stop` turns true.
/// Returns the bound address of `listen` (port 0 picks one) and the server task.
///
/// The accept loop bounds what clients can hold: at most `max_connections` open connections per
/// listener (one more is accepted and closed at once, so the listen queue never fills with file
/// descriptors), and a connection that has not sent a complete request header within
/// `header_timeout` is closed, also when it idles between keep-alive requests.
pub async fn serve(
    config: &HttpConfig,
    endpoints: Endpoints,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let (listener, bound) = bind(config.listen).await?;
    let Endpoints { metrics, readiness, liveness, score } = endpoints;
    let mut app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, readiness, liveness, stall_timeout: config.stall_timeout });
    let limits = Limits {
        max_connections: config.max_connections.max(1),
        header_timeout: config.header_timeout,
        write_timeout: config.write_timeout,
    };
    let mut api = None;
    if let Some(state) = score {
        let router = Router::new().route("/v1/score", post(score_api::score)).with_state(state);
        match config.api_listen {
            Some(addr) => {
                let (listener, bound) = bind(addr).await?;
                tracing::info!(addr = %bound, "serving POST /v1/score");
                api = Some((listener, router));
            }
            None => app = app.merge(router),
        }
    }
    let task = async move {
        match api {
            Some((api_listener, router)) => {
                let api = accept_loop(api_listener, router, limits, stop.clone());
                tokio::join!(accept_loop(listener, app, limits, stop), api);
            }
            None => accept_loop(listener, app, limits, stop).await,
        }
    };
    Ok((bound, tokio::spawn(task)))
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    Ok((listener, bound))
}

#[derive(Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_timeout: Duration,
    write_timeout: Duration,
}

/// A connection lives at most this long, whatever it does (a backstop against clients that
/// trickle a request body or read the response slowly).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

async fn accept_loop(listener: tokio::net::TcpListener, app: Router, limits: Limits, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "the HTTP listener cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(max = limits.max_connections, "HTTP connection limit reached: closing a new connection");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let io = WriteTimeout { io: stream, timeout: limits.write_timeout, deadline: None };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => tracing::debug!(error = %e, "HTTP connection closed"),
                Ok(Ok(())) | Err(_) => {}
            }
        });
    }
    connections.abort_all();
}

/// A connection whose writes fail with `TimedOut` once one has stayed pending (the client's
/// receive window full: it does not read its answer) for `timeout`; hyper then closes it.
struct WriteTimeout<T> {
    io: T,
    timeout: Duration,
    /// Set while a write is pending; cleared by any write that completes.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteTimeout<T> {
    fn guard<R>(&mut self, cx: &mut Context<'_>, polled: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            self.deadline = None;
            return polled;
        }
        let timeout = self.timeout;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing of its answer for {timeout:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_shutdown(cx);
        self.guard(cx, polled)
    }
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.liveness.check(s.metrics.inflight_events.get(), s.stall_timeout) {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
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
