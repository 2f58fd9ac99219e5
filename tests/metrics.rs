//! The HTTP endpoints: every metric name is exported on /metrics, /healthz fails when work
//! stalls, /readyz only turns ready once the model is loaded, warmed up and the source is
//! connected; idle and half-sent connections cannot make the endpoints unreachable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use scorestream::config::HttpConfig;
use scorestream::health::Liveness;
use scorestream::http::{serve, Endpoints, Readiness};
use scorestream::metrics::{Metrics, NAMES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn config(stall_timeout: Duration, header_timeout: Duration, max_connections: usize) -> HttpConfig {
    HttpConfig { listen: "127.0.0.1:0".parse().unwrap(), stall_timeout, header_timeout, max_connections, ..HttpConfig::default() }
}

fn endpoints(metrics: &Arc<Metrics>, readiness: &Arc<Readiness>, liveness: &Arc<Liveness>) -> Endpoints {
    Endpoints { metrics: metrics.clone(), readiness: readiness.clone(), liveness: liveness.clone(), score: None }
}

#[tokio::test]
async fn endpoints_report_metrics_health_and_readiness() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(Liveness::default());
    let (stop_tx, stop) = watch::channel(false);
    let http = config(Duration::from_millis(300), Duration::from_secs(5), 16);
    let (addr, server) = serve(&http, endpoints(&metrics, &readiness, &liveness), stop).await.unwrap();

    metrics.events_consumed.with_label_values(&["kafka"]).inc_by(3);
    metrics.events_failed.with_label_values(&["invalid_json"]).inc();
    metrics.consumer_lag.with_label_values(&["conversations", "0"]).set(7);
    metrics.reward.with_label_values(&["reward"]).observe(1.5);
    metrics.set_model_info("arith", "f32", &["cpu".to_owned()]);
    metrics.update_stage_busy(&[0.25], &["cpu".to_owned()]);

    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in NAMES {
        assert!(body.contains(&format!("# TYPE {name} ")), "{name} is not exported");
    }
    assert!(body.contains("scorestream_events_consumed_total{source=\"kafka\"} 3"), "{body}");
    assert!(body.contains("scorestream_events_failed_total{reason=\"invalid_json\"} 1"));
    assert!(body.contains("scorestream_consumer_lag{partition=\"0\",topic=\"conversations\"} 7"));
    assert!(body.contains("scorestream_model_info{device=\"cpu\",dtype=\"f32\",model=\"arith\"} 1"));

    assert_eq!(get(addr, "/healthz").await.0, 200);
    // Events in flight and none finishing, a publish being retried: /healthz says so.
    metrics.inflight_events.set(4);
    liveness.retrying("the nats sink could not publish: no responders".into());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, why) = get(addr, "/healthz").await;
    assert_eq!(status, 503);
    assert!(why.contains("4 in flight") && why.contains("no responders"), "{why}");
    liveness.progress();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    metrics.inflight_events.set(0);
    let (status, why) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(why.contains("model not loaded") && why.contains("source not connected"), "{why}");
    readiness.set_model_loaded();
    readiness.set_warmed_up();
    let (connected_tx, connected) = watch::channel(false);
    readiness.set_source(connected);
    assert_eq!(get(addr, "/readyz").await, (503, "source not connected\n".to_owned()));
    connected_tx.send(true).unwrap();
    assert_eq!(get(addr, "/readyz").await.0, 200);

    stop_tx.send(true).unwrap();
    server.await.unwrap();
}

/// Idle connections past the cap and half-sent requests: the endpoints stay reachable, and a
/// connection that never completes its request header is closed after the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_cannot_lock_out_the_probes() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let readiness = Arc::new(Readiness::default());
    let liveness = Arc::new(Liveness::default());
    let (stop_tx, stop) = watch::channel(false);
    let http = config(Duration::from_secs(60), Duration::from_secs(1), 32);
    let (addr, server) = serve(&http, endpoints(&metrics, &readiness, &liveness), stop).await.unwrap();

    // 300 connections that never send a byte, and 50 that stop mid-header.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /heal").await.unwrap();
        idle.push(s);
    }
    // The probe answers while they are open (retrying while the cap closes new connections).
    let start = Instant::now();
    let status = loop {
        let attempt = tokio::time::timeout(Duration::from_secs(2), async {
            let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.ok()?;
            buf.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok())
        })
        .await;
        if let Ok(Some(status)) = attempt {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "/healthz unreachable behind idle connections");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200);

    // Every idle or half-sent connection is closed by the server within the header timeout (or
    // at once, past the cap): reading gives end of file, never a hang.
    for mut s in idle {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a connection stayed open past the header timeout");
    }
    stop_tx.send(true).unwrap();
    server.await.unwrap();
}
