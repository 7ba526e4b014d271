"""A Ray Data job for tests/test_ray_data.py, run in its own process: a fresh local Ray instance
per job (a second instance in the test process, beside Serve's, does not start cleanly).

    python ray_data_job.py MODEL ROWS.json BATCH_FORMAT < prompts.json
"""

import json
import sys

import ray
from phi3.ray import Predictor


def main() -> None:
    model, out, batch_format = sys.argv[1], sys.argv[2], sys.argv[3]
    prompts = json.load(sys.stdin)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])
        answered = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"model": model, "threads": 1, "temperature": 0, "max_tokens": 24},
            batch_size=5,
            batch_format=batch_format,
            concurrency=2,
            num_cpus=1,
        )
        rows = sorted(answered.take_all(), key=lambda row: row["id"])
        keep = ("id", "answer", "prompt_tokens", "completion_tokens")
        with open(out, "w") as f:
            json.dump([{k: _plain(row[k]) for k in keep} for row in rows], f)
    finally:
        ray.shutdown()


def _plain(value: object) -> object:
    return value.item() if hasattr(value, "item") else value


if __name__ == "__main__":
    main()
