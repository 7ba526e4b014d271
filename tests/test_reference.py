"""End to end against llama.cpp's answers: prompt ids, greedy text, first-token logprob,
and streaming that concatenates to the same text, for every kind of prompt."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import HAIKU_MODELS, load, prompt_of, reference
from phi3 import Token

CASES = [(m, case) for m in HAIKU_MODELS for case in reference(m)["cases"]]


def case_id(param: Any) -> str:
    if isinstance(param, str):
        return param.split("-q")[-1].replace(".gguf", "")
    return str(param["name"])


@pytest.mark.parametrize("model_file,case", CASES, ids=case_id)
def test_prompt_ids_match_llamacpp(model_file: str, case: dict[str, Any]) -> None:
    model = load(model_file)
    if "ids" in case:
        pytest.skip("token ids are used as they are")
    if "raw" in case:
        ids = model.tokenize(case["raw"], add_bos=True, special=True)
    else:
        messages = case.get("messages") or [{"role": "user", "content": case["text"]}]
        text = model.apply_chat_template(messages)
        assert text == case["prompt_text"]
        ids = model.tokenize(text)
    assert ids == case["prompt_ids"]


@pytest.mark.parametrize("model_file,case", CASES, ids=case_id)
def test_first_token_logprob_matches_llamacpp(model_file: str, case: dict[str, Any]) -> None:
    model = load(model_file)
    prompt, raw = prompt_of(case)
    stream = model.stream(prompt, max_tokens=1, temperature=0, raw=raw, details=True)
    tokens = list(stream)
    assert len(tokens) == 1 and isinstance(tokens[0], Token)
    assert tokens[0].id == case["greedy_ids"][0]
    assert abs(tokens[0].logprob - case["first_token_logprob"]) < 0.05
    assert stream.stats.prompt_tokens == len(case["prompt_ids"])


@pytest.mark.parametrize("model_file,case", CASES, ids=case_id)
def test_greedy_stream_matches_llamacpp(model_file: str, case: dict[str, Any]) -> None:
    if case["greedy_min_margin"] < 1.0:
        pytest.skip("near-tie along the run: llama.cpp's own noise may flip it")
    model = load(model_file)
    prompt, raw = prompt_of(case)
    stream = model.stream(prompt, max_tokens=int(case["max_tokens"]), temperature=0, raw=raw)
    pieces = list(stream)
    assert all(isinstance(p, str) and p for p in pieces)
    # llama.cpp's text keeps SentencePiece's leading space; the answer a user sees does not.
    assert "".join(pieces) == case["greedy_text"].removeprefix(" ")
    assert stream.stats.finish_reason == case["finish_reason"]
    assert stream.stats.generated_tokens == len(case["greedy_ids"])


@pytest.mark.parametrize("model_file,case", CASES, ids=case_id)
def test_details_ids_match_llamacpp(model_file: str, case: dict[str, Any]) -> None:
    if case["greedy_min_margin"] < 1.0:
        pytest.skip("near-tie along the run")
    model = load(model_file)
    prompt, raw = prompt_of(case)
    tokens = list(model.stream(prompt, max_tokens=int(case["max_tokens"]), temperature=0, raw=raw, details=True))
    assert [t.id for t in tokens if isinstance(t, Token)] == case["greedy_ids"]
    text = "".join(t.text for t in tokens if isinstance(t, Token))
    assert text == case["greedy_text"].removeprefix(" ")
    assert all(t.logprob <= 0 for t in tokens if isinstance(t, Token))
