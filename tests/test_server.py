"""phi3's OpenAI-compatible server, tested with the official ``openai`` client (sync and async)
against a real uvicorn server on an ephemeral port of 127.0.0.1 (an in-process ASGI transport
would buffer streamed bodies). Skipped when the ``server`` extra or the client is missing."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from phi3 import Phi3

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
uvicorn = pytest.importorskip("uvicorn", reason='the server extra is not installed (pip install "phi3[server]")')
server_module = pytest.importorskip(
    "phi3.server", reason='the server extra is not installed (pip install "phi3[server]")'
)

HOCKEY = [{"role": "user", "content": "Write a haiku about ice hockey"}]
TOPICS = [
    "rain",
    "snow",
    "the sea",
    "autumn",
    "a cat",
    "ice hockey",
    "the moon",
    "a river",
    "spring",
    "mountains",
    "the wind",
    "a forest",
    "summer",
    "the night",
    "a garden",
    "winter",
]
# Bounds every client call, so that a hung server fails the test instead of the session.
TIMEOUT_S = 60.0


class _Serving:
    def __init__(self, server: Any, thread: threading.Thread, port: int) -> None:
        self.server, self.thread, self.port = server, thread, port
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def client(self, **kwargs: Any) -> Any:
        kwargs.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.base_url, max_retries=0, timeout=TIMEOUT_S, **kwargs)

    def async_client(self, **kwargs: Any) -> Any:
        kwargs.setdefault("api_key", "none")
        return openai.AsyncOpenAI(base_url=self.base_url, max_retries=0, timeout=TIMEOUT_S, **kwargs)

    def raw(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT_S)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), data


@contextmanager
def serving(model: Phi3, **options: Any) -> Iterator[_Serving]:
    app = server_module.create_app(model, **options)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield _Serving(server, thread, port)
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)


@pytest.fixture(scope="module")
def served(haiku: Phi3) -> Iterator[_Serving]:
    with serving(haiku) as s:
        yield s


def _greedy(model: Phi3, messages: Any, **options: Any) -> str:
    return model.generate(messages, temperature=0, **options)


def _wait_idle(model: Phi3) -> None:
    for _ in range(400):
        if model.active_streams == 0 and model.queued_streams == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"{model.active_streams} streams still active")


def test_answers_are_phi3s_own(served: _Serving, haiku: Phi3) -> None:
    client = served.client()
    want = _greedy(haiku, HOCKEY)
    r = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    pieces = []
    for chunk in client.chat.completions.create(
        model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0, stream=True
    ):
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == want


def test_include_usage_sends_a_usage_chunk(served: _Serving) -> None:
    chunks = list(
        served.client().chat.completions.create(
            model="tiny-phi3-haiku-q4_k_m",
            messages=HOCKEY,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert last.usage.prompt_tokens_details.cached_tokens >= 0
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_same_seed_same_text(served: _Serving) -> None:
    client = served.client()

    def ask(seed: int) -> str:
        r = client.chat.completions.create(
            model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=1.5, seed=seed, max_tokens=20
        )
        return str(r.choices[0].message.content)

    assert ask(11) == ask(11)


def test_stop_and_length(served: _Serving, haiku: Phi3) -> None:
    client = served.client()
    r = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0, stop=["rink"])
    assert r.choices[0].message.content == "Puck skims the white "
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0, max_tokens=5)
    assert r.choices[0].message.content == "Puck skims the"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_response_format_through_the_openai_client(served: _Serving) -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Reading(BaseModel):
        place: Literal["rink", "field", "lake"]
        celsius: int = Field(ge=-40, le=40)

    client = served.client()
    for seed in range(4):
        completion = client.chat.completions.parse(
            model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, response_format=Reading, seed=seed, max_tokens=60
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Reading)
        assert -40 <= choice.message.parsed.celsius <= 40
    r = client.chat.completions.create(
        model="tiny-phi3-haiku-q4_k_m",
        messages=HOCKEY,
        response_format={"type": "json_schema", "json_schema": {"name": "point", "schema": POINT_SCHEMA}},
        seed=3,
    )
    point = json.loads(str(r.choices[0].message.content))
    assert set(point) == {"x", "y"} and 0 <= point["x"] <= 9
    # Cut by max_tokens: the client says so instead of parsing half an object.
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, response_format=Reading, seed=1, max_tokens=3
        )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-phi3-haiku-q4_k_m",
            messages=HOCKEY,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
        )
    assert info.value.body["param"] == "response_format"  # type: ignore[index]
    assert info.value.body["code"] == "invalid_grammar"  # type: ignore[index]


def test_a_constraint_over_its_budget_mid_stream_is_an_error_event(served: _Serving) -> None:
    stream = served.client().chat.completions.create(
        model="tiny-phi3-haiku-q4_k_m",
        messages=HOCKEY,
        stream=True,
        extra_body={"regex": "(x+x+)+y{1000}{1000}"},
    )
    with pytest.raises(openai.APIError, match="too many states"):
        for _ in stream:
            pass


POINT_SCHEMA = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0}},
    "required": ["x", "y"],
    "additionalProperties": False,
}


def test_logprobs(served: _Serving) -> None:
    r = served.client().chat.completions.create(
        model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0, logprobs=True, top_logprobs=5
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0
        top = [a.logprob for a in t.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)


def test_models(served: _Serving) -> None:
    client = served.client()
    assert [m.id for m in client.models.list()] == ["tiny-phi3-haiku-q4_k_m"]
    assert client.models.retrieve("tiny-phi3-haiku-q4_k_m").owned_by == "phi3"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_text_completion(served: _Serving, haiku: Phi3) -> None:
    r = served.client().completions.create(
        model="tiny-phi3-haiku-q4_k_m", prompt="Once upon", temperature=0, max_tokens=6
    )
    assert r.choices[0].text == haiku.generate("Once upon", raw=True, temperature=0, max_tokens=6)


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": HOCKEY, "temperature": "hot"},
        {"messages": HOCKEY, "frobnicate": True},
        {"messages": [{"role": "user", "content": "hockey " * 5000}]},
        {"messages": HOCKEY, "n": 99},
    ],
)
def test_bad_input_is_a_bad_request(served: _Serving, fields: dict[str, Any]) -> None:
    client = served.client()
    messages = fields.pop("messages")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=messages, extra_body=fields)
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    if "hockey " in str(messages):
        assert error["code"] == "context_length_exceeded"


def test_malformed_bodies(served: _Serving) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"messages": ' * 10000):
        status, _, data = served.raw("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        assert status == 400, data
        assert json.loads(data)["error"]["type"] == "invalid_request_error"
    status, _, data = served.raw("GET", "/v1/no/such/route")
    assert status == 404 and "error" in json.loads(data)
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="gpt-4", messages=HOCKEY)


def test_api_key_limits_and_overload(haiku: Phi3) -> None:
    with serving(haiku, api_key="sesame", max_body_bytes=2000) as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY)
        status, _, _ = s.raw("GET", "/v1/models")
        assert status == 401
        good = s.client(api_key="sesame")
        assert good.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, max_tokens=2).choices
        with pytest.raises(openai.APIStatusError) as info:
            good.chat.completions.create(
                model="tiny-phi3-haiku-q4_k_m", messages=[{"role": "user", "content": "x" * 3000}]
            )
        assert info.value.status_code == 413
        status, _, _ = s.raw("GET", "/health")
        assert status == 200

    one = Phi3(haiku.path, max_batch=1)
    with serving(one, max_queued=0) as s:
        client = s.client()
        stream = client.chat.completions.create(
            model="tiny-phi3-haiku-q4_k_m",
            messages=HOCKEY,
            stream=True,
            max_tokens=100_000,
        )
        # Unread, the stream stops a few tokens ahead of its reader and keeps its place.
        next(iter(stream))
        with pytest.raises(openai.InternalServerError) as busy:
            client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY)
        assert busy.value.status_code == 503
        assert busy.value.response.headers["retry-after"] == "1"
        stream.close()


def test_a_client_that_breaks_off_frees_its_slot(haiku: Phi3) -> None:
    one = Phi3(haiku.path, max_batch=1)
    with serving(one, defaults={"max_tokens": 100_000}) as s:
        client = s.client()
        for _ in range(3):
            stream = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, stream=True)
            it = iter(stream)
            next(it)
            next(it)
            stream.close()
        _wait_idle(one)
        r = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, temperature=0)
        assert r.choices[0].message.content == _greedy(haiku, HOCKEY)


def test_metrics_count_requests_and_tokens(served: _Serving) -> None:
    served.client().chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, max_tokens=3)
    status, _, data = served.raw("GET", "/metrics")
    text = data.decode()
    assert status == 200
    counts = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert int(counts['phi3_requests_total{endpoint="chat/completions",status="200"}']) >= 1
    assert int(counts["phi3_completion_tokens_total"]) >= 3
    assert int(counts["phi3_time_to_first_token_seconds_count"]) >= 1
    assert counts["phi3_active_streams"] == "0"


def test_sixteen_concurrent_streams_each_get_their_answer(served: _Serving, haiku: Phi3) -> None:
    prompts = {t: [{"role": "user", "content": f"Write a haiku about {t}"}] for t in TOPICS}
    want = {t: _greedy(haiku, m, max_tokens=24) for t, m in prompts.items()}

    async def ask(client: Any, topic: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny-phi3-haiku-q4_k_m", messages=prompts[topic], temperature=0, max_tokens=24, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> dict[str, str]:
        client = served.async_client()
        answers = await asyncio.gather(*(ask(client, t) for t in TOPICS))
        await client.close()
        return dict(zip(TOPICS, answers))

    assert asyncio.run(main()) == want


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_phi3_serve_runs_the_server(haiku_path: str) -> None:
    port = _free_port()
    env = {**os.environ, "PHI3_API_KEY": "k"}
    process = subprocess.Popen(
        [sys.executable, "-m", "phi3", "serve", "-m", haiku_path, "--port", str(port), "--temperature", "0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=5)
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                r = client.chat.completions.create(model="tiny-phi3-haiku-q4_k_m", messages=HOCKEY, max_tokens=5)
                break
            except openai.APIConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        # --temperature 0 is the server's default for requests that set none.
        assert r.choices[0].message.content == "Puck skims the"
    finally:
        process.terminate()
        process.wait(TIMEOUT_S)


def test_a_cancelled_request_cancels_its_work() -> None:
    # Ray Serve cancels the request of a caller that went away, rather than sending a disconnect.
    from phi3.server import _until_disconnected

    class Silent:
        async def receive(self) -> dict[str, Any]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    async def main() -> bool:
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def work() -> dict[str, Any]:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {}

        request = asyncio.ensure_future(_until_disconnected(Silent(), work()))  # type: ignore[arg-type]
        await started.wait()
        request.cancel()
        await asyncio.gather(request, return_exceptions=True)
        return cancelled.is_set()

    assert asyncio.run(main())
