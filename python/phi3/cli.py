"""The ``phi3`` command: stream an answer to a prompt, or chat when no prompt is given."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, Optional

from phi3._core import Phi3, Phi3Error, Stream, __version__, cpu_info


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="a local .gguf file or a hub repository id (owner/name)")
    p.add_argument("--filename", help="the .gguf file within a hub repository")
    p.add_argument("--revision", help="hub revision (default: main)")
    p.add_argument("--tokenizer", help="a tokenizer.json (file or hub repository) to use instead of the GGUF's")
    p.add_argument("--threads", type=int)
    p.add_argument("--context-length", type=int)
    p.add_argument(
        "--kv-cache",
        choices=("f16", "q8_0"),
        help="how the KV cache stores keys and values (default f16; q8_0 takes 53%% of the memory)",
    )
    p.add_argument(
        "--mapped-weights",
        action="store_true",
        help="leave the weights in the file's memory map (loads at once, slower Q4_K on AVX-512 CPUs)",
    )


def _sampling_flags(p: argparse.ArgumentParser, serve: bool) -> None:
    # For the server these are defaults of the requests that do not set them, so they have none.
    def default(value: Any) -> Any:
        return None if serve else value

    p.add_argument("--max-tokens", type=int, default=default(512))
    p.add_argument("--temperature", type=float, default=default(0.8), help="0 is greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--repeat-penalty", type=float, default=default(1.0))
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi3",
        description="Run a Phi-family model from a GGUF file and stream its answer. "
        "With no PROMPT, start an interactive chat; with '-', read the prompt from stdin. "
        "'phi3 serve' runs an OpenAI-compatible server (see 'phi3 serve --help').",
    )
    p.add_argument("prompt", nargs="?", help="the prompt ('-' reads it from stdin)")
    _model_flags(p)
    _sampling_flags(p, serve=False)
    p.add_argument("--repeat-last-n", type=int, default=64)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--raw", action="store_true", help="tokenize the prompt as is, no chat template")
    p.add_argument("--stats", action="store_true", help="print a one-line speed summary on stderr")
    p.add_argument("--version", action="store_true", help="print the version and the CPU kernels in use, then exit")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json", action="store_true", help="answer with a JSON object")
    constraint.add_argument("--json-schema", metavar="FILE", help="answer with JSON matching the schema in FILE")
    constraint.add_argument("--regex", help="the whole answer matches this regular expression")
    constraint.add_argument("--grammar", metavar="FILE", help="the answer matches the Lark grammar in FILE")
    return p


def _constraint(args: argparse.Namespace) -> dict[str, Any]:
    """The stream option the constraint flags give, if any (files read as UTF-8 text)."""
    if args.json:
        return {"json_schema": True}
    if args.json_schema:
        with open(args.json_schema, encoding="utf-8") as f:
            return {"json_schema": f.read()}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar:
        with open(args.grammar, encoding="utf-8") as f:
            return {"grammar": f.read()}
    return {}


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="phi3 serve",
        description="Serve a model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics). The sampling flags are defaults for requests that do not set them.",
    )
    _model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $PHI3_API_KEY)")
    p.add_argument("--model-id", help="the model's name in the API (default: the file name)")
    p.add_argument("--max-batch", type=int, help="streams that share one pass over the weights (default 8)")
    p.add_argument("--cache-bytes", type=int, help="bound of the prefix pool in bytes (default 1 GiB)")
    ray = p.add_argument_group("Ray Serve", 'replicas of the model behind one endpoint (pip install "phi3[ray]")')
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve; stays in the foreground")
    ray.add_argument(
        "--replicas",
        type=int,
        help="model replicas, each with --threads threads (default 1; threads default: "
        "this machine's CPUs shared among them)",
    )
    ray.add_argument(
        "--address",
        help="the Ray cluster to run on: HOST:PORT, ray://HOST:PORT or auto (default: a new local instance)",
    )
    ray.add_argument(
        "--no-prefix-affinity",
        action="store_true",
        help="route by load alone (default: requests that start alike go to the same replica while its load allows)",
    )
    _sampling_flags(p, serve=True)
    return p


def _load(args: argparse.Namespace, **options: Any) -> Phi3:
    """The model the flags of `_model_flags` name."""
    return Phi3(
        args.model,
        filename=args.filename,
        revision=args.revision,
        tokenizer=args.tokenizer,
        threads=args.threads,
        context_length=args.context_length,
        kv_cache=args.kv_cache,
        mapped_weights=args.mapped_weights,
        **options,
    )


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The stream options the flags of `_sampling_flags` give."""
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        repeat_penalty=args.repeat_penalty,
        stop=args.stop,
    )


def _serve(argv: Sequence[str]) -> int:
    parser = _serve_parser()
    args = parser.parse_args(argv)
    if not args.ray and (args.replicas is not None or args.address is not None or args.no_prefix_affinity):
        parser.error("--replicas, --address and --no-prefix-affinity apply only with --ray")
    try:
        import uvicorn

        from phi3.server import create_app
    except ImportError:
        print('phi3: error: the server needs its extra: pip install "phi3[server]"', file=sys.stderr)
        return 1
    api_key = args.api_key or os.environ.get("PHI3_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"phi3: warning: serving on {args.host} without an API key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    defaults = {key: value for key, value in _sampling_options(args).items() if value is not None}
    if args.ray:
        return _serve_on_ray(args, api_key, defaults)
    try:
        model = _load(args, max_batch=args.max_batch, cache_bytes=args.cache_bytes)
        app = create_app(model, api_key=api_key, model_id=args.model_id, defaults=defaults)
    except (Phi3Error, OSError, ValueError, TypeError) as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _serve_on_ray(args: argparse.Namespace, api_key: Optional[str], defaults: dict[str, Any]) -> int:
    try:
        from ray import serve

        import phi3.ray
    except ImportError:
        print('phi3: error: --ray needs Ray: pip install "phi3[ray]"', file=sys.stderr)
        return 1
    replicas = 1 if args.replicas is None else args.replicas
    if replicas < 1:
        print(f"phi3: error: --replicas must be >= 1, got {replicas}", file=sys.stderr)
        return 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // replicas)
    options = {
        "filename": args.filename,
        "revision": args.revision,
        "tokenizer": args.tokenizer,
        "context_length": args.context_length,
        "kv_cache": args.kv_cache,
        "mapped_weights": args.mapped_weights,
        "max_batch": args.max_batch,
        "cache_bytes": args.cache_bytes,
    }
    try:
        app = phi3.ray.build_app(
            args.model,
            num_replicas=replicas,
            threads=threads,
            prefix_affinity=not args.no_prefix_affinity,
            api_key=api_key,
            model_id=args.model_id,
            defaults=defaults,
            **{key: value for key, value in options.items() if value is not None},
        )
        # Replicas log to Ray's session logs, not here: a replica that fails would print its
        # tracebacks over the one line that says why.
        phi3.ray.connect(args.address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, TypeError) as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 1
    try:
        phi3.ray.run(app, host=args.host, port=args.port)
        print(
            f"phi3: serving {replicas} replica(s) of {threads} thread(s) at http://{args.host}:{args.port}/v1 "
            "on Ray Serve (replica logs: /tmp/ray/session_latest/logs/serve); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        threading.Event().wait()
    except phi3.ray.DeploymentError as e:
        print(f"phi3: error: the replicas did not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phi3: stopping", file=sys.stderr)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call,unused-ignore]
    return 0


def version_text() -> str:
    """The version, and which kernels run on this CPU and why (what a bug report needs)."""
    info = cpu_info()
    has = [f for f, present in info["features"].items() if present]
    lacks = [f for f, present in info["features"].items() if not present]
    cpu = " ".join(has) + (f"; lacks {' '.join(lacks)}" if lacks else "")
    if info["amx_claimed"]:
        cpu += "; claims AMX (not used by phi3's kernels)"
    return "\n".join(
        [
            f"phi3 {__version__}",
            f"kernels: {info['reason']}",
            f"build: {info['baseline']} ({info['arch']}, {info['os']})",
            f"CPU: {cpu}",
        ]
    )


def _print_stream(stream: Stream) -> str:
    pieces = []
    for piece in stream:
        assert isinstance(piece, str)
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def _print_stats(stream: Stream) -> None:
    s = stream.stats
    print(
        f"phi3: {s.prompt_tokens} prompt tokens ({s.cached_tokens} cached) at {s.prefill_tokens_per_s:.1f} tok/s, "
        f"{s.generated_tokens} generated at {s.decode_tokens_per_s:.1f} tok/s, "
        f"first token after {s.time_to_first_token_s:.3f} s, finish: {s.finish_reason}",
        file=sys.stderr,
    )


def _chat(model: Phi3, args: argparse.Namespace, options: dict[str, Any]) -> None:
    # A Chat keeps the conversation's KV cache, so each turn evaluates only the new message.
    chat = model.chat(args.system, **options)
    interactive = sys.stdin.isatty()
    if interactive:
        print("phi3 chat: type a message, Ctrl-C stops an answer, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        if not line.strip():
            continue
        with chat.stream(line) as stream:
            try:
                _print_stream(stream)
            except KeyboardInterrupt:
                if not interactive:
                    raise
                # The chat goes on; the answer so far stays in it.
                print("\n[stopped]", file=sys.stderr)
        if args.stats:
            _print_stats(stream)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = _parser().parse_args(argv)
    if args.version:
        print(version_text())
        return 0
    try:
        model = _load(args)
        options = {**_sampling_options(args), "repeat_last_n": args.repeat_last_n, **_constraint(args)}
        if args.prompt is None:
            _chat(model, args, options)
            return 0
        prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompt: Any = prompt_text
        if args.raw:
            options["raw"] = True
        elif args.system:
            prompt = [
                {"role": "system", "content": args.system},
                {"role": "user", "content": prompt_text},
            ]
        stream = model.stream(prompt, **options)
        _print_stream(stream)
        if args.stats:
            _print_stats(stream)
        return 0
    except KeyboardInterrupt:
        print("\nphi3: interrupted", file=sys.stderr)
        return 130
    except (Phi3Error, OSError, ValueError, TypeError) as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
