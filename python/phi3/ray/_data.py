"""Batch inference on Ray Data: ``Predictor`` answers a batch's prompts together, through the
model's batching scheduler."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Union

from phi3._core import Phi3

if TYPE_CHECKING:
    from phi3._core import Prompt

#: The keyword options that go to ``Phi3()``; a Predictor passes the others to ``generate()``.
MODEL_OPTIONS = frozenset(
    {
        "filename",
        "revision",
        "tokenizer",
        "threads",
        "context_length",
        "cache_bytes",
        "max_batch",
        "kv_cache",
        "mapped_weights",
    }
)
#: The columns a Predictor adds to each batch.
OUTPUT_COLUMNS = ("answer", "prompt_tokens", "completion_tokens")


class Predictor:
    """A callable class for ``ray.data.Dataset.map_batches``::

        ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"model": "model.gguf", "threads": 2, "temperature": 0},
            concurrency=4,  # actors, each with its own Phi3
            num_cpus=2,  # = threads
        )

    ``model`` and the ``Phi3()`` options (``threads``, ``max_batch``, ...) open the model once per
    actor; the other keyword options (``temperature``, ``max_tokens``, ``json_schema``, ...) apply
    to every prompt. Each row's ``prompt`` is a string or a list of chat messages; the batch
    comes back with its columns and ``answer``, ``prompt_tokens`` and ``completion_tokens``. The
    batch's prompts run together, ``max_batch`` at a time, sharing each pass over the weights.
    """

    def __init__(self, model: Union[str, os.PathLike[str]], **options: Any) -> None:
        self.model = Phi3(model, **{k: v for k, v in options.items() if k in MODEL_OPTIONS})
        self.options = {k: v for k, v in options.items() if k not in MODEL_OPTIONS}
        for column in OUTPUT_COLUMNS:
            if column in self.options:
                raise TypeError(f"Predictor: '{column}' is an output column, not an option")

    def __call__(self, batch: Any) -> Any:
        if "prompt" not in batch:
            raise KeyError(f"Predictor: the batch has no 'prompt' column (it has {', '.join(map(str, batch))})")
        prompts = [_prompt(value) for value in batch["prompt"]]
        # One thread per stream in flight: the scheduler steps them together.
        with ThreadPoolExecutor(max(1, min(self.model.max_batch, len(prompts)))) as pool:
            answers = list(pool.map(self._answer, prompts))
        columns = {
            "answer": [a[0] for a in answers],
            "prompt_tokens": [a[1] for a in answers],
            "completion_tokens": [a[2] for a in answers],
        }
        if isinstance(batch, Mapping):
            return {**batch, **columns}
        return batch.assign(**columns)  # a pandas DataFrame (batch_format="pandas")

    def _answer(self, prompt: Prompt) -> tuple[str, int, int]:
        with self.model.stream(prompt, **self.options) as stream:
            for _ in stream:
                pass
            stats = stream.stats
            return stream.text, stats.prompt_tokens, stats.generated_tokens


def _prompt(value: Any) -> Prompt:
    """A prompt from a column's cell: Ray Data hands list cells over as numpy arrays."""
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [dict(message) for message in value]
    raise TypeError(f"Predictor: a prompt must be a string or a list of messages, got {type(value).__name__}")
