#!/usr/bin/env bash
# Side-by-side speed of activation patching every head (all positions) of a GPT-2-small-shaped
# checkpoint: `gpt2 patch --what head_out --by head` against TransformerLens'
# `get_act_patch_attn_head_out_all_pos` (scripts/bench_patch_tl.py), on the same folder, prompt
# pair and number of threads, in interleaved rounds (this machine's speed drifts between runs:
# only figures taken together compare), medians. Issue 26 item 6.
#
#   scripts/bench_patch.sh [MODEL_DIR] [PYTHON]
#
# MODEL_DIR: a save_pretrained folder with a GPT-2 tokenizer.json (default
# /work/bench/gpt2-small-random, made by scripts/make_bench_model.py). PYTHON: an interpreter with
# transformer-lens<4 (default /work/venvs/tl/bin/python if there, else python3).
# Environment: ROUNDS (5), THREADS (2: RAYON_NUM_THREADS for gpt2, torch.set_num_threads for
# TransformerLens); GPT2_BIN (default: target/release/gpt2, built here); TL_OMP_WAIT_POLICY
# (default PASSIVE): torch's OpenMP threads spin while they wait, and on a machine whose cores
# other processes share, the spinning collapses (measured here at load 5 on 2 cores: a 20-token
# forward pass of GPT-2 small 1010 ms with OpenMP's default, 269 ms PASSIVE, 195 ms on one
# thread), so TransformerLens runs PASSIVE unless told otherwise: its best case on a shared
# machine. TL_OMP_WAIT_POLICY=default leaves OpenMP's own policy.
#
# Timed, for both tools, from the model in memory to the result: the clean run (with what the
# patches need of it), the corrupted baseline and the 144 patched runs. gpt2's figure is the
# "ran in" it reports; its whole process (load included) is shown too. TransformerLens' is
# run_with_cache(clean) + model(corrupted) + get_act_patch_attn_head_out_all_pos; its patches
# alone are shown too. Each round also checks that the two computed the same numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/work/bench/gpt2-small-random}
python=${2:-$( [ -x /work/venvs/tl/bin/python ] && echo /work/venvs/tl/bin/python || echo python3 )}
rounds=${ROUNDS:-5} threads=${THREADS:-2} tl_wait=${TL_OMP_WAIT_POLICY:-PASSIVE}
# An IOI prompt pair (Wang et al.'s template, ABC corruption: three other names), 20 tokens.
clean="When Mary and John went to the store yesterday afternoon, John gave a big bottle of cold milk to"
corrupted="When Tom and James went to the store yesterday afternoon, Paul gave a big bottle of cold milk to"
target=" Mary" against=" John"
load0=$(cut -d' ' -f1 /proc/loadavg)
[ -f "$dir/config.json" ] && [ -f "$dir/model.safetensors" ] && [ -f "$dir/tokenizer.json" ] || {
  echo "bench_patch.sh: no checkpoint folder at $dir (config.json, model.safetensors, tokenizer.json); make one with scripts/make_bench_model.py" >&2
  exit 1; }
"$python" -c 'import transformer_lens' 2>/dev/null || {
  echo "bench_patch.sh: $python cannot import transformer_lens: python3 -m venv /work/venvs/tl && /work/venvs/tl/bin/pip install 'transformer-lens<4'" >&2
  exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if [ -z "${GPT2_BIN:-}" ]; then
  cargo build --release --quiet
  GPT2_BIN=target/release/gpt2
fi

echo "date:      $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "machine:   $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load avg $load0 at start"
echo "shape:     $dir: $(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(", ".join(f"{k} {c[k]}" for k in ("n_layer","n_embd","n_head","vocab_size")))' "$dir/config.json" 2>/dev/null || echo '?')"
echo "run:       head_out by head (every head, all positions), $threads threads, $rounds interleaved rounds"
echo "prompts:   clean \"$clean\" / corrupted \"$corrupted\", logit($target) - logit($against) at the last position"
echo "gpt2:      $GPT2_BIN (repo at $(git describe --always --dirty 2>/dev/null || echo '?'))"
echo "tl:        OMP_WAIT_POLICY $tl_wait, transformer-lens $("$python" -c 'from importlib.metadata import version; print(version("transformer-lens"))'), torch $("$python" -c 'import torch; print(torch.__version__)')"

for r in $(seq "$rounds"); do
  f="$out/$r"
  s=$(date +%s.%N)
  RAYON_NUM_THREADS=$threads "$GPT2_BIN" patch --model-dir "$dir" --device cpu --clean "$clean" \
    --corrupted "$corrupted" --target "$target" --against "$against" --what head_out --by head \
    --format json >"$f.gpt2.json" 2>"$f.gpt2.err" || true
  e=$(date +%s.%N)
  echo "$s $e" >"$f.gpt2.wall"
  echo "round $r/$rounds: gpt2 done" >&2
  env $( [ "$tl_wait" = default ] || echo "OMP_WAIT_POLICY=$tl_wait" ) \
    TQDM_DISABLE=1 "$python" scripts/bench_patch_tl.py --model-dir "$dir" --clean "$clean" \
    --corrupted "$corrupted" --target "$target" --against "$against" --threads "$threads" \
    >"$f.tl.json" 2>"$f.tl.err" || true
  echo "round $r/$rounds: transformer_lens done" >&2
done

python3 - "$out" "$rounds" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

g_ran, g_wall, t_total, t_patch, t_load, diffs = [], [], [], [], [], []
for r in range(1, rounds + 1):
    g, t = load(f"{out}/{r}.gpt2.json"), load(f"{out}/{r}.tl.json")
    err = open(f"{out}/{r}.gpt2.err").read()
    m = re.search(r"ran in (\d+) ms", err)
    if g and m:
        g_ran.append(int(m.group(1)) / 1e3)
        s, e = map(float, open(f"{out}/{r}.gpt2.wall").read().split())
        g_wall.append(e - s)
    else:
        print(f"note: gpt2 round {r} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    if t:
        t_total.append(t["total_s"]); t_patch.append(t["patch_s"]); t_load.append(t["load_s"])
    else:
        terr = open(f"{out}/{r}.tl.err").read().strip().splitlines() or ["?"]
        print(f"note: transformer_lens round {r} failed: {terr[-1]}")
    if g and t:
        assert g["shape"] == t["shape"], (g["shape"], t["shape"])
        diffs.append(max(abs(a - b) for a, b in zip(g["patched"], t["patched"])))

def cell(xs):
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-"

print("\n| tool | what is timed | seconds, median [min-max] |")
print("|---|---|---:|")
print(f"| gpt2 patch | clean + corrupted runs + 144 patches (its \"ran in\") | {cell(g_ran)} |")
print(f"| gpt2 patch | the whole process, load included | {cell(g_wall)} |")
print(f"| TransformerLens | run_with_cache(clean) + model(corrupted) + get_act_patch_attn_head_out_all_pos | {cell(t_total)} |")
print(f"| TransformerLens | get_act_patch_attn_head_out_all_pos alone | {cell(t_patch)} |")
print(f"| TransformerLens | load (not in the above) | {cell(t_load)} |")
if g_ran and t_total:
    print(f"\nspeed-up (TransformerLens / gpt2, medians, same work): "
          f"{statistics.median(t_total) / statistics.median(g_ran):.1f}x")
if diffs:
    print(f"results agree: max |gpt2 - TransformerLens| over the 144 heads = {max(diffs):.2e}")
print(f"load avg at end {open('/proc/loadavg').read().split()[0]}")
PY
