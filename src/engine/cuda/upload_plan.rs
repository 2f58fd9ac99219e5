//! The on-device load, free of any GPU call: a stage's weight tensors ([`Piece`]s) cut into
//! chunks of rows that fit one staging buffer, and the pipeline that moves them: reader
//! threads copy chunks out of the memory-mapped shards (this is where the disk is read) into a
//! few host buffers (pinned, on the GPU), converting them on the way where needed, while the
//! stage's thread starts the upload (and quantization) of the chunks before. Buffers go to the
//! readers in chunk order and come back once their upload has finished, so at most `buffers`
//! chunks are read ahead and nothing is read twice.
//!
//! Guarantees (tested here with a fake uploader): chunks are uploaded in order, each exactly
//! once, at the rows of its tensor; chunk `i + 1` is read before the upload of chunk `i` is
//! waited for (read and upload overlap); several readers read at once; a host buffer is
//! handed back only after the upload that reads it has finished, also when the load fails
//! half-way.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// What the device does with a chunk's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// The bytes are the weight as it runs (bf16, or an FP8 checkpoint's E4M3 codes): copied to
    /// their rows.
    Copy,
    /// bf16 rows staged on the device, then quantized per row (`quant_rows_bf16`) into E4M3
    /// codes at their rows and f32 scales.
    Quantize,
}

/// How the reader turns stored bytes into uploaded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Convert {
    AsIs,
    /// f16 → bf16, rounding to nearest even (what the host path's f32 → bf16 gives).
    F16ToBf16,
    /// f32 → bf16, rounding to nearest even.
    F32ToBf16,
}

impl Convert {
    /// Bytes per element on disk and uploaded.
    pub fn sizes(self, stored: usize) -> (usize, usize) {
        match self {
            Convert::AsIs => (stored, stored),
            Convert::F16ToBf16 => (2, 2),
            Convert::F32ToBf16 => (4, 2),
        }
    }

    /// Convert `src` (whole elements) into `dst` (`src.len() / stored * uploaded` bytes).
    pub(crate) fn apply(self, src: &[u8], dst: &mut [u8]) {
        match self {
            Convert::AsIs => dst.copy_from_slice(src),
            Convert::F16ToBf16 => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(2)) {
                    let v = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
                    d.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
            Convert::F32ToBf16 => {
                for (d, s) in dst.chunks_exact_mut(2).zip(src.chunks_exact(4)) {
                    let v = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    d.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
                }
            }
        }
    }
}

/// One stored 2-D tensor (`[rows, cols]`, row-major) and where its rows land on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The checkpoint name.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    /// Bytes per stored element.
    pub stored: usize,
    pub(crate) convert: Convert,
    pub(crate) op: Op,
    /// Device address of the piece's first row: bf16 values or E4M3 codes.
    pub(crate) dest: u64,
    /// Device address of the first row's f32 scale ([`Op::Quantize`] only).
    pub scales: u64,
}

impl Piece {
    /// Bytes of one row uploaded (bf16 staged for quantization, or as it runs).
    pub(crate) fn row_upload_bytes(&self) -> usize {
        self.cols * self.convert.sizes(self.stored).1
    }
    /// Bytes of one row on disk.
    pub(crate) fn row_stored_bytes(&self) -> usize {
        self.cols * self.stored
    }
    /// Bytes of one row as it stays on the device (E4M3 + its scale after quantization).
    pub(crate) fn row_device_bytes(&self) -> usize {
        match self.op {
            Op::Copy => self.row_upload_bytes(),
            Op::Quantize => self.cols + 4,
        }
    }
}

/// Rows `first_row..first_row + rows` of piece `piece`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub piece: usize,
    pub(crate) first_row: usize,
    pub rows: usize,
}

/// Cut each piece into chunks of whole rows of at most `max_bytes` uploaded (one row at least).
pub fn chunks(pieces: &[Piece], max_bytes: usize) -> Vec<Chunk> {
    let mut out = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        let per = (max_bytes / p.row_upload_bytes().max(1)).max(1);
        let mut first_row = 0;
        while first_row < p.rows {
            let rows = per.min(p.rows - first_row);
            out.push(Chunk { piece: i, first_row, rows });
            first_row += rows;
        }
    }
    out
}

/// What a load moved and how long it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadStats {
    pub chunks: usize,
    /// Bytes read from the checkpoint.
    pub read_bytes: usize,
    /// Bytes copied to the device.
    pub(crate) uploaded_bytes: usize,
    /// Bytes the weights take on the device.
    pub(crate) device_bytes: usize,
    pub seconds: f64,
    /// Time the readers spent filling buffers (summed over them), and the stage's thread
    /// waiting for uploads.
    pub read_seconds: f64,
    pub wait_seconds: f64,
}

impl LoadStats {
    /// Checkpoint bytes read per second (decimal GB/s).
    pub(crate) fn read_gb_per_s(&self) -> f64 {
        self.read_bytes as f64 / 1e9 / self.seconds.max(1e-9)
    }

    /// The byte accounting of `chunks` of `pieces`, without timings.
    pub fn of(pieces: &[Piece], chunks: &[Chunk]) -> Self {
        let mut s = LoadStats { chunks: chunks.len(), ..Default::default() };
        for c in chunks {
            let p = &pieces[c.piece];
            s.read_bytes += c.rows * p.row_stored_bytes();
            s.uploaded_bytes += c.rows * p.row_upload_bytes();
            s.device_bytes += c.rows * p.row_device_bytes();
        }
        s
    }
}

/// The device side of the pipeline.
pub(crate) trait Uploader {
    type Ticket;
    type Error;
    /// Queue the upload (and, for [`Op::Quantize`], the quantization) of `chunk` from `host`
    /// (its uploaded bytes); `host` stays untouched until the ticket is finished.
    fn start(&mut self, piece: &Piece, chunk: &Chunk, index: usize, host: &[u8]) -> Result<Self::Ticket, Self::Error>;
    /// Wait until the work of `ticket` is done.
    fn finish(&mut self, ticket: Self::Ticket) -> Result<(), Self::Error>;
}

/// Host buffers handed to the readers in chunk order: the reader of chunk `i` gets a buffer
/// only after the readers of every chunk before it did, so a buffer never waits in a later
/// chunk while the chunk the uploader needs next has none (no deadlock, whatever the number
/// of readers and buffers).
struct Pool<B> {
    state: Mutex<(Vec<B>, usize, bool)>,
    changed: Condvar,
}

impl<B> Pool<B> {
    fn new(buffers: Vec<B>) -> Self {
        Self { state: Mutex::new((buffers, 0, false)), changed: Condvar::new() }
    }

    /// A buffer for chunk `turn`, once every earlier chunk has one; `None` once closed.
    fn take(&self, turn: usize) -> Option<B> {
        let guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self.changed.wait_while(guard, |(free, next, closed)| !*closed && (*next != turn || free.is_empty())).unwrap_or_else(|p| p.into_inner());
        if s.2 {
            return None;
        }
        s.1 += 1;
        let b = s.0.pop();
        self.changed.notify_all();
        b
    }

    fn give(&self, b: B) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.push(b);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2 = true;
        self.changed.notify_all();
    }
}

type Filled<B, E> = Result<(usize, B, Duration), E>;

/// Move `chunks` of `pieces` through `buffers` (each at least as large as the largest chunk):
/// `readers` threads, each with its own reader from `make_reader`, read chunks `r, r +
/// readers, …` (`read(piece, chunk, index, out)` fills `out` with the chunk's uploaded bytes);
/// `up` uploads them in order on this thread. Up to `buffers - readers` uploads are in flight
/// (at least one) while the readers fill the other buffers.
pub fn run<B, U, F, R>(pieces: &[Piece], chunks: &[Chunk], buffers: Vec<B>, readers: usize, make_reader: F, up: &mut U) -> Result<LoadStats, U::Error>
where
    B: AsMut<[u8]> + AsRef<[u8]> + Send,
    U: Uploader,
    U::Error: Send,
    F: Fn() -> R,
    R: FnMut(&Piece, &Chunk, usize, &mut [u8]) -> Result<(), U::Error> + Send,
{
    let started = Instant::now();
    let readers = readers.clamp(1, buffers.len().max(1));
    let in_flight_limit = buffers.len().saturating_sub(readers).max(1);
    let pool = Pool::new(buffers);
    let mut stats = LoadStats::of(pieces, chunks);
    let result = std::thread::scope(|s| {
        let mut filled = Vec::with_capacity(readers);
        for r in 0..readers {
            let (tx, rx) = sync_channel::<Filled<B, U::Error>>(1);
            filled.push(rx);
            let (pool, mut read) = (&pool, make_reader());
            s.spawn(move || reader(pieces, chunks, r, readers, pool, tx, &mut read));
        }
        let result = upload_all(pieces, chunks, in_flight_limit, &filled, &pool, up, &mut stats);
        // Whatever happened, the readers end: those waiting for a buffer see the pool closed,
        // those waiting to hand one over see their channel gone.
        pool.close();
        drop(filled);
        result
    });
    stats.seconds = started.elapsed().as_secs_f64();
    result.map(|()| stats)
}

fn reader<B: AsMut<[u8]>, E>(
    pieces: &[Piece],
    chunks: &[Chunk],
    first: usize,
    step: usize,
    pool: &Pool<B>,
    filled: SyncSender<Filled<B, E>>,
    read: &mut impl FnMut(&Piece, &Chunk, usize, &mut [u8]) -> Result<(), E>,
) {
    for i in (first..chunks.len()).step_by(step) {
        let Some(mut buf) = pool.take(i) else { return };
        let (c, t) = (&chunks[i], Instant::now());
        let p = &pieces[c.piece];
        let len = c.rows * p.row_upload_bytes();
        let message = match read(p, c, i, &mut buf.as_mut()[..len]) {
            Ok(()) => Ok((i, buf, t.elapsed())),
            Err(e) => Err(e),
        };
        let failed = message.is_err();
        if filled.send(message).is_err() || failed {
            return;
        }
    }
}

fn upload_all<B: AsRef<[u8]>, U: Uploader>(
    pieces: &[Piece],
    chunks: &[Chunk],
    in_flight_limit: usize,
    filled: &[Receiver<Filled<B, U::Error>>],
    pool: &Pool<B>,
    up: &mut U,
    stats: &mut LoadStats,
) -> Result<(), U::Error> {
    let mut in_flight: VecDeque<(U::Ticket, B)> = VecDeque::new();
    let outcome = (|| {
        for (expected, c) in chunks.iter().enumerate() {
            // Each reader sends its every chunk, or an error and stops; it ends otherwise only
            // by panicking.
            let Ok(message) = filled[expected % filled.len()].recv() else { panic!("a reader thread of the load stopped") };
            let (i, buf, read) = message?;
            debug_assert_eq!(i, expected, "chunks arrive in order");
            stats.read_seconds += read.as_secs_f64();
            let p = &pieces[c.piece];
            let ticket = up.start(p, c, i, &buf.as_ref()[..c.rows * p.row_upload_bytes()])?;
            in_flight.push_back((ticket, buf));
            while in_flight.len() >= in_flight_limit {
                let (ticket, buf) = in_flight.pop_front().expect("non-empty");
                let t = Instant::now();
                up.finish(ticket)?;
                stats.wait_seconds += t.elapsed().as_secs_f64();
                pool.give(buf);
            }
        }
        Ok(())
    })();
    // Every started upload finishes before its buffer can be dropped or reused, error or not.
    let mut drained = Ok(());
    while let Some((ticket, _buf)) = in_flight.pop_front() {
        let r = up.finish(ticket);
        if drained.is_ok() {
            drained = r;
        }
    }
    outcome.and(drained)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The fake device: a byte array written at `dest`, with a log shared with the reader.
    struct Fake {
        memory: Vec<u8>,
        log: Arc<Mutex<Vec<String>>>,
        fail_at: Option<usize>,
        in_flight: usize,
        most_in_flight: usize,
        finished: Vec<usize>,
    }

    impl Uploader for Fake {
        type Ticket = usize;
        type Error = String;
        fn start(&mut self, p: &Piece, c: &Chunk, index: usize, host: &[u8]) -> Result<usize, String> {
            if self.fail_at == Some(index) {
                return Err(format!("upload of chunk {index} failed"));
            }
            self.log.lock().unwrap().push(format!("start {index}"));
            let at = p.dest as usize + c.first_row * p.row_upload_bytes();
            self.memory[at..at + host.len()].copy_from_slice(host);
            self.in_flight += 1;
            self.most_in_flight = self.most_in_flight.max(self.in_flight);
            Ok(index)
        }
        fn finish(&mut self, index: usize) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("finish {index}"));
            self.in_flight -= 1;
            self.finished.push(index);
            Ok(())
        }
    }

    /// Two bf16 tensors and one f32 one converted to bf16, laid out one after the other.
    fn pieces() -> (Vec<Piece>, Vec<Vec<u8>>) {
        let piece = |name: &str, rows: usize, cols: usize, stored: usize, convert, dest| Piece {
            name: name.into(), rows, cols, stored, convert, op: Op::Copy, dest, scales: 0,
        };
        let a = piece("a", 10, 8, 2, Convert::AsIs, 0);
        let b = piece("b", 3, 8, 2, Convert::AsIs, 160);
        let c = piece("c", 5, 4, 4, Convert::F32ToBf16, 208);
        let data = |p: &Piece, seed: u8| -> Vec<u8> {
            if p.stored == 4 {
                (0..p.rows * p.cols).flat_map(|i| (i as f32 * 0.37 + f32::from(seed)).to_le_bytes()).collect()
            } else {
                (0..p.rows * p.row_stored_bytes()).map(|i| (i as u8).wrapping_mul(seed)).collect()
            }
        };
        let stored = vec![data(&a, 3), data(&b, 7), data(&c, 1)];
        (vec![a, b, c], stored)
    }

    /// The device memory once every chunk of [`pieces`] landed at its place: a and b as
    /// stored, c converted to bf16.
    fn landed(stored: &[Vec<u8>]) -> Vec<u8> {
        let mut c_bf16 = vec![0u8; 40];
        Convert::F32ToBf16.apply(&stored[2], &mut c_bf16);
        [stored[0].clone(), stored[1].clone(), c_bf16].concat()
    }

    fn fake(log: &Arc<Mutex<Vec<String>>>, fail_at: Option<usize>) -> Fake {
        Fake { memory: vec![0; 248], log: log.clone(), fail_at, in_flight: 0, most_in_flight: 0, finished: Vec::new() }
    }

    /// A reader over `stored` (one byte vector per piece) that logs each chunk it read and the
    /// thread that read it.
    fn reader_of(stored: &[Vec<u8>], pieces: &[Piece], log: &Arc<Mutex<Vec<String>>>) -> impl Fn() -> Box<dyn FnMut(&Piece, &Chunk, usize, &mut [u8]) -> Result<(), String> + Send> {
        let (stored, pieces, log) = (stored.to_vec(), pieces.to_vec(), log.clone());
        move || {
            let (stored, pieces, log) = (stored.clone(), pieces.clone(), log.clone());
            Box::new(move |p: &Piece, c: &Chunk, index: usize, out: &mut [u8]| {
                let src = &stored[pieces.iter().position(|q| q.name == p.name).unwrap()];
                let bytes = &src[c.first_row * p.row_stored_bytes()..(c.first_row + c.rows) * p.row_stored_bytes()];
                p.convert.apply(bytes, out);
                log.lock().unwrap().push(format!("read {index} on {:?}", std::thread::current().id()));
                Ok(())
            })
        }
    }

    /// The log without the reading threads.
    fn events(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        log.lock().unwrap().iter().map(|l| l.split(" on ").next().unwrap_or_default().to_owned()).collect()
    }

    #[test]
    fn chunks_are_whole_rows_within_the_staging_size() {
        let (p, _) = pieces();
        let c = chunks(&p, 48);
        // a: 16 bytes a row, 3 rows a chunk: 3+3+3+1; b: 3; c: 8 bytes uploaded a row, 6 a chunk: 5.
        let rows: Vec<(usize, usize, usize)> = c.iter().map(|c| (c.piece, c.first_row, c.rows)).collect();
        assert_eq!(rows, [(0, 0, 3), (0, 3, 3), (0, 6, 3), (0, 9, 1), (1, 0, 3), (2, 0, 5)]);
        // A row larger than the staging size is still one chunk.
        assert_eq!(chunks(&p[..1], 1).len(), 10);
        let s = LoadStats::of(&p, &c);
        assert_eq!((s.read_bytes, s.uploaded_bytes, s.device_bytes), (160 + 48 + 80, 160 + 48 + 40, 248));
        let q = Piece { op: Op::Quantize, ..p[0].clone() };
        // Quantized: one E4M3 byte and a 4-byte scale per row stay on the device.
        assert_eq!(LoadStats::of(&[q], &chunks(&p[..1], 48)).device_bytes, 10 * (8 + 4));
    }

    #[test]
    fn chunks_land_in_order_at_their_rows_with_reads_ahead_of_uploads() {
        let (p, stored) = pieces();
        let c = chunks(&p, 48);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut up = fake(&log, None);
        let buffers = vec![vec![0u8; 48]; 3];
        let stats = run(&p, &c, buffers, 1, reader_of(&stored, &p, &log), &mut up).unwrap();
        assert_eq!(up.memory, landed(&stored));
        assert_eq!(up.finished, (0..c.len()).collect::<Vec<_>>());
        assert_eq!(stats, LoadStats { seconds: stats.seconds, read_seconds: stats.read_seconds, wait_seconds: stats.wait_seconds, ..LoadStats::of(&p, &c) });
        // Overlap: chunk i + 1 was read before the upload of chunk i was waited for, and no
        // more uploads were in flight than buffers less the one being read.
        let log = events(&log);
        let at = |e: String| log.iter().position(|l| *l == e).unwrap_or_else(|| panic!("{e} missing from {log:?}"));
        for i in 0..c.len() - 1 {
            assert!(at(format!("read {}", i + 1)) < at(format!("finish {i}")), "{log:?}");
            assert!(at(format!("start {i}")) < at(format!("start {}", i + 1)), "{log:?}");
        }
        assert!(up.most_in_flight <= 2, "{log:?}");
        // A buffer is reused only once its upload finished: with 3 buffers, chunk i + 3 is
        // read after chunk i's upload is done.
        for i in 0..c.len().saturating_sub(3) {
            assert!(at(format!("finish {i}")) < at(format!("read {}", i + 3)), "{log:?}");
        }
    }

    #[test]
    fn a_failed_upload_waits_for_the_started_ones_and_stops_the_reader() {
        let (p, stored) = pieces();
        let c = chunks(&p, 48);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut up = fake(&log, Some(3));
        let e = run(&p, &c, vec![vec![0u8; 48]; 3], 1, reader_of(&stored, &p, &log), &mut up).unwrap_err();
        assert_eq!(e, "upload of chunk 3 failed");
        assert_eq!(up.in_flight, 0, "every started upload was waited for");
        let reads = log.lock().unwrap().iter().filter(|l| l.starts_with("read")).count();
        assert!(reads < c.len(), "the reader stopped early: {reads} of {}", c.len());
    }

    #[test]
    fn a_failed_read_is_the_load_error() {
        let (p, _) = pieces();
        let c = chunks(&p, 48);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut up = fake(&log, None);
        let read = || |_: &Piece, _: &Chunk, index: usize, _: &mut [u8]| if index == 1 { Err("disk gone".to_owned()) } else { Ok(()) };
        assert_eq!(run(&p, &c, vec![vec![0u8; 48]; 3], 1, read, &mut up).unwrap_err(), "disk gone");
        assert_eq!(up.in_flight, 0);
        // With several readers too, whichever chunk fails.
        for readers in [2, 3] {
            let mut up = fake(&log, None);
            assert_eq!(run(&p, &c, vec![vec![0u8; 48]; 4], readers, read, &mut up).unwrap_err(), "disk gone");
            assert_eq!(up.in_flight, 0);
        }
    }

    /// Three readers over many small chunks: every byte in place, uploads in order, reads
    /// spread over the threads, and never more buffers out than there are.
    #[test]
    fn several_readers_read_at_once_and_the_uploads_stay_in_order() {
        let (p, stored) = pieces();
        let c = chunks(&p, 16);
        assert_eq!(c.len(), 10 + 3 + 3);
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut up = fake(&log, None);
        run(&p, &c, vec![vec![0u8; 16]; 5], 3, reader_of(&stored, &p, &log), &mut up).unwrap();
        assert_eq!(up.memory, landed(&stored));
        assert_eq!(up.finished, (0..c.len()).collect::<Vec<_>>());
        assert!(up.most_in_flight <= 2, "5 buffers less 3 readers");
        let raw = log.lock().unwrap().clone();
        let threads: std::collections::HashSet<&str> = raw.iter().filter_map(|l| l.split(" on ").nth(1)).collect();
        assert_eq!(threads.len(), 3, "{raw:?}");
        let log = events(&log);
        let at = |e: String| log.iter().position(|l| *l == e).unwrap_or_else(|| panic!("{e} missing from {log:?}"));
        for i in 0..c.len() - 5 {
            // Chunk i + 5 reuses the buffer of an upload at or before chunk i.
            assert!(at(format!("finish {i}")) < at(format!("read {}", i + 5)), "{log:?}");
        }
    }

    /// The device path quantizes each staged chunk of bf16 rows with `quant_rows_bf16`, whose
    /// CPU reference is [`fp8::quantize_rows`] (the kernel computes `fmaxf(amax, MIN_AMAX) /
    /// E4M3_MAX` and `to_e4m3(x / scale)` per row, with IEEE division: NVRTC runs without
    /// fast math). Row by row and chunk by chunk, that gives the codes and scales the host path
    /// computes over the whole fused q|k|v weight, and the CPU engine's FP8 weights too.
    #[test]
    fn quantizing_chunks_of_rows_on_the_device_gives_the_host_path_bit_for_bit() {
        use crate::engine::reference::fp8;
        let (cols, outs) = (96usize, [64usize, 16, 16]);
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // bf16-exact values over many magnitudes, a few exact zeros rows' worth.
            let v = ((rng >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2f32.powi((rng % 20) as i32 - 14);
            half::bf16::from_f32(v)
        };
        let rows: usize = outs.iter().sum();
        let mut w: Vec<half::bf16> = (0..rows * cols).map(|_| next()).collect();
        w[5 * cols..6 * cols].iter_mut().for_each(|v| *v = half::bf16::ZERO);
        let f32s: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        // The host path: the fused weight as f32, quantized at once.
        let (host_codes, host_scales) = fp8::quantize_rows(&f32s, cols);
        // The device path: one piece per tensor, chunks of at most 7 rows staged as bf16 bytes.
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut start = 0;
        let pieces: Vec<Piece> = outs
            .iter()
            .map(|&r| {
                let p = Piece { name: format!("rows {start}"), rows: r, cols, stored: 2, convert: Convert::AsIs, op: Op::Quantize, dest: start as u64, scales: 0 };
                start += r;
                p
            })
            .collect();
        let (mut codes, mut scales) = (vec![0u8; rows * cols], vec![0f32; rows]);
        for c in chunks(&pieces, 7 * cols * 2) {
            let p = &pieces[c.piece];
            let first = p.dest as usize + c.first_row;
            let mut staged = vec![0u8; c.rows * p.row_upload_bytes()];
            p.convert.apply(&bytes[first * cols * 2..(first + c.rows) * cols * 2], &mut staged);
            let x: Vec<f32> = staged.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
            let (q, s) = fp8::quantize_rows(&x, cols);
            codes[first * cols..(first + c.rows) * cols].copy_from_slice(&q);
            scales[first..first + c.rows].copy_from_slice(&s);
        }
        assert_eq!(codes, host_codes);
        assert_eq!(scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>(), host_scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>());
        // The CPU engine's FP8 weights (candle) are the same codes and scales.
        let t = candle_core::Tensor::from_vec(f32s, (rows, cols), &candle_core::Device::Cpu).unwrap();
        let (q, s) = crate::model::fp8::quantize_tensor_rows(&t).unwrap();
        let cpu_values: Vec<u32> = q.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect();
        let values: Vec<u32> = codes.iter().map(|&c| fp8::e4m3_to_f32(c).to_bits()).collect();
        assert_eq!(cpu_values, values);
        let cpu_scales: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(cpu_scales, scales);
    }

    /// The kernel still computes what the reference above does (a tripwire for edits to
    /// kernels/fp8.cu that would break the bit-for-bit match the GPU check verifies).
    #[test]
    fn the_quantization_kernel_computes_the_reference_formula() {
        let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/fp8.cu")).expect("kernels/fp8.cu");
        let body = src.split("quant_rows_bf16").nth(1).expect("the kernel").split("extern \"C\"").next().unwrap_or_default();
        assert!(body.contains("amax = fmaxf(amax, fabsf(") && body.contains("quantize_row(x + base, cols, amax, q + base, q_scale + blockIdx.x)"), "quant_rows_bf16 changed:\n{body}");
        // The row's codes and scale: `quantize_row` in common.cuh (16-byte and scalar paths).
        let common = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.cuh")).expect("common.cuh");
        let row = common.split("void quantize_row(").nth(1).expect("quantize_row").split("\n}\n").next().unwrap_or_default();
        for part in ["const float scale = fmaxf(amax, MIN_AMAX) / E4M3_MAX", "to_e4m3(f[k] / scale)", "to_e4m3(bf(vals[i]) / scale)", "*scale_out = scale"] {
            assert!(row.contains(part), "{part:?} missing from quantize_row:\n{row}");
        }
        assert!(common.contains("#define E4M3_MAX 448.0f") && common.contains("#define MIN_AMAX 1e-12f"));
        #[cfg(feature = "cuda")]
        assert!(!crate::engine::cuda::compile::compile_options("sm_90a", &[]).iter().any(|o| o.contains("fast_math") || o.contains("prec-div=false")));
    }

    #[test]
    fn conversions_round_as_the_host_path_does() {
        let vals = [1.0f32, -2.5, 3.141_592_7, 1e-8, 65504.0, 0.1];
        let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![0u8; 12];
        Convert::F32ToBf16.apply(&f32_bytes, &mut out);
        let want: Vec<u8> = vals.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(out, want);
        let f16_bytes: Vec<u8> = vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        Convert::F16ToBf16.apply(&f16_bytes, &mut out);
        let want: Vec<u8> = vals.iter().flat_map(|&v| half::bf16::from_f32(half::f16::from_f32(v).to_f32()).to_le_bytes()).collect();
        assert_eq!(out, want);
    }
}
