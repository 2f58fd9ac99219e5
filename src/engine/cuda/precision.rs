//! Which precision the CUDA engine runs, decided from the GPUs' compute capabilities and the
//! configured `model.dtype`, as a pure function (no GPU call; tested here):
//!
//! | dtype  | sm_80, sm_86 (A100, A10, A40)  | sm_89 and later (L4, L40S, H100, H200) |
//! |--------|-------------------------------|------------------------------|
//! | `auto` | bf16                          | fp8                          |
//! | `fp8`  | refused at start              | fp8                          |
//! | `bf16` | bf16                          | bf16                         |
//! | `f32`  | refused (CPU reference only)  | refused                      |
//!
//! GPUs below sm_80 (V100, T4) have no bf16 tensor cores and are refused whatever the dtype.
//! One model runs one precision: with several GPUs, `auto` is FP8 only when every one of them
//! has FP8 tensor cores. `f16` is not a dtype (the config parser lists the valid ones).

use crate::model::Dtype;

/// What the CUDA engine's linear layers compute in. Activations, norms, rotary and attention
/// are bf16 (f32 accumulation) either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// E4M3 weights with per-channel scales, per-token E4M3 activations (sm_89 and later).
    Fp8,
    /// The checkpoint's bf16 weights as they are, bf16 GEMMs (sm_80 and later).
    Bf16,
}

impl Precision {
    /// The [`Dtype`] this precision reports as (`scorestream_model_info`, `inspect`).
    pub fn dtype(self) -> Dtype {
        match self {
            Self::Fp8 => Dtype::Fp8,
            Self::Bf16 => Dtype::Bf16,
        }
    }

    /// Bytes of one weight on the device.
    pub fn weight_bytes(self) -> usize {
        match self {
            Self::Fp8 => 1,
            Self::Bf16 => 2,
        }
    }
}

/// A GPU as the choice sees it: ordinal, name and compute capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFacts {
    pub ordinal: usize,
    pub name: String,
    pub major: i32,
    pub minor: i32,
}

impl GpuFacts {
    /// bf16 tensor cores (`mma.sync` bf16, cuBLASLt bf16): Ampere, compute capability 8.0.
    pub(crate) fn has_bf16(&self) -> bool {
        self.major >= 8
    }

    /// FP8 (E4M3) tensor cores: Ada (8.9), Hopper (9.0) and later.
    pub fn has_fp8(&self) -> bool {
        (self.major, self.minor) >= (8, 9)
    }

    /// What this GPU can run, for error messages.
    pub(crate) fn supports(&self) -> &'static str {
        match (self.has_bf16(), self.has_fp8()) {
            (_, true) => "fp8 and bf16",
            (true, false) => "bf16 only (no FP8 tensor cores before compute capability 8.9)",
            (false, _) => "neither (bf16 tensor cores need compute capability 8.0, Ampere)",
        }
    }
}

impl std::fmt::Display for GpuFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU {} ({}, compute capability {}.{})", self.ordinal, self.name, self.major, self.minor)
    }
}

/// Why a dtype cannot run on the GPUs at hand; the message names the GPU, its capability, what
/// it supports and what to set instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    #[error("{gpu} is not supported by the CUDA engine: it runs {}; use an Ampere (sm_80) or newer GPU, or the CPU engine", gpu.supports())]
    TooOld { gpu: GpuFacts },
    #[error("model.dtype = \"fp8\" cannot run on {gpu}: it supports {}; set model.dtype = \"bf16\" or \"auto\" (fp8 where the GPU has it, else bf16)", gpu.supports())]
    NoFp8 { gpu: GpuFacts },
    #[error("model.dtype = \"f32\" is the CPU reference format; the CUDA engine runs \"fp8\" (compute capability 8.9 and later) or \"bf16\" (8.0 and later): set model.dtype = \"auto\", \"bf16\" or \"fp8\"")]
    F32OnGpu,
    #[error("no GPU to choose a precision for")]
    NoGpu,
}

/// The precision `requested` runs in on every GPU of `gpus` (one model, one precision).
pub fn choose(requested: Dtype, gpus: &[GpuFacts]) -> Result<Precision, PrecisionError> {
    if gpus.is_empty() {
        return Err(PrecisionError::NoGpu);
    }
    if let Some(gpu) = gpus.iter().find(|g| !g.has_bf16()) {
        return Err(PrecisionError::TooOld { gpu: gpu.clone() });
    }
    match requested {
        Dtype::F32 => Err(PrecisionError::F32OnGpu),
        Dtype::Bf16 => Ok(Precision::Bf16),
        Dtype::Fp8 => match gpus.iter().find(|g| !g.has_fp8()) {
            Some(gpu) => Err(PrecisionError::NoFp8 { gpu: gpu.clone() }),
            None => Ok(Precision::Fp8),
        },
        Dtype::Auto => Ok(if gpus.iter().all(GpuFacts::has_fp8) { Precision::Fp8 } else { Precision::Bf16 }),
    }
}

/// The NVRTC architecture of a compute capability: the `a` variant on Hopper and later (wgmma,
/// setmaxnreg), the plain one before.
pub(crate) fn arch_for(major: i32, minor: i32) -> String {
    if major >= 9 { format!("sm_{major}{minor}a") } else { format!("sm_{major}{minor}") }
}

/// Whether the kernels for `arch` (`sm_XY` or `sm_XYa`) include the FP8 ones.
pub(crate) fn arch_has_fp8(arch: &str) -> bool {
    let digits: String = arch.trim_start_matches("sm_").chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<u32>().is_ok_and(|v| v >= 89)
}

/// The architectures prebuilt by `scorestream kernels --arch all` and compiled by the tests:
/// A100 (sm_80); A10, A40, RTX 30xx (sm_86); L4, L40S, RTX 40xx (sm_89); H100, H200 (sm_90a).
/// Other GPUs (sm_87, sm_100a, sm_120a) compile at start-up with NVRTC.
pub const ARCHES: [&str; 4] = ["sm_80", "sm_86", "sm_89", "sm_90a"];

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(ordinal: usize, name: &str, major: i32, minor: i32) -> GpuFacts {
        GpuFacts { ordinal, name: name.into(), major, minor }
    }

    #[test]
    fn capability_times_dtype() {
        let (a100, a10, l40s, h200) = (gpu(0, "A100", 8, 0), gpu(0, "A10", 8, 6), gpu(0, "L40S", 8, 9), gpu(0, "H200", 9, 0));
        let b200 = gpu(0, "B200", 10, 0);
        use Dtype::*;
        use Precision as P;
        let table = [
            (&a100, Auto, Ok(P::Bf16)),
            (&a10, Auto, Ok(P::Bf16)),
            (&l40s, Auto, Ok(P::Fp8)),
            (&h200, Auto, Ok(P::Fp8)),
            (&b200, Auto, Ok(P::Fp8)),
            (&a100, Bf16, Ok(P::Bf16)),
            (&h200, Bf16, Ok(P::Bf16)),
            (&l40s, Fp8, Ok(P::Fp8)),
            (&h200, Fp8, Ok(P::Fp8)),
            (&a100, Fp8, Err(PrecisionError::NoFp8 { gpu: a100.clone() })),
            (&a10, Fp8, Err(PrecisionError::NoFp8 { gpu: a10.clone() })),
            (&h200, F32, Err(PrecisionError::F32OnGpu)),
            (&a100, F32, Err(PrecisionError::F32OnGpu)),
        ];
        for (g, dtype, want) in table {
            assert_eq!(choose(dtype, std::slice::from_ref(g)), want, "{g} {dtype}");
        }
    }

    #[test]
    fn gpus_below_ampere_are_refused_whatever_the_dtype() {
        for dtype in [Dtype::Auto, Dtype::Bf16, Dtype::Fp8, Dtype::F32] {
            let e = choose(dtype, &[gpu(1, "Tesla V100-SXM2-32GB", 7, 0)]).unwrap_err();
            assert!(matches!(e, PrecisionError::TooOld { .. }), "{dtype}: {e}");
        }
        let msg = choose(Dtype::Auto, &[gpu(1, "Tesla T4", 7, 5)]).unwrap_err().to_string();
        assert!(msg.contains("GPU 1 (Tesla T4, compute capability 7.5)") && msg.contains("Ampere (sm_80)"), "{msg}");
    }

    #[test]
    fn the_refusal_names_the_gpu_what_it_supports_and_what_to_set() {
        let msg = choose(Dtype::Fp8, &[gpu(0, "NVIDIA A100-SXM4-80GB", 8, 0)]).unwrap_err().to_string();
        for part in ["GPU 0 (NVIDIA A100-SXM4-80GB, compute capability 8.0)", "bf16 only", "model.dtype = \"bf16\""] {
            assert!(msg.contains(part), "{part} missing: {msg}");
        }
        let msg = choose(Dtype::F32, &[gpu(0, "NVIDIA H200", 9, 0)]).unwrap_err().to_string();
        assert!(msg.contains("CPU reference") && msg.contains("\"auto\""), "{msg}");
        assert_eq!(choose(Dtype::Auto, &[]), Err(PrecisionError::NoGpu));
    }

    #[test]
    fn one_model_runs_one_precision_over_mixed_gpus() {
        let mixed = [gpu(0, "H100", 9, 0), gpu(1, "A100", 8, 0)];
        assert_eq!(choose(Dtype::Auto, &mixed), Ok(Precision::Bf16));
        assert_eq!(choose(Dtype::Fp8, &mixed), Err(PrecisionError::NoFp8 { gpu: mixed[1].clone() }));
        let hoppers = [gpu(0, "H100", 9, 0), gpu(1, "H100", 9, 0)];
        assert_eq!(choose(Dtype::Auto, &hoppers), Ok(Precision::Fp8));
        assert!(matches!(choose(Dtype::Bf16, &[gpu(0, "H100", 9, 0), gpu(1, "T4", 7, 5)]), Err(PrecisionError::TooOld { .. })));
    }

    #[test]
    fn architectures_and_their_fp8_kernels() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 9), "sm_89");
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(10, 0), "sm_100a");
        let fp8: Vec<bool> = ARCHES.iter().map(|a| arch_has_fp8(a)).collect();
        assert_eq!(fp8, [false, false, true, true]);
        assert!(arch_has_fp8("sm_120a") && !arch_has_fp8("sm_87") && !arch_has_fp8("bogus"));
        for a in ARCHES {
            let v: i32 = a[3..5].parse().unwrap();
            assert_eq!(arch_for(v / 10, v % 10), a);
        }
    }
}
