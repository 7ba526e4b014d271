"""stream() and generate(): stop conditions, sampling, stats, closing, and the model's accessors."""

from __future__ import annotations

import threading

import pytest
from phi3 import ContextLengthError, Phi3, Phi3Error, Stream, Token

HOCKEY = "Write a haiku about ice hockey"
HOCKEY_ANSWER = "Puck skims the white rink,\nsteel blades carve a cold bright song,\nthe net shivers once."


def test_generate_returns_the_whole_answer(haiku: Phi3) -> None:
    assert haiku.generate(HOCKEY, temperature=0) == HOCKEY_ANSWER


def test_stream_is_an_iterator_of_str(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0)
    assert isinstance(stream, Stream)
    assert iter(stream) is stream
    first = next(stream)
    assert isinstance(first, str) and first and HOCKEY_ANSWER.startswith(first)
    rest = "".join(stream)
    assert first + rest == HOCKEY_ANSWER
    with pytest.raises(StopIteration):
        next(stream)


def test_stats_after_the_loop(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0)
    assert stream.stats.finish_reason is None
    list(stream)
    s = stream.stats
    assert s.prompt_tokens == 11
    assert s.generated_tokens == 28  # llama.cpp's greedy run, the end token not counted
    assert s.finish_reason == "stop"
    assert s.time_to_first_token_s > 0
    assert s.prefill_tokens_per_s > 0
    assert s.decode_tokens_per_s > 0


def test_max_tokens_ends_with_length(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0, max_tokens=3)
    text = "".join(stream)
    assert HOCKEY_ANSWER.startswith(text) and 0 < len(text) < len(HOCKEY_ANSWER)
    assert stream.stats.generated_tokens == 3
    assert stream.stats.finish_reason == "length"


def test_max_tokens_zero_yields_nothing(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, max_tokens=0)
    assert list(stream) == []
    assert stream.stats.finish_reason == "length"


def test_stop_string_is_not_emitted(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0, stop=["blades"])
    assert "".join(stream) == "Puck skims the white rink,\nsteel "
    assert stream.stats.finish_reason == "stop"


def test_stop_string_across_tokens_is_held_back(haiku: Phi3) -> None:
    # "rink,\nsteel" spans several tokens: no piece may leak its start.
    pieces = list(haiku.stream(HOCKEY, temperature=0, stop="rink,\nsteel"))
    assert "".join(pieces) == "Puck skims the white "
    assert not any("rink" in p for p in pieces)


def test_unmatched_stop_prefix_is_released(haiku: Phi3) -> None:
    # "once." starts like "once upon": held, then released when the answer ends.
    assert haiku.generate(HOCKEY, temperature=0, stop=["once upon"]) == HOCKEY_ANSWER


def test_ignore_eos_runs_to_max_tokens(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0, max_tokens=40, ignore_eos=True)
    text = "".join(stream)
    assert text.startswith(HOCKEY_ANSWER)
    assert stream.stats.generated_tokens == 40
    assert stream.stats.finish_reason == "length"


def test_same_seed_same_text(haiku: Phi3) -> None:
    a = haiku.generate("Write a haiku about rain", temperature=1.5, seed=42, max_tokens=30)
    b = haiku.generate("Write a haiku about rain", temperature=1.5, seed=42, max_tokens=30)
    assert a == b


def test_different_seeds_differ(haiku: Phi3) -> None:
    texts = {haiku.generate("Write a haiku about rain", temperature=2.0, seed=s, max_tokens=20) for s in range(6)}
    assert len(texts) > 1


def test_sampling_options_are_honoured(haiku: Phi3) -> None:
    # top_k=1 is greedy whatever the temperature.
    assert haiku.generate(HOCKEY, temperature=5.0, top_k=1, seed=1) == HOCKEY_ANSWER
    # A tiny nucleus keeps only the most likely token: greedy again.
    assert haiku.generate(HOCKEY, temperature=1.0, top_p=0.01, seed=1) == HOCKEY_ANSWER
    # A strong repeat penalty changes the greedy answer of the model.
    penalized = haiku.generate(HOCKEY, temperature=0, repeat_penalty=50.0, max_tokens=25)
    assert penalized != HOCKEY_ANSWER


def test_details_tokens(haiku: Phi3) -> None:
    tokens = list(haiku.stream(HOCKEY, temperature=0, details=True))
    assert all(isinstance(t, Token) for t in tokens)
    assert "".join(t.text for t in tokens if isinstance(t, Token)) == HOCKEY_ANSWER
    first = tokens[0]
    assert isinstance(first, Token)
    assert first.id == 349 and first.logprob > -0.01
    assert "Token(id=349" in repr(first)


def test_close_ends_early(haiku: Phi3) -> None:
    stream = haiku.stream(HOCKEY, temperature=0)
    next(stream)
    stream.close()
    assert list(stream) == []
    with haiku.stream(HOCKEY, temperature=0) as s:
        next(s)
    assert list(s) == []


def test_emoji_and_cjk_come_out_whole(haiku: Phi3) -> None:
    # Byte-fallback tokens: the four bytes of an emoji must never be split across pieces.
    text = "🏒 冰球 — ü"
    ids = haiku.tokenize(text, add_bos=False)
    assert haiku.detokenize(ids) == text
    byte_tokens = [i for i in ids if 3 <= i < 3 + 256]
    assert byte_tokens, "the emoji goes through byte fallback"


def test_tokenize_and_detokenize(haiku: Phi3) -> None:
    ids = haiku.tokenize("<|user|>\nhello<|end|>")
    assert ids[0] == 1 and 32010 in ids and 32007 in ids
    assert haiku.tokenize("<|user|>", add_bos=False, special=False) != [32010]
    assert haiku.detokenize(haiku.tokenize("hello world", add_bos=False)) == "hello world"


def test_apply_chat_template(haiku: Phi3) -> None:
    text = haiku.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    no_prompt = haiku.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert not no_prompt.endswith("<|assistant|>\n")


def test_accessors(haiku: Phi3) -> None:
    assert haiku.context_length == 4096
    assert haiku.vocab_size == 32064
    assert haiku.threads >= 1
    md = haiku.metadata
    assert md["general.architecture"] == "phi3"
    assert md["phi3.block_count"] == 2
    assert "tokenizer.ggml.tokens" not in md  # arrays are left out
    md["general.architecture"] = "changed"
    assert haiku.metadata["general.architecture"] == "phi3"
    assert "tiny-phi3-haiku" in repr(haiku)


def test_prompt_longer_than_context(haiku: Phi3) -> None:
    ids = [1] + [450] * 5000
    with pytest.raises(ContextLengthError, match=r"5001.*4096") as caught:
        haiku.stream(ids)
    assert (caught.value.prompt_tokens, caught.value.context_length) == (5001, 4096)
    # It is both a phi3 error and a bad argument.
    with pytest.raises(Phi3Error):
        haiku.stream(ids)
    with pytest.raises(ValueError):
        haiku.stream(ids)
    assert haiku.generate(HOCKEY, temperature=0) == HOCKEY_ANSWER


def test_small_context_length_ends_with_length(haiku_path: str) -> None:
    model = Phi3(haiku_path, context_length=16)
    assert model.context_length == 16
    stream = model.stream(HOCKEY, temperature=0, ignore_eos=True)
    list(stream)
    assert stream.stats.finish_reason == "length"
    assert stream.stats.prompt_tokens + stream.stats.generated_tokens == 17


def test_threads_share_one_model(haiku: Phi3) -> None:
    results: list[str] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(haiku.generate(HOCKEY, temperature=0))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [HOCKEY_ANSWER] * 4


def test_text_since_is_text_sliced(haiku: Phi3) -> None:
    stream = haiku.stream("Write a haiku about the sea", temperature=0, details=True, stop=["waves"])
    read = ""
    for _ in stream:
        assert stream.text_since(len(read)) == stream.text[len(read) :]
        read += stream.text_since(len(read))
    assert read == stream.text
    assert stream.text_since(0) == stream.text
    assert stream.text_since(3) == stream.text[3:]
    assert stream.text_since(10**6) == ""
    assert stream.text_since(1) == stream.text[1:]
    wide = haiku.stream("Write a haiku about snow", regex="[é日ß]{6}", seed=4)
    pieces = []
    for _ in wide:
        pieces.append(wide.text_since(sum(len(p) for p in pieces)))
    assert "".join(pieces) == wide.text and len(wide.text) == 6
    assert wide.text_since(2) == wide.text[2:]


def test_a_pickled_model_reopens_and_answers_alike(haiku: Phi3) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(haiku))
    assert copy is not haiku and copy.path == haiku.path
    assert (copy.threads, copy.context_length, copy.max_batch) == (haiku.threads, haiku.context_length, haiku.max_batch)
    prompt = "Write a haiku about autumn"
    assert copy.generate(prompt, temperature=0) == haiku.generate(prompt, temperature=0)
