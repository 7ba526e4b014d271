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
    """Another thread ticks while one call is inside the model. With the GIL held through
    the call, it could tick only as the call starts and ends (at most twice per call); so
    some call seeing many ticks shows the GIL was released, whatever the machine's speed."""
    in_call = threading.Event()
    done = threading.Event()
    ticks_in_call = 0

    def count() -> None:
        nonlocal ticks_in_call
        while not done.is_set():
            if in_call.is_set():
                ticks_in_call += 1
            time.sleep(0.0005)

    counter = threading.Thread(target=count)
    counter.start()
    best = 0
    try:
        # 3000 decode steps, each a call into the model; bounded at 20 calls.
        for _ in range(20):
            ticks_in_call = 0
            in_call.set()
            haiku.generate([1] + [450] * 1000, max_tokens=3000, ignore_eos=True, temperature=0)
            in_call.clear()
            best = max(best, ticks_in_call)
            if best >= 10:
                break
    finally:
        done.set()
        counter.join()
    assert best >= 10, best


def test_ctrl_c_interrupts_a_long_generation(haiku_path: str) -> None:
    # The child generates until the signal arrives (at most 1000 long generations), so how
    # fast the machine is does not matter.
    script = textwrap.dedent(
        f"""
        import sys
        from phi3 import Phi3
        m = Phi3({haiku_path!r}, context_length=4096)
        started = False
        try:
            for _ in range(1000):
                s = m.stream("Write a haiku about ice hockey", max_tokens=4000, ignore_eos=True, temperature=0)
                for _ in s:
                    if not started:
                        started = True
                        print("started", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            # The model is still usable.
            print(m.generate("Write a haiku about ice hockey", temperature=0, max_tokens=5), flush=True)
            sys.exit(0)
        print("finished", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "interrupted", out
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
