#!/usr/bin/env python3
"""Goldens for `gpt2 train`: torch's GPT2LMHeadModel + AdamW trained from tests/fixtures/tiny.

For each case (options below), 20 steps on tests/fixtures/tiny/train_ids.npy with the rules
`gpt2 train` documents, in float32 and in float64:
  * data: the file's ids minus the held-out tenth (kept out when it and the rest each exceed one
    window); with --sequential, step s row r is window w = (s*B + r) mod ((N-1)//T): inputs
    ids[w*T : w*T+T], targets one further;
  * loss: mean cross-entropy over every position; no dropout;
  * AdamW (torch's single-tensor path), weight decay on parameters of 2+ dimensions only;
  * gradient clipping: clip_grad_norm_ over all parameters;
  * learning rate of step s: lr*(s+1)/warmup during the warm-up, then constant or cosine
    min_lr + 0.5*(1 + cos(pi*p))*(lr - min_lr), p = (s - warmup)/(steps - 1 - warmup).
Writes tests/fixtures/tiny/train.json (each case's options, the losses at every step, and how
far torch's float32 weights end from its float64 ones, per tensor) and
train_{case}_{f32,f64}.safetensors (the final weights, checkpoint names without prefix).

It also runs `gpt2 train` itself (FOLDER_ARGS, a short seeded run from configs/tiny.json),
loads the folder it writes with transformers' GPT2LMHeadModel.from_pretrained (no missing or
unexpected keys allowed) and records its logits on FOLDER_IDS in train_folder_logits.safetensors:
the test retrains the same run and holds gpt2's logits on its folder to them.

Run:  cargo build && /opt/pyref/bin/python scripts/make_train_goldens.py   (a few seconds)
      (GPT2_BIN=path/to/gpt2 to use another binary)
"""
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests/fixtures/tiny"
FOLDER_ARGS = ["--config", "configs/tiny.json", "--task", "copy", "--steps", "30",
               "--batch-size", "4", "--seq-len", "32", "--seed", "3", "--eval-every", "0"]
FOLDER_IDS = [511, 5, 9, 200, 3, 7, 5, 9]
STEPS = 20
CASES = {
    "constant": dict(lr=1e-3, weight_decay=0.1, grad_clip=0.0, warmup=0, schedule="constant",
                     min_lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, batch_size=4, seq_len=32),
    "warmup_cosine_clip": dict(lr=3e-3, weight_decay=0.01, grad_clip=0.5, warmup=5,
                               schedule="cosine", min_lr=3e-4, beta1=0.9, beta2=0.95, eps=1e-8,
                               batch_size=4, seq_len=32),
}


def ids_file():
    path = FIXTURE / "train_ids.npy"
    if not path.exists():
        rng = np.random.default_rng(2026)
        np.save(path, rng.integers(0, 511, size=2000).astype(np.uint16))
    return np.load(path).astype(np.int64)


def learning_rate(s, c):
    if s < c["warmup"]:
        return c["lr"] * (s + 1) / c["warmup"]
    if c["schedule"] == "constant":
        return c["lr"]
    span = max(STEPS - 1 - c["warmup"], 1)
    p = min((s - c["warmup"]) / span, 1.0)
    return c["min_lr"] + 0.5 * (1 + math.cos(math.pi * p)) * (c["lr"] - c["min_lr"])


def train(c, dtype):
    ids = torch.from_numpy(ids_file())
    T, B = c["seq_len"], c["batch_size"]
    tail = len(ids) // 10
    if tail > T and len(ids) - tail > T:
        ids = ids[:len(ids) - tail]
    windows = (len(ids) - 1) // T
    model = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_pdrop=0.0, embd_pdrop=0.0,
                                            resid_pdrop=0.0, attn_implementation="eager")
    model = model.to(dtype).train()
    params = list(model.named_parameters())
    groups = [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": c["weight_decay"]},
              {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps"],
                            foreach=False)
    losses = []
    for s in range(STEPS):
        w = [(s * B + r) % windows for r in range(B)]
        x = torch.stack([ids[i * T:i * T + T] for i in w])
        y = torch.stack([ids[i * T + 1:i * T + T + 1] for i in w])
        for g in opt.param_groups:
            g["lr"] = learning_rate(s, c)
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if c["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"], foreach=False)
        opt.step()
        losses.append(loss.item())
    weights = {n.removeprefix("transformer."): p.detach().clone().contiguous()
               for n, p in model.named_parameters()}
    return losses, weights


def folder_logits():
    binary = os.environ.get("GPT2_BIN", str(REPO / "target/debug/gpt2"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([binary, "train", *FOLDER_ARGS, "--out", str(out)], cwd=REPO, check=True,
                       capture_output=True)
        model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k != "mismatched_keys" or
               (k == "mismatched_keys" and v)}
        assert not bad, f"transformers did not load the folder cleanly: {bad}"
        with torch.no_grad():
            logits = model.eval()(torch.tensor([FOLDER_IDS])).logits[0].contiguous()
    save_file({"logits": logits}, FIXTURE / "train_folder_logits.safetensors")
    return {"args": FOLDER_ARGS, "ids": FOLDER_IDS}


def main():
    torch.manual_seed(0)
    record = {"steps": STEPS, "data": "train_ids.npy", "torch": torch.__version__,
              "transformers": transformers.__version__, "cases": {}}
    for name, c in CASES.items():
        l32, w32 = train(c, torch.float32)
        l64, w64 = train(c, torch.float64)
        # How far torch's own float32 run ends from its float64 run: max |Δ| / max |w| per tensor.
        spread = {n: float((w32[n].double() - w64[n]).abs().max() / w64[n].abs().max())
                  for n in w64}
        record["cases"][name] = {"options": c, "losses_f32": l32, "losses_f64": l64,
                                 "torch_f32_vs_f64": spread}
        save_file(w32, FIXTURE / f"train_{name}_f32.safetensors")
        save_file(w64, FIXTURE / f"train_{name}_f64.safetensors")
        worst = max(spread.items(), key=lambda kv: kv[1])
        print(f"{name}: loss {l32[0]:.5f} -> {l32[-1]:.5f}; torch f32 vs f64 worst {worst}")
    record["folder"] = folder_logits()
    (FIXTURE / "train.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
