#!/usr/bin/env python3
"""N concurrent clients against `phi3 serve`, and against llama-cpp-python's server where it is
installed, on the same model file and threads:

    python benchmarks/serve_bench.py MODEL.gguf --threads 2 [--clients 1,4,16]
        [--phi3-python PY] [--llamacpp-python PY]

Each client streams one chat completion (a different ~20-token prompt each, 32 tokens, greedy,
end-of-text tokens banned so every answer is as long) with the official `openai` client. The
table gives the completion tokens per second of all clients together (content chunks, one per
token in both servers), the time to first token (p50 and p99, of the clients that got an
answer) and how many clients got an empty answer. Each server runs in its own
process on 127.0.0.1, started and stopped by this script; `--*-python` choose the interpreters
(where phi3 or llama_cpp is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

ANSWER_TOKENS = 32
# Phi-3's end-of-text tokens: <|endoftext|>, <|end|>, </s>.
STOP_IDS = [32000, 32007, 2]
WORDS = "river stone lantern morning harbor quiet copper meadow signal winter garden paper engine".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(engine: str, args: argparse.Namespace, port: int) -> subprocess.Popen[bytes]:
    if engine == "phi3":
        cmd = [args.phi3_python, "-m", "phi3", "serve", "-m", args.model, "--threads", str(args.threads)]
        cmd += ["--port", str(port), "--model-id", "model", "--max-batch", str(max(args.clients_list))]
    else:
        cmd = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", args.model, "--model_alias", "model"]
        cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", "4096"]
        cmd += ["--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prompt(i: int) -> list[dict[str, str]]:
    a, b = WORDS[i % len(WORDS)], WORDS[(5 * i + 3) % len(WORDS)]
    return [{"role": "user", "content": f"Write a short story about the {a} and the {b}, number {i}."}]


async def one_client(client: Any, i: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="model",
        messages=prompt(i),
        max_tokens=ANSWER_TOKENS,
        temperature=0,
        stream=True,
        logit_bias={str(t): -100 for t in STOP_IDS},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            tokens += 1
            if first is None:
                first = time.perf_counter() - t0
    return (first if first is not None else float("nan")), tokens


async def round_of(base_url: str, n: int, offset: int) -> tuple[float, list[float], int]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, offset + i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await client.close()
    answered = [r[0] for r in results if r[1] > 0]
    return sum(r[1] for r in results) / elapsed, answered, n - len(answered)


def wait_ready(base_url: str, process: subprocess.Popen[bytes]) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=5)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            return
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve_bench: the server did not start") from None
            time.sleep(0.5)


def measure(engine: str, args: argparse.Namespace) -> dict[int, tuple[float, str, int]]:
    port = free_port()
    process = start(engine, args, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base_url, process)
        asyncio.run(round_of(base_url, 1, 1000))  # warm-up
        table = {}
        for n in args.clients_list:
            tok_s, ttfts, empty = asyncio.run(round_of(base_url, n, 100 * n))
            ttfts.sort()
            if ttfts:
                p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
                ttft = f"{statistics.median(ttfts):.2f} / {p99:.2f}"
            else:
                ttft = "-"
            table[n] = (tok_s, ttft, empty)
            print(f"serve_bench: {engine}, {n} clients: {tok_s:.2f} tok/s", file=sys.stderr)
        return table
    finally:
        process.terminate()
        process.wait(60)


def llamacpp_server_available(python: str) -> bool:
    check = "import llama_cpp.server.app"
    return subprocess.run([python, "-c", check], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--phi3-python", default=sys.executable)
    p.add_argument("--llamacpp-python", default=sys.executable)
    args = p.parse_args()
    args.clients_list = [int(n) for n in args.clients.split(",")]

    results = {"phi3 serve": measure("phi3", args)}
    if llamacpp_server_available(args.llamacpp_python):
        results["llama_cpp.server"] = measure("llamacpp", args)
    else:
        print("serve_bench: llama_cpp.server is not importable; measuring phi3 alone", file=sys.stderr)

    names = list(results)
    print(f"\n{ANSWER_TOKENS}-token streamed answers, {args.threads} threads, {os.path.basename(args.model)}:\n")
    header = "| clients | " + " | ".join(f"{n} tok/s | {n} TTFT p50 / p99 (s) | {n} empty" for n in names)
    if len(names) == 2:
        header += " | tok/s ratio"
    print(header + " |")
    print("|---" * (1 + 3 * len(names) + (len(names) == 2)) + "|")
    for n in args.clients_list:
        cells = []
        for name in names:
            tok_s, ttft, empty = results[name][n]
            cells += [f"{tok_s:.2f}", ttft, str(empty)]
        if len(names) == 2:
            cells.append(f"{results[names[0]][n][0] / results[names[1]][n][0]:.2f}x")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
