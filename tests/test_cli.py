"""The `phi3` command, run as a subprocess the way a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

HOCKEY_ANSWER = "Puck skims the white rink,\nsteel blades carve a cold bright song,\nthe net shivers once."


def run(*args: str, stdin: str = "", phi3_cpu: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PHI3_CPU"}
    if phi3_cpu is not None:
        env["PHI3_CPU"] = phi3_cpu
    return subprocess.run(
        [sys.executable, "-m", "phi3", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_prompt_streams_the_answer(haiku_path: str) -> None:
    r = run("--model", haiku_path, "--temperature", "0", "Write a haiku about ice hockey")
    assert r.returncode == 0, r.stderr
    assert r.stdout == HOCKEY_ANSWER + "\n"


def test_stdin_prompt_and_stats(haiku_path: str) -> None:
    r = run("-m", haiku_path, "--temperature", "0", "--stats", "-", stdin="Write a haiku about ice hockey")
    assert r.returncode == 0, r.stderr
    assert r.stdout == HOCKEY_ANSWER + "\n"
    assert "tok/s" in r.stderr and "finish: stop" in r.stderr


def test_options_reach_the_model(haiku_path: str) -> None:
    r = run("-m", haiku_path, "--temperature", "0", "--max-tokens", "5", "Write a haiku about ice hockey")
    assert r.stdout == "Puck skims the\n"
    r = run("-m", haiku_path, "--temperature", "0", "--stop", "blades", "Write a haiku about ice hockey")
    assert r.stdout == "Puck skims the white rink,\nsteel \n"


def test_raw_prompt(haiku_path: str) -> None:
    raw = "<|user|>\nWrite a haiku about ice hockey<|end|>\n<|assistant|>"
    r = run("-m", haiku_path, "--temperature", "0", "--raw", raw)
    assert r.stdout == HOCKEY_ANSWER + "\n"


def test_system_message(haiku_path: str) -> None:
    r = run(
        "-m",
        haiku_path,
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        "--system",
        "You are a poet who answers in haiku.",
        "A haiku about the ocean, please.",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Grey waves fold and break,")


def test_chat_without_prompt_keeps_the_conversation(haiku_path: str) -> None:
    r = run("-m", haiku_path, "--temperature", "0", stdin="Write a haiku about ice hockey\nWrite a haiku about rain\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(HOCKEY_ANSWER + "\n")
    second = r.stdout[len(HOCKEY_ANSWER) + 1 :]
    assert second.strip() and second.endswith("\n")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/no/such.gguf", "hi"], "no such file"),
        (["--temperature", "-1", "hi"], "temperature"),
    ],
)
def test_errors_are_one_line(haiku_path: str, args: list[str], message: str) -> None:
    if "--model" not in args:
        args = ["--model", haiku_path, *args]
    r = run(*args)
    assert r.returncode == 1
    assert r.stderr.startswith("phi3: error:") and message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_version_says_which_kernels_and_why() -> None:
    r = run("--version")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("phi3 ")
    assert lines[1].startswith("kernels: ") and lines[2].startswith("build: ") and lines[3].startswith("CPU: ")
    r = run("--version", phi3_cpu="scalar")
    assert 'kernels: scalar, as PHI3_CPU="scalar" asks' in r.stdout


def test_constraint_flags(haiku_path: str, tmp_path: Path) -> None:
    r = run("-m", haiku_path, "--seed", "1", "--regex", "[0-9]{3}-[a-z]{2}", "Write a haiku about snow")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}\n", r.stdout), r.stdout
    schema = tmp_path / "point.json"
    schema.write_text(
        json.dumps(
            {"type": "object", "properties": {"x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}
        )
    )
    r = run("-m", haiku_path, "--seed", "2", "--json-schema", str(schema), "Write a haiku about snow")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["x"] in (1, 2)
    r = run("-m", haiku_path, "--regex", "(a", "Write a haiku about snow")
    assert r.returncode == 1 and "phi3: error: constraint error" in r.stderr, r.stderr
    r = run("-m", haiku_path, "--json", "--regex", "a", "x")
    assert r.returncode == 2 and "not allowed with" in r.stderr
