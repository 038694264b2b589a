#!/usr/bin/env bash
# Side-by-side speed of `gpt2 bench`, transformers and llama.cpp's llama-bench on one checkpoint
# folder, in interleaved rounds: this machine's speed drifts 30-50% between runs, so only figures
# taken together compare, and interleaving spreads the drift over every configuration alike.
#
#   scripts/bench.sh [MODEL_DIR] [PYTHON]
#
# MODEL_DIR: a save_pretrained folder (default /work/bench/gpt2-small-random, made by
# scripts/make_bench_model.py). PYTHON: an interpreter with torch + transformers (default
# /opt/pyref/bin/python if there, else python3); the transformers rows are skipped without them.
# Environment: ROUNDS (5), THREADS (2), PROMPT_TOKENS (512), NEW_TOKENS (128); GPT2_BIN (default:
# target/release/gpt2, built here); LLAMA_BENCH (path to llama-bench; no llama.cpp rows without
# it) and GGUF_DIR (default MODEL_DIR/gguf) holding any of f32.gguf f16.gguf q8_0.gguf q4_0.gguf
# q4_k.gguf.
#
# Each tool measures prefill (P tokens) and decode (N tokens after the P-token prompt) once per
# round; llama-bench decodes at depth P too (-d P) so the KV cache is as long as the others'.
# llama-bench does its usual untimed warm-up; gpt2 and transformers run cold (--runs 1).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/work/bench/gpt2-small-random}
python=${2:-$( [ -x /opt/pyref/bin/python ] && echo /opt/pyref/bin/python || echo python3 )}
rounds=${ROUNDS:-5} threads=${THREADS:-2} pt=${PROMPT_TOKENS:-512} nt=${NEW_TOKENS:-128}
gguf_dir=${GGUF_DIR:-$dir/gguf}
load0=$(cut -d' ' -f1 /proc/loadavg)
[ -f "$dir/config.json" ] && [ -f "$dir/model.safetensors" ] || {
  echo "bench.sh: no checkpoint folder at $dir (config.json + model.safetensors); make one with scripts/make_bench_model.py" >&2
  exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [ -z "${GPT2_BIN:-}" ]; then
  cargo build --release --quiet
  GPT2_BIN=target/release/gpt2
fi

# Every configuration as tool:precision, in the order each round runs them.
configs=()
for p in "--dtype f32" "--dtype f16" "--dtype bf16" "--quantize q8_0" "--quantize q4_0" \
    "--quantize q4_k"; do
  # A short probe: a binary without this option exits 2 (usage error).
  if err=$(RAYON_NUM_THREADS=$threads "$GPT2_BIN" bench --model-dir "$dir" --device cpu $p \
      --prompt-tokens 8 --new-tokens 2 --runs 1 --format json 2>&1 >/dev/null); then
    configs+=("gpt2:${p#--* }")
  else
    echo "note: skipping gpt2 $p (exit $?): $(echo "$err" | grep -m1 .)"
  fi
done
if "$python" -c 'import torch, transformers' 2>/dev/null; then
  configs+=("transformers:f32")
else
  echo "note: skipping transformers ($python cannot import torch + transformers)"
fi
llama_version=none
if [ -n "${LLAMA_BENCH:-}" ] && [ -x "$LLAMA_BENCH" ]; then
  # Not `| grep -m1`: under pipefail its early exit can SIGPIPE llama-bench and end the script.
  llama_version=$("$LLAMA_BENCH" --version 2>&1 | sed -n 's/^version: //p')
  for q in f32 f16 q8_0 q4_0 q4_k; do
    if [ -f "$gguf_dir/$q.gguf" ]; then configs+=("llama.cpp:$q")
    else echo "note: skipping llama.cpp $q (no $gguf_dir/$q.gguf)"; fi
  done
else
  echo "note: skipping llama.cpp (set LLAMA_BENCH=/path/to/llama-bench)"
fi

echo "date:      $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:   $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load avg $load0 at start"
echo "shape:     $dir: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(", ".join(f"{k} {c[k]}" for k in ("n_layer","n_embd","n_head","vocab_size","n_positions")))' "$dir/config.json" 2>/dev/null || echo '?')"
echo "run:       prompt $pt tokens, $nt new tokens, $threads threads, $rounds interleaved rounds"
echo "gpt2:      $GPT2_BIN (repo at $(git describe --always --dirty 2>/dev/null || echo '?'))"
# The CPU's SIMD features and the kernel gpt2 chose for each path (from `gpt2 bench --json`).
RAYON_NUM_THREADS=$threads "$GPT2_BIN" bench --model-dir "$dir" --device cpu --prompt-tokens 1 \
  --new-tokens 1 --runs 1 --json 2>/dev/null | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("features: ", " ".join(v.get("cpu_features", [])) or "?")
for path, kernel in v.get("kernels", {}).items():
    print(f"kernel:    {path}: {kernel}")' || echo "kernels:   ? (gpt2 bench --json failed)"
echo "llama.cpp: $llama_version"
# Spin-waiting thread pools (llama.cpp's, OpenMP's) collapse when they share the cores: say so.
awk -v l="$load0" 'BEGIN { if (l >= 1) print "note: load avg " l " before the run: other processes share" \
  " the cores, so these figures are contended (llama.cpp and transformers decode suffer most)" }'

for r in $(seq "$rounds"); do
  for c in "${configs[@]}"; do
    tool=${c%%:*} prec=${c#*:} f="$out/$r.$tool.$prec"
    case $tool in
      gpt2)
        flag=--dtype; case $prec in q*) flag=--quantize;; esac
        RAYON_NUM_THREADS=$threads "$GPT2_BIN" bench --model-dir "$dir" --device cpu $flag "$prec" \
          --prompt-tokens "$pt" --new-tokens "$nt" --runs 1 --format json >"$f.json" 2>"$f.err" || true ;;
      transformers)
        "$python" scripts/bench_transformers.py --model-dir "$dir" --prompt-tokens "$pt" \
          --new-tokens "$nt" --runs 1 --threads "$threads" >"$f.json" 2>"$f.err" || true ;;
      llama.cpp)
        "$LLAMA_BENCH" -m "$gguf_dir/$prec.gguf" -p "$pt" -n 0 -t "$threads" -r 1 -o json \
          >"$f.pp.json" 2>"$f.err" || true
        "$LLAMA_BENCH" -m "$gguf_dir/$prec.gguf" -p 0 -n "$nt" -d "$pt" -t "$threads" -r 1 -o json \
          >"$f.tg.json" 2>>"$f.err" || true ;;
    esac
    echo "round $r/$rounds: $c done" >&2
  done
done

python3 - "$out" "$dir" "$rounds" "${configs[@]}" <<'PY'
import json, math, os, statistics, struct, sys
out, model_dir, rounds, configs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

# Parameter count from the safetensors header, for the MB of weights of unquantized dtypes.
with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
numel = sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
bytes_per = {"f32": 4, "f16": 2, "bf16": 2}

rows = {}
for c in configs:
    tool, prec = c.split(":")
    pre, dec, mb = [], [], None
    for r in range(1, rounds + 1):
        base = f"{out}/{r}.{tool}.{prec}"
        if tool == "llama.cpp":
            pp, tg = load(base + ".pp.json"), load(base + ".tg.json")
            got = pp and tg and (pp[0]["avg_ts"], tg[0]["avg_ts"], pp[0]["model_size"])
        else:
            j = load(base + ".json")
            wb = j and j.get("weight_bytes", j.get("weights_bytes"))
            got = j and (j["prefill_tokens_per_s"], j["decode_tokens_per_s"],
                         wb or (numel * bytes_per[prec] if prec in bytes_per else None))
        if got:
            pre.append(got[0]); dec.append(got[1]); mb = got[2] and got[2] / 1e6
        else:
            err = (open(base + ".err").read().strip().splitlines() or ["?"])[-1]
            print(f"note: {tool} {prec} round {r} failed: {err}")
    rows[(tool, prec)] = (pre, dec, mb)

def cell(xs):
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]" if xs else "-"

def ratio(a, b):
    return f"{statistics.median(a) / statistics.median(b):.2f}x" if a and b else "-"

ref = rows.get(("transformers", "f32"), ([], []))
print("\n| tool | precision | weights MB | prefill tok/s median [min-max] | decode tok/s median [min-max] "
      "| prefill vs llama.cpp | decode vs llama.cpp | prefill vs transformers f32 | decode vs transformers f32 |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for (tool, prec), (pre, dec, mb) in rows.items():
    ratios = ["", "", "", ""]
    if tool == "gpt2":
        lc = rows.get(("llama.cpp", prec), ([], []))
        ratios = [ratio(pre, lc[0]), ratio(dec, lc[1]), ratio(pre, ref[0]), ratio(dec, ref[1])]
    print(f"| {tool} | {prec} | {(f'{mb:.0f}' if mb >= 10 else f'{mb:.2g}') if mb else '?'} | {cell(pre)} | {cell(dec)} | " + " | ".join(ratios) + " |")
print(f"\nratios: gpt2's median / the other's median (above 1: gpt2 is faster); "
      f"load avg at end {open('/proc/loadavg').read().split()[0]}")
PY
