//! The HTTP lane: events posted to `/v1/score` enter the pipeline beside the stream's records,
//! so they join the same micro-batches, and their outputs come back to the request instead of
//! going to a sink.
//!
//! [`Merged`] is the source the pipeline reads: the stream source (none for `scorestream
//! serve`) and the lane. The stream's pending `next()` is kept across calls, never dropped
//! half-way while a posted event goes first, so the stream loses no record to the merge. The
//! lane's records carry [`Origin::Http`]; [`ReplySink`] is where the publish stage sends their
//! outputs (scored events and error records alike): each goes to the request's slot, and is
//! confirmed at once. At most `max_pending_events` posted events wait at a time
//! ([`HttpLane::reserve`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::{Source, SourceError};
use crate::record::{AckHandle, Origin, Record};
use crate::sink::{Confirmation, Outgoing, Sink, SinkError};

/// Where the outputs of posted events wait for their request, by (request, index).
type Slots = Arc<Mutex<HashMap<(u64, u64), oneshot::Sender<Bytes>>>>;

/// The request side of the lane: shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpLane {
    tx: mpsc::Sender<(Bytes, Origin)>,
    slots: Slots,
    pending: Arc<Semaphore>,
    max_pending: usize,
    requests: Arc<AtomicU64>,
}

/// A request's claim on `n` of the pending places; released when dropped.
pub struct Reservation {
    _permit: OwnedSemaphorePermit,
    n: usize,
}

/// Why events could not be submitted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More events than `max_pending_events` in one request: it can never be taken.
    TooMany { max: usize },
    /// The pending places are taken for now.
    Busy,
    /// The pipeline is stopping.
    Closed,
}

impl HttpLane {
    /// Claim places for `n` events, or refuse at once.
    pub fn reserve(&self, n: usize) -> Result<Reservation, Refusal> {
        let count = u32::try_from(n).map_err(|_| Refusal::TooMany { max: self.max_pending })?;
        if n > self.max_pending {
            return Err(Refusal::TooMany { max: self.max_pending });
        }
        let permit = self.pending.clone().try_acquire_many_owned(count).map_err(|_| Refusal::Busy)?;
        Ok(Reservation { _permit: permit, n })
    }

    /// Submit the events of one request (as many as reserved), and wait for their outputs, in
    /// order. `None` when the pipeline stopped before answering them all.
    pub async fn score(&self, reservation: &Reservation, events: Vec<Bytes>) -> Result<Vec<Bytes>, Refusal> {
        debug_assert!(events.len() <= reservation.n);
        let request = self.requests.fetch_add(1, Ordering::Relaxed);
        let _cleanup = Cleanup { slots: self.slots.clone(), request, n: events.len() as u64 };
        let mut replies = Vec::with_capacity(events.len());
        for (index, payload) in events.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let key = (request, index as u64);
            if let Ok(mut slots) = self.slots.lock() {
                slots.insert(key, tx);
            }
            let origin = Origin::Http { request, index: index as u64 };
            self.tx.send((payload, origin)).await.map_err(|_| Refusal::Closed)?;
            replies.push(rx);
        }
        let mut out = Vec::with_capacity(replies.len());
        for rx in replies {
            out.push(rx.await.map_err(|_| Refusal::Closed)?);
        }
        Ok(out)
    }
}

/// Removes a request's slots when it ends (answered, or the client went away), so that a
/// late output finds no slot and is dropped.
struct Cleanup {
    slots: Slots,
    request: u64,
    n: u64,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            for index in 0..self.n {
                slots.remove(&(self.request, index));
            }
        }
    }
}

/// Delivers the outputs of posted events to their requests.
pub struct ReplySink {
    slots: Slots,
}

impl Sink for ReplySink {
    fn publish(&self, msg: Outgoing) -> BoxFuture<'_, Result<Confirmation, SinkError>> {
        if let Origin::Http { request, index } = msg.origin {
            let slot = self.slots.lock().ok().and_then(|mut s| s.remove(&(request, index)));
            if let Some(tx) = slot {
                // The client may have gone away meanwhile: nothing to deliver then.
                let _ = tx.send(msg.payload);
            }
        }
        let confirmed: Confirmation = async { Ok(()) }.boxed();
        async move { Ok(confirmed) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async { Ok(()) }.boxed()
    }
}

/// The stream source (if any) and the HTTP lane, read as one source.
pub struct Merged {
    stream: Option<Arc<tokio::sync::Mutex<Box<dyn Source>>>>,
    pending: Option<BoxFuture<'static, Option<Result<Record, SourceError>>>>,
    lane: mpsc::Receiver<(Bytes, Origin)>,
    connected: watch::Receiver<bool>,
}

/// The pipeline's end of the lane.
pub struct LaneReceiver(mpsc::Receiver<(Bytes, Origin)>);

/// A lane for at most `max_pending` waiting events: the handlers' end, the pipeline's end, and
/// the sink that answers the requests.
pub fn lane(max_pending: usize) -> (HttpLane, LaneReceiver, Arc<ReplySink>) {
    let max_pending = max_pending.clamp(1, Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(max_pending);
    let slots: Slots = Arc::default();
    let http = HttpLane {
        tx,
        slots: slots.clone(),
        pending: Arc::new(Semaphore::new(max_pending)),
        max_pending,
        requests: Arc::default(),
    };
    (http, LaneReceiver(rx), Arc::new(ReplySink { slots }))
}

impl Merged {
    /// Read `stream` (`None`: HTTP only) and the lane as one source.
    pub fn new(stream: Option<Box<dyn Source>>, lane: LaneReceiver) -> Self {
        let connected = match &stream {
            Some(s) => s.connected(),
            None => watch::channel(true).1,
        };
        let stream = stream.map(|s| Arc::new(tokio::sync::Mutex::new(s)));
        Self { stream, pending: None, lane: lane.0, connected }
    }
}

fn posted(payload: Bytes, origin: Origin) -> Record {
    Record { payload, key: None, headers: Vec::new(), origin, ack: AckHandle::noop() }
}

impl Source for Merged {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Record, SourceError>>> {
        async move {
            if self.pending.is_none() {
                if let Some(stream) = &self.stream {
                    let stream = stream.clone();
                    self.pending = Some(async move { stream.lock_owned().await.next().await }.boxed());
                }
            }
            let Self { pending, lane, .. } = self;
            tokio::select! {
                Some((payload, origin)) = lane.recv() => Some(Ok(posted(payload, origin))),
                r = async {
                    match pending.as_mut() {
                        Some(next) => next.await,
                        None => std::future::pending().await,
                    }
                }, if pending.is_some() => {
                    *pending = None;
                    r
                }
                // Only reached without a stream once the lane closed.
                else => None,
            }
        }
        .boxed()
    }

    fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    fn drain(&mut self) {
        // Fetching has stopped: a record the stream was about to hand over is left to the
        // broker's redelivery, as the fetch stage does on a stop.
        self.pending = None;
        if let Some(stream) = &self.stream {
            if let Ok(mut s) = stream.try_lock() {
                s.drain();
            }
        }
    }

    fn close(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SourceError>> {
        self.pending = None;
        match self.stream.take().map(Arc::try_unwrap) {
            Some(Ok(stream)) => stream.into_inner().close(),
            _ => async { Ok(()) }.boxed(),
        }
    }
}
