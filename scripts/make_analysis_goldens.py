#!/usr/bin/env python3
"""Goldens for the analyses, computed by transformers on the committed fixtures:

  * head ablation: logits with heads zeroed (transformers' `head_mask` where this transformers
    has it, else the same thing done by hand: a pre-hook on each layer's attn.c_proj zeroing those
    heads' slice of its input, the merged heads), and with heads mean-ablated (each removed head's
    output replaced by its mean over the prompt's positions);
  * logit lens: ln_f of the residual after every block, then the LM head, top-5 per position.

Writes tests/fixtures/<name>/analysis.safetensors and analysis.json.

    /opt/pyref/bin/python scripts/make_analysis_goldens.py
"""
import inspect
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
# A prompt of fixture token ids (the tiny tokenizer's ids 0..511, 511 = <|endoftext|>).
IDS = [84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 32, 111, 110, 32, 116, 104, 101, 32, 109,
       97, 116, 32, 98, 101, 99, 97, 117, 115, 101]
ABLATE = {"tiny": [(0, 1), (1, 2), (1, 3)], "tiny-b": [(0, 0), (2, 3)]}


def z_hook(model, heads, fill):
    """Pre-hooks on attn.c_proj replacing the listed heads' slices of the merged heads."""
    hs = model.config.n_embd // model.config.n_head
    handles = []
    for layer in sorted({l for l, _ in heads}):
        hh = [h for l, h in heads if l == layer]

        def pre(mod, args, layer=layer, hh=hh):
            (x,) = args
            x = x.clone()
            for h in hh:
                x[..., h * hs:(h + 1) * hs] = fill(layer, h)
            return (x,)

        handles.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre))
    return handles


def main():
    for name, heads in ABLATE.items():
        d = REPO / "tests" / "fixtures" / name
        model = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager",
                                                torch_dtype=torch.float32).eval()
        cfg = model.config
        hs = cfg.n_embd // cfg.n_head
        ids = torch.tensor([IDS])
        with torch.no_grad():
            clean = model(ids).logits[0]
            # Zero: head_mask when this transformers still takes it.
            takes_mask = "head_mask" in inspect.signature(model.forward).parameters
            if takes_mask:
                mask = torch.ones(cfg.n_layer, cfg.n_head)
                for l, h in heads:
                    mask[l, h] = 0.0
                zero = model(ids, head_mask=mask).logits[0]
            handles = z_hook(model, heads, lambda l, h: 0.0)
            zero_hook = model(ids).logits[0]
            for hd in handles:
                hd.remove()
            if takes_mask:
                assert torch.allclose(zero, zero_hook, atol=1e-5), "head_mask != zeroed slices"
            # Mean: each removed head's output averaged over the prompt's positions.
            means = {}
            cap = []
            for layer in sorted({l for l, _ in heads}):
                cap.append(model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(
                    lambda mod, args, layer=layer: means.__setitem__(layer, args[0][0].mean(0))))
            model(ids)
            for hd in cap:
                hd.remove()
            handles = z_hook(model, heads, lambda l, h: means[l][h * hs:(h + 1) * hs])
            mean = model(ids).logits[0]
            for hd in handles:
                hd.remove()
            # Logit lens: ln_f of each block's output (hidden_states[l + 1], except the last,
            # which transformers already normalised), through the tied head.
            hidden = model(ids, output_hidden_states=True).hidden_states
            lens = []
            for l in range(cfg.n_layer + 1):
                x = hidden[l]
                x = model.transformer.ln_f(x) if l < cfg.n_layer else x
                lens.append(torch.softmax(model.lm_head(x)[0], -1))
            lens = torch.stack(lens)  # (n_layer + 1, T, vocab): embed, then each block
        top = torch.topk(lens, 5, dim=-1)
        save_file({"clean": clean.contiguous(), "zero": zero_hook.contiguous(),
                   "mean": mean.contiguous(), "lens_top_p": top.values.contiguous(),
                   "lens_top_ids": top.indices.to(torch.int32).contiguous()},
                  str(d / "analysis.safetensors"))
        (d / "analysis.json").write_text(json.dumps({
            "token_ids": IDS, "ablate": [f"{l}.{h}" for l, h in heads],
            "zero_by": "head_mask" if takes_mask else "zeroed c_proj input slices",
            "torch": torch.__version__, "transformers": transformers.__version__}, indent=1) + "\n")
        print(name, "head_mask" if takes_mask else "hooks",
              "max|zero-clean|", float((zero_hook - clean).abs().max()),
              "max|mean-clean|", float((mean - clean).abs().max()))


if __name__ == "__main__":
    main()
