#!/usr/bin/env python3
"""Train tests/fixtures/induction/: a tiny trained GPT-2 with a real previous-token + induction pair.

The checkpoint is a transformers GPT2LMHeadModel (vocab 512, <|endoftext|> = 511, n_positions
128, n_embd 64, 2 layers, 2 heads of size 32, n_inner 64, gelu_new, tied embeddings, f32) saved
with save_pretrained (`transformer.` prefixed names), plus the 512-token tokenizer of
tests/fixtures/tiny and heads.json (expected heads, scores, ablation losses, versions).
The script scores every head the way `gpt2 inspect-heads --scores` does (src/inspect/scores.rs:
mean over rows that have keys of the row's attention on the pattern's keys; duplicate-token and
induction on the exact splitmix64 sequence of REPEAT_SEED, 50 ids twice, with and without a BOS),
zero-ablates each head before c_proj, checks the result and only then writes the folder.

Run:  /opt/pyref/bin/python scripts/train_heads.py            (about 3 minutes on 2 idle cores)
      --no-save to train and check only, --out DIR to write elsewhere, --verbose for head
      scores while training.

Recipe that worked (the defaults):
  * Data: each row is 128 tokens of uniform random filler (ids 0..510) holding ONE segment of
    4..60 distinct random ids that appears twice, after a random gap, at a random offset; half
    of the rows start with <|endoftext|>.  No auxiliary task, no fixed layout.
  * Loss weight 1 on the tokens of the second copy that induction can predict (all but its first
    token), 0.1 on every other token (pure noise: full weight on them drowns the signal).
  * 2 heads per layer (head size 32: a 16-wide head matches 511 random ids poorly), batch 16,
    AdamW lr 3e-3 (betas 0.9/0.98, wd 0.01, grad clip 1), 300 warmup steps, constant lr until
    70% of the 5000 steps, then cosine decay to 10%; no dropout.
  * The classic two-step formation then happens abruptly around step 2500-3000: a layer-0 head
    becomes a previous-token head and a layer-1 head an induction head that reads it (ablating
    that layer-0 head breaks induction), the other layer-1 head stays unspecialised.

What did not work (all under the same model unless said):
  * The same data with 4 heads, cosine lr decay from the start and full weight on the filler:
    nothing at all within 600-1000 steps (loss stuck at log 511).
  * Mixing in the exact `--scores` layout (50 ids twice from the start, 25% of rows): layer-0
    heads learned a positional shortcut, attention to q-49; they "score" 0.6 as induction heads
    but the no-repeat control is just as high.
  * An auxiliary skip-bigram filler (a token copies the one two back, x[t] = x[t-2]) to force a
    previous-token head: layer-0 previous-token heads (0.8-0.9) within ~600 steps, but no
    induction head in 2000+ more steps.  Their OV circuit writes the previous token in the
    unembedding (= embedding, tied) directions, so layer 1 cannot tell "this key follows an a"
    from "this key is an a".  Switching the task off after 600 steps lost the previous-token
    pattern within 250 steps; a random permutation instead of the copy learned too slowly.
  * Dense rows (many short segments, each 2-3 times): worse than uniform on the second copy.
  * A short-context curriculum (T 32 -> 64 -> 128, random position offsets), lr 1e-2, or a
    larger init (std 0.06): no help.
  * Filler weight 0.2 with cosine decay from the start (4000 steps): the transition started
    only at ~3000 steps and both layer-1 heads drifted toward induction (0.30 / 0.40).
"""
import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parent.parent
VOCAB, EOS = 512, 511
T_TRAIN = 128
REPEAT_LEN = 50                 # as in src/inspect/scores.rs
REPEAT_SEED = 0x5EED1D0C        # REPEAT_SEED in src/inspect/scores.rs
MASK64 = (1 << 64) - 1
TEXT_PROMPTS = ["The cat sat on the mat. The cat",
                "In 1969 two astronauts walked on the Moon; millions watched it live on TV."]
THRESHOLDS = [("induction", 0.4), ("previous-token", 0.5), ("duplicate-token", 0.4),
              ("first-token", 0.5)]


# ----------------------------------------------------------------------------- the sequences
def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def rust_repeated_tokens(length=REPEAT_LEN, seed=REPEAT_SEED, skip=(EOS,)):
    """repeated_random_tokens() of src/inspect/scores.rs: the exact sequence `--scores` uses."""
    state, seen, once = seed, set(), []
    while len(once) < length:
        state, z = splitmix64(state)
        i = z % VOCAB
        if i not in skip and i not in seen:
            seen.add(i)
            once.append(i)
    return once + once


def make_batch(rng, batch, T, min_len, max_len, p_skip, args):
    """(ids, position_ids, loss weights) of `batch` rows of length T.

    Filler: uniform random tokens over 0..510, where with probability p_skip a token copies the
    one two places back (x[t] = x[t-2]: predicting it needs the previous token's identity, a
    direct signal for a previous-token head).  Into it goes one segment of distinct random
    tokens (length min_len..max_len), repeated once after a random gap at a random place; with
    probability p_ss (rows of T >= 101 only) it is instead the exact `--scores` layout, 50 tokens
    twice in a row, at a random start.  With probability p_bos the row starts with
    <|endoftext|> at position 0; other rows of T < 128 sit at a random position offset so that
    every position embedding is trained.  Loss weight 1 on the second copy (from its second
    token: the first cannot be predicted), w_other elsewhere."""
    x = rng.integers(0, EOS, size=(batch, T))
    w = np.full((batch, T), args.w_other, dtype=np.float32)  # weight of target x[t]
    pos = np.tile(np.arange(T), (batch, 1))
    if p_skip > 0:
        hit = rng.random((batch, T)) < p_skip
        hit[:, :2] = False
        for t in range(2, T):
            x[:, t] = np.where(hit[:, t], x[:, t - 2], x[:, t])
        w[hit] = args.w_skip
    for b in range(batch):
        start = 0
        if rng.random() < args.p_bos:
            x[b, 0] = EOS
            start = 1
        else:
            pos[b] += int(rng.integers(0, T_TRAIN - T + 1))
        room = T - start
        if room >= 2 * REPEAT_LEN and rng.random() < args.p_ss:
            L, gap = REPEAT_LEN, 0
        else:
            L = int(rng.integers(min_len, min(max_len, room // 2) + 1))
            gap = int(rng.integers(0, room - 2 * L + 1))
        s1 = start + int(rng.integers(0, room - 2 * L - gap + 1))
        s2 = s1 + L + gap
        seg = rng.choice(EOS, size=L, replace=False)
        x[b, s1:s1 + L] = seg
        x[b, s2:s2 + L] = seg
        w[b, s1:s2 + 1] = args.w_other
        w[b, s2 + 1:s2 + L] = 1.0
        if s2 + L < T:
            w[b, s2 + L] = args.w_other
    return torch.from_numpy(x), torch.from_numpy(pos), torch.from_numpy(w)


# ----------------------------------------------------------------------------- the scores
def pattern_score(A, keys):
    """Mean over rows with keys of the fraction of the row's attention on them (Pattern::score)."""
    vals = []
    for q, ks in enumerate(keys):
        if ks:
            vals.append(float(A[q, ks].sum() / A[q].sum()))
    return float(np.mean(vals)) if vals else None


def prev_keys(t):
    return [[q - 1] if q > 0 else [] for q in range(t)]


def first_keys(t):
    return [[0] if q > 0 else [] for q in range(t)]


def dup_keys(ids):
    return [[k for k in range(q) if ids[k] == ids[q]] for q in range(len(ids))]


def ind_keys(ids):
    return [[k + 1 for k in range(q) if ids[k] == ids[q]] for q in range(len(ids))]


@torch.no_grad()
def attentions(model, ids):
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    out = model(torch.tensor([ids]), output_attentions=True)
    model.set_attn_implementation(impl)
    return [a[0].numpy().astype(np.float64) for a in out.attentions]  # per layer (H, T, T)


def label(s):
    vals = {"induction": s["induction"], "previous-token": s["prev"],
            "duplicate-token": s["dup"], "first-token": s["first"]}
    for name, th in THRESHOLDS:
        if vals[name] is not None and vals[name] >= th:
            return name
    return "other"


def head_scores(model, prompt_ids, bos):
    """Scores like `inspect-heads --scores` (prompt for prev/first, repeated for dup/induction),
    plus the repeated sequence's previous-token score and the no-repeat control."""
    rep = ([EOS] if bos else []) + rust_repeated_tokens()
    off = 1 if bos else 0
    rng = np.random.default_rng(7)
    ctrl = ([EOS] if bos else []) + [int(i) for i in rng.choice(EOS, size=2 * REPEAT_LEN, replace=False)]
    ap, ar, ac = attentions(model, prompt_ids), attentions(model, rep), attentions(model, ctrl)
    # control: attention from q in the second half to q - 49, where the induction target would be
    ctrl_keys = [[q - REPEAT_LEN + 1] if q >= off + REPEAT_LEN else [] for q in range(len(ctrl))]
    res = {}
    for l in range(len(ap)):
        for h in range(ap[l].shape[0]):
            s = dict(prev=pattern_score(ap[l][h], prev_keys(len(prompt_ids))),
                     first=pattern_score(ap[l][h], first_keys(len(prompt_ids))),
                     dup=pattern_score(ar[l][h], dup_keys(rep)),
                     induction=pattern_score(ar[l][h], ind_keys(rep)),
                     prev_on_repeated=pattern_score(ar[l][h], prev_keys(len(rep))),
                     control=pattern_score(ac[l][h], ctrl_keys))
            s["label"] = label(s)
            res[f"{l}.{h}"] = s
    return res


def print_scores(title, res):
    print(f"\n{title}")
    print(f"{'head':>5} {'prev':>6} {'first':>6} {'dup':>6} {'induct':>7} {'prev@rep':>9} {'control':>8}  label")
    for k, s in res.items():
        f = lambda v: "-" if v is None else f"{v:.3f}"
        print(f"{k:>5} {f(s['prev']):>6} {f(s['first']):>6} {f(s['dup']):>6} {f(s['induction']):>7} "
              f"{f(s['prev_on_repeated']):>9} {f(s['control']):>8}  {s['label']}")


# ----------------------------------------------------------------------------- ablation
@torch.no_grad()
def second_copy_loss(model, n_seqs=200, seed=11, bos=False, ablate=None):
    """Mean loss on predicting the second copy (tokens 2..50 of it, i.e. those induction can
    predict) of `n_seqs` random 50-token sequences repeated twice, with head `ablate` = (l, h)
    zeroed before c_proj."""
    cfg = model.config
    hs = cfg.n_embd // cfg.n_head
    handle = None
    if ablate is not None:
        l, h = ablate

        def hook(_mod, inp):
            x = inp[0].clone()
            x[..., h * hs:(h + 1) * hs] = 0
            return (x,)
        handle = model.transformer.h[l].attn.c_proj.register_forward_pre_hook(hook)
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_seqs):
        seg = rng.choice(EOS, size=REPEAT_LEN, replace=False)
        seqs.append(([EOS] if bos else []) + list(seg) + list(seg))
    x = torch.tensor(seqs)
    logits = model(x).logits
    off = 1 if bos else 0
    # targets: positions off+L+1 .. off+2L-1 predicted from the previous position
    q = torch.arange(off + REPEAT_LEN, off + 2 * REPEAT_LEN - 1)
    lp = torch.log_softmax(logits[:, q], -1)
    tgt = x[:, q + 1]
    loss = -lp.gather(-1, tgt[..., None]).mean().item()
    if handle:
        handle.remove()
    return loss


def ablation_table(model, bos=False):
    cfg = model.config
    tab = {"none": second_copy_loss(model, bos=bos)}
    for l in range(cfg.n_layer):
        for h in range(cfg.n_head):
            tab[f"{l}.{h}"] = second_copy_loss(model, bos=bos, ablate=(l, h))
    return tab


# ----------------------------------------------------------------------------- training
def train(args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=T_TRAIN, n_embd=args.n_embd, n_layer=2,
                     n_head=args.n_head, n_inner=args.n_inner, activation_function="gelu_new",
                     layer_norm_epsilon=1e-5, bos_token_id=EOS, eos_token_id=EOS,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, tie_word_embeddings=True,
                     initializer_range=args.init)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    phases = [tuple(int(v) for v in ph.split(":")[:5]) + (float(ph.split(":")[5]),)
              for ph in args.phases.split(",")]
    total = sum(ph[0] for ph in phases)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, betas=(0.9, 0.98))
    warm = args.warmup
    decay_from = int(total * args.decay_from)

    def lr_at(s):  # linear warmup, constant, cosine decay to 10% over the last steps
        d = max(0.0, (s - decay_from) / max(1, total - decay_from))
        return min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(d, 1.0))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.time()
    step = 0
    for n_steps, T, B, min_len, max_len, p_skip in phases:
        print(f"phase: {n_steps} steps of {B} x {T} tokens, segments {min_len}..{max_len}, "
              f"p_skip {p_skip}", flush=True)
        for _ in range(n_steps):
            model.train()
            x, pos, w = make_batch(rng, B, T, min_len, max_len, p_skip, args)
            logits = model(x, position_ids=pos).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1),
                                                    reduction="none")
            wt = w[:, 1:].reshape(-1)
            loss = (nll * wt).sum() / wt.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % args.log_every == 0 or step == total - 1:
                model.eval()
                msg = f"step {step:5d} loss {loss.item():.3f} 2nd-copy {second_copy_loss(model, n_seqs=32):.3f}"
                if args.verbose:
                    r = head_scores(model, list(np.random.default_rng(3).integers(0, EOS, 60)), False)
                    msg += " | " + " ".join(f"{k}:p{s['prev']:.2f}/i{s['induction']:.2f}/d{s['dup']:.2f}"
                                            for k, s in r.items())
                print(msg, f"({time.time() - t0:.0f}s)", flush=True)
            step += 1
    model.eval()
    model.set_attn_implementation("eager")
    return model, time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/induction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="5000:128:16:4:60:0",
                    help="steps:T:batch:min_len:max_len:p_skip,... trained in order")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--decay-from", type=float, default=0.7,
                    help="fraction of the steps after which the learning rate decays")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--n-inner", type=int, default=64)
    ap.add_argument("--p-bos", type=float, default=0.5)
    ap.add_argument("--p-ss", type=float, default=0.0)
    ap.add_argument("--init", type=float, default=0.02)
    ap.add_argument("--w-other", type=float, default=0.1)
    ap.add_argument("--w-skip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--no-save", action="store_true", help="train and check only")
    ap.add_argument("--force", action="store_true", help="write the fixture even if checks fail")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, secs = train(args)
    print(f"\ntrained {args.phases} steps in {secs:.1f}s")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(REPO / "tests/fixtures/tiny/tokenizer.json"))
    rand_prompt = [int(i) for i in np.random.default_rng(3).integers(0, EOS, 60)]
    all_scores = {}
    for bos in (False, True):
        tag = "bos" if bos else "nobos"
        res = head_scores(model, ([EOS] if bos else []) + rand_prompt, bos)
        print_scores(f"[{tag}] prompt = 60 random tokens; dup/induction on the --scores sequence", res)
        all_scores[tag] = res
        for p in TEXT_PROMPTS:
            ids = ([EOS] if bos else []) + tok.encode(p).ids
            r = head_scores(model, ids, bos)
            print(f"  text prompt {p!r} ({len(ids)} tokens): prev " +
                  " ".join(f"{k}:{s['prev']:.2f}" for k, s in r.items()) +
                  " | labels " + " ".join(f"{k}:{s['label']}" for k, s in r.items()))
    abl = {tag: ablation_table(model, bos=(tag == "bos")) for tag in ("nobos", "bos")}
    for tag, tab in abl.items():
        print(f"\n[{tag}] loss on the second copy (200 random 50-token sequences), head zero-ablated:")
        for k, v in tab.items():
            print(f"  {k:>5} {v:.4f}  ({v - tab['none']:+.4f})")

    # ------------------------------------------------------------------ what the tests rely on
    n_head = model.config.n_head
    ref = all_scores["nobos"]
    induction = [k for k, s in ref.items() if s["induction"] >= 0.6]
    previous = [k for k, s in ref.items() if k.startswith("0.") and s["label"] == "previous-token"
                and s["prev"] >= 0.7]
    checks = []

    def check(ok, what):
        checks.append(ok)
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    print("\nchecks:")
    check(len(induction) == 1 and induction[0].startswith("1."),
          f"exactly one head with induction >= 0.6, in layer 1: {induction}")
    for tag, res in all_scores.items():
        others = [k for k, s in res.items() if k not in induction and s["label"] == "induction"]
        check(not others, f"[{tag}] no other head labelled induction: {others}")
        if induction:
            s = res[induction[0]]
            check(s["induction"] >= 0.6 and s["label"] == "induction",
                  f"[{tag}] {induction[0]} induction {s['induction']:.3f} >= 0.6")
            check(s["control"] < 0.25 * s["induction"],
                  f"[{tag}] no-repeat control {s['control']:.3f} far below induction {s['induction']:.3f}")
    check(bool(previous), f"a layer-0 previous-token head with prev >= 0.7 on random tokens: {previous}")
    if induction:
        ih = induction[0]
        for tag, tab in abl.items():
            rise = tab[ih] - tab["none"]
            other = max(tab[f"1.{h}"] - tab["none"] for h in range(n_head) if f"1.{h}" != ih)
            check(rise > 3 * max(other, 0.01),
                  f"[{tag}] ablating {ih} raises the loss by {rise:.3f}, > 3x any other layer-1 head "
                  f"({other:.3f})")
    if induction:
        tab = abl["nobos"]
        reads = max((k for k in tab if k.startswith("0.")), key=lambda k: tab[k])
        print(f"  [info] the layer-0 head whose ablation hurts most: {reads} "
              f"(+{tab[reads] - tab['none']:.3f}), previous-token score {ref[reads]['prev']:.3f}")
        check(reads in previous, f"{induction[0]} relies on a previous-token head ({reads})")
    ok = all(checks)
    if args.no_save:
        return
    if not ok and not args.force:
        raise SystemExit("checks failed: nothing written (use --force to write anyway)")

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    shutil.copyfile(REPO / "tests/fixtures/tiny/tokenizer.json", out / "tokenizer.json")
    key = lambda k: [int(v) for v in k.split(".")]
    heads = {
        "previous_token": [key(k) for k in previous],
        "induction": [key(k) for k in induction],
        "scores": {k: {m: (None if s[m] is None else round(s[m], 4))
                       for m in ("prev", "first", "dup", "induction", "control", "prev_on_repeated")}
                   | {"label": s["label"]}
                   for k, s in ref.items()},
        "scores_bos": {k: {m: (None if s[m] is None else round(s[m], 4))
                           for m in ("prev", "first", "dup", "induction", "control")} | {"label": s["label"]}
                       for k, s in all_scores["bos"].items()},
        "ablation_loss": {k: round(v, 4) for k, v in abl["nobos"].items()},
        "ablation_loss_bos": {k: round(v, 4) for k, v in abl["bos"].items()},
        "repeat_len": REPEAT_LEN,
        "repeat_seed": REPEAT_SEED,
        "prev_prompt": "60 random ids: numpy default_rng(3).integers(0, 511, 60)",
        "ablation": "zero the head's slice of the merged attention output before c_proj; mean loss "
                    "on tokens 2..50 of the second copy of 200 random 50-token sequences repeated "
                    "twice (numpy default_rng(11), distinct ids below 511)",
        "seed": args.seed,
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "no_save", "force", "verbose",
                                                                     "log_every", "threads")},
        "train_seconds": round(secs, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    (out / "heads.json").write_text(json.dumps(heads, indent=2) + "\n")
    # what was written reads back as the same model (the fixture, not the in-memory one, is tested)
    back = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    again = head_scores(back, rand_prompt, False)
    drift = max(abs(again[k][m] - ref[k][m]) for k in ref for m in ("prev", "dup", "induction", "control"))
    print(f"reloaded {out.name}: max score difference {drift:.2e}, "
          f"ablation none {second_copy_loss(back):.4f} vs {abl['nobos']['none']:.4f}")
    assert drift < 1e-4
    print(f"\nwrote {out}:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:20} {f.stat().st_size:>8} bytes")


if __name__ == "__main__":
    main()
