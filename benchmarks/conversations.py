#!/usr/bin/env python3
"""Conversations and concurrent streams, phi3 against llama.cpp (llama-cpp-python), each engine
in its own process, same file and threads:

    python benchmarks/conversations.py MODEL.gguf --threads 2

Chat: 8 turns; each adds a user message of about 120 tokens and a 48-token answer (end-of-text
tokens banned, so every engine writes the same number). The table gives the time to first token
of each turn for: phi3 sent the whole conversation each turn (`stream(messages)`, which the
prefix pool serves), phi3's `Chat`, phi3 with the pool off (what every turn cost before it), and
llama.cpp's `create_chat_completion` (which keeps the last prompt's cache).

Streams: N threads stream 64 tokens each from different ~20-token prompts, at once; the table
gives the tokens per second of all of them together (the median of `--rounds` rounds, each
round every stream count in turn, so that a noisy host weighs on every count alike), with
phi3's batching (`max_batch=8`) and without it (`max_batch=1`: one stream at a time), and
llama.cpp with one `Llama` per thread (a `Llama` serves one call at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

TURNS = 8
ANSWER_TOKENS = 48
STREAM_TOKENS = 64
WORDS = (
    "river stone lantern morning harbor quiet copper meadow signal winter garden paper engine "
    "orbit candle thunder silver valley market window ladder forest cobalt shadow"
).split()
# Phi-3's end-of-text tokens: <|endoftext|>, <|end|>, </s>; banned so every answer is as long.
STOP_IDS = [32000, 32007, 2]


def user_message(turn: int) -> str:
    rng = random.Random(turn)
    return "Tell me about " + " ".join(rng.choice(WORDS) for _ in range(110)) + "."


def phi3_chat(model: str, threads: int, mode: str, mapped: bool) -> list[float]:
    from phi3 import Phi3

    m = Phi3(model, threads=threads, cache_bytes=0 if mode == "nopool" else None, mapped_weights=mapped)
    options: dict[str, Any] = dict(max_tokens=ANSWER_TOKENS, temperature=0, ignore_eos=True)
    chat = m.chat("You are a helpful assistant.", **options) if mode == "chat" else None
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    ttfts = []
    for turn in range(TURNS):
        text = user_message(turn)
        t0 = time.perf_counter()
        if chat is not None:
            stream = chat.stream(text)
        else:
            messages.append({"role": "user", "content": text})
            stream = m.stream(messages, **options)
        pieces = [next(stream)]
        ttfts.append(time.perf_counter() - t0)
        pieces.extend(stream)
        if chat is None:
            messages.append({"role": "assistant", "content": "".join(pieces)})
    return ttfts


def llamacpp_chat(model: str, threads: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    ttfts = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": user_message(turn)})
        t0 = time.perf_counter()
        chunks = llm.create_chat_completion(
            messages,  # type: ignore[arg-type]
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            stream=True,
            logit_bias={i: -100.0 for i in STOP_IDS},
        )
        answer, first = [], None
        for chunk in chunks:
            delta = chunk["choices"][0]["delta"]  # type: ignore[index]
            if delta.get("content"):
                first = first or time.perf_counter() - t0
                answer.append(delta["content"])
        ttfts.append(first or float("nan"))
        messages.append({"role": "assistant", "content": "".join(answer)})
    return ttfts


def concurrent(n: int, run_one: Any) -> float:
    """Tokens per second of `n` threads each running `run_one(i) -> tokens` at once."""
    barrier = threading.Barrier(n + 1)
    counts = [0] * n

    def worker(i: int) -> None:
        barrier.wait()
        counts[i] = run_one(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def in_rounds(counts: list[int], rounds: int, run_one: Any) -> list[float]:
    """The median over `rounds` of [`concurrent`] at each count, the counts in turn each round."""
    results: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            results[n].append(concurrent(n, run_one))
    return [statistics.median(results[n]) for n in counts]


def stream_prompt(i: int) -> str:
    return f"Write a short story about the {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i + 1) % len(WORDS)]}."


def phi3_streams(model: str, threads: int, counts: list[int], rounds: int, max_batch: int, mapped: bool) -> list[float]:
    from phi3 import Phi3

    m = Phi3(model, threads=threads, max_batch=max_batch, cache_bytes=0, mapped_weights=mapped)

    def one(i: int) -> int:
        stream = m.stream(stream_prompt(i), max_tokens=STREAM_TOKENS, temperature=0, ignore_eos=True)
        for _ in stream:
            pass
        return stream.stats.generated_tokens

    one(0)
    return in_rounds(counts, rounds, one)


def llamacpp_streams(model: str, threads: int, counts: list[int], rounds: int) -> list[float]:
    from llama_cpp import Llama

    llms = [
        Llama(model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False) for _ in range(max(counts))
    ]

    def one(i: int) -> int:
        out = llms[i].create_completion(
            stream_prompt(i),
            max_tokens=STREAM_TOKENS,
            temperature=0,
            logit_bias={t: -100.0 for t in STOP_IDS},
        )
        return int(out["usage"]["completion_tokens"])  # type: ignore[index]

    one(0)
    return in_rounds(counts, rounds, one)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    counts = [int(n) for n in args.streams.split(",")]
    if args.engine == "llamacpp":
        return {
            "chat_ttft_s": llamacpp_chat(args.model, args.threads),
            "streams_tok_s": llamacpp_streams(args.model, args.threads, counts, args.rounds),
        }
    if args.engine == "phi3-streams":
        return {
            "batched_tok_s": phi3_streams(args.model, args.threads, counts, args.rounds, 8, args.mapped_weights),
            "one_at_a_time_tok_s": phi3_streams(args.model, args.threads, counts, args.rounds, 1, args.mapped_weights),
        }
    mode = args.engine.removeprefix("phi3-")
    return {"chat_ttft_s": phi3_chat(args.model, args.threads, mode, args.mapped_weights)}


def child(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, args.model, "--threads", str(args.threads), "--streams", args.streams]
    cmd += ["--rounds", str(args.rounds)]
    cmd += ["--mapped-weights"] if args.mapped_weights else []
    r = subprocess.run([*cmd, "--engine", engine], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"conversations: {engine} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--streams", default="1,2,4,8", help="comma-separated stream counts")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the stream counts (the median is reported)")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--mapped-weights", action="store_true", help="phi3: leave the weights in the file's memory map")
    p.add_argument("--engine", help="(internal) measure one engine in this process")
    args = p.parse_args()
    if args.engine:
        print(json.dumps(measure(args)))
        return

    chats = {e: child(f"phi3-{e}", args)["chat_ttft_s"] for e in ("messages", "chat", "nopool")}
    streams = child("phi3-streams", args)
    llama = None if args.no_llamacpp else child("llamacpp", args)
    names = ["phi3 stream(messages)", "phi3 Chat", "phi3 pool off"] + (["llama.cpp"] if llama else [])
    columns = [*chats.values()] + ([llama["chat_ttft_s"]] if llama else [])
    print(f"Chat, time to first token (s), {args.threads} threads:\n")
    print("| turn | " + " | ".join(names) + (" | phi3 / llama.cpp |" if llama else " |"))
    print("|---" * (len(names) + 1 + bool(llama)) + "|")
    for turn in range(TURNS):
        cells = [f"{c[turn]:.2f}" for c in columns]
        if llama:
            cells.append(f"{chats['messages'][turn] / llama['chat_ttft_s'][turn]:.2f}x")
        print(f"| {turn + 1} | " + " | ".join(cells) + " |")
    counts = args.streams.split(",")
    print(f"\nConcurrent streams, tokens/s of all together (median of {args.rounds}), {args.threads} threads:\n")
    print("| streams | phi3 batched | phi3 one at a time" + (" | llama.cpp | phi3 / llama.cpp |" if llama else " |"))
    print("|---" * (5 if llama else 3) + "|")
    for i, n in enumerate(counts):
        cells = [f"{streams['batched_tok_s'][i]:.1f}", f"{streams['one_at_a_time_tok_s'][i]:.1f}"]
        if llama:
            ratio = streams["batched_tok_s"][i] / llama["streams_tok_s"][i]
            cells += [f"{llama['streams_tok_s'][i]:.1f}", f"{ratio:.2f}x"]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
