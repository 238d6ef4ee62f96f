"""The fused CUDA GEMV (kbitcli.kernels.cuda.gemv*) against an independent float64 product
of the numpy reference's dequantized weight.

The GEMV is not bit-identical to dequantize-then-matmul (it sums in another order and may
fuse multiply-adds), so it is held to a bound: |y - y64| <= 1e-5 * sum_i |x_i| |w_i| + 1e-30
per output (a float32 dot product of n terms is within about n * 2**-24 of that sum).
Runs in Numba's CUDA simulator (tiny sizes) unless KBIT_REAL_GPU=1 (scripts/gpu_check.sh),
where the sizes of real models are used too.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from kbitformat import KbitValueError, NumpyOps, QuantSpec, quantize
from kbitformat.constants import DTYPES
from kbitcli.kernels import cuda_usable

REAL_GPU = os.environ.get("KBIT_REAL_GPU", "") == "1"


@pytest.fixture(scope="module")
def K():
    ok, why = cuda_usable()
    if not ok:
        if REAL_GPU:
            pytest.fail(f"KBIT_REAL_GPU=1 but CUDA is not usable: {why}")
        pytest.skip(why)
    import kbitcli.kernels.cuda as K
    return K


def case(rows, cols, spec: QuantSpec, M, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.2, 3.0, (rows, 1))).astype(np.float32)
    w[0, : min(cols, 40)] = 0.0  # a zero block (scale 0)
    ops = None
    if REAL_GPU:  # the same bits as the reference (test_kernels.py), much faster at real sizes
        from kbitcli.kernels import get_ops
        ops = get_ops("cuda")
    qt = quantize(w, spec) if ops is None else quantize(w, spec, ops=ops)
    s = qt.decoded_scales().astype(np.float32)
    o = qt.decoded_offsets(s)
    o = None if o is None else o.astype(np.float32)
    words = np.ascontiguousarray(qt.codes, dtype=np.uint32)
    cb = qt.codebook.astype(np.float32)
    wd = (NumpyOps if ops is None else ops).dequantize(words, spec.bits, qt.block_size, cols, s, o, cb)
    x = rng.standard_normal((M, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wd).astype(np.float64).T) + 1e-30
    return (words, spec.bits, qt.block_size, cols, s, o, cb), x, ref, bound


def check(got, ref, bound, what):
    got = np.asarray(got)
    assert got.shape == ref.shape and got.dtype == np.float32, (what, got.shape, got.dtype)
    assert np.all(np.isfinite(got)), what
    bad = np.abs(got - ref) > bound
    assert not bad.any(), f"{what}: {bad.sum()} outputs off, worst {np.abs(got - ref).max()}"


SIM_CASES = [  # (dtype, k, block, rows, cols, M): every dtype and k, tiny
    (d, k, (32, 64, 0)[(i + k) % 3], 3 + (i + k) % 4, (64, 96, 130, 200)[(i * 3 + k) % 4], 1 + (i + k) % 3)
    for i, d in enumerate(DTYPES) for k in range(2, 9) if (i + k) % 2 == 0 or k in (4, 8)
]


@pytest.mark.parametrize("dtype,k,block,rows,cols,M", SIM_CASES)
def test_gemv_matches_float64_product(K, dtype, k, block, rows, cols, M):
    args, x, ref, bound = case(rows, cols, QuantSpec(k, dtype, block), M, seed=k * 7 + rows)
    check(K.gemv(*args, x), ref, bound, f"{dtype} k={k} B={block} {rows}x{cols} M={M}")


@pytest.mark.parametrize("rpw", (2, 4))
def test_gemv_several_rows_per_warp(K, monkeypatch, rpw):
    """Rows per warp > 1 (chosen for big matrices) on a small one; rows not a multiple."""
    monkeypatch.setattr(K, "gemv_rows_per_warp", lambda rows: rpw)
    args, x, ref, bound = case(2 * K.GEMV_WARPS * rpw + 3, 96, QuantSpec(4, "affine", 32), 2, seed=rpw)
    check(K.gemv(*args, x), ref, bound, f"rpw={rpw}")


def test_gemv_most_input_rows(K):
    """GEMV_MAX_M input rows (a batch of 8 decode steps), affine with offsets."""
    args, x, ref, bound = case(7, 100, QuantSpec(5, "affine", 32), K.GEMV_MAX_M, seed=11)
    check(K.gemv(*args, x), ref, bound, f"M={K.GEMV_MAX_M}")


def test_gemv_torch_wrapper(K):
    torch = pytest.importorskip("torch")
    args, x, ref, bound = case(5, 100, QuantSpec(4, "affine", 64), 2, seed=3)
    words, k, B, cols, s, o, cb = args
    dev = "cuda" if REAL_GPU else "cpu"
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    got = K.gemv_torch(t(words.view(np.int32)), k, B, cols, t(s), t(o), t(cb), t(x).to(torch.float16))
    assert got.device.type == dev
    x16 = x.astype(np.float16).astype(np.float64)  # the wrapper takes x in any float dtype
    wd = NumpyOps.dequantize(words, k, B, cols, s, o, cb).astype(np.float64)
    check(got.cpu().numpy(), x16 @ wd.T, 1e-5 * (np.abs(x16) @ np.abs(wd).T) + 1e-30, "gemv_torch")


def test_gemv_refuses_bad_input(K):
    args, x, _, _ = case(3, 64, QuantSpec(4, "nf", 32), 1, seed=1)
    with pytest.raises(KbitValueError, match="input rows"):
        K.gemv(*args, np.zeros((K.GEMV_MAX_M + 1, 64), np.float32))
    with pytest.raises(KbitValueError, match="x must be"):
        K.gemv(*args, np.zeros((1, 63), np.float32))
    words, k, B, cols, s, o, cb = args
    with pytest.raises(KbitValueError):
        K.gemv(words[:, :-1], k, B, cols, s, o, cb, x)


@pytest.mark.skipif(not REAL_GPU, reason="real-model sizes need a real GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (11008, 4096),
                                   (4096, 11008), (20000, 1000)])
@pytest.mark.parametrize("spec", ["4:nf:b64", "4:affine:b64", "3:fp:b128", "8:int:b64", "2:quantile:b32"])
def test_gemv_real_sizes(K, shape, spec):
    sp = QuantSpec.parse(spec)
    for M in (1, 4) if spec == "4:nf:b64" else (1 + shape[0] % 3,):
        args, x, ref, bound = case(*shape, sp, M, seed=shape[0] + M)
        check(K.gemv(*args, x), ref, bound, f"{spec} {shape} M={M}")
