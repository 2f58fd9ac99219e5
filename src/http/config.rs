//! The `[http]` section: where `/metrics`, `/healthz` and `/readyz` (and `POST /v1/score`)
//! listen, the stall timeout of `/healthz`, the limits that keep a slow or greedy client to its
//! own connection, and the score API's own limits; every default here, with the section's own
//! checks ([`HttpConfig::validate`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{positive, Invalid};

/// The `[http]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `/healthz` fails (503) when events are in flight and none has finished for this long: a
    /// publish retried without end, a stuck engine. Keep it above the slowest batch.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// A connection that has not sent a complete request header within this time (also while it
    /// idles between keep-alive requests) is closed.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most open HTTP connections per listener; a connection beyond it is closed at once. With
    /// `api_listen`, the API port and the probe/metrics port each have this many, so that API
    /// clients can never take the connections of the kubelet's probes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Serve `POST /v1/score` on this listener (`scorestream serve` always does).
    #[serde(default)]
    pub score_api: bool,
    /// Most posted events waiting to be scored at a time; a request that would go over gets 429
    /// with `Retry-After`.
    #[serde(default = "default_max_pending_events")]
    pub max_pending_events: usize,
    /// Largest `/v1/score` request body in bytes; a larger one gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A file holding the bearer token `/v1/score` requires (`Authorization: Bearer <token>`);
    /// without it, no token is asked for.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Serve `POST /v1/score` on this address instead of `listen` (which keeps `/metrics`,
    /// `/healthz` and `/readyz`), e.g. to expose the API on its own port.
    #[serde(default)]
    pub api_listen: Option<SocketAddr>,
    /// A `/v1/score` request body must arrive whole within this time after its header; a slower
    /// client gets 408 and none of its events is scored.
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A response write that makes no progress for this long (a client that does not read its
    /// answer) closes the connection.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            stall_timeout: default_stall_timeout(),
            header_timeout: default_header_timeout(),
            max_connections: default_max_connections(),
            score_api: false,
            max_pending_events: default_max_pending_events(),
            max_body_bytes: default_max_body_bytes(),
            token_file: None,
            api_listen: None,
            body_timeout: default_body_timeout(),
            write_timeout: default_write_timeout(),
        }
    }
}

impl HttpConfig {
    /// Checks serde cannot express; fields are named `http.<key>`.
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("http.max_connections", self.max_connections)?;
        positive("http.max_pending_events", self.max_pending_events)?;
        positive("http.max_body_bytes", self.max_body_bytes)?;
        positive("http.body_timeout", self.body_timeout.as_millis() as usize)?;
        positive("http.write_timeout", self.write_timeout.as_millis() as usize)
    }
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(30)
}
const fn default_max_connections() -> usize {
    128
}
const fn default_max_pending_events() -> usize {
    1024
}
const fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
