//! The on-device load, free of any GPU call: a stage's weight tensors ([`Piece`]s) cut into
//! chunks of rows that fit one staging buffer, and the pipeline that moves them: a reader
//! thread copies each chunk out of the memory-mapped shard (this is where the disk is read)
//! into one of a few host buffers (pinned, on the GPU), converting it on the way where needed,
//! while the stage's thread starts the upload (and quantization) of the chunk before. A
//! bounded channel carries full buffers one way and a second one empty buffers back, so at
//! most `buffers` chunks are read ahead and nothing is read twice.
//!
//! Guarantees (tested here with a fake uploader): chunks are uploaded in order, each exactly
//! once, at the rows of its tensor; chunk `i + 1` is read before the upload of chunk `i` is
//! waited for (read and upload overlap); a host buffer is handed back to the reader only after
//! the upload that reads it has finished, also when the load fails half-way.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

/// What the device does with a chunk's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The bytes are the weight as it runs (bf16, or an FP8 checkpoint's E4M3 codes): copied to
    /// their rows.
    Copy,
    /// bf16 rows staged on the device, then quantized per row (`quant_rows_bf16`) into E4M3
    /// codes at their rows and f32 scales.
    Quantize,
}

/// How the reader turns stored bytes into uploaded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convert {
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
    pub fn apply(self, src: &[u8], dst: &mut [u8]) {
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
    pub convert: Convert,
    pub op: Op,
    /// Device address of the piece's first row: bf16 values or E4M3 codes.
    pub dest: u64,
    /// Device address of the first row's f32 scale ([`Op::Quantize`] only).
    pub scales: u64,
}

impl Piece {
    /// Bytes of one row uploaded (bf16 staged for quantization, or as it runs).
    pub fn row_upload_bytes(&self) -> usize {
        self.cols * self.convert.sizes(self.stored).1
    }
    /// Bytes of one row on disk.
    pub fn row_stored_bytes(&self) -> usize {
        self.cols * self.stored
    }
    /// Bytes of one row as it stays on the device (E4M3 + its scale after quantization).
    pub fn row_device_bytes(&self) -> usize {
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
    pub first_row: usize,
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
    pub uploaded_bytes: usize,
    /// Bytes the weights take on the device.
    pub device_bytes: usize,
    pub seconds: f64,
    /// Time the reader spent filling buffers, and the stage's thread waiting for uploads.
    pub read_seconds: f64,
    pub wait_seconds: f64,
}

impl LoadStats {
    /// Checkpoint bytes read per second (decimal GB/s).
    pub fn read_gb_per_s(&self) -> f64 {
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
pub trait Uploader {
    type Ticket;
    type Error;
    /// Queue the upload (and, for [`Op::Quantize`], the quantization) of `chunk` from `host`
    /// (its uploaded bytes); `host` stays untouched until the ticket is finished.
    fn start(&mut self, piece: &Piece, chunk: &Chunk, index: usize, host: &[u8]) -> Result<Self::Ticket, Self::Error>;
    /// Wait until the work of `ticket` is done.
    fn finish(&mut self, ticket: Self::Ticket) -> Result<(), Self::Error>;
}

/// Move `chunks` of `pieces` through `buffers` (each at least as large as the largest chunk):
/// `read(piece, chunk, out)` fills `out` (the chunk's uploaded bytes) on a reader thread,
/// `up` uploads on this one. At most `buffers.len() - 1` uploads are in flight while the
/// reader fills the last buffer.
pub fn run<B, U, R>(pieces: &[Piece], chunks: &[Chunk], buffers: Vec<B>, mut read: R, up: &mut U) -> Result<LoadStats, U::Error>
where
    B: AsMut<[u8]> + AsRef<[u8]> + Send,
    U: Uploader,
    U::Error: Send,
    R: FnMut(&Piece, &Chunk, &mut [u8]) -> Result<(), U::Error> + Send,
{
    let started = Instant::now();
    let n = buffers.len().max(2);
    let (free_tx, free_rx) = sync_channel::<B>(n);
    let (full_tx, full_rx) = sync_channel::<Result<(usize, B, Duration), U::Error>>(n);
    for b in buffers {
        free_tx.send(b).expect("the channel holds every buffer");
    }
    let mut stats = LoadStats::of(pieces, chunks);
    let result = std::thread::scope(|s| {
        s.spawn(move || reader(pieces, chunks, free_rx, full_tx, &mut read));
        let result = upload_all(pieces, chunks, n, full_rx, &free_tx, up, &mut stats);
        // Whatever happened, the reader ends: its receiver of free buffers goes with `free_tx`.
        drop(free_tx);
        result
    });
    stats.seconds = started.elapsed().as_secs_f64();
    result.map(|()| stats)
}

fn reader<B: AsMut<[u8]>, E>(
    pieces: &[Piece],
    chunks: &[Chunk],
    free: Receiver<B>,
    full: SyncSender<Result<(usize, B, Duration), E>>,
    read: &mut impl FnMut(&Piece, &Chunk, &mut [u8]) -> Result<(), E>,
) {
    for (i, c) in chunks.iter().enumerate() {
        let Ok(mut buf) = free.recv() else { return };
        let p = &pieces[c.piece];
        let t = Instant::now();
        let len = c.rows * p.row_upload_bytes();
        let message = match read(p, c, &mut buf.as_mut()[..len]) {
            Ok(()) => Ok((i, buf, t.elapsed())),
            Err(e) => Err(e),
        };
        let failed = message.is_err();
        if full.send(message).is_err() || failed {
            return;
        }
    }
}

fn upload_all<B: AsRef<[u8]>, U: Uploader>(
    pieces: &[Piece],
    chunks: &[Chunk],
    buffers: usize,
    full: Receiver<Result<(usize, B, Duration), U::Error>>,
    free: &SyncSender<B>,
    up: &mut U,
    stats: &mut LoadStats,
) -> Result<(), U::Error> {
    let mut in_flight: VecDeque<(U::Ticket, B)> = VecDeque::new();
    let outcome = (|| {
        for (expected, c) in chunks.iter().enumerate() {
            // The reader sends every chunk or an error; it stops only by panicking.
            let Ok(message) = full.recv() else { panic!("the reader thread of the load stopped") };
            let (i, buf, read) = message?;
            debug_assert_eq!(i, expected, "the reader keeps the order");
            stats.read_seconds += read.as_secs_f64();
            let p = &pieces[c.piece];
            let ticket = up.start(p, c, i, &buf.as_ref()[..c.rows * p.row_upload_bytes()])?;
            in_flight.push_back((ticket, buf));
            while in_flight.len() >= buffers - 1 {
                let (ticket, buf) = in_flight.pop_front().expect("non-empty");
                let t = Instant::now();
                up.finish(ticket)?;
                stats.wait_seconds += t.elapsed().as_secs_f64();
                // The reader may have stopped (it failed); the buffer is then simply dropped.
                let _ = free.try_send(buf);
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

    fn fake(log: &Arc<Mutex<Vec<String>>>, fail_at: Option<usize>) -> Fake {
        Fake { memory: vec![0; 248], log: log.clone(), fail_at, in_flight: 0, most_in_flight: 0, finished: Vec::new() }
    }

    fn reader_of(stored: Vec<Vec<u8>>, pieces: Vec<Piece>, log: Arc<Mutex<Vec<String>>>) -> impl FnMut(&Piece, &Chunk, &mut [u8]) -> Result<(), String> + Send {
        let mut index = 0;
        move |p: &Piece, c: &Chunk, out: &mut [u8]| {
            let src = &stored[pieces.iter().position(|q| q.name == p.name).unwrap()];
            let bytes = &src[c.first_row * p.row_stored_bytes()..(c.first_row + c.rows) * p.row_stored_bytes()];
            p.convert.apply(bytes, out);
            log.lock().unwrap().push(format!("read {index}"));
            index += 1;
            Ok(())
        }
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
        let stats = run(&p, &c, buffers, reader_of(stored.clone(), p.clone(), log.clone()), &mut up).unwrap();
        // Every byte at its place: a and b as stored, c converted to bf16.
        let mut want = [stored[0].clone(), stored[1].clone()].concat();
        let mut c_bf16 = vec![0u8; 40];
        Convert::F32ToBf16.apply(&stored[2], &mut c_bf16);
        want.extend(c_bf16);
        assert_eq!(up.memory, want);
        assert_eq!(up.finished, (0..c.len()).collect::<Vec<_>>());
        assert_eq!(stats, LoadStats { seconds: stats.seconds, read_seconds: stats.read_seconds, wait_seconds: stats.wait_seconds, ..LoadStats::of(&p, &c) });
        // Overlap: chunk i + 1 was read before the upload of chunk i was waited for, and no
        // more uploads were in flight than buffers less the one being read.
        let log = log.lock().unwrap().clone();
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
        let e = run(&p, &c, vec![vec![0u8; 48]; 3], reader_of(stored, p.clone(), log.clone()), &mut up).unwrap_err();
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
        let mut n = 0;
        let read = move |_: &Piece, _: &Chunk, _: &mut [u8]| {
            n += 1;
            if n == 2 { Err("disk gone".to_owned()) } else { Ok(()) }
        };
        assert_eq!(run(&p, &c, vec![vec![0u8; 48]; 3], read, &mut up).unwrap_err(), "disk gone");
        assert_eq!(up.in_flight, 0);
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
        let (q, s) = crate::model::fp8::quantize_rows(&t).unwrap();
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
        for part in ["fmaxf(amax, MIN_AMAX) / E4M3_MAX", "to_e4m3(bf(x[base + i]) / scale)", "q_scale[blockIdx.x] = scale"] {
            assert!(body.contains(part), "{part:?} missing from quant_rows_bf16:\n{body}");
        }
        let common = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/common.cuh")).expect("common.cuh");
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
