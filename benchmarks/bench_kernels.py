#!/usr/bin/env python
"""Kernel benchmark: quantization speed and quality of kbit's CPU kernels against the
peers that run on this machine (gguf's numpy quantizer, bitsandbytes' CPU backend and,
when built, llama.cpp's llama-quantize).

    .venv/bin/python benchmarks/bench_kernels.py                 # ~6-10 min on 2 cores
    .venv/bin/python benchmarks/bench_kernels.py --quick         # ~1 min, smaller matrices
    .venv/bin/python benchmarks/bench_kernels.py --markdown out.md

Everything runs on a float32 Gaussian matrix (N(0, 0.02^2), seed 0; 4096 x 4096 by
default) with 2 threads. Timings repeat (round-robin where contenders are compared) and
print min and median; compare the RATIOS measured in one run, not absolute times
across runs. Relative RMSE = ||W - deq(q(W))|| / ||W||; bits per weight are the true
stored bits (codes, scales, offsets, double-quantization maxima, padding).

llama.cpp: set KBIT_LLAMA_CPP_DIR to a llama.cpp checkout/build (or build it into
~/.cache/kbit-peers/llama.cpp, see docs/benchmarks.md); without llama-quantize those
rows are skipped with a note and the published figure from the notes is used instead.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Report, machine, set_threads, timeit, timeit_interleaved, versions  # noqa: E402

set_threads(2)

import numpy as np  # noqa: E402

from kbitformat import NumpyOps, QuantSpec, dequantize, quantize, relative_error  # noqa: E402
from kbitformat.constants import DTYPES  # noqa: E402
from kbitcli.kernels import get_ops  # noqa: E402

CPU = get_ops("cpu")
BITS = tuple(range(2, 9))
BLOCKS = (32, 64, 128, 256, 1024)
#: published in the project's field notes for this matrix (used when llama-quantize is absent)
Q4K_PUBLISHED = 0.0713
#: llama-quantize types measured when it is available (bits per weight from the file)
LLAMA_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "IQ4_XS", "IQ4_NL", "Q5_K", "Q6_K", "Q8_0")
GGUF_PY_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q8_0")
ODD_SHAPES = ((3, 100), (1, 4096), (1,), (7,), (2, 3, 70))


def gaussian(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)


def rel(W, Y) -> float:
    return relative_error(W, np.asarray(Y, dtype=np.float32).reshape(W.shape))


# ----------------------------------------------------------------------------- peers
def bnb_module():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as F
        return F
    except Exception as e:  # noqa: BLE001
        print(f"note: bitsandbytes unavailable ({e}); its rows are skipped")
        return None


def gguf_module():
    try:
        import gguf
        return gguf
    except Exception as e:  # noqa: BLE001
        print(f"note: gguf unavailable ({e}); its rows are skipped")
        return None


def find_llama_quantize() -> Path | None:
    cands = []
    env = os.environ.get("KBIT_LLAMA_CPP_DIR")
    if env:
        e = Path(env).expanduser()
        cands += [e / "build" / "bin" / "llama-quantize", e / "bin" / "llama-quantize", e / "llama-quantize"]
    cands.append(Path.home() / ".cache" / "kbit-peers" / "llama.cpp" / "build" / "bin" / "llama-quantize")
    w = shutil.which("llama-quantize")
    if w:
        cands.append(Path(w))
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


class LlamaQuantize:
    """Runs llama-quantize on W written as a one-tensor F32 GGUF (arch llama, one layer)."""

    TENSOR = "blk.0.ffn_up.weight"

    def __init__(self, exe: Path, W: np.ndarray, gguf, tmp: Path) -> None:
        self.exe, self.W, self.gguf, self.tmp = exe, W, gguf, tmp
        self.src = tmp / "w-f32.gguf"
        rows, cols = W.shape
        w = gguf.GGUFWriter(str(self.src), "llama")
        w.add_context_length(4096)
        w.add_embedding_length(cols)
        w.add_block_count(1)
        w.add_feed_forward_length(rows)
        w.add_head_count(32)
        w.add_head_count_kv(32)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0)
        w.add_tensor(self.TENSOR, W)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def run(self, qtype: str) -> tuple[float, float, Path]:
        """(llama's own 'quantize time' in s (load + quantize + write), process wall s, output)."""
        out = self.tmp / f"w-{qtype}.gguf"
        t = time.perf_counter()
        p = subprocess.run([str(self.exe), "--pure", str(self.src), str(out), qtype, "2"],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"llama-quantize {qtype} failed: {' | '.join(tail)}")
        m = re.search(r"quantize time =\s*([\d.]+) ms", p.stdout + p.stderr)
        return (float(m.group(1)) / 1000 if m else wall), wall, out

    def read(self, path: Path) -> tuple[np.ndarray, float, str]:
        """(dequantized W, bits per weight, stored type name) of an output file."""
        r = self.gguf.GGUFReader(str(path))
        t = next(t for t in r.tensors if t.name == self.TENSOR)
        y = self.gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return y.reshape(self.W.shape), t.n_bytes * 8 / t.n_elements, t.tensor_type.name


# ----------------------------------------------------------------------------- sections
def speed_headline(W, rep: Report, repeats: int, bnb, gguf, llama: dict) -> dict:
    rep.section(f"Speed: 4-bit quantize+pack of a {W.shape[0]}x{W.shape[1]} float32 matrix, block 64")
    n = W.size
    fns, bpw = {}, {}
    for d in ("int", "affine", "nf", "fp", "quantile"):
        sp = QuantSpec(4, d, 64)
        bpw[f"kbit 4:{d}:b64"] = quantize(W[:64], sp, ops=CPU).bits_per_weight
        fns[f"kbit 4:{d}:b64"] = lambda sp=sp: quantize(W, sp, ops=CPU)
    if gguf is not None:
        fns["gguf Q4_0 (numpy)"] = lambda: gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)
        bpw["gguf Q4_0 (numpy)"] = 4.5
    if bnb is not None:
        import torch
        Wt = torch.from_numpy(W)
        fns["bnb NF4 b64 (quantize_4bit)"] = lambda: bnb.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
        bpw["bnb NF4 b64 (quantize_4bit)"] = 4 + 32 / 64
    T = timeit_interleaved(fns, repeats=repeats, warmup=1)
    g = T.get("gguf Q4_0 (numpy)")
    b = T.get("bnb NF4 b64 (quantize_4bit)")
    rows = []
    for k, t in T.items():
        rows.append([k, bpw[k], t.min, t.median, t.rate(n) / 1e6,
                     f"{g.min / t.min:.2f}" if g else "-", f"{b.min / t.min:.1f}" if b else "-"])
    for qt in ("Q4_0", "Q4_K"):
        if qt in llama and llama[qt].get("times"):
            ts = llama[qt]["times"]
            tmin, tmed = min(ts), float(np.median(ts))
            rows.append([f"llama-quantize {qt} (C, 2 threads; incl. file I/O)", llama[qt]["bpw"], tmin, tmed,
                         n / tmin / 1e6, f"{g.min / tmin:.2f}" if g else "-", f"{b.min / tmin:.1f}" if b else "-"])
    rep.table(["quantizer", "bits/w", "min s", "median s", "Mweights/s", "x gguf Q4_0", "x bnb NF4"], rows)
    rep.note(f"{repeats} timed runs each after a warm-up, round-robin; ratios = peer min time / this min time. "
             "kbit times are the whole `quantize()` call (stats, scale encoding, codebook, quantize+pack) "
             "on CpuOps. llama-quantize's time is its own 'quantize time' (mmap read of the F32 file, "
             "quantize, write), run separately.")
    for d in ("int", "affine"):
        t = T[f"kbit 4:{d}:b64"]
        if g:
            r = g.min / t.min
            rep.check(f"4:{d}:b64 quantize >= 1x gguf Q4_0", r >= 1.0,
                      f"{r:.2f}x (kbit {t.min * 1e3:.0f} ms, gguf {g.min * 1e3:.0f} ms, min of {repeats})")
        if b:
            r = b.min / t.min
            rep.check(f"4:{d}:b64 quantize >= 10x bnb NF4", r >= 10.0,
                      f"{r:.1f}x (kbit {t.min * 1e3:.0f} ms, bnb {b.min * 1e3:.0f} ms)")
    for d in ("nf", "fp", "quantile"):
        t = T[f"kbit 4:{d}:b64"]
        if b:
            r = b.min / t.min
            rep.check(f"4:{d}:b64 quantize >= 3x bnb NF4", r >= 3.0,
                      f"{r:.1f}x (kbit {t.min * 1e3:.0f} ms, bnb {b.min * 1e3:.0f} ms)")
    return T


def speed_sweep(W, rep: Report, repeats: int, pool: list, label: str, warmup: int = 1) -> None:
    rep.section(f"Speed: every k and data type (block 64, fp16 scales, {label})")
    n = W.size
    qrate, drate, errs = {}, {}, {}
    for d in DTYPES:
        for k in BITS:
            sp = QuantSpec(k, d, 64)
            tq = timeit(lambda: quantize(W, sp, ops=CPU), repeats=repeats, warmup=warmup)
            qt = quantize(W, sp, ops=CPU)
            td = timeit(lambda: dequantize(qt, CPU), repeats=repeats, warmup=warmup)
            qrate[d, k], drate[d, k] = tq.rate(n) / 1e6, td.rate(n) / 1e6
            errs[d, k] = rel(W, dequantize(qt, CPU))
            pool.append((sp.label(), qt.bits_per_weight, errs[d, k], label))
    head = ["dtype"] + [f"k={k}" for k in BITS]
    rep.table(head, [[d] + [qrate[d, k] for k in BITS] for d in DTYPES],
              title="quantize (whole quantize() call), Mweights/s, best of runs")
    rep.table(head, [[d] + [drate[d, k] for k in BITS] for d in DTYPES],
              title="unpack + dequantize (dequantize(qt, CpuOps)), Mweights/s")
    rep.table(head, [[d] + [errs[d, k] for k in BITS] for d in DTYPES],
              title="relative RMSE at these settings (bits/weight = k + 0.25, affine k + 0.5)")
    rep.note(f"{repeats} timed runs after {warmup} warm-up run(s) per cell; Mweights/s = 1e6 weights per second at the best run.")


def dequant_compare(W, rep: Report, repeats: int, bnb, gguf, llama_files: dict, ref_repeats: int) -> None:
    rep.section("Speed: unpack + dequantize, 4 bits")
    n = W.size
    fns = {}
    for d in ("int", "affine", "nf"):
        qt = quantize(W, QuantSpec(4, d, 64), ops=CPU)
        fns[f"kbit 4:{d}:b64 (CpuOps)"] = lambda qt=qt: dequantize(qt, CPU)
    if bnb is not None:
        import torch
        q, st = bnb.quantize_4bit(torch.from_numpy(W), blocksize=64, quant_type="nf4")
        fns["bnb NF4 b64 dequantize_4bit"] = lambda: bnb.dequantize_4bit(q, st)
    if gguf is not None:
        q40 = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)
        fns["gguf Q4_0 dequantize (numpy)"] = lambda: gguf.quants.dequantize(q40, gguf.GGMLQuantizationType.Q4_0)
        if "Q4_K" in llama_files:
            data, tt = llama_files["Q4_K"]
            fns["gguf Q4_K dequantize (numpy)"] = lambda: gguf.quants.dequantize(data, tt)
    T = timeit_interleaved(fns, repeats=repeats, warmup=1)
    ref = T.get("bnb NF4 b64 dequantize_4bit")
    rows = [[k, t.min, t.median, t.rate(n) / 1e6, f"{ref.min / t.min:.2f}" if ref else "-"] for k, t in T.items()]
    for d in ("int", "nf"):
        qt = quantize(W, QuantSpec(4, d, 64), ops=CPU)
        t = timeit(lambda: dequantize(qt, NumpyOps), repeats=ref_repeats, warmup=0)
        rows.append([f"kbit 4:{d}:b64 (numpy reference)", t.min, t.median, t.rate(n) / 1e6,
                     f"{ref.min / t.min:.2f}" if ref else "-"])
    for d in ("int", "nf"):
        sp = QuantSpec(4, d, 64)
        t = timeit(lambda: quantize(W, sp, ops=NumpyOps), repeats=ref_repeats, warmup=0)
        rows.append([f"quantize 4:{d}:b64 (numpy reference, for context)", t.min, t.median, t.rate(n) / 1e6, "-"])
    rep.table(["dequantizer", "min s", "median s", "Mweights/s", "x bnb"], rows)
    rep.note("x bnb = bnb dequantize_4bit min time / this min time (> 1: faster than bnb).")


def quality_peers(W, rep: Report, bnb, gguf, llama: dict, llama_files: dict) -> list:
    """Peer quality rows: (name, bits/weight, rel RMSE)."""
    rep.section(f"Quality of the peers on the same {W.shape[0]}x{W.shape[1]} matrix")
    peers = []
    if bnb is not None:
        import torch
        Wt = torch.from_numpy(W)
        q, st = bnb.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
        peers.append(("bnb NF4 b64 (fp32 absmax)", 4 + 32 / 64, rel(W, bnb.dequantize_4bit(q, st).numpy())))
        q, st = bnb.quantize_4bit(Wt, blocksize=64, quant_type="nf4", compress_statistics=True)
        peers.append(("bnb NF4 b64 + double quant", 4 + 8 / 64 + 32 / (64 * 256) + 32 / W.size,
                      rel(W, bnb.dequantize_4bit(q, st).numpy())))
        q, st = bnb.quantize_4bit(Wt, blocksize=64, quant_type="fp4")
        peers.append(("bnb FP4 b64 (fp32 absmax)", 4 + 32 / 64, rel(W, bnb.dequantize_4bit(q, st).numpy())))
    if gguf is not None:
        for name in GGUF_PY_TYPES:
            tt = gguf.GGMLQuantizationType[name]
            q = gguf.quants.quantize(W, tt)
            peers.append((f"gguf {name} (numpy)", q.nbytes * 8 / W.size, rel(W, gguf.quants.dequantize(q, tt))))
    for name, r in llama.items():
        if "err" in r:
            peers.append((f"llama-quantize {name}", r["bpw"], r["err"]))
    rows = [[n, b, e] for n, b, e in sorted(peers, key=lambda p: p[1])]
    rep.table(["peer", "bits/w", "rel RMSE"], rows)
    return peers


def quality_grid(Wg, rep: Report, pool: list, label: str, blocks=BLOCKS) -> None:
    rep.section(f"Quality: every data type x k x block size (fp16 scales, no search; {label})")
    res = {}
    for d in DTYPES:
        for k in BITS:
            for B in blocks:
                sp = QuantSpec(k, d, B)
                qt = quantize(Wg, sp, ops=CPU)
                e = rel(Wg, dequantize(qt, CPU))
                res[d, k, B] = (e, qt.bits_per_weight)
                pool.append((sp.label(), qt.bits_per_weight, e, label))
    rows = [[f"{k}:{d}"] + [f"{res[d, k, B][0]:.4f} @ {res[d, k, B][1]:.4g}" for B in blocks]
            for k in BITS for d in DTYPES]
    rep.table(["k:dtype"] + [f"b{B}" for B in blocks], rows,
              title="relative RMSE @ true bits per weight")


def quality_scales(W, rep: Report, pool: list, label: str, quick: bool = False) -> None:
    rep.section(f"Quality: 4 bits, scale encodings and mse search, blocks 32 / 64 ({label})")
    rows = []
    for d in (("affine", "nf", "lloyd") if quick else DTYPES):
        for B in (32, 64):
            for enc in ("fp16", "dq", "e8"):
                row = [f"4:{d}:b{B}:{enc}"]
                for search in ("none", "mse"):
                    sp = QuantSpec(4, d, B, enc, search)
                    t = time.perf_counter()
                    qt = quantize(W, sp, ops=CPU)
                    dt = time.perf_counter() - t
                    e = rel(W, dequantize(qt, CPU))
                    pool.append((sp.label(), qt.bits_per_weight, e, label))
                    if search == "none":
                        row += [qt.bits_per_weight, e]
                    else:
                        row += [e, dt]
                rows.append(row)
    rep.table(["setting", "bits/w", "rel RMSE", "rel RMSE mse", "mse quantize s"], rows)


def quality_other_k(W, rep: Report, pool: list, label: str, quick: bool = False) -> None:
    """Settings for the peers' other budgets (Q2_K 2.625, Q3_K 3.44, Q5_K 5.5, Q6_K 6.56 bits/w):
    one-byte scales and the mse search, so that k != 4 is compared at its best too."""
    rep.section(f"Quality: k = 2, 3, 5, 6 with one-byte scales and mse search ({label})")
    cands = [("affine", 32, "e8"), ("affine", 64, "e8"), ("lloyd", 32, "e8"), ("nf", 32, "e8"), ("lloyd", 64, "dq")]
    if quick:
        cands = cands[:1]
    rows = []
    for k in (2, 3, 5, 6):
        for d, B, enc in cands:
            sp = QuantSpec(k, d, B, enc, "mse")
            qt = quantize(W, sp, ops=CPU)
            e = rel(W, dequantize(qt, CPU))
            pool.append((sp.label(), qt.bits_per_weight, e, label))
            rows.append([sp.label(), qt.bits_per_weight, e])
    rep.table(["setting", "bits/w", "rel RMSE"], rows)


def quality_headline(rep: Report, pool: list, peers: list, full_label: str, llama_ok: bool) -> None:
    rep.section("Quality: best kbit setting at a bit budget, against the peers")
    full = [p for p in pool if p[3] == full_label]

    def best(cands, budget):
        c = [p for p in cands if p[1] <= budget + 1e-9]
        return min(c, key=lambda p: p[2]) if c else None

    rows = []
    for name, b, e in sorted(peers, key=lambda p: p[1]):
        bk = best(full, b) or best(pool, b)
        if bk:
            rows.append([name, b, e, bk[0], bk[1], bk[2], f"{(1 - bk[2] / e) * 100:+.1f}%", bk[3]])
    rep.table(["peer", "bits/w", "rel RMSE", "best kbit at <= bits/w", "kbit bits/w", "kbit rel RMSE",
               "error reduction", "measured on"], rows)
    q4k = next((p for p in peers if p[0] == "llama-quantize Q4_K"), None)
    q4k_err = q4k[2] if q4k else Q4K_PUBLISHED
    src = "measured here" if q4k else "published in the field notes (llama-quantize not built)"
    b45 = best(full, 4.5)
    if b45:
        rep.check("best kbit at <= 4.5 bits/w beats llama.cpp Q4_K", b45[2] < q4k_err,
                  f"{b45[0]} {b45[2]:.4f} @ {b45[1]:.4g} bpw vs Q4_K {q4k_err:.4f} @ 4.5 ({src})")
    nf4 = next((p for p in peers if p[0].startswith("bnb NF4 b64 (fp32")), None)
    b425 = best(full, 4.25)
    if b425:
        if nf4:
            rep.check("best kbit at <= 4.25 bits/w beats bnb NF4 b64 (4.5 bpw)", b425[2] < nf4[2],
                      f"{b425[0]} {b425[2]:.4f} @ {b425[1]:.4g} bpw vs bnb NF4 {nf4[2]:.4f} @ 4.5")
        else:
            rep.check("best kbit at <= 4.25 bits/w beats bnb NF4 b64", b425[2] < 0.0920,
                      f"{b425[0]} {b425[2]:.4f} vs published 0.0920 (bitsandbytes absent)")
    for lab in ("4:affine:b32:e8:mse", "4:nf:b64:dq:mse", "4:lloyd:b64:dq:mse", "4:lloyd:b32:e8:mse"):
        p = next((p for p in full if p[0] == lab), None)
        if p:
            rep.note(f"{lab}: rel RMSE {p[2]:.4f} at {p[1]:.4f} bits/weight")


def bit_exactness(rep: Report, quick: bool = False) -> None:
    rep.section("Bit-exactness: numpy reference vs CpuOps")
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(s).astype(np.float32) * np.float32(0.05) for s in ODD_SHAPES]
    rows, total, bad = [], 0, []
    for d in DTYPES:
        for k in BITS:
            ok = {"codes": True, "scales": True, "dequantized": True}
            specs = [QuantSpec(k, d, 64), QuantSpec(k, d, 0, "e8")]
            if not quick:
                specs.insert(1, QuantSpec(k, d, 32, "dq", "mse"))
            for sp in specs:
                for x in xs:
                    a = quantize(x, sp, ops=NumpyOps)
                    b = quantize(x, sp, ops=CPU)
                    ca, cb_ = a.components(), b.components()
                    same_codes = a.codes.tobytes() == b.codes.tobytes() and a.codebook.tobytes() == b.codebook.tobytes()
                    same_scales = ca.keys() == cb_.keys() and all(
                        ca[n].dtype == cb_[n].dtype and ca[n].tobytes() == cb_[n].tobytes() for n in ca if n != "codes")
                    same_deq = dequantize(a, NumpyOps).tobytes() == dequantize(b, CPU).tobytes()
                    ok["codes"] &= same_codes
                    ok["scales"] &= same_scales
                    ok["dequantized"] &= same_deq
                    total += 1
                    if not (same_codes and same_scales and same_deq):
                        bad.append(f"{sp.label()} {x.shape}")
            rows.append([f"{k}:{d}", *("identical" if ok[c] else "DIFFERENT" for c in ok)])
    rep.table(["k:dtype", "codes+codebook", "scales/offsets", "dequantized"], rows)
    rep.note(f"{total} cases: specs b64:fp16{'' if quick else ', b32:dq:mse'} and row:e8 x shapes {list(ODD_SHAPES)}; "
             f"{'all bit-identical' if not bad else str(len(bad)) + ' differ: ' + ', '.join(bad[:10])}")
    rep.check("numpy reference and CpuOps bit-identical", not bad, f"{total - len(bad)}/{total} cases identical")


def run_llama(W, rep: Report, gguf, tmp: Path, repeats: int) -> tuple[dict, dict]:
    rep.section("llama.cpp llama-quantize")
    exe = find_llama_quantize()
    if exe is None or gguf is None:
        rep.note("llama-quantize not found (set KBIT_LLAMA_CPP_DIR or build it into "
                 "~/.cache/kbit-peers/llama.cpp, see docs/benchmarks.md): skipped; the Q4_K goal "
                 f"uses the published {Q4K_PUBLISHED} from the field notes.")
        return {}, {}
    lq = LlamaQuantize(exe, W, gguf, tmp)
    res, files = {}, {}
    for qtype in LLAMA_TYPES:
        try:
            n = repeats if qtype in ("Q4_0", "Q4_K") else 1
            times, walls = [], []
            for _ in range(n + (1 if n > 1 else 0)):  # one warm-up run when repeating
                t, wall, out = lq.run(qtype)
                times.append(t)
                walls.append(wall)
            if n > 1:
                times, walls = times[1:], walls[1:]
            y, bpw, stored = lq.read(out)
            r = lq.gguf.GGUFReader(str(out))
            t0 = next(t for t in r.tensors if t.name == lq.TENSOR)
            files[qtype] = (np.asarray(t0.data).copy(), t0.tensor_type)
            res[qtype] = {"times": times, "walls": walls, "bpw": bpw, "err": rel(W, y), "stored": stored}
            out.unlink()
        except Exception as e:  # noqa: BLE001
            rep.note(f"llama-quantize {qtype}: {e}")
    rep.table(["type", "stored as", "bits/w", "rel RMSE", "quantize time min s", "process wall min s", "runs"],
              [[q, r["stored"], r["bpw"], r["err"], min(r["times"]), min(r["walls"]), len(r["times"])]
               for q, r in res.items()])
    rep.note(f"{exe} --pure in.gguf out.gguf TYPE 2 (one F32 tensor {W.shape[0]}x{W.shape[1]} named "
             f"{LlamaQuantize.TENSOR}); read back with gguf.GGUFReader + gguf.quants.dequantize.")
    return res, files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~1 minute: smaller matrices, fewer repeats")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    ap.add_argument("--rows", type=int, default=None, help="rows of the headline matrix (default 4096; --quick 1024)")
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--grid-rows", type=int, default=None,
                    help="rows of the matrix for the full dtype x k x block grid (default 1024; --quick 256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 5; --quick 3)")
    ap.add_argument("--no-llama", action="store_true", help="do not run llama-quantize even if found")
    a = ap.parse_args(argv)
    rows = a.rows or (1024 if a.quick else 4096)
    grid_rows = a.grid_rows or (256 if a.quick else 1024)
    repeats = a.repeats or (3 if a.quick else 5)
    sweep_repeats = 1 if a.quick else 3
    t_start = time.perf_counter()

    rep = Report()
    W = gaussian(rows, a.cols)
    Wg = W[:grid_rows]
    full_label = f"{rows}x{a.cols}"
    grid_label = f"first {grid_rows} rows ({grid_rows}x{a.cols})"
    rep.note(f"machine: {machine()}")
    rep.note(f"versions: {versions('numpy', 'numba', 'torch', 'gguf', 'bitsandbytes')}; threads: torch 2, numba 2")
    rep.note(f"matrix: {rows}x{a.cols} float32, N(0, 0.02^2), seed 0; full grid on its first {grid_rows} rows")
    bnb, gguf = bnb_module(), gguf_module()
    quantize(W[:64], QuantSpec(4, "int", 64), ops=CPU)  # compile / load the numba cache

    pool: list = []
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kbit-bench-") as tmp:
        llama, llama_files = ({}, {}) if a.no_llama else run_llama(W, rep, gguf, Path(tmp), repeats)
    print(f"(llama: {time.perf_counter() - t:.1f} s)", flush=True)
    steps = [
        ("speed_headline", lambda: speed_headline(W, rep, repeats, bnb, gguf, llama)),
        ("dequant_compare", lambda: dequant_compare(W, rep, repeats, bnb, gguf, llama_files, 1 if a.quick else 2)),
        ("speed_sweep", lambda: speed_sweep(W, rep, sweep_repeats, pool, full_label, 0 if a.quick else 1)),
        ("quality_peers", lambda: peers.extend(quality_peers(W, rep, bnb, gguf, llama, llama_files))),
        ("quality_scales", lambda: quality_scales(W, rep, pool, full_label, a.quick)),
        ("quality_other_k", lambda: quality_other_k(W, rep, pool, full_label, a.quick)),
        ("quality_grid", lambda: quality_grid(Wg, rep, pool, grid_label, (32, 128, 1024) if a.quick else BLOCKS)),
        ("quality_headline", lambda: quality_headline(rep, pool, peers, full_label, bool(llama))),
        ("bit_exactness", lambda: bit_exactness(rep, a.quick)),
    ]
    peers: list = []
    for name, fn in steps:
        t = time.perf_counter()
        fn()
        print(f"({name}: {time.perf_counter() - t:.1f} s)", flush=True)
    rep.checks_table()
    took = time.perf_counter() - t_start
    rep.note(f"bench_kernels took {took:.0f} s ({'--quick' if a.quick else 'default run'})")
    if a.markdown:
        cmd = "python benchmarks/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        rep.write(a.markdown, f"<!-- {cmd.strip()} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
