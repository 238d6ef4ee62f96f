"""The fused CPU GEMV (kbitcli.kernels.cpu.gemv: x @ W.T straight from the packed words)
against an independent float64 product of the numpy reference's dequantized weight.

The GEMV is not bit-identical to dequantize-then-matmul (it sums each block in another order,
with fused multiply-adds, and applies the block's scale to the block's sum), so it is held to
a bound: |y - y64| <= 1e-5 * sum_i |x_i| |w_i| + 1e-30 per output (a float32 dot product of
n terms is within about n * 2**-24 of that sum)."""
from __future__ import annotations

import numpy as np
import pytest

from kbitformat import KbitValueError, NumpyOps, QuantSpec, quantize
from kbitformat.constants import DTYPES
from kbitcli.kernels.cpu import CpuOps, gemv

BLOCKS = (32, 64, 128, 0)  # 0: one block per row


def case(rows, cols, spec: QuantSpec, M, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.2, 3.0, (rows, 1))).astype(np.float32)
    w[0, : min(cols, 40)] = 0.0  # a zero block (scale 0) when the block is small
    qt = quantize(w, spec, ops=CpuOps)  # the same bits as NumpyOps (test_kernels.py), faster
    s = qt.decoded_scales().astype(np.float32)
    o = qt.decoded_offsets(s)
    o = None if o is None else o.astype(np.float32)
    words = np.ascontiguousarray(qt.codes, dtype=np.uint32)
    cb = qt.codebook.astype(np.float32)
    wd = NumpyOps.dequantize(words, spec.bits, qt.block_size, cols, s, o, cb)
    x = rng.standard_normal((M, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ wd.astype(np.float64).T
    bound = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wd).astype(np.float64).T) + 1e-30
    return (words, spec.bits, qt.block_size, cols, s, o, cb), x, ref, bound


def check(got, ref, bound, what):
    assert got.shape == ref.shape and got.dtype == np.float32, (what, got.shape, got.dtype)
    assert np.all(np.isfinite(got)), what
    bad = np.abs(got - ref) > bound
    assert not bad.any(), f"{what}: {bad.sum()} outputs off, worst {np.abs(got - ref).max()}"


@pytest.mark.parametrize("k", range(2, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_matches_float64_product(dtype, k):
    """Every dtype (affine ones with offsets) and width; blocks of 32, 64, 128 and a whole
    row; cols not a multiple of the block (a padded last block); M = 1 and 3."""
    for block in BLOCKS:
        for cols in (100, 200):
            for M in (1, 3):
                args, x, ref, bound = case(5 + M, cols, QuantSpec(k, dtype, block), M, seed=k * 31 + cols + M)
                check(gemv(*args, x), ref, bound, f"{dtype} k={k} B={block} cols={cols} M={M}")


def test_gemv_larger_rows_chunks_and_int32_words(monkeypatch):
    """Many rows (several parallel chunks, rows not a multiple of the chunk), M up to 8, int32
    words (the runner's buffers) and float64 x accepted and converted; CpuOps.gemv is the same."""
    import kbitcli.kernels.cpu as C
    monkeypatch.setattr(C, "GEMV_CHUNK_WEIGHTS", 1000)
    for spec, M in ((QuantSpec(4, "nf", 64), 8), (QuantSpec(3, "affine", 32), 2)):
        args, x, ref, bound = case(301, 576, spec, M, seed=M)
        words, *rest = args
        check(gemv(words.view(np.int32), *rest, x.astype(np.float64)), ref, bound, f"{spec} int32")
        check(CpuOps.gemv(*args, x), ref, bound, f"{spec} CpuOps")


def test_gemv_padding_does_not_contribute():
    """Codes in the padding of the last block (never written by quantize_pack: here set to
    the largest code on purpose) must not change the result."""
    args, x, ref, bound = case(4, 70, QuantSpec(4, "int", 64), 2, seed=5)
    words, k, B, cols, s, o, cb = args
    w2 = words.copy()
    G = w2.shape[1] // k
    assert G == 4
    w2[:, 2 * k:3 * k] |= np.uint32(0xFFFFFFC0)  # group 2 covers cols 64..95: 70..95 are padding
    w2[:, 3 * k:] = np.uint32(0xFFFFFFFF)  # group 3 (cols 96..127) is all padding
    check(gemv(w2, k, B, cols, s, o, cb, x), ref, bound, "padding")


def test_gemv_refuses_bad_input():
    args, x, _, _ = case(3, 64, QuantSpec(4, "nf", 32), 1, seed=1)
    words, k, B, cols, s, o, cb = args
    with pytest.raises(KbitValueError, match="x must be"):
        gemv(*args, np.zeros((1, 63), np.float32))
    with pytest.raises(KbitValueError, match="x must be"):
        gemv(*args, np.zeros(64, np.float32))
    with pytest.raises(KbitValueError, match="input row"):
        gemv(*args, np.zeros((0, 64), np.float32))
    with pytest.raises(KbitValueError):
        gemv(words[:, :-1], k, B, cols, s, o, cb, x)
    with pytest.raises(KbitValueError, match="blocks"):
        gemv(words, k, B, cols + 32, s, o, cb, x)
    with pytest.raises(KbitValueError, match="codebook"):
        gemv(words, k, B, cols, s, o, cb[:8], x)
    with pytest.raises(KbitValueError, match="packed words"):
        gemv(words.astype(np.float32), k, B, cols, s, o, cb, x)
    with pytest.raises(KbitValueError, match="packed words"):
        gemv(words.astype(np.uint16), k, B, cols, s, o, cb, x)
    with pytest.raises(KbitValueError, match="x must be a numpy array of floats"):
        gemv(words, k, B, cols, s, o, cb, x.astype(np.int32))
    with pytest.raises(KbitValueError, match="scales"):
        gemv(words, k, B, cols, s.astype(np.int32), o, cb, x)
    with pytest.raises(KbitValueError, match="bits"):
        gemv(words, 9, B, cols, s, o, cb, x)
    with pytest.raises(KbitValueError, match="block size"):
        gemv(words, k, 48, cols, s, o, cb, x)


def test_gemv_plan_reused_and_checked():
    """A GemvPlan (the runner's per-layer prepared weight) gives gemv's results on every call
    with new x (M = 1 and 4, float64 x converted), and refuses what gemv refuses."""
    from kbitcli.kernels.cpu import gemv_plan
    args, x, ref, bound = case(9, 200, QuantSpec(4, "affine", 64), 4, seed=8)
    plan = gemv_plan(*args)
    check(plan(x), ref, bound, "plan M=4")
    check(plan(x[1:2].astype(np.float64)), ref[1:2], bound[1:2], "plan M=1 float64")
    assert np.array_equal(plan(x), gemv(*args, x))
    with pytest.raises(KbitValueError, match="x must be"):
        plan(np.zeros((1, 199), np.float32))
    words, k, B, cols, s, o, cb = args
    with pytest.raises(KbitValueError):
        gemv_plan(words[:, :-1], k, B, cols, s, o, cb)
    with pytest.raises(KbitValueError):
        gemv_plan(words, k, B, cols, s, o, cb[:-1])


# ----------------------------------------------------------------------------- the byte layout
def spec_bytes(words: np.ndarray, k: int) -> np.ndarray:
    """The runner's byte layout written straight from its definition, independent of the code
    under test: the reference's codes of a row, 32 // k to a uint32 word, code i of the word at
    bits [i*k, i*k + k)."""
    from kbitformat.reference import unpack
    codes = unpack(np.asarray(words, np.uint32), k).astype(np.uint64)
    rows = codes.shape[0]
    per = 32 // k
    c = codes.reshape(rows, -1, per)
    w = np.zeros(c.shape[:2], dtype=np.uint64)
    for i in range(per):
        w |= c[:, :, i] << np.uint64(i * k)
    return w.astype(np.uint32)


@pytest.mark.parametrize("k", (2, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_bytes_matches_float64_product(dtype, k):
    """The byte-layout GEMV, every dtype (affine ones with offsets), blocks of 32, 64 and a whole
    row, cols not a multiple of the block, 1 row and odd row counts, M = 1..8."""
    i = 0
    for block in (32, 64, 0):
        for cols in (100, 200):
            for M in range(1, 9):
                rows = (1, 7, 13)[i % 3]
                i += 1
                args, x, ref, bound = case(rows, cols, QuantSpec(k, dtype, block), M, seed=k * 131 + cols + M)
                words, *rest = args
                by = spec_bytes(words, k)
                check(gemv(by, *rest, x, layout="bytes"), ref, bound,
                      f"bytes {dtype} k={k} B={block} cols={cols} M={M} rows={rows}")


def test_gemv_bytes_chunks_int32_padding_and_plan(monkeypatch):
    """Several parallel chunks, int32 words, float64 x; codes in the padding of the last block
    (set to the largest code) do not count; a plan repeats gemv's results."""
    import kbitcli.kernels.cpu as C
    from kbitcli.kernels.cpu import gemv_plan
    monkeypatch.setattr(C, "GEMV_CHUNK_WEIGHTS", 1000)
    for spec, M in ((QuantSpec(4, "nf", 64), 8), (QuantSpec(2, "affine", 32), 3), (QuantSpec(8, "fp", 64), 2)):
        k = spec.bits
        args, x, ref, bound = case(301, 70, spec, M, seed=M)
        words, _, B, cols, s, o, cb = args
        by = spec_bytes(words, k)
        nbytes = by.shape[1] * 4
        b8 = by.view(np.uint8).reshape(by.shape[0], nbytes)
        per = 8 // k
        first_pad = cols // per  # bytes from here hold only padding codes (or some, for cols % per)
        b8[:, first_pad + (cols % per > 0):] = 0xFF
        if cols % per:
            b8[:, first_pad] |= np.uint8((0xFF << ((cols % per) * k)) & 0xFF)
        assert np.array_equal(C.dequantize_bytes(by, k, B, cols, s, o, cb).view(np.uint32),
                              NumpyOps.dequantize(words, k, B, cols, s, o, cb).view(np.uint32))
        got = gemv(by.view(np.int32), k, B, cols, s, o, cb, x.astype(np.float64), layout="bytes")
        check(got, ref, bound, f"{spec} bytes")
        plan = gemv_plan(by, k, B, cols, s, o, cb, "bytes")
        assert np.array_equal(plan(x), got)
        check(gemv(by, k, B, cols, s, o, cb, np.concatenate([x] * 5), layout="bytes"),
              np.concatenate([ref] * 5), np.concatenate([bound] * 5), f"{spec} bytes M={5 * M}")


@pytest.mark.parametrize("k", (2, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bytes_bit_identical(dtype, k):
    """kbitcli.kernels.cpu.dequantize_bytes gives the reference's float32 values bit for bit."""
    from kbitcli.kernels.cpu import dequantize_bytes
    for block, cols in ((32, 100), (64, 150), (0, 77)):
        args, _, _, _ = case(9, cols, QuantSpec(k, dtype, block), 1, seed=k + cols)
        words, _, B, _, s, o, cb = args
        want = NumpyOps.dequantize(words, k, B, cols, s, o, cb)
        got = dequantize_bytes(spec_bytes(words, k), k, B, cols, s, o, cb)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (dtype, k, block)


def test_bytes_refuses_bad_input():
    from kbitcli.kernels.cpu import dequantize_bytes, gemv_plan
    args, x, _, _ = case(3, 64, QuantSpec(3, "nf", 32), 1, seed=1)
    with pytest.raises(KbitValueError, match="byte code layout"):
        gemv(*args, x, layout="bytes")
    with pytest.raises(KbitValueError, match="byte code layout"):
        dequantize_bytes(*args)
    with pytest.raises(KbitValueError, match="code layout must be"):
        gemv(*args, x, layout="nibbles")
    args, x, _, _ = case(3, 64, QuantSpec(4, "nf", 32), 1, seed=1)
    words, k, B, cols, s, o, cb = args
    with pytest.raises(KbitValueError):
        gemv_plan(words[:, :-1], k, B, cols, s, o, cb, "bytes")
    with pytest.raises(KbitValueError, match="packed words"):
        dequantize_bytes(words.astype(np.uint16), k, B, cols, s, o, cb)
    with pytest.raises(KbitValueError, match="x must be"):
        gemv(*args, np.zeros((1, 63), np.float32), layout="bytes")
