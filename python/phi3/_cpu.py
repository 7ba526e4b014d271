"""The CPU check that runs before the native module loads, and the type of ``phi3.cpu_info()``.

The native module ``phi3._core`` is compiled for a baseline instruction set (x86-64-v3 on
x86_64, half-precision arithmetic on aarch64) and dies of SIGILL on a CPU below it, possibly
while being imported. So ``phi3/__init__.py`` calls :func:`check_baseline` first, and this module
uses the standard library only.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Literal, Optional, TypedDict

SKIP_ENV = "PHI3_SKIP_CPU_CHECK"
"""Set to 1 to skip the check (a build from source for an older CPU, or a CPU the check misreads)."""

BASELINES: dict[str, tuple[str, tuple[str, ...]]] = {
    "x86_64": (
        "x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE: Intel Haswell, AMD Excavator or newer)",
        ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe"),
    ),
    "aarch64": ("ARMv8.2 half-precision arithmetic (FEAT_FP16)", ("fp16",)),
}
"""Per architecture: the published wheels' baseline in words, and the features it needs (named as
``phi3.cpu_info()["features"]`` names them)."""

# /proc/cpuinfo's names for the baseline's features, where they differ.
_LINUX_NAMES = {"lzcnt": "abm"}

# macOS sysctl's names (machdep.cpu.features, .leaf7_features, .extfeatures).
_MACOS_NAMES = {
    "avx": "AVX1.0",
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "bmi1": "BMI1",
    "bmi2": "BMI2",
    "lzcnt": "LZCNT",
    "movbe": "MOVBE",
}

# IsProcessorFeaturePresent's constants. Windows knows only AVX and AVX2 of the baseline.
_PF_SSE4_2 = 38
_PF_AVX = 39
_PF_AVX2 = 40


def arch_of(machine: str) -> Optional[str]:
    """``x86_64`` or ``aarch64`` for what ``platform.machine()`` says, None for anything else."""
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "aarch64"
    return None


def parse_linux_cpuinfo(text: str, arch: str) -> Optional[dict[str, bool]]:
    """The baseline features of ``arch`` that a ``/proc/cpuinfo`` text shows, or None without a
    flags line. Linux lists an AVX feature only when the kernel enables its registers, so a
    present flag is usable."""
    key = "flags" if arch == "x86_64" else "Features"
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            flags = set(value.split())
            break
    else:
        return None
    if arch == "aarch64":
        # FEAT_FP16 shows as scalar (fphp) and SIMD (asimdhp) half-precision arithmetic.
        return {"fp16": {"fphp", "asimdhp"} <= flags}
    return {f: _LINUX_NAMES.get(f, f) in flags for f in BASELINES[arch][1]}


def parse_macos_sysctl(text: str) -> dict[str, bool]:
    """The x86_64 baseline features that ``sysctl -n machdep.cpu.features
    machdep.cpu.leaf7_features machdep.cpu.extfeatures`` shows."""
    words = set(text.upper().split())
    return {f: name in words for f, name in _MACOS_NAMES.items()}


def detect_features(arch: str) -> Optional[dict[str, bool]]:
    """What this machine says about the baseline features of ``arch``: the features it could
    determine, or None when it cannot tell at all."""
    try:
        if sys.platform.startswith("linux"):
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return parse_linux_cpuinfo(f.read(), arch)
        if sys.platform == "darwin" and arch == "x86_64":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features", "machdep.cpu.extfeatures"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return parse_macos_sysctl(out.stdout) if out.returncode == 0 else None
        if sys.platform == "win32" and arch == "x86_64":
            import ctypes

            present = ctypes.windll.kernel32.IsProcessorFeaturePresent
            # Windows versions that predate the AVX constants answer "no" to all of them; they
            # came with SSE4.2's, which every AVX2 CPU has, so a "no" to that means "unknown".
            if not present(_PF_SSE4_2):
                return None
            return {"avx": bool(present(_PF_AVX)), "avx2": bool(present(_PF_AVX2))}
    except (OSError, subprocess.SubprocessError):
        return None
    # Apple silicon (every one has FEAT_FP16), Windows on Arm (no way to ask), other systems.
    return None


def missing_features(arch: str, features: Mapping[str, bool]) -> list[str]:
    """The baseline features of ``arch`` that ``features`` says this CPU lacks; features it does
    not mention are given the benefit of the doubt."""
    return [f for f in BASELINES[arch][1] if features.get(f) is False]


def check_baseline(
    machine: Optional[str] = None,
    features: Optional[Mapping[str, bool]] = None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Raise ImportError naming what is missing when this CPU is below the native module's
    baseline. ``machine`` and ``features`` default to this machine's; a CPU that cannot be
    examined passes, and so does everything when ``PHI3_SKIP_CPU_CHECK=1``."""
    if environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return
    arch = arch_of(platform.machine() if machine is None else machine)
    if arch is None:
        return
    if features is None:
        features = detect_features(arch)
        if features is None:
            return
    missing = missing_features(arch, features)
    if missing:
        baseline = BASELINES[arch][0]
        raise ImportError(
            f"phi3 cannot run on this CPU: it lacks {', '.join(missing)}. This build of phi3 is "
            f"compiled for {baseline} and would crash with an illegal instruction. Build phi3 "
            f"from source for this CPU (see 'CPUs' in phi3's README) and set {SKIP_ENV}=1 to "
            f"run that build."
        )


Level = Literal["scalar", "avx2", "avx512vnni"]
"""phi3's kernel levels, lowest first: what ``PHI3_CPU`` accepts."""


class CpuOverride(TypedDict):
    """``PHI3_CPU`` as it was set, and how it was taken: ``honoured`` (a level this CPU has),
    ``clamped`` (above this CPU's level: the CPU's is used) or ``invalid`` (not a level: ignored)."""

    value: str
    status: Literal["honoured", "clamped", "invalid"]


class CpuInfo(TypedDict):
    """What :func:`phi3.cpu_info` returns: which kernels phi3 uses on this CPU, and why."""

    level: Level
    """The kernels in use."""
    reason: str
    """One sentence on why, naming the level."""
    hardware_level: Level
    """The best level this CPU has (with the OS enabling its registers)."""
    available_levels: list[Level]
    """The levels this CPU can run, lowest first."""
    override: Optional[CpuOverride]
    """``PHI3_CPU``, when set (it is read once, when phi3 is imported)."""
    baseline: str
    """The instruction set the whole build may use unconditionally: ``x86-64-v3`` for the
    published x86_64 wheels, ``armv8-a+fp16`` on aarch64."""
    baseline_features: list[str]
    """The features of ``features`` that the baseline includes."""
    features: dict[str, bool]
    """Each CPU feature phi3 looks at, and whether this CPU has it (and the OS enables it)."""
    amx_claimed: bool
    """Whether cpuid claims AMX. phi3's own kernels never use it; candle's Q4_K prefill does where
    Linux grants the process AMX state."""
    arch: str
    """The build's architecture: ``x86_64``, ``aarch64``."""
    os: str
    """The build's OS: ``linux``, ``macos``, ``windows``."""
