#!/usr/bin/env python3
"""Benchmark the kernel ops: weights/s of quantize_pack and dequantize for k = 2..8, and
the whole kbitformat.quantize call, per device, with a bit-for-bit check against the CPU
kernels (or numpy).

    python scripts/kernel_bench.py                         # cpu (and numpy at 4-bit)
    python scripts/kernel_bench.py --devices cuda,cpu --sizes 4096x4096,16384x16384

CUDA timings are of the kernels alone on data already on the GPU (synchronised), and
separately of the whole host-to-host call; CPU timings are of the host call.
Run from the repository root (or with kbitformat and kbitcli importable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "formats")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402

from kbitformat import QuantSpec, codebooks, quantize, scales  # noqa: E402
from kbitcli.kernels import get_ops  # noqa: E402


def best_time(fn, reps: int, sync=None) -> float:
    fn()
    if sync:
        sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def parse_bits(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cpu", help="comma-separated: cuda, cpu, numpy")
    ap.add_argument("--sizes", default="4096x4096", help="comma-separated ROWSxCOLS")
    ap.add_argument("--bits", default="2-8")
    ap.add_argument("--dtype", default="int")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="Numba CPU threads (0: all)")
    ap.add_argument("--cpu-max-weights", type=float, default=7e7,
                    help="skip CPU/numpy runs on larger matrices (time)")
    ap.add_argument("--numpy-bits", default="4", help="bit widths to time the numpy reference at")
    args = ap.parse_args(argv)

    import numba
    if args.threads:
        numba.set_num_threads(args.threads)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    bits = parse_bits(args.bits)
    numpy_bits = set(parse_bits(args.numpy_bits)) if args.numpy_bits else set()
    print(f"numba {numba.__version__}, numpy {np.__version__}, CPU threads {numba.get_num_threads()}, "
          f"dtype {args.dtype}, block {args.block}, best of {args.reps}")
    ops = {d: get_ops(d) for d in devices}
    if "cuda" in ops:
        from numba import config, cuda
        if getattr(config, "ENABLE_CUDASIM", False):
            name = "Numba's CUDA simulator"
        else:
            dev = cuda.get_current_device()
            name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        print(f"CUDA device: {name}, numba.cuda implementation: {getattr(cuda, 'implementation', '?')}")

    rows_out = []
    all_exact = True
    for rows, cols in sizes:
        n = rows * cols
        rng = np.random.default_rng(0)
        x = rng.standard_normal((rows, cols), dtype=np.float32)
        B = args.block
        nb = -(-cols // B)
        for k in bits:
            spec = QuantSpec(bits=k, dtype=args.dtype, block_size=B, scale="fp16")
            cb = codebooks.fixed_codebook(spec.dtype, k, spec.exponent_bits)
            if cb is None:
                raise SystemExit("choose a data-independent --dtype (int, affine, fp, nf, dynamic)")
            mids = codebooks.midpoints(cb)
            stats = get_ops("cpu").stats(x, B, spec.affine)
            raw_s, raw_lo = next(scales.raw_candidates(stats, spec.affine, "none"))
            _, s = scales.encode_scales(raw_s, "fp16")
            off = None
            if spec.affine:
                _, off = scales.encode_offsets(raw_lo, s, "fp16")
            ref_words = None
            for d in devices:
                if d in ("cpu", "numpy") and n > args.cpu_max_weights:
                    continue
                if d == "numpy" and k not in numpy_bits:
                    continue
                o = ops[d]
                reps = 1 if d == "numpy" else args.reps
                row = {"device": d, "size": f"{rows}x{cols}", "k": k}
                if d == "cuda":
                    from numba import cuda
                    dx, ds = cuda.to_device(x), cuda.to_device(s)
                    do = cuda.to_device(off) if off is not None else None
                    dcb, dmids = cuda.to_device(cb), cuda.to_device(mids)
                    holder = {}
                    t_q = best_time(lambda: holder.__setitem__(
                        "w", o.quantize_pack_device(dx, B, k, ds, do, dcb, dmids)), reps, cuda.synchronize)
                    dw = holder["w"]
                    t_d = best_time(lambda: o.dequantize_device(dw, k, B, cols, ds, do, dcb), reps, cuda.synchronize)
                    words = dw.copy_to_host()
                    t_qh = best_time(lambda: o.quantize_pack(x, B, k, s, off, cb, mids), max(1, reps // 2))
                    row["q_host_s"] = t_qh
                else:
                    t_q = best_time(lambda: o.quantize_pack(x, B, k, s, off, cb, mids), reps)
                    words = o.quantize_pack(x, B, k, s, off, cb, mids)
                    t_d = best_time(lambda: o.dequantize(words, k, B, cols, s, off, cb), reps)
                t_full = best_time(lambda: quantize(x, spec, ops=o), max(1, reps // 2)) if n <= 7e7 or d == "cuda" else float("nan")
                if ref_words is None:
                    ref_words = words
                    exact = "ref"
                else:
                    exact = "yes" if np.array_equal(words, ref_words) else "NO"
                    all_exact &= exact == "yes"
                row.update(q_s=t_q, d_s=t_d, full_s=t_full, exact=exact)
                rows_out.append(row)
                extra = f"  host q {row['q_host_s'] * 1e3:8.2f} ms" if "q_host_s" in row else ""
                print(f"{d:5s} {rows:6d}x{cols:<6d} k={k}  quantize_pack {t_q * 1e3:8.2f} ms "
                      f"({n / t_q / 1e9:7.2f} Gw/s)  dequantize {t_d * 1e3:8.2f} ms ({n / t_d / 1e9:7.2f} Gw/s)  "
                      f"quantize() {t_full * 1e3:8.2f} ms{extra}  same words: {exact}", flush=True)
    print("bit-exact across devices:", "yes" if all_exact else "NO")
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
