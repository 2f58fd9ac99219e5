//! The `file` source: JSONL from a file or stdin, one record per non-blank line, for local runs.
//!
//! Acks are no-ops: a file has no position to commit. The source ends at end of file, and the
//! worker then drains and exits.

use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::watch;

use super::{FileSourceConfig, Source, SourceContext, SourceError};
use crate::record::{AckHandle, Origin, Record};

/// Reads lines of a file (or stdin for "-").
pub(crate) struct FileSource {
    reader: Box<dyn AsyncBufRead + Send + Unpin>,
    path: String,
    line: u64,
    connected: watch::Sender<bool>,
    buf: Vec<u8>,
}

impl FileSource {
    pub async fn open(config: &FileSourceConfig, _ctx: SourceContext) -> Result<Self, SourceError> {
        let path = config.path.display().to_string();
        let reader: Box<dyn AsyncBufRead + Send + Unpin> = if config.path == Path::new("-") {
            Box::new(BufReader::new(tokio::io::stdin()))
        } else {
            let file = tokio::fs::File::open(&config.path)
                .await
                .map_err(|source| SourceError::Io { path: path.clone(), source })?;
            Box::new(BufReader::with_capacity(1 << 16, file))
        };
        Ok(Self::from_reader(reader, path))
    }

    /// A source over any buffered reader (tests, stdin).
    pub(crate) fn from_reader(reader: Box<dyn AsyncBufRead + Send + Unpin>, path: String) -> Self {
        let (connected, _) = watch::channel(true);
        Self { reader, path, line: 0, connected, buf: Vec::new() }
    }

    async fn read_record(&mut self) -> Option<Result<Record, SourceError>> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(source) => return Some(Err(SourceError::Io { path: self.path.clone(), source })),
            }
            self.line += 1;
            let line = trim_line_end(&self.buf);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Some(Ok(Record {
                payload: Bytes::copy_from_slice(line),
                key: None,
                headers: Vec::new(),
                origin: Origin::File { path: self.path.clone(), line: self.line },
                ack: AckHandle::noop(),
            }));
        }
    }
}

fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

impl Source for FileSource {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        Box::pin(self.read_record())
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_non_blank_lines_with_their_numbers() {
        let data: &'static [u8] = b"{\"a\":1}\r\n\n  \n\xff\xfe\n{\"b\":2}";
        let mut s = FileSource::from_reader(Box::new(BufReader::new(data)), "t".into());
        let mut got = Vec::new();
        while let Some(r) = s.next().await {
            let r = r.unwrap();
            let Origin::File { line, .. } = r.origin else { panic!("origin") };
            got.push((line, r.payload));
        }
        assert_eq!(
            got,
            vec![
                (1, Bytes::from_static(b"{\"a\":1}")),
                (4, Bytes::from_static(b"\xff\xfe")),
                (5, Bytes::from_static(b"{\"b\":2}"))
            ]
        );
    }
}
