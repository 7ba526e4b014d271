"""Structured output: answers sampled at temperature 1.0 match their JSON schema, regex or
grammar; constraints compose with details, seeds, chats and batching; hostile constraints are
GrammarErrors, and the model answers normally afterwards."""

import json
import re
import threading
from typing import Any

import jsonschema
import pytest
from conftest import rss_mib
from phi3 import GrammarError, Phi3, Phi3Error

PROMPT = "Write a haiku about snow"
SEEDS = range(12)

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0}},
    "required": ["x", "y"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    "enum": {"enum": ["red", "green", "blue", 3, None]},
    "bounded number": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["x"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "optional fields": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "string", "maxLength": 5}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_sampled_answers_validate_against_their_schema(haiku: Phi3, name: str) -> None:
    schema = SCHEMAS[name]
    for seed in SEEDS:
        stream = haiku.stream(PROMPT, json_schema=schema, temperature=1.0, seed=seed, max_tokens=120)
        text = "".join(stream)
        assert stream.stats.finish_reason == "stop", (seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_true_is_any_object_and_strings_and_classes_work(haiku: Phi3) -> None:
    class Point:
        """Stands in for a pydantic model class: anything with model_json_schema()."""

        @classmethod
        def model_json_schema(cls) -> dict[str, Any]:
            return POINT

    for seed in range(4):
        # Strings without a bound: this model may still be inside one at max_tokens.
        stream = haiku.stream(PROMPT, json_schema=True, seed=seed, max_tokens=100)
        text = "".join(stream)
        assert text.lstrip().startswith("{"), text
        if stream.stats.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        jsonschema.validate(json.loads(haiku.generate(PROMPT, json_schema=json.dumps(POINT), seed=seed)), POINT)
        jsonschema.validate(json.loads(haiku.generate(PROMPT, json_schema=Point, seed=seed)), POINT)


def test_sampled_answers_fully_match_their_regex(haiku: Phi3) -> None:
    pattern = r"(red|green|blue)-[0-9]{2,4}( [A-Z][a-z]{1,6}){0,3}"
    for seed in SEEDS:
        text = haiku.generate(PROMPT, regex=pattern, temperature=1.0, seed=seed, max_tokens=60)
        assert re.fullmatch(pattern, text), (seed, text)


def test_sampled_answers_parse_with_their_grammar(haiku: Phi3) -> None:
    # A small arithmetic language; the regex below is the same language (depth at most 2).
    grammar = """
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""
    flat = r"[0-9]{1,3}([+-][0-9]{1,3})*"
    inner = rf"([0-9]{{1,3}}|\({flat}\))"
    middle = rf"{inner}([+-]{inner})*"
    outer = rf"([0-9]{{1,3}}|\({middle}\))([+-]([0-9]{{1,3}}|\({middle}\)))*"
    for seed in SEEDS:
        stream = haiku.stream(PROMPT, grammar=grammar, temperature=1.0, seed=seed, max_tokens=40)
        text = "".join(stream)
        if stream.stats.finish_reason == "stop" and text.count("(") <= 2:
            assert re.fullmatch(outer, text), (seed, text)
        # Cut or deeper, it is still a prefix of the language: balanced parentheses never close early.
        depth = 0
        for c in text:
            depth += {"(": 1, ")": -1}.get(c, 0)
            assert depth >= 0, text
        assert set(text) <= set("0123456789+-()"), text


def test_details_tokens_concatenate_to_the_text_and_seeds_repeat(haiku: Phi3) -> None:
    schema = SCHEMAS["refs"]
    for seed in range(4):
        stream = haiku.stream(PROMPT, json_schema=schema, seed=seed, details=True, top_logprobs=2)
        tokens = list(stream)
        assert "".join(t.text for t in tokens) == stream.text
        assert all(t.logprob <= 0.0 for t in tokens)
        assert stream.text == haiku.generate(PROMPT, json_schema=schema, seed=seed)


def test_constraints_compose_with_stop_strings_and_max_tokens(haiku: Phi3) -> None:
    stream = haiku.stream(PROMPT, regex="[a-z]{5,40}", seed=3, max_tokens=2)
    text = "".join(stream)
    assert stream.stats.finish_reason == "length" and stream.stats.generated_tokens == 2
    assert re.fullmatch("[a-z]+", text), text
    text = haiku.generate(PROMPT, regex="abc-[a-z]{5,40}", seed=3, stop=["-"])
    assert text == "abc"


def test_a_chat_keeps_its_constraint_and_turns_may_override_it(haiku: Phi3) -> None:
    chat = haiku.chat(json_schema=POINT, seed=1)
    for topic in ("snow", "rain"):
        jsonschema.validate(json.loads(chat.generate(f"Write a haiku about {topic}")), POINT)
    free = chat.generate("Write a haiku about ice hockey", json_schema=None, regex="[0-9]{3}")
    assert re.fullmatch("[0-9]{3}", free), free
    assert chat.messages[-1]["content"] == free


def test_concurrent_streams_each_keep_their_own_constraint(haiku: Phi3) -> None:
    constraints: list[dict[str, Any]] = [
        {"regex": "[0-9]{4}-[a-z]{3}"},
        {"json_schema": POINT},
        {"regex": "(yes|no)( [a-z]{1,5}){1,4}"},
        {"json_schema": SCHEMAS["array"]},
        {},
        {"grammar": 'start: "A" B+\nB: /[bc]/'},
    ]
    alone = [haiku.generate(PROMPT, seed=i, max_tokens=40, **c) for i, c in enumerate(constraints)]
    together: list[str] = [""] * len(constraints)

    def run(i: int) -> None:
        together[i] = haiku.generate(PROMPT, seed=i, max_tokens=40, **constraints[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(constraints))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert re.fullmatch("[0-9]{4}-[a-z]{3}", together[0])
    jsonschema.validate(json.loads(together[1]), POINT)


def _deep_dict(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


HOSTILE: dict[str, Any] = {
    "10,000 levels (dict)": {"json_schema": _deep_dict(10_000)},
    "10,000 levels (text)": {
        "json_schema": '{"type": "array", "items": ' * 10_000 + '{"type": "integer"}' + "}" * 10_000
    },
    "a million-value enum": {"json_schema": {"enum": [f"value {i}" for i in range(1_000_000)]}},
    "a catastrophic regex": {"regex": "((a{100}){100}){100}"},
    "a catastrophic pattern": {"json_schema": {"type": "string", "pattern": "^((x{100}){100}){100}$"}},
    "a malformed schema": {"json_schema": {"type": "objekt"}},
    "a schema that is not JSON": {"json_schema": '{"type": '},
    "a malformed regex": {"regex": "(a"},
    "a grammar that accepts nothing": {"grammar": 'start: foo\nfoo: foo "x"'},
    "a grammar with no rules": {"grammar": "NUMBER: /[0-9]+/"},
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_constraints_are_grammar_errors(haiku: Phi3, name: str) -> None:
    before = rss_mib()
    with pytest.raises(GrammarError) as info:
        haiku.stream(PROMPT, **HOSTILE[name])
    assert isinstance(info.value, ValueError) and isinstance(info.value, Phi3Error)
    assert rss_mib() - before < 300
    # The next call is answered as if nothing happened.
    assert haiku.generate("Write a haiku about ice hockey", temperature=0, max_tokens=20)


def test_a_lexer_that_blows_up_while_generating_ends_its_stream_only(haiku: Phi3) -> None:
    other = haiku.stream(PROMPT, seed=1, max_tokens=30)
    stream = haiku.stream(PROMPT, regex="(x+x+)+y{1000}{1000}", seed=1)
    with pytest.raises(GrammarError):
        list(stream)
    assert "".join(other) == haiku.generate(PROMPT, seed=1, max_tokens=30)


def test_bad_constraint_arguments(haiku: Phi3) -> None:
    with pytest.raises(ValueError, match="exclusive"):
        haiku.stream(PROMPT, regex="a", grammar="start: /a/")
    with pytest.raises(TypeError, match="regex must be a str"):
        haiku.stream(PROMPT, regex=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="json_schema must be"):
        haiku.stream(PROMPT, json_schema=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="json_schema=False"):
        haiku.stream(PROMPT, json_schema=False)
