#!/usr/bin/env python3
"""Generate the committed test fixtures under tests/fixtures/ (deterministic).

What it makes:
  * A 512-token byte-level BPE tokenizer that behaves exactly like GPT-2's on a
    truncated vocabulary: ids 0..255 are GPT-2's byte tokens, ids 256..510 are
    GPT-2's tokens 256..510 (the results of its first 255 merges), and id 511 is
    the special `<|endoftext|>`.  Built from the real GPT-2 vocab/merges shipped
    in the tiktoken-rs crate.
  * tiny/    Hub layout (like openai-community/gpt2): tensor names without the
             `transformer.` prefix, no lm_head (tied to wte), plus the legacy
             `h.{i}.attn.bias` / `h.{i}.attn.masked_bias` buffers that old Hub
             files carry; gelu_new; tokenizer.json.
  * tiny-b/  save_pretrained layout: `transformer.`-prefixed names, untied
             lm_head.weight, exact (erf) gelu, n_inner set,
             scale_attn_by_inverse_layer_idx; vocab.json + merges.txt only.
  Each folder also gets goldens.safetensors + goldens.json computed with
  transformers (float32, eval, eager attention): batch logits, per-layer
  attention probabilities and 20 greedy tokens.

Why the weights are scaled: HF's default init (std 0.02, unit layer norms, zero
biases) gives near-uniform attention, tiny logits and a greedy loop that repeats
one token, so a port with a missing bias or a skipped layer norm would still
match.  Here projections get std 2/sqrt(fan_in), embeddings 3/sqrt(n_embd), layer
norms random gains in [0.5, 1.5) and every bias std 0.3 (logit std ~2-4, clearly
peaked attention); the script asserts that zeroing any single bias tensor or
turning any single layer norm into the identity changes the greedy ids, and
prints what misreading a few config fields would do.
"""
import argparse
import copy
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from safetensors import safe_open
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

REPO = Path(__file__).resolve().parent.parent
VOCAB, EOS, SEQ, NEW_TOKENS = 512, 511, 16, 20
TEXTS = ["Hello, world! It's 9:30 and the café is open, isn't it?",
         "In 1969 two astronauts walked on the Moon; millions watched it live on TV."]
PROMPT = "The cat sat on the mat because"
FIXTURES = {  # name -> (seed, config overrides)
    "tiny": (1234, dict(n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=None,
                        activation_function="gelu_new", layer_norm_epsilon=1e-5,
                        scale_attn_by_inverse_layer_idx=False)),
    "tiny-b": (4, dict(n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=96,
                       activation_function="gelu", layer_norm_epsilon=1e-6,
                       scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False)),
}


def gpt2_assets_dir():
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1"], cwd=REPO))
    pkg = next(p for p in meta["packages"] if p["name"] == "tiktoken-rs")
    return Path(pkg["manifest_path"]).parent / "assets"


# ---------------------------------------------------------------- tokenizer
def truncated_vocab(assets):
    """GPT-2 vocab/merges restricted to 511 regular tokens + <|endoftext|>."""
    full = json.loads((assets / "encoder.json").read_text(encoding="utf-8"))
    lines = (assets / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    all_merges = [tuple(l.split(" ")) for l in lines[1:] if l and not l.startswith("#")]
    inv = {i: t for t, i in full.items()}
    vocab = {inv[i]: i for i in range(EOS)}
    if any(full.get(a + b) != 256 + k for k, (a, b) in enumerate(all_merges[:EOS - 256])):
        # GPT-2's id order does not follow its merge order: use the first 255
        # merges' results as ids 256..510 instead.
        vocab = {inv[i]: i for i in range(256)}
        for a, b in all_merges[:EOS - 256]:
            vocab.setdefault(a + b, len(vocab))
    merges = [(a, b) for a, b in all_merges if a in vocab and b in vocab and a + b in vocab]
    results = {a + b for a, b in merges}
    assert sorted(vocab.values()) == list(range(EOS)), "ids must be dense"
    assert all(t in results for t, i in vocab.items() if i >= 256), "unreachable token"
    assert len(merges) == EOS - 256, len(merges)
    vocab["<|endoftext|>"] = EOS
    return vocab, merges


def build_tokenizer(vocab, merges):
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok


def write_vocab_merges(folder, vocab, merges):
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def check_tokenizer(tok, vocab, merges):
    with tempfile.TemporaryDirectory() as d:
        write_vocab_merges(Path(d), vocab, merges)
        hf = GPT2TokenizerFast.from_pretrained(d)  # the vocab.json + merges.txt path
    for s in TEXTS + [PROMPT, " héllo  wörld\n\t<|endoftext|>x", "日本語 🙂 don't"]:
        ids = tok.encode(s).ids
        assert ids == hf(s)["input_ids"], s
        assert tok.decode(ids, skip_special_tokens=False) == s, s
    assert tok.encode("a<|endoftext|>").ids[-1] == EOS


def exact_prefix(tok, text, n):
    """Shortest prefix of `text` that encodes to exactly n tokens, preferring one
    that ends at a word boundary."""
    ks = [k for k in range(1, len(text) + 1) if len(tok.encode(text[:k]).ids) == n]
    at_boundary = [k for k in ks if k == len(text) or text[k] == " "]
    if not ks:
        raise ValueError(f"no prefix of {text!r} has {n} tokens")
    return text[:(at_boundary or ks)[0]]


# ---------------------------------------------------------------- models
def make_model(seed, overrides):
    cfg = GPT2Config(vocab_size=VOCAB, bos_token_id=EOS, eos_token_id=EOS,
                     attn_implementation="eager", **overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("wte.weight", "wpe.weight")):
                std = 3 / cfg.n_embd ** 0.5
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                continue
            elif name.endswith("bias"):
                std = 0.3
            else:  # Conv1D weights are (in, out); nn.Linear lm_head is (out, in)
                std = 2 / (p.shape[1] if name.startswith("lm_head") else p.shape[0]) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_hub_layout(model, folder):
    """Hub layout: no `transformer.` prefix, no lm_head, legacy attn buffers."""
    n = model.config.n_positions
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight" and not re.search(r"\.attn\.(bias|masked_bias)$", k)}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def save_pretrained_layout(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    names = safetensor_names(folder / "model.safetensors")
    if "lm_head.weight" not in names or not any(k.startswith("transformer.") for k in names):
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    for f in folder.iterdir():
        if f.name not in ("config.json", "generation_config.json", "model.safetensors"):
            f.unlink()


def safetensor_names(path):
    with safe_open(path, "pt") as f:
        return sorted(f.keys())


# ---------------------------------------------------------------- goldens
def greedy(model, prompt_ids):
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=EOS)
    return out[:, prompt_ids.shape[1]:]


def greedy_manual(model, prompt_ids):
    out = model(prompt_ids, use_cache=True)
    ids = []
    for _ in range(NEW_TOKENS):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(nxt)
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(ids, 1)


def discrimination_table(model, prompt_ids, base):
    """Greedy ids changed by each single bias zeroed / layer norm made identity
    (all must change: asserted) and by a few config misreadings (informative)."""
    rows, params = [], dict(model.named_parameters())
    targets = [n for n in params if re.search(r"(c_attn|c_proj|c_fc)\.bias$", n)]
    targets += sorted({n.rsplit(".", 1)[0] for n in params if ".ln_" in n})
    for t in targets:
        saved = {k: v.clone() for k, v in params.items() if k.startswith(t + ".") or k == t}
        with torch.no_grad():
            for k in saved:  # a bias -> 0; a layer norm -> weight 1, bias 0
                params[k].fill_(1.0 if k.endswith(".weight") else 0.0)
            ids = greedy_manual(model, prompt_ids)
            for k, v in saved.items():
                params[k].copy_(v)
        rows.append((t if t.endswith("bias") else t + " := identity", ids, True))
    cfg = model.config
    for key, value in [("activation_function",
                        "gelu" if cfg.activation_function == "gelu_new" else "gelu_new"),
                       ("scale_attn_by_inverse_layer_idx", not cfg.scale_attn_by_inverse_layer_idx),
                       ("layer_norm_epsilon", 1e-5 if cfg.layer_norm_epsilon != 1e-5 else 1e-6)]:
        other = copy.deepcopy(cfg)
        setattr(other, key, value)
        variant = GPT2LMHeadModel(other).eval()
        variant.load_state_dict(model.state_dict())
        rows.append((f"config {key}={value}", greedy_manual(variant, prompt_ids), False))
    return [(label, int((ids != base).sum()), asserted) for label, ids, asserted in rows]


def attention_stats(attns):
    """Mean (over batch, heads, queries) of the max attention weight, vs uniform."""
    q = torch.arange(1, SEQ + 1, dtype=torch.float32)
    return [float(a.max(-1).values.mean()) for a in attns], float((1 / q).mean())


def make_fixture(name, seed, overrides, tok, vocab, merges, out_dir):
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(seed, overrides)
    if name == "tiny":
        model.save_pretrained(folder, safe_serialization=True)  # config + generation config
        save_hub_layout(model, folder)
        tok.save(str(folder / "tokenizer.json"), pretty=False)
        for f in ("vocab.json", "merges.txt"):
            (folder / f).unlink(missing_ok=True)
    else:
        save_pretrained_layout(model, folder)
        write_vocab_merges(folder, vocab, merges)
        (folder / "tokenizer.json").unlink(missing_ok=True)

    # Goldens come from the model as reloaded from disk, proving the files load.
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").float().eval()
    texts = [exact_prefix(tok, t, SEQ) for t in TEXTS]
    input_ids = torch.tensor([tok.encode(t).ids for t in texts])
    prompt_ids = torch.tensor([tok.encode(PROMPT).ids])
    hf_tok = GPT2TokenizerFast.from_pretrained(folder)  # the folder's own tokenizer files
    assert hf_tok(texts)["input_ids"] == input_ids.tolist()
    assert hf_tok(PROMPT)["input_ids"] == prompt_ids[0].tolist()
    with torch.no_grad():
        out = model(input_ids, output_attentions=True)
        gen = greedy(model, prompt_ids)
        manual = greedy_manual(model, prompt_ids)
        assert torch.equal(gen, manual), (gen, manual)
        ids = gen[0].tolist()
        assert len(set(ids)) > 1 and EOS not in ids, ids
        rows = discrimination_table(model, prompt_ids, gen)

    max_attn, uniform = attention_stats(out.attentions)
    print(f"\n== {name}: logits std {out.logits.std():.2f}, max |logit| "
          f"{out.logits.abs().max():.2f}; mean max attention per layer "
          f"{[round(a, 3) for a in max_attn]} (uniform would be {uniform:.3f})")
    print(f"   greedy ids: {ids}\n   {'perturbation':52s} greedy ids changed (of 20)")
    for t, d, asserted in rows:
        print(f"   {t:52s} {d:2d} {('ok' if d else 'FAIL') if asserted else '(info)'}")
    assert all(d for _, d, asserted in rows if asserted), f"{name}: a perturbation did not " \
        "change the greedy ids"
    assert all(a > uniform + 0.15 for a in max_attn), "attention too uniform"
    assert 1 < out.logits.std() < 5, "logit scale out of range"

    goldens = {"input_ids": input_ids, "logits": out.logits.float(),
               "greedy_prompt_ids": prompt_ids, "greedy_ids": gen}
    goldens.update({f"attn.{l}": a.float() for l, a in enumerate(out.attentions)})
    save_file({k: v.contiguous() for k, v in goldens.items()},
              folder / "goldens.safetensors", metadata={"format": "pt"})
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "seed": seed,
            "input_texts": texts, "prompt_text": PROMPT,
            "greedy_prompt_ids": prompt_ids[0].tolist(), "greedy_ids": ids,
            "max_abs_logit": round(float(out.logits.abs().max()), 4),
            "notes": "Made by scripts/make_fixtures.py: float32, eval, eager attention. "
                     "input_ids = tokenizer(input_texts) (2x16, no padding); attn.{l} = "
                     "output_attentions probabilities; greedy_ids = 20 new tokens of "
                     "generate(do_sample=False, min_new_tokens=20), equal to a plain "
                     "argmax loop with the KV cache."}
    (folder / "goldens.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(f"   tensors: {safetensor_names(folder / 'model.safetensors')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpt2-assets", type=Path, help="dir with encoder.json and vocab.bpe "
                    "(default: tiktoken-rs assets found via cargo metadata)")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    vocab, merges = truncated_vocab(args.gpt2_assets or gpt2_assets_dir())
    tok = build_tokenizer(vocab, merges)
    check_tokenizer(tok, vocab, merges)
    for name, (seed, overrides) in FIXTURES.items():
        make_fixture(name, seed, overrides, tok, vocab, merges, args.out)
    print("\nfixture files:")
    total = 0
    for f in sorted(p for p in args.out.rglob("*") if p.is_file()):
        total += f.stat().st_size
        print(f"   {f.relative_to(args.out)!s:32s} {f.stat().st_size:9,d}")
    print(f"   {'total':32s} {total:9,d}")


if __name__ == "__main__":
    main()
