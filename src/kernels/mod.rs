//! Quantized matrix products working directly on GGUF blocks, e.g. in the memory map:
//! `out[r] = dot(row r of W, x)` for one activation row (decode) or many.
//!
//! As in ggml, the activations `x` are quantized once per call (to Q8_K for Q4_K/Q5_K/Q6_K, to
//! Q8_0 for Q8_0/Q4_0) and the dot products run on integers; F16 and F32 weights take `x` as is.
//! Each type has a scalar reference (`reference.rs`) and x86_64 kernels for AVX2 (+FMA, F16C)
//! and AVX-512 VNNI (F/BW/VL/VNNI), chosen at run time ([`level`]).
//!
//! Matrix-matrix products (prompt prefill, batched decode) take `n` activation rows at once
//! ([`Kernels::gemm`]); see `levels.rs` for the kernels each level runs and where its panels start.
//! Each weight type's kernels at each level are one entry of a table ([`find`]), resolved once.
//!
//! Work is split over the current rayon pool, so the caller's `ThreadPool::install` decides the
//! threads.

pub mod attention;
pub mod blocks;
pub mod cpu_info;
pub mod dequantize;
pub mod interleaved;
mod levels;
#[cfg(target_arch = "x86_64")]
mod panel;
pub mod reference;
mod table;
mod tiling;
pub mod vector;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod gemm_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::OnceLock;

use crate::error::{Error, Result};
#[cfg(test)]
pub use table::types;
pub use table::{find, Kernels};

/// The instruction sets a kernel may use, in increasing order.
///
/// All variants exist on every target so that code naming them compiles everywhere; off x86_64
/// only `Scalar` is ever detected and the others are refused by [`gemv_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    Scalar,
    /// AVX2, FMA and F16C.
    Avx2,
    /// The above plus AVX-512 F, BW, VL and VNNI.
    Avx512Vnni,
}

impl CpuLevel {
    pub const ALL: [CpuLevel; 3] = [CpuLevel::Scalar, CpuLevel::Avx2, CpuLevel::Avx512Vnni];

    /// The name `PHI3_CPU` accepts.
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512Vnni => "avx512vnni",
        }
    }

    /// The CPU features the level's kernels are compiled for (each kernel's `target_feature`
    /// list), by the names `is_x86_feature_detected!` takes.
    pub fn features(self) -> &'static [&'static str] {
        match self {
            CpuLevel::Scalar => &[],
            CpuLevel::Avx2 => &["avx2", "fma", "f16c"],
            CpuLevel::Avx512Vnni => &[
                "avx2",
                "fma",
                "f16c",
                "avx512f",
                "avx512bw",
                "avx512vl",
                "avx512vnni",
            ],
        }
    }

    pub fn parse(s: &str) -> Option<CpuLevel> {
        let s = s.trim().to_ascii_lowercase();
        CpuLevel::ALL.into_iter().find(|l| l.name() == s)
    }
}

impl fmt::Display for CpuLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level this CPU supports, ignoring `PHI3_CPU`: the highest whose
/// [`features`](CpuLevel::features) the CPU all has, as `cpu_info` detects them.
pub fn hardware_level() -> CpuLevel {
    static HARDWARE: OnceLock<CpuLevel> = OnceLock::new();
    *HARDWARE.get_or_init(|| {
        if !cfg!(target_arch = "x86_64") {
            return CpuLevel::Scalar;
        }
        let has = cpu_info::detected_features();
        CpuLevel::ALL
            .into_iter()
            .rev()
            .find(|l| l.features().iter().all(|f| has.contains(f)))
            .unwrap_or(CpuLevel::Scalar)
    })
}

/// The level to use given the value of `PHI3_CPU` (if set) and the hardware's level.
///
/// A request above what the hardware has is clamped down to it (asking for AVX-512 on an AVX2
/// machine gets AVX2); an unrecognised value is an error, which [`detect`] answers with the
/// hardware level.
pub fn resolve(requested: Option<&str>, hardware: CpuLevel) -> Result<CpuLevel> {
    match requested.map(str::trim) {
        None | Some("") => Ok(hardware),
        Some(s) => match CpuLevel::parse(s) {
            Some(l) => Ok(l.min(hardware)),
            None => Err(Error::invalid_argument(format!(
                "PHI3_CPU: unknown level {s:?} (expected scalar, avx2 or avx512vnni)"
            ))),
        },
    }
}

/// The level to use: the hardware's, lowered by `PHI3_CPU=scalar|avx2|avx512vnni` if set
/// (never raised above the hardware; an unrecognised value is ignored).
pub fn detect() -> CpuLevel {
    let hw = hardware_level();
    let var = std::env::var("PHI3_CPU").ok();
    resolve(var.as_deref(), hw).unwrap_or(hw)
}

/// [`detect`], once per process.
pub fn level() -> CpuLevel {
    static LEVEL: OnceLock<CpuLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}
