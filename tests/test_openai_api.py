"""The OpenAI-shaped calls (create_chat_completion, create_completion), the sampling options
they need (logit_bias, penalties, min_p, top_logprobs) and the asyncio API, on the trained
haiku fixture, against phi3's own greedy answers."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
from phi3 import InvalidRequestError, Phi3, Token

HOCKEY = "Write a haiku about ice hockey"
MESSAGES = [{"role": "user", "content": HOCKEY}]


def _wait_idle(model: Phi3) -> None:
    """Until no stream holds a batch place (closing frees it in the scheduler thread)."""
    for _ in range(200):
        if model.active_streams == 0 and model.queued_streams == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{model.active_streams} streams still active")


def test_chat_completion_is_the_greedy_answer(haiku: Phi3) -> None:
    want = haiku.generate(MESSAGES, temperature=0)
    r = haiku.create_chat_completion(MESSAGES, temperature=0)
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant", "content": want, "refusal": None}
    assert r["choices"][0]["finish_reason"] == "stop"
    usage = r["usage"]
    assert usage["completion_tokens"] == len(list(haiku.stream(MESSAGES, temperature=0, details=True)))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]


def test_chunks_add_up_to_the_answer(haiku: Phi3) -> None:
    want = haiku.generate(MESSAGES, temperature=0)
    chunks = list(haiku.create_chat_completion(MESSAGES, temperature=0, stream=True))
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "usage" not in chunks[-1]


def test_logprobs_are_the_tokens_of_the_content(haiku: Phi3) -> None:
    r = haiku.create_chat_completion(MESSAGES, temperature=0, logprobs=True, top_logprobs=3)
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == r["choices"][0]["message"]["content"]
    assert bytes(b for t in content for b in t["bytes"]).decode() == r["choices"][0]["message"]["content"]
    for t in content:
        assert t["logprob"] <= 0
        alternatives = [a["logprob"] for a in t["top_logprobs"]]
        assert len(alternatives) == 3
        assert alternatives == sorted(alternatives, reverse=True)
        # Greedy: the token taken is the most likely one.
        assert t["top_logprobs"][0]["token"] == t["token"] or t["token"] == ""
        assert t["top_logprobs"][0]["logprob"] == pytest.approx(t["logprob"])


def test_n_choices_share_the_request(haiku: Phi3) -> None:
    r = haiku.create_chat_completion(MESSAGES, temperature=2.0, seed=3, n=3, max_tokens=12)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in r["choices"]]
    # Each choice draws its own tokens (seed, seed+1, ...), and the request is reproducible.
    assert len(set(texts)) > 1
    again = haiku.create_chat_completion(MESSAGES, temperature=2.0, seed=3, n=3, max_tokens=12)
    assert [c["message"]["content"] for c in again["choices"]] == texts


def test_completion_is_raw(haiku: Phi3) -> None:
    want = haiku.generate("Once upon", raw=True, temperature=0, max_tokens=6)
    r = haiku.create_completion("Once upon", temperature=0, max_tokens=6, logprobs=2)
    choice = r["choices"][0]
    assert r["object"] == "text_completion"
    assert choice["text"] == want
    assert choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == want
    assert logprobs["text_offset"][0] == 0
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    echoed = haiku.create_completion("Once upon", temperature=0, max_tokens=6, echo=True)
    assert echoed["choices"][0]["text"] == "Once upon" + want


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "json_object"}, "regex": "a+"}, "regex"),
        ({"regex": "a+", "grammar": "start: x"}, "grammar"),
        ({"regex": 5}, "regex"),
        ({"json_schema": {"type": "objekt"}}, "json_schema"),
        ({"regex": "(a"}, "regex"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
            "response_format",
        ),
        ({"tools": []}, "tools"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"seed": 1.5}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
    ],
)
def test_bad_fields_name_the_field(haiku: Phi3, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        haiku.create_chat_completion(MESSAGES, **fields)
    assert info.value.param == param, info.value
    assert param in str(info.value)


@pytest.mark.parametrize(
    "messages,param",
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "hi", "tool_calls": []}], "messages[0].tool_calls"),
    ],
)
def test_bad_messages_name_the_field(haiku: Phi3, messages: Any, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        haiku.create_chat_completion(messages)
    assert info.value.param == param, info.value


def test_text_parts_are_joined(haiku: Phi3) -> None:
    parts = [{"type": "text", "text": "Write a haiku "}, {"type": "text", "text": "about ice hockey"}]
    r = haiku.create_chat_completion([{"role": "user", "content": parts}], temperature=0)
    assert r["choices"][0]["message"]["content"] == haiku.generate(MESSAGES, temperature=0)


def test_a_prompt_over_the_context_is_context_length_exceeded(haiku: Phi3) -> None:
    long = [{"role": "user", "content": "hockey " * (haiku.context_length + 10)}]
    with pytest.raises(InvalidRequestError) as info:
        haiku.create_chat_completion(long)
    assert info.value.code == "context_length_exceeded"
    assert info.value.param == "messages"


def test_logit_bias_steers_the_greedy_answer(haiku: Phi3) -> None:
    plain = list(haiku.stream(HOCKEY, temperature=0, details=True, max_tokens=3))
    assert isinstance(plain[0], Token)
    banned = plain[0].id
    steered = list(haiku.stream(HOCKEY, temperature=0, details=True, max_tokens=3, logit_bias={banned: -100.0}))
    assert isinstance(steered[0], Token)
    assert steered[0].id != banned
    # The logprob stays that of the raw logits: the bias changes the pick, not the report.
    assert steered[0].logprob < plain[0].logprob
    with pytest.raises(ValueError, match="logit_bias"):
        haiku.stream(HOCKEY, logit_bias={haiku.vocab_size: 1.0})
    with pytest.raises(TypeError, match="logit_bias"):
        haiku.stream(HOCKEY, logit_bias=[1, 2])


def test_penalties_change_only_what_they_should(haiku: Phi3) -> None:
    greedy = haiku.generate(HOCKEY, temperature=0)
    assert haiku.generate(HOCKEY, temperature=0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0) == greedy
    # Past the haiku the model repeats itself; a strong frequency penalty steers it elsewhere.
    rambling = haiku.generate(HOCKEY, temperature=0, ignore_eos=True, max_tokens=60)
    penalized = haiku.generate(HOCKEY, temperature=0, ignore_eos=True, max_tokens=60, frequency_penalty=2.0)
    assert rambling.startswith(greedy) and penalized != rambling
    # min_p 1 keeps only the most likely token: greedy, whatever the temperature.
    assert haiku.generate(HOCKEY, temperature=1.5, min_p=1.0, seed=5) == greedy
    for bad in ({"min_p": 1.5}, {"presence_penalty": -3.0}, {"top_logprobs": 21}, {"top_logprobs": -1}):
        with pytest.raises(ValueError):
            haiku.stream(HOCKEY, **bad)  # type: ignore[arg-type]


def test_stream_text_leaves_stop_strings_out(haiku: Phi3) -> None:
    with haiku.stream(HOCKEY, temperature=0, details=True, stop="rink") as stream:
        tokens = list(stream)
        assert stream.text == "Puck skims the white "
    assert "rink" in "".join(t.text for t in tokens if isinstance(t, Token))


def test_astream_matches_stream(haiku: Phi3) -> None:
    want = haiku.generate(HOCKEY, temperature=0)

    async def main() -> tuple[str, str, Any]:
        pieces = [p async for p in haiku.astream(HOCKEY, temperature=0)]
        chat = haiku.chat(temperature=0)
        answer = await chat.agenerate(HOCKEY)
        stream = haiku.astream(HOCKEY, temperature=0)
        async for _ in stream:
            pass
        return "".join(pieces), answer, stream.stats

    text, chat_answer, stats = asyncio.run(main())
    assert text == want
    assert chat_answer == want
    assert stats.finish_reason == "stop"


def test_many_astreams_run_together_and_the_loop_stays_free(haiku: Phi3) -> None:
    topics = ["rain", "snow", "the sea", "autumn", "a cat", "ice hockey"]
    want = {t: haiku.generate(f"Write a haiku about {t}", temperature=0) for t in topics}

    async def main() -> tuple[dict[str, str], int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.ensure_future(ticker())
        answers = await asyncio.gather(*(haiku.agenerate(f"Write a haiku about {t}", temperature=0) for t in topics))
        done.set()
        await tick
        return dict(zip(topics, answers)), ticks

    answers, ticks = asyncio.run(main())
    assert answers == want
    # The loop ran other work while the answers were generated: it was never blocked throughout.
    assert ticks > len(topics)


def test_cancelling_an_astream_ends_its_generation(haiku: Phi3) -> None:
    async def main() -> int:
        async def read_forever() -> None:
            async for _ in haiku.astream(HOCKEY, ignore_eos=True, max_tokens=100_000):
                pass

        task = asyncio.ensure_future(read_forever())
        while haiku.active_streams == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return 0

    asyncio.run(main())
    _wait_idle(haiku)
    assert haiku.generate(HOCKEY, temperature=0, max_tokens=5) == "Puck skims the"


def test_response_format_constrains_every_choice(haiku: Phi3) -> None:
    schema = {
        "type": "object",
        "properties": {
            "word": {"type": "string", "maxLength": 8},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
        },
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    r = haiku.create_chat_completion(
        MESSAGES,
        n=3,
        seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": True}},
    )
    for choice in r["choices"]:
        answer = json.loads(choice["message"]["content"])
        assert set(answer) == {"word", "n"} and 1 <= answer["n"] <= 9 and len(answer["word"]) <= 8
        assert choice["finish_reason"] == "stop"
    chunks = list(haiku.create_chat_completion(MESSAGES, seed=5, stream=True, response_format={"type": "json_object"}))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.lstrip().startswith("{")
    completion = haiku.create_completion("Once upon", regex="[0-9]{3}-[a-z]{2}", seed=2)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", completion["choices"][0]["text"])
