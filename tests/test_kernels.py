"""The Numba kernels (CPU, CUDA) against the numpy reference: identical bits.

CUDA runs in Numba's CUDA simulator (see conftest.py) unless KBIT_REAL_GPU=1, so its
tensors are tiny here: the simulator runs a few thousand GPU threads a second. With a
real GPU (scripts/gpu_check.sh) the CUDA kernels get the CPU's full matrix and more.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kbitformat import KbitValueError, NumpyOps, QuantSpec, dequantize, quantize
from kbitformat import codebooks, scales
from kbitformat.constants import DTYPES, SCALE_ENCODINGS
from kbitformat.reference import pack
from kbitcli.kernels import cuda_usable, default_device, get_ops

REAL_GPU = os.environ.get("KBIT_REAL_GPU", "") == "1"
IMPLS = ["cpu", "cuda"]
BLOCKS = (32, 64, 128, 0)
F32 = np.float32


def ops_for(impl: str):
    if impl == "cuda":
        ok, why = cuda_usable()
        if not ok:
            if REAL_GPU:
                pytest.fail(f"KBIT_REAL_GPU=1 but CUDA is not usable: {why}")
            pytest.skip(why)
    return get_ops(impl)


def simulated(impl: str) -> bool:
    return impl == "cuda" and not REAL_GPU


# ----------------------------------------------------------------------------- helpers
def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    if not np.array_equal(bits(got), bits(want)):
        bad = np.argwhere(bits(got) != bits(want))
        i = tuple(bad[0])
        raise AssertionError(f"{what}: {len(bad)} differing entries, first at {i}: "
                             f"got {got[i]!r} want {want[i]!r}")


def assert_same_quantization(ops, x, spec: QuantSpec, what=""):
    """quantize + dequantize with `ops` give exactly the reference's bytes."""
    what = f"{what} {spec.label()} shape={np.shape(x)}"
    try:
        want = quantize(x, spec, ops=NumpyOps)
    except KbitValueError as e:
        with pytest.raises(KbitValueError):
            quantize(x, spec, ops=ops)
        return str(e)
    got = quantize(x, spec, ops=ops)
    assert got.shape == want.shape and got.block_size == want.block_size
    assert_same_bits(got.codebook, want.codebook, f"{what} codebook")
    assert_same_bits(got.codes, want.codes, f"{what} codes")
    assert sorted(got.scales) == sorted(want.scales)
    for name in want.scales:
        assert_same_bits(got.scales[name], want.scales[name], f"{what} {name}")
    assert (got.offsets is None) == (want.offsets is None)
    if want.offsets is not None:
        assert_same_bits(got.offsets, want.offsets, f"{what} offsets")
    assert_same_bits(dequantize(got, ops=ops), dequantize(want, ops=NumpyOps), f"{what} dequantized")
    return None


SHAPES = [(7, 100), (3, 33), (1, 64), (1,), (), (50,), (2, 3, 70), (4, 256), (5, 1)]
SIM_SHAPES = [(3, 40), (1,), (), (33,), (2, 2, 20), (1, 64), (2, 1)]


def make_x(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(F32)
    if x.ndim and x.size > 8:
        x.reshape(-1)[3] = 0.0
        x.reshape(-1)[5] = -0.0
        x.reshape(-1)[7] *= 4  # an outlier
    return x


# ----------------------------------------------------------------------------- registry
def test_registry():
    assert get_ops("numpy") is NumpyOps
    assert get_ops("cpu").name == "cpu"
    assert default_device() in ("cpu", "cuda")
    with pytest.raises(KbitValueError, match="unknown device"):
        get_ops("tpu")


def test_cuda_refused_clearly_without_gpu(monkeypatch):
    import kbitcli.kernels as K
    monkeypatch.setattr(K, "cuda_usable", lambda allow_simulator=True: (False, "no CUDA GPU was found"))
    with pytest.raises(KbitValueError, match="--device cpu"):
        K.get_ops("cuda")


def test_importing_the_package_does_not_import_the_cuda_kernels():
    import subprocess
    import sys
    code = ("import sys, kbitcli.kernels as k; k.get_ops('cpu'); "
            "assert 'kbitcli.kernels.cuda' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# ----------------------------------------------------------------------------- full quantize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", range(2, 9))
def test_cpu_quantize_matches_reference(dtype, k):
    ops = ops_for("cpu")
    for ib, B in enumerate(BLOCKS):
        for isc, enc in enumerate(SCALE_ENCODINGS):
            spec = QuantSpec(bits=k, dtype=dtype, block_size=B, scale=enc)
            shape = SHAPES[(ib * 4 + isc + k) % len(SHAPES)]
            assert_same_quantization(ops, make_x(shape, seed=k + 10 * ib + 100 * isc), spec)
            assert_same_quantization(ops, make_x((7, 100), seed=k), spec)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", (2, 3, 4, 6, 8))
def test_cpu_quantize_mse_matches_reference(dtype, k):
    ops = ops_for("cpu")
    for ib, B in enumerate((32, 64, 0)):
        enc = SCALE_ENCODINGS[(k + ib) % len(SCALE_ENCODINGS)]
        spec = QuantSpec(bits=k, dtype=dtype, block_size=B, scale=enc, search="mse")
        assert_same_quantization(ops, make_x((5, 100), seed=k + ib), spec)
    assert_same_quantization(ops, make_x((3,), seed=k), QuantSpec(k, dtype, 32, "fp16", "mse"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", range(2, 9))
def test_cuda_quantize_matches_reference(dtype, k):
    ops = ops_for("cuda")
    if REAL_GPU:
        for ib, B in enumerate(BLOCKS):
            for isc, enc in enumerate(SCALE_ENCODINGS):
                spec = QuantSpec(bits=k, dtype=dtype, block_size=B, scale=enc)
                shape = SHAPES[(ib * 4 + isc + k) % len(SHAPES)]
                assert_same_quantization(ops, make_x(shape, seed=k + ib), spec)
                assert_same_quantization(ops, make_x((67, 1000), seed=k), spec)
                for se in ("mse",) if (ib + isc) % 4 == 0 else ():
                    assert_same_quantization(ops, make_x((9, 300), seed=k), QuantSpec(k, dtype, B, enc, se))
        return
    # simulator: one small configuration per (dtype, k), rotating through the rest
    i = DTYPES.index(dtype) + k
    spec = QuantSpec(bits=k, dtype=dtype, block_size=BLOCKS[i % len(BLOCKS)],
                     scale=SCALE_ENCODINGS[(i // 2) % len(SCALE_ENCODINGS)])
    assert_same_quantization(ops, make_x(SIM_SHAPES[i % len(SIM_SHAPES)], seed=i), spec)


@pytest.mark.parametrize("dtype", ("int", "affine", "nf", "quantile"))
def test_cuda_quantize_mse_matches_reference(dtype):
    ops = ops_for("cuda")
    shape = (9, 300) if REAL_GPU else (2, 40)
    for k, B, enc in ((3, 32, "fp16"), (5, 0, "e8")):
        assert_same_quantization(ops, make_x(shape, seed=k), QuantSpec(k, dtype, B, enc, "mse"))


@pytest.mark.parametrize("impl", IMPLS)
def test_odd_shapes(impl):
    ops = ops_for(impl)
    spec = QuantSpec(4, "nf", 32, "fp16")
    for shape in [(1,), (), (1, 1), (3,), (33,), (2, 3, 5), (1, 31), (1, 33), (2, 1, 1)]:
        assert_same_quantization(ops, make_x(shape, seed=len(shape)), spec)
    assert_same_quantization(ops, make_x((2, 3, 5)), QuantSpec(3, "affine", 0, "dq"))
    assert_same_quantization(ops, np.float32(-2.5), QuantSpec(2, "affine", 32, "fp32"))
    assert_same_quantization(ops, np.float64(0.3) * np.ones((2, 7)), QuantSpec(6, "int", 32, "e8"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ("int", "affine", "fp"))
def test_all_zero_and_extreme_tensors(impl, dtype):
    ops = ops_for(impl)
    n = 40 if simulated(impl) else 200
    zeros = np.zeros((2, n), F32)
    zeros[1, ::3] = -0.0
    for enc in SCALE_ENCODINGS:
        spec = QuantSpec(4, dtype, 32, enc)
        assert_same_quantization(ops, zeros, spec)
        assert np.all(dequantize(quantize(zeros, spec, ops=ops), ops=ops) == 0)
    rng = np.random.default_rng(1)
    mixed = rng.standard_normal((2, n)).astype(F32)
    mixed[0, :32] = 0.0                           # an all-zero block beside normal ones
    mixed[1, :] *= F32(1e-40)                     # subnormal weights
    for enc in ("fp32", "fp16", "e8", "dq"):
        assert_same_quantization(ops, mixed, QuantSpec(3, dtype, 32, enc))
    huge = (rng.standard_normal((2, n)) * 1e37).astype(F32)
    huge[0, 0] = F32(3.4e38)
    assert_same_quantization(ops, huge, QuantSpec(5, dtype, 32, "fp32"))
    msg = assert_same_quantization(ops, huge, QuantSpec(5, dtype, 32, "fp16")) or ""
    # symmetric types: the scale exceeds fp16; affine: the block range (hi - lo) overflows float32
    assert ("overflows float32" if dtype == "affine" else "fp16") in msg


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_refused_like_the_reference(impl):
    ops = ops_for(impl)
    for bad in (np.nan, np.inf, -np.inf):
        x = make_x((2, 40))
        x[1, 7] = bad
        for dtype in ("int", "affine"):
            msg = assert_same_quantization(ops, x, QuantSpec(4, dtype, 32, "fp16"))
            assert msg and "NaN or Inf" in msg


# ----------------------------------------------------------------------------- the ops one by one
def random_blocks(rng, rows, cols):
    x = rng.standard_normal((rows, cols)).astype(F32)
    x[0, :] = 0.0
    if rows > 1:
        x[1, :] = -0.0
    if rows > 2:
        x[2, ::2] = -0.0
        x[2, 1::2] = 0.0
    if rows > 3:
        x[3, :] = np.abs(x[3, :])                   # no negatives
    if rows > 4:
        x[4, :] = -np.abs(x[4, :])                  # no positives
    if rows > 5:
        x[5, :] *= F32(3e37)                        # huge
    if rows > 6:
        x[6, :] *= F32(1e-42)                       # subnormal
    if rows > 7:
        x[7, 3 % cols] = np.inf
        x[7, 9 % cols] = -np.inf
    return x


def assert_same_or_both_nan(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan), what
    assert_same_bits(np.where(nan, 0, got).astype(got.dtype), np.where(nan, 0, want).astype(want.dtype), what)


@pytest.mark.parametrize("impl", IMPLS)
def test_stats(impl):
    ops = ops_for(impl)
    rng = np.random.default_rng(2)
    cols_list = (1, 31, 33, 100) if simulated(impl) else (1, 31, 33, 100, 1000)
    for cols in cols_list:
        x = random_blocks(rng, 9, cols)
        x[8, 0] = np.nan
        for B in (32, 64, 128):
            assert_same_or_both_nan(ops.stats(x, B, False), NumpyOps.stats(x, B, False), f"absmax {cols} {B}")
            for got, want in zip(ops.stats(x, B, True), NumpyOps.stats(x, B, True)):
                assert_same_or_both_nan(got, want, f"lo/hi {cols} {B}")


def _codebook_and_mids(dtype, k, rng):
    cb = codebooks.fixed_codebook(dtype, k)
    if cb is None:
        cb = codebooks.DATA_DEPENDENT[dtype](k, rng.standard_normal(5000).clip(-3, 3) / 3)
    return cb, codebooks.midpoints(cb)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_pack_on_ties_and_extremes(impl, dtype):
    """Values exactly on a midpoint go to the lower code; next to one, to the right side."""
    ops = ops_for(impl)
    rng = np.random.default_rng(3)
    ks = (3,) if simulated(impl) else range(2, 9)
    for k in ks:
        cb, mids = _codebook_and_mids(dtype, k, rng)
        vals = np.concatenate([mids, np.nextafter(mids, F32(np.inf)), np.nextafter(mids, F32(-np.inf)),
                               cb, [0.0, -0.0, 1.0, -1.0, 5.0, -5.0, 1e-30, -1e-30, np.inf, -np.inf, np.nan]]).astype(F32)
        cols = len(vals)
        B = 32 * -(-cols // 32) if simulated(impl) else 64
        nb = -(-cols // B)
        # scale 1, offset 0 (y = x exactly, so ties are real ties) and scale 0 (y = 0)
        x = np.stack([vals, vals, vals[::-1], vals]).astype(F32)
        s = np.ones((4, nb), F32)
        s[1] = 0.0
        s[2] = F32(0.5)
        s[3, 0] = F32(1e-40)
        for o in (None, np.zeros((4, nb), F32), np.full((4, nb), F32(-0.25))):
            want = NumpyOps.quantize_pack(x, B, k, s, o, cb, mids)
            got = ops.quantize_pack(x, B, k, s, o, cb, mids)
            assert_same_bits(got, want, f"{dtype} k={k} affine={o is not None}")


@pytest.mark.parametrize("impl", IMPLS)
def test_quantize_pack_random(impl):
    ops = ops_for(impl)
    rng = np.random.default_rng(4)
    cases = [(3, 70, 32), (2, 40, 64)] if simulated(impl) else [(9, 100, 32), (9, 1000, 64), (4, 300, 128), (3, 5000, 4096)]
    for rows, cols, B in cases:
        x = random_blocks(rng, rows, cols)
        x[np.isinf(x)] = 0
        nb = -(-cols // B)
        for dtype in ("int", "affine", "fp", "dynamic"):
            for k in ((2, 8) if simulated(impl) else (2, 4, 7, 8)):
                cb, mids = _codebook_and_mids(dtype, k, rng)
                s = np.abs(rng.standard_normal((rows, nb))).astype(F32) * F32(2)
                s[0, 0] = 0.0
                o = None if dtype != "affine" else -np.abs(rng.standard_normal((rows, nb))).astype(F32)
                assert_same_bits(ops.quantize_pack(x, B, k, s, o, cb, mids),
                                 NumpyOps.quantize_pack(x, B, k, s, o, cb, mids), f"{dtype} {k} {B}")


def test_cpu_code_search_methods_agree():
    """The four exact code searches of the CPU kernels (count, binary search, tables) on
    every codebook: each one alone equals np.searchsorted."""
    from kbitcli.kernels import cpu
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(4000) * 0.5, rng.standard_normal(1000) * 1e-4,
                        rng.uniform(-1.2, 1.2, 4000)]).astype(F32)
    try:
        for method in (cpu.METHOD_COUNT, cpu.METHOD_BSEARCH, cpu.METHOD_LUT, cpu.METHOD_LOGLUT):
            cpu.CodeSearch.force_method = method
            for dtype in DTYPES:
                for k in range(2, 9):
                    cb, mids = _codebook_and_mids(dtype, k, rng)
                    vals = np.concatenate([x.ravel(), mids, np.nextafter(mids, F32(2))]).astype(F32)
                    vals = np.resize(vals, (2, -(-vals.size // 128) * 64))
                    s = np.ones((2, vals.shape[1] // 64), F32)
                    assert_same_bits(cpu.CpuOps.quantize_pack(vals, 64, k, s, None, cb, mids),
                                     NumpyOps.quantize_pack(vals, 64, k, s, None, cb, mids), f"{method} {dtype} {k}")
    finally:
        cpu.CodeSearch.force_method = None


def test_cpu_bit_gather_tricks_are_exact():
    """The multiply-gather used by the CPU packer and the byte-spread table of its unpacker,
    for every byte pattern."""
    from kbitcli.kernels import cpu
    pat = np.arange(256, dtype=np.uint64)
    spread = cpu.SPREAD[pat]
    for t in range(8):
        assert np.array_equal((spread >> np.uint64(8 * t)) & np.uint64(0xFF), (pat >> np.uint64(t)) & np.uint64(1))
    gathered = (((spread & cpu._ONES) * cpu._GATHER) >> np.uint64(56))
    assert np.array_equal(gathered, pat)


@pytest.mark.parametrize("impl", IMPLS)
def test_search(impl):
    ops = ops_for(impl)
    rng = np.random.default_rng(6)
    cases = [(2, 40, 32)] if simulated(impl) else [(9, 100, 32), (9, 300, 64), (3, 1000, 0)]
    for rows, cols, B in cases:
        x = random_blocks(rng, rows, cols)
        x[np.isinf(x)] = 0
        B = B or 32 * -(-cols // 32)
        nb = -(-cols // B)
        for affine in (False, True):
            dtype = "affine" if affine else "nf"
            cb, mids = _codebook_and_mids(dtype, 3, rng)
            st = NumpyOps.stats(x, B, affine)
            cands = list(scales.raw_candidates(st, affine, "mse"))
            if simulated(impl):
                cands = cands[:2] + cands[-3:]
            cs = np.stack([c[0] for c in cands])
            cs[1] = cs[0]                          # a tie: the first one must win
            co = np.stack([c[1] for c in cands]) if affine else None
            if affine:
                co[1] = co[0]
            got = ops.search(x, B, cs, co, cb, mids)
            want = NumpyOps.search(x, B, cs, co, cb, mids)
            assert got.shape == (rows, nb)
            assert_same_bits(got, want, f"search affine={affine} {cols} {B}")
            assert not (want == 1).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_dequantize_random(impl):
    ops = ops_for(impl)
    rng = np.random.default_rng(7)
    cases = [(2, 70, 32), (1, 5, 64)] if simulated(impl) else [(9, 100, 32), (9, 1000, 64), (2, 5000, 4096), (1, 1, 32)]
    for rows, cols, B in cases:
        nb = -(-cols // B)
        for k in ((2, 5, 8) if simulated(impl) else range(2, 9)):
            words = rng.integers(0, 2**32, size=(rows, nb * B // 32 * k), dtype=np.uint64).astype(np.uint32)
            cb = np.sort(rng.standard_normal(2**k)).astype(F32)
            s = np.abs(rng.standard_normal((rows, nb))).astype(F32)
            s[0, 0] = 0.0
            if nb > 1:
                s[0, 1] = F32(3e38)                 # overflows to inf
            s[-1, -1] = F32(1e-41)                  # subnormal results
            o = -np.abs(rng.standard_normal((rows, nb))).astype(F32)
            for oo in (None, o):
                assert_same_bits(ops.dequantize(words, k, B, cols, s, oo, cb),
                                 NumpyOps.dequantize(words, k, B, cols, s, oo, cb), f"{k} {cols} {B}")


def test_cpu_pack_layout():
    """quantize_pack's words are the reference pack() of the reference codes."""
    ops = get_ops("cpu")
    rng = np.random.default_rng(8)
    k = 5
    cb = codebooks.int_codebook(k)
    mids = codebooks.midpoints(cb)
    x = rng.uniform(-1, 1, (3, 96)).astype(F32)
    s = np.ones((3, 3), F32)
    codes = np.searchsorted(mids, x, side="left")
    assert np.array_equal(ops.quantize_pack(x, 32, k, s, None, cb, mids), pack(codes, k))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernels_take_non_contiguous_and_float64_inputs(impl):
    ops = ops_for(impl)
    x = make_x((6, 80))[::2, :70]
    spec = QuantSpec(4, "int", 32, "fp32")
    assert_same_quantization(ops, x, spec)
    assert_same_quantization(ops, x.astype(np.float64), spec)


# ----------------------------------------------------------------------------- real CUDA codegen
PTX_CHECK = r'''
import re, sys, types
try:
    from numba.cuda.cudadrv import nvvm
    if not nvvm.is_available():
        sys.exit(77)
    nvvm.NVVM()
except Exception:
    sys.exit(77)
import numba.cuda.dispatcher as disp
if hasattr(disp, "get_current_device"):  # device functions ask the GPU's compute capability
    disp.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
from numba import cuda, float32, int32, int64, uint32, boolean
import kbitcli.kernels.cuda as K
assert not K.SIMULATOR
f1, f2, f3 = float32[::1], float32[:, ::1], float32[:, :, ::1]
kernels = {
    "stats": (K._stats_kernel, (f2, int64, int64, boolean, f2, f2)),
    "quantize_pack": (K._quantize_pack_kernel, (f2, int64, int64, f2, f2, boolean, f1, int64, uint32[::1])),
    "search": (K._search_kernel, (f2, int64, f3, f3, boolean, f1, f1, int32[:, ::1])),
    "dequantize": (K._dequantize_kernel, (uint32[::1], int64, int64, int64, f2, f2, boolean, f1, f2)),
}
for name, (kern, sig) in kernels.items():
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    ops = set(re.findall(r"^\s*((?:fma|mad|div|mul|add|sub|rcp)\.[a-z0-9.]+)", ptx, re.M))
    fops = {o for o in ops if o.endswith(("f32", "f64"))}
    bad = {o for o in fops if o.startswith(("fma", "mad", "rcp")) or ".ftz" in o or ".approx" in o or ".full" in o
           or (o.startswith(("mul", "add")) and ".rn" not in o)
           or (o.startswith("div") and ".rn" not in o)}
    print(name, sorted(fops))
    if bad:
        print("contracted/approximate float ops in", name, sorted(bad))
        sys.exit(1)
print("ok")
'''


def test_cuda_kernels_compile_to_exact_ptx():
    """Without a GPU: compile the CUDA kernels for sm_90 with the real NVVM (when a CUDA
    toolkit is installed) and check the PTX for float ops that would change bits: fused
    multiply-adds, flush-to-zero, approximate division, unrounded mul/add."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if "CUDA_HOME" not in env and os.path.isdir("/usr/local/cuda"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    out = subprocess.run([sys.executable, "-c", PTX_CHECK], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode == 77:
        pytest.skip("no CUDA toolkit (NVVM) on this machine")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@pytest.mark.parametrize("impl", IMPLS)
def test_mismatched_shapes_are_refused(impl):
    """Numba kernels do not check bounds: arrays that do not fit are refused up front."""
    ops = ops_for(impl)
    cb = codebooks.int_codebook(3)
    mids = codebooks.midpoints(cb)
    x = np.zeros((2, 70), F32)
    s = np.ones((2, 3), F32)
    words = np.zeros((2, 9), np.uint32)
    with pytest.raises(KbitValueError):
        ops.quantize_pack(x, 32, 3, s[:, :2], None, cb, mids)
    with pytest.raises(KbitValueError):
        ops.quantize_pack(x, 32, 3, s, s[:1], cb, mids)
    with pytest.raises(KbitValueError):
        ops.quantize_pack(x, 32, 4, s, None, cb, mids)          # 8 codes are not 4 bits
    with pytest.raises(KbitValueError):
        ops.quantize_pack(x, 48, 3, s, None, cb, mids)          # not a multiple of 32
    with pytest.raises(KbitValueError):
        ops.dequantize(words[:, :8], 3, 32, 70, s, None, cb)
    with pytest.raises(KbitValueError):
        ops.dequantize(words, 3, 32, 97, s, None, cb)           # 3 blocks hold 96 columns
    with pytest.raises(KbitValueError):
        ops.dequantize(words, 3, 32, 70, s, s[:, :2], cb)
    with pytest.raises(KbitValueError):
        ops.search(x, 32, s[None, :, :2], None, cb, mids)
    with pytest.raises(KbitValueError):
        ops.stats(x[0], 32, False)
    assert ops.dequantize(words, 3, 32, 70, s, None, cb).shape == (2, 70)


def test_cuda_dequantize_takes_device_arrays():
    """Device inputs (numba device arrays; torch CUDA tensors on a real GPU, int32 words
    included) stay on the device and give a device array back."""
    ops = ops_for("cuda")
    from numba import cuda
    rng = np.random.default_rng(9)
    k, B, cols = 3, 64, 100
    words = rng.integers(0, 2**32, size=(2, 2 * 2 * k), dtype=np.uint64).astype(np.uint32)
    cb = codebooks.int_codebook(k)
    s = np.abs(rng.standard_normal((2, 2))).astype(F32)
    o = -s / F32(3)
    want = NumpyOps.dequantize(words, k, B, cols, s, o, cb)
    for w in (words, words.view(np.int32)):
        out = ops.dequantize(cuda.to_device(w), k, B, cols, cuda.to_device(s), cuda.to_device(o), cuda.to_device(cb))
        assert not isinstance(out, np.ndarray)
        assert_same_bits(out.copy_to_host(), want, "device dequantize")
    if REAL_GPU:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            t = lambda a: torch.from_numpy(a).cuda()  # noqa: E731
            out = ops.dequantize(t(words.view(np.int32)), k, B, cols, t(s), t(o), t(cb))
            assert_same_bits(torch.as_tensor(out, device="cuda").cpu().numpy(), want, "torch dequantize")


def test_cpu_error_sums_match_numpy():
    from kbitcli.kernels.cpu import CpuOps
    from kbitformat import quantization_error, relative_error
    x = make_x((50, 1000))
    qt = quantize(x, QuantSpec(3, "nf", 64), ops=CpuOps)
    want = relative_error(x, dequantize(qt))
    assert quantization_error(x, qt, CpuOps) == pytest.approx(want, rel=1e-12)
    assert quantization_error(x, qt) == pytest.approx(want, rel=1e-12)
    dd, xx = CpuOps.error_sums(x, np.zeros_like(x))
    assert dd == pytest.approx(xx, rel=0) and xx == pytest.approx(float(np.sum(x.astype(np.float64) ** 2)), rel=1e-12)
