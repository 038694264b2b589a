#!/usr/bin/env bash
# A training step (forward, backward, clipping, AdamW) side by side: `gpt2 train` against torch's
# GPT2LMHeadModel + AdamW (scripts/bench_train.py), same layout, batch, sequence length and
# threads, in interleaved rounds (this machine's speed drifts between runs: only figures taken
# together compare), medians; peak resident memory of each. Issue 27 item 6.
#
#   scripts/bench_train.sh [PYTHON]
#
# Cases: the induction fixture's layout (configs/tiny.json with 2 heads and n_inner 64) at batch
# 16 x 128, and GPT-2 small (configs/gpt2.json) at batch 4 x 256.
# Environment: ROUNDS (3), THREADS (2: RAYON_NUM_THREADS for gpt2, torch.set_num_threads),
# STEPS_TINY (100), STEPS_SMALL (5), GPT2_BIN (default target/release/gpt2, built here),
# OMP_WAIT_POLICY for torch (default PASSIVE: OpenMP's spinning collapses on shared cores; see
# bench_patch.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-$( [ -x /opt/pyref/bin/python ] && echo /opt/pyref/bin/python || echo python3 )}
rounds=${ROUNDS:-3} threads=${THREADS:-2}
if [ -z "${GPT2_BIN:-}" ]; then cargo build --release -q; fi
bin=${GPT2_BIN:-target/release/gpt2}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$python" -c "import numpy as np; np.save('$tmp/ids.npy', np.random.default_rng(0).integers(0, 500, 400000).astype(np.uint16))"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $threads; load $(cut -d' ' -f1 /proc/loadavg)"

gpt2_run() { # layout batch seq steps overrides...
  local layout=$1 b=$2 t=$3 n=$4; shift 4
  local extra=() kv
  for kv in "$@"; do extra+=("--${kv%%=*}" "${kv#*=}"); done
  extra=("${extra[@]//n_head/n-head}"); extra=("${extra[@]//n_inner/n-inner}")
  rm -rf "$tmp/run"
  RAYON_NUM_THREADS=$threads /usr/bin/time -f "%M" -o "$tmp/mem" "$bin" train --config "$layout" \
    "${extra[@]}" --data "$tmp/ids.npy" --steps "$n" --batch-size "$b" --seq-len "$t" \
    --eval-every 0 --save-every 0 --out "$tmp/run" 2>/dev/null \
    | sed -n 's/.*(\([0-9.]*\) steps\/s training.*/\1/p' | tr -d '\n'
  echo " $(( $(cat "$tmp/mem") / 1024 ))"
}
torch_run() {
  OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} "$python" scripts/bench_train.py "$@" 2>/dev/null \
    | "$python" -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.3f %.0f" % (d["steps_per_s"], d["peak_mib"]))'
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

for case in tiny small; do
  if [ $case = tiny ]; then
    args=(configs/tiny.json 16 128 "${STEPS_TINY:-100}"); over=(n_head=2 n_inner=64)
  else
    args=(configs/gpt2.json 4 256 "${STEPS_SMALL:-5}"); over=()
  fi
  : > "$tmp/g"; : > "$tmp/p"
  for r in $(seq "$rounds"); do
    gpt2_run "${args[@]}" "${over[@]}" >> "$tmp/g"
    torch_run "${args[@]}" "$threads" "${over[@]}" >> "$tmp/p"
  done
  g=$(cut -d' ' -f1 "$tmp/g" | median); p=$(cut -d' ' -f1 "$tmp/p" | median)
  gm=$(cut -d' ' -f2 "$tmp/g" | median); pm=$(cut -d' ' -f2 "$tmp/p" | median)
  echo "$case (${args[1]} x ${args[2]}): gpt2 $g steps/s [$(cut -d' ' -f1 "$tmp/g" | tr '\n' ' ')] peak ${gm} MiB | torch $p steps/s [$(cut -d' ' -f1 "$tmp/p" | tr '\n' ' ')] peak ${pm} MiB | ratio $(awk "BEGIN {printf \"%.2f\", $g / $p}")"
done
