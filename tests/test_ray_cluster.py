"""phi3 on a two-node Ray cluster (``ray.cluster_utils.Cluster`` on this machine, 1 CPU per
node): Serve places one replica per node, and both answer as phi3 does. The cluster runs in its
own process (tests/ray_cluster_job.py). Skipped when Ray is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from phi3 import Phi3

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "phi3[ray]")')
pytest.importorskip("openai", reason="the openai client is not installed")

JOB = Path(__file__).with_name("ray_cluster_job.py")
# 16 new conversations, each to the less loaded replica (at random between equals): all on one with odds
# of about 2**-15.
TOPICS = ["rain", "snow", "the sea", "autumn", "a cat", "ice hockey", "the moon", "a river"]
TOPICS += ["tea", "fog", "a fox", "spring", "a train", "the desert", "a bell", "a kite"]


def test_two_nodes_one_replica_each_both_answer(haiku: Phi3, haiku_path: str, tmp_path: Path) -> None:
    out = tmp_path / "answers.json"
    done = subprocess.run(
        [sys.executable, str(JOB), haiku_path, str(out)],
        input=json.dumps(TOPICS),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["nodes"]) == 2
    answers = result["answers"]
    assert sorted({a["node"] for a in answers.values()}) == result["nodes"]
    assert len({a["replica"] for a in answers.values()}) == 2
    for topic in TOPICS:
        want = haiku.generate([{"role": "user", "content": f"Write a haiku about {topic}"}], temperature=0)
        assert answers[topic]["answer"] == want, topic
