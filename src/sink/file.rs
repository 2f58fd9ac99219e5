//! The `file` sink: one JSON line per message to a file or stdout, for local runs.
//!
//! A writer task owns the file and writes messages in publish order; it flushes whenever its
//! queue runs empty, and a message is confirmed once the flush that covers it succeeded. A write
//! or flush that fails is fatal ([`SinkError::Fatal`]): the writer keeps its first error and
//! refuses every later message (a line cut short in the middle cannot be mended by retrying).

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

use super::{Confirmation, Outgoing, Sink, SinkContext, SinkError};
use super::FileSinkConfig;

/// Queue depth between the pipeline and the writer task.
const QUEUE: usize = 1024;

/// What the writer reports: its first I/O error, shared by every message it fails.
type Written = Result<(), Arc<std::io::Error>>;

enum Job {
    Write(bytes::Bytes, oneshot::Sender<Written>),
    Flush(oneshot::Sender<Written>),
}

/// Writes JSON lines through a writer task.
pub(crate) struct FileSink {
    tx: mpsc::Sender<Job>,
    path: String,
}

impl FileSink {
    pub async fn open(config: &FileSinkConfig, _ctx: SinkContext) -> Result<Self, SinkError> {
        let path = config.path.display().to_string();
        let out: Box<dyn AsyncWrite + Send + Unpin> = if config.path == Path::new("-") {
            Box::new(tokio::io::stdout())
        } else {
            let file = tokio::fs::File::create(&config.path)
                .await
                .map_err(|source| SinkError::Io { path: path.clone(), source })?;
            Box::new(file)
        };
        Ok(Self::from_writer(out, path))
    }

    /// A sink over any writer.
    pub(crate) fn from_writer(out: Box<dyn AsyncWrite + Send + Unpin>, path: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(writer(BufWriter::with_capacity(1 << 16, out), rx));
        Self { tx, path }
    }

    fn stopped(&self) -> SinkError {
        stopped(&self.path)
    }
}

fn stopped(path: &str) -> SinkError {
    SinkError::Fatal { kind: "file", message: format!("the writer of {path} has stopped"), source: None }
}

/// What a failed write or flush of `path` becomes.
fn confirmed(path: &str, written: Result<Written, oneshot::error::RecvError>) -> Result<(), SinkError> {
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SinkError::Fatal { kind: "file", message: format!("cannot write {path}"), source: Some(Box::new(e)) }),
        Err(_) => Err(stopped(path)),
    }
}

/// Write jobs in order; flush when the queue is empty, then confirm what the flush covered.
async fn writer(mut out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>, mut rx: mpsc::Receiver<Job>) {
    let mut waiting: Vec<oneshot::Sender<Written>> = Vec::new();
    let mut failed: Option<Arc<std::io::Error>> = None;
    while let Some(job) = rx.recv().await {
        let mut next = Some(job);
        while let Some(job) = next.take() {
            match job {
                Job::Write(line, done) => {
                    if failed.is_none() {
                        let res = async {
                            out.write_all(&line).await?;
                            out.write_all(b"\n").await
                        }
                        .await;
                        failed = res.err().map(Arc::new);
                    }
                    waiting.push(done);
                }
                Job::Flush(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        if failed.is_none() {
            failed = out.flush().await.err().map(Arc::new);
        }
        for done in waiting.drain(..) {
            let _ = done.send(failed.clone().map_or(Ok(()), Err));
        }
    }
}

impl Sink for FileSink {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            self.tx.send(Job::Write(msg.payload, done)).await.map_err(|_| self.stopped())?;
            let path = self.path.clone();
            let confirmation: Confirmation = Box::pin(async move { confirmed(&path, rx.await) });
            Ok(confirmation)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            let (done, rx) = oneshot::channel();
            self.tx.send(Job::Flush(done)).await.map_err(|_| self.stopped())?;
            confirmed(&self.path, rx.await)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::record::Origin;
    use crate::sink::OutputKind;

    /// A writer whose every write fails (a full disk, a closed pipe).
    struct Broken;
    impl AsyncWrite for Broken {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Err(std::io::Error::other("no space left")))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::Error::other("no space left")))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn message(line: u64) -> Outgoing {
        Outgoing {
            key: None,
            headers: Vec::new(),
            payload: bytes::Bytes::from_static(b"{}"),
            dedup_id: None,
            first_publish: true,
            kind: OutputKind::Scored,
            sink: None,
            origin: Origin::File { path: "in".into(), line },
        }
    }

    /// A failed write is fatal, keeps its cause, and fails every later message too.
    #[tokio::test]
    async fn a_failed_write_is_fatal_with_its_cause() {
        let sink = FileSink::from_writer(Box::new(Broken), "out.jsonl".into());
        for line in 1..=2 {
            let e = sink.publish(message(line)).await.unwrap().await.unwrap_err();
            assert!(e.is_fatal(), "{e:?}");
            assert_eq!(crate::error::Chain(&e).to_string(), "the file sink failed for good: cannot write out.jsonl: no space left");
        }
        assert!(sink.flush().await.unwrap_err().is_fatal());
    }
}
