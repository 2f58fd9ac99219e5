//! Kafka clients configured through the pass-through options: a client configured for TLS or
//! SASL wrongly fails at start, clearly (on the mock cluster, and on Apache Kafka for a wrong
//! SCRAM password or an untrusted certificate), and SCRAM-SHA-512 with the right credentials and
//! TLS with the broker's CA score every input (Apache Kafka, `kafka_common/broker.rs`; skipped
//! when not installed, required under CI).

mod common_fixtures;
mod kafka_common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kafka_common::broker::{Broker, SCRAM_USER};
use kafka_common::*;

/// The worker tests each run a model on both cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const TOPICS: [(&str, i32); 3] = [("conv-in", PARTITIONS), ("conv-scored", PARTITIONS), ("conv-dead", PARTITIONS)];

/// `scorestream run` with `extra` in the source's options must exit non-zero within `within`,
/// its error mentioning each of `expected`.
fn assert_fails_to_start(bootstrap: &str, extra: &str, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), bootstrap, "", 0);
    let text = std::fs::read_to_string(&config).unwrap().replace(r#""heartbeat.interval.ms" = "1000""#, &format!(r#""heartbeat.interval.ms" = "1000", {extra}"#));
    std::fs::write(&config, text).unwrap();
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(start.elapsed() < Duration::from_secs(90), "took {:?}", start.elapsed());
    let last = stderr.lines().rev().find(|l| l.starts_with("error:")).unwrap_or_default();
    for e in expected {
        assert!(last.contains(e), "{e:?} not in {last:?}");
    }
}

#[test]
fn a_client_with_wrong_tls_or_sasl_options_fails_at_start_naming_the_cause() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_cluster, bootstrap) = cluster();
    // TLS towards a plaintext listener: the handshake fails; the error names the brokers and
    // librdkafka's reason.
    assert_fails_to_start(&bootstrap, r#""security.protocol" = "SSL""#, &["cannot reach the Kafka brokers at", &bootstrap, "SSL"]);
    // A CA file that does not exist.
    assert_fails_to_start(
        &bootstrap,
        r#""security.protocol" = "SSL", "ssl.ca.location" = "/nonexistent/ca.pem""#,
        &["invalid librdkafka configuration", "ssl.ca.location"],
    );
    // A SASL mechanism librdkafka does not know.
    assert_fails_to_start(
        &bootstrap,
        r#""security.protocol" = "SASL_PLAINTEXT", "sasl.mechanisms" = "NOPE""#,
        &["invalid librdkafka configuration", "NOPE"],
    );
}

/// A worker config at `dir` for `bootstrap` whose three clients (source, sink, dead letter) all
/// use the librdkafka `options` (`"key" = "value", ...`).
fn write_secured_config(dir: &Path, bootstrap: &str, options: &str) -> std::path::PathBuf {
    let config = write_config(dir, bootstrap, "", 0);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(r#""heartbeat.interval.ms" = "1000""#, &format!(r#""heartbeat.interval.ms" = "1000", {options}"#))
        .replace(r#"topic = "conv-scored""#, &format!("topic = \"conv-scored\"\n        options = {{ {options} }}"))
        .replace(r#"topic = "conv-dead""#, &format!("topic = \"conv-dead\"\n        options = {{ {options} }}"));
    std::fs::write(&config, text).unwrap();
    config
}

/// A worker whose clients use `options` against `bootstrap` scores `n` new inputs (read back
/// over `plain`, the broker's plaintext listener) and exits 0 on SIGTERM.
async fn scores_through(plain: &str, bootstrap: &str, options: &str, first: usize, n: usize) {
    let events: Vec<(String, String)> = keyed_events(first + n).split_off(first);
    produce(plain, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_secured_config(dir.path(), bootstrap, options);
    let log = dir.path().join("worker.log");
    let mut worker = spawn(&config, &log);
    let total = first + n;
    let scored = wait_for(plain, "conv-scored", &mut worker, Duration::from_secs(300), move |o| unique_ids(o).len() >= total).await;
    assert_eq!(unique_ids(&scored).len(), total);
    terminate(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_and_tls_logins_succeed_and_wrong_ones_fail_at_start_on_apache_kafka() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(broker) = Broker::start(&TOPICS).await else { return };
    let (user, password) = SCRAM_USER;
    let scram = |password: &str| {
        format!(r#""security.protocol" = "SASL_PLAINTEXT", "sasl.mechanisms" = "SCRAM-SHA-512", "sasl.username" = "{user}", "sasl.password" = "{password}""#)
    };
    // SCRAM-SHA-512 with the user created when the broker's storage was formatted.
    scores_through(&broker.bootstrap, &broker.sasl_bootstrap, &scram(password), 0, 200).await;
    // TLS, the broker's certificate checked against the CA made for it (host name included).
    let tls = format!(r#""security.protocol" = "SSL", "ssl.ca.location" = "{}""#, broker.ca().display());
    scores_through(&broker.bootstrap, &broker.tls_bootstrap, &tls, 200, 200).await;

    // A wrong password: the broker refuses the login, and the error says so.
    assert_fails_to_start(
        &broker.sasl_bootstrap,
        &scram("wrong"),
        &["cannot reach the Kafka brokers at", &broker.sasl_bootstrap, "SASL authentication error", "Authentication failed"],
    );
    // A CA that did not sign the broker's certificate.
    let other = tempfile::tempdir().unwrap();
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=another-ca"])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(made.status.success());
    let untrusted = format!(r#""security.protocol" = "SSL", "ssl.ca.location" = "{}""#, other.path().join("ca.pem").display());
    assert_fails_to_start(&broker.tls_bootstrap, &untrusted, &["cannot reach the Kafka brokers at", "certificate verify failed"]);
}
