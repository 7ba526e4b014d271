"""Long prompts: prefill of an N-token prompt and decode right after it, phi3 (f16 and q8_0 KV
caches) against llama.cpp (f16 and q8_0 caches), each engine in its own process, same file, same
threads, greedy. The shared llama.cpp bench holds a 2048-token context; this one sizes the
context to the prompt.

    python benchmarks/long_prompt.py MODEL.gguf --threads 2 --tokens 4000 [--python PY]

llama.cpp runs with its default batch of 512 and with the whole prompt as one batch; the table
gives both (its best face is the faster). Needs llama-cpp-python for the llama.cpp rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from typing import Any, Optional


def prompt_ids(n: int) -> list[int]:
    rng = random.Random(4)
    return [1] + [rng.randrange(1000, 20000) for _ in range(n - 1)]


def measure_phi3(model: str, threads: int, n: int, decode: int, kv_cache: str) -> dict[str, Any]:
    from phi3 import Phi3

    m = Phi3(model, threads=threads, context_length=n + decode + 8, cache_bytes=0, kv_cache=kv_cache)
    stream = m.stream(prompt_ids(n), max_tokens=decode + 1, temperature=0, ignore_eos=True)
    for _ in stream:
        pass
    s = stream.stats
    return {
        "engine": f"phi3, {kv_cache} cache",
        "prefill_tok_s": round(s.prefill_tokens_per_s, 2),
        "decode_tok_s": round(s.decode_tokens_per_s, 2),
    }


def measure_llamacpp(model: str, threads: int, n: int, decode: int, kv_cache: str, batch: int) -> dict[str, Any]:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    q8 = kv_cache == "q8_0"
    llm = Llama(
        model_path=model,
        n_ctx=n + decode + 8,
        n_batch=batch,
        n_ubatch=batch,
        n_threads=threads,
        n_threads_batch=threads,
        # A quantized V cache needs flash attention in llama.cpp.
        flash_attn=q8,
        type_k=llama_cpp.GGML_TYPE_Q8_0 if q8 else llama_cpp.GGML_TYPE_F16,
        type_v=llama_cpp.GGML_TYPE_Q8_0 if q8 else llama_cpp.GGML_TYPE_F16,
        verbose=False,
    )

    def last() -> int:
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))

    t0 = time.perf_counter()
    llm.eval(prompt_ids(n))
    prefill_s = time.perf_counter() - t0
    nxt = last()
    t0 = time.perf_counter()
    for _ in range(decode):
        llm.eval([nxt])
        nxt = last()
    decode_s = time.perf_counter() - t0
    return {
        "engine": f"llama.cpp {llama_cpp.__version__}, {kv_cache} cache, batch {batch}",
        "prefill_tok_s": round(n / prefill_s, 2),
        "decode_tok_s": round(decode / decode_s, 2),
    }


def run(cmd: list[str]) -> Optional[dict[str, Any]]:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"long_prompt: {' '.join(cmd)} failed:\n{out.stderr}", file=sys.stderr)
        return None
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--python", default=sys.executable, help="the interpreter whose phi3 to measure")
    p.add_argument("--phi3-only", action="store_true")
    p.add_argument("--run", nargs=3, metavar=("ENGINE", "KV", "BATCH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run:
        engine, kv, batch = a.run
        if engine == "phi3":
            r = measure_phi3(a.model, a.threads, a.tokens, a.decode_tokens, kv)
        else:
            r = measure_llamacpp(a.model, a.threads, a.tokens, a.decode_tokens, kv, int(batch))
        print(json.dumps(r))
        return

    common = [a.model, "--threads", str(a.threads), "--tokens", str(a.tokens), "--decode-tokens", str(a.decode_tokens)]
    runs = [[a.python, __file__, *common, "--run", "phi3", kv, "0"] for kv in ("f16", "q8_0")]
    if not a.phi3_only:
        runs += [
            [sys.executable, __file__, *common, "--run", "llama.cpp", kv, str(batch)]
            for kv in ("f16", "q8_0")
            for batch in (512, a.tokens)
        ]
    print(f"{os.path.basename(a.model)}, {a.threads} threads, a {a.tokens}-token prompt, then {a.decode_tokens} tokens")
    print("| engine | prefill tok/s | decode tok/s after the prompt |\n|---|---|---|")
    for cmd in runs:
        r = run(cmd)
        if r is not None:
            print(f"| {r['engine']} | {r['prefill_tok_s']} | {r['decode_tok_s']} |", flush=True)


if __name__ == "__main__":
    main()
