"""phi3 on Ray: Serve replicas behind one OpenAI-compatible endpoint (``build_app``), and batch
inference on Ray Data (``Predictor``). Each replica or actor opens its own ``Phi3`` in its own
process; those on one host share the weights' pages through the file's memory map.

    from ray import serve
    from phi3.ray import build_app
    serve.run(build_app("model.gguf", num_replicas=2, threads=4))

Needs the ``ray`` extra: ``pip install "phi3[ray]"``.
"""

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('phi3.ray needs Ray: pip install "phi3[ray]"') from e

from phi3.ray._data import Predictor
from phi3.ray._serve import (
    NODE_HEADER,
    PREFIX_BLOCK_CHARS,
    REPLICA_HEADER,
    DeploymentError,
    PrefixAffinityRouter,
    build_app,
    connect,
    routing_key,
    run,
)

__all__ = [
    "NODE_HEADER",
    "PREFIX_BLOCK_CHARS",
    "REPLICA_HEADER",
    "DeploymentError",
    "Predictor",
    "PrefixAffinityRouter",
    "build_app",
    "connect",
    "routing_key",
    "run",
]
