"""The GIL is released while the model works, Ctrl-C interrupts a generation, and an
abandoned stream frees its state."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

from phi3 import Phi3

HOCKEY = "Write a haiku about ice hockey"


def test_other_threads_run_during_generation(haiku: Phi3) -> None:
    ticks = 0
    done = threading.Event()

    def count() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    # A 4000-token prompt goes through in 8 long forward passes: with the GIL held through
    # them, the counter would tick about 8 times.
    start = time.perf_counter()
    haiku.generate([1] + [450] * 4000, max_tokens=1)
    elapsed = time.perf_counter() - start
    done.set()
    counter.join()
    assert ticks > max(50, 0.1 * elapsed / 0.001), (ticks, elapsed)


def test_ctrl_c_interrupts_a_long_generation(haiku_path: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from phi3 import Phi3
        m = Phi3({haiku_path!r}, context_length=4096)
        s = m.stream("Write a haiku about ice hockey", max_tokens=4000, ignore_eos=True, temperature=0)
        next(s)
        print("started", flush=True)
        try:
            for _ in s:
                pass
        except KeyboardInterrupt:
            print("interrupted", s.stats.generated_tokens, flush=True)
            # The model is still usable.
            print(m.generate("Write a haiku about ice hockey", temperature=0, max_tokens=5), flush=True)
            sys.exit(0)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("interrupted"), out
    assert int(lines[0].split()[1]) < 3990
    assert lines[1] == "Puck skims the"


def test_abandoned_streams_free_their_cache(haiku: Phi3) -> None:
    import resource

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def half_consumed() -> None:
        s = haiku.stream(HOCKEY, max_tokens=2000, temperature=0, ignore_eos=True)
        for _ in range(3):
            next(s)

    for _ in range(20):
        half_consumed()
    baseline = rss_kib()
    for _ in range(200):
        half_consumed()
    # Each cache is about 2000 positions * 2 layers * 2 * 256 * 2 bytes = 4 MB: kept, 200 of
    # them would add 800 MB.
    assert rss_kib() - baseline < 100 * 1024
