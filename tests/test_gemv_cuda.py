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
from kbitformat.reference import decode_values, pack, unpack
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


# ----------------------------------------------------------------------------- bytes layout
# The runner's "bytes" code layout (kbitcli.kernels.cuda, "bytes" layout): code i of a row
# at bits [(i % (8//k))*k, +k) of byte i // (8//k), the bytes read as little-endian int32
# words, the planes' shape (rows, G*k).
def planes_to_bytes(words: np.ndarray, k: int) -> np.ndarray:
    """uint32 bit-plane words (rows, G*k) -> uint32 bytes-layout words, same shape (numpy,
    from the reference's unpacked codes)."""
    return codes_to_bytes(unpack(words, k), k).reshape(words.shape)  # unpack: (rows, G*32) uint8


def test_planes_to_bytes_layout():
    rng = np.random.default_rng(0)
    for k in (2, 4, 8):
        codes = rng.integers(0, 1 << k, (3, 64))
        got = planes_to_bytes(pack(codes, k), k)
        per_word = 32 // k
        for r in range(3):
            for i in range(64):
                assert (int(got[r, i // per_word]) >> ((i % per_word) * k)) & ((1 << k) - 1) == codes[r, i]


def bytes_case(rows, cols, spec, M, seed):
    args, x, ref, bound = case(rows, cols, spec, M, seed)
    words, k, B, cols, s, o, cb = args
    return (planes_to_bytes(words, k), k, B, cols, s, o, cb), x, ref, bound, words


BYTES_CASES = [(k, d, M) for k in (2, 4, 8) for d in ("nf", "affine") for M in (1, 3, 8)]


@pytest.mark.parametrize("k,dtype,M", BYTES_CASES)
def test_gemv_bytes_matches_float64_product(K, k, dtype, M):
    block = (32, 64)[(k + M) % 2]
    rows, cols = 3 + (k + M) % 3, (70, 100, 150)[(k + 2 * M) % 3]  # never a multiple of the block
    args, x, ref, bound, _ = bytes_case(rows, cols, QuantSpec(k, dtype, block), M, seed=k * 31 + M)
    check(K.gemv_bytes(*args, x), ref, bound, f"bytes {dtype} k={k} B={block} {rows}x{cols} M={M}")


@pytest.mark.parametrize("k,spec,over", [
    (4, "4:affine:b32", dict(TV_MAX=32, GRID=1)),   # two column tiles, one CTA looping over row groups
    (2, "2:nf:b32", dict(GRID=2)),                   # 2 words a block: 64-bit vectors
    (2, "2:int:b0", {}),                             # one block a row: words per block not a power of 2
    (8, "8:nf:b32", dict(CBREP=1, R=1, NW=1, NP=1)),  # one codebook copy, one row a warp
    (4, "4:nf:b64", dict(R=3, C=4, GRID=1)),         # 3 rows a warp, 4-code x chunks
])
def test_gemv_bytes_launch_shapes(K, k, spec, over):
    cols = 1100 if "TV_MAX" in over else 90
    rows = 2 * 4 * over.get("R", 2) + 3
    args, x, ref, bound, _ = bytes_case(rows, cols, QuantSpec.parse(spec), 2, seed=k + len(over))
    check(K.gemv_bytes(*args, x, **over), ref, bound, f"bytes {spec} {over}")


@pytest.mark.parametrize("spec", ["2:nf:b32", "4:nf:b64", "4:affine:b32", "8:int:b32", "8:affine:b0"])
def test_dequantize_bytes_bit_identical(K, spec):
    sp = QuantSpec.parse(spec)
    args, _, _, _, words = bytes_case(5, 77, sp, 1, seed=len(spec))
    _, k, B, cols, s, o, cb = args
    ref = NumpyOps.dequantize(words, k, B, cols, s, o, cb)
    got = K.dequantize_bytes(*args)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), spec


def test_bytes_torch_wrappers(K):
    torch = pytest.importorskip("torch")
    args, x, ref, bound, words = bytes_case(6, 100, QuantSpec(4, "affine", 64), 2, seed=5)
    bw, k, B, cols, s, o, cb = args
    dev = "cuda" if REAL_GPU else "cpu"
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    got = K.gemv_bytes_torch(t(bw.view(np.int32)), k, B, cols, t(s), t(o), t(cb), t(x).to(torch.float16))
    assert got.device.type == dev and got.dtype == torch.float32
    x16 = x.astype(np.float16).astype(np.float64)
    wd = NumpyOps.dequantize(words, k, B, cols, s, o, cb)
    check(got.cpu().numpy(), x16 @ wd.astype(np.float64).T,
          1e-5 * (np.abs(x16) @ np.abs(wd).astype(np.float64).T) + 1e-30, "gemv_bytes_torch")
    dq = K.dequantize_bytes_torch(t(bw.view(np.int32)), k, B, cols, t(s), t(o), t(cb))
    assert dq.device.type == dev
    assert np.array_equal(dq.cpu().numpy().view(np.uint32), wd.view(np.uint32))
    sym, _, _, _, _ = bytes_case(4, 64, QuantSpec(2, "nf", 32), 1, seed=6)
    bw2, k2, B2, cols2, s2, _, cb2 = sym
    got2 = K.gemv_bytes_torch(t(bw2.view(np.int32)), k2, B2, cols2, t(s2), None, t(cb2), t(x[:1, :64]))
    assert got2.shape == (1, 4)


def test_bytes_refuses_bad_input(K):
    args, x, _, _ = case(3, 64, QuantSpec(3, "nf", 32), 1, seed=1)  # k=3 has no bytes layout
    with pytest.raises(KbitValueError, match="2, 4 or 8"):
        K.gemv_bytes(*args, x)
    args, x, _, _, _ = bytes_case(3, 64, QuantSpec(4, "nf", 32), 1, seed=1)
    with pytest.raises(KbitValueError, match="input rows"):
        K.gemv_bytes(*args, np.zeros((K.GEMV_MAX_M + 1, 64), np.float32))
    bw, k, B, cols, s, o, cb = args
    with pytest.raises(KbitValueError):
        K.gemv_bytes(bw[:, :-1], k, B, cols, s, o, cb, x)
    with pytest.raises(KbitValueError):
        K.dequantize_bytes(bw, k, B, cols, s[:, :0], o, cb)


def codes_to_bytes(codes: np.ndarray, k: int) -> np.ndarray:
    """codes (rows, n) < 2**k -> uint32 bytes-layout words (rows, n*k/32)."""
    per = 8 // k
    rows, n = codes.shape
    c = codes.reshape(rows, n // per, per).astype(np.uint8)
    b = np.zeros((rows, n // per), dtype=np.uint8)
    for i in range(per):
        b |= (c[:, :, i] << np.uint8(i * k)).astype(np.uint8)
    return np.ascontiguousarray(b).view("<u4").astype(np.uint32)


def random_bytes_case(rows, cols, k, B, affine, M, seed):
    """Random codes, codebook, scales (a zero block) and offsets at real sizes without
    quantizing (numpy's unpack of planes is slow there); the reference weight from the
    reference's decode_values."""
    rng = np.random.default_rng(seed)
    B = B or -(-cols // 32) * 32
    nb = -(-cols // B)
    codes = rng.integers(0, 1 << k, (rows, nb * B), dtype=np.uint8)
    cb = np.sort(rng.standard_normal(1 << k)).astype(np.float32)
    s = rng.uniform(0.01, 0.1, (rows, nb)).astype(np.float32)
    s[0, 0] = 0.0
    o = -rng.uniform(0.0, 0.2, (rows, nb)).astype(np.float32) if affine else None
    wd = decode_values(codes.reshape(rows, nb, B), cb, s, o).reshape(rows, -1)[:, :cols]
    x = rng.standard_normal((M, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wd).astype(np.float64).T) + 1e-30
    return (codes_to_bytes(codes, k), k, B, cols, s, o, cb), x, ref, bound, wd


@pytest.mark.skipif(not REAL_GPU, reason="real-model sizes need a real GPU (scripts/gpu_check.sh)")
@pytest.mark.parametrize("shape", [(576, 576), (4096, 4096), (11008, 4096), (4096, 11008), (20000, 1000)])
@pytest.mark.parametrize("kind", ["4:b64", "4:affine:b64", "8:b64", "2:b32", "4:b0"])
def test_gemv_bytes_real_sizes(K, shape, kind):
    k, B = int(kind[0]), int(kind.rsplit(":b", 1)[1])
    affine = "affine" in kind
    for M in (1, 8) if kind == "4:b64" else (1 + shape[0] % 3,):
        args, x, ref, bound, wd = random_bytes_case(*shape, k, B, affine, M, seed=shape[0] + M)
        check(K.gemv_bytes(*args, x), ref, bound, f"bytes {kind} {shape} M={M}")
    dq = K.dequantize_bytes(*args)
    assert np.array_equal(dq.view(np.uint32), wd.view(np.uint32))


@pytest.mark.parametrize("spec,M,over", [("4:nf:b64", 1, {}), ("4:affine:b32", 3, {}), ("8:nf:b32", 2, {}),
                                         ("2:int:b64", 1, {}), ("4:nf:b64", 2, dict(TV_MAX=32))])
def test_gemv_bytes_float16_in_and_out(K, spec, M, over):
    """float16 x is read by the kernel (exactly converted): the same bits as the float32 x it
    converts to; a float16 output is the float32 result rounded once (rows of one column
    tile; several tiles refuse it, and gemv_bytes_torch then returns float32)."""
    cols = 1100 if over else 90
    args, x, _, _, _ = bytes_case(11, cols, QuantSpec.parse(spec), M, seed=M + len(spec))
    x16 = x.astype(np.float16)
    ref = K.gemv_bytes(*args, x16.astype(np.float32), **over)
    got = K.gemv_bytes_device(*args, x16, x_dtype=np.float16, **over).copy_to_host()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    if over:
        with pytest.raises(KbitValueError, match="one column tile"):
            K.gemv_bytes_device(*args, x16, x_dtype=np.float16, out_dtype=np.float16, **over)
        return
    got16 = K.gemv_bytes_device(*args, x16, x_dtype=np.float16, out_dtype=np.float16, **over).copy_to_host()
    assert got16.dtype == np.float16 and np.array_equal(got16.view(np.uint16), ref.astype(np.float16).view(np.uint16))
    torch = pytest.importorskip("torch")
    if REAL_GPU:
        bw, k, B, cols_, s, o, cb = args
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
        y = K.gemv_bytes_torch(t(bw.view(np.int32)), k, B, cols_, t(s), None if o is None else t(o), t(cb),
                               t(x16), out_dtype=torch.float16)
        assert y.dtype == torch.float16 and torch.equal(y.cpu(), torch.from_numpy(ref.astype(np.float16)))


@pytest.mark.skipif(not REAL_GPU, reason="CUDA graphs need a real GPU")
def test_bytes_kernels_capture_in_cuda_graph(K):
    """gemv_bytes_torch and dequantize_bytes_torch inside a torch CUDA graph: replays give
    the eager results (the kernels allocate, copy and sync nothing once compiled)."""
    torch = pytest.importorskip("torch")
    args, x, ref, bound, _ = bytes_case(1024, 1000, QuantSpec(4, "affine", 64), 3, seed=9)
    bw, k, B, cols, s, o, cb = args
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    codes, ts, to, tcb, tx = t(bw.view(np.int32)), t(s), t(o), t(cb), t(x)
    eager = K.gemv_bytes_torch(codes, k, B, cols, ts, to, tcb, tx)  # compiles
    eager_dq = K.dequantize_bytes_torch(codes, k, B, cols, ts, to, tcb)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        y = K.gemv_bytes_torch(codes, k, B, cols, ts, to, tcb, tx)
        d = K.dequantize_bytes_torch(codes, k, B, cols, ts, to, tcb)
    tx.copy_(tx * 2)
    g.replay()
    torch.cuda.synchronize()
    check(y.cpu().numpy(), 2 * ref, 2 * bound, "graph replay")
    assert torch.equal(d, eager_dq)
    check(eager.cpu().numpy(), ref, bound, "eager")


# ----------------------------------------------------------------------------- bytes split-K
# over SPLIT = S: the columns cut into S slices handled by different CTAs, partial sums in a
# float32 workspace, a second kernel adds them in slice order (kbitcli.kernels.cuda,
# bytes_gemv_split). Column counts are multiples of nothing in particular, so slices are
# uneven and the last vector of a row is partly padding.
SPLIT_CASES = [(k, d, M, S) for k in (2, 4, 8) for d in ("nf", "affine") for M in (1, 3) for S in (2, 3)
               if (k + M + S + len(d)) % 2 == 0 or k == 4]


@pytest.mark.parametrize("k,dtype,M,S", SPLIT_CASES)
def test_gemv_bytes_split_k_matches_float64_product(K, k, dtype, M, S):
    block = (32, 64)[(k + S) % 2]
    rows, cols = 5 + (k + M) % 3, (230, 301, 357)[(k + M + S) % 3] * 8 // k  # 14 to 22 vectors a row
    args, x, ref, bound, _ = bytes_case(rows, cols, QuantSpec(k, dtype, block), M, seed=k * 13 + M + S)
    NV = args[0].shape[1] // K.bytes_gemv_config(k, M, block, rows, 1).V
    S_eff, NVS = K.bytes_gemv_split(k, M, block, rows, NV, SPLIT=S)
    assert S_eff == S and NVS * (S - 1) < NV <= NVS * S, (NV, S_eff, NVS)
    got = K.gemv_bytes(*args, x, SPLIT=S)
    check(got, ref, bound, f"bytes split-K S={S} {dtype} k={k} B={block} {rows}x{cols} M={M}")
    again = K.gemv_bytes(*args, x, SPLIT=S)  # deterministic: no atomics, fixed order
    assert np.array_equal(got.view(np.uint32), again.view(np.uint32))


@pytest.mark.parametrize("spec,over", [
    ("8:affine:b32", dict(SPLIT=2, TV_MAX=32, GRID=1)),  # two tiles a slice, one CTA a slice looping over row groups
    ("2:nf:b32", dict(SPLIT=3, GRID=2)),                  # 64-bit vectors
    ("4:int:b0", dict(SPLIT=2)),                          # one block a row (words per block not a power of 2)
    ("4:nf:b64", dict(SPLIT=50)),                         # more slices than vectors: one vector a slice
])
def test_gemv_bytes_split_k_launch_shapes(K, spec, over):
    sp = QuantSpec.parse(spec)
    rows, cols = 11, 1100 if "TV_MAX" in over else 150
    args, x, ref, bound, _ = bytes_case(rows, cols, sp, 2, seed=len(over) + sp.bits)
    check(K.gemv_bytes(*args, x, **over), ref, bound, f"bytes split-K {spec} {over}")


def test_gemv_bytes_split_one_is_the_default(K):
    """SPLIT=1 (and "auto" in the simulator, which has no SM count) is the one-pass kernel:
    the same bits as no option at all."""
    args, x, _, _, _ = bytes_case(7, 150, QuantSpec(4, "affine", 32), 2, seed=21)
    ref = K.gemv_bytes(*args, x)
    for over in (dict(SPLIT=1), dict(SPLIT="auto")):
        got = K.gemv_bytes(*args, x, **over)
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), over
    assert K._bytes_gemv_launch(4, 2, True, 32, 7, 5)[3] is None


def test_gemv_bytes_split_auto_heuristic(K, monkeypatch):
    """SPLIT="auto": S such that row-group CTAs x S >= 4 x SMs, at most 8 and NV/32 (slices
    of whole multiples of 32 vectors); S = 1 when the rows alone fill the GPU."""
    monkeypatch.setattr(K, "_sm_count", lambda: 132)
    monkeypatch.setattr(K, "BYTES_TUNING", {"R": 4, "NW": 8})
    assert K.bytes_gemv_split(4, 1, 64, 4096, 128, SPLIT="auto") == (4, 32)       # 4096x4096 k=4: 128 CTAs
    assert K.bytes_gemv_split(4, 1, 64, 11008, 128, SPLIT="auto") == (2, 64)      # 344 CTAs
    assert K.bytes_gemv_split(4, 1, 64, 4096, 344, SPLIT="auto") == (4, 96)       # 4096x11008
    assert K.bytes_gemv_split(4, 1, 64, 32000, 128, SPLIT="auto") == (1, 128)     # 1000 CTAs: no split
    assert K.bytes_gemv_split(4, 1, 64, 4096, 40, SPLIT="auto") == (1, 40)        # too few vectors
    assert K.bytes_gemv_split(4, 1, 64, 4096, 128) == (1, 128)                    # off by default
    assert K.bytes_gemv_split(4, 1, 64, 4096, 128, SPLIT=3) == (3, 43)


@pytest.mark.parametrize("spec,M,S", [("4:nf:b64", 1, 2), ("4:affine:b32", 3, 3), ("8:nf:b32", 2, 2)])
def test_gemv_bytes_split_k_float16_in_and_out(K, spec, M, S):
    """Split-K with float16 x (exactly converted: the bits of the float32 x it converts to)
    and a float16 output: the reduction's float32 sum rounded once."""
    over = dict(SPLIT=S)
    args, x, _, _, _ = bytes_case(5, 300, QuantSpec.parse(spec), M, seed=M + S + len(spec))
    x16 = x.astype(np.float16)
    ref = K.gemv_bytes(*args, x16.astype(np.float32), **over)
    got = K.gemv_bytes_device(*args, x16, x_dtype=np.float16, **over).copy_to_host()
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    got16 = K.gemv_bytes_device(*args, x16, x_dtype=np.float16, out_dtype=np.float16, **over).copy_to_host()
    assert got16.dtype == np.float16 and np.array_equal(got16.view(np.uint16), ref.astype(np.float16).view(np.uint16))
    torch = pytest.importorskip("torch")
    bw, k, B, cols_, s, o, cb = args
    dev = "cuda" if REAL_GPU else "cpu"
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    y = K.gemv_bytes_torch(t(bw.view(np.int32)), k, B, cols_, t(s), None if o is None else t(o), t(cb),
                           t(x16), out_dtype=torch.float16, **over)
    if REAL_GPU:
        assert y.dtype == torch.float16 and torch.equal(y.cpu(), torch.from_numpy(ref.astype(np.float16)))
    else:  # the simulator path of the wrapper returns float32
        assert np.array_equal(y.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.skipif(not REAL_GPU, reason="CUDA graphs need a real GPU")
def test_bytes_split_k_captures_in_cuda_graph(K):
    """Split-K (two kernels, a torch-allocated workspace) inside a torch CUDA graph."""
    torch = pytest.importorskip("torch")
    args, x, ref, bound, _ = bytes_case(1024, 1000, QuantSpec(4, "affine", 64), 1, seed=19)
    bw, k, B, cols, s, o, cb = args
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    codes, ts, to, tcb, tx = t(bw.view(np.int32)), t(s), t(o), t(cb), t(x)
    eager = K.gemv_bytes_torch(codes, k, B, cols, ts, to, tcb, tx, SPLIT=4)  # compiles
    torch.cuda.synchronize()
    check(eager.cpu().numpy(), ref, bound, "split-K eager")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        y = K.gemv_bytes_torch(codes, k, B, cols, ts, to, tcb, tx, SPLIT=4)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
    tx.copy_(tx * 2)
    g.replay()
    torch.cuda.synchronize()
    check(y.cpu().numpy(), 2 * ref, 2 * bound, "split-K graph replay")


# The x-in-registers kernel (KERNEL="xr", M = 1; not the default until a GPU has timed it):
# a row cut across the lanes of a group of ceil(NV/32) warps, x held in registers, warp sums
# by a shuffle butterfly (shared memory in the simulator), D rows at a time, NG row groups a CTA.
XR = dict(KERNEL="xr")
XR_CASES = [
    ("4:nf:b64", 300, dict(XR, XR_NG=1, XR_D=1)),
    ("4:nf:b64", 1100, XR),                         # 2 warps a row group (35 vectors of 32 codes)
    ("4:affine:b32", 1100, dict(XR, XR_NG=3, XR_D=2, XR_GRID=2)),  # CTAs loop over row chunks
    ("2:nf:b32", 700, XR),                          # V = 2 (k = 2: 32 codes a vector)
    ("2:affine:b64", 90, dict(XR, XR_NG=2)),
    ("8:nf:b64", 500, XR),                          # lane-replicated codebook, 16 codes a vector
    ("8:affine:b32", 2100, dict(XR, XR_D=1)),       # 3 warps a row group
    ("4:int:b0", 150, XR),                          # one block a row (words a block not a power of 2)
    ("2:int:b0", 80, XR),                           # one block of 96 codes a row: 6 words, V = 2
]


@pytest.mark.parametrize("spec,cols,over", XR_CASES)
def test_gemv_bytes_x_in_registers(K, spec, cols, over):
    sp = QuantSpec.parse(spec)
    rows = 13
    args, x, ref, bound, _ = bytes_case(rows, cols, sp, 1, seed=cols + len(over))
    _, k, B, _, _, o, _ = args
    W = args[0].shape[1]
    plan = K.bytes_gemv_plan(k, 1, o is not None, B, rows, W, **over)
    assert plan[2] is K._xr_gemv_kernel(k, o is not None, plan[0], *K.xr_gemv_config(k, 1, B, rows, plan[1], **over)[1:3],
                                        32 if k == 8 else 1, K._wbshift(k, B)), "not the x-in-registers kernel"
    got = K.gemv_bytes(*args, x, **over)
    check(got, ref, bound, f"xr {spec} {cols} {over}")
    assert np.array_equal(K.gemv_bytes(*args, x, **over).view(np.uint32), got.view(np.uint32))  # deterministic
    tile = K.gemv_bytes(*args, x)  # the default (tile) kernel
    check(tile, ref, bound, f"tile {spec} {cols}")
    x16 = x.astype(np.float16)
    want = K.gemv_bytes(*args, x16.astype(np.float32), **over)
    got16 = K.gemv_bytes_device(*args, x16, x_dtype=np.float16, out_dtype=np.float16, **over).copy_to_host()
    assert got16.dtype == np.float16 and np.array_equal(got16.view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_gemv_bytes_kernel_choice(K):
    """KERNEL="xr" at M = 1 takes the x-in-registers kernel unless a tile-kernel setting is
    given, split-K is asked for, or a row has more than 32 warps' vectors; M > 1 always takes
    the tile kernel, and so does the default (DEFAULT_KERNEL, "tile" until a GPU has timed xr)."""
    assert K.xr_gemv_config(4, 1, 64, 4096, 128, **XR) is not None
    assert (K.xr_gemv_config(4, 1, 64, 4096, 128) is None) == (K.DEFAULT_KERNEL == "tile")
    assert K.xr_gemv_config(4, 2, 64, 4096, 128, **XR) is None
    assert K.xr_gemv_config(4, 1, 64, 4096, 128, KERNEL="tile") is None
    assert K.xr_gemv_config(4, 1, 64, 4096, 128, R=2, **XR) is None
    assert K.xr_gemv_config(4, 1, 64, 4096, 128, SPLIT=2, **XR) is None
    assert K.xr_gemv_config(4, 1, 64, 4096, 32 * 32 + 1, **XR) is None
    with pytest.raises(KbitValueError, match="KERNEL"):
        K.xr_gemv_config(4, 1, 64, 4096, 128, KERNEL="fast")
    V, NG, D, nwg = K.xr_gemv_config(4, 1, 64, 4096, 4096 // 32, **XR)  # 4096 columns: 4 warps a row group
    assert (V, nwg) == (4, 4) and NG * nwg <= 32
