//! `scorestream run` against a real nats-server with JetStream (Debian's 2.9 package, started
//! here on loopback): every input lands scored or dead-lettered, rewards equal
//! `scorestream score`, every input is acked, SIGTERM exits 0; wrong credentials fail clearly.

mod common_fixtures;
mod nats_support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use nats_support::{count, create_streams, events, publish_all, read_all, setup_streams, setup_streams_as, spawn_worker, write_config, NatsServer};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_is_scored_or_dead_lettered_and_acked() {
    // Room for a 10 MB input and its dead letter (the server's default limit is 1 MB).
    let Some(server) = NatsServer::start("max_payload: 16MB") else { return };
    let js = setup_streams(&server.url()).await;
    let events = events(10_000);
    let good: Vec<&str> = events.iter().map(String::as_str).collect();
    let huge = format!(
        r#"{{"id":"huge","messages":[{{"role":"user","content":"{}"}},{{"role":"assistant","content":"4"}}]}}"#,
        "2+2 ".repeat(10 << 18)
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let bad: [(&[u8], &str); 5] = [
        (b"{oops", "invalid_json"),
        (b"\xff\xfe", "invalid_utf8"),
        (br#"{"id":"e","messages":[]}"#, "invalid_conversation"),
        (huge.as_bytes(), "oversized"),
        (deep.as_bytes(), "invalid_json"),
    ];
    // Bad inputs in the middle of the good ones: good events keep flowing around them.
    let (first, second) = good.split_at(good.len() / 2);
    publish_all(&js, first).await;
    for (payload, _) in &bad {
        js.publish("conv.in", payload.to_vec().into()).await.unwrap().await.unwrap();
    }
    publish_all(&js, second).await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = write_config(dir.path(), &server.url(), "", port);
    let mut worker = spawn_worker(&config);
    let sent = (good.len() + bad.len()) as u64;
    let start = Instant::now();
    while count(&js, "SCORED").await + count(&js, "DEAD").await < sent {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < Duration::from_secs(180), "timed out: not every input was published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Rewards equal `scorestream score` on the same events.
    assert_eq!(good.len(), 10_000);
    let reference = common_fixtures::score_cli_rewards(dir.path(), &good);
    let out = read_all(&js, "SCORED").await;
    assert_eq!(out.len(), good.len());
    let ids: Vec<&str> = out.iter().map(|o| o["id"].as_str().unwrap()).collect();
    let want: Vec<String> = good.iter().map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>(), "one stream: outputs in input order");
    for o in &out {
        let id = o["id"].as_str().unwrap();
        assert!((o["reward"].as_f64().unwrap() - reference[id]).abs() < 1e-5 * reference[id].abs().max(1.0), "{id}");
    }
    let dead = read_all(&js, "DEAD").await;
    let kinds: Vec<&str> = dead.iter().map(|d| d["error"]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, bad.iter().map(|(_, k)| *k).collect::<Vec<_>>());
    assert_eq!(dead[3]["payload"].as_str().unwrap().len(), huge.len(), "the 10 MB payload is kept whole");
    assert_eq!(dead[4]["payload"].as_str().unwrap(), deep);
    assert!(dead.iter().all(|d| d["source"]["stream"] == "CONV" && d["source"]["sequence"].as_u64().unwrap() > 0));
    // SIGTERM: drains and exits 0; then nothing is left unacknowledged.
    assert!(Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    let mut consumer: jetstream::consumer::PullConsumer = js.get_stream("CONV").await.unwrap().get_consumer("scorestream").await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0), "every input acked");
}

/// A worker with `auth` against a server with `server_auth` fails at start, saying the NATS
/// server refused the authorization, and never prints the secret `secret`.
fn assert_refused(server_auth: &str, auth: &str, secret: &str) {
    let Some(server) = NatsServer::start(server_auth) else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), auth, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("nats") && err.contains("authorization"), "{err}");
    assert!(!err.contains(secret), "the secret is never printed: {err}");
}

#[test]
fn wrong_credentials_fail_with_a_clear_error() {
    assert_refused("authorization { user: scorer, password: right }", "user = \"scorer\"\n        password = \"n0tright\"", "n0tright");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_replays_are_deduplicated() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let events = events(3_000);
    let lines: Vec<&str> = events.iter().map(String::as_str).collect();
    publish_all(&js, &lines).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &server.url(), "", 0);
    // Kill the worker three times while it is publishing, then let a fourth one finish.
    let mut published_before_kill = Vec::new();
    for round in 0..3 {
        let mut worker = spawn_worker(&config);
        let target = 500 * (round + 1) as u64;
        let start = Instant::now();
        while count(&js, "SCORED").await < target {
            assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
            assert!(start.elapsed() < Duration::from_secs(180), "timed out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worker.kill().unwrap(); // SIGKILL: no drain, no acks for what was in flight
        worker.wait().unwrap();
        published_before_kill.push(count(&js, "SCORED").await);
    }
    let mut worker = spawn_worker(&config);
    let start = Instant::now();
    while count(&js, "SCORED").await + count(&js, "DEAD").await < lines.len() as u64 {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < Duration::from_secs(300), "timed out: inputs were lost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let redeliveries of anything unacked play out, then stop gracefully.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap().success());
    assert!(worker.wait().unwrap().success());
    let out = read_all(&js, "SCORED").await;
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for o in &out {
        *seen.entry(o["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let missing: Vec<&&str> = lines
        .iter()
        .filter(|l| !seen.contains_key(serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap()))
        .collect();
    assert!(missing.is_empty(), "{} inputs lost", missing.len());
    let duplicates: usize = seen.values().map(|c| c - 1).sum();
    println!("after 3 kills ({published_before_kill:?} published at each): {} outputs, {duplicates} duplicates", out.len());
    // Replays carry the same Nats-Msg-Id, so JetStream drops them; any duplicate that got through
    // is bounded by what was in flight at each kill.
    assert!(duplicates <= 3 * 64, "{duplicates} duplicates");
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    for ca in ["ca", "other-ca"] {
        run(&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &format!("{ca}.key"), "-out", &format!("{ca}.pem"), "-days", "1", "-subj", &format!("/CN={ca}")]);
    }
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_user_and_password_works_and_a_wrong_ca_fails_clearly() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let Some(server) = NatsServer::start(&format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\nauthorization {{ user: scorer, password: s3cret }}",
        p("server.pem"),
        p("server.key")
    )) else { return };
    let client = async_nats::ConnectOptions::new()
        .user_and_password("scorer".into(), "s3cret".into())
        .add_root_certificates(certs.path().join("ca.pem"))
        .require_tls(true)
        .connect(server.url())
        .await
        .unwrap();
    let js = setup_streams_as(client).await;
    let events = events(20);
    publish_all(&js, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let auth = |ca: &str| format!("user = \"scorer\"\n        password = \"s3cret\"\n        tls = {{ ca_file = \"{}\" }}", p(ca));
    let mut worker = spawn_worker(&write_config(dir.path(), &server.url(), &auth("ca.pem"), 0));
    let start = Instant::now();
    while count(&js, "SCORED").await < 20 {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
        assert!(start.elapsed() < Duration::from_secs(120), "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Command::new("kill").args(["-TERM", &worker.id().to_string()]).status().unwrap().success());
    assert!(worker.wait().unwrap().success());
    // A CA that did not sign the server's certificate: refused, with a TLS error.
    let config = write_config(dir.path(), &server.url(), &auth("other-ca.pem"), 0);
    let out = Command::new(env!("CARGO_BIN_EXE_scorestream")).args(["run", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("nats") && (err.contains("tls") || err.contains("certificate")), "{err}");
}

#[test]
fn a_wrong_token_fails_with_a_clear_error() {
    assert_refused("authorization { token: \"s3cret\" }", "token = \"n0tright\"", "n0tright");
}

/// The `scorestream_consumer_lag` series of the CONV stream on the worker's /metrics, if any.
async fn exported_lag(port: u16) -> Option<i64> {
    // Not listening yet (the worker is starting): no series.
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let text = nats_support::metrics_text(port).await;
    let line = text.lines().find(|l| l.starts_with("scorestream_consumer_lag{") && l.contains("topic=\"CONV\""))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_pending_count_is_exported_as_lag() {
    let Some(server) = NatsServer::start("") else { return };
    let js = setup_streams(&server.url()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = nats_support::free_port();
    let config = nats_support::write_config_with(dir.path(), &server.url(), "", port, |t| {
        t.replace("max_inflight_events = 64", "max_inflight_events = 8")
            .replace("ack_wait = \"3s\"", "ack_wait = \"3s\"\n        lag_interval = \"200ms\"")
    });
    let mut worker = spawn_worker(&config);
    let wait = |what: &'static str| {
        let start = Instant::now();
        move |worker: &mut std::process::Child| {
            assert!(worker.try_wait().unwrap().is_none(), "the worker exited early");
            assert!(start.elapsed() < Duration::from_secs(180), "timed out waiting for {what}");
        }
    };
    // Idle: the series exists and reads 0.
    let check = wait("a lag of 0 on the idle stream");
    while exported_lag(port).await != Some(0) {
        check(&mut worker);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The scored stream goes away: the worker's publishes are retried, it holds its in-flight
    // bound, and the rest of the input stays pending on the server.
    js.delete_stream("SCORED").await.unwrap();
    let n = 400;
    publish_all(&js, &events(n)).await;
    let check = wait("the exported lag to equal the server's pending count");
    loop {
        check(&mut worker);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (_, pending, _) = nats_support::consumer_state(&js, "CONV", "scorestream").await;
        if pending > 0 && exported_lag(port).await == Some(pending as i64) {
            assert!(pending <= n as u64);
            break;
        }
    }
    // The scored stream is back: the backlog drains and the lag follows it down to 0.
    create_streams(&js, &[("SCORED", "conv.scored")]).await;
    let check = wait("the backlog to drain and the lag to reach 0");
    while count(&js, "SCORED").await < n as u64 || exported_lag(port).await != Some(0) {
        check(&mut worker);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(nats_support::terminate(worker).success());
}
