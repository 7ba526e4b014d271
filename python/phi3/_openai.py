"""The OpenAI protocol over phi3's streams: requests checked field by field, answers shaped as
OpenAI's chat completions and (legacy) completions, whole or as chunks.

``Phi3.create_chat_completion`` and ``Phi3.create_completion`` call into this module, and the
server (``phi3.server``) is a thin HTTP layer over the same functions, so the protocol lives
in one place. Every bad input is an ``InvalidRequestError`` naming the field (a ``ValueError``,
which the server answers with a 400).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from phi3._aio import AsyncStream
from phi3._core import ContextLengthError, GrammarError, Phi3, Stream, Token, __version__

# OpenAI's bounds.
MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5

_ROLES = {"system", "developer", "user", "assistant"}
# Fields OpenAI documents as optional that change nothing here, so they are accepted and ignored.
_IGNORED = {
    "user",
    "store",
    "metadata",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "model",
}

# The fields each endpoint takes (besides `messages` or `prompt`, and the ignored ones).
_COMMON_FIELDS = {
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    # Extensions, as llama.cpp's server names them.
    "top_k",
    "min_p",
    "repeat_penalty",
    # Structured output, as phi3's own stream() names it.
    "json_schema",
    "regex",
    "grammar",
}
_CONSTRAINTS = ("json_schema", "regex", "grammar")
_CHAT_FIELDS = _COMMON_FIELDS | {"max_completion_tokens", "top_logprobs", "response_format"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"echo", "best_of", "suffix"}

Chunk = dict[str, Any]


class InvalidRequestError(ValueError):
    """A request field is missing, of the wrong type or out of range; ``param`` names it."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _int(fields: Mapping[str, Any], name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {_type_name(value)}", name)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(f"{name} must be {bound}, got {value}", name)
    return value


def _number(fields: Mapping[str, Any], name: str, low: float, high: float) -> Optional[float]:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {_type_name(value)}", name)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}", name)
    return float(value)


def _bool(fields: Mapping[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be a boolean, got {_type_name(value)}", name)
    return value


def _stop(fields: Mapping[str, Any]) -> Optional[list[str]]:
    value = fields.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequestError("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP:
        raise InvalidRequestError(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return stops or None


def _logit_bias(fields: Mapping[str, Any], vocab_size: int) -> Optional[dict[int, float]]:
    value = fields.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"logit_bias must be an object, got {_type_name(value)}", "logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        # JSON keys are strings of ASCII digits (a short one: int() of a long one is slow).
        is_id = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10
        token = key if isinstance(key, int) and not isinstance(key, bool) else int(key) if is_id else -1
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"logit_bias: {key!r} is not a token id (the vocabulary has {vocab_size})", "logit_bias"
            )
        checked = _number({"logit_bias": amount}, "logit_bias", -100.0, 100.0)
        assert checked is not None
        bias[token] = checked
    return bias


@dataclass
class _Request:
    """A checked request: what to generate, how many times, and how to answer."""

    prompt: Union[str, list[dict[str, str]], list[int]]
    options: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    logprobs: Optional[int]  # None: no logprobs; else how many alternatives per token
    model: str
    echo: str = ""
    # The field that holds the constraint, if any: a constraint's error names it.
    constraint: Optional[str] = None


def _sampling(model: Phi3, fields: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    """The stream options common to both endpoints."""
    unknown = sorted(set(fields) - allowed - _IGNORED)
    if unknown:
        raise InvalidRequestError(f"unsupported field: {unknown[0]}", unknown[0])
    options: dict[str, Any] = {"details": True}
    temperature = _number(fields, "temperature", 0.0, 2.0)
    options["temperature"] = 1.0 if temperature is None else temperature
    top_p = _number(fields, "top_p", 0.0, 1.0)
    if top_p == 0.0:
        options["top_k"] = 1  # only the most likely token survives
    elif top_p is not None:
        options["top_p"] = top_p
    for name, low, high in (("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0)):
        value = _number(fields, name, low, high)
        if value is not None:
            options[name] = value
    seed = fields.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {_type_name(seed)}", "seed")
        options["seed"] = seed % 2**64
    stop = _stop(fields)
    if stop:
        options["stop"] = stop
    bias = _logit_bias(fields, model.vocab_size)
    if bias:
        options["logit_bias"] = bias
    # Extensions, as llama.cpp's server names them.
    top_k = _int(fields, "top_k", 0)
    if top_k is not None:
        options["top_k"] = top_k
    min_p = _number(fields, "min_p", 0.0, 1.0)
    if min_p is not None:
        options["min_p"] = min_p
    repeat_penalty = _number(fields, "repeat_penalty", 1e-3, 100.0)
    if repeat_penalty is not None:
        options["repeat_penalty"] = repeat_penalty
    return options


def _constraint(fields: Mapping[str, Any], options: dict[str, Any]) -> Optional[str]:
    """The extensions ``json_schema``, ``regex`` and ``grammar``, as ``stream()`` takes them; the
    name of the one given."""
    given = [name for name in _CONSTRAINTS if fields.get(name) is not None]
    if len(given) > 1:
        raise InvalidRequestError(f"{' and '.join(given)} are exclusive", given[1])
    if not given:
        return None
    name = given[0]
    value = fields[name]
    valid = isinstance(value, (bool, str, dict)) if name == "json_schema" else isinstance(value, str)
    if not valid:
        raise InvalidRequestError(f"{name} has the wrong type: {_type_name(value)}", name)
    options[name] = value
    return name


def _response_format(fields: Mapping[str, Any], options: dict[str, Any]) -> bool:
    """OpenAI's ``response_format``: text, any JSON object, or JSON matching a schema. Whether it
    constrains the answer."""
    response_format = fields.get("response_format")
    if response_format is None:
        return False
    if not isinstance(response_format, dict):
        raise InvalidRequestError(
            f"response_format must be an object, got {_type_name(response_format)}", "response_format"
        )
    kind = response_format.get("type")
    if kind == "text":
        return False
    if kind == "json_object":
        # llama.cpp's server also takes a schema here.
        schema = response_format.get("schema")
        options["json_schema"] = True if schema is None else schema
        return True
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError(
                "response_format.json_schema must be an object with name and schema", "response_format.json_schema"
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(
                "response_format.json_schema.name must be a non-empty string", "response_format.json_schema.name"
            )
        schema = spec.get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise InvalidRequestError(
                f"response_format.json_schema.schema must be an object, got {_type_name(schema)}",
                "response_format.json_schema.schema",
            )
        # `strict` asks for what phi3 always does: the answer matches the schema.
        options["json_schema"] = True if schema is None else schema
        return True
    raise InvalidRequestError(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format.type"
    )


def _stream_flags(fields: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = _bool(fields, "stream")
    stream_options = fields.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise InvalidRequestError("stream_options must be an object", "stream_options")
        unknown = sorted(set(stream_options) - {"include_usage", "include_obfuscation"})
        if unknown:
            raise InvalidRequestError(f"unsupported field: stream_options.{unknown[0]}", "stream_options")
        include_usage = _bool(stream_options, "include_usage")
    return stream, include_usage


def _max_tokens(model: Phi3, fields: Mapping[str, Any], default: Optional[int], *names: str) -> int:
    for name in names:
        value = _int(fields, name, 1)
        if value is not None:
            return value
    # No bound asked for: until the context is full (a generation stops there with "length").
    return model.context_length if default is None else default


def _content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise InvalidRequestError(f"{where}[{j}]: only text parts are supported, got {kind!r}", f"{where}[{j}]")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequestError(f"{where} must be a string or a list of text parts, got {_type_name(content)}", where)


def _messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise InvalidRequestError(f"messages must be an array, got {_type_name(messages)}", "messages")
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequestError(f"{where} must be an object, got {_type_name(message)}", where)
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"{where}.role must be one of {', '.join(sorted(_ROLES))}, got {role!r}", f"{where}.role"
            )
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise InvalidRequestError(f"unsupported field: {where}.{unknown[0]}", f"{where}.{unknown[0]}")
        checked.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content(message.get("content"), f"{where}.content"),
            }
        )
    return checked


def _chat_request(model: Phi3, messages: object, fields: Mapping[str, Any]) -> _Request:
    options = _sampling(model, fields, _CHAT_FIELDS)
    options["max_tokens"] = _max_tokens(model, fields, None, "max_completion_tokens", "max_tokens")
    constraint = _constraint(fields, options)
    if _response_format(fields, options):
        if constraint is not None:
            raise InvalidRequestError(f"response_format and {constraint} are exclusive", constraint)
        constraint = "response_format"
    logprobs = _bool(fields, "logprobs")
    top_logprobs = _int(fields, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    if logprobs and top_logprobs:
        options["top_logprobs"] = top_logprobs
    stream, include_usage = _stream_flags(fields)
    return _Request(
        prompt=_messages(messages),
        options=options,
        n=_int(fields, "n", 1, MAX_N) or 1,
        stream=stream,
        include_usage=include_usage,
        logprobs=(top_logprobs or 0) if logprobs else None,
        model=_model_name(model, fields),
        constraint=constraint,
    )


def _completion_request(model: Phi3, prompt: object, fields: Mapping[str, Any]) -> _Request:
    options = _sampling(model, fields, _COMPLETION_FIELDS)
    options["max_tokens"] = _max_tokens(model, fields, 16, "max_tokens")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    is_ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or is_ids) or not prompt:
        raise InvalidRequestError(
            "prompt must be a non-empty string, a list of one string, or a list of token ids", "prompt"
        )
    if fields.get("suffix") is not None:
        raise InvalidRequestError("suffix is not supported", "suffix")
    if _int(fields, "best_of", 1, 1) not in (None, 1):
        raise InvalidRequestError("best_of must be 1", "best_of")
    logprobs = _int(fields, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    if logprobs:
        options["top_logprobs"] = logprobs
    echo = ""
    if _bool(fields, "echo"):
        if logprobs is not None:
            raise InvalidRequestError("echo with logprobs is not supported", "echo")
        echo = prompt if isinstance(prompt, str) else model.detokenize(prompt)  # type: ignore[arg-type]
    options["raw"] = True
    constraint = _constraint(fields, options)
    stream, include_usage = _stream_flags(fields)
    assert isinstance(prompt, (str, list))
    return _Request(
        prompt=prompt,
        options=options,
        n=_int(fields, "n", 1, MAX_N) or 1,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        model=_model_name(model, fields),
        echo=echo,
        constraint=constraint,
    )


def model_id(model: Phi3) -> str:
    """The name phi3's answers give a model by default: its file name, less ``.gguf``."""
    name = Path(model.path).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def _model_name(model: Phi3, fields: Mapping[str, Any]) -> str:
    name = fields.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidRequestError(f"model must be a string, got {_type_name(name)}", "model")
    return name or model_id(model)


def _start(model: Phi3, request: _Request) -> list[Stream]:
    """One stream per choice, all submitted before any is read, so that they share passes."""
    streams: list[Stream] = []
    try:
        for i in range(request.n):
            options = dict(request.options)
            if "seed" in options and i:
                options["seed"] = (options["seed"] + i) % 2**64  # n choices, n different answers
            streams.append(model.stream(request.prompt, **options))
    except ContextLengthError as e:
        _close(streams)
        param = (
            "messages"
            if isinstance(request.prompt, list) and request.prompt and isinstance(request.prompt[0], dict)
            else "prompt"
        )
        raise InvalidRequestError(str(e), param, "context_length_exceeded") from e
    except GrammarError as e:
        _close(streams)
        raise grammar_error(e, request) from e
    except (TypeError, ValueError) as e:
        _close(streams)
        raise InvalidRequestError(str(e)) from e
    return streams


def grammar_error(error: GrammarError, request: _Request) -> InvalidRequestError:
    """A constraint's error as a request error naming the field that held the constraint."""
    message = str(error)
    if request.constraint == "response_format":
        message = f"response_format: {message}"
    return InvalidRequestError(message, request.constraint, "invalid_grammar")


def _close(streams: Sequence[Stream]) -> None:
    for s in streams:
        s.close()


def _token_logprob(token: Token, first: bool) -> dict[str, Any]:
    raw = token.bytes
    alternatives = [(text, logprob, text.encode()) for text, logprob in token.top_logprobs]
    # The decoder drops the leading space of the answer's first token (SentencePiece's dummy
    # prefix); its bytes and alternatives are shown the same way.
    if first and raw.startswith(b" ") and not token.text.startswith(" "):
        raw = raw[1:]
        alternatives = [(t.removeprefix(" "), lp, b.removeprefix(b" ")) for t, lp, b in alternatives]
    return {
        "token": token.text,
        "logprob": token.logprob,
        "bytes": list(raw),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, lp, b in alternatives],
    }


@dataclass
class _Choice:
    """One answer in progress: what has been sent of it so far."""

    index: int
    stream: Stream
    sent: int = 0  # characters of the answer already in a delta
    tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def take(self, token: Optional[Token]) -> tuple[str, list[dict[str, Any]]]:
        """After ``token`` (``None``: the end), the new answer text and the token's logprobs."""
        delta = self.stream.text_since(self.sent)
        self.sent += len(delta)
        entries = []
        if token is not None:
            entries = [_token_logprob(token, self.tokens == 0)]
            self.tokens += 1
        self.done = token is None
        return delta, entries


def _events(choices: list[_Choice]) -> Iterator[tuple[_Choice, Optional[Token]]]:
    """Each choice's tokens, one choice after the other in turn; ``None`` ends a choice."""
    while any(not c.done for c in choices):
        for c in choices:
            if not c.done:
                token = next(c.stream, None)
                assert token is None or isinstance(token, Token)
                yield c, token


async def _aevents(
    choices: list[_Choice], readers: list[AsyncStream]
) -> AsyncIterator[tuple[_Choice, Optional[Token]]]:
    try:
        while any(not c.done for c in choices):
            for c, reader in zip(choices, readers):
                if not c.done:
                    try:
                        token: Optional[Token] = await reader.__anext__()  # type: ignore[assignment]
                    except StopAsyncIteration:
                        token = None
                    assert token is None or isinstance(token, Token)
                    yield c, token
    finally:
        # Not awaited: in a cancelled task every await raises again; the closes run in workers.
        for reader in readers:
            reader.close_soon()


class Answer:
    """Builds one request's response, or its chunks, from its choices' events."""

    def __init__(self, request: _Request, streams: list[Stream], chat: bool) -> None:
        self.request = request
        self.chat = chat
        self.choices = [_Choice(i, s) for i, s in enumerate(streams)]
        # For reading in worker threads (arun, achunks).
        self.readers = [AsyncStream(s) for s in streams]
        kind = "chatcmpl" if chat else "cmpl"
        self.head = {
            "id": f"{kind}-{uuid.uuid4().hex}",
            "object": ("chat.completion" if chat else "text_completion"),
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": f"phi3-{__version__}",
        }
        self.texts = [request.echo for _ in streams]

    def usage(self) -> dict[str, Any]:
        stats = [c.stream.stats for c in self.choices]
        prompt = stats[0].prompt_tokens
        completion = sum(s.generated_tokens for s in stats)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats[0].cached_tokens},
        }

    def finish_reason(self, choice: _Choice) -> str:
        return choice.stream.stats.finish_reason or "stop"

    def _logprobs(self, entries: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if self.request.logprobs is None:
            return None
        if self.chat:
            return {"content": entries, "refusal": None}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [],
        }

    # The whole response.
    def add(self, choice: _Choice, token: Optional[Token]) -> None:
        delta, entries = choice.take(token)
        self.texts[choice.index] += delta
        choice.logprobs.extend(entries)

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            entry: dict[str, Any] = {"index": c.index}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": self.texts[c.index], "refusal": None}
            else:
                entry["text"] = self.texts[c.index]
            entry["logprobs"] = self._logprobs(c.logprobs)
            if not self.chat and entry["logprobs"] is not None:
                entry["logprobs"]["text_offset"] = _offsets(entry["logprobs"]["tokens"], len(self.request.echo))
            entry["finish_reason"] = self.finish_reason(c)
            choices.append(entry)
        return {**self.head, "choices": choices, "usage": self.usage()}

    # Chunks.
    def _chunk(self, choices: list[dict[str, Any]]) -> Chunk:
        chunk: Chunk = {
            **self.head,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "choices": choices,
        }
        if self.request.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunks(self) -> list[Chunk]:
        if self.chat:
            return [
                self._chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for c in self.choices
                    ]
                )
            ]
        if self.request.echo:
            return [self._chunk([self._text_choice(c.index, self.request.echo, None, None) for c in self.choices])]
        return []

    def _text_choice(
        self, index: int, text: str, logprobs: Optional[dict[str, Any]], finish: Optional[str]
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, choice: _Choice, token: Optional[Token]) -> Optional[Chunk]:
        delta, entries = choice.take(token)
        finish = self.finish_reason(choice) if token is None else None
        if not delta and not entries and finish is None:
            return None
        logprobs = self._logprobs(entries) if entries else None
        if self.chat:
            body: dict[str, Any] = {"content": delta} if delta or token is not None else {}
            return self._chunk([{"index": choice.index, "delta": body, "logprobs": logprobs, "finish_reason": finish}])
        return self._chunk([self._text_choice(choice.index, delta, logprobs, finish)])

    def last_chunks(self) -> list[Chunk]:
        if not self.request.include_usage:
            return []
        return [{**self._chunk([]), "usage": self.usage()}]

    def time_to_first_token_s(self) -> Optional[float]:
        """The first choice's (all start together); ``None`` if it produced no token."""
        stats = self.choices[0].stream.stats
        return stats.time_to_first_token_s if stats.generated_tokens else None

    def close(self) -> None:
        """Ends every choice's generation (a no-op for those that finished)."""
        _close([c.stream for c in self.choices])

    def close_soon(self) -> None:
        """``close()`` without blocking, for the event loop (after ``arun`` or ``achunks``)."""
        for reader in self.readers:
            reader.close_soon()

    # Reading the streams: blocking, or awaited in worker threads.
    def run(self) -> dict[str, Any]:
        try:
            for choice, token in _events(self.choices):
                self.add(choice, token)
        finally:
            self.close()
        return self.response()

    def chunks(self) -> Iterator[Chunk]:
        try:
            yield from self.first_chunks()
            for choice, token in _events(self.choices):
                piece = self.chunk(choice, token)
                if piece is not None:
                    yield piece
            yield from self.last_chunks()
        finally:
            self.close()

    async def arun(self) -> dict[str, Any]:
        async for choice, token in _aevents(self.choices, self.readers):
            self.add(choice, token)
        return self.response()

    async def achunks(self) -> AsyncIterator[Chunk]:
        for chunk in self.first_chunks():
            yield chunk
        async for choice, token in _aevents(self.choices, self.readers):
            piece = self.chunk(choice, token)
            if piece is not None:
                yield piece
        for chunk in self.last_chunks():
            yield chunk


def _offsets(tokens: list[str], start: int) -> list[int]:
    offsets = []
    for t in tokens:
        offsets.append(start)
        start += len(t)
    return offsets


def _begin(model: Phi3, request: _Request, chat: bool) -> Answer:
    return Answer(request, _start(model, request), chat)


def prepare(model: Phi3, body: Mapping[str, Any], chat: bool) -> Answer:
    """For the server: a request body checked and its streams started (``Answer.arun`` or
    ``Answer.achunks`` then reads them without blocking the event loop)."""
    if chat:
        fields = {k: v for k, v in body.items() if k != "messages"}
        return _begin(model, _chat_request(model, body.get("messages"), fields), chat)
    fields = {k: v for k, v in body.items() if k != "prompt"}
    return _begin(model, _completion_request(model, body.get("prompt"), fields), chat)


def create_chat_completion(model: Phi3, messages: object, **fields: Any) -> Union[dict[str, Any], Iterator[Chunk]]:
    """An OpenAI chat completion of ``messages``: a dict, or with ``stream=True`` an iterator of
    ``chat.completion.chunk`` dicts."""
    answer = _begin(model, _chat_request(model, messages, fields), chat=True)
    return answer.chunks() if answer.request.stream else answer.run()


def create_completion(model: Phi3, prompt: object, **fields: Any) -> Union[dict[str, Any], Iterator[Chunk]]:
    """An OpenAI text completion of ``prompt`` (no chat template)."""
    answer = _begin(model, _completion_request(model, prompt, fields), chat=False)
    return answer.chunks() if answer.request.stream else answer.run()
