//! NATS connections shared by the JetStream source and sink: authentication (credentials file,
//! token, user/password), TLS files, and the server version check. A server older than 2.9 is
//! refused; JetStream features that nats-server 2.9 silently ignores (plural `filter_subjects`,
//! stream metadata, create-only consumer actions) are used only where the connected server's
//! version (its INFO) is 2.10 or later, and a setting that needs them is refused on 2.9. The
//! settings the source and the sink share live here too: [`NatsTls`], the choice of one
//! authentication ([`Connection::check_auth`]) and credentials written into the URL.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::settings::{invalid, Invalid, Secret};

/// TLS files for a NATS connection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// CA certificate(s) that sign the server certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Client private key for mutual TLS (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

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

impl Connection<'_> {
    /// One way to authenticate at most, and user and password together; `section` names the
    /// config section in the refusal.
    pub fn check_auth(&self, section: &str) -> Result<(), Invalid> {
        let field = &format!("{section}.user");
        if self.user.is_some() != self.password.is_some() {
            return invalid(field, "user and password go together");
        }
        let (token, user, creds) = (self.token.is_some(), self.user.is_some(), self.credentials_file.is_some());
        if [token, user, creds].iter().filter(|x| **x).count() > 1 {
            return invalid(field, "choose one of token, user/password, credentials_file");
        }
        Ok(())
    }
}

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
    if !at_least(&version, (2, 9)) {
        return Err(ConnectError::TooOld { url: c.url.to_owned(), version });
    }
    tracing::info!(url = c.url, server = %version, "connected to NATS");
    Ok(client)
}

/// Credentials written into a NATS URL: `nats://user:password@host` or `nats://token@host`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum UrlCredentials {
    UserPassword { user: String, password: String },
    Token(String),
}

/// Split the credentials out of a NATS URL (or a comma-separated list of server URLs), so that
/// the URL can be logged and the credentials used as the explicit user/password or token. The
/// same credentials must be given for every server of a list. `Err` names what is wrong without
/// echoing the credentials.
pub(crate) fn split_url_credentials(url: &str) -> Result<(String, Option<UrlCredentials>), String> {
    let mut found: Option<UrlCredentials> = None;
    let mut servers = Vec::new();
    for server in url.split(',') {
        let (scheme, rest) = server.split_once("://").map_or(("", server), |(s, r)| (s, r));
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let (clean, creds) = match authority.rsplit_once('@') {
            None => (authority, None),
            Some((userinfo, host)) => {
                let creds = match userinfo.split_once(':') {
                    Some((user, password)) => {
                        UrlCredentials::UserPassword { user: percent_decode(user), password: percent_decode(password) }
                    }
                    None => UrlCredentials::Token(percent_decode(userinfo)),
                };
                (host, Some(creds))
            }
        };
        match (&found, creds) {
            (_, None) => {}
            (None, Some(c)) => found = Some(c),
            (Some(f), Some(c)) if *f == c => {}
            (Some(_), Some(_)) => return Err("the servers of the url list carry different credentials".into()),
        }
        servers.push(if scheme.is_empty() { format!("{clean}{path}") } else { format!("{scheme}://{clean}{path}") });
    }
    Ok((servers.join(","), found))
}

/// Move credentials written into the `url` of the NATS section `section` into its user/password
/// or token, so that the URL can be logged and the credentials are used.
pub(crate) fn take_url_credentials(
    section: &str,
    url: &mut String,
    user: &mut Option<String>,
    password: &mut Option<Secret>,
    token: &mut Option<Secret>,
) -> Result<(), Invalid> {
    let field = format!("{section}.url");
    let (clean, creds) = split_url_credentials(url).map_err(|m| Invalid { field: field.clone(), message: m })?;
    let Some(creds) = creds else { return Ok(()) };
    *url = clean;
    if user.is_some() || password.is_some() || token.is_some() {
        return invalid(&field, "carries credentials while the section sets user/password or token too: give them once");
    }
    match creds {
        UrlCredentials::UserPassword { user: u, password: p } => {
            *user = Some(u);
            *password = Some(Secret(p));
        }
        UrlCredentials::Token(t) => *token = Some(Secret(t)),
    }
    Ok(())
}

/// `%XX` escapes of a URL's user info (an `@` or `:` inside a password is written `%40`, `%3A`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a server version ("2.10.0-beta.1") is at least `(major, minor)`.
pub fn at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= wanted
}

#[cfg(test)]
mod tests {
    use super::{split_url_credentials, UrlCredentials};

    #[test]
    fn credentials_leave_the_url() {
        let (url, c) = split_url_credentials("nats://alice:p%40ss:w@127.0.0.1:4222").unwrap();
        assert_eq!(url, "nats://127.0.0.1:4222");
        assert_eq!(c, Some(UrlCredentials::UserPassword { user: "alice".into(), password: "p@ss:w".into() }));
        let (url, c) = split_url_credentials("tls://s3cr3t@a:4222,tls://s3cr3t@b:4222").unwrap();
        assert_eq!(url, "tls://a:4222,tls://b:4222");
        assert_eq!(c, Some(UrlCredentials::Token("s3cr3t".into())));
        assert_eq!(split_url_credentials("nats://h:4222").unwrap(), ("nats://h:4222".into(), None));
        let e = split_url_credentials("nats://a:x@h1,nats://b:y@h2").unwrap_err();
        assert!(!e.contains(":x") && !e.contains(":y"), "{e}");
    }

    #[test]
    fn version_check() {
        assert!(super::at_least("2.9.10", (2, 9)));
        assert!(super::at_least("2.10.0-beta.1", (2, 9)));
        assert!(super::at_least("2.15.1", (2, 10)));
        assert!(!super::at_least("2.9.10", (2, 10)));
        assert!(!super::at_least("2.8.4", (2, 9)));
    }
}
