"""Shared fixtures: the reference models and llama.cpp's answers in ../shared/fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import phi3
import pytest
from phi3 import Phi3

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"

HAIKU_MODELS = ["tiny-phi3-haiku-q4_k_m.gguf", "tiny-phi3-haiku-q8_0.gguf"]


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing fixture {path}: the repository must have shared/ beside it")
    return path


def reference(model_file: str) -> dict[str, Any]:
    text = fixture_path(model_file.replace(".gguf", ".llamacpp.json")).read_text()
    return json.loads(text)  # type: ignore[no-any-return]


def prompt_of(case: dict[str, Any]) -> tuple[Any, bool]:
    """A reference case's prompt as a user passes it, and whether it is raw."""
    if "text" in case:
        return case["text"], False
    if "messages" in case:
        return case["messages"], False
    if "raw" in case:
        return case["raw"], True
    return case["ids"], False


def rss_mib() -> float:
    """This process's resident memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_models: dict[str, Phi3] = {}


def load(model_file: str) -> Phi3:
    """One shared instance per model file for the whole session."""
    if model_file not in _models:
        _models[model_file] = Phi3(fixture_path(model_file))
    return _models[model_file]


@pytest.fixture(scope="session")
def haiku() -> Phi3:
    return load("tiny-phi3-haiku-q4_k_m.gguf")


@pytest.fixture(scope="session")
def haiku_path() -> str:
    return str(fixture_path("tiny-phi3-haiku-q4_k_m.gguf"))


def pytest_configure(config: pytest.Config) -> None:
    # CI tests the wheel as users install it: a phi3 imported from this checkout would hide
    # packaging mistakes (a file left out of the wheel, a stale extension beside the sources).
    if os.environ.get("PHI3_TEST_INSTALLED") == "1" and ROOT in Path(phi3.__file__).resolve().parents:
        raise pytest.UsageError(f"PHI3_TEST_INSTALLED=1 but phi3 comes from the checkout: {phi3.__file__}")


def pytest_report_header(config: pytest.Config) -> str:
    info = phi3.cpu_info()
    return (
        f"phi3 {phi3.__version__} from {Path(phi3.__file__).parent}, {info['baseline']} build, kernels {info['level']}"
    )
