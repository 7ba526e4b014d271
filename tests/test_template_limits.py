"""A model file's chat template is untrusted: hostile ones fail with ChatTemplateError within
seconds, without a large peak of memory, and the process goes on. Each runs in its own process,
whose peak resident memory (ru_maxrss) is measured before and after the template runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import fixture_path
from gguf_edit import with_string

HAIKU = "tiny-phi3-haiku-q4_k_m.gguf"

HOSTILE = [
    # Allocations of gigabytes in one step, or in a few.
    "{{ [0] * 10**8 }}",
    "{% set n = 10**8 %}{{ [0] * n }}",
    "{% set n = 10**8 %}{% set a, b = [0] * n %}",
    "{% set n = 10**8 %}{{ ([0] * n)|string|length }}",
    "{{ 'a' * 10**8 }}",
    "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
    "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x }}",
    "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x }}",
    "{% set ns = namespace(x={}) %}{% for i in range(40) %}{% set ns.x = {'a': ns.x, 'b': ns.x} %}{% endfor %}"
    "{{ ns.x|tojson }}",
    "{{ [0]*10**8 + [0]*10**8 + [0]*10**8 }}",
    "{% set s = 'x' * 1000000 %}{{ ([s] * 1000)|join }}",
    "{% macro m() %}{{ varargs }}{% endmacro %}{% set s = 'x' * 1000000 %}{{ m(s, s, s, s, s, s, s, s, s, s) }}",
    "{{ [1]|tojson(indent=10**9) }}",
    "{{ '{:>1000000000}'.format('x') }}",
    # Nesting that overflows the stack when walked or dropped.
    "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
    "{% set ns = namespace(x=[1]) %}{% for i in range(100000) %}{% set ns.x = ns.x[0:] %}{% endfor %}{{ ns.x }}",
    "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
    # Work without fuel: comparing large values, while compiling or rendering.
    "{% if [0]*10**8 == [0]*10**8 %}{% endif %}",
    "{% set a = ['x' * 100000] * 40 %}{% set b = ['x' * 100000] * 40 %}"
    "{% for i in range(100000) %}{% if [a] == [b] %}{% endif %}{% endfor %}",
]

# Runs one template: loads a model carrying it (some templates are refused as they compile),
# renders a message, then shows that another model still answers.
CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from phi3 import ChatTemplateError, Phi3

    def peak_mib():
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    path, haiku = sys.argv[1], sys.argv[2]
    report = {"error": None}
    start = time.monotonic()
    try:
        model = Phi3(path)
        report["before"] = peak_mib()
        start = time.monotonic()
        report["text"] = model.apply_chat_template([{"role": "user", "content": "hi"}])
    except ChatTemplateError as e:
        report["error"] = str(e)
    report["seconds"] = time.monotonic() - start
    report.setdefault("before", peak_mib())
    report["peak"] = peak_mib()
    report["answer"] = Phi3(haiku).generate("Write a haiku about ice hockey", temperature=0, max_tokens=5)
    print(json.dumps(report))
    """
)


def run_template(tmp_path: Path, template: str) -> dict[str, Any]:
    path = tmp_path / "model.gguf"
    with_string(fixture_path(HAIKU), path, "tokenizer.chat_template", template)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(fixture_path(HAIKU))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_template(tmp_path: Path, template: str) -> None:
    report = run_template(tmp_path, template)
    assert report["error"], f"rendered: {report.get('text', '')[:200]!r}"
    assert report["seconds"] < 10, report
    # What the template itself made the process hold at its peak, beyond the loaded model.
    assert report["peak"] - report["before"] < 256, report
    assert report["answer"] == "Puck skims the"


def test_real_template_from_the_file(tmp_path: Path) -> None:
    # Phi-3.5-mini-instruct's template, carried by the file, renders as it should.
    phi35 = (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
    )
    report = run_template(tmp_path, phi35)
    assert report["error"] is None, report
    assert report["text"] == "<|user|>\nhi<|end|>\n<|assistant|>\n"
