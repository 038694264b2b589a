#!/usr/bin/env bash
# Side-by-side load test of OpenAI-compatible completion servers: `gpt2 serve` and llama.cpp's
# `llama-server -np N`, same checkpoint, threads, prompt length, max_tokens and greedy sampling,
# in interleaved rounds (this machine's speed drifts 30-50% between runs; interleaving spreads the
# drift over every configuration alike).
#
#   scripts/bench_serve.sh [MODEL_DIR]
#
# For each round, precision and concurrency C, each server in turn is started on a free port with
# C parallel sequences, waited for (GET /health), warmed up with one short untimed request, then
# loaded by C client threads that each send REQUESTS_PER_CLIENT streaming `POST /v1/completions`
# requests back to back, and stopped (SIGTERM, then SIGKILL after 10 s). Every request has its own
# prompt of exactly PROMPT_TOKENS token ids (seeded; different per request, so no server can reuse
# a cached prefix), `max_tokens` NEW_TOKENS, `temperature` 0 and the server's ignore-EOS field, so
# every request generates exactly NEW_TOKENS tokens (counted from the final chunk's `usage`, else
# from the number of chunks; a short completion is reported).
#
# Measured per (server, precision, C): aggregate generated tokens/s = all requests' completion
# tokens / wall time from the first request sent to the last stream ended (median [min-max] over
# rounds), and time to first token = from sending a request to its first SSE chunk with a choice
# (p50 / p99 pooled over all rounds' requests; with few requests p99 is close to the maximum).
# The client (stdlib Python: http.client + threads) shares the cores with the server, alike for both.
#
# Environment:
#   ROUNDS (3), THREADS (2), CONCURRENCY ("1 4 16"), PRECISIONS ("f32 q8_0"), PROMPT_TOKENS (128),
#   NEW_TOKENS (64), REQUESTS_PER_CLIENT (2), SERVERS ("gpt2 llama.cpp": which to run, in order)
#   GPT2_BIN      gpt2 binary (default target/release/gpt2, built here with cargo if missing);
#                 the gpt2 rows are skipped with a note when `$GPT2_BIN serve --help` fails
#   GPT2_SERVE_ARGS  extra arguments for `gpt2 serve` (e.g. "--kv-cache f16")
#   GPT2_BODY     JSON object merged into every gpt2 request (default {"ignore_eos": true})
#   LLAMA_SERVER  path to llama-server (no llama.cpp rows without it)
#   LLAMA_SERVER_ARGS extra arguments for llama-server
#   LLAMA_BODY    JSON merged into every llama-server request
#                 (default {"ignore_eos": true, "cache_prompt": false})
#   GGUF_DIR      (default MODEL_DIR/gguf) holding f32.gguf f16.gguf q8_0.gguf q4_0.gguf
#   KEEP_LOGS     a folder to keep the servers' logs in (default: a temporary folder, removed)
#
# gpt2 runs as `RAYON_NUM_THREADS=THREADS gpt2 serve --model-dir MODEL_DIR --host 127.0.0.1
# --port P --parallel C --device cpu (--dtype f32|f16|bf16 | --quantize q8_0|q4_0) GPT2_SERVE_ARGS`;
# llama-server as `llama-server -m GGUF_DIR/PREC.gguf --host 127.0.0.1 --port P -np C
# -c C*(PROMPT_TOKENS+NEW_TOKENS+16) -t THREADS -tb THREADS --no-webui LLAMA_SERVER_ARGS`.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/work/bench/gpt2-small-random}
export BS_DIR=$dir
export BS_ROUNDS=${ROUNDS:-3} BS_THREADS=${THREADS:-2} BS_CONC=${CONCURRENCY:-1 4 16}
export BS_PRECS=${PRECISIONS:-f32 q8_0} BS_PT=${PROMPT_TOKENS:-128} BS_NT=${NEW_TOKENS:-64}
export BS_RPC=${REQUESTS_PER_CLIENT:-2} BS_SERVERS=${SERVERS:-gpt2 llama.cpp}
export BS_GGUF_DIR=${GGUF_DIR:-$dir/gguf}
export BS_GPT2_ARGS=${GPT2_SERVE_ARGS:-} BS_LLAMA_ARGS=${LLAMA_SERVER_ARGS:-}
export BS_GPT2_BODY=${GPT2_BODY:-'{"ignore_eos": true}'}
export BS_LLAMA_BODY=${LLAMA_BODY:-'{"ignore_eos": true, "cache_prompt": false}'}
export BS_KEEP_LOGS=${KEEP_LOGS:-}
export BS_LOAD0=$(cut -d' ' -f1 /proc/loadavg)

[ -f "$dir/config.json" ] || {
  echo "bench_serve.sh: no checkpoint folder at $dir (config.json); make one with scripts/make_bench_model.py" >&2
  exit 1; }

BS_GPT2=""
case " $BS_SERVERS " in *" gpt2 "*)
  if [ -z "${GPT2_BIN:-}" ]; then
    [ -x target/release/gpt2 ] || cargo build --release --quiet
    GPT2_BIN=target/release/gpt2
  fi
  if err=$("$GPT2_BIN" serve --help 2>&1 >/dev/null); then
    BS_GPT2=$GPT2_BIN
  else
    echo "note: skipping gpt2 ($GPT2_BIN serve --help failed: $(echo "$err" | grep -m1 . || true))"
  fi ;;
esac
export BS_GPT2 BS_GPT2_DESC="${BS_GPT2:+$BS_GPT2 (repo at $(git describe --always --dirty 2>/dev/null || echo '?'))}"

BS_LLAMA=""
case " $BS_SERVERS " in *" llama.cpp "*)
  if [ -n "${LLAMA_SERVER:-}" ] && [ -x "$LLAMA_SERVER" ]; then
    BS_LLAMA=$LLAMA_SERVER
  else
    echo "note: skipping llama.cpp (set LLAMA_SERVER=/path/to/llama-server)"
  fi ;;
esac
export BS_LLAMA BS_LLAMA_VERSION=$([ -n "$BS_LLAMA" ] && "$BS_LLAMA" --version 2>&1 | sed -n 's/^version: //p' || echo none)

exec python3 - <<'PY'
import http.client, json, os, random, shlex, signal, socket, statistics, subprocess, sys
import tempfile, threading, time

E = os.environ
model_dir = E["BS_DIR"]
rounds, threads = int(E["BS_ROUNDS"]), int(E["BS_THREADS"])
concs = [int(c) for c in E["BS_CONC"].split()]
precs = E["BS_PRECS"].split()
pt, nt, rpc = int(E["BS_PT"]), int(E["BS_NT"]), int(E["BS_RPC"])
gguf_dir = E["BS_GGUF_DIR"]
logdir = E["BS_KEEP_LOGS"] or tempfile.mkdtemp(prefix="bench_serve.")
os.makedirs(logdir, exist_ok=True)
bodies = {"gpt2": json.loads(E["BS_GPT2_BODY"]), "llama.cpp": json.loads(E["BS_LLAMA_BODY"])}
vocab = json.load(open(os.path.join(model_dir, "config.json"))).get("vocab_size", 50257)

servers = []
for s in E["BS_SERVERS"].split():
    if s == "gpt2" and E["BS_GPT2"]:
        servers.append(s)
    elif s == "llama.cpp" and E["BS_LLAMA"]:
        missing = [p for p in precs if not os.path.isfile(f"{gguf_dir}/{p}.gguf")]
        for p in missing:
            print(f"note: skipping llama.cpp {p} (no {gguf_dir}/{p}.gguf)")
        servers.append(s)
if not servers:
    sys.exit("bench_serve.sh: no server to run (see the notes above)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(server, prec, conc, port):
    if server == "gpt2":
        flag = "--quantize" if prec.startswith("q") else "--dtype"
        return ([E["BS_GPT2"], "serve", "--model-dir", model_dir, "--host", "127.0.0.1",
                 "--port", str(port), "--parallel", str(conc), "--device", "cpu", flag, prec]
                + shlex.split(E["BS_GPT2_ARGS"]), {"RAYON_NUM_THREADS": str(threads)})
    gguf = f"{gguf_dir}/{prec}.gguf"
    if not os.path.isfile(gguf):
        return None, None
    return ([E["BS_LLAMA"], "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
             "-np", str(conc), "-c", str(conc * (pt + nt + 16)), "-t", str(threads),
             "-tb", str(threads), "--no-webui"] + shlex.split(E["BS_LLAMA_ARGS"]), {})


def start(server, prec, conc, tag):
    port = free_port()
    argv, env = command(server, prec, conc, port)
    if argv is None:
        return None, None, (None, None)
    log = open(os.path.join(logdir, f"{tag}.log"), "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **env})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None, f"exited with {proc.returncode} before /health answered (log: {log.name})", (argv, env)
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            ok = c.getresponse().status == 200
            c.close()
            if ok:
                return (proc, port), None, (argv, env)
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    return None, f"/health not 200 within 120 s (log: {log.name})", (argv, env)


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_request(port, body):
    """Streams one completion; returns (ttft s, total s, completion tokens, error or None)."""
    t0 = time.perf_counter()
    ttft, chunks, usage_tokens = None, 0, None
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v1/completions", body=json.dumps(body),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return None, None, 0, f"HTTP {r.status}: {r.read()[:200]!r}"
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            j = json.loads(data)
            if j.get("choices"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += 1
            u = j.get("usage")
            if u and u.get("completion_tokens") is not None:
                usage_tokens = u["completion_tokens"]
        c.close()
    except Exception as e:  # noqa: BLE001 -- any failure counts against the request
        return None, None, 0, f"{type(e).__name__}: {e}"
    n = usage_tokens if usage_tokens is not None else chunks
    return ttft, time.perf_counter() - t0, n, None


def request_body(server, seed, max_tokens=nt, prompt_tokens=pt):
    rng = random.Random(seed)
    # Token ids below 50000 (every GPT-2-vocab tokenizer has them), never the EOS id 50256.
    prompt = [rng.randrange(256, min(vocab, 50000)) for _ in range(prompt_tokens)]
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    body.update(bodies[server])
    return body


def load(server, port, conc, seed0):
    results = [None] * (conc * rpc)

    def client(i):
        for k in range(rpc):
            idx = i * rpc + k
            results[idx] = one_request(port, request_body(server, seed0 + idx))

    ths = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    return wall, results


cpu_model, flags = "?", set()
for line in open("/proc/cpuinfo"):
    if line.startswith("model name") and cpu_model == "?":
        cpu_model = line.split(":", 1)[1].strip()
    if line.startswith("flags") and not flags:
        flags = set(line.split(":", 1)[1].split())
want = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"]
cfg = json.load(open(os.path.join(model_dir, "config.json")))

print(f"date:      {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
print(f"machine:   {cpu_model}, {os.cpu_count()} cores, load avg {E['BS_LOAD0']} at start")
print(f"cpu flags: {' '.join(f for f in want if f in flags) or 'none of ' + ' '.join(want)}"
      f" (absent: {' '.join(f for f in want if f not in flags) or 'none'})")
print(f"shape:     {model_dir}: " + ", ".join(f"{k} {cfg.get(k, '?')}" for k in
                                              ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")))
print(f"run:       prompt {pt} token ids, max_tokens {nt}, temperature 0, {threads} threads, "
      f"concurrency {' '.join(map(str, concs))}, {rpc} requests per client, {rounds} interleaved rounds")
print(f"gpt2:      {E['BS_GPT2_DESC'] or 'skipped'}; request extras {json.dumps(bodies['gpt2'])}")
print(f"llama.cpp: {E['BS_LLAMA'] or 'skipped'} (version {E['BS_LLAMA_VERSION']}); "
      f"request extras {json.dumps(bodies['llama.cpp'])}")
if float(E["BS_LOAD0"]) >= 1:
    print(f"note: load avg {E['BS_LOAD0']} before the run: other processes share the cores, "
          "so these figures are contended")
sys.stdout.flush()

tput, ttfts, notes, cmds = {}, {}, [], {}
for r in range(1, rounds + 1):
    for prec in precs:
        for conc in concs:
            # Alternate which server goes first, round by round.
            order = servers if r % 2 else servers[::-1]
            for server in order:
                key = (server, prec, conc)
                tag = f"r{r}.{server}.{prec}.c{conc}"
                handle, err, (argv, env) = start(server, prec, conc, tag)
                if argv is None:
                    continue
                cmds.setdefault((server, prec), (argv, env))
                if handle is None:
                    notes.append(f"{tag}: {err}")
                    print(f"round {r}/{rounds}: {server} {prec} c={conc}: {err}", file=sys.stderr)
                    continue
                proc, port = handle
                try:
                    w = one_request(port, request_body(server, 10**6, max_tokens=4, prompt_tokens=16))
                    if w[3]:
                        notes.append(f"{tag}: warm-up failed: {w[3]}")
                    wall, res = load(server, port, conc, seed0=r * 10**4 + conc * 100)
                finally:
                    stop(proc)
                errs = [x[3] for x in res if x[3]]
                short = [x[2] for x in res if not x[3] and x[2] != nt]
                if errs:
                    notes.append(f"{tag}: {len(errs)}/{len(res)} requests failed, e.g. {errs[0]}")
                if short:
                    notes.append(f"{tag}: {len(short)} completions not {nt} tokens long: {sorted(set(short))}")
                good = [x for x in res if not x[3]]
                if good:
                    tput.setdefault(key, []).append(sum(x[2] for x in good) / wall)
                    ttfts.setdefault(key, []).extend(x[0] for x in good if x[0] is not None)
                print(f"round {r}/{rounds}: {server} {prec} c={conc}: "
                      f"{(sum(x[2] for x in good) / wall) if good else 0:.1f} tok/s "
                      f"(load avg {open('/proc/loadavg').read().split()[0]})", file=sys.stderr)

if not E["BS_KEEP_LOGS"]:
    import shutil
    shutil.rmtree(logdir, ignore_errors=True)


def cell(xs):
    return f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]" if xs else "-"


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]  # nearest rank


def ms(x):
    return f"{x * 1000:.0f}" if x is not None else "-"


print()
print("| server | precision | concurrency | generated tok/s median [min-max] | TTFT p50 ms | TTFT p99 ms "
      "| tok/s vs llama.cpp | TTFT p50 vs llama.cpp |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for prec in precs:
    for conc in concs:
        for server in servers:
            key = (server, prec, conc)
            if key not in tput and key not in ttfts:
                continue
            t, f = tput.get(key, []), ttfts.get(key, [])
            ratios = ["", ""]
            other = ("llama.cpp", prec, conc)
            if server != "llama.cpp" and tput.get(other) and t:
                ratios[0] = f"{statistics.median(t) / statistics.median(tput[other]):.2f}x"
                if ttfts.get(other) and f:
                    ratios[1] = f"{pct(f, 50) / pct(ttfts[other], 50):.2f}x"
            print(f"| {server} | {prec} | {conc} | {cell(t)} | {ms(pct(f, 50))} | {ms(pct(f, 99))} | "
                  + " | ".join(ratios) + " |")
print(f"\nratios: gpt2 / llama.cpp (tok/s above 1 and TTFT below 1: gpt2 is better); "
      f"load avg at end {open('/proc/loadavg').read().split()[0]}")
print("commands (port and -np/--parallel vary):")
for (server, prec), (argv, env) in cmds.items():
    print(f"  {server} {prec}: " + "".join(f"{k}={v} " for k, v in env.items()) + shlex.join(argv))
for n in notes:
    print(f"note: {n}")
PY
