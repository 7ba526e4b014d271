"""Resources: many streams keep memory flat, a generation can run to the end of the context,
and deleting a model gives its memory back."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from conftest import fixture_path, rss_mib
from phi3 import Phi3

HOCKEY = "Write a haiku about ice hockey"


def test_soak_300_streams_keep_rss_flat(haiku_path: str) -> None:
    # The prefix pool off: it keeps finished caches on purpose (test_conversations checks that
    # it stays within its bound); here nothing else may grow.
    model = Phi3(haiku_path, cache_bytes=0)

    def one(i: int) -> None:
        stream = model.stream(HOCKEY, max_tokens=8, temperature=0.7, seed=i)
        for _ in stream:
            pass

    for i in range(50):
        one(i)
    warm = rss_mib()
    for i in range(300):
        one(i)
    assert rss_mib() - warm < 16, (warm, rss_mib())


def test_generation_runs_to_the_end_of_the_context(haiku_path: str) -> None:
    model = Phi3(haiku_path, context_length=1024)
    stream = model.stream(HOCKEY, max_tokens=5000, temperature=0.8, seed=3, ignore_eos=True)
    text = "".join(stream)
    assert text
    s = stream.stats
    assert s.finish_reason == "length"
    assert s.prompt_tokens + s.generated_tokens == model.context_length + 1


def test_deleting_the_model_returns_its_memory() -> None:
    # In a fresh interpreter, so that nothing else this test run loaded is counted.
    path = fixture_path("tiny-phi35-longrope-q4_k_m.gguf")
    size_mib = path.stat().st_size / 2**20
    script = textwrap.dedent(
        f"""
        import gc
        from phi3 import Phi3

        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

        for _ in range(3):
            m = Phi3({str(path)!r})
            m.generate("Write a haiku about rain", max_tokens=4, temperature=0)
            loaded = rss()
            del m
            gc.collect()
            print(loaded, rss())
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cycles = [tuple(map(float, line.split())) for line in r.stdout.splitlines()]
    for loaded, after in cycles:
        # The weights (the file's size, copied in) go when the model goes.
        assert loaded - after > 0.75 * size_mib, cycles
    # Loading again and again does not pile up weights (a few MiB of new worker threads' malloc
    # arenas do stay).
    assert cycles[-1][1] - cycles[0][1] < 0.5 * size_mib, cycles


def test_streams_outlive_nothing_they_need(haiku_path: str) -> None:
    # A stream keeps its model alive: deleting the Python object mid-stream is safe.
    model = Phi3(haiku_path)
    stream = model.stream(HOCKEY, temperature=0)
    del model
    gc.collect()
    assert "".join(stream).startswith("Puck")
