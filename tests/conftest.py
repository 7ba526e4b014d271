"""Shared fixtures: the reference models and llama.cpp's answers in ../shared/fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from phi3 import Phi3

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"

HAIKU_MODELS = ["tiny-phi3-haiku-q4_k_m.gguf", "tiny-phi3-haiku-q8_0.gguf"]


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing fixture {path}: the repository must have shared/ beside it")
    return path


def reference(model_file: str) -> dict[str, Any]:
    text = fixture_path(model_file.replace(".gguf", ".llamacpp.json")).read_text()
    return json.loads(text)  # type: ignore[no-any-return]


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
