"""Conversations and many users: the prefix pool and a Chat's own cache change no answer, and
streams batched through one pass answer as they do alone."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import rss_mib
from phi3 import Chat, Phi3

TOPICS = ["ice hockey", "autumn rain", "a lighthouse", "snow", "the sea", "a cat", "mountains", "bread"]
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 40}


def tokens(model: Phi3, prompt: Any) -> tuple[list[int], list[float], Any]:
    stream = model.stream(prompt, details=True, **GREEDY)
    pieces = list(stream)
    return [t.id for t in pieces], [t.logprob for t in pieces], stream.stats


def test_the_prefix_pool_changes_no_answer(haiku_path: str) -> None:
    pooled, plain = Phi3(haiku_path), Phi3(haiku_path, cache_bytes=0)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You write haiku."}]
    for turn, topic in enumerate(TOPICS[:4]):
        messages.append({"role": "user", "content": f"Write a haiku about {topic}"})
        ids, logprobs, stats = tokens(pooled, messages)
        want_ids, want_logprobs, want_stats = tokens(plain, messages)
        assert ids == want_ids, turn
        assert logprobs == pytest.approx(want_logprobs, abs=1e-3), turn
        assert want_stats.cached_tokens == 0
        if turn == 0:
            assert stats.cached_tokens == 0
        else:
            # The earlier turns came from the pool; at least the last prompt token did not.
            assert 0 < stats.cached_tokens < stats.prompt_tokens, stats
        messages.append({"role": "assistant", "content": pooled.detokenize(ids)})
    # The same prompt again: all of it but the last token is reused.
    again = pooled.stream(messages[:2], **GREEDY)
    list(again)
    assert again.stats.cached_tokens == again.stats.prompt_tokens - 1


def test_a_chat_answers_as_the_whole_conversation_sent_afresh(haiku_path: str) -> None:
    model = Phi3(haiku_path, cache_bytes=0)
    chat = model.chat("You write haiku.", **GREEDY)
    assert isinstance(chat, Chat)
    for turn, topic in enumerate(TOPICS[:3]):
        stream = chat.stream(f"Write a haiku about {topic}")
        answer = "".join(stream)
        messages = chat.messages
        assert len(messages) == 3 + 2 * turn
        assert messages[-1] == {"role": "assistant", "content": answer}
        assert messages[-2] == {"role": "user", "content": f"Write a haiku about {topic}"}
        assert model.generate(messages[:-1], **GREEDY) == answer, turn
        if turn > 0:
            # Its own cache, with the pool off: all but the new message and the few tokens
            # where the template's rendering of the last answer ends.
            s = stream.stats
            assert s.prompt_tokens - 30 < s.cached_tokens < s.prompt_tokens, s
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You write haiku."}]


def test_chat_options_are_checked_and_overridable(haiku: Phi3) -> None:
    with pytest.raises(TypeError, match="'bogus'"):
        haiku.chat(bogus=1)
    with pytest.raises(TypeError, match="'raw'"):
        haiku.chat(raw=True)
    with pytest.raises(ValueError, match="temperature"):
        haiku.chat(temperature=-1.0)
    with pytest.raises(TypeError, match="max_tokens must be an int"):
        haiku.chat(max_tokens="5")
    with pytest.raises(TypeError, match="system must be a str"):
        haiku.chat(system=3)  # type: ignore[arg-type]
    chat = haiku.chat(max_tokens=3, temperature=0.0)
    with pytest.raises(TypeError, match="text must be a str"):
        chat.stream(["hello"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_p"):
        chat.generate("hi", top_p=2.0)
    # A failed call leaves the conversation as it was.
    assert chat.messages == []
    stream = chat.stream("Write a haiku about snow", max_tokens=5)
    tokens_of_turn = list(stream)
    assert stream.stats.generated_tokens <= 5 and tokens_of_turn


def test_one_turn_at_a_time(haiku: Phi3) -> None:
    chat = haiku.chat(temperature=0.0, max_tokens=30)
    first = chat.stream("Write a haiku about snow")
    next(first)
    with pytest.raises(ValueError, match="being generated"):
        chat.stream("and another")
    with pytest.raises(ValueError, match="being generated"):
        chat.reset()
    first.close()
    # A closed turn keeps what was generated so far, and the chat goes on.
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.generate("Write a haiku about rain")
    assert len(chat.messages) == 4


@pytest.mark.parametrize("argument", ["cache_bytes", "max_batch"])
def test_pool_and_batch_arguments_are_checked(haiku_path: str, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        Phi3(haiku_path, **{argument: -1})
    with pytest.raises(TypeError):
        Phi3(haiku_path, **{argument: "1"})


def test_the_pool_stays_within_its_bound(haiku_path: str) -> None:
    bound_mib = 4
    model = Phi3(haiku_path, cache_bytes=bound_mib << 20)
    model.generate("warm up", max_tokens=8)
    start = rss_mib()
    # Different answers every time: each leaves its own cache, and the oldest go.
    for seed in range(300):
        model.generate("Write a haiku about ice hockey", max_tokens=16, temperature=1.0, seed=seed)
    assert rss_mib() - start < bound_mib + 16, (start, rss_mib())


def test_concurrent_streams_answer_as_alone(haiku_path: str) -> None:
    model = Phi3(haiku_path, cache_bytes=0)
    prompts = [f"Write a haiku about {topic}" for topic in TOPICS]
    want = [tokens(model, p)[0] for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            start.wait()
            got[i] = tokens(model, prompts[i])[0]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert got == want
