"""phi3 on Ray Serve: replicas behind one OpenAI-compatible endpoint. Each replica opens its
own ``Phi3`` in its own process; replicas on one host share the weights' pages through the
file's memory map.

    from ray import serve
    from phi3.ray import build_app
    serve.run(build_app("model.gguf", num_replicas=2, threads=4))

Needs the ``ray`` extra: ``pip install "phi3[ray]"``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

try:
    from ray import serve
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('phi3.ray needs Ray: pip install "phi3[ray]"') from e

from phi3._core import Phi3
from phi3.server import create_app

# The response header that names the replica that answered.
REPLICA_HEADER = "x-phi3-replica"


def build_app(
    model: Union[str, os.PathLike[str]],
    *,
    num_replicas: int = 1,
    autoscaling_config: Optional[Mapping[str, Any]] = None,
    threads: Optional[int] = None,
    ray_actor_options: Optional[Mapping[str, Any]] = None,
    api_key: Optional[str] = None,
    model_id: Optional[str] = None,
    defaults: Optional[Mapping[str, Any]] = None,
    **phi3_options: Any,
) -> Any:
    """A Ray Serve application of ``num_replicas`` replicas (or ``autoscaling_config``'s), each
    serving phi3's OpenAI API (``phi3.server.create_app``) over its own ``Phi3(model, ...)``.

    Each replica reserves ``num_cpus`` equal to its ``threads`` (default: the ``num_cpus`` of
    ``ray_actor_options``, else 1), so that replicas on one node do not fight over cores.
    ``api_key``, ``model_id`` and ``defaults`` are ``create_app``'s; ``phi3_options`` go to
    ``Phi3()``. Run it with ``serve.run(app)``.
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    actor_options = dict(ray_actor_options or {})
    if threads is None:
        threads = max(1, int(actor_options.get("num_cpus", 1)))
    elif threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    actor_options.setdefault("num_cpus", threads)
    options: dict[str, Any] = {"name": "phi3", "ray_actor_options": actor_options}
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    replica = serve.deployment(**options)(_Replica)
    return replica.bind(
        os.fspath(model),
        {"threads": threads, **phi3_options},
        {"api_key": api_key, "model_id": model_id, "defaults": dict(defaults or {})},
    )


@serve.ingress()
class _Replica:
    """One Serve replica: a ``Phi3`` and phi3's ASGI app over it."""

    def __init__(self, model: str, phi3_options: dict[str, Any], app_options: dict[str, Any]) -> None:
        self.model = Phi3(model, **phi3_options)
        self.app_options = app_options
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> Any:
        return _NamedReplica(create_app(self.model, **self.app_options), self.replica_id)


class _NamedReplica:
    """The ASGI app, with a header naming the replica on every HTTP response."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def named(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)
