//! The HTTP endpoints: every metric name is exported on /metrics, /healthz answers, and /readyz
//! only turns ready once the model is loaded, warmed up and the source is connected.

use std::sync::Arc;

use scorestream::http::{serve, Readiness};
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

#[tokio::test]
async fn endpoints_report_metrics_health_and_readiness() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let readiness = Arc::new(Readiness::default());
    let (stop_tx, stop) = watch::channel(false);
    let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), readiness.clone(), stop).await.unwrap();

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
