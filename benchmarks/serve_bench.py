#!/usr/bin/env python3
"""N concurrent clients against `phi3 serve`, and against llama-cpp-python's server where it is
installed, on the same model file and threads:

    python benchmarks/serve_bench.py MODEL.gguf --threads 2 [--clients 1,4,16]
        [--phi3-python PY] [--llamacpp-python PY]
    python benchmarks/serve_bench.py MODEL.gguf --ray --threads 1 [--clients 1,4]
    python benchmarks/serve_bench.py MODEL.gguf --ray-affinity --threads 1

`--ray` measures `phi3 serve` alone against `phi3 serve --ray` with 1 and with 2 replicas of
`--threads` threads each (Serve's overhead, and what a second replica adds). `--ray-affinity`
holds conversations (a distinct ~300-token start each, 3 turns, 4 at a time, 0-8 s to think before each turn) against 2
replicas, with prefix-affinity routing and without, and reports per turn the share of prompt
tokens that came from a replica's prefix pool and the time to the answer.

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
import random
import signal
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
    if engine.startswith("phi3"):
        cmd = [args.phi3_python, "-m", "phi3", "serve", "-m", args.model, "--threads", str(args.threads)]
        cmd += ["--port", str(port), "--model-id", "model", "--max-batch", str(max(args.clients_list))]
        # "phi3-ray-N": N replicas; "-default": routing by load alone.
        if engine.startswith("phi3-ray-"):
            cmd += ["--ray", "--replicas", engine.split("-")[2]]
            if engine.endswith("-default"):
                cmd.append("--no-prefix-affinity")
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
        # Ctrl-C: `phi3 serve --ray` shuts its Ray instance down on it.
        process.send_signal(signal.SIGINT)
        process.wait(120)


SYSTEM_WORDS = "a careful assistant who answers about rivers harbors engines gardens and winter".split()


def preamble(conversation: int) -> str:
    # About 300 tokens, different for each conversation from its first words on; in the first
    # user message, as Phi-3-mini's template drops system messages.
    words = [SYSTEM_WORDS[(conversation * 7 + 3 * k) % len(SYSTEM_WORDS)] for k in range(220)]
    return f"Conversation {conversation}. You are " + " ".join(words) + "."


async def conversation(client: Any, c: int, turns: int, rows: list[tuple[int, int, int, float]]) -> None:
    messages: list[dict[str, str]] = []
    # Users think between turns, each for their own time: no two conversations move in step.
    think = random.Random(c)
    for turn in range(1, turns + 1):
        await asyncio.sleep(think.uniform(0, 8))
        question = f"Question {turn}: tell me about the {WORDS[(c + turn) % 13]}."
        messages.append({"role": "user", "content": f"{preamble(c)}\n{question}" if turn == 1 else question})
        t0 = time.perf_counter()
        r = await client.chat.completions.create(
            model="model", messages=messages, max_tokens=16, temperature=0, logit_bias={str(t): -100 for t in STOP_IDS}
        )
        elapsed = time.perf_counter() - t0
        cached = r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
        rows.append((turn, r.usage.prompt_tokens, cached, elapsed))
        messages.append({"role": "assistant", "content": r.choices[0].message.content or ""})


async def conversations(base_url: str, count: int, turns: int, at_once: int) -> list[tuple[int, int, int, float]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=3600)
    rows: list[tuple[int, int, int, float]] = []
    for start_at in range(0, count, at_once):
        batch = range(start_at, min(count, start_at + at_once))
        await asyncio.gather(*(conversation(client, c, turns, rows) for c in batch))
    await client.close()
    return rows


def measure_affinity(args: argparse.Namespace) -> None:
    count, turns, at_once = 8, 3, 4
    table = {}
    for engine in ("phi3-ray-2", "phi3-ray-2-default"):
        port = free_port()
        process = start(engine, args, port)
        base_url = f"http://127.0.0.1:{port}/v1"
        try:
            wait_ready(base_url, process)
            rows = asyncio.run(conversations(base_url, count, turns, at_once))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(120)
        for turn in range(1, turns + 1):
            of_turn = [r for r in rows if r[0] == turn]
            share = sum(r[2] for r in of_turn) / sum(r[1] for r in of_turn)
            table[engine, turn] = (share, statistics.median(r[3] for r in of_turn))
        print(f"serve_bench: {engine} done", file=sys.stderr)
    print(f"\n{count} conversations of {turns} turns, {at_once} at a time, 2 replicas of {args.threads} thread(s), ")
    print(f"{os.path.basename(args.model)}:\n")
    print(
        "| turn | affinity: cached share | affinity: answer p50 (s) | by load: cached share | by load: answer p50 (s) |"
    )
    print("|---|---|---|---|---|")
    for turn in range(1, turns + 1):
        (a_share, a_time), (d_share, d_time) = table["phi3-ray-2", turn], table["phi3-ray-2-default", turn]
        print(f"| {turn} | {a_share:.0%} | {a_time:.2f} | {d_share:.0%} | {d_time:.2f} |")


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
    p.add_argument("--ray", action="store_true", help="phi3 serve against phi3 serve --ray with 1 and 2 replicas")
    p.add_argument("--ray-affinity", action="store_true", help="conversations with and without prefix affinity")
    args = p.parse_args()
    args.clients_list = [int(n) for n in args.clients.split(",")]

    if args.ray_affinity:
        measure_affinity(args)
        return
    results = {"phi3 serve": measure("phi3", args)}
    if args.ray:
        results["ray, 1 replica"] = measure("phi3-ray-1", args)
        results["ray, 2 replicas"] = measure("phi3-ray-2", args)
    elif llamacpp_server_available(args.llamacpp_python):
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
