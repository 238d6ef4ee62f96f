#!/usr/bin/env python
"""kbit perplexity (protocol llama.cpp) against llama.cpp's own llama-perplexity on the same GGUF
and the same text, ctx 512: prints both perplexities and PASS when they agree within 1%.

    .venv/bin/python benchmarks/check_llamacpp_ppl.py                  # embedded SmolLM2 GGUF, wiki text
    .venv/bin/python benchmarks/check_llamacpp_ppl.py --model m.gguf --text wiki.test.raw --chunks 40

llama-perplexity is looked for at $KBIT_LLAMA_CPP_DIR/build/bin/llama-perplexity (or .../bin/,
or the folder itself), then ~/.cache/kbit-peers/llama.cpp/build/bin/llama-perplexity. Without
it the check is skipped (exit 0, one line). Build it outside the repository (see
/work/shared/notes/environment.md or docs/quality.md: the llama-cpp-python sdist vendors
llama.cpp; cmake --build build --target llama-perplexity); never commit its code.

Both sides read the same GGUF: kbit's runner dequantizes its Q4_1 weights to float32, llama.cpp
multiplies with its quantized kernels (activations rounded to 8 bits), so the two differ by a
little numerical noise, well under 1%. Exit codes: 0 PASS or skipped, 1 FAIL, 2 a run failed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.01


def find_binary() -> Path | None:
    cands = []
    env = os.environ.get("KBIT_LLAMA_CPP_DIR")
    if env:
        d = Path(env).expanduser()
        cands += [d / "build/bin/llama-perplexity", d / "bin/llama-perplexity", d / "llama-perplexity"]
    cands.append(Path.home() / ".cache/kbit-peers/llama.cpp/build/bin/llama-perplexity")
    return next((p for p in cands if p.is_file() and os.access(p, os.X_OK)), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a .gguf file (default: the embedded SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--text", help="a text file (default: the offline Wikipedia text, its first --chars characters)")
    ap.add_argument("--chars", type=int, default=60_000)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="chunks of --ctx tokens scored by both")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    binary = find_binary()
    if binary is None:
        print("SKIP: llama-perplexity is not built (set KBIT_LLAMA_CPP_DIR, or build it into "
              "~/.cache/kbit-peers/llama.cpp/build/bin); nothing to compare")
        return 0

    import torch
    torch.set_num_threads(args.threads)
    from kbitcli.evals.perplexity import adds_bos, perplexity
    from kbitcli.evals.data import load_text, wiki_text
    from kbitcli.runner import load
    from kbitcli.sources import embedded_model_path

    model_path = Path(args.model) if args.model else embedded_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        if args.text:
            text_file = Path(args.text)
            text = load_text(text_file)
        else:
            text = wiki_text()[: args.chars]
            text_file = Path(tmp) / "wiki.txt"
            text_file.write_text(text, encoding="utf-8")

        cmd = [str(binary), "-m", str(model_path), "-f", str(text_file), "-c", str(args.ctx), "-b", str(args.ctx),
               "--chunks", str(args.chunks), "-t", str(args.threads)]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True)
        llama_s = time.perf_counter() - t
        log = run.stdout + run.stderr
        m = re.search(r"Final estimate: PPL = ([0-9.]+)(?: \+/- ([0-9.]+))?", log)
        if run.returncode != 0 or m is None:
            print(f"ERROR: llama-perplexity failed (exit {run.returncode}):\n{log[-2000:]}")
            return 2
        llama_ppl = float(m.group(1))
        n_chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
        chunks = int(n_chunks.group(1)) if n_chunks else args.chunks

    model, tok, _ = load(model_path, device="cpu")
    ids = tok.encode(text)  # with the tokenizer's special tokens, as llama-perplexity tokenizes
    bos = tok.bos_token_id if adds_bos(tok) else None
    t = time.perf_counter()
    res = perplexity(model, ids, ctx=args.ctx, protocol="llama.cpp", bos_id=bos, max_tokens=chunks * args.ctx)
    kbit_s = time.perf_counter() - t
    diff = abs(res.ppl - llama_ppl) / llama_ppl
    print(f"model {model_path.name}, ctx {args.ctx}, {chunks} chunks ({res.n_scored} scored tokens), "
          f"BOS {'first' if bos is not None else 'not added'}")
    print(f"llama-perplexity  PPL = {llama_ppl:.4f}  ({llama_s:.1f} s)")
    print(f"kbit perplexity   PPL = {res.ppl:.4f} ± {res.ppl_se:.4f}  ({kbit_s:.1f} s)")
    ok = diff <= TOLERANCE
    print(f"{'PASS' if ok else 'FAIL'}: relative difference {100 * diff:.3f}% (tolerance {100 * TOLERANCE:.0f}%)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
