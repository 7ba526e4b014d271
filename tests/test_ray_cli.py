"""``phi3 serve --ray``: the CLI starts Ray Serve replicas on a local Ray instance of its own and
stays in the foreground until Ctrl-C; a model that does not load, an address where no cluster
answers and flags without --ray are clear errors. Skipped when Ray is not installed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from phi3 import Phi3

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "phi3[ray]")')
openai = pytest.importorskip("openai", reason="the openai client is not installed")

MODEL_ID = "tiny-phi3-haiku-q4_k_m"
HOCKEY = [{"role": "user", "content": "Write a haiku about ice hockey"}]
# Starting Ray and its replicas takes seconds on a fast machine; this bounds a stuck one.
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _phi3_serve(*args: str, **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "phi3", "serve", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "RAY_DEDUP_LOGS": "0"},
        **popen,
    )


def test_phi3_serve_ray_answers_and_stops_on_ctrl_c(haiku: Phi3, haiku_path: str) -> None:
    port = _free_port()
    process = _phi3_serve("-m", haiku_path, "--ray", "--replicas", "2", "--threads", "1", "--port", str(port))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                r = client.chat.completions.create(model=MODEL_ID, messages=HOCKEY, temperature=0)
                break
            except (openai.APIConnectionError, openai.NotFoundError, openai.InternalServerError):
                # Serve's proxy answers 404/503 until the application is ready.
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert r.choices[0].message.content == haiku.generate(HOCKEY, temperature=0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=START_TIMEOUT_S)
        assert process.returncode == 0, stderr[-4000:]
        assert "phi3: stopping" in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_model_that_does_not_load_is_its_own_error(tmp_path: Any) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    process = _phi3_serve("-m", str(bad), "--ray", "--threads", "1", "--port", str(_free_port()))
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("phi3: error: the replicas did not start: ModelFileError: invalid GGUF file"), stderr[-4000:]
    assert "too short for a GGUF header" in last


def test_no_cluster_at_the_address(haiku_path: str) -> None:
    port = _free_port()  # nothing listens there
    process = _phi3_serve("-m", haiku_path, "--ray", "--address", f"127.0.0.1:{port}")
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 1
    assert f"phi3: error: no Ray cluster at 127.0.0.1:{port}" in stderr


def test_ray_flags_need_ray(haiku_path: str) -> None:
    process = _phi3_serve("-m", haiku_path, "--replicas", "2")
    _, stderr = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == 2
    assert "--replicas, --address and --no-prefix-affinity apply only with --ray" in stderr
