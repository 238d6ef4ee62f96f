#!/usr/bin/env python
"""Fused GEMV benchmark: y = x @ W.T straight from a packed 4-bit weight (the runner's decode
step) against F.linear on the dequantized fp32 weight and against dequantize + matmul.

    .venv/bin/python benchmarks/bench_gemv.py                # CPU, M = 1, 2 threads
    .venv/bin/python benchmarks/bench_gemv.py --spec 3:affine:b32 --m 1 4

Shapes: SmolLM2-135M's linear layers (576x576 q/o, 1536x576 gate/up, 576x1536 down) and its
49152x576 vocabulary head. Each contender is timed round-robin (min and median of the repeats);
ratios are F.linear time / GEMV time (> 1: the GEMV is faster). The small matrices fit the
caches in fp32, the head does not; in a real model the weights of all layers together do not,
so the big shape is the one that tells how a decode step goes.

"gemv" reads the format's bit planes, "gemv bytes" the runner's byte layout of the same codes
(k = 2, 4, 8; KbitLinear's default for those widths).

Sections: "CPU" (kbitcli.kernels.cpu.gemv) here; add_cuda_section is the hook for a CUDA
section (kbitcli.kernels.cuda.gemv_torch against torch's fp16/fp32 matmul), not written yet.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, machine, set_threads, timeit_interleaved, versions  # noqa: E402

SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))


def packed_weight(rows: int, cols: int, spec, seed: int = 0):
    """(words, k, B, cols, s, o, cb) of a random Gaussian weight, quantized by the CPU kernels."""
    import numpy as np

    from kbitformat import quantize
    from kbitcli.kernels.cpu import CpuOps
    w = np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    qt = quantize(w, spec, ops=CpuOps)
    s = qt.decoded_scales().astype(np.float32)
    o = qt.decoded_offsets(s)
    return (np.ascontiguousarray(qt.codes, dtype=np.uint32), spec.bits, qt.block_size, cols, s,
            None if o is None else o.astype(np.float32), qt.codebook.astype(np.float32))


def cpu_section(rep: Report, args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from kbitformat import QuantSpec
    from kbitcli.kernels.cpu import CpuOps, gemv
    from kbitcli.runner.layers import planes_to_bytes
    rep.section("CPU")
    spec = QuantSpec.parse(args.spec)
    rows_out = []
    for rows, cols in SHAPES:
        packed = packed_weight(rows, cols, spec)
        wd = torch.from_numpy(CpuOps.dequantize(*packed))
        for M in args.m:
            x = np.random.default_rng(M).standard_normal((M, cols), dtype=np.float32)
            xt = torch.from_numpy(x)
            by = planes_to_bytes(torch.from_numpy(packed[0].view(np.int32)), spec.bits).numpy() \
                if spec.bits in (2, 4, 8) else None
            y = gemv(*packed, x)
            ref = x.astype(np.float64) @ wd.numpy().astype(np.float64).T
            err = float((np.abs(y - ref) / (np.abs(x) @ np.abs(wd.numpy()).T + 1e-30)).max())
            fns = {
                "gemv": lambda: gemv(*packed, x),
                "gemv bytes": (lambda: gemv(by, *packed[1:], x, layout="bytes")) if by is not None else (lambda: None),
                "F.linear": lambda: F.linear(xt, wd),
                "deq+matmul": lambda: F.linear(xt, torch.from_numpy(CpuOps.dequantize(*packed))),
            }
            t = timeit_interleaved(fns, repeats=args.repeats, warmup=2)
            g = t["gemv"]
            gb = t["gemv bytes"]
            rows_out.append([f"{rows}x{cols}", M, g.min * 1e3, g.median * 1e3,
                             gb.min * 1e3 if by is not None else "-", gb.min * 1e9 / (rows * cols) if by is not None else "-",
                             t["F.linear"].min / gb.min if by is not None else "-", t["F.linear"].min * 1e3,
                             t["F.linear"].median * 1e3, t["deq+matmul"].min * 1e3,
                             t["F.linear"].min / g.min, t["F.linear"].median / g.median,
                             t["deq+matmul"].min / g.min, g.min * 1e9 / (rows * cols), err])
    rep.table(["shape", "M", "gemv min ms", "gemv median ms", "gemv bytes min ms", "gemv bytes ns/weight",
               "F.linear/gemv bytes (min)", "F.linear min ms", "F.linear median ms",
               "deq+matmul min ms", "F.linear/gemv (min)", "F.linear/gemv (median)", "deq+matmul/gemv (min)",
               "gemv ns/weight", "max rel. error"], rows_out,
              title=f"{spec} weights, x (M, cols) float32, {args.threads} threads, {args.repeats} repeats; "
                    "error: |y - y64| / sum|x||w| per output")


def add_cuda_section(rep: Report, args) -> None:
    """Hook for the CUDA section (the lead's kbitcli.kernels.cuda.gemv_torch); not written yet."""
    rep.section("CUDA")
    rep.note("no CUDA section yet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--spec", default="4:nf:b64", help="quantization spec of the weights (default 4:nf:b64)")
    ap.add_argument("--m", type=int, nargs="+", default=[1], help="input rows (default 1)")
    ap.add_argument("--no-gpu", action="store_true", help="skip the CUDA section")
    ap.add_argument("--markdown", type=Path, help="write the report as markdown here")
    args = ap.parse_args()
    set_threads(args.threads)
    rep = Report()
    rep.note(f"machine: {machine()}")
    rep.note(f"versions: {versions('torch', 'numba', 'numpy')}")
    cpu_section(rep, args)
    if not args.no_gpu:
        add_cuda_section(rep, args)
    if args.markdown:
        rep.write(args.markdown, "## Fused GEMV")
    return 0


if __name__ == "__main__":
    sys.exit(main())
