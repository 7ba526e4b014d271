"""phi3: Microsoft's Phi family of language models (Phi-3, Phi-3.5, Phi-4-mini) from GGUF files,
on the CPU, streamed token by token.

    >>> from phi3 import Phi3
    >>> model = Phi3("Phi-3-mini-4k-instruct-q4.gguf")
    >>> for piece in model.stream("Write a haiku about ice hockey"):
    ...     print(piece, end="", flush=True)

The engine is written in Rust (``phi3._core``); this package re-exports it with types.
``phi3.cpu_info()`` says which kernels it runs on this CPU, and why. ``Phi3.create_chat_completion``
answers as OpenAI's API does; ``phi3.server`` serves that API over HTTP (the ``server`` extra).
"""

import warnings

from phi3._cpu import CpuInfo, CpuOverride, Level, check_baseline

# Before the native module: below its baseline it would die of SIGILL instead of raising.
check_baseline()

from phi3._core import (  # noqa: E402
    Chat,
    ChatTemplateError,
    ContextLengthError,
    DownloadError,
    GrammarError,
    ModelFileError,
    Phi3,
    Phi3Error,
    Stats,
    Stream,
    Token,
    TokenizerError,
    __version__,
    cpu_info,
)
from phi3._openai import InvalidRequestError  # noqa: E402

# cpu_info() also fixes the kernel level for the process, so PHI3_CPU is read now, at import;
# a value that is not a level would otherwise go unnoticed.
_override = cpu_info()["override"]
if _override is not None and _override["status"] == "invalid":
    warnings.warn(f"phi3: {cpu_info()['reason']}", RuntimeWarning, stacklevel=2)
del _override

__all__ = [
    "Chat",
    "ChatTemplateError",
    "ContextLengthError",
    "CpuInfo",
    "CpuOverride",
    "DownloadError",
    "GrammarError",
    "InvalidRequestError",
    "Level",
    "ModelFileError",
    "Phi3",
    "Phi3Error",
    "Stats",
    "Stream",
    "Token",
    "TokenizerError",
    "__version__",
    "cpu_info",
]
