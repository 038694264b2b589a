#!/usr/bin/env python3
"""Goldens for path patching (`gpt2 patch --path-to`, `gpt2::analysis::patching::path_patch`),
computed with TransformerLens hooks on the committed `tiny-b` fixture (3 layers, so a sender in
layer 0 reaches layer 2 through the residual stream and through MLPs 0 and 1).

TransformerLens 3.9 has no path-patching function (TransformerLens 4's
`patching.get_act_patch_direct_path` needs a `TransformerBridge` and patches one source head's
edge the other way round, MLPs frozen), so this is the IOI paper's algorithm (Wang et al. 2022,
appendix B) as ARENA's IOI exercises write it with `run_with_hooks`
(`get_path_patch_head_to_final_resid_post`, `get_path_patch_head_to_heads`), one sender at a
time, unbatched:

  1. cache the clean ("orig") and corrupted ("new") runs;
  2. run the clean prompt with every `attn.hook_z` frozen at the clean run's, the sender (a head's
     slice of `hook_z`, a layer's `hook_mlp_out`, or `hook_embed`) set to the corrupted run's;
     MLPs are recomputed. To the logits: measure this run. To heads: keep the receivers'
     `attn.hook_q|k|v`;
  3. (heads) run the clean prompt with only the receivers' `hook_q|k|v` heads replaced by step
     2's, and measure.

The model is built offline as in make_patching_goldens.py (TransformerLens' GPT-2 weight
conversion, no weight processing), with tiny-b's exact GELU and inverse-layer attention scale. Writes tests/fixtures/tiny-b/path_patching.safetensors
and path_patching.json.

    TQDM_DISABLE=1 /work/venvs/tl/bin/python scripts/make_path_patching_goldens.py
"""
import json
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "tiny-b"
CLEAN = "The cat sat on the mat. The cat"
CORRUPTED = "The dog sat on the mat. The dog"
TARGET, AGAINST = " s", " the"
# (clean, corrupted, target, against); a pair's prompts are one length, pairs may differ.
DATASET = [
    (CLEAN, CORRUPTED, TARGET, AGAINST),
    ("The cow sat on the mat. The cow", "The rat sat on the mat. The rat", " s", " r"),
    ("A cat ran to the big mat. The cat", "A dog ran to the big mat. The dog", " r", " s"),
]
# Receivers (layer, head) for each input, spread over layers 1 and 2.
RECEIVERS = {"q": [(2, 1), (1, 3)], "k": [(2, 0)], "v": [(2, 2), (2, 3), (1, 0)]}


def hooked(hf):
    """make_patching_goldens.py's model, with tiny-b's exact GELU and attention scaled by the
    inverse layer index (TransformerLens' config carries both)."""
    c = hf.config
    act = {"gelu": "gelu", "gelu_new": "gelu_new"}[c.activation_function]
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=act, normalization_type="LN", eps=c.layer_norm_epsilon,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, dtype=torch.float32, device="cpu")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False)
    return model.eval()


def senders(kind, cfg):
    if kind == "heads":
        return [("head", l, h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    if kind == "mlps":
        return [("mlp", l) for l in range(cfg.n_layers)]
    return [("embed",)]


def sender_hooks(sender, orig_cache, new_cache, freeze_mlps=False):
    """Step 2: every head's output frozen at the clean run, the sender from the corrupted (and,
    for the direct path alone, every MLP's output frozen too)."""
    def z_hook(z, hook):
        z[...] = orig_cache[hook.name]
        if sender[0] == "head" and hook.layer() == sender[1]:
            z[:, :, sender[2]] = new_cache[hook.name][:, :, sender[2]]
        return z

    hooks = [(lambda name: name.endswith("attn.hook_z"), z_hook)]
    if freeze_mlps:
        hooks.append((lambda name: name.endswith("hook_mlp_out"),
                      lambda act, hook: orig_cache[hook.name].clone()))
    if sender[0] == "mlp":
        hooks.append((f"blocks.{sender[1]}.hook_mlp_out",
                      lambda act, hook: new_cache[hook.name].clone()))
    if sender[0] == "embed":
        hooks.append(("hook_embed", lambda act, hook: new_cache[hook.name].clone()))
    return hooks


def path_patch(model, clean, corrupted, kind, to, metric, receivers=None, freeze_mlps=False):
    _, orig_cache = model.run_with_cache(clean)
    _, new_cache = model.run_with_cache(corrupted)
    out = []
    for sender in senders(kind, model.cfg):
        hooks = sender_hooks(sender, orig_cache, new_cache, freeze_mlps)
        if to == "logits":
            out.append(float(metric(model.run_with_hooks(clean, fwd_hooks=hooks))))
            continue
        receivers = receivers or RECEIVERS[to]
        names = {f"blocks.{l}.attn.hook_{to}" for l, _ in receivers}
        kept = {}

        def keep(act, hook):
            kept[hook.name] = act.clone()
            return act

        model.run_with_hooks(clean, fwd_hooks=hooks + [(lambda n: n in names, keep)])

        def patch(act, hook):
            heads = [h for l, h in receivers if l == hook.layer()]
            act[:, :, heads] = kept[hook.name][:, :, heads]
            return act

        logits = model.run_with_hooks(clean, fwd_hooks=[(lambda n: n in names, patch)])
        out.append(float(metric(logits)))
    shape = {"heads": (model.cfg.n_layers, model.cfg.n_heads), "mlps": (model.cfg.n_layers,),
             "embed": ()}[kind]
    return torch.tensor(out).reshape(shape)


def main():
    tok = GPT2TokenizerFast.from_pretrained(FIXTURE)
    enc = lambda text: tok(text).input_ids  # noqa: E731
    hf = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    model = hooked(hf)
    out = {}
    with torch.no_grad():
        clean, corrupted = torch.tensor([enc(CLEAN)]), torch.tensor([enc(CORRUPTED)])
        d = float((model(clean) - hf(clean).logits).abs().max())
        assert d < 1e-4, d
        (target,), (against,) = enc(TARGET), enc(AGAINST)

        def logit_diff(logits, t=target, a=against):
            return logits[0, -1, t] - logits[0, -1, a]

        def prob(logits):
            return logits[0, -1].softmax(-1)[target]

        out["clean"] = logit_diff(model(clean)).reshape(1)
        out["corrupted"] = logit_diff(model(corrupted)).reshape(1)
        out["prob.clean"] = prob(model(clean)).reshape(1)
        for to in ["logits", "q", "k", "v"]:
            for kind in ["heads", "mlps", "embed"]:
                out[f"{to}.{kind}"] = path_patch(model, clean, corrupted, kind, to, logit_diff)
        out["prob.logits.heads"] = path_patch(model, clean, corrupted, "heads", "logits", prob)
        # The direct path alone (MLPs frozen too).
        for to in ["logits", "q"]:
            for kind in ["heads", "mlps"]:
                out[f"direct.{to}.{kind}"] = path_patch(model, clean, corrupted, kind, to,
                                                        logit_diff, freeze_mlps=True)
        # At an earlier position (--position 5).
        at5 = lambda logits: logits[0, 5, target] - logits[0, 5, against]  # noqa: E731
        out["pos5.clean"] = at5(model(clean)).reshape(1)
        for kind in ["heads", "embed"]:
            out[f"pos5.logits.{kind}"] = path_patch(model, clean, corrupted, kind, "logits", at5)
        out["pos5.q.heads"] = path_patch(model, clean, corrupted, "heads", "q", at5)
        # A dataset: each pair on its own, the metric averaged over the pairs.
        sums = {}
        for c, k, t, a in DATASET:
            c, k = torch.tensor([enc(c)]), torch.tensor([enc(k)])
            assert c.shape == k.shape, (c, k)
            (t,), (a,) = enc(t), enc(a)
            metric = lambda logits, t=t, a=a: logit_diff(logits, t, a)  # noqa: E731
            parts = {"clean": metric(model(c)).reshape(1),
                     "corrupted": metric(model(k)).reshape(1)}
            for to in ["logits", "q"]:
                parts[f"{to}.heads"] = path_patch(model, c, k, "heads", to, metric)
            for key, v in parts.items():
                sums[key] = sums.get(key, 0) + v / len(DATASET)
        out.update({f"dataset.{k}": v for k, v in sums.items()})
    out = {k: v.detach().float().clone().contiguous() for k, v in out.items()}
    save_file(out, str(FIXTURE / "path_patching.safetensors"))
    (FIXTURE / "path_patching.json").write_text(json.dumps({
        "clean": CLEAN, "corrupted": CORRUPTED, "clean_ids": enc(CLEAN),
        "corrupted_ids": enc(CORRUPTED), "target": TARGET, "against": AGAINST,
        "target_id": target, "against_id": against,
        "receivers": {k: [f"{l}.{h}" for l, h in v] for k, v in RECEIVERS.items()},
        "dataset": [{"clean": c, "corrupted": k, "target": t, "against": a}
                    for c, k, t, a in DATASET],
        "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
        "processing": "fold_ln, center_writing_weights, center_unembed, fold_value_biases off",
        "algorithm": "Wang et al. 2022 appendix B as ARENA's get_path_patch_head_to_* "
                     "(hook_z frozen at the clean run, MLPs recomputed)",
    }, indent=1) + "\n")
    print("max |TL - transformers| logits:", d)
    for k in sorted(out):
        print(k, tuple(out[k].shape), out[k].flatten()[:4].tolist())


if __name__ == "__main__":
    main()
