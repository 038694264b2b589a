#!/usr/bin/env python3
r"""Make a GPT-2-small-shaped checkpoint folder for scripts/bench.sh, and optionally its GGUFs.

    /opt/pyref/bin/python scripts/make_bench_model.py [--out DIR] [--gpt2-assets DIR] \
        [--gguf LLAMA_CPP_SOURCE_DIR --llama-quantize PATH/TO/llama-quantize]

The folder (default /work/bench/gpt2-small-random) holds `GPT2LMHeadModel(GPT2Config())` with
transformers' default init under a fixed seed (speed does not depend on the values) saved with
`save_pretrained(safe_serialization=True)`, plus GPT-2's real tokenizer: vocab.json / merges.txt
are GPT-2's encoder.json / vocab.bpe from the tiktoken-rs crate's assets/ (found in
~/.cargo/registry/src, or --gpt2-assets), and tokenizer.json written by GPT2TokenizerFast.
Legacy `attn.bias` / `attn.masked_bias` buffers are dropped from model.safetensors if present:
llama.cpp's converter rejects them.

With --gguf, llama.cpp's convert_hf_to_gguf.py (from that source tree; it finds its own gguf-py,
and needs only torch, numpy, pyyaml, tqdm, which /opt/pyref has) writes DIR/gguf/f32.gguf and
DIR/gguf/f16.gguf, and with --llama-quantize also q8_0.gguf, q4_0.gguf and q4_k.gguf quantized from f32.gguf.
bench.sh takes that folder as GGUF_DIR (its default). Built as in scripts/README.md:

    SRC=/work/bench/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
    /opt/pyref/bin/python scripts/make_bench_model.py --gguf $SRC \
        --llama-quantize /work/bench/llama-build/bin/llama-quantize

which runs, for T in f32 f16 and Q in q8_0 q4_0 q4_k:

    python $SRC/convert_hf_to_gguf.py OUT --outtype T --outfile OUT/gguf/T.gguf
    llama-quantize OUT/gguf/f32.gguf OUT/gguf/Q.gguf TYPE   (Q8_0, Q4_0, Q4_K_S: q4_K blocks with
                                                              token_embd in q6_K, as `--quantize
                                                              q4_k` keeps the LM head at 6 bits)
"""
import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast


def find_assets():
    hits = glob.glob(str(Path.home() / ".cargo/registry/src/*/tiktoken-rs-0.12.1/assets"))
    if not hits:
        sys.exit("no tiktoken-rs-0.12.1 in ~/.cargo/registry (run `cargo fetch`), or pass --gpt2-assets")
    return Path(hits[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/work/bench/gpt2-small-random"))
    ap.add_argument("--gpt2-assets", type=Path, help="dir with encoder.json and vocab.bpe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gguf", type=Path, metavar="LLAMA_CPP_SOURCE_DIR")
    ap.add_argument("--llama-quantize", type=Path, metavar="PATH")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    config = GPT2Config()
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    st = out / "model.safetensors"
    tensors = load_file(st)
    legacy = [k for k in tensors if k.endswith((".attn.bias", ".attn.masked_bias"))]
    if legacy:
        save_file({k: v for k, v in tensors.items() if k not in legacy}, st, metadata={"format": "pt"})
    # convert_hf_to_gguf.py reads the legacy `n_ctx` key; the value equals n_positions.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("n_ctx", cfg["n_positions"])
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

    assets = args.gpt2_assets or find_assets()
    (out / "vocab.json").write_bytes((assets / "encoder.json").read_bytes())
    (out / "merges.txt").write_bytes((assets / "vocab.bpe").read_bytes())
    # from_pretrained builds from vocab.json + merges.txt only when no tokenizer.json is there yet
    # (transformers 5's constructor ignores vocab_file / merges_file).
    (out / "tokenizer.json").unlink(missing_ok=True)
    tok = GPT2TokenizerFast.from_pretrained(out)
    assert len(tok) == config.vocab_size, len(tok)
    tok.save_pretrained(out)
    print(f"{out}: {len(tensors) - len(legacy)} tensors ({len(legacy)} legacy buffers dropped), "
          f"{st.stat().st_size / 1e6:.0f} MB, vocab {len(tok)}")

    if args.gguf:
        gdir = out / "gguf"
        gdir.mkdir(exist_ok=True)
        conv = args.gguf / "convert_hf_to_gguf.py"
        for t in ("f32", "f16"):
            subprocess.run([sys.executable, str(conv), str(out), "--outtype", t,
                            "--outfile", str(gdir / f"{t}.gguf")], check=True)
        if args.llama_quantize:
            for q, kind in (("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_k", "Q4_K_S")):
                subprocess.run([str(args.llama_quantize), str(gdir / "f32.gguf"),
                                str(gdir / f"{q}.gguf"), kind], check=True)
        for f in sorted(gdir.glob("*.gguf")):
            print(f"{f}: {f.stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
