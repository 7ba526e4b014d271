"""Repacked weights (the default) against weights left in the file's memory map."""

import pickle

from phi3 import Phi3


def test_mapped_weights_answer_as_repacked_ones(haiku_path: str) -> None:
    repacked, mapped = Phi3(haiku_path, cache_bytes=0), Phi3(haiku_path, cache_bytes=0, mapped_weights=True)
    assert (repacked.mapped_weights, mapped.mapped_weights) == (False, True)
    for topic in ("snow", "the sea"):
        prompt = f"Write a haiku about {topic}"
        assert repacked.generate(prompt, max_tokens=24, temperature=0) == mapped.generate(
            prompt, max_tokens=24, temperature=0
        )


def test_mapped_weights_survive_pickling(haiku_path: str) -> None:
    model = Phi3(haiku_path, mapped_weights=True)
    assert pickle.loads(pickle.dumps(model)).mapped_weights
