"""Bad arguments and bad files raise clear exceptions before any work, and the model still
answers right after."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

import pytest
from phi3 import ModelFileError, Phi3, Phi3Error

HOCKEY = "Write a haiku about ice hockey"


@pytest.mark.parametrize(
    "prompt,kwargs,error,match",
    [
        (42, {}, TypeError, "prompt must be"),
        (None, {}, TypeError, "prompt must be"),
        ([], {}, ValueError, "empty"),
        ([1, -5], {}, ValueError, r"prompt\[1\]"),
        ([1, 10**12], {}, ValueError, r"prompt\[1\]"),
        ([1, 999_999], {}, ValueError, r"prompt: token id 999999 at index 1 is out of range"),
        ([1, "a"], {}, TypeError, r"prompt\[1\]"),
        ([{"role": "wizard", "content": "hi"}], {}, ValueError, "role"),
        ([{"role": "user"}], {}, ValueError, "content"),
        ([{"role": "user", "content": 5}], {}, TypeError, "content"),
        ([1, 2], {"raw": True}, TypeError, "raw"),
        (HOCKEY, {"temperature": -0.1}, ValueError, "temperature"),
        (HOCKEY, {"temperature": float("nan")}, ValueError, "temperature"),
        (HOCKEY, {"temperature": "hot"}, TypeError, "temperature"),
        (HOCKEY, {"max_tokens": "many"}, TypeError, "max_tokens"),
        (HOCKEY, {"ignore_eos": "yes"}, TypeError, "ignore_eos"),
        (HOCKEY, {"top_p": 0.0}, ValueError, "top_p"),
        (HOCKEY, {"top_p": 1.5}, ValueError, "top_p"),
        (HOCKEY, {"top_k": -1}, ValueError, "top_k"),
        (HOCKEY, {"max_tokens": -1}, ValueError, "max_tokens"),
        (HOCKEY, {"repeat_penalty": 0}, ValueError, "repeat_penalty"),
        (HOCKEY, {"repeat_last_n": -2}, ValueError, "repeat_last_n"),
        (HOCKEY, {"seed": -1}, ValueError, "seed"),
        (HOCKEY, {"seed": "x"}, TypeError, "seed"),
        (HOCKEY, {"stop": 5}, TypeError, "stop"),
        (HOCKEY, {"stop": ["ok", 5]}, TypeError, r"stop\[1\]"),
        (HOCKEY, {"stop": [""]}, ValueError, r"stop\[0\]"),
    ],
)
def test_bad_arguments(haiku: Phi3, prompt: Any, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error) as info:
        haiku.stream(prompt, **kwargs)
    # The argument is named in the message, or (for a wrong type caught by the binding's
    # argument parsing) in the exception's note, which the traceback shows.
    described = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert re.search(match, described), described
    assert haiku.generate(HOCKEY, temperature=0, max_tokens=5) == "Puck skims the"


@pytest.mark.parametrize(
    "ids,error,match",
    [
        ([1, 999_999], ValueError, r"ids: token id 999999 at index 1 is out of range"),
        ([1, -1], ValueError, r"ids\[1\]"),
        ("hello", TypeError, "ids must be"),
    ],
)
def test_bad_detokenize_arguments(haiku: Phi3, ids: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        haiku.detokenize(ids)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        Phi3("/no/such/model.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="directory"):
        Phi3(tmp_path)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "too short"),
        (b"NOPE" + bytes(60), "magic"),
        (b"GGUF" + (99).to_bytes(4, "little") + bytes(60), "version"),
    ],
)
def test_broken_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=match):
        Phi3(path)


def test_truncated_file(tmp_path: Path, haiku_path: str) -> None:
    data = Path(haiku_path).read_bytes()
    path = tmp_path / "half.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated|past the end"):
        Phi3(path)


def test_vocabulary_only_file_is_not_a_model() -> None:
    from conftest import fixture_path

    with pytest.raises(ModelFileError, match=re.escape("token_embd.weight")) as caught:
        Phi3(fixture_path("phi3-vocab.gguf"))
    # The tensor at fault, as an attribute: no parsing of the message.
    assert (caught.value.tensor, caught.value.key) == ("token_embd.weight", None)


def test_a_bad_key_is_named_in_an_attribute(tmp_path: Path, haiku_path: str) -> None:
    from conftest import fixture_path

    # Its architecture, the first "phi3" in the file, made one phi3 does not run.
    data = Path(fixture_path("phi3-vocab.gguf")).read_bytes()
    assert b"general.architecture" in data
    path = tmp_path / "other.gguf"
    path.write_bytes(data.replace(b"phi3", b"zzzz", 1))
    with pytest.raises(ModelFileError) as caught:
        Phi3(path)
    assert caught.value.key is not None and caught.value.tensor is None, caught.value
    assert caught.value.key in str(caught.value)


def test_an_unreadable_file_is_an_os_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user reads files whatever their mode (root)")
        with pytest.raises(PermissionError) as caught:
            Phi3(path)
        assert caught.value.errno == errno.EACCES and "locked.gguf" in str(caught.value)
    finally:
        path.chmod(0o600)


def test_messages_roles_are_checked(haiku: Phi3) -> None:
    for role in ["tool", "function", ""]:
        messages = [{"role": "user", "content": "Hi"}, {"role": role, "content": "x"}]
        with pytest.raises(ValueError, match=re.escape(f"messages[1]['role'] is {role!r}")):
            haiku.generate(messages, max_tokens=1)
        with pytest.raises(ValueError, match="expected one of system, user, assistant"):
            haiku.apply_chat_template(messages)


def test_errors_are_phi3_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(Phi3Error):
        Phi3(path)
    assert issubclass(Phi3Error, RuntimeError)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"threads": 0}, ValueError, "threads"),
        ({"context_length": 0}, ValueError, "context_length"),
        ({"context_length": 10**7}, ValueError, "context_length"),
        ({"filename": "x.gguf"}, ValueError, "filename"),
        ({"tokenizer": "/no/such/tokenizer.json"}, FileNotFoundError, "tokenizer.json"),
    ],
)
def test_bad_constructor_arguments(haiku_path: str, kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Phi3(haiku_path, **kwargs)
