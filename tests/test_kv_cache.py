"""The 8-bit KV cache: the answers of the f16 cache on the trained fixture, exact prefix reuse
and batching on its own terms, and its argument checked."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from phi3 import Phi3

TOPICS = ["ice hockey", "autumn rain", "a lighthouse", "snow"]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 40}


def test_q8_0_gives_the_f16_caches_answers(haiku_path: str) -> None:
    f16, q8 = Phi3(haiku_path, cache_bytes=0), Phi3(haiku_path, cache_bytes=0, kv_cache="q8_0")
    assert (f16.kv_cache, q8.kv_cache) == ("f16", "q8_0")
    for topic in TOPICS:
        prompt = f"Write a haiku about {topic}"
        want = list(f16.stream(prompt, details=True, **GREEDY))
        got = list(q8.stream(prompt, details=True, **GREEDY))
        assert [t.id for t in got] == [t.id for t in want], topic
        assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want], abs=0.05), topic


def test_q8_0_prefix_reuse_and_chats_are_exact(haiku_path: str) -> None:
    pooled = Phi3(haiku_path, kv_cache="q8_0")
    plain = Phi3(haiku_path, kv_cache="q8_0", cache_bytes=0)
    chat = pooled.chat("You write haiku.", **GREEDY)
    for topic in TOPICS[:3]:
        answer = chat.generate(f"Write a haiku about {topic}")
        messages = chat.messages[:-1]
        assert plain.generate(messages, **GREEDY) == answer, topic
        again = pooled.stream(messages, **GREEDY)
        assert "".join(again) == answer, topic
        assert again.stats.cached_tokens > 0


def test_a_pickled_model_keeps_its_cache_type(haiku_path: str) -> None:
    model = Phi3(haiku_path, kv_cache="q8_0")
    assert pickle.loads(pickle.dumps(model)).kv_cache == "q8_0"


def test_the_cache_type_is_checked(haiku_path: str) -> None:
    with pytest.raises(ValueError, match=r"kv_cache must be one of .*q8_0.*got .q4_0"):
        Phi3(haiku_path, kv_cache="q4_0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Phi3(haiku_path, kv_cache=8)  # type: ignore[arg-type]
