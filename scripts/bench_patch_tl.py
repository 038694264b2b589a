#!/usr/bin/env python3
"""One timed run of TransformerLens' `get_act_patch_attn_head_out_all_pos` (every head of every
layer, all positions, one forward pass per head) on a GPT-2 checkpoint folder, for
scripts/bench_patch.sh. Prints one JSON object: the seconds to load, to compute what `gpt2 patch`
computes (the clean run with its cache, the corrupted baseline, every patch) and the patches
alone, and the result (layers x heads, the raw logit difference) so the script can check that
both tools computed the same thing.

The HookedTransformer is built offline from the folder's config and TransformerLens' own GPT-2
weight conversion, with no weight processing (as scripts/make_patching_goldens.py builds it), in
float32 on the CPU with torch.set_num_threads(THREADS).

    TQDM_DISABLE=1 /work/venvs/tl/bin/python scripts/bench_patch_tl.py --model-dir DIR \
        --clean TEXT --corrupted TEXT --target " Mary" --against " John" --threads 2
"""
import argparse
import json
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching  # noqa: E402
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--clean", required=True)
    ap.add_argument("--corrupted", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--against", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(os.path.join(a.model_dir, "tokenizer.json"))
    clean, corrupted = tok.encode(a.clean).ids, tok.encode(a.corrupted).ids
    (target,), (against,) = tok.encode(a.target).ids, tok.encode(a.against).ids
    hf = GPT2LMHeadModel.from_pretrained(a.model_dir, torch_dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, dtype=torch.float32, device="cpu")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False)
    model.eval()
    del hf
    clean, corrupted = torch.tensor([clean]), torch.tensor([corrupted])

    def metric(logits):
        return logits[0, -1, target] - logits[0, -1, against]

    load_s = time.perf_counter() - t0
    with torch.no_grad():
        t1 = time.perf_counter()
        clean_logits, cache = model.run_with_cache(clean)
        clean_metric = float(metric(clean_logits))
        corrupted_metric = float(metric(model(corrupted)))
        t2 = time.perf_counter()
        result = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
        t3 = time.perf_counter()
    print(json.dumps({
        "tool": "transformer_lens",
        "threads": torch.get_num_threads(),
        "tokens": clean.shape[1],
        "load_s": load_s,
        "total_s": t3 - t1,
        "patch_s": t3 - t2,
        "clean": clean_metric,
        "corrupted": corrupted_metric,
        "shape": list(result.shape),
        "patched": result.flatten().tolist(),
    }))


if __name__ == "__main__":
    main()
