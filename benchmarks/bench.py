#!/usr/bin/env python3
"""phi3 and llama.cpp side by side on the same GGUF file, same threads, greedy, each engine in
its own process:

    python benchmarks/bench.py MODEL.gguf --threads 2

Measures warm load time (the file is read once first, so the page cache is warm), prefill
tokens/s for a 512-token prompt in one batch, decode tokens/s over 128 greedy tokens, time to
first token for a ~20-token chat prompt, and peak RSS. llama.cpp runs through
`../shared/tools/llamacpp-bench.py` when `llama_cpp` is importable (both with its weight
repacking, its default, and without), and the table gives phi3's ratio to the better of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_BENCH = ROOT.parent / "shared" / "tools" / "llamacpp-bench.py"
CHAT = "Write a haiku about ice hockey, please."


def warm_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def measure_phi3(model: str, threads: int, prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    from phi3 import Phi3, __version__

    warm_page_cache(model)
    t0 = time.perf_counter()
    m = Phi3(model, threads=threads, context_length=2048)
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

    return {
        "engine": f"phi3 {__version__}",
        "model": os.path.basename(model),
        "threads": threads,
        "load_s": round(load_s, 3),
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": round(stats.prefill_tokens_per_s, 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(stats.decode_tokens_per_s, 2),
        "ttft_prompt_tokens": ttft_prompt_tokens,
        "ttft_s": round(ttft_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_json(cmd: list[str]) -> Optional[dict[str, Any]]:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"bench: {' '.join(cmd[:3])} failed:\n{r.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def llamacpp_available() -> bool:
    r = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True)
    return r.returncode == 0 and LLAMACPP_BENCH.exists()


ROWS = [
    ("warm load (s)", "load_s", False),
    ("prefill (tok/s)", "prefill_tok_s", True),
    ("decode (tok/s)", "decode_tok_s", True),
    ("time to first token (s)", "ttft_s", False),
    ("peak RSS (MiB)", "peak_rss_mib", False),
]


def table(results: list[dict[str, Any]]) -> str:
    phi3 = results[0]
    others = results[1:]
    head = ["", *[r["engine"] + (" no-repack" if r.get("no_repack") else "") for r in results]]
    if others:
        head.append("phi3 / best llama.cpp")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, higher_is_better in ROWS:
        cells = [label, *[str(r[key]) for r in results]]
        if others:
            values = [r[key] for r in others]
            best = max(values) if higher_is_better else min(values)
            ratio = phi3[key] / best if best else float("nan")
            cells.append(f"{ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--phi3-only", action="store_true", help="skip llama.cpp")
    p.add_argument("--json", action="store_true", help="(internal) measure phi3 in this process")
    a = p.parse_args()

    if a.json:
        print(json.dumps(measure_phi3(a.model, a.threads, a.prompt_tokens, a.decode_tokens)))
        return

    common = ["--threads", str(a.threads), "--prompt-tokens", str(a.prompt_tokens),
              "--decode-tokens", str(a.decode_tokens)]
    results = []
    phi3 = run_json([sys.executable, __file__, a.model, *common, "--json"])
    if phi3 is None:
        sys.exit(1)
    results.append(phi3)
    if not a.phi3_only and llamacpp_available():
        for extra in ([], ["--no-repack"]):
            r = run_json([sys.executable, str(LLAMACPP_BENCH), a.model, *common, *extra, "--json"])
            if r is not None:
                r["no_repack"] = bool(extra)
                results.append(r)
    elif not a.phi3_only:
        print("bench: llama_cpp is not installed: phi3 alone", file=sys.stderr)
    print(f"{os.path.basename(a.model)}, {a.threads} threads")
    print(table(results))


if __name__ == "__main__":
    main()
