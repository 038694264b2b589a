#!/usr/bin/env python3
"""Runs `gpt2 ioi` on the real GPT-2 small and compares with the IOI paper (Wang et al. 2022):

  * the clean logit difference (about 3.56) and IO preferred on ~99 % of prompts;
  * path patching to the logits: the name movers 9.9, 9.6, 10.0 among the most negative heads,
    the negative name movers 10.7, 11.10 among the most positive;
  * path patching to the name movers' queries: the S-inhibition heads 7.3, 7.9, 8.6, 8.10;
  * path patching to the S-inhibition heads' values (`gpt2 patch --pairs` on the same dataset):
    the induction heads 5.5, 5.8, 5.9, 6.9 and the duplicate-token heads 0.1, 0.10, 3.0;
  * path patching to the induction heads' keys: the previous-token heads 2.2, 4.11;
  * mean ablation of the name movers lowers the logit difference.

A head "is found" when it is among the `--top` (default 8) heads with the largest normalised
effect of the expected sign. Only where GPT-2 is in the Hugging Face cache (it runs offline,
`HF_HUB_OFFLINE=1`), or with `--model-dir` pointing at a copy; otherwise it says so and exits 0.

    scripts/check_ioi.py [--n 100] [--seed 0] [--model-dir DIR] [--bin target/release/gpt2]

Prints one line per check and exits 1 if any fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER = {
    "name movers": (["9.9", "9.6", "10.0"], "path_to_logits", -1),
    "negative name movers": (["10.7", "11.10"], "path_to_logits", +1),
    "S-inhibition": (["7.3", "7.9", "8.6", "8.10"], "path_to_queries", -1),
}


def binary(arg):
    if arg:
        return arg
    for build in ["release", "debug"]:
        b = REPO / "target" / build / "gpt2"
        if b.exists():
            return str(b)
    sys.exit("no gpt2 binary: cargo build --release first, or --bin PATH")


def found(normalized, n_head, heads, sign, top):
    """Which of `heads` are among the `top` heads whose effect has `sign`, strongest first."""
    ranked = sorted(range(len(normalized)), key=lambda i: sign * normalized[i], reverse=True)
    best = {f"{i // n_head}.{i % n_head}" for i in ranked[:top] if sign * normalized[i] > 0}
    return [h for h in heads if h in best]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--model-dir")
    ap.add_argument("--bin")
    args = ap.parse_args()
    gpt2 = binary(args.bin)
    model = ["--model-dir", args.model_dir] if args.model_dir else ["--model", "gpt2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    tmp = Path(tempfile.mkdtemp(prefix="check_ioi."))
    pairs = tmp / "ioi.jsonl"
    run = subprocess.run(
        [gpt2, "ioi", *model, "--n", str(args.n), "--seed", str(args.seed), "--ablate",
         "9.9,9.6,10.0", "--format", "json", "--dataset-out", str(pairs)],
        capture_output=True, text=True, env=env)
    if run.returncode != 0:
        if not args.model_dir and ("offline" in run.stderr or "cache" in run.stderr):
            print(f"skipped: GPT-2 is not in the Hugging Face cache ({run.stderr.strip()})")
            return 0
        sys.exit(run.stderr)
    r = json.loads(run.stdout)
    checks = []

    def check(name, ok, detail):
        checks.append(ok)
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    clean = r["clean"]
    check("clean logit difference", abs(clean["mean"] - 3.56) < 1.0,
          f"{clean['mean']:.2f} (paper 3.56), ABC {r['corrupted']['mean']:.2f}")
    check("IO > S", clean["io_beats_s"] >= 0.9,
          f"{100 * clean['io_beats_s']:.1f} % of {r['prompts']} prompts (paper ~99 %)")
    n_head = 12
    for name, (heads, key, sign) in PAPER.items():
        got = found(r[key]["normalized"], n_head, heads, sign, args.top)
        check(name, len(got) >= (len(heads) + 1) // 2,
              f"{len(got)} of {', '.join(heads)} in the top {args.top} ({key})")
    for name, heads, to, receivers, sign in [
        ("induction", ["5.5", "5.8", "5.9", "6.9"], "v", "7.3,7.9,8.6,8.10", -1),
        ("duplicate-token", ["0.1", "0.10", "3.0"], "v", "7.3,7.9,8.6,8.10", -1),
        ("previous-token", ["2.2", "4.11"], "k", "5.5,5.8,5.9,6.9", -1),
    ]:
        p = subprocess.run(
            [gpt2, "patch", *model, "--pairs", str(pairs), "--path-to", to, "--receivers",
             receivers, "--format", "json"], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(p.stderr)
        got = found(json.loads(p.stdout)["normalized"], n_head, heads, sign, args.top)
        check(name, len(got) >= (len(heads) + 1) // 2,
              f"{len(got)} of {', '.join(heads)} in the top {args.top} (path to the {to} of "
              f"{receivers})")
    ablated = r["ablation"]["ablated"]["mean"]
    check("mean ablation of the name movers", ablated < clean["mean"],
          f"logit difference {ablated:.2f} against {clean['mean']:.2f}")
    print(f"{sum(checks)} of {len(checks)} checks pass; dataset in {pairs}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
