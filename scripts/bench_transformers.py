#!/usr/bin/env python3
"""The transformers side of scripts/bench.sh: the same measurement as `gpt2 bench`.

A GPT2LMHeadModel of the given config.json layout with random weights (speed does not depend on the
values), or with --model-dir the checkpoint in that folder (`from_pretrained`, so load_ms includes
reading the weights); float32, transformers' default attention (sdpa in transformers 5; the "model"
key names it), `torch.set_num_threads(--threads)`. Prefill: one forward pass over `--prompt-tokens`
ids with the KV cache on. Decode: `--new-tokens - 1` further greedy steps, one token each, from the
cache. The fastest of `--runs` runs of each phase is reported, as JSON on one line with the same
keys as `gpt2 bench --format json`.
"""
import argparse
import json
import time

import torch
import transformers


def main():
    p = argparse.ArgumentParser(description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="configs/gpt2.json")
    src.add_argument("--model-dir", metavar="DIR")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model_dir:
        t0 = time.perf_counter()
        model = transformers.GPT2LMHeadModel.from_pretrained(
            args.model_dir, dtype=torch.float32).eval()
        config = model.config
    else:
        with open(args.config) as f:
            config = transformers.GPT2Config(**{k: v for k, v in json.load(f).items() if not k.startswith("_")})
        t0 = time.perf_counter()
        model = transformers.GPT2LMHeadModel(config).eval()
    load_ms = (time.perf_counter() - t0) * 1e3
    ids = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))

    best_prefill = best_decode = float("inf")
    with torch.inference_mode():
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            prefill = time.perf_counter() - t0
            past = out.past_key_values
            t0 = time.perf_counter()
            for _ in range(args.new_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            decode = time.perf_counter() - t0
            best_prefill, best_decode = min(best_prefill, prefill), min(best_decode, decode)

    print(json.dumps({
        "model": f"transformers {transformers.__version__} / torch {torch.__version__}"
                 f" / {config._attn_implementation}",
        "dtype": "f32",
        "threads": args.threads,
        "load_ms": load_ms,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "time_to_first_token_ms": best_prefill * 1e3,
        "prefill_tokens_per_s": args.prompt_tokens / best_prefill,
        "decode_tokens_per_s": (args.new_tokens - 1) / best_decode,
    }))


if __name__ == "__main__":
    main()
