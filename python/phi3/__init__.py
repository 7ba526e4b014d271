"""phi3: Microsoft's Phi family of language models (Phi-3, Phi-3.5, Phi-4-mini) from GGUF files,
on the CPU, streamed token by token.

    >>> from phi3 import Phi3
    >>> model = Phi3("Phi-3-mini-4k-instruct-q4.gguf")
    >>> for piece in model.stream("Write a haiku about ice hockey"):
    ...     print(piece, end="", flush=True)

The engine is written in Rust (``phi3._core``); this package re-exports it with types.
"""

from phi3._core import (
    ChatTemplateError,
    ContextLengthError,
    DownloadError,
    ModelFileError,
    Phi3,
    Phi3Error,
    Stats,
    Stream,
    Token,
    TokenizerError,
    __version__,
)

__all__ = [
    "ChatTemplateError",
    "ContextLengthError",
    "DownloadError",
    "ModelFileError",
    "Phi3",
    "Phi3Error",
    "Stats",
    "Stream",
    "Token",
    "TokenizerError",
    "__version__",
]
