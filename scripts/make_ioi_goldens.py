#!/usr/bin/env python3
"""Goldens for the IOI toolkit (`gpt2 ioi`, `gpt2::analysis::ioi`) on the `tiny-b` fixture,
computed with TransformerLens 3.9.

The dataset is `tests/fixtures/tiny-b/ioi_dataset.json`, written from `gpt2 ioi --format json`
(the command is in the file; `tests/ioi.rs` checks that the generator still makes exactly these
prompts). The fixture's tokenizer has 512 tokens and none of the paper's names, so its names are
eight words that are one token after a space (" you", " they", ...): the model is random, so the
point is not IOI behaviour but that every number of the pipeline (tokenising, the IO and S
tokens, the ABC prompts, each experiment over prompts of several lengths and templates) equals
TransformerLens. For each prompt (clean = IOI, corrupted = ABC, metric logit(IO) - logit(S) at
the last position), then averaged over the prompts:

  * the clean and ABC logit differences and the fraction where IO > S;
  * head patching: `patching.get_act_patch_attn_head_out_all_pos(model, abc, ioi_cache, metric)`;
  * path patching from each head to the logits and to the name movers' queries: the hooks of
    make_path_patching_goldens.py (ARENA's `get_path_patch_head_to_*`);
  * mean ablation: the ablated heads' `hook_z` replaced by their mean over the ABC prompts of the
    same template and token length, position by position (ARENA's `compute_means_by_template`).

    TQDM_DISABLE=1 /work/venvs/tl/bin/python scripts/make_ioi_goldens.py
"""
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformer_lens import patching
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_path_patching_goldens import hooked, path_patch  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-b"


def heads(spec):
    return [tuple(int(x) for x in h.split(".")) for h in spec]


def main():
    spec = json.loads((FIXTURE / "ioi_dataset.json").read_text())
    tok = GPT2TokenizerFast.from_pretrained(FIXTURE)
    hf = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    model = hooked(hf)
    movers, ablate = heads(spec["name_movers"]), heads(spec["ablate"])
    prompts = spec["dataset"]
    n = len(prompts)
    out, sums = {}, {}
    clean_diffs, abc_diffs, ablated_diffs = [], [], []
    # The ABC prompts' hook_z summed by (template, length).
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    groups = {}
    with torch.no_grad():
        runs = []
        for p in prompts:
            clean = torch.tensor([tok(p["text"]).input_ids])
            abc = torch.tensor([tok(p["corrupted"]).input_ids])
            assert clean.shape == abc.shape, p
            (io,), (s,) = tok(" " + p["io"]).input_ids, tok(" " + p["s"]).input_ids

            def metric(logits, io=io, s=s):
                return logits[0, -1, io] - logits[0, -1, s]

            runs.append((p, clean, abc, metric))
            _, cache = model.run_with_cache(abc, names_filter=lambda name: name in z_names)
            key = (p["template"], abc.shape[1])
            count, zs = groups.get(key, (0, None))
            zs = [cache[z] for z in z_names] if zs is None else [
                a + cache[z] for a, z in zip(zs, z_names)]
            groups[key] = (count + 1, zs)
        for p, clean, abc, metric in runs:
            clean_diffs.append(float(metric(model(clean))))
            abc_diffs.append(float(metric(model(abc))))
            _, cache = model.run_with_cache(clean)
            parts = {
                "heads": patching.get_act_patch_attn_head_out_all_pos(
                    model, abc, cache, metric).float(),
                "path_logits": path_patch(model, clean, abc, "heads", "logits", metric),
                "path_queries": path_patch(model, clean, abc, "heads", "q", metric,
                                           receivers=movers),
            }
            for k, v in parts.items():
                sums[k] = sums.get(k, 0) + v / n
            count, zs = groups[(p["template"], clean.shape[1])]

            def mean_ablate(z, hook, zs=zs, count=count):
                for l, h in ablate:
                    if hook.layer() == l:
                        z[:, :, h] = zs[l][:, :, h] / count
                return z

            logits = model.run_with_hooks(
                clean, fwd_hooks=[(lambda name: name in z_names, mean_ablate)])
            ablated_diffs.append(float(metric(logits)))

    def summary(diffs):
        d = torch.tensor(diffs, dtype=torch.float64)
        return torch.stack([d.mean(), (d > 0).double().mean()]).float()

    out["clean"] = summary(clean_diffs)
    out["corrupted"] = summary(abc_diffs)
    out["ablated"] = summary(ablated_diffs)
    out["per_prompt"] = torch.tensor(clean_diffs)
    out.update(sums)
    out = {k: v.detach().float().clone().contiguous() for k, v in out.items()}
    save_file(out, str(FIXTURE / "ioi.safetensors"))
    (FIXTURE / "ioi.json").write_text(json.dumps({
        "dataset": "ioi_dataset.json", "prompts": n,
        "keys": {"clean, corrupted, ablated": "[mean logit(IO) - logit(S), fraction IO > S]",
                 "heads": "head patching, mean over prompts [layer, head]",
                 "path_logits, path_queries": "path patching, mean over prompts [layer, head]"},
        "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
    }, indent=1) + "\n")
    for k in sorted(out):
        print(k, tuple(out[k].shape), out[k].flatten()[:4].tolist())


if __name__ == "__main__":
    main()
