"""An OpenAI-compatible HTTP server over one ``Phi3``: ``create_app`` returns an ASGI app
(Starlette), which ``phi3 serve`` runs with uvicorn. Requests are served at the same time,
their streams batched by the model's scheduler; the protocol itself is ``phi3._openai``.

Needs the ``server`` extra: ``pip install "phi3[server]"``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Optional, Union

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('phi3.server needs Starlette and uvicorn: pip install "phi3[server]"') from e

from phi3 import _openai
from phi3._core import GrammarError, Phi3

#: Request bodies above this many bytes get a 413 (a long chat fits in far less).
DEFAULT_MAX_BODY_BYTES = 4 << 20
#: Requests waiting beyond the model's batch before new ones get a 503.
DEFAULT_MAX_QUEUED = 64
#: What a 503 asks the client to wait, in seconds.
RETRY_AFTER_S = 1
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def error_response(
    status: int, message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None
) -> JSONResponse:
    """An error in OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``)."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _unauthorized() -> JSONResponse:
    return error_response(
        401, "a valid API key is required (Authorization: Bearer ...)", "invalid_request_error", None, "invalid_api_key"
    )


def _bad_request(e: _openai.InvalidRequestError) -> JSONResponse:
    return error_response(400, e.message, "invalid_request_error", e.param, e.code)


class _Metrics:
    """Counters for ``/metrics``, in Prometheus' text format."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.ttft_buckets = [0] * len(_TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0

    def request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def answered(self, answer: _openai.Answer) -> None:
        usage = answer.usage()
        self.prompt_tokens += usage["prompt_tokens"]
        self.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        ttft = answer.time_to_first_token_s()
        if ttft is not None:
            self.ttft_sum += ttft
            self.ttft_count += 1
            for i, bound in enumerate(_TTFT_BUCKETS):
                if ttft <= bound:
                    self.ttft_buckets[i] += 1

    def render(self, model: Phi3) -> str:
        lines = [
            "# HELP phi3_requests_total HTTP requests by endpoint and status.",
            "# TYPE phi3_requests_total counter",
        ]
        for (endpoint, status), count in sorted(self.requests.items()):
            lines.append(f'phi3_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
        for name, value, help_text in (
            ("phi3_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of answered requests."),
            ("phi3_cached_prompt_tokens_total", self.cached_tokens, "Prompt tokens that came from the prefix pool."),
            ("phi3_completion_tokens_total", self.completion_tokens, "Generated tokens."),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += [
            "# HELP phi3_time_to_first_token_seconds Time from a request's start to its first token.",
            "# TYPE phi3_time_to_first_token_seconds histogram",
        ]
        for bound, count in zip(_TTFT_BUCKETS, self.ttft_buckets):
            lines.append(f'phi3_time_to_first_token_seconds_bucket{{le="{bound}"}} {count}')
        lines += [
            f'phi3_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
            f"phi3_time_to_first_token_seconds_sum {self.ttft_sum}",
            f"phi3_time_to_first_token_seconds_count {self.ttft_count}",
        ]
        for name, value, help_text in (
            ("phi3_active_streams", model.active_streams, "Streams in the running batch."),
            ("phi3_queued_streams", model.queued_streams, "Streams waiting for a place in the batch."),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


class _Server:
    def __init__(
        self,
        model: Phi3,
        api_key: Optional[str],
        model_id: str,
        max_body_bytes: int,
        max_queued: int,
        defaults: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.api_key = api_key.encode() if api_key else None
        self.model_id = model_id
        self.max_body_bytes = max_body_bytes
        self.max_queued = max_queued
        self.defaults = dict(defaults)
        self.created = int(time.time())
        self.metrics = _Metrics()

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # Compared in constant time, so that the answer's timing tells nothing about the key.
        return hmac.compare_digest(token.strip().encode(), self.api_key) and scheme.lower() == "bearer"

    async def body(self, request: Request) -> Union[dict[str, Any], JSONResponse]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return error_response(413, f"the request body is over {self.max_body_bytes} bytes", "invalid_request_error")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > self.max_body_bytes:
                return error_response(
                    413, f"the request body is over {self.max_body_bytes} bytes", "invalid_request_error"
                )
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object", "invalid_request_error")
        return body

    def model_info(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "phi3"}

    async def completions(self, request: Request, chat: bool) -> Response:
        endpoint = "chat/completions" if chat else "completions"
        response = await self._completions(request, chat)
        self.metrics.request(endpoint, response.status_code)
        return response

    async def _completions(self, request: Request, chat: bool) -> Response:
        if not self.authorized(request):
            return _unauthorized()
        try:
            body = await self.body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        if isinstance(body, JSONResponse):
            return body
        name = body.get("model")
        if name is not None and name != self.model_id:
            return error_response(
                404,
                f"the model '{name}' does not exist (this server has '{self.model_id}')",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        model = self.model
        if model.active_streams + model.queued_streams >= model.max_batch + self.max_queued:
            return error_response(
                503, "the server is busy: too many requests are waiting", "server_error", None, "overloaded"
            )
        for key, value in self.defaults.items():
            body.setdefault(key, value)
        body["model"] = self.model_id
        try:
            answer = _openai.prepare(self.model, body, chat)
        except _openai.InvalidRequestError as e:
            return _bad_request(e)
        if answer.request.stream:
            return _EventStream(answer, self._events(answer))
        try:
            result = await _until_disconnected(request, answer.arun())
        except GrammarError as e:
            # The constraint went over a per-token budget: the request's fault, not the server's.
            return _bad_request(_openai.grammar_error(e, answer.request))
        if result is None:
            return Response(status_code=499)
        self.metrics.answered(answer)
        return JSONResponse(result)

    async def _events(self, answer: _openai.Answer) -> AsyncIterator[str]:
        try:
            async for chunk in answer.achunks():
                yield f"data: {json.dumps(chunk)}\n\n"
            self.metrics.answered(answer)
            yield "data: [DONE]\n\n"
        except (_openai.InvalidRequestError, GrammarError) as e:
            error = _openai.grammar_error(e, answer.request) if isinstance(e, GrammarError) else e
            body = _error_body(error.message, "invalid_request_error", error.param, error.code)
            yield f"data: {json.dumps(body)}\n\n"
        except Exception as e:
            # The status line is sent: the failure goes to the client as an event.
            yield f"data: {json.dumps(_error_body(str(e), 'server_error'))}\n\n"


class _EventStream(StreamingResponse):
    """Server-Sent Events that end their generations however the response ends: a client that
    goes away makes a send fail, which leaves the body's generator suspended, not closed."""

    def __init__(self, answer: _openai.Answer, events: AsyncIterator[str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.answer = answer

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.answer.close_soon()


def _error_body(message: str, kind: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


async def _until_disconnected(request: Request, work: Any) -> Optional[dict[str, Any]]:
    """Awaits ``work``, cancelling it (and so its generation) if the client goes away first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            # The client went away, or the server cancelled this request (Ray Serve does, for
            # a caller that went away): the generation ends too.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    result: dict[str, Any] = task.result()
    return result


def create_app(
    model: Union[Phi3, str, os.PathLike[str], None] = None,
    *,
    api_key: Optional[str] = None,
    model_id: Optional[str] = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queued: int = DEFAULT_MAX_QUEUED,
    defaults: Optional[Mapping[str, Any]] = None,
    **phi3_options: Any,
) -> Starlette:
    """The OpenAI-compatible ASGI app for ``model`` (a ``Phi3``, or what ``Phi3(...)`` takes,
    with ``phi3_options`` for it).

    ``api_key`` (default: ``$PHI3_API_KEY``) is required of every ``/v1`` request when set.
    ``model_id`` is the name ``/v1/models`` lists (default: the file name). ``defaults`` are
    request fields that apply when a request does not set them (``{"temperature": 0.2}``).
    """
    if not isinstance(model, Phi3):
        model = Phi3(model, **phi3_options)
    elif phi3_options:
        raise TypeError(f"options for Phi3() apply only when model is not a Phi3: {', '.join(phi3_options)}")
    if max_body_bytes < 1 or max_queued < 0:
        raise ValueError("max_body_bytes must be >= 1 and max_queued >= 0")
    server = _Server(
        model,
        api_key if api_key is not None else os.environ.get("PHI3_API_KEY") or None,
        model_id or _openai.model_id(model),
        max_body_bytes,
        max_queued,
        defaults or {},
    )

    async def chat_completions(request: Request) -> Response:
        return await server.completions(request, chat=True)

    async def completions(request: Request) -> Response:
        return await server.completions(request, chat=False)

    async def models(request: Request) -> Response:
        if not server.authorized(request):
            return _unauthorized()
        return JSONResponse({"object": "list", "data": [server.model_info()]})

    async def model_by_id(request: Request) -> Response:
        if not server.authorized(request):
            return _unauthorized()
        if request.path_params["id"] != server.model_id:
            return error_response(
                404,
                f"the model '{request.path_params['id']}' does not exist",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return JSONResponse(server.model_info())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(server.metrics.render(server.model), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(
            exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error"
        )

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{id:path}", model_by_id, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.phi3 = model
    return app
