#!/usr/bin/env bash
# A fuzz campaign: each target for SECONDS seconds (default 1800), all at once, one job each,
# seeded from the shared fixtures; crashes land in fuzz/artifacts/<target>/. CI does not run it.
#   fuzz/run.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); RUSTC_BOOTSTRAP=1 lets the stable toolchain
# take the sanitizer flags libFuzzer builds need.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-1800}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_load tokenizer chat_template)
fixtures=../../shared/fixtures
export RUSTC_BOOTSTRAP=1

# Seeds (made afresh each run, never committed): GGUF files cut to their header and metadata
# plus the small vocabularies whole; texts from the tokenizer cases; the fixtures' templates.
seeds=$(mktemp -d "${TMPDIR:-/tmp}/phi3-fuzz-seeds.XXXXXX")
trap 'rm -rf "$seeds"' EXIT
mkdir -p "$seeds"/{gguf_load,tokenizer,chat_template}
for f in "$fixtures"/*.gguf; do
    head -c 65536 "$f" > "$seeds/gguf_load/$(basename "$f").head"
done
cp "$fixtures"/phi3-vocab.gguf "$fixtures"/gpt2-vocab.gguf "$seeds/gguf_load/"
split -l 1 "$fixtures/phi3-vocab.llamacpp.inp" "$seeds/tokenizer/case-" 2>/dev/null || true
python3 - "$seeds/chat_template" <<'PY'
import pathlib, sys
out = pathlib.Path(sys.argv[1])
templates = [
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}<|assistant|>\n",
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ m.content|upper }}{% endfor %}{{ ns.n }}",
]
for i, t in enumerate(templates):
    (out / f"template-{i}").write_bytes((t + "\0user\0hello\0assistant\0hi there").encode())
PY

cargo fuzz build --release
mkdir -p corpus logs
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    cargo fuzz run --release "$t" "corpus/$t" "$seeds/$t" -- \
        -max_total_time="$seconds" -max_len=1048576 -rss_limit_mb=4096 -timeout=30 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 > "logs/$t.log" 2>&1 &
done
wait
for t in "${targets[@]}"; do
    echo "== $t"
    grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|cov: |ERROR|SUMMARY" "logs/$t.log" | tail -5
    ls "artifacts/$t" 2>/dev/null | sed 's/^/crash: /'
done
