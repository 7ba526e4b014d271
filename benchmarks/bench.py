#!/usr/bin/env python3
"""phi3 and llama.cpp side by side on the same GGUF file, same threads, greedy, each engine in
its own process:

    python benchmarks/bench.py MODEL.gguf --threads 2

Measures warm load time (the file is read once first, so the page cache is warm), prefill
tokens/s for a 512-token prompt in one batch, decode tokens/s over 128 greedy tokens, time to
first token for a ~20-token chat prompt, and peak RSS. Decode reads every weight once per token,
so its ceiling is the memory's bandwidth: the same threads reading an anonymous buffer of the
file's size (numpy, where installed) give the limit, and each engine's decode is reported as a
share of it (tokens/s times the file's size over that bandwidth; the token embedding, read one
row per token, is counted whole, which overstates the share by its part of the file, 2 % on
Phi-3-mini). llama.cpp runs through
`../shared/tools/llamacpp-bench.py` when `llama_cpp` is importable (both with its weight
repacking, its default, and without), and the table gives phi3's ratio to the better of the two.

    python benchmarks/bench.py MODEL.gguf --levels

measures phi3 alone once per kernel level this CPU has (`PHI3_CPU` set for each run's process).
`--python` names the interpreter whose phi3 is measured, and may be repeated to compare builds,
e.g. the published wheel with a `-C target-cpu=native` build of the same code (README, "CPUs"):

    python benchmarks/bench.py MODEL.gguf --levels --python .venv/bin/python --python /tmp/native/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_BENCH = ROOT.parent / "shared" / "tools" / "llamacpp-bench.py"
TINY_MODEL = ROOT.parent / "shared" / "fixtures" / "tiny-phi3-haiku-q4_k_m.gguf"
CHAT = "Write a haiku about ice hockey, please."


def warm_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def measure_phi3(
    model: str,
    threads: int,
    prompt_tokens: int,
    decode_tokens: int,
    positions: list[int],
    overhead: bool,
    kv_cache: Optional[str] = None,
    mapped_weights: bool = False,
) -> dict[str, Any]:
    from phi3 import Phi3, __version__, cpu_info

    warm_page_cache(model)
    t0 = time.perf_counter()
    context = max([2048, *[n + 64 for n in positions]])
    m = Phi3(model, threads=threads, context_length=context, kv_cache=kv_cache, mapped_weights=mapped_weights)
    load_s = time.perf_counter() - t0

    # Time to first token: a ~20-token chat prompt, through to the first sampled token.
    t0 = time.perf_counter()
    stream = m.stream(CHAT, max_tokens=1, temperature=0, details=True)
    next(stream)
    ttft_s = time.perf_counter() - t0
    stream.close()
    ttft_prompt_tokens = len(m.tokenize(m.apply_chat_template([{"role": "user", "content": CHAT}])))

    # Prefill: exactly `prompt_tokens` ordinary text ids, one batch; decode after it.
    import random

    rng = random.Random(0)
    prompt = [1] + [rng.randrange(1000, 20000) for _ in range(prompt_tokens - 1)]
    stream = m.stream(prompt, max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True, details=True)
    for _ in stream:
        pass
    stats = stream.stats

    info = cpu_info()
    # Before the optional runs below, whose longer contexts need bigger caches.
    peak_rss_mib = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    extra: dict[str, Any] = {}
    if positions:
        extra.update(decode_by_position(m, positions))
    overhead_us = stream_overhead_us(threads) if overhead else None
    if overhead_us is not None:
        extra["stream_overhead_us"] = round(overhead_us, 1)
        extra["stream_overhead_pct"] = round(100 * overhead_us * 1e-6 * stats.decode_tokens_per_s, 3)
    return {
        "engine": f"phi3 {__version__}",
        "build": info["baseline"],
        "kernels": info["level"],
        "kv_cache": m.kv_cache,
        "mapped_weights": m.mapped_weights,
        "model": os.path.basename(model),
        "threads": threads,
        "load_s": round(load_s, 3),
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": round(stats.prefill_tokens_per_s, 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(stats.decode_tokens_per_s, 2),
        "ttft_prompt_tokens": ttft_prompt_tokens,
        "ttft_s": round(ttft_s, 3),
        "peak_rss_mib": peak_rss_mib,
        **extra,
    }


def decode_by_position(m: Any, positions: list[int], tokens: int = 32) -> dict[str, Any]:
    """Decode tokens/s right after a prompt of each length: how the cost grows with context."""
    import random

    rng = random.Random(1)
    out = {}
    for n in positions:
        prompt = [1] + [rng.randrange(1000, 20000) for _ in range(n - 1)]
        stream = m.stream(prompt, max_tokens=tokens + 1, temperature=0, ignore_eos=True)
        for _ in stream:
            pass
        out[f"decode_at_{n}_tok_s"] = round(stream.stats.decode_tokens_per_s, 2)
    return out


def stream_overhead_us(threads: int, tokens: int = 1000, rounds: int = 5) -> Optional[float]:
    """Per-token cost of `stream()` over `generate()` (which runs the same steps without a Python
    object or iterator call per token), on the tiny fixture model, where a step takes about a
    millisecond and the difference is measurable: best of `rounds`, in microseconds."""
    if not TINY_MODEL.exists():
        return None
    from phi3 import Phi3

    m = Phi3(str(TINY_MODEL), threads=threads)
    prompt = [1, 450, 4996]
    kw: dict[str, Any] = dict(max_tokens=tokens, temperature=0, ignore_eos=True)
    best_stream = best_generate = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        m.generate(prompt, **kw)
        best_generate = min(best_generate, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in m.stream(prompt, details=True, **kw):
            pass
        best_stream = min(best_stream, time.perf_counter() - t0)
    return (best_stream - best_generate) / tokens * 1e6


def run_json(cmd: list[str], env: Optional[dict[str, str]] = None) -> Optional[dict[str, Any]]:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(f"bench: {' '.join(cmd[:3])} failed:\n{r.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def memory_limit_gbs(nbytes: int, threads: int, rounds: int = 3) -> Optional[float]:
    """GB/s of `threads` threads reading an anonymous buffer of `nbytes` (so that no cache holds
    it) at once, best of `rounds`; None without numpy. numpy releases the GIL in its reductions,
    so the threads read in parallel."""
    try:
        import numpy as np
    except ImportError:
        return None
    # Bytes, reduced by max: the cheapest reduction numpy vectorizes (on a Zen 3 core, 19.7
    # GB/s against 15.7 for a sum of 64-bit integers).
    parts = np.array_split(np.ones(nbytes, dtype=np.uint8), threads)
    best = float("inf")
    for _ in range(rounds):
        barrier = threading.Barrier(threads + 1)
        workers = [threading.Thread(target=read_after, args=(barrier, part)) for part in parts]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def read_after(barrier: threading.Barrier, part: Any) -> None:
    barrier.wait()
    part.max()


def add_memory_share(results: list[dict[str, Any]], file_bytes: int, limit_gbs: Optional[float]) -> None:
    """Each result's decode as a percentage of the memory limit."""
    if limit_gbs:
        for r in results:
            r["decode_pct_of_limit"] = round(100 * r["decode_tok_s"] * file_bytes / 1e9 / limit_gbs, 1)


def llamacpp_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    return r.returncode == 0 and LLAMACPP_BENCH.exists()


ROWS = [
    ("warm load (s)", "load_s", False),
    ("prefill (tok/s)", "prefill_tok_s", True),
    ("decode (tok/s)", "decode_tok_s", True),
    ("decode, % of the memory limit", "decode_pct_of_limit", True),
    ("time to first token (s)", "ttft_s", False),
    ("peak RSS (MiB)", "peak_rss_mib", False),
]


def engine_label(r: dict[str, Any]) -> str:
    if "build" in r:
        cache = f", {r['kv_cache']} cache" if r.get("kv_cache", "f16") != "f16" else ""
        mapped = ", mapped weights" if r.get("mapped_weights") else ""
        return f"{r['engine']} ({r['build']}, {r['kernels']}{cache}{mapped})"
    return str(r["engine"]) + (" no-repack" if r.get("no_repack") else "")


def table(phi3_results: list[dict[str, Any]], others: list[dict[str, Any]]) -> str:
    """Engines side by side, with the first phi3's ratio to the best llama.cpp run on each row."""
    results = phi3_results + others
    phi3 = phi3_results[0]
    head = ["", *[engine_label(r) for r in results]]
    if others:
        head.append("phi3 / best llama.cpp")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, higher_is_better in ROWS:
        if any(key not in r for r in results):
            continue
        cells = [label, *[str(r[key]) for r in results]]
        if others:
            values = [r[key] for r in others]
            best = max(values) if higher_is_better else min(values)
            ratio = phi3[key] / best if best else float("nan")
            cells.append(f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def level_table(results: list[dict[str, Any]]) -> str:
    """A row per (build, kernel level)."""
    rows = [(label, key) for label, key, _ in ROWS if all(key in r for r in results)]
    head = ["phi3 (interpreter)", "build", "kernels", *[label for label, _ in rows]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["python"], r["build"], r["kernels"], *[str(r[key]) for _, key in rows]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measure_levels(pythons: list[str], model: str, common: list[str]) -> list[dict[str, Any]]:
    """phi3 under each interpreter, once per kernel level this CPU has, each run in a process of
    its own with PHI3_CPU set (the level is chosen once per process)."""
    results = []
    for python in pythons:
        info = run_json([python, "-c", "import json, phi3; print(json.dumps(phi3.cpu_info()))"])
        if info is None:
            sys.exit(1)
        for level in info["available_levels"]:
            # The level table has no column for the stream() overhead, which the tiny model
            # would take minutes to measure at the scalar level.
            cmd = [python, __file__, model, *common, "--json", "--no-stream-overhead"]
            r = run_json(cmd, env={**os.environ, "PHI3_CPU": level})
            if r is None:
                sys.exit(1)
            r["python"] = python
            results.append(r)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--phi3-only", action="store_true", help="skip llama.cpp")
    p.add_argument(
        "--levels", action="store_true", help="phi3 alone, once per kernel level this CPU has (PHI3_CPU per run)"
    )
    p.add_argument(
        "--python",
        action="append",
        metavar="PYTHON",
        help="an interpreter whose phi3 to measure (repeatable, to compare builds; default: this one)",
    )
    p.add_argument(
        "--positions",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[],
        metavar="N,N,...",
        help="phi3: also decode after prompts of these lengths (e.g. 100,3000)",
    )
    p.add_argument("--kv-cache", choices=("f16", "q8_0"), help="phi3: how the KV cache stores keys and values")
    p.add_argument("--mapped-weights", action="store_true", help="phi3: leave the weights in the file's memory map")
    p.add_argument("--json", action="store_true", help="(internal) measure phi3 in this process")
    p.add_argument(
        "--no-stream-overhead", action="store_true", help="(internal) skip the stream() overhead measurement"
    )
    a = p.parse_args()

    if a.json:
        r = measure_phi3(
            a.model,
            a.threads,
            a.prompt_tokens,
            a.decode_tokens,
            a.positions,
            not a.no_stream_overhead,
            a.kv_cache,
            a.mapped_weights,
        )
        print(json.dumps(r))
        return

    common = [
        "--threads",
        str(a.threads),
        "--prompt-tokens",
        str(a.prompt_tokens),
        "--decode-tokens",
        str(a.decode_tokens),
    ]
    phi3_args = [
        *common,
        *(["--positions", ",".join(map(str, a.positions))] if a.positions else []),
        *(["--kv-cache", a.kv_cache] if a.kv_cache else []),
        *(["--mapped-weights"] if a.mapped_weights else []),
    ]
    pythons = a.python or [sys.executable]
    file_bytes = os.path.getsize(a.model)
    limit_gbs = memory_limit_gbs(file_bytes, a.threads)
    heading = f"{os.path.basename(a.model)}, {a.threads} threads"
    if limit_gbs:
        heading += f"; memory limit {limit_gbs:.1f} GB/s ({file_bytes / 1e9 / limit_gbs * 1e3:.0f} ms to read the file)"
    if a.levels:
        results = measure_levels(pythons, a.model, common)
        add_memory_share(results, file_bytes, limit_gbs)
        print(heading)
        print(level_table(results))
        return
    phi3_results = []
    for python in pythons:
        phi3 = run_json([python, __file__, a.model, *phi3_args, "--json"])
        if phi3 is None:
            sys.exit(1)
        phi3_results.append(phi3)
    others = []
    if not a.phi3_only and llamacpp_available():
        for extra in ([], ["--no-repack"]):
            r = run_json([sys.executable, str(LLAMACPP_BENCH), a.model, *common, *extra, "--json"])
            if r is not None:
                r["no_repack"] = bool(extra)
                others.append(r)
    elif not a.phi3_only:
        print("bench: llama_cpp is not installed: phi3 alone", file=sys.stderr)
    add_memory_share(phi3_results + others, file_bytes, limit_gbs)
    print(heading)
    print(table(phi3_results, others))
    for r in phi3_results:
        notes = [f"{k}={v}" for k, v in r.items() if k.startswith(("decode_at_", "stream_overhead"))]
        if notes:
            print(f"{engine_label(r)}: " + ", ".join(notes))


if __name__ == "__main__":
    main()
