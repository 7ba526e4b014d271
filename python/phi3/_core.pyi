"""Type stubs for phi3's native module (the Rust engine)."""

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Literal, Optional, Union, final, overload

from phi3._cpu import CpuInfo

__version__: str

def cpu_info() -> CpuInfo:
    """Which kernels phi3 uses on this CPU and why: the level in use and the reason, the CPU's
    own level, the ``PHI3_CPU`` override and how it was taken, the build's baseline and the CPU
    features seen. Gathered once per process, together with the choice of kernels."""

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int]]

class Phi3Error(RuntimeError):
    """Base class of phi3's errors: model and runtime failures."""

class ModelFileError(Phi3Error):
    """The model file is not valid GGUF, or not a model phi3 can run."""

class TokenizerError(Phi3Error):
    """The vocabulary could not be built or used."""

class ChatTemplateError(Phi3Error):
    """The chat template failed to compile or render, or went over a sandbox limit."""

class DownloadError(Phi3Error):
    """A model file could not be fetched from the hub or found in its cache."""

class ContextLengthError(Phi3Error, ValueError):
    """The prompt does not fit in the context; the message gives both lengths."""

@final
class Token:
    """One generated token (what ``stream(..., details=True)`` yields)."""

    @property
    def id(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def logprob(self) -> float: ...

@final
class Stats:
    """Counts and speeds of one generation."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix pool or the chat's own cache."""
    @property
    def generated_tokens(self) -> int: ...
    @property
    def finish_reason(self) -> Optional[Literal["stop", "length"]]: ...
    @property
    def time_to_first_token_s(self) -> float: ...
    @property
    def prefill_tokens_per_s(self) -> float: ...
    @property
    def decode_tokens_per_s(self) -> float: ...

@final
class Stream:
    """An answer being generated: iterate it for ``str`` pieces (``Token`` with ``details=True``)."""

    def __iter__(self) -> Stream: ...
    def __next__(self) -> Union[str, Token]: ...
    @property
    def stats(self) -> Stats: ...
    def close(self) -> None: ...
    def __enter__(self) -> Stream: ...
    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...

@final
class Chat:
    """A conversation with a model (``Phi3.chat()``): each turn appends the user's message and
    the answer, and evaluates only the tokens that are new since the last turn."""

    def stream(
        self,
        text: str,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: Optional[float] = ...,
        top_k: Optional[int] = ...,
        seed: Optional[int] = ...,
        repeat_penalty: float = ...,
        repeat_last_n: int = ...,
        stop: Union[str, Sequence[str], None] = ...,
        ignore_eos: bool = ...,
        details: bool = ...,
    ) -> Stream:
        """Appends the user message ``text`` and streams the answer; options override the chat's."""
    def generate(
        self,
        text: str,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: Optional[float] = ...,
        top_k: Optional[int] = ...,
        seed: Optional[int] = ...,
        repeat_penalty: float = ...,
        repeat_last_n: int = ...,
        stop: Union[str, Sequence[str], None] = ...,
        ignore_eos: bool = ...,
    ) -> str: ...
    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation so far (a fresh list on each access)."""
    def reset(self) -> None:
        """Forgets the turns (the system message stays) and their cache."""

@final
class Phi3:
    """A Phi-family model loaded from a GGUF file.

    ``model`` is a local ``.gguf`` path or a hub repository id (``"owner/name"``, then
    ``filename`` names the file); the default is Microsoft's Phi-3-mini-4k-instruct q4 file.
    ``cache_bytes`` bounds the pool of finished generations' KV caches that later prompts
    starting the same way reuse (default 1 GiB, 0 turns it off); ``max_batch`` is how many
    streams share one pass over the weights (default 8; more wait for a place).
    """

    def __new__(
        cls,
        model: Union[str, os.PathLike[str], None] = None,
        *,
        filename: Optional[str] = None,
        revision: Optional[str] = None,
        tokenizer: Union[str, os.PathLike[str], None] = None,
        threads: Optional[int] = None,
        context_length: Optional[int] = None,
        cache_bytes: Optional[int] = None,
        max_batch: Optional[int] = None,
    ) -> Phi3: ...
    @overload
    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        raw: bool = False,
        details: Literal[False] = False,
    ) -> Stream: ...
    @overload
    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        raw: bool = False,
        *,
        details: Literal[True],
    ) -> Stream: ...
    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 512,
        temperature: float = 0.8,
        top_p: Optional[float] = None,
        top_k: Optional[int] = None,
        seed: Optional[int] = None,
        repeat_penalty: float = 1.0,
        repeat_last_n: int = 64,
        stop: Union[str, Sequence[str], None] = None,
        ignore_eos: bool = False,
        raw: bool = False,
    ) -> str: ...
    def chat(
        self,
        system: Optional[str] = None,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        top_p: Optional[float] = ...,
        top_k: Optional[int] = ...,
        seed: Optional[int] = ...,
        repeat_penalty: float = ...,
        repeat_last_n: int = ...,
        stop: Union[str, Sequence[str], None] = ...,
        ignore_eos: bool = ...,
        details: bool = ...,
    ) -> Chat:
        """A conversation; the options are the defaults of its turns (those of ``stream``)."""
    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...
    @property
    def context_length(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def threads(self) -> int: ...
    @property
    def metadata(self) -> dict[str, Union[int, float, bool, str]]: ...
    @property
    def path(self) -> str: ...
