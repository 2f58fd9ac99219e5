//! The start-up check of a source, run before the model loads so that a configuration mistake
//! (a wrong address, TLS setting or credentials, a missing secret file, stream, topic or input
//! file) fails in seconds, not after a long load. It opens nothing that consumes: the source is
//! opened for real once the model is ready.

use super::SourceConfig;

use super::SourceError;

/// Reach the source's broker with its credentials and check that what it reads exists.
pub async fn check(config: &SourceConfig) -> Result<(), SourceError> {
    match config {
        SourceConfig::File(c) if c.path == std::path::Path::new("-") => Ok(()),
        SourceConfig::File(c) => tokio::fs::File::open(&c.path)
            .await
            .map(drop)
            .map_err(|source| SourceError::Io { path: c.path.display().to_string(), source }),
        SourceConfig::Kafka(c) => {
            let open_err = |e: crate::kafka::ClientError| SourceError::Open {
                kind: "kafka",
                message: e.to_string(),
                source: e.into_source(),
            };
            let client = crate::kafka::client_config(&c.brokers, &[], &c.options, &c.option_files).map_err(open_err)?;
            // A subscription pattern (`^…`) may match topics that do not exist yet.
            let topics: Vec<String> = c.topics.iter().filter(|t| !t.starts_with('^')).cloned().collect();
            let brokers = c.brokers.clone();
            tokio::task::spawn_blocking(move || {
                let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
                crate::kafka::check_reachable(&client, &brokers, &topics)
            })
            .await
            .map_err(|e| SourceError::Open { kind: "kafka", message: "the start-up check failed".into(), source: Some(Box::new(e)) })?
            .map_err(open_err)
        }
        SourceConfig::Nats(c) => {
            let open_err = |message: String, source: Box<dyn std::error::Error + Send + Sync>| SourceError::Open {
                kind: "nats",
                message,
                source: Some(source),
            };
            let client = crate::nats::connect(&crate::nats::connection_of!(c), "scorestream-check")
                .await
                .map_err(|e| open_err(e.to_string(), Box::new(e)))?;
            let js = async_nats::jetstream::new(client);
            js.get_stream(&c.stream)
                .await
                .map_err(|e| open_err(format!("JetStream stream {:?} is not available", c.stream), Box::new(e)))?;
            Ok(())
        }
    }
}
