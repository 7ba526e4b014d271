"""phi3 on Ray Data: ``phi3.ray.Predictor`` through ``map_batches`` answers each prompt as phi3
does alone. Each job runs in its own process (tests/ray_data_job.py) with its own local Ray.
Skipped when Ray Data is not installed (pip install "phi3[ray]")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from phi3 import Phi3

pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "phi3[ray]")')
phi3_ray = pytest.importorskip("phi3.ray")

TOPICS = ["rain", "snow", "the sea", "autumn", "a cat", "ice hockey", "the moon", "a river", "tea", "fog"]
JOB = Path(__file__).with_name("ray_data_job.py")


def _run_job(model: str, prompts: list[Any], batch_format: str, out: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(JOB), model, str(out), batch_format],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


@pytest.mark.parametrize("batch_format", ["numpy", "pandas"])
def test_map_batches_answers_each_prompt_as_phi3_alone(
    haiku: Phi3, haiku_path: str, batch_format: str, tmp_path: Path
) -> None:
    # 20 prompts: chats and plain strings, in batches of 5 over 2 actors.
    prompts: list[Any] = [[{"role": "user", "content": f"Write a haiku about {t}"}] for t in TOPICS]
    prompts += [f"A poem about {t}:" for t in TOPICS]
    rows = _run_job(haiku_path, prompts, batch_format, tmp_path / "rows.json")
    assert [row["id"] for row in rows] == list(range(len(prompts)))
    for prompt, row in zip(prompts, rows):
        with haiku.stream(prompt, temperature=0, max_tokens=24) as alone:
            assert row["answer"] == "".join(alone)
            stats = alone.stats
        assert (row["prompt_tokens"], row["completion_tokens"]) == (stats.prompt_tokens, stats.generated_tokens)


def test_bad_predictor_arguments(haiku_path: str) -> None:
    with pytest.raises(TypeError, match="output column"):
        phi3_ray.Predictor(haiku_path, answer="x")
    predictor = phi3_ray.Predictor(haiku_path, threads=1, max_tokens=4)
    with pytest.raises(KeyError, match="no 'prompt' column"):
        predictor({"text": ["hi"]})
    with pytest.raises(TypeError, match="a prompt must be"):
        predictor({"prompt": [42]})
    out = predictor({"prompt": ["hi"], "id": [7]})
    assert out["id"] == [7] and len(out["answer"]) == 1 and out["completion_tokens"][0] <= 4
