#!/usr/bin/env python3
"""Checks the published heads of the real GPT-2 small with the gpt2 binary, where
`openai-community/gpt2` is in the Hugging Face cache (it cannot run without it: nothing here
downloads; fetch it once with network, e.g. `gpt2 generate --model gpt2 --prompt hi -n 1`).

    python3 scripts/check_gpt2_heads.py [path/to/gpt2-binary]

Published heads it looks for:
  * induction 5.1, 5.5, 6.9, 7.2, 7.10, on repeated random tokens (Olsson et al. 2022; the
    TransformerLens induction tutorial);
  * previous-token 4.11; duplicate-token 0.1, 3.0 (Wang et al. 2022, "Interpretability in the
    Wild", IOI);
  * name movers 9.9, 9.6, 10.0 on an IOI prompt: ablating them lowers the indirect object's
    logit most (heads-effect --target " Mary").
It prints what it found for each, and exits 1 if a published head is not found. Standard library
only.
"""
import json
import os
import subprocess
import sys

BIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(__file__), "..", "target", "release", "gpt2")
ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TEXT = ("The quick brown fox jumps over the lazy dog. Alice handed the book to Bob, and Bob "
        "thanked Alice for the book. The fox jumps again over the dog.")
IOI = "When Mary and John went to the store, John gave a drink to"


def run(*args):
    p = subprocess.run([BIN, *args, "--model", "gpt2"], env=ENV, capture_output=True, text=True)
    if p.returncode != 0:
        msg = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}"
        if "cache" in msg or "HF_HUB_OFFLINE" in msg:
            sys.exit(f"openai-community/gpt2 is not in the Hugging Face cache ({msg}).\n"
                     "Download it once with network: gpt2 generate --model gpt2 --prompt hi -n 1")
        sys.exit(f"gpt2 {' '.join(args)}: {msg}")
    return json.loads(p.stdout)


def main():
    ok = True
    scores = run("inspect-heads", "--scores", "--bos", "--format", "json", "--prompt", TEXT)
    by = {(h["layer"], h["head"]): h for h in scores["heads"]}
    def show(kind, heads, key):
        nonlocal ok
        ranked = sorted(by.values(), key=lambda h: -(h[key] or 0))
        top = [f"{h['layer']}.{h['head']}" for h in ranked[:len(heads) + 3]]
        print(f"{kind}: published {', '.join(f'{l}.{h}' for l, h in heads)}")
        for l, h in heads:
            s = by[(l, h)]
            found = s["label"] == kind
            ok &= found
            print(f"  {l}.{h}: {key} {s[key]:.2f}, labelled {s['label']}{'' if found else '  <- not found'}")
        print(f"  highest {key}: {', '.join(top)}")
    show("induction", [(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)], "induction")
    show("previous-token", [(4, 11)], "previous_token")
    show("duplicate-token", [(0, 1), (3, 0)], "duplicate_token")
    effects = run("heads-effect", "--bos", "--format", "json", "--prompt", IOI, "--target", " Mary")
    ranked = sorted(((l, h, v) for l, row in enumerate(effects["effect"]) for h, v in enumerate(row)),
                    key=lambda x: x[2])
    lowest = [f"{l}.{h}" for l, h, _ in ranked[:8]]
    print(f"name movers (IOI, ablating lowers the ' Mary' logit): published 9.9, 9.6, 10.0")
    print(f"  most negative effects: {', '.join(f'{l}.{h} {v:+.2f}' for l, h, v in ranked[:8])}")
    for head in ["9.9", "9.6", "10.0"]:
        found = head in lowest
        ok &= found
        print(f"  {head}: {'among the 8 most negative' if found else 'not among the 8 most negative  <- not found'}")
    print("all published heads found" if ok else "some published heads were not found")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
