#!/usr/bin/env bash
# Side-by-side speed of `gpt2` and transformers on one checkpoint shape, in one run (this machine's
# speed drifts between runs, so only figures taken together compare).
#
#   scripts/bench.sh [CONFIG] [PYTHON]
#
# CONFIG: a config.json layout (default configs/gpt2.json, GPT-2 small); random weights on both
# sides. PYTHON: an interpreter with torch + transformers (default: python3); the transformers
# column is skipped if it cannot import them. Extra settings via the environment:
# PROMPT_TOKENS (512), NEW_TOKENS (128), RUNS (3), THREADS (nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/gpt2.json}
python=${2:-python3}
pt=${PROMPT_TOKENS:-512} nt=${NEW_TOKENS:-128} runs=${RUNS:-3} threads=${THREADS:-$(nproc)}

cargo build --release --quiet
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "shape:   $config, f32, prompt $pt tokens, $nt new tokens, best of $runs, $threads threads"
ours=$(RAYON_NUM_THREADS=$threads target/release/gpt2 bench --config "$config" --device cpu \
  --prompt-tokens "$pt" --new-tokens "$nt" --runs "$runs" --json 2>/dev/null)
theirs=""
if "$python" -c 'import torch, transformers' 2>/dev/null; then
  theirs=$("$python" scripts/bench_transformers.py --config "$config" --prompt-tokens "$pt" \
    --new-tokens "$nt" --runs "$runs" --threads "$threads" 2>/dev/null)
fi
"${python}" - "$ours" "$theirs" <<'PY' 2>/dev/null || { echo "gpt2: $ours"; echo "transformers: ${theirs:-skipped}"; }
import json, sys
rows = [("gpt2 (candle)", json.loads(sys.argv[1]))]
if sys.argv[2]:
    rows.append(("transformers", json.loads(sys.argv[2])))
print(f"{'':16}{'load ms':>10}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}")
for name, r in rows:
    print(f"{name:16}{r['load_ms']:>10.0f}{r['time_to_first_token_ms']:>10.1f}"
          f"{r['prefill_tokens_per_s']:>15.1f}{r['decode_tokens_per_s']:>14.1f}")
PY
