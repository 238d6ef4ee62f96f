#!/usr/bin/env python
"""CUDA kernel microbenchmark of the fused GEMVs (no model needed): per call kernel time of

  bytes     kbitcli.kernels.cuda.gemv_bytes_torch (the runner's bytes code layout)
  planes    kbitcli.kernels.cuda.gemv_torch (the file's bit-plane layout)
  fp16      F.linear(x, W) with an fp16 weight (cuBLAS)
  dq-bytes / dq-planes   dequantize_bytes_torch / dequantize_torch (prompt passes)

on random codes (the kernels' speed does not depend on the values) for Llama-7B-like layer
shapes, M = 1 input row. Kernel time, not host time: N launches are captured into one
torch.cuda.CUDAGraph (capture_error_mode="thread_local") and its replays timed with CUDA
events; where capture fails the kernels' own durations are read from torch.profiler (CUPTI
sees Numba's kernels too), and where that fails too an eager loop timed with events (which
includes the host launch cost); the "method" column says which. Also printed: GB/s of the
bytes each call must read (codes, scales, offsets, x; the output), that rate as a fraction
of a measured device-to-device copy (read + write bytes / time), the ratio to fp16 F.linear,
and the host cost of one eager call (the Python + Numba launch overhead that CUDA graphs
remove). The bytes GEMV's default is the tile kernel; each main shape also gets a row of
the x-in-registers kernel (KERNEL="xr", M = 1). A sweep of launch shapes (BYTES_TUNING: XR_NG row
groups and XR_D rows in flight of the x-in-registers kernel; R rows a warp and NW warps a
CTA of the tile kernel) follows, so one run tells which default to keep. Each variant
fails soft (the error is printed, the run goes on); the run stops adding variants after
--time-limit seconds.

    python benchmarks/bench_gemv_cuda.py --json out.json --markdown out.md      # GPU
    python benchmarks/bench_gemv_cuda.py --dry-run                              # CPU: Numba's simulator,
                                                                                 # tiny sizes, plumbing only
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "formats"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

SHAPES = "4096x4096,11008x4096,4096x11008,32000x4096"
SWEEP = [  # (label, BYTES_TUNING overrides) for the bytes GEMV, k=4
    # the x-in-registers kernel (KERNEL="xr", M = 1; XR_NG row groups a CTA, XR_D rows in flight
    # a group, XR_CTAS CTAs an SM at most; default NG = max(1, 4 // warps a row group), D = 4)
    ("XR NG1 D4", dict(KERNEL="xr", XR_NG=1, XR_D=4)),
    ("XR NG1 D2", dict(KERNEL="xr", XR_NG=1, XR_D=2)),
    ("XR NG1 D8", dict(KERNEL="xr", XR_NG=1, XR_D=8)),
    ("XR NG2 D4", dict(KERNEL="xr", XR_NG=2, XR_D=4)),
    ("XR NG2 D2", dict(KERNEL="xr", XR_NG=2, XR_D=2)),
    ("XR NG4 D2", dict(KERNEL="xr", XR_NG=4, XR_D=2)),
    ("XR NG1 D1", dict(KERNEL="xr", XR_NG=1, XR_D=1)),
    ("XR NG1 D4 4/SM", dict(KERNEL="xr", XR_NG=1, XR_D=4, XR_CTAS=4)),
    ("XR NG1 D4 80reg", dict(KERNEL="xr", XR_NG=1, XR_D=4, MAXREG=80)),
    # the tile kernel (x staged in shared memory; R rows a warp, NW warps a CTA); split-K
    # made it slower on the H200 (docs/data/gpu-2026-11-28d)
    ("tile R4 NW8", dict(KERNEL="tile", R=4, NW=8)),
    ("tile R2 NW16", dict(KERNEL="tile", R=2, NW=16)),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help=f"rows x cols list (default {SHAPES})")
    ap.add_argument("--bits", default="4,2,8", help="k of the bytes GEMV (default 4,2,8; planes and dequantize: the first)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--affine", action="store_true", help="affine (offsets) instead of a symmetric type")
    ap.add_argument("--m", type=int, default=1, help="input rows (default 1)")
    ap.add_argument("--launches", type=int, default=20, help="launches captured per graph (default 20)")
    ap.add_argument("--replays", type=int, default=10, help="timed graph replays (default 10)")
    ap.add_argument("--sweep-shapes", default="4096x4096,11008x4096", help="shapes of the launch-shape sweep ('' none)")
    ap.add_argument("--time-limit", type=float, default=75.0, help="no new variant after this many seconds (default 75)")
    ap.add_argument("--json", help="write the results as JSON here")
    ap.add_argument("--markdown", help="write the results as a markdown table here")
    ap.add_argument("--dry-run", action="store_true",
                    help="Numba's CUDA simulator on CPU tensors, tiny shapes, eager timing: checks the code paths only")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        args.shapes = "8x64"
        args.sweep_shapes = "8x64"
        args.launches, args.replays = 1, 1
        args.time_limit = 1e9
        args.block = 32
    t_start = time.perf_counter()
    import torch
    import torch.nn.functional as F

    import kbitcli.kernels.cuda as K
    dev = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("bench_gemv_cuda: no CUDA GPU for torch (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    ks = [int(b) for b in args.bits.split(",") if b]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    sweep_shapes = [tuple(int(v) for v in s.split("x")) for s in args.sweep_shapes.split(",") if s]
    M, B, affine = args.m, args.block, args.affine
    results: list[dict] = []
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (Numba CUDA simulator)",
            "torch": torch.__version__, "numba": __import__("numba").__version__,
            "vector_loads": K._VECTOR_LOADS, "M": M, "block": B, "affine": affine,
            "launches_per_graph": args.launches, "replays": args.replays}
    try:
        import numba_cuda
        info["numba_cuda"] = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        pass

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # ---------------------------------------------------------------- copy bandwidth
    copy_bw = None
    if dev == "cuda":
        try:
            n = 256 << 20
            src = torch.empty(n, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            dst.copy_(src)
            sync()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            best = float("inf")
            for _ in range(5):
                e0.record()
                for _ in range(5):
                    dst.copy_(src)
                e1.record()
                sync()
                best = min(best, e0.elapsed_time(e1) / 1e3 / 5)
            copy_bw = 2 * n / best
            del src, dst
        except Exception as e:  # pragma: no cover - GPU only
            print(f"copy bandwidth: failed ({e})")
    info["copy_GBps"] = None if copy_bw is None else round(copy_bw / 1e9, 1)
    print(f"device: {info['device']} | torch {info['torch']} | numba {info['numba']} "
          f"| numba-cuda {info.get('numba_cuda', '-')} | 128-bit loads: {info['vector_loads']}")
    print(f"device-to-device copy: {info['copy_GBps']} GB/s (read + write)")

    # ---------------------------------------------------------------- timing
    def kernel_time(fn):
        """(seconds per call, method)."""
        t0 = time.perf_counter()
        fn()  # compile / warm up (outside any capture)
        sync()
        warm.append(time.perf_counter() - t0)
        if dev == "cuda":
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, capture_error_mode="thread_local"):
                    for _ in range(args.launches):
                        fn()
                g.replay()
                sync()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                best = float("inf")
                for _ in range(args.replays):
                    e0.record()
                    g.replay()
                    e1.record()
                    sync()
                    best = min(best, e0.elapsed_time(e1) / 1e3 / args.launches)
                del g
                return best, "graph"
            except Exception as e:
                print(f"    graph capture failed ({type(e).__name__}: {e}); trying the profiler")
                sync()
            try:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.launches):
                        fn()
                    sync()
                total = 0.0
                for ev in prof.key_averages():
                    t = getattr(ev, "self_device_time_total", None)
                    if t is None:
                        t = getattr(ev, "self_cuda_time_total", 0.0)
                    total += float(t or 0.0)
                if total > 0:
                    return total / 1e6 / args.launches, "profiler"
            except Exception as e:
                print(f"    profiler failed ({type(e).__name__}: {e}); eager events")
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(args.launches):
                fn()
            e1.record()
            sync()
            return e0.elapsed_time(e1) / 1e3 / args.launches, "eager-events"
        t0 = time.perf_counter()
        for _ in range(args.launches):
            fn()
        return (time.perf_counter() - t0) / args.launches, "eager-cpu"

    def host_time(fn, n=20):
        """Host seconds to issue one eager call (what a CUDA graph removes)."""
        if args.dry_run:
            return None
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        sync()
        return (t1 - t0) / n

    fp16_time: dict = {}
    warm: list = []

    def run(name, shape, k, nbytes, fn, tuning=None, cfg_over=None):
        if time.perf_counter() - t_start > args.time_limit:
            print(f"  {name:24s} skipped (time limit {args.time_limit:.0f} s)")
            results.append({"variant": name, "shape": shape, "k": k, "skipped": "time limit"})
            return
        old = dict(K.BYTES_TUNING)
        try:
            if tuning:
                K.BYTES_TUNING.update(tuning)
            t, method = kernel_time(fn)
            host = host_time(fn)
            row = {"variant": name, "shape": shape, "k": k, "us": t * 1e6, "method": method, "bytes": nbytes,
                   "GBps": nbytes / t / 1e9, "first_call_s": round(warm[-1], 2)}
            if copy_bw:
                row["frac_copy_bw"] = nbytes / t / copy_bw
            if host is not None:
                row["host_us"] = host * 1e6
            ref = fp16_time.get(shape)
            if ref and name != "fp16 F.linear":
                row["vs_fp16"] = ref / t
            if cfg_over is not None:
                row["config"] = cfg_over if isinstance(cfg_over, str) else repr(cfg_over)
            results.append(row)
            print(f"  {name:24s} {t * 1e6:9.2f} us  {row['GBps']:8.1f} GB/s"
                  + (f"  {row['frac_copy_bw']:5.1%} of copy" if "frac_copy_bw" in row else "")
                  + (f"  {row['vs_fp16']:5.2f}x fp16" if "vs_fp16" in row else "")
                  + (f"  host {row['host_us']:6.1f} us/call" if "host_us" in row else "")
                  + f"  [{method}, first call {warm[-1]:.1f} s]" + (f"  {row['config']}" if "config" in row else ""))
            return t
        except Exception as e:
            print(f"  {name:24s} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
            results.append({"variant": name, "shape": shape, "k": k, "error": f"{type(e).__name__}: {e}"})
        finally:
            K.BYTES_TUNING.clear()
            K.BYTES_TUNING.update(old)

    def weights(rows, cols, k):
        nb = -(-cols // B)
        W = nb * B * k // 32
        g = torch.Generator(device="cpu").manual_seed(rows * 7 + k)
        codes = torch.randint(-(2 ** 31), 2 ** 31 - 1, (rows, W), dtype=torch.int32, generator=g).to(dev)
        s = (torch.rand(rows, nb, generator=g) * 0.02 + 0.001).to(dev)
        o = (-torch.rand(rows, nb, generator=g) * 0.02).to(dev) if affine else None
        cb = torch.sort(torch.randn(1 << k, generator=g)).values.to(dev)
        x = torch.randn(M, cols, generator=g).to(dev)
        return codes, s, o, cb, x

    def cfg_for(k, rows, W, tun=None):
        """The launch shape (a string with the split-K slices where S > 1)."""
        tun = dict(K.BYTES_TUNING, **(tun or {}))
        if hasattr(K, "bytes_gemv_plan"):
            V, NV, _, grid, threads, split, _ = K.bytes_gemv_plan(k, M, affine, B, rows, W, **tun)
            xr = K.xr_gemv_config(k, M, B, rows, NV, **tun)
            if xr is not None:
                return (f"x-in-registers V={xr[0]} NG={xr[1]} D={xr[2]} warps/row={xr[3]} grid={grid} "
                        f"threads={threads}" + (f" MAXREG={tun['MAXREG']}" if tun.get("MAXREG") else ""))
        V = K.bytes_gemv_config(k, M, B, rows, 1, **tun).V
        NV = max(1, W // V)
        S, NVS = K.bytes_gemv_split(k, M, B, rows, NV, **tun) if hasattr(K, "bytes_gemv_split") else (1, NV)
        cfg = K.bytes_gemv_config(k, M, B, rows, NVS, **tun)
        extra = (f" SPLIT S={S} NVS={NVS} of NV={NV}" if S > 1 else "") + (
            f" MAXREG={tun['MAXREG']}" if tun.get("MAXREG") else "")
        return f"{cfg!r}{extra}" if extra else cfg

    def shape_data(shape, header):
        """(rows, cols, k0, (codes, s, o, cb, x), bytes read) of a shape, printing its header;
        None when its data cannot be made."""
        rows, cols = shape
        k0 = ks[0]
        print(header(rows, cols))
        try:
            data = weights(rows, cols, k0)
        except Exception as e:
            print(f"  data: FAILED {e}")
            return None
        return rows, cols, k0, data, gemv_bytes_count(*data[:3], data[4], rows)

    def gemv_bytes_count(codes, s, o, x, rows):
        return (codes.numel() * 4 + s.numel() * 4 * (2 if o is not None else 1) + x.numel() * 4 + M * rows * 4)

    for shape in shapes:
        got = shape_data(shape, lambda r, c: f"\n{r}x{c}, M={M}, B={B}{' affine' if affine else ''}")
        if got is None:
            continue
        rows, cols, k0, (codes, s, o, cb, x), nbytes = got
        # fp16 F.linear first (the ratios refer to it)
        try:
            w16 = torch.randn(rows, cols, device=dev).to(torch.float16 if dev == "cuda" else torch.float32)
            x16 = x.to(w16.dtype)
            t = run("fp16 F.linear", shape, 16, w16.numel() * 2 + x16.numel() * 2 + M * rows * 2,
                    lambda: F.linear(x16, w16))
            if t:
                fp16_time[shape] = t
            del w16
        except Exception as e:
            print(f"  fp16 F.linear FAILED: {e}")
        run(f"bytes k={k0}", shape, k0, nbytes, lambda: K.gemv_bytes_torch(codes, k0, B, cols, s, o, cb, x),
            cfg_over=cfg_for(k0, rows, codes.shape[1]))
        xr = dict(KERNEL="xr")
        run(f"bytes k={k0} x-in-registers", shape, k0, nbytes,
            lambda: K.gemv_bytes_torch(codes, k0, B, cols, s, o, cb, x), tuning=xr,
            cfg_over=cfg_for(k0, rows, codes.shape[1], xr))
        if shape == shapes[0]:  # correctness spot check against dequantize + F.linear
            try:
                y = K.gemv_bytes_torch(codes, k0, B, cols, s, o, cb, x)
                w = K.dequantize_bytes_torch(codes, k0, B, cols, s, o, cb)
                y64 = x.double() @ w.double().T
                bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-30
                ok = bool(((y.double() - y64).abs() <= bound).all())
                print(f"  check: bytes GEMV vs float64 dequantize-product: {'ok' if ok else 'MISMATCH'}")
                info["spot_check_ok"] = ok
                for name, over in (("x-in-registers", dict(KERNEL="xr")), ("split-K S=3", dict(SPLIT=3))):
                    ys = K.gemv_bytes_torch(codes, k0, B, cols, s, o, cb, x, **over)
                    ok = bool(((ys.double() - y64).abs() <= bound).all())
                    print(f"  check: {name} vs float64 dequantize-product: {'ok' if ok else 'MISMATCH'}")
                    info[f"spot_check_{name.split()[0]}_ok"] = ok
                del w
            except Exception as e:
                print(f"  check FAILED: {e}")
                info["spot_check_ok"] = f"error: {e}"
        run(f"planes k={k0}", shape, k0, nbytes, lambda: K.gemv_torch(codes, k0, B, cols, s, o, cb, x))
        dq_bytes = codes.numel() * 4 + s.numel() * 4 + rows * cols * 4
        run(f"dq-bytes k={k0}", shape, k0, dq_bytes, lambda: K.dequantize_bytes_torch(codes, k0, B, cols, s, o, cb))
        if dev == "cuda":  # (dequantize_torch takes CUDA tensors only)
            run(f"dq-planes k={k0}", shape, k0, dq_bytes, lambda: K.dequantize_torch(codes, k0, B, cols, s, o, cb))
        del codes
        for k in ks[1:] if shape == shapes[0] else ():  # (each k and shape compiles a kernel: first shape only)
            try:
                ck, sk, ok_, cbk, xk = weights(rows, cols, k)
            except Exception as e:
                print(f"  data k={k}: FAILED {e}")
                continue
            run(f"bytes k={k}", shape, k, gemv_bytes_count(ck, sk, ok_, xk, rows),
                lambda: K.gemv_bytes_torch(ck, k, B, cols, sk, ok_, cbk, xk),
                cfg_over=cfg_for(k, rows, ck.shape[1]))
            del ck

    if sweep_shapes:
        print(f"\nlaunch-shape sweep of the bytes GEMV, k={ks[0]} (BYTES_TUNING)")
    for shape in sweep_shapes:
        got = shape_data(shape, lambda r, c: f"{r}x{c}")
        if got is None:
            continue
        rows, cols, k0, (codes, s, o, cb, x), nbytes = got
        for label, tun in SWEEP:
            try:
                cfg = cfg_for(k0, rows, codes.shape[1], tun)
            except Exception as e:
                print(f"  {label}: no config ({e})")
                continue
            run(f"bytes k={k0} {label}", shape, k0, nbytes,
                lambda: K.gemv_bytes_torch(codes, k0, B, cols, s, o, cb, x), tuning=tun, cfg_over=cfg)
        del codes

    info["seconds"] = round(time.perf_counter() - t_start, 1)
    print(f"\ndone in {info['seconds']} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1, default=str))
    if args.markdown:
        lines = [f"# bench_gemv_cuda ({info['device']})", "",
                 ", ".join(f"{k}: {v}" for k, v in info.items()), "",
                 "| shape | variant | us/call | method | GB/s | of copy BW | vs fp16 | host us/call |",
                 "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in results:
            if "us" not in r:
                lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['variant']} | {r.get('error', r.get('skipped'))} |"
                             " | | | | |")
                continue
            f = lambda key, fmt: (fmt.format(r[key]) if key in r else "")  # noqa: E731
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['variant']} | {r['us']:.2f} | {r['method']} | "
                         f"{r['GBps']:.1f} | {f('frac_copy_bw', '{:.1%}')} | {f('vs_fp16', '{:.2f}x')} | "
                         f"{f('host_us', '{:.1f}')} |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    failed = [r for r in results if "error" in r]
    return 1 if failed and not args.dry_run else 0


if __name__ == "__main__":
    sys.exit(main())
