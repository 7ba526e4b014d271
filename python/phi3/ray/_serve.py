"""phi3's OpenAI API on Ray Serve: one ingress that reads each request and routes it, and model
replicas that answer it.

Serve's HTTP proxy picks a replica before the body is read, so a router there cannot see the
prompt. The ingress (a light relay, no CPU reserved) reads the body, derives the prompt's routing
key, and calls the model deployment through a handle; the model deployment's router sends a key
back to the replica that answered it before, whose prefix pool then holds the conversation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional, Union

import ray
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica
from starlette.applications import Starlette
from starlette.routing import Route

from phi3._core import Phi3
from phi3.server import DEFAULT_MAX_BODY_BYTES, create_app, error_response

#: The response headers that name the model replica that answered, and its Ray node.
REPLICA_HEADER = "x-phi3-replica"
NODE_HEADER = "x-phi3-node"
#: How much of a prompt's start its routing key covers, in characters (about 256 tokens).
PREFIX_BLOCK_CHARS = 1024
#: The extra requests the preferred replica may hold beyond the least loaded one before a
#: request goes to a less loaded replica instead (a shared system prompt must not pin all traffic).
#: Half the default batch: past it, on a CPU, decoding in the fuller batch costs about what
#: reading a long conversation again on an idle replica does.
DEFAULT_IMBALANCE = 4
#: Routing keys whose replica the router remembers (the least recently routed are forgotten).
DEFAULT_MAX_HOMES = 100_000
#: How long ``connect`` waits for a cluster's address to answer before it says there is none.
CONNECT_TIMEOUT_S = 5.0
#: How long a replica whose client went away may take to end its generation before it is cancelled.
_CLOSE_TIMEOUT_S = 5.0


def build_app(
    model: Union[str, os.PathLike[str], None],
    *,
    num_replicas: int = 1,
    autoscaling_config: Optional[Mapping[str, Any]] = None,
    threads: Optional[int] = None,
    ray_actor_options: Optional[Mapping[str, Any]] = None,
    prefix_affinity: bool = True,
    api_key: Optional[str] = None,
    model_id: Optional[str] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    **phi3_options: Any,
) -> Any:
    """A Ray Serve application of ``num_replicas`` model replicas (or ``autoscaling_config``'s),
    each serving phi3's OpenAI API (``phi3.server.create_app``) over its own ``Phi3(model, ...)``,
    behind one ingress.

    Each model replica reserves ``num_cpus`` equal to its ``threads`` (default: the ``num_cpus``
    of ``ray_actor_options``, else 1), so that replicas on one node do not fight over cores, and
    takes at most ``max_batch`` requests at once (the rest wait in Serve's queue, free to go to
    another replica). With ``prefix_affinity``, requests that start alike (the same system and
    first user message, or the same first 1,024 characters of a prompt) go back to the replica
    that answered the first of them while its load allows, so that its prefix pool serves the
    shared start (``PrefixAffinityRouter``); without it, Serve's
    default (the less loaded of two random replicas) routes every request.
    ``api_key``, ``model_id`` and ``defaults`` are ``create_app``'s; ``phi3_options`` go to
    ``Phi3()``. Run it with ``run(app)`` (or ``serve.run(app)``).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    actor_options = dict(ray_actor_options or {})
    if threads is None:
        threads = max(1, int(actor_options.get("num_cpus", 1)))
    elif threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    actor_options.setdefault("num_cpus", threads)
    max_batch = phi3_options.get("max_batch") or 8
    options: dict[str, Any] = {
        "name": "phi3",
        "ray_actor_options": actor_options,
        "max_ongoing_requests": max_batch,
    }
    if prefix_affinity:
        options["request_router_config"] = {"request_router_class": "phi3.ray.PrefixAffinityRouter"}
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    path = None if model is None else os.fspath(model)
    if path is not None and os.path.exists(path):
        # Replicas do not run in this process's working directory.
        path = os.path.abspath(path)
    replicas = serve.deployment(**options)(_Model).bind(
        path,
        {"threads": threads, **phi3_options},
        {"api_key": api_key, "model_id": model_id, "defaults": dict(defaults or {})},
    )
    # The relay holds no model: it needs no CPU of its own and may hold many requests.
    ingress = serve.deployment(name="phi3-ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    return ingress(_Ingress).bind(replicas)


class DeploymentError(RuntimeError):
    """The application could not start: the message is a replica's own error (the model's, for a
    file that does not load), not Serve's summary of it."""


def connect(address: Optional[str] = None, **init_options: Any) -> None:
    """``ray.init`` for serving phi3: a new local Ray instance when ``address`` is None, else the
    cluster at ``address`` (``"auto"``, ``HOST:PORT`` or ``ray://HOST:PORT``).

    Raises ``ConnectionError`` naming the address when nothing answers there within
    ``CONNECT_TIMEOUT_S`` (``ray.init`` itself retries for minutes).
    """
    if address is not None and address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Ray address is 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ConnectionError(f"no Ray cluster at {address}: {e}") from None
    ray.init(address=address or "local", **init_options)


def run(app: Any, *, host: str = "127.0.0.1", port: int = 8000, name: str = "phi3") -> Any:
    """``serve.run(app)`` behind Serve's HTTP proxy on ``host:port``, at ``/``.

    Raises ``DeploymentError`` with a replica's own error when replicas cannot start.
    """
    serve.start(http_options={"host": host, "port": port})
    try:
        return serve.run(app, name=name, route_prefix="/")
    except RuntimeError as e:
        raise DeploymentError(_replica_error(name) or str(e)) from None


def _replica_error(name: str) -> Optional[str]:
    """The last ``SomeError: message`` line of a failed deployment's message: the replica's own
    exception, at the end of Ray's tracebacks."""
    try:
        deployments = serve.status().applications[name].deployments.values()
    except (KeyError, AttributeError):
        return None
    for deployment in deployments:
        errors = re.findall(r"^([\w.]*(?:Error|Exception)): (.*)$", deployment.message or "", re.MULTILINE)
        if errors:
            kind, message = errors[-1]
            return f"{kind.rpartition('.')[2]}: {message}"
    return None


def routing_key(path: str, body: bytes) -> Optional[str]:
    """The routing key of a request to ``path``: a hash of the start its answers share with
    later turns of the same conversation, or None where there is none to share.

    A chat's key covers its messages up to the first user message (a conversation keeps them on
    every turn); a completion's, the first ``PREFIX_BLOCK_CHARS`` of its prompt, when it is that
    long (a shorter prompt is cheap to read again).
    """
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return None
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict):
        return None
    start: Optional[str] = None
    messages = request.get("messages")
    prompt = request.get("prompt")
    if isinstance(messages, list):
        head = []
        for message in messages:
            if not isinstance(message, dict):
                return None
            head.append([message.get("role"), message.get("content")])
            if message.get("role") == "user":
                break
        start = json.dumps(head, ensure_ascii=False)[:PREFIX_BLOCK_CHARS]
    elif isinstance(prompt, str) and len(prompt) >= PREFIX_BLOCK_CHARS:
        start = prompt[:PREFIX_BLOCK_CHARS]
    if start is None:
        return None
    return hashlib.blake2b(start.encode(), digest_size=16).hexdigest()


class PrefixAffinityRouter(RequestRouter):  # type: ignore[misc,unused-ignore]
    """Serve's request router for the model deployment. A request whose routing key was seen
    before goes to the replica that answered it last (its home, whose prefix pool holds the shared
    start), unless the home holds ``imbalance`` requests more than the least loaded replica. A
    new key, a key whose home is gone or overloaded, and a request without a key go to the less
    loaded of two random replicas, as Serve's default router sends them; where a keyed request
    lands becomes its key's home. The last ``max_homes`` keys are remembered."""

    def initialize_state(
        self, imbalance: int = DEFAULT_IMBALANCE, max_homes: int = DEFAULT_MAX_HOMES, **kwargs: Any
    ) -> None:
        self.imbalance = imbalance
        self.max_homes = max_homes
        self.homes: OrderedDict[str, Any] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        two = random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        home_id = self.homes.get(_key_of(pending_request) or "")
        home = next((r for r in candidate_replicas if r.replica_id == home_id), None)
        if home is None:
            return [two]
        cache = self.replica_queue_len_cache
        load = {r.replica_id: cache.get(r.replica_id) or 0 for r in candidate_replicas}
        if load[home.replica_id] - min(load.values()) >= self.imbalance:
            return [two]
        # When the home is full, Serve tries the next rank.
        return [[home], [r for r in two if r is not home]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any, result: Any) -> None:
        key = _key_of(pending_request)
        if key is None:
            return
        self.homes[key] = replica_id
        self.homes.move_to_end(key)
        while len(self.homes) > self.max_homes:
            self.homes.popitem(last=False)


def _key_of(pending_request: Optional[PendingRequest]) -> Optional[str]:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("routing_key")
    return key if isinstance(key, str) else None


@serve.ingress()
class _Ingress:
    """The HTTP ingress: reads each request's body (bounded as phi3's server bounds it), and
    relays it, with its routing key, to a model replica, and the replica's answer back."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    def __serve_build_asgi_app__(self) -> Any:
        return Starlette(routes=[Route("/{path:path}", _Relay(self.replicas))])


class _Relay:
    """The ingress's ASGI endpoint for every path."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = await _read_body(receive, DEFAULT_MAX_BODY_BYTES)
        if body is None:
            message = f"the request body is over {DEFAULT_MAX_BODY_BYTES} bytes"
            await error_response(413, message, "invalid_request_error")(scope, receive, send)
            return
        request = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope.get("query_string", b""),
            "headers": list(scope.get("headers", [])),
            "body": body,
        }
        answer = self.replicas.options(stream=True).answer.remote(request, routing_key=routing_key(scope["path"], body))
        finished = False
        try:
            async for message in answer:
                await send(message)
            finished = True
        finally:
            # A client that went away (or a failed send) ends the replica's generation too.
            if not finished:
                answer.cancel()


async def _read_body(receive: Any, limit: int) -> Optional[bytes]:
    """The request's body, or None when it is over ``limit`` bytes."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return bytes(body)
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


class _Model:
    """One model replica: a ``Phi3`` and phi3's ASGI app over it, answering relayed requests."""

    def __init__(self, model: Optional[str], phi3_options: dict[str, Any], app_options: dict[str, Any]) -> None:
        self.app = create_app(Phi3(model, **phi3_options), **app_options)
        replica_id: str = serve.get_replica_context().replica_id.unique_id
        node_id: str = ray.get_runtime_context().get_node_id()
        self.headers = [(REPLICA_HEADER.encode(), replica_id.encode()), (NODE_HEADER.encode(), node_id.encode())]

    async def answer(self, request: dict[str, Any], routing_key: Optional[str] = None) -> Any:
        """Runs ``request`` through the app, yielding its ASGI messages as the app sends them."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "scheme": "http",
            "method": request["method"],
            "path": request["path"],
            "raw_path": request["path"].encode(),
            "root_path": "",
            "query_string": request["query_string"],
            "headers": request["headers"],
            "client": None,
            "server": None,
        }
        sent: asyncio.Queue[Optional[MutableMapping[str, Any]]] = asyncio.Queue()
        gone = asyncio.Event()
        body = [{"type": "http.request", "body": request["body"], "more_body": False}]

        async def receive() -> dict[str, Any]:
            if body:
                return body.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            sent.put_nowait(message)

        app = asyncio.ensure_future(self.app(scope, receive, send))
        app.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while (message := await sent.get()) is not None:
                yield message
            app.result()
        finally:
            if not app.done():
                # The caller went away: tell the app as a server tells it, so that it ends its
                # generation itself; cancel it if it takes too long.
                gone.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(app, _CLOSE_TIMEOUT_S)
