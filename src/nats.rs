//! NATS connections shared by the JetStream source and sink: authentication (credentials file,
//! token, user/password), TLS files, and the server version check. JetStream features that
//! nats-server 2.9 silently ignores (plural `filter_subjects`, stream metadata, create-only
//! consumer actions) are never used; a server older than 2.9 is refused.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::brokers::{NatsTls, Secret};

/// How to reach and authenticate to a NATS server.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    pub url: &'a str,
    pub credentials_file: Option<&'a PathBuf>,
    pub token: Option<&'a Secret>,
    pub user: Option<&'a str>,
    pub password: Option<&'a Secret>,
    pub tls: Option<&'a NatsTls>,
}

/// The [`Connection`] of a NATS source or sink config (both carry the same connection fields;
/// their serde structs stay separate because `deny_unknown_fields` cannot see through `flatten`).
macro_rules! connection_of {
    ($c:expr) => {
        $crate::nats::Connection {
            url: &$c.url,
            credentials_file: $c.credentials_file.as_ref(),
            token: $c.token.as_ref(),
            user: $c.user.as_deref(),
            password: $c.password.as_ref(),
            tls: $c.tls.as_ref(),
        }
    };
}
pub(crate) use connection_of;

/// A connection failure, with the server's or the client library's reason.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS server {version} at {url} is older than 2.9, which scorestream needs")]
    TooOld { url: String, version: String },
}

/// Connect, authenticate and check the server version.
pub async fn connect(c: &Connection<'_>, name: &str) -> Result<async_nats::Client, ConnectError> {
    let mut opts = async_nats::ConnectOptions::new().name(name).connection_timeout(Duration::from_secs(10));
    if let Some(path) = c.credentials_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials { path: path.clone(), source })?;
    }
    if let Some(token) = c.token {
        opts = opts.token(token.0.clone());
    }
    if let (Some(user), Some(password)) = (c.user, c.password) {
        opts = opts.user_and_password(user.to_owned(), password.0.clone());
    }
    if let Some(tls) = c.tls {
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        opts = opts.require_tls(true);
    }
    let client = opts
        .connect(c.url)
        .await
        .map_err(|source| ConnectError::Connect { url: c.url.to_owned(), source })?;
    let version = client.server_info().version;
    if !at_least_2_9(&version) {
        return Err(ConnectError::TooOld { url: c.url.to_owned(), version });
    }
    tracing::info!(url = c.url, server = %version, "connected to NATS");
    Ok(client)
}

fn at_least_2_9(version: &str) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 9)
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_check() {
        assert!(super::at_least_2_9("2.9.10"));
        assert!(super::at_least_2_9("2.10.0-beta.1"));
        assert!(!super::at_least_2_9("2.8.4"));
    }
}
