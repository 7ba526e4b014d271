"""Type stubs for phi3's native module (the Rust engine)."""

import os
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Optional, TypedDict, Union, final, overload

from typing_extensions import Unpack

from phi3._aio import AsyncStream
from phi3._cpu import CpuInfo

__version__: str

def cpu_info() -> CpuInfo:
    """Which kernels phi3 uses on this CPU and why: the level in use and the reason, the CPU's
    own level, the ``PHI3_CPU`` override and how it was taken, the build's baseline and the CPU
    features seen. Gathered once per process, together with the choice of kernels."""

Message = Mapping[str, str]
Prompt = Union[str, Sequence[Message], Sequence[int]]

JsonSchema = Union[bool, str, Mapping[str, Any], type, None]

class GenerateOptions(TypedDict, total=False):
    """The keyword options of ``generate()`` (and of ``stream()``, with ``details``); the
    defaults are in brackets."""

    max_tokens: int  # [512] tokens at most in the answer
    temperature: float  # [0.8] 0 is greedy
    top_p: Optional[float]  # [None] keep the smallest set of tokens whose probability reaches it
    top_k: Optional[int]  # [None] keep the k most likely tokens
    min_p: Optional[float]  # [None] drop tokens less likely than min_p times the most likely
    seed: Optional[int]  # [None] same seed, same answer
    repeat_penalty: float  # [1.0] divides the logits of the last repeat_last_n tokens
    repeat_last_n: int  # [64]
    presence_penalty: float  # [0.0] in [-2, 2], OpenAI's: once per token already generated
    frequency_penalty: float  # [0.0] in [-2, 2], OpenAI's: per time a token was generated
    logit_bias: Optional[Mapping[int, float]]  # [None] added to these tokens' logits, in [-100, 100]
    stop: Union[str, Sequence[str], None]  # [None] the answer ends before any of these
    ignore_eos: bool  # [False] go on past end-of-text tokens
    top_logprobs: int  # [0] alternatives each Token reports (0 to 20)
    # At most one constraint; the answer matches it, and ends when nothing more can follow.
    json_schema: JsonSchema  # [None] True (any JSON object), a schema, or a pydantic model class
    regex: Optional[str]  # [None] the whole answer matches it (Rust regex syntax)
    grammar: Optional[str]  # [None] llguidance's Lark syntax

class StreamOptions(GenerateOptions, total=False):
    details: bool  # [False] yield Token objects instead of str pieces

class Phi3Error(RuntimeError):
    """Base class of phi3's errors: model and runtime failures."""

class ModelFileError(Phi3Error):
    """The model file is not valid GGUF, or not a model phi3 can run."""

    key: Optional[str]
    """The metadata key at fault, where one is."""
    tensor: Optional[str]
    """The tensor at fault, where one is."""

class TokenizerError(Phi3Error):
    """The vocabulary could not be built or used."""

class ChatTemplateError(Phi3Error):
    """The chat template failed to compile or render, or went over a sandbox limit."""

class DownloadError(Phi3Error):
    """A model file could not be fetched from the hub or found in its cache."""

class ContextLengthError(Phi3Error, ValueError):
    """The prompt does not fit in the context."""

    prompt_tokens: int
    context_length: int

class GrammarError(Phi3Error, ValueError):
    """A JSON schema, regular expression or grammar is invalid, unsupported or over a limit,
    or went over its budget while generating; the message says which."""

@final
class Token:
    """One generated token (what ``stream(..., details=True)`` yields)."""

    @property
    def id(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def logprob(self) -> float: ...
    @property
    def top_logprobs(self) -> list[tuple[str, float]]:
        """The most likely tokens at this step and their log-probabilities, most likely first
        (as many as ``top_logprobs`` asked for)."""
    @property
    def bytes(self) -> bytes:
        """The token's own bytes (part of a character for a byte-fallback token)."""

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
    @property
    def text(self) -> str:
        """The answer so far, stop strings left out (also with ``details=True``)."""
    def text_since(self, start: int) -> str:
        """``text[start:]``: what was released since a reader that has ``start`` characters of
        it; costs what it returns when ``start`` only grows."""
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

    def stream(self, text: str, **overrides: Unpack[StreamOptions]) -> Stream:
        """Appends the user message ``text`` and streams the answer; options override the chat's."""
    def generate(self, text: str, **overrides: Unpack[GenerateOptions]) -> str: ...
    def astream(self, text: str, **overrides: Unpack[StreamOptions]) -> AsyncStream:
        """``stream()`` as an async iterator that never blocks the event loop."""
    def agenerate(self, text: str, **overrides: Unpack[GenerateOptions]) -> Coroutine[Any, Any, str]: ...
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
    streams share one pass over the weights (default 8; more wait for a place); ``kv_cache`` is
    how the KV caches store keys and values: ``"f16"`` (the default) or ``"q8_0"`` (8-bit blocks,
    53 % of the memory: longer contexts and more cached prefixes in the same RAM).
    ``mapped_weights=True`` leaves every matrix in the file's memory map: the model loads in
    milliseconds and shares its pages with other processes reading the same file, but on CPUs
    with AVX-512 VNNI its Q4_K matrices run slower than in the interleaved copy made by default
    (about 0.5 s of load for Phi-3-mini).

    A ``Phi3`` pickles as its file and options: unpickling re-opens the model (for Ray tasks and
    multiprocessing).
    """

    def __reduce__(self) -> tuple[Any, tuple[str]]: ...
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
        kv_cache: Optional[Literal["f16", "q8_0"]] = None,
        mapped_weights: bool = False,
    ) -> Phi3: ...
    def stream(self, prompt: Prompt, *, raw: bool = False, **options: Unpack[StreamOptions]) -> Stream:
        """Starts generating an answer to ``prompt`` (a string, messages, or token ids); ``raw``
        sends a string as it is, without the chat template."""
    def generate(self, prompt: Prompt, *, raw: bool = False, **options: Unpack[GenerateOptions]) -> str:
        """The whole answer to ``prompt`` as one string."""
    def astream(self, prompt: Prompt, *, raw: bool = False, **options: Unpack[StreamOptions]) -> AsyncStream:
        """``stream()`` as an async iterator: each piece is awaited in a worker thread, so the
        event loop never blocks; cancelling the task ends the generation."""
    def agenerate(
        self, prompt: Prompt, *, raw: bool = False, **options: Unpack[GenerateOptions]
    ) -> Coroutine[Any, Any, str]: ...
    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **fields: Any
    ) -> Iterator[dict[str, Any]]: ...
    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **fields: Any
    ) -> dict[str, Any]:
        """An OpenAI chat completion, shaped as OpenAI's (and phi3's server's); with
        ``stream=True`` an iterator of ``chat.completion.chunk`` dicts."""
    @overload
    def create_completion(
        self, prompt: Union[str, Sequence[int]], *, stream: Literal[True], **fields: Any
    ) -> Iterator[dict[str, Any]]: ...
    @overload
    def create_completion(
        self, prompt: Union[str, Sequence[int]], *, stream: Literal[False] = False, **fields: Any
    ) -> dict[str, Any]:
        """An OpenAI (legacy) text completion of ``prompt``, without the chat template."""
    def chat(self, system: Optional[str] = None, **options: Unpack[StreamOptions]) -> Chat:
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
    def max_batch(self) -> int:
        """How many streams share one pass over the weights."""
    @property
    def kv_cache(self) -> Literal["f16", "q8_0"]:
        """How the KV caches store keys and values."""
    @property
    def mapped_weights(self) -> bool:
        """Whether the weights were left in the file's memory map (not repacked)."""
    @property
    def active_streams(self) -> int:
        """Streams in the running batch now."""
    @property
    def queued_streams(self) -> int:
        """Streams waiting for a place in the batch now."""
    @property
    def metadata(self) -> dict[str, Union[int, float, bool, str]]: ...
    @property
    def path(self) -> str: ...
