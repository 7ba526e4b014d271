"""The CPU: the baseline check that runs before the native module loads, ``cpu_info()``, and every
kernel level (through ``PHI3_CPU``, a process each) against llama.cpp's answers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import phi3
import pytest
from conftest import fixture_path, prompt_of, reference
from phi3 import _cpu

# /proc/cpuinfo flags lines (abridged to what matters here) of CPUs on both sides of x86-64-v3.
SAPPHIRE_RAPIDS = (
    "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c abm bmi1 avx2 "
    "bmi2 avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_vnni amx_tile amx_int8"
)
HASWELL = "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c abm bmi1 avx2 bmi2"
IVY_BRIDGE = "flags\t\t: fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt xsave avx f16c"
SANDY_BRIDGE = "flags\t\t: fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt xsave avx"
NEHALEM = "flags\t\t: fpu sse sse2 ssse3 cx16 sse4_1 sse4_2 popcnt"
# A hypervisor that passes AVX2 through but hides BMI2.
VM_NO_BMI2 = "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt xsave avx f16c abm bmi1 avx2"
# aarch64 Features lines: Neoverse N1 (ARMv8.2, FP16) and Cortex-A72 (ARMv8.0, e.g. Raspberry Pi 4).
NEOVERSE_N1 = (
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
)
CORTEX_A72 = "Features\t: fp asimd evtstrm crc32 cpuid"


def cpuinfo(flags: str) -> str:
    """A /proc/cpuinfo text with two processors around the given flags line."""
    processor = f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU\n{flags}\nbogomips\t: 4000.00\n"
    return processor + "\n" + processor.replace(": 0", ": 1", 1)


@pytest.mark.parametrize(
    "flags,missing",
    [
        (SAPPHIRE_RAPIDS, []),
        (HASWELL, []),
        (VM_NO_BMI2, ["bmi2"]),
        (IVY_BRIDGE, ["avx2", "fma", "bmi1", "bmi2", "lzcnt", "movbe"]),
        (SANDY_BRIDGE, ["avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe"]),
        (NEHALEM, ["avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe"]),
    ],
    ids=["sapphire-rapids", "haswell", "vm-no-bmi2", "ivy-bridge", "sandy-bridge", "nehalem"],
)
def test_x86_64_baseline_from_cpuinfo(flags: str, missing: list[str]) -> None:
    features = _cpu.parse_linux_cpuinfo(cpuinfo(flags), "x86_64")
    assert features is not None
    assert _cpu.missing_features("x86_64", features) == missing
    if missing:
        with pytest.raises(ImportError) as e:
            _cpu.check_baseline("x86_64", features, environ={})
        message = str(e.value)
        assert f"lacks {', '.join(missing)}." in message
        assert "x86-64-v3" in message and "PHI3_SKIP_CPU_CHECK=1" in message
    else:
        _cpu.check_baseline("x86_64", features, environ={})


@pytest.mark.parametrize(
    "features,missing", [(NEOVERSE_N1, []), (CORTEX_A72, ["fp16"]), ("Features\t: fp asimd fphp", ["fp16"])]
)
def test_aarch64_baseline_from_cpuinfo(features: str, missing: list[str]) -> None:
    parsed = _cpu.parse_linux_cpuinfo(cpuinfo(features), "aarch64")
    assert parsed is not None and _cpu.missing_features("aarch64", parsed) == missing
    if missing:
        with pytest.raises(ImportError, match="lacks fp16"):
            _cpu.check_baseline("aarch64", parsed, environ={})


def test_undeterminable_cpus_pass() -> None:
    # No flags line (an unusual kernel or sandbox): nothing to judge.
    assert _cpu.parse_linux_cpuinfo("processor\t: 0\n", "x86_64") is None
    # Windows knows only AVX and AVX2 of the baseline; the rest gets the benefit of the doubt.
    assert _cpu.missing_features("x86_64", {"avx": True, "avx2": True}) == []
    assert _cpu.missing_features("x86_64", {"avx": True, "avx2": False}) == ["avx2"]
    # Architectures without a native module baseline to check.
    _cpu.check_baseline("riscv64", {}, environ={})
    _cpu.check_baseline("ppc64le", None, environ={})


def test_machine_names() -> None:
    assert [_cpu.arch_of(m) for m in ["x86_64", "AMD64", "arm64", "aarch64", "ARM64", "i686"]] == [
        "x86_64",
        "x86_64",
        "aarch64",
        "aarch64",
        "aarch64",
        None,
    ]


def test_macos_sysctl() -> None:
    haswell = (
        "FPU VME SSE SSE2 SSE3 PCLMULQDQ SSSE3 FMA CX16 SSE4.1 SSE4.2 MOVBE POPCNT AES XSAVE OSXSAVE AVX1.0 F16C\n"
        "RDWRFSGS TSC_THREAD_OFFSET BMI1 AVX2 SMEP BMI2 ERMS INVPCID\n"
        "SYSCALL XD 1GBPAGE EM64T LAHF LZCNT RDTSCP TSCI\n"
    )
    assert _cpu.missing_features("x86_64", _cpu.parse_macos_sysctl(haswell)) == []
    # Rosetta 2 before macOS 15 translates no AVX at all.
    rosetta = "FPU SSE SSE2 SSE3 SSSE3 CX16 SSE4.1 SSE4.2 POPCNT\nSYSCALL XD EM64T LAHF LZCNT\n"
    assert _cpu.missing_features("x86_64", _cpu.parse_macos_sysctl(rosetta))[:3] == ["avx", "avx2", "fma"]


def test_escape_hatch() -> None:
    below = _cpu.parse_linux_cpuinfo(cpuinfo(SANDY_BRIDGE), "x86_64")
    _cpu.check_baseline("x86_64", below, environ={"PHI3_SKIP_CPU_CHECK": "1"})
    with pytest.raises(ImportError):
        _cpu.check_baseline("x86_64", below, environ={"PHI3_SKIP_CPU_CHECK": "0"})


def test_this_cpu_passes_its_own_check() -> None:
    arch = _cpu.arch_of(platform.machine())
    if arch is None or not sys.platform.startswith("linux"):
        pytest.skip("checked on Linux x86_64/aarch64")
    features = _cpu.detect_features(arch)
    assert features is not None and _cpu.missing_features(arch, features) == []
    _cpu.check_baseline(environ={})


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _cpu.arch_of(platform.machine()) != "x86_64",
    reason="fakes an x86_64 Linux /proc/cpuinfo",
)
def test_import_below_baseline_raises_before_loading_the_engine() -> None:
    child = f"""
import builtins, io, sys
real_open = builtins.open
def fake_open(file, *args, **kwargs):
    if file == "/proc/cpuinfo":
        return io.StringIO({cpuinfo(SANDY_BRIDGE)!r})
    return real_open(file, *args, **kwargs)
builtins.open = fake_open
try:
    import phi3
except ImportError as e:
    print(e)
    print("engine loaded:", "phi3._core" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k != "PHI3_SKIP_CPU_CHECK"}
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "phi3 cannot run on this CPU: it lacks avx2, fma" in r.stdout
    assert "engine loaded: False" in r.stdout


def test_cpu_info_is_consistent() -> None:
    if os.environ.get("PHI3_CPU", "").strip():
        pytest.skip("PHI3_CPU is set for this run")
    info = phi3.cpu_info()
    assert list(info) == list(phi3.CpuInfo.__annotations__)
    assert info["override"] is None
    assert info["level"] == info["hardware_level"] == info["available_levels"][-1]
    assert info["available_levels"][0] == "scalar"
    assert info["level"] in info["reason"]
    assert all(info["features"][f] for f in info["baseline_features"])
    assert info["arch"] in ("x86_64", "aarch64") and isinstance(info["amx_claimed"], bool)
    if info["arch"] == "x86_64":
        # The pre-import check and the engine name the baseline's features alike.
        assert set(_cpu.BASELINES["x86_64"][1]) <= set(info["baseline_features"])
        assert info["baseline"].startswith("x86-64-v")
        assert {"avx512f", "avx512bw", "avx512vl", "avx512vnni"} <= set(info["features"])


def run_phi3(code: str, phi3_cpu: Optional[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PHI3_CPU"}
    if phi3_cpu is not None:
        env["PHI3_CPU"] = phi3_cpu
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], input=stdin, capture_output=True, text=True, env=env, timeout=600
    )


CPU_INFO = "import json, phi3; print(json.dumps(phi3.cpu_info()))"


def test_invalid_override_warns_and_is_ignored() -> None:
    r = run_phi3(CPU_INFO, "sse9")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["override"] == {"value": "sse9", "status": "invalid"}
    assert info["level"] == info["hardware_level"]
    assert "RuntimeWarning" in r.stderr
    assert 'PHI3_CPU="sse9" is not one of scalar, avx2, avx512vnni and is ignored' in r.stderr


def test_override_above_the_cpu_is_clamped() -> None:
    hardware = phi3.cpu_info()["hardware_level"]
    if hardware == "avx512vnni":
        pytest.skip("this CPU has every level")
    info = json.loads(run_phi3(CPU_INFO, "avx512vnni").stdout)
    assert info["override"] == {"value": "avx512vnni", "status": "clamped"}
    assert info["level"] == hardware


def test_override_is_read_at_import() -> None:
    code = "import os, phi3; os.environ['PHI3_CPU'] = 'scalar'; print(phi3.cpu_info()['level'])"
    assert run_phi3(code, None).stdout.strip() == phi3.cpu_info()["hardware_level"]


# Every trained fixture with llama.cpp's answers: Q4_K, Q6_K and Q8_0 weights, LongRoPE, GQA,
# partial rotary, tied embeddings.
REFERENCE_MODELS = [
    "tiny-phi3-haiku-q4_k_m.gguf",
    "tiny-phi3-haiku-q8_0.gguf",
    "tiny-phi35-longrope-q4_k_m.gguf",
    "tiny-phi4mini-gqa-partial-tied-q4_k_m.gguf",
]

# Runs the reference cases in a process of its own (PHI3_CPU is read once per process).
GREEDY_CHILD = """
import json, sys
import phi3
out = {"cpu_info": phi3.cpu_info(), "runs": []}
for path, cases in json.load(sys.stdin):
    model = phi3.Phi3(path)
    for prompt, raw, max_tokens in cases:
        tokens = list(model.stream(prompt, max_tokens=max_tokens, temperature=0, raw=raw, details=True))
        out["runs"].append({
            "ids": [t.id for t in tokens],
            "text": "".join(t.text for t in tokens),
            "first_logprob": tokens[0].logprob,
        })
json.dump(out, sys.stdout)
"""


def near_tie(case: dict[str, Any]) -> bool:
    """llama.cpp's own noise may flip a near tie along the run: compare only the first token."""
    return bool(case["greedy_min_margin"] < 1.0)


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512vnni"])
def test_every_level_matches_llamacpp(level: str) -> None:
    if level not in phi3.cpu_info()["available_levels"]:
        pytest.skip(f"this CPU lacks {level}")
    request = []
    expected = []
    for model_file in REFERENCE_MODELS:
        cases = reference(model_file)["cases"]
        runs = []
        for case in cases:
            prompt, raw = prompt_of(case)
            runs.append((prompt, raw, 1 if near_tie(case) else int(case["max_tokens"])))
            expected.append((model_file, case))
        request.append((str(fixture_path(model_file)), runs))
    r = run_phi3(GREEDY_CHILD, level, stdin=json.dumps(request))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cpu_info"]["level"] == level
    assert out["cpu_info"]["override"] == {"value": level, "status": "honoured"}
    assert len(out["runs"]) == len(expected)
    for (model_file, case), run in zip(expected, out["runs"]):
        what = f"{level} {model_file} {case['name']}"
        assert run["ids"][0] == case["greedy_ids"][0], what
        assert abs(run["first_logprob"] - case["first_token_logprob"]) < 0.05, what
        if not near_tie(case):
            assert run["ids"] == case["greedy_ids"], what
            # llama.cpp's text keeps SentencePiece's leading space; phi3's answer does not.
            assert run["text"] == case["greedy_text"].removeprefix(" "), what
