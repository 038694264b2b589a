#!/usr/bin/env python3
"""Goldens for path patching of the direct path alone (`gpt2 patch --path-to q|k|v
--freeze-mlps`), from TransformerLens 4's own function,
`transformer_lens.patching.get_act_patch_direct_path_all_sources`, on the `tiny-b` fixture.

That function (TransformerLens 4.3, TransformerBridge only) runs its `corrupted_tokens` and adds
one source head's `(clean - corrupted) z @ W_O` to one destination head's pre-`ln1` copy of the
residual stream (`hook_{q,k,v}_input`), everything else recomputed: the direct edge, which is
path patching with the MLPs frozen too, the two prompts' roles swapped. So TransformerLens'
`corrupted_tokens` is gpt2's `--clean` (the run) and its `clean_cache` the cache of gpt2's
`--corrupted` (where the sender's value comes from). Writes
tests/fixtures/tiny-b/direct_path.safetensors: per component, [src_layer, src_head, dst_layer,
dst_head] (0.0 where dst_layer <= src_layer, TransformerLens' placeholders).

Needs TransformerLens 4 (a venv apart from the 3.9 one, torch from /opt/pyref):

    /opt/pyref/bin/python -m venv /work/venvs/tl4
    echo /opt/pyref/lib/python3.11/site-packages > /work/venvs/tl4/lib/python3.11/site-packages/pyref.pth
    /work/venvs/tl4/bin/pip install 'transformer-lens==4.3.0'
    HF_HUB_OFFLINE=1 TQDM_DISABLE=1 /work/venvs/tl4/bin/python scripts/make_direct_path_goldens.py
"""
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import patching
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-b"
RUN = "The cat sat on the mat. The cat"          # gpt2's --clean
SOURCE = "The dog sat on the mat. The dog"       # gpt2's --corrupted
TARGET, AGAINST = " s", " the"


def main():
    tok = GPT2TokenizerFast.from_pretrained(FIXTURE)
    hf = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    bridge = TransformerBridge.boot_transformers(str(FIXTURE), hf_model=hf, tokenizer=tok)
    bridge.eval()
    run = torch.tensor([tok(RUN).input_ids])
    source = torch.tensor([tok(SOURCE).input_ids])
    (target,), (against,) = tok(TARGET).input_ids, tok(AGAINST).input_ids

    def metric(logits):
        return logits[0, -1, target] - logits[0, -1, against]

    out = {}
    with torch.no_grad():
        d = float((bridge(run) - hf(run).logits).abs().max())
        assert d < 1e-4, d
        _, source_cache = bridge.run_with_cache(source)
        _, run_cache = bridge.run_with_cache(run)
        out["run"] = metric(bridge(run)).reshape(1)
        for component in ["q", "k", "v"]:
            out[component] = patching.get_act_patch_direct_path_all_sources(
                bridge, run, source_cache, run_cache, metric, component=component,
                verbose=False).float()
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    save_file(out, str(FIXTURE / "direct_path.safetensors"))
    (FIXTURE / "direct_path.json").write_text(json.dumps({
        "clean": RUN, "corrupted": SOURCE, "target": TARGET, "against": AGAINST,
        "function": "transformer_lens.patching.get_act_patch_direct_path_all_sources("
                    "bridge, tokens(clean), cache(corrupted), cache(clean), metric, component)",
        "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
    }, indent=1) + "\n")
    print("max |bridge - transformers| logits:", d)
    for k, v in out.items():
        print(k, tuple(v.shape), v.flatten()[:6].tolist())


if __name__ == "__main__":
    main()
