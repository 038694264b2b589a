#!/usr/bin/env python3
"""Goldens for activation patching (`gpt2 patch`, `gpt2::analysis::patching`), computed by
TransformerLens on the committed `tiny` fixture:

  * the `HookedTransformer` is built offline from a `HookedTransformerConfig` matching the
    fixture's config.json and TransformerLens' own GPT-2 weight conversion
    (`transformer_lens.pretrained.weight_conversions.convert_gpt2_weights`, fed the transformers
    model) loaded with `load_and_process_state_dict(fold_ln=False, center_writing_weights=False,
    center_unembed=False, fold_value_biases=False)`: every processing step that would change
    the activations at the hook points is off, so `hook_q/k/v/z` hold what GPT-2 computes;
  * `run_with_cache` on the clean prompt: the activations at the hook names our
    `run_with_cache` serves;
  * every `transformer_lens.patching.get_act_patch_*` function the CLI maps to, on the logit
    difference at the last position (target minus against), plus, for `--by layer`,
    `generic_activation_patch` with a setter that patches the whole activation; and
    `resid_pre` and `attn_head_out_all_pos` on the logit, probability and loss metrics.

Writes tests/fixtures/tiny/patching.safetensors and patching.json (< 100 kB).

A dataset (`gpt2 patch --pairs`): the pairs of DATASET, written as
tests/fixtures/tiny/patching_pairs.jsonl (the first line leaves its target and against to
`--target " s" --against " the"`), patched as one batch as the TransformerLens IOI demos do,
with the metric the batch's mean logit difference (each prompt its own target and against);
the results are the `dataset.*` keys of patching.safetensors.

And goldens for direct logit attribution (`gpt2 attribute`), tests/fixtures/tiny/
attribution.safetensors and attribution.json: on the clean prompt, at two positions and for two
target tokens, TransformerLens' own recipe on a model processed as `from_pretrained` does
(`fold_ln` and `center_writing_weights` on, so `W_U` carries `ln_final`'s scale and `b_U` its
bias) except `center_unembed` (it shifts every token's logit by the mean over the vocabulary,
which a logit difference cancels but a single token's logit does not) and `fold_value_biases`
(it moves each head's `b_V · W_O[h]` into the layer's `b_O`; GPT-2's heads write it):

  * heads: `cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=p), tokens=t,
    pos_slice=p)` (`stack_head_results` + `apply_ln_to_stack` + `tokens_to_residual_directions`,
    as `residual_stack_to_logit_diff` in the DLA demos), [layer * head];
  * embeddings and MLPs: the same on `cache.decompose_resid(layer=-1, pos_slice=p)`, whose
    `attn_out` parts are each layer's heads plus its `b_O`;
  * with `incorrect_tokens`, the logit difference of the two targets;
  * the bias `b_U[t]` (`ln_final`'s bias, folded) and the model's logit.
Each is checked against the same recipe by hand on the unprocessed model (`ln_final.w` applied
to the direction), so the processing changes nothing but where `ln_final`'s weights live.

    python3 -m venv /work/venvs/tl && /work/venvs/tl/bin/pip install 'transformer-lens<4'
    TQDM_DISABLE=1 /work/venvs/tl/bin/python scripts/make_patching_goldens.py

(TransformerLens 4 removed `HookedTransformer`; this was made with 3.9.)
"""
import json
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig, patching
from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
from transformers import GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "tiny"
CLEAN = "The cat sat on the mat. The cat"
CORRUPTED = "The dog sat on the mat. The dog"
TARGET, AGAINST = " s", " the"
# (clean, corrupted, target, against): every prompt 13 tokens.
DATASET = [
    (CLEAN, CORRUPTED, TARGET, AGAINST),
    ("The cow sat on the mat. The cow", "The rat sat on the mat. The rat", " s", " r"),
    ("The cat ran to the mat. The cat", "The dog ran to the mat. The dog", " r", " s"),
]


def hooked(hf, fold_ln=False, center_writing_weights=False):
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, dtype=torch.float32, device="cpu")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=fold_ln,
        center_writing_weights=center_writing_weights, center_unembed=False,
        fold_value_biases=False)
    return model.eval()


def main():
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    clean_ids, corrupted_ids = tok.encode(CLEAN).ids, tok.encode(CORRUPTED).ids
    assert len(clean_ids) == len(corrupted_ids), (clean_ids, corrupted_ids)
    (target,), (against,) = tok.encode(TARGET).ids, tok.encode(AGAINST).ids
    hf = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    model = hooked(hf)
    clean, corrupted = torch.tensor([clean_ids]), torch.tensor([corrupted_ids])
    out = {}
    with torch.no_grad():
        # The HookedTransformer is the fixture's model.
        d = float((model(clean) - hf(clean).logits).abs().max())
        assert d < 1e-4, d
        _, cache = model.run_with_cache(clean)
        names = ["hook_embed", "hook_pos_embed"] + [
            f"blocks.{l}.{h}" for l in range(model.cfg.n_layers)
            for h in ["hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                      "attn.hook_z", "attn.hook_pattern", "hook_attn_out", "hook_mlp_out",
                      "hook_resid_post"]]
        for n in names:
            out[f"cache.{n}"] = cache[n].contiguous()

        def at_last(logits):
            return logits[0, -1]

        metrics = {
            "logit_diff": lambda l: at_last(l)[target] - at_last(l)[against],
            "logit": lambda l: at_last(l)[target],
            "prob": lambda l: at_last(l).softmax(-1)[target],
            "loss": lambda l: -at_last(l).log_softmax(-1)[target],
        }
        for name, m in metrics.items():
            out[f"{name}.clean"] = m(model(clean)).reshape(1)
            out[f"{name}.corrupted"] = m(model(corrupted)).reshape(1)
        runs = {
            "resid_pre": patching.get_act_patch_resid_pre,
            "attn_out": patching.get_act_patch_attn_out,
            "mlp_out": patching.get_act_patch_mlp_out,
            "attn_head_out_all_pos": patching.get_act_patch_attn_head_out_all_pos,
            "attn_head_q_all_pos": patching.get_act_patch_attn_head_q_all_pos,
            "attn_head_k_all_pos": patching.get_act_patch_attn_head_k_all_pos,
            "attn_head_v_all_pos": patching.get_act_patch_attn_head_v_all_pos,
            "attn_head_pattern_all_pos": patching.get_act_patch_attn_head_pattern_all_pos,
            "attn_head_out_by_pos": patching.get_act_patch_attn_head_out_by_pos,
            "attn_head_q_by_pos": patching.get_act_patch_attn_head_q_by_pos,
            "attn_head_k_by_pos": patching.get_act_patch_attn_head_k_by_pos,
            "attn_head_v_by_pos": patching.get_act_patch_attn_head_v_by_pos,
            "attn_head_pattern_by_pos": patching.get_act_patch_attn_head_pattern_by_pos,
            "attn_head_all_pos_every": patching.get_act_patch_attn_head_all_pos_every,
            "attn_head_by_pos_every": patching.get_act_patch_attn_head_by_pos_every,
            "block_every": patching.get_act_patch_block_every,
        }
        # --by layer: the whole activation of a layer, every position.
        for act in ["resid_pre", "attn_out", "mlp_out"]:
            runs[f"{act}_layer"] = partial(
                patching.generic_activation_patch,
                patch_setter=lambda corrupted_act, index, clean_act: clean_act.clone(),
                activation_name=act, index_axis_names=("layer",))
        for name, f in runs.items():
            out[f"logit_diff.{name}"] = f(model, corrupted, cache, metrics["logit_diff"]).float()
        for metric in ["logit", "prob", "loss"]:
            for name in ["resid_pre", "attn_head_out_all_pos"]:
                out[f"{metric}.{name}"] = runs[name](model, corrupted, cache,
                                                     metrics[metric]).float()
        out.update(dataset(tok, model))
    out = {k: v.detach().clone().contiguous() for k, v in out.items()}
    save_file(out, str(FIXTURE / "patching.safetensors"))
    (FIXTURE / "patching.json").write_text(json.dumps({
        "clean": CLEAN, "corrupted": CORRUPTED, "clean_ids": clean_ids,
        "corrupted_ids": corrupted_ids, "target": TARGET, "against": AGAINST,
        "target_id": target, "against_id": against, "position": len(clean_ids) - 1,
        "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
        "processing": "fold_ln, center_writing_weights, center_unembed, fold_value_biases off",
    }, indent=1) + "\n")
    print("max |TL - transformers| logits:", d)
    for k in sorted(out):
        if k.startswith("logit_diff."):
            print(k, tuple(out[k].shape))


def dataset(tok, model):
    """DATASET as one batch, measured by the mean logit difference, as the IOI demos do."""
    enc = lambda text: tok.encode(text).ids
    clean = torch.tensor([enc(c) for c, _, _, _ in DATASET])
    corrupted = torch.tensor([enc(c) for _, c, _, _ in DATASET])
    target = torch.tensor([enc(t)[0] for _, _, t, _ in DATASET])
    against = torch.tensor([enc(a)[0] for _, _, _, a in DATASET])
    rows = torch.arange(len(DATASET))

    def mean_logit_diff(logits):
        return (logits[rows, -1, target] - logits[rows, -1, against]).mean()

    _, cache = model.run_with_cache(clean)
    out = {
        "dataset.clean": mean_logit_diff(model(clean)).reshape(1),
        "dataset.corrupted": mean_logit_diff(model(corrupted)).reshape(1),
    }
    for name in ["resid_pre", "attn_head_out_all_pos", "attn_head_pattern_by_pos"]:
        f = getattr(patching, f"get_act_patch_{name}")
        out[f"dataset.{name}"] = f(model, corrupted, cache, mean_logit_diff).float()
    lines = []
    for i, (c, k, t, a) in enumerate(DATASET):
        line = {"clean": c, "corrupted": k}
        if i > 0:
            line.update(target=t, against=a)
        lines.append(json.dumps(line))
    (FIXTURE / "patching_pairs.jsonl").write_text("\n".join(lines) + "\n")
    return out


def attribution():
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    ids = tok.encode(CLEAN).ids
    targets = [tok.encode(TARGET).ids[0], tok.encode(AGAINST).ids[0]]
    positions = [len(ids) - 1, 3]
    hf = GPT2LMHeadModel.from_pretrained(FIXTURE, attn_implementation="eager",
                                         torch_dtype=torch.float32).eval()
    plain = hooked(hf)
    folded = hooked(hf, fold_ln=True, center_writing_weights=True)
    x = torch.tensor([ids])
    out = {}
    with torch.no_grad():
        d = float((folded(x) - hf(x).logits).abs().max())
        assert d < 1e-4, d
        logits = hf(x).logits[0]
        _, cache = folded.run_with_cache(x)
        _, plain_cache = plain.run_with_cache(x)
        # [layer * head, batch, pos, d_model], computed once (a second call only warns).
        all_heads = cache.stack_head_results(layer=-1)
        plain_heads = plain_cache.stack_head_results(layer=-1)
        for p in positions:
            heads = all_heads[:, :, p]
            resid, labels = cache.decompose_resid(layer=-1, pos_slice=p, return_labels=True)
            assert labels[:2] == ["embed", "pos_embed"], labels
            for t in targets:
                key = f"pos{p}.target{t}"
                h = cache.logit_attrs(heads, tokens=t, pos_slice=p)[:, 0]
                r = cache.logit_attrs(resid, tokens=t, pos_slice=p)[:, 0]
                n, nh = folded.cfg.n_layers, folded.cfg.n_heads
                out[f"{key}.heads"] = h.reshape(n, nh)
                out[f"{key}.embed"] = r[0:1]
                out[f"{key}.pos_embed"] = r[1:2]
                out[f"{key}.attn_out"] = r[2::2]
                out[f"{key}.mlp_out"] = r[3::2]
                out[f"{key}.bias"] = folded.b_U[t].reshape(1)
                out[f"{key}.logit"] = logits[p, t].reshape(1)
                # The parts and the bias are the logit.
                total = float(r.sum() + folded.b_U[t])
                assert abs(total - float(logits[p, t])) < 1e-4, (total, logits[p, t])
                # The same by hand on the unprocessed model: centre, divide by ln_final's
                # scale, then the direction ln_final.w * W_U[:, t].
                direction = plain.ln_final.w * plain.W_U[:, t]
                by_hand = (plain_cache.apply_ln_to_stack(
                    plain_heads[:, :, p], layer=-1, pos_slice=p)[:, 0] * direction).sum(-1)
                assert (by_hand - h).abs().max() < 1e-5, (by_hand, h)
            a, b = targets
            out[f"pos{p}.diff{a}_{b}.heads"] = cache.logit_attrs(
                heads, tokens=a, incorrect_tokens=b, pos_slice=p)[:, 0].reshape(n, nh)
    out = {k: v.detach().float().clone().contiguous() for k, v in out.items()}
    save_file(out, str(FIXTURE / "attribution.safetensors"))
    (FIXTURE / "attribution.json").write_text(json.dumps({
        "prompt": CLEAN, "token_ids": ids, "targets": targets, "positions": positions,
        "transformer_lens": version("transformer-lens"), "torch": torch.__version__,
        "processing": "fold_ln, center_writing_weights on; center_unembed, "
                      "fold_value_biases off",
        "recipe": "cache.logit_attrs(cache.stack_head_results(-1, pos_slice=p) | "
                  "cache.decompose_resid(-1, pos_slice=p), tokens=t, pos_slice=p)",
    }, indent=1) + "\n")
    print("attribution: max |TL folded - transformers| logits:", d, "keys:", len(out))


if __name__ == "__main__":
    main()
    attribution()
