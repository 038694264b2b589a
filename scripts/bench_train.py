#!/usr/bin/env python3
"""One timing of torch's training step, for scripts/bench_train.sh: GPT2LMHeadModel of a layout
file (configs/*.json, with optional overrides), AdamW (weight decay on 2-D parameters), gradient
clipping to norm 1, mean cross-entropy, on random ids; `steps` steps after 2 warm-up steps.
Prints one JSON line: steps/s and the peak resident memory (MiB).

  python scripts/bench_train.py LAYOUT BATCH SEQ_LEN STEPS THREADS [KEY=VALUE ...]
"""
import json
import resource
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    layout, batch, seq, steps, threads = sys.argv[1], *map(int, sys.argv[2:6])
    torch.set_num_threads(threads)
    fields = {k: v for k, v in json.load(open(layout)).items() if not k.startswith("_")}
    for kv in sys.argv[6:]:
        k, v = kv.split("=")
        fields[k] = int(v)
    fields.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    cfg = GPT2Config(**fields)
    model = GPT2LMHeadModel(cfg).train()
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size - 1, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:].reshape(-1)
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    rate = steps / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"steps_per_s": rate, "peak_mib": peak, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
