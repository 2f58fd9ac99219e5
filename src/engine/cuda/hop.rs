//! Hidden states from one stage to the next. Between two CUDA stages they stay on the GPU: the
//! sending stage copies its bf16 residual stream into one of two input slots of the receiving
//! stage (a device copy when both share a GPU, a peer copy between GPUs), and CUDA events order
//! the streams: the receiver's stream waits for the copy (`ready`), the sender's next copy into
//! that slot waits for the receiver to have taken it (`free`). So the copy of batch `n + 1`
//! runs while the receiver computes batch `n`, with no host round trip and no f32 conversion.
//! A CPU stage on either side keeps the host path (a bf16 tensor in the job).
//!
//! The host side of the hand-off ([`SlotGate`], [`hop_kind`]) is plain Rust, tested here: batch
//! `n` goes into slot `n % 2`, and the sender may record its copy of batch `n` only once the
//! receiver has recorded that it took batch `n - 2` (so the `free` event it waits on is the
//! right one).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::model::DeviceSpec;

/// Input slots per receiving stage.
pub(crate) const SLOTS: usize = 2;

/// How hidden states travel from one stage to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopKind {
    /// Through the host as a bf16 tensor: a CPU stage on either side.
    Host,
    /// A device-to-device copy on one GPU.
    SameDevice { ordinal: usize },
    /// A peer copy from one GPU to another.
    Peer { from: usize, to: usize },
}

impl HopKind {
    pub fn on_device(self) -> bool {
        self != HopKind::Host
    }
}

/// The hop from a stage on `from` to one on `to`.
pub(crate) fn hop_kind(from: DeviceSpec, to: DeviceSpec) -> HopKind {
    match (from, to) {
        (DeviceSpec::Cuda(a), DeviceSpec::Cuda(b)) if a == b => HopKind::SameDevice { ordinal: a },
        (DeviceSpec::Cuda(from), DeviceSpec::Cuda(to)) => HopKind::Peer { from, to },
        _ => HopKind::Host,
    }
}

/// The hop after each stage but the last.
pub(crate) fn hop_kinds(devices: &[DeviceSpec]) -> Vec<HopKind> {
    devices.windows(2).map(|w| hop_kind(w[0], w[1])).collect()
}

/// Why a hop could not take place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("the next stage has not taken batch {waiting_for} of its input slots after {seconds} s")]
    Stalled { waiting_for: u64, seconds: u64 },
    #[error("the next stage is gone")]
    Closed,
}

/// The host-side order of the slots: the sender numbers its hops `0, 1, 2, …`; hop `n` uses
/// slot `n % SLOTS` once the receiver has released hop `n - SLOTS`.
#[derive(Debug, Default)]
pub(crate) struct SlotGate {
    /// Hops released by the receiver (their slot's `free` event recorded), and whether the
    /// receiver is gone.
    state: Mutex<(u64, bool)>,
    changed: Condvar,
}

impl SlotGate {
    /// The sender: the slot of hop `n`, once hop `n - SLOTS` is released. Waits at most
    /// `limit` (the receiver releases a slot as soon as it starts on the batch in it).
    pub(crate) fn acquire(&self, n: u64, limit: Duration) -> Result<usize, HopError> {
        let need = (n + 1).saturating_sub(SLOTS as u64);
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, timeout) = self
            .changed
            .wait_timeout_while(guard, limit, |(released, closed)| *released < need && !*closed)
            .unwrap_or_else(|p| p.into_inner());
        match *guard {
            (released, _) if released >= need => Ok((n % SLOTS as u64) as usize),
            (_, true) => Err(HopError::Closed),
            _ if timeout.timed_out() => Err(HopError::Stalled { waiting_for: need - 1, seconds: limit.as_secs() }),
            _ => unreachable!("wait_timeout_while returns when the condition holds or on timeout"),
        }
    }

    /// The receiver: hop `n` has been taken (its slot may be written again). Hops are released
    /// in order; a hop released twice counts once.
    pub fn release(&self, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = s.0.max(n + 1);
        self.changed.notify_all();
    }

    /// The receiver is gone: senders stop waiting.
    pub fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.changed.notify_all();
    }
}

#[cfg(feature = "cuda")]
pub use gpu::{Arrived, Inbox, Outbox};

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use std::time::Duration;

    use cudarc::driver::sys::{CUevent, CUevent_flags, CUevent_wait_flags};
    use cudarc::driver::result;

    use super::{HopKind, SlotGate, SLOTS};
    use crate::engine::cuda::device::{DeviceBuf, GpuDevice};
    use crate::engine::cuda::CudaError;

    type Result<T> = std::result::Result<T, CudaError>;

    /// How long a sender waits for the receiver to take a slot before failing its batch.
    const STALL_LIMIT: Duration = Duration::from_secs(120);

    /// A raw event handle, shared between the two stage threads (CUDA events may be waited on
    /// from any context and thread).
    #[derive(Debug, Clone, Copy)]
    struct Event(CUevent);
    // SAFETY: a driver handle; the driver API is thread-safe.
    unsafe impl Send for Event {}
    unsafe impl Sync for Event {}

    fn events(dev: &GpuDevice) -> Result<[Event; SLOTS]> {
        dev.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
        // Default flags, as for every event of the engine (tests/gpu_bench_cli.rs).
        let one = || result::event::create(CUevent_flags::CU_EVENT_DEFAULT).map(Event).map_err(CudaError::driver("create a hop event"));
        Ok([one()?, one()?])
    }

    /// The receiving stage's input slots (on its GPU) and the events of both sides.
    pub struct Inbox {
        pub kind: HopKind,
        slots: [DeviceBuf; SLOTS],
        /// Recorded by the receiver once it has copied a slot out.
        free: [Event; SLOTS],
        /// Recorded by the sender once its copy into a slot is queued; set when it attaches.
        ready: std::sync::OnceLock<[Event; SLOTS]>,
        pub(crate) gate: SlotGate,
        receiver_ctx: cudarc::driver::sys::CUcontext,
    }

    // SAFETY: device addresses, driver handles and a mutex-guarded gate.
    unsafe impl Send for Inbox {}
    unsafe impl Sync for Inbox {}

    impl Drop for Inbox {
        fn drop(&mut self) {
            for e in self.free.iter().chain(self.ready.get().into_iter().flatten()) {
                // SAFETY: created by event::create, destroyed once, no longer recorded or
                // waited on (both stages are gone once the last Arc goes).
                let _ = unsafe { result::event::destroy(e.0) };
            }
        }
    }

    impl Inbox {
        /// Input slots of `bytes` each on the receiving stage's GPU.
        pub fn new(dev: &GpuDevice, bytes: usize, kind: HopKind) -> Result<Arc<Self>> {
            let slots = [dev.alloc(bytes)?, dev.alloc(bytes)?];
            let free = events(dev)?;
            let receiver_ctx = dev.ctx.cu_ctx();
            Ok(Arc::new(Self { kind, slots, free, ready: std::sync::OnceLock::new(), gate: SlotGate::default(), receiver_ctx }))
        }

        /// The receiver: make its stream wait for hop `a`'s copy, copy the slot into `x`,
        /// record the slot free and release it (also when a step fails).
        pub fn take(&self, dev: &GpuDevice, a: &Arrived, x: u64) -> Result<()> {
            let release = ReleaseOnDrop(self, a.seq);
            dev.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
            let stream = dev.stream.cu_stream();
            let ready = self.ready.get().ok_or_else(|| CudaError::Shape("a hop arrived before its sender attached".into()))?[a.slot];
            // SAFETY: live events and stream of this process; the slot holds `a.bytes`.
            unsafe {
                result::stream::wait_event(stream, ready.0, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).map_err(CudaError::driver("wait for the hop"))?;
                result::memcpy_dtod_async(x, self.slots[a.slot].ptr, a.bytes, stream).map_err(CudaError::driver("copy the hop input"))?;
                result::event::record(self.free[a.slot].0, stream).map_err(CudaError::driver("record the hop slot free"))?;
            }
            drop(release);
            Ok(())
        }
    }

    struct ReleaseOnDrop<'a>(&'a Inbox, u64);
    impl Drop for ReleaseOnDrop<'_> {
        fn drop(&mut self) {
            self.0.gate.release(self.1);
        }
    }

    /// Hidden states that wait in slot `slot` of the next stage's inbox (hop number `seq`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Arrived {
        pub slot: usize,
        pub seq: u64,
        pub tokens: usize,
        pub bytes: usize,
    }

    /// The sending stage's side: the next stage's inbox and the number of the next hop.
    pub struct Outbox {
        inbox: Arc<Inbox>,
        next: u64,
        sender_ctx: cudarc::driver::sys::CUcontext,
    }

    // SAFETY: as for Inbox.
    unsafe impl Send for Outbox {}

    impl Outbox {
        /// Attach the sender on `dev` to `inbox`: its `ready` events are made in its context.
        pub fn attach(dev: &GpuDevice, inbox: Arc<Inbox>) -> Result<Self> {
            if let HopKind::Peer { to, .. } = inbox.kind {
                enable_peer_access(dev, inbox.receiver_ctx, to);
            }
            let ready = events(dev)?;
            inbox.ready.set(ready).map_err(|_| CudaError::Shape("an inbox with two senders".into()))?;
            Ok(Self { inbox, next: 0, sender_ctx: dev.ctx.cu_ctx() })
        }

        pub fn kind(&self) -> HopKind {
            self.inbox.kind
        }

        /// Copy `bytes` at `x` (this stage's residual stream, `tokens` rows) into the next free
        /// slot of the next stage, on this stage's stream, after the receiver took what was in
        /// it; returns what the next stage takes.
        pub fn send(&mut self, dev: &GpuDevice, x: u64, tokens: usize, bytes: usize) -> Result<Arrived> {
            let seq = self.next;
            let slot = self.inbox.gate.acquire(seq, STALL_LIMIT).map_err(|e| CudaError::Shape(e.to_string()))?;
            dev.ctx.bind_to_thread().map_err(CudaError::driver("bind context"))?;
            let stream = dev.stream.cu_stream();
            let dst = self.inbox.slots[slot].ptr;
            if bytes > self.inbox.slots[slot].bytes {
                return Err(CudaError::Shape(format!("a hop of {bytes} bytes exceeds the input slot of {}", self.inbox.slots[slot].bytes)));
            }
            let ready = self.inbox.ready.get().expect("set by attach")[slot];
            // SAFETY: live events and stream; both buffers hold `bytes`.
            unsafe {
                result::stream::wait_event(stream, self.inbox.free[slot].0, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                    .map_err(CudaError::driver("wait for the next stage's slot"))?;
                let copied = match self.inbox.kind {
                    HopKind::Peer { .. } => result::memcpy_peer_async(self.inbox.receiver_ctx, dst, self.sender_ctx, x, bytes, stream),
                    _ => result::memcpy_dtod_async(dst, x, bytes, stream),
                };
                copied.map_err(CudaError::driver("copy hidden states to the next stage"))?;
                result::event::record(ready.0, stream).map_err(CudaError::driver("record the hop"))?;
            }
            self.next += 1;
            Ok(Arrived { slot, seq, tokens, bytes })
        }
    }

    /// Peer access speeds the copy up (without it the driver stages it through the host); a
    /// GPU pair without it still works, so a refusal is only logged.
    fn enable_peer_access(dev: &GpuDevice, peer: cudarc::driver::sys::CUcontext, to: usize) {
        if dev.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: a live context of this process.
        let r = unsafe { cudarc::driver::sys::cuCtxEnablePeerAccess(peer, 0) };
        use cudarc::driver::sys::cudaError_enum as E;
        match r {
            E::CUDA_SUCCESS | E::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {}
            other => tracing::info!(to, ?other, "peer access from GPU {} to GPU {to} is not available: hops are staged by the driver", dev.ctx.ordinal()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn each_stage_pair_gets_its_hop_kind() {
        use DeviceSpec::{Cpu, Cuda};
        let kinds = hop_kinds(&[Cuda(0), Cuda(0), Cuda(1), Cpu, Cuda(1), Cpu]);
        assert_eq!(
            kinds,
            [HopKind::SameDevice { ordinal: 0 }, HopKind::Peer { from: 0, to: 1 }, HopKind::Host, HopKind::Host, HopKind::Host]
        );
        assert!(hop_kinds(&[Cpu, Cpu]).iter().all(|k| !k.on_device()));
        assert!(hop_kinds(&[Cuda(3)]).is_empty());
    }

    #[test]
    fn the_sender_runs_one_hop_ahead_and_waits_for_the_slot_before() {
        let gate = SlotGate::default();
        let short = Duration::from_millis(20);
        // Hops 0 and 1 take both slots without the receiver.
        assert_eq!(gate.acquire(0, short), Ok(0));
        assert_eq!(gate.acquire(1, short), Ok(1));
        // Hop 2 reuses slot 0: only once hop 0 was taken.
        assert_eq!(gate.acquire(2, short), Err(HopError::Stalled { waiting_for: 0, seconds: 0 }));
        gate.release(0);
        assert_eq!(gate.acquire(2, short), Ok(0));
        assert!(gate.acquire(3, short).is_err());
        gate.release(1);
        assert_eq!(gate.acquire(3, short), Ok(1));
        gate.close();
        assert_eq!(gate.acquire(4, short), Err(HopError::Closed));
    }

    /// The hand-off with the two sides on their own threads, slots as plain memory: the
    /// receiver always finds in a slot the batch it expects, never one written over.
    #[test]
    fn batches_reach_the_receiver_in_order_through_two_slots() {
        let gate = Arc::new(SlotGate::default());
        let slots: Arc<[Mutex<Option<u64>>; SLOTS]> = Arc::new([Mutex::new(None), Mutex::new(None)]);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, usize)>(1);
        let sender = {
            let (gate, slots) = (gate.clone(), slots.clone());
            std::thread::spawn(move || {
                for n in 0..200u64 {
                    let slot = gate.acquire(n, Duration::from_secs(10)).expect("the receiver keeps up");
                    let mut s = slots[slot].lock().unwrap();
                    assert!(s.is_none(), "slot {slot} still holds batch {s:?} when batch {n} arrives");
                    *s = Some(n);
                    drop(s);
                    tx.send((n, slot)).unwrap();
                }
            })
        };
        for want in 0..200u64 {
            let (n, slot) = rx.recv().unwrap();
            assert_eq!((n, slot), (want, (want % 2) as usize));
            if want % 7 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(slots[slot].lock().unwrap().take(), Some(n));
            gate.release(n);
        }
        sender.join().unwrap();
    }
}
