#!/usr/bin/env python3
"""The cost of structured output: decode under a JSON schema against decode without one, and
the schema's compile time.

    python benchmarks/structured.py MODEL.gguf --threads 2

The schema is nested, about 10 fields (objects, an array, enums, bounded numbers, a pattern).
Each run samples at temperature 1.0 from the same seeds, with and without the schema, and
compares the decode time per token (``Stats.decode_tokens_per_s``; the constrained answers end
where the schema does, so the token counts differ). The compile time is that of the ``stream()``
call with the schema less that of the call without it, after a first constraint has built the
vocabulary's trie (timed apart: once per model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 24},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "DE", "FR", "JP"]},
            },
            "required": ["city", "zip", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "name", "email", "role", "score", "active", "tags", "address"],
    "additionalProperties": False,
}
PROMPT = "Give me a user record as JSON."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from phi3 import Phi3

    m = Phi3(args.model, threads=args.threads)
    m.generate(PROMPT, max_tokens=4)  # weights faulted in

    t0 = time.perf_counter()
    stream = m.stream(PROMPT, regex="[a-z]", max_tokens=1)
    trie_s = time.perf_counter() - t0
    stream.close()

    plain_open, schema_open = [], []
    for i in range(args.runs):
        # Only the call is timed (it compiles, then submits); closing waits for a pass to end.
        t0 = time.perf_counter()
        stream = m.stream(PROMPT, max_tokens=1)
        plain_open.append(time.perf_counter() - t0)
        stream.close()
        # A schema not seen before each time, so that the compile cache does not answer.
        schema = dict(SCHEMA, description=f"run {i}")
        t0 = time.perf_counter()
        stream = m.stream(PROMPT, json_schema=schema, max_tokens=1)
        schema_open.append(time.perf_counter() - t0)
        stream.close()
    compile_ms = (statistics.median(schema_open) - statistics.median(plain_open)) * 1e3

    rows = []
    for seed in range(args.runs):
        per_token = {}
        for name, options in (("plain", {}), ("schema", {"json_schema": SCHEMA})):
            stream = m.stream(PROMPT, temperature=1.0, seed=seed, max_tokens=args.max_tokens, **options)
            for _ in stream:
                pass
            stats = stream.stats
            per_token[name] = (1e3 / stats.decode_tokens_per_s, stats.generated_tokens, stats.finish_reason)
        rows.append(per_token)

    print(f"model: {args.model}, vocabulary {m.vocab_size}, threads {m.threads}")
    print(f"first constraint (builds the trie): {trie_s * 1e3:.0f} ms")
    print(f"schema compile (median of {args.runs}): {compile_ms:.1f} ms")
    print("| seed | plain ms/token (tokens) | schema ms/token (tokens, finish) | overhead |")
    print("|---|---|---|---|")
    overheads = []
    for seed, row in enumerate(rows):
        (p, pn, _), (s, sn, finish) = row["plain"], row["schema"]
        overheads.append(s / p - 1)
        print(f"| {seed} | {p:.1f} ({pn}) | {s:.1f} ({sn}, {finish}) | {100 * (s / p - 1):+.1f} % |")
    print(f"median overhead: {100 * statistics.median(overheads):+.1f} %")


if __name__ == "__main__":
    main()
