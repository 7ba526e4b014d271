"""A two-node Ray cluster on this machine (ray.cluster_utils.Cluster, 1 CPU per node) serving
phi3 through Serve, for tests/test_ray_cluster.py, in its own process:

    python ray_cluster_job.py MODEL ANSWERS.json < topics.json

Writes, per topic, the node and replica that answered and the answer (stdout carries Ray's logs).
"""

import json
import socket
import sys
import threading

import openai
import ray
from phi3.ray import NODE_HEADER, REPLICA_HEADER, build_app, run
from ray import serve
from ray.cluster_utils import Cluster


def main() -> None:
    model, out = sys.argv[1], sys.argv[2]
    topics = json.load(sys.stdin)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # One CPU per replica and per node: Ray can only place them one per node.
        run(build_app(model, num_replicas=2, threads=1, model_id="phi3"), host="127.0.0.1", port=port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
        answers: dict[str, dict[str, str]] = {}

        def ask(topic: str) -> None:
            messages = [{"role": "user", "content": f"Write a haiku about {topic}"}]
            raw = client.chat.completions.with_raw_response.create(model="phi3", messages=messages, temperature=0)
            answers[topic] = {
                "node": raw.headers[NODE_HEADER],
                "replica": raw.headers[REPLICA_HEADER],
                "answer": raw.parse().choices[0].message.content,
            }

        threads = [threading.Thread(target=ask, args=(topic,)) for topic in topics]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
        with open(out, "w") as f:
            json.dump({"nodes": nodes, "answers": answers}, f)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
