"""phi3 on a local Ray instance: two Serve replicas of the tiny model behind one OpenAI endpoint
(through Serve's own HTTP proxy, with the official client).
Skipped when Ray is not installed (pip install "phi3[ray]")."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from phi3 import Phi3

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "phi3[ray]")')
openai = pytest.importorskip("openai", reason="the openai client is not installed")
serve = pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "phi3[ray]")')
phi3_ray = pytest.importorskip("phi3.ray")

MODEL_ID = "tiny-phi3-haiku-q4_k_m"
TOPICS = ["rain", "snow", "the sea", "autumn", "a cat", "ice hockey", "the moon", "a river"]
# New conversations go to the less loaded replica (at random between equals): with 16, all land on one
# with odds of about 2**-15.
MANY_TOPICS = [*TOPICS, "tea", "fog", "a fox", "spring", "a train", "the desert", "a bell", "a kite"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    # Logical CPUs: one per replica, on whatever the host has.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def endpoint(cluster: None, haiku_path: str) -> str:
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(phi3_ray.build_app(haiku_path, num_replicas=2, threads=1), name="phi3", route_prefix="/")
    return f"http://127.0.0.1:{port}/v1"


def _client(endpoint: str) -> Any:
    return openai.OpenAI(base_url=endpoint, api_key="none", timeout=60.0, max_retries=0)


def _messages(topic: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a haiku about {topic}"}]


def test_replicas_answer_as_phi3_does(endpoint: str, haiku: Phi3) -> None:
    client = _client(endpoint)
    want = haiku.generate(_messages("ice hockey"), temperature=0)
    r = client.chat.completions.create(model=MODEL_ID, messages=_messages("ice hockey"), temperature=0)
    assert r.choices[0].message.content == want
    messages = _messages("ice hockey")
    chunks = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def _replica_of(client: Any, topic: str, answers: dict[str, tuple[str, str]]) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL_ID, messages=_messages(topic), temperature=0)
    answers[topic] = (raw.headers[phi3_ray.REPLICA_HEADER], str(raw.parse().choices[0].message.content))


def test_concurrent_conversations_spread_over_both_replicas(endpoint: str, haiku: Phi3) -> None:
    client = _client(endpoint)
    answers: dict[str, tuple[str, str]] = {}
    threads = [threading.Thread(target=_replica_of, args=(client, topic, answers)) for topic in MANY_TOPICS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {topic: answer for topic, (_, answer) in answers.items()} == {
        topic: haiku.generate(_messages(topic), temperature=0) for topic in MANY_TOPICS
    }
    assert len({replica for replica, _ in answers.values()}) == 2


def test_a_killed_replica_is_replaced_and_requests_go_on(endpoint: str) -> None:
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "#phi3#" in a["name"]
    ]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
    client = _client(endpoint)
    for topic in TOPICS[:4]:
        r = client.chat.completions.create(model=MODEL_ID, messages=_messages(topic), temperature=0, max_tokens=8)
        assert r.choices[0].message.content
    # Serve starts a replacement: two replicas again, within a bound.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = serve.status().applications["phi3"]
        if status.status == "RUNNING" and status.deployments["phi3"].replica_states.get("RUNNING", 0) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no replacement replica: {serve.status()}")


def test_a_conversation_returns_to_the_replica_that_holds_it(endpoint: str) -> None:
    client = _client(endpoint)
    for topic in TOPICS[:4]:
        messages = _messages(topic)
        replicas = set()
        for turn in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL_ID, messages=messages, temperature=0, max_tokens=8
            )
            r = raw.parse()
            replicas.add(raw.headers[phi3_ray.REPLICA_HEADER])
            if turn > 0:
                # The replica's prefix pool held the earlier turns.
                assert r.usage.prompt_tokens_details.cached_tokens > 0
            messages = [*messages, {"role": "assistant", "content": r.choices[0].message.content}]
            messages.append({"role": "user", "content": f"And once more, turn {turn + 2}"})
        assert len(replicas) == 1, (topic, replicas)


def test_the_routing_key_covers_what_turns_share() -> None:
    chat = "/v1/chat/completions"

    def key(path: str, body: Any) -> Any:
        return phi3_ray.routing_key(path, json.dumps(body).encode())

    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    later = [*first, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert key(chat, {"messages": first}) == key(chat, {"messages": later}) is not None
    assert key(chat, {"messages": first}) != key(chat, {"messages": [first[1]]})
    long = "x" * phi3_ray.PREFIX_BLOCK_CHARS
    assert key("/v1/completions", {"prompt": long + "a"}) == key("/v1/completions", {"prompt": long + "b"}) is not None
    # Nothing worth routing by: a short prompt, another endpoint, a body that is not a request.
    assert key("/v1/completions", {"prompt": "short"}) is None
    assert key("/v1/models", {"messages": first}) is None
    assert phi3_ray.routing_key(chat, b"{not json") is None
    assert key(chat, {"messages": ["not a message"]}) is None
    assert key(chat, [1, 2]) is None


def test_bad_arguments(haiku_path: str) -> None:
    with pytest.raises(ValueError, match="num_replicas"):
        phi3_ray.build_app(haiku_path, num_replicas=0)
    with pytest.raises(ValueError, match="a Ray address is"):
        phi3_ray.connect("no-port-here")
