#!/usr/bin/env python3
"""Perplexity goldens for tests/fixtures/{tiny,tiny-b}: transformers' documented sliding-window
recipe (https://huggingface.co/docs/transformers/perplexity), verbatim, on the committed fixture
checkpoints, for a fixed text and several strides. Writes tests/fixtures/<name>/perplexity.json.

    /opt/pyref/bin/python scripts/make_perplexity_goldens.py

Needs torch + transformers (scripts/requirements.txt); deterministic.
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way. In short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. 1775: 'a king with a large "
    "jaw and a queen with a plain face, on the throne of England' - café, naïve, 日本."
)


def recipe(model, input_ids, stride):
    """The documentation's loop, unchanged but for returning its pieces."""
    max_length = model.config.n_positions
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc, windows = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood.double() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        windows += 1
        if end_loc == seq_len:
            break
    avg = nll_sum / n_tokens
    return {"stride": stride, "perplexity": float(torch.exp(avg)), "mean_nll": float(avg),
            "weighted_tokens": n_tokens, "windows": windows}


def main():
    torch.manual_seed(0)
    for name in ["tiny", "tiny-b"]:
        d = REPO / "tests" / "fixtures" / name
        model = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager",
                                                torch_dtype=torch.float32).eval()
        if (d / "tokenizer.json").exists():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        else:
            tok = GPT2TokenizerFast.from_pretrained(d)
        ids = tok(TEXT, return_tensors="pt").input_ids
        n = model.config.n_positions
        results = [recipe(model, ids, s) for s in (n // 2, n // 4 + 3, n, 1 + n // 8)]
        out = {"text": TEXT, "tokens": ids.size(1), "token_ids": ids[0].tolist(),
               "n_positions": n, "results": results,
               "torch": torch.__version__, "transformers": transformers.__version__}
        (d / "perplexity.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(name, ids.size(1), "tokens", [(r["stride"], round(r["perplexity"], 4)) for r in results])


if __name__ == "__main__":
    main()
