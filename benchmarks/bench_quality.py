#!/usr/bin/env python
"""Quality of every kbit setting on a real model: perplexity, KL divergence and top-1 agreement
of SmolLM2-135M-Instruct (the embedded GGUF) quantized with k = 2..8 bits x {int, affine, fp,
nf, quantile} at block 64, against the source model, on the offline Wikipedia text; and the
throughput of `kbit perplexity` against transformers (and llama-perplexity where built).

    .venv/bin/python benchmarks/bench_quality.py --markdown /tmp/quality.md      # the docs table
    .venv/bin/python benchmarks/bench_quality.py --tokens 1024 --bits 4 --dtypes nf   # a quick look

How: the source model is loaded once with kbit's runner (float32). Its log-probabilities over
the scored positions are kept in memory (exact KL, full vocabulary). For each setting every
linear layer of the transformer blocks (what `kbit quantize` quantizes by default: 210 tensors;
embeddings and the tied head stay as they are) is quantized with kbit's CPU kernels and
dequantized back into the same model (bit-identical to loading a `kbit quantize` output with
--dequantize-on-load), then scored on the same windows: protocol hf, ctx 512, stride 512.
The source's linear weights are themselves 4-bit Q4_1 (asymmetric, groups of 32), so affine
4-bit at block 32 reproduces them almost exactly (one extra row, --q4-1-check) and every figure
here measures re-quantizing an already 4-bit model.

Throughput (--throughput, on by default): the same tokens through kbit's perplexity() on the
runner and through transformers' perplexity-guide loop (labels=input_ids) on the same GGUF
weights, timed round-robin; llama-perplexity (env KBIT_LLAMA_CPP_DIR or
~/.cache/kbit-peers/llama.cpp/build/bin) when built.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, machine, set_threads, transformers_gguf_model, versions  # noqa: E402

DTYPES = ["int", "affine", "fp", "nf", "quantile"]


def llama_perplexity_bin() -> Path | None:
    for d in (os.environ.get("KBIT_LLAMA_CPP_DIR"), str(Path.home() / ".cache/kbit-peers/llama.cpp")):
        if not d:
            continue
        for sub in ("build/bin/llama-perplexity", "bin/llama-perplexity", "llama-perplexity"):
            p = Path(d).expanduser() / sub
            if p.is_file() and os.access(p, os.X_OK):
                return p
    return None


def quantizable(model) -> dict:
    """parameter name -> nn.Linear of the transformer blocks (what kbit quantize quantizes by default)."""
    from torch import nn

    from kbitcli.recipe import Recipe
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and Recipe.default_quantized(f"{name}.weight", tuple(m.weight.shape), True):
            out[f"{name}.weight"] = m
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the Wikipedia text to score")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--bits", default="2,3,4,5,6,7,8")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--throughput-only", action="store_true", help="skip the sweep")
    ap.add_argument("--throughput-tokens", type=int, default=1024)
    ap.add_argument("--q4-1-check", action="store_true", default=True, help="also affine 4-bit block 32")
    ap.add_argument("--markdown", help="write the report as markdown here")
    ap.add_argument("--json", help="write every figure as JSON here (rewritten after each setting)")
    args = ap.parse_args()
    set_threads(args.threads)

    import numpy as np
    import torch

    from kbitformat import QuantSpec, dequantize, quantize

    from kbitcli.evals.compare import _kl_exact, kl_topk
    from kbitcli.evals.data import WIKI_NAME, wiki_text
    from kbitcli.evals.perplexity import iter_logprobs, perplexity, summarize_nll, window_plan
    from kbitcli.kernels import get_ops
    from kbitcli.runner import load
    from kbitcli.sources import embedded_model_path

    rep = Report()
    src = embedded_model_path()
    t0 = time.perf_counter()
    model, tok, _ = load(src, device="cpu")
    text = wiki_text()
    ids = np.asarray(tok.encode(text), dtype=np.int64)[: args.tokens]
    n_bytes = len(tok.decode(ids.tolist()).encode())
    plan = window_plan(len(ids), args.ctx, None, "hf")
    rep.note(f"Machine: {machine()}. {versions('torch', 'numba', 'transformers')}. Threads: {args.threads}.")
    rep.note(f"Model: SmolLM2-135M-Instruct, the embedded GGUF ({src.name}; linear weights Q4_1). Text: {WIKI_NAME}, "
             f"first {len(ids):,} tokens ({n_bytes:,} bytes); protocol hf, ctx {args.ctx}, stride {args.ctx}: "
             f"{len(plan)} windows, {sum(w.n_scored for w in plan):,} scored tokens. Block {args.block}, fp16 scales.")

    if args.throughput_only:
        args.bits = ""
    # ---- reference: the source model's log-probs, kept for exact KL
    ref_lp, ref_t = [], []
    t = time.perf_counter()
    for wl in iter_logprobs(model, ids, plan):
        ref_lp.append(wl.logprobs)
        ref_t.append(wl.target_logprobs)
    ref_secs = time.perf_counter() - t
    ref_nll = -torch.cat(ref_t).double().numpy()
    ref_ppl, ref_se, _, _ = summarize_nll(ref_nll)
    # saved-reference approximations (kbit compare --reference-logits): top-k log-probs (float16) + rest bucket
    approx_k = (32, 256)
    topk = {k: [torch.topk(lp, k, dim=-1) for lp in ref_lp] for k in approx_k}
    rest = {k: [lp.scatter(1, ix, float("-inf")).logsumexp(-1) for lp, (_, ix) in zip(ref_lp, topk[k])]
            for k in approx_k}
    print(f"reference: ppl {ref_ppl:.4f} in {ref_secs:.1f} s (load {t - t0:.1f} s)", flush=True)

    layers = quantizable(model)
    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    ops = get_ops("cpu")
    results = [{"setting": "source (GGUF Q4_1)", "bits": None, "dtype": None, "ppl": ref_ppl, "ppl_se": ref_se,
                "ratio": 1.0, "kld": 0.0, "kld99": 0.0, "top1": 1.0, "bpw": None}]
    settings = [(k, d, args.block) for d in args.dtypes.split(",") for k in map(int, filter(None, args.bits.split(",")))]
    if args.q4_1_check and not args.throughput_only:
        settings.append((4, "affine", 32))
    for bits, dtype, block in settings:
        spec = QuantSpec(bits=bits, dtype=dtype, block_size=block)
        tq = time.perf_counter()
        payload, numel = 0, 0
        for name, m in layers.items():
            w = originals[name].numpy()
            qt = quantize(w, spec, name, ops=ops)
            payload += qt.payload_bits()
            numel += qt.numel
            m.weight.data.copy_(torch.from_numpy(np.asarray(dequantize(qt, ops), np.float32).reshape(w.shape)))
        tq = time.perf_counter() - tq
        te = time.perf_counter()
        nll, kl, top1 = [], [], []
        klk: dict = {k: [] for k in approx_k}
        for i, wl in enumerate(iter_logprobs(model, ids, plan)):
            lq = wl.logprobs
            nll.append(-wl.target_logprobs.double().numpy())
            kl.append(_kl_exact(ref_lp[i], lq).double().numpy())
            for k in approx_k:
                tk = topk[k][i]
                klk[k].append(kl_topk(tk.indices, tk.values.half().float(), rest[k][i], lq).double().numpy())
            top1.append((ref_lp[i].argmax(-1) == lq.argmax(-1)).numpy())
        te = time.perf_counter() - te
        nll, kl, top1 = (np.concatenate(x) for x in (nll, kl, top1))
        klk = {k: float(np.concatenate(v).mean()) for k, v in klk.items()}
        ppl, se, _, _ = summarize_nll(nll)
        r = {"setting": f"{bits}-bit {dtype} b{block}", "bits": bits, "dtype": dtype, "block": block, "ppl": ppl,
             "ppl_se": se, "ratio": ppl / ref_ppl, "kld": float(kl.mean()), "kld99": float(np.percentile(kl, 99)),
             **{f"kld_top{k}": v for k, v in klk.items()}, "top1": float(top1.mean()), "bpw": payload / numel,
             "quantize_s": tq, "eval_s": te}
        results.append(r)
        print(f"{r['setting']:>22}: ppl {ppl:10.3f} ratio {r['ratio']:7.3f} KL {r['kld']:.4f} (top-32 {r['kld_top32']:.4f}, top-256 {r['kld_top256']:.4f}) "
              f"top-1 {100 * r['top1']:.1f}%  {r['bpw']:.3f} bits/w  quantize {tq:.1f} s, eval {te:.1f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    for name, m in layers.items():
        m.weight.data.copy_(originals[name])

    rep.section("Perplexity, KL divergence and top-1 agreement against the source")
    rows = [[r["setting"], r["bpw"], r["ppl"], r["ppl_se"], r["ratio"], r["kld"], r["kld99"], 100 * r["top1"],
             r.get("kld_top32"), r.get("kld_top256")] for r in results]
    rep.table(["setting", "bits/weight", "ppl", "± se", "ppl ratio", "mean KL", "KL p99", "top-1 %",
               "KL, top-32+rest", "KL, top-256+rest"], rows)

    # ---- throughput
    if not args.no_throughput:
        rep.section("Throughput of perplexity: kbit's runner vs transformers")
        tids = ids[: args.throughput_tokens]
        tplan = window_plan(len(tids), args.ctx, None, "hf")
        hf = transformers_gguf_model(src)

        def kbit_run():
            perplexity(model, tids, ctx=args.ctx)

        def hf_run():  # the transformers perplexity guide, stride = ctx
            x = torch.as_tensor(tids)[None]
            with torch.inference_mode():
                for w in tplan:
                    hf(x[:, w.begin:w.end], labels=x[:, w.begin:w.end])

        a = perplexity(model, tids, ctx=args.ctx).ppl
        with torch.inference_mode():
            x = torch.as_tensor(tids)[None]
            nll = [hf(x[:, w.begin:w.end], labels=x[:, w.begin:w.end]).loss.item() * (w.n_scored) for w in tplan]
        b = float(np.exp(sum(nll) / sum(w.n_scored for w in tplan)))
        # round-robin, wall and CPU time of this process (CPU time is steadier on a shared machine)
        fns = {"kbit": kbit_run, "transformers": hf_run}
        for f in fns.values():
            f()
        wall: dict = {k: [] for k in fns}
        cpu: dict = {k: [] for k in fns}
        for _ in range(5):
            for k, f in fns.items():
                t, c = time.perf_counter(), time.process_time()
                f()
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        n = len(tids)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        rows = [["kbit perplexity (runner, fp32)", a, n / min(wall["kbit"]), n / med(wall["kbit"]), n / min(cpu["kbit"])],
                ["transformers guide loop (fp32)", b, n / min(wall["transformers"]), n / med(wall["transformers"]),
                 n / min(cpu["transformers"])]]
        lp = llama_perplexity_bin()
        if lp is not None:
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "text.txt"
                f.write_text(tok.decode(tids.tolist()))
                t = time.perf_counter()
                out = subprocess.run([str(lp), "-m", str(src), "-f", str(f), "-c", str(args.ctx), "-t",
                                      str(args.threads), "-b", str(args.ctx)], capture_output=True, text=True)
                secs = time.perf_counter() - t
                m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
                rows.append(["llama-perplexity (GGUF Q4_1, llama.cpp protocol)", float(m.group(1)) if m else None,
                             n / secs, n / secs, None])
        else:
            rep.note("llama-perplexity: not built here (KBIT_LLAMA_CPP_DIR or ~/.cache/kbit-peers/llama.cpp); skipped.")
        rep.table(["contender", "ppl", "tokens/s (best wall)", "tokens/s (median wall)", "tokens/CPU-s (best)"],
                  rows, title=f"{n:,} tokens, ctx {args.ctx}, {args.threads} threads, round-robin, 5 repeats")
        ratio = min(wall["transformers"]) / min(wall["kbit"])
        cratio = min(cpu["transformers"]) / min(cpu["kbit"])
        rep.check("kbit perplexity throughput >= transformers (CPU time)", cratio >= 1.0,
                  f"{cratio:.2f}x CPU time, {ratio:.2f}x wall (best of 5)")
        rep.check("same perplexity as transformers (1e-3)", abs(a - b) / b < 1e-3, f"{a:.4f} vs {b:.4f}")
        rep.checks_table()
    if args.markdown:
        rep.write(args.markdown, "## bench_quality\n\nCommand: `.venv/bin/python benchmarks/bench_quality.py "
                  + " ".join(sys.argv[1:]) + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
