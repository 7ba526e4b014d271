//! Which kernels [`level`] chose and why: the instruction set the build was compiled for, the CPU
//! features seen at run time, and how `PHI3_CPU` was taken. `phi3.cpu_info()` and
//! `phi3 --version` show it, so that a bug report says what ran.

use std::sync::OnceLock;

use super::{hardware_level, level, resolve, CpuLevel};

/// How a `PHI3_CPU` value was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverrideStatus {
    /// A level this CPU has: used as asked.
    Honoured,
    /// A level above this CPU's: lowered to the CPU's best.
    Clamped,
    /// Not a level's name: ignored, the CPU's best is used.
    Invalid,
}

impl OverrideStatus {
    pub fn name(self) -> &'static str {
        match self {
            OverrideStatus::Honoured => "honoured",
            OverrideStatus::Clamped => "clamped",
            OverrideStatus::Invalid => "invalid",
        }
    }
}

/// A non-empty `PHI3_CPU` and how it was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub value: String,
    pub status: OverrideStatus,
}

/// What phi3 knows about the CPU it runs on and the kernels it uses there.
#[derive(Debug, Clone)]
pub struct CpuInfo {
    /// The architecture and OS of the build (Rust's names: `x86_64`, `aarch64`; `linux`, ...).
    pub arch: &'static str,
    pub os: &'static str,
    /// The instruction set every part of the build (candle included) may use unconditionally:
    /// `x86-64-v3` for the published x86_64 wheels, `armv8-a+fp16` on aarch64.
    pub baseline: &'static str,
    /// The features of [`CpuInfo::features`] that the baseline includes.
    pub baseline_features: Vec<&'static str>,
    /// Each feature phi3 looks at, and whether the CPU has it with the OS enabling it.
    pub features: Vec<(&'static str, bool)>,
    /// Whether cpuid claims AMX (tiles and int8). phi3's own kernels never use it (some machines
    /// claim it but fault on its instructions); candle's Q4_K prefill does where Linux grants the
    /// process AMX state.
    pub amx_claimed: bool,
    /// The best level this CPU supports.
    pub hardware_level: CpuLevel,
    /// `PHI3_CPU`, when set to something other than blanks.
    pub requested: Option<Override>,
    /// The level in use.
    pub level: CpuLevel,
    /// One sentence on why `level` was chosen.
    pub reason: String,
}

impl CpuInfo {
    /// The levels this CPU can run, lowest first (what `PHI3_CPU` can usefully ask for).
    pub fn available_levels(&self) -> Vec<CpuLevel> {
        CpuLevel::ALL
            .into_iter()
            .filter(|&l| l <= self.hardware_level)
            .collect()
    }
}

/// The information, gathered once per process. It reads `PHI3_CPU` as [`level`] does; Python
/// calls it when `phi3` is imported, before any kernel runs, so the two read the same value.
pub fn cpu_info() -> &'static CpuInfo {
    static INFO: OnceLock<CpuInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let var = std::env::var("PHI3_CPU").ok();
        let in_use = level();
        let hardware = hardware_level();
        let features = seen();
        let requested = take_override(var.as_deref(), hardware);
        CpuInfo {
            arch: std::env::consts::ARCH,
            os: std::env::consts::OS,
            baseline: baseline(),
            baseline_features: features.iter().filter(|f| f.1).map(|f| f.0).collect(),
            features: features.iter().map(|f| (f.0, f.2)).collect(),
            amx_claimed: amx_claimed(),
            hardware_level: hardware,
            reason: reason(requested.as_ref(), hardware, in_use, &|f| {
                features.iter().any(|s| s.0 == f && s.2)
            }),
            requested,
            level: in_use,
        }
    })
}

/// The features of [`seen`] that the CPU has, with the OS enabling them.
pub(super) fn detected_features() -> Vec<&'static str> {
    seen().into_iter().filter(|f| f.2).map(|f| f.0).collect()
}

/// `(name, compiled into the baseline, detected at run time)` for every feature phi3 looks at:
/// on x86_64 the x86-64-v3 baseline's and what the kernel levels need.
#[cfg(target_arch = "x86_64")]
fn seen() -> Vec<(&'static str, bool, bool)> {
    macro_rules! features {
        ($($f:tt),*) => {
            vec![$(($f, cfg!(target_feature = $f), is_x86_feature_detected!($f))),*]
        };
    }
    features![
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi1",
        "bmi2",
        "lzcnt",
        "movbe",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512vnni"
    ]
}

/// As above; on aarch64 NEON and the half-precision arithmetic the build requires.
#[cfg(target_arch = "aarch64")]
fn seen() -> Vec<(&'static str, bool, bool)> {
    use std::arch::is_aarch64_feature_detected;
    vec![
        (
            "neon",
            cfg!(target_feature = "neon"),
            is_aarch64_feature_detected!("neon"),
        ),
        (
            "fp16",
            cfg!(target_feature = "fp16"),
            is_aarch64_feature_detected!("fp16"),
        ),
    ]
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn seen() -> Vec<(&'static str, bool, bool)> {
    Vec::new()
}

/// The name of the instruction set the build was compiled for.
fn baseline() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        // The x86-64 micro-architecture levels, as rustc's `target-cpu=x86-64-vN` defines them.
        let v2 = cfg!(all(
            target_feature = "sse4.2",
            target_feature = "ssse3",
            target_feature = "popcnt",
            target_feature = "cmpxchg16b"
        ));
        let v3 = v2
            && cfg!(all(
                target_feature = "avx2",
                target_feature = "bmi1",
                target_feature = "bmi2",
                target_feature = "f16c",
                target_feature = "fma",
                target_feature = "lzcnt",
                target_feature = "movbe"
            ));
        let v4 = v3
            && cfg!(all(
                target_feature = "avx512f",
                target_feature = "avx512bw",
                target_feature = "avx512cd",
                target_feature = "avx512dq",
                target_feature = "avx512vl"
            ));
        match (v2, v3, v4) {
            (_, _, true) => "x86-64-v4",
            (_, true, _) => "x86-64-v3",
            (true, _, _) => "x86-64-v2",
            _ => "x86-64",
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if cfg!(target_feature = "fp16") {
            "armv8-a+fp16"
        } else {
            "armv8-a"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    std::env::consts::ARCH
}

/// cpuid's AMX-TILE and AMX-INT8 bits (leaf 7, EDX bits 24 and 25); `is_x86_feature_detected!`
/// does not know AMX on stable Rust.
fn amx_claimed() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
        if __get_cpuid_max(0).0 < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `PHI3_CPU`'s value and how [`resolve`] takes it on a CPU of level `hardware`; `None` when
/// unset or blank (the hardware's level is used without comment).
fn take_override(value: Option<&str>, hardware: CpuLevel) -> Option<Override> {
    let value = value.filter(|v| !v.trim().is_empty())?;
    let status = match resolve(Some(value), hardware) {
        Err(_) => OverrideStatus::Invalid,
        Ok(l) if CpuLevel::parse(value) == Some(l) => OverrideStatus::Honoured,
        Ok(_) => OverrideStatus::Clamped,
    };
    Some(Override {
        value: value.to_string(),
        status,
    })
}

/// Why `level` is in use, given the override, the hardware's level and the features seen: a
/// sentence that names the level.
fn reason(
    requested: Option<&Override>,
    hardware: CpuLevel,
    level: CpuLevel,
    has: &dyn Fn(&str) -> bool,
) -> String {
    let why_hardware = match CpuLevel::ALL.into_iter().find(|&l| l > hardware) {
        None => format!("{hardware} is the best phi3 has, and this CPU has it"),
        Some(next) if cfg!(target_arch = "x86_64") => {
            let missing: Vec<&str> = next
                .features()
                .iter()
                .copied()
                .filter(|f| !has(f))
                .collect();
            format!(
                "{hardware} is the best this CPU has ({next} needs {}, which it lacks)",
                missing.join(", ")
            )
        }
        Some(_) => format!(
            "{hardware}, as phi3's own kernels have no SIMD version for {} yet (candle's NEON \
             kernels do the rest)",
            std::env::consts::ARCH
        ),
    };
    match requested {
        None => why_hardware,
        Some(r) => match r.status {
            OverrideStatus::Honoured => format!(
                "{level}, as PHI3_CPU={:?} asks (this CPU has {hardware})",
                r.value
            ),
            OverrideStatus::Clamped => format!(
                "PHI3_CPU={:?} asks for more than this CPU has: {why_hardware}",
                r.value
            ),
            OverrideStatus::Invalid => format!(
                "PHI3_CPU={:?} is not one of {} and is ignored: {why_hardware}",
                r.value,
                CpuLevel::ALL.map(CpuLevel::name).join(", ")
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_information_agrees_with_the_levels() {
        let info = cpu_info();
        let has = |f: &str| info.features.iter().any(|s| s.0 == f && s.1);
        let looked_at = |f: &str| info.features.iter().any(|s| s.0 == f);
        // `hardware_level` can only find features this module looks at.
        if cfg!(target_arch = "x86_64") {
            for l in CpuLevel::ALL {
                assert!(l.features().iter().all(|f| looked_at(f)), "{l}");
            }
            assert!(info.baseline.starts_with("x86-64"));
        }
        assert!(hardware_level().features().iter().all(|f| has(f)));
        assert_eq!(info.hardware_level, hardware_level());
        assert_eq!(info.level, level());
        assert_eq!(info.available_levels().last(), Some(&hardware_level()));
        // Every feature the build was compiled for is one the CPU has: else it would not run.
        for f in &info.baseline_features {
            assert!(has(f), "{f}");
        }
    }

    #[test]
    fn overrides_are_classified() {
        use CpuLevel::*;
        let take = |v: &str, hw| take_override(Some(v), hw).map(|o| o.status);
        assert_eq!(take_override(None, Avx2), None);
        assert_eq!(take(" ", Avx2), None);
        assert_eq!(take("scalar", Avx2), Some(OverrideStatus::Honoured));
        assert_eq!(take(" AVX2 ", Avx2), Some(OverrideStatus::Honoured));
        assert_eq!(take("avx512vnni", Avx2), Some(OverrideStatus::Clamped));
        assert_eq!(
            take("avx512vnni", Avx512Vnni),
            Some(OverrideStatus::Honoured)
        );
        assert_eq!(take("sse9", Avx512Vnni), Some(OverrideStatus::Invalid));
        assert_eq!(take_override(Some("avx2"), Scalar).unwrap().value, "avx2");
    }

    #[test]
    fn reasons_say_why() {
        use CpuLevel::*;
        let lacks_vnni = |f: &str| f != "avx512vnni";
        let o = |v: &str, hw| take_override(Some(v), hw);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                reason(None, Avx2, Avx2, &lacks_vnni),
                "avx2 is the best this CPU has (avx512vnni needs avx512vnni, which it lacks)"
            );
            assert_eq!(
                reason(o("avx512vnni", Avx2).as_ref(), Avx2, Avx2, &lacks_vnni),
                "PHI3_CPU=\"avx512vnni\" asks for more than this CPU has: avx2 is the best this \
                 CPU has (avx512vnni needs avx512vnni, which it lacks)"
            );
        }
        assert_eq!(
            reason(None, Avx512Vnni, Avx512Vnni, &|_| true),
            "avx512vnni is the best phi3 has, and this CPU has it"
        );
        assert_eq!(
            reason(o("scalar", Avx2).as_ref(), Avx2, Scalar, &|_| true),
            "scalar, as PHI3_CPU=\"scalar\" asks (this CPU has avx2)"
        );
        assert_eq!(
            reason(
                o("sse9", Avx512Vnni).as_ref(),
                Avx512Vnni,
                Avx512Vnni,
                &|_| true
            ),
            "PHI3_CPU=\"sse9\" is not one of scalar, avx2, avx512vnni and is ignored: avx512vnni \
             is the best phi3 has, and this CPU has it"
        );
    }
}
