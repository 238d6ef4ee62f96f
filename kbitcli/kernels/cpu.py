"""Numba CPU kernels for the four kernel operations of kbitformat (see
kbitformat/reference.py, the specification), bit for bit equal to NumpyOps.

Parallel decomposition
----------------------
Every operation works block by block, and blocks are independent. The (rows,
blocks_per_row) grid of blocks is flattened into one linear block index and cut into
chunks of consecutive blocks (about CHUNK_WEIGHTS weights each); ``prange`` runs over
the chunks and each chunk runs a plain serial loop over its blocks. A prange over
single weights costs several times more (scheduling and poor locality). Nothing is
shared between chunks: each block writes its own outputs (its stats, its search index,
its B/32 groups of k packed words, its B decoded values), so the order in which the
threads run cannot change any result.

There is no padded copy of the input: the weights of the last, partial block of a row
past ``cols`` are read as 0.0, exactly the value the reference pads with.

Why the bits are identical
--------------------------
* Every float operation is the reference's, in the same precision and order: float32
  ``y = x / s`` or ``y = (x - o) / s`` (two roundings), ``y = 0`` when ``s == 0``,
  ``v = cb[c] * s`` then ``v + o`` (each rounded to float32), all constants typed
  ``np.float32`` so that nothing is promoted to float64 by a Python literal. Numba
  compiles without fast-math, so LLVM neither contracts a*b+c into an FMA nor
  reassociates. Division is a true IEEE division, never a multiplication by 1/s.
* The code of y is ``#{i : mids[i] < y}`` = ``np.searchsorted(mids, y, 'left')``. A
  table over ``LUT_BUCKETS`` equal buckets of [mids[0], mids[-1]] gives a first guess
  only; the walk then moves down while ``y <= mids[g-1]`` and up while ``y > mids[g]``,
  which stops exactly at #{i : mids[i] < y} whatever the guess (mids is sorted). NaN
  gets 2**k - 1, as numpy's searchsorted sorts NaN last.
* Stats: absmax (or min/max against 0) has one correct value whatever the order of
  the comparisons. Signed zeros follow numpy: ``np.minimum(m, 0)``/``np.maximum(m, 0)``
  return +0.0 on a tie and ``abs`` clears the sign; NaN propagates.
* The search error is accumulated sequentially over the block in float64, padding
  zeros included, and the first candidate with the least error wins (strict <), as in
  the reference.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

F32 = np.float32
#: weights per parallel chunk (a chunk is a whole number of blocks)
CHUNK_WEIGHTS = 1 << 14
#: buckets of the code-search guess table
LUT_BUCKETS = 2048


# ----------------------------------------------------------------------------- helpers
def _chunking(nblocks: int, B: int) -> tuple[int, int]:
    per = max(1, CHUNK_WEIGHTS // B)
    return per, -(-nblocks // per)


def make_lut(mids: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """Guess table for the code search: (lut int32 (LUT_BUCKETS,), lo, scale).

    Bucket b = clip(int((y - lo) * scale), 0, LUT_BUCKETS - 1) and lut[b] is the code
    of the bucket's lower edge. Only a starting point: the walk in `_code` is exact."""
    mids = np.ascontiguousarray(mids, dtype=F32)
    lo = float(mids[0])
    hi = float(mids[-1])
    if np.isfinite(lo) and np.isfinite(hi) and hi > lo:
        scale = LUT_BUCKETS / (hi - lo)
        edges = (lo + np.arange(LUT_BUCKETS, dtype=np.float64) / scale).astype(F32)
        lut = np.searchsorted(mids, edges, side="left").astype(np.int32)
    else:
        lo, scale = 0.0, 0.0
        lut = np.zeros(LUT_BUCKETS, dtype=np.int32)
    return lut, F32(lo), F32(scale)


@njit(cache=True, inline="always")
def _code(y, mids, lut, lut_lo, lut_scale):
    """#{i : mids[i] < y}, exactly (NaN -> len(mids))."""
    n = mids.shape[0]
    if y != y:
        return n
    t = (y - lut_lo) * lut_scale
    nbk = lut.shape[0]
    if t >= np.float32(0.0):
        if t < np.float32(nbk):
            g = lut[int(t)]
        else:
            g = lut[nbk - 1]
    else:
        g = lut[0]
    while g < n and y > mids[g]:
        g += 1
    while g > 0 and y <= mids[g - 1]:
        g -= 1
    return g


@njit(cache=True, inline="always")
def _normalize(xv, s, o, affine):
    if s == np.float32(0.0):
        return np.float32(0.0)
    if affine:
        return np.float32(np.float32(xv - o) / s)
    return np.float32(xv / s)


# ----------------------------------------------------------------------------- stats
@njit(parallel=True, cache=True)
def _stats_kernel(x, B, nb, affine, out_a, out_b):
    rows, cols = x.shape
    nblocks = rows * nb
    per = max(1, 16384 // B)
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            c1 = min(cols, c0 + B)
            nan = False
            if affine:
                lo = np.float32(0.0)
                hi = np.float32(0.0)
                for c in range(c0, c1):
                    v = x[r, c]
                    nan |= v != v
                    lo = min(lo, v)
                    hi = max(hi, v)
                if nan:
                    lo = np.float32(np.nan)
                    hi = np.float32(np.nan)
                # numpy: minimum(+-0, +0) -> +0 (and the padding zeros are +0)
                if lo == np.float32(0.0):
                    lo = np.float32(0.0)
                if hi == np.float32(0.0):
                    hi = np.float32(0.0)
                out_a[r, b] = lo
                out_b[r, b] = hi
            else:
                m = np.float32(0.0)
                for c in range(c0, c1):
                    v = x[r, c]
                    nan |= v != v
                    m = max(m, abs(v))
                if nan:
                    m = np.float32(np.nan)
                out_a[r, b] = m


# ----------------------------------------------------------------------------- quantize
@njit(cache=True, inline="always")
def _pack_group(codes, k, words, r, w0):
    for j in range(k):
        w = np.uint32(0)
        for t in range(32):
            w |= np.uint32((codes[t] >> j) & 1) << np.uint32(t)
        words[r, w0 + j] = w


@njit(parallel=True, cache=True)
def _quantize_pack_kernel(x, B, k, s, o, affine, mids, lut, lut_lo, lut_scale, words):
    rows, cols = x.shape
    nb = s.shape[1]
    gpb = B // 32  # groups per block
    nblocks = rows * nb
    per = max(1, 16384 // B)
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        codes = np.empty(32, dtype=np.int32)
        ybuf = np.empty(32, dtype=np.float32)
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            sv = s[r, b]
            ov = o[r, b] if affine else np.float32(0.0)
            for gi in range(gpb):
                c0 = b * B + gi * 32
                if c0 + 32 <= cols:
                    if sv == np.float32(0.0):
                        for t in range(32):
                            ybuf[t] = np.float32(0.0)
                    elif affine:
                        for t in range(32):
                            ybuf[t] = np.float32(x[r, c0 + t] - ov) / sv
                    else:
                        for t in range(32):
                            ybuf[t] = x[r, c0 + t] / sv
                else:
                    for t in range(32):
                        xv = x[r, c0 + t] if c0 + t < cols else np.float32(0.0)
                        ybuf[t] = _normalize(xv, sv, ov, affine)
                for t in range(32):
                    codes[t] = _code(ybuf[t], mids, lut, lut_lo, lut_scale)
                _pack_group(codes, k, words, r, (b * gpb + gi) * k)


# ----------------------------------------------------------------------------- search
@njit(parallel=True, cache=True)
def _search_kernel(x, B, cand_s, cand_o, affine, cb, mids, lut, lut_lo, lut_scale, best):
    rows, cols = x.shape
    ncand = cand_s.shape[0]
    nb = cand_s.shape[2]
    nblocks = rows * nb
    per = max(1, 16384 // B)
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            bi = 0
            best_err = np.inf
            for i in range(ncand):
                sv = cand_s[i, r, b]
                ov = cand_o[i, r, b] if affine else np.float32(0.0)
                err = 0.0
                for e in range(B):
                    c = c0 + e
                    xv = x[r, c] if c < cols else np.float32(0.0)
                    y = _normalize(xv, sv, ov, affine)
                    v = np.float32(cb[_code(y, mids, lut, lut_lo, lut_scale)] * sv)
                    if affine:
                        v = np.float32(v + ov)
                    d = np.float64(xv) - np.float64(v)
                    err += d * d
                if err < best_err:
                    best_err = err
                    bi = i
            best[r, b] = bi


# ----------------------------------------------------------------------------- dequantize
@njit(parallel=True, cache=True)
def _dequantize_kernel(words, k, B, cols, s, o, affine, cb, out):
    rows = words.shape[0]
    nb = s.shape[1]
    gpb = B // 32
    nblocks = rows * nb
    per = max(1, 16384 // B)
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        codes = np.empty(32, dtype=np.int32)
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            sv = s[r, b]
            ov = o[r, b] if affine else np.float32(0.0)
            for gi in range(gpb):
                c0 = b * B + gi * 32
                if c0 >= cols:
                    break
                w0 = (b * gpb + gi) * k
                for t in range(32):
                    codes[t] = 0
                for j in range(k):
                    w = words[r, w0 + j]
                    for t in range(32):
                        codes[t] |= np.int32((w >> np.uint32(t)) & np.uint32(1)) << j
                n = min(32, cols - c0)
                if affine:
                    for t in range(n):
                        out[r, c0 + t] = np.float32(np.float32(cb[codes[t]] * sv) + ov)
                else:
                    for t in range(n):
                        out[r, c0 + t] = np.float32(cb[codes[t]] * sv)


# ----------------------------------------------------------------------------- the ops
def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32)


class CpuOps:
    """Numba CPU implementation of the four kernel operations (see module docstring)."""

    name = "cpu"

    @staticmethod
    def stats(x: np.ndarray, B: int, affine: bool):
        x = _f32(x)
        rows, cols = x.shape
        nb = -(-cols // B)
        a = np.empty((rows, nb), dtype=F32)
        if affine:
            hi = np.empty((rows, nb), dtype=F32)
            _stats_kernel(x, B, nb, True, a, hi)
            return a, hi
        _stats_kernel(x, B, nb, False, a, a)
        return a

    @staticmethod
    def search(x, B, cand_s, cand_o, cb, mids) -> np.ndarray:
        x = _f32(x)
        cand_s = _f32(cand_s)
        rows, cols = x.shape
        nb = cand_s.shape[2]
        affine = cand_o is not None
        co = _f32(cand_o) if affine else cand_s
        mids = _f32(mids)
        lut, lo, sc = make_lut(mids)
        best = np.empty((rows, nb), dtype=np.int32)
        _search_kernel(x, int(B), cand_s, co, affine, _f32(cb), mids, lut, lo, sc, best)
        return best

    @staticmethod
    def quantize_pack(x, B, k, s, o, cb, mids) -> np.ndarray:
        x = _f32(x)
        s = _f32(s)
        rows, cols = x.shape
        nb = s.shape[1]
        affine = o is not None
        ov = _f32(o) if affine else s
        mids = _f32(mids)
        lut, lo, sc = make_lut(mids)
        words = np.empty((rows, nb * (B // 32) * k), dtype=np.uint32)
        _quantize_pack_kernel(x, int(B), int(k), s, ov, affine, mids, lut, lo, sc, words)
        return words

    @staticmethod
    def dequantize(words, k, B, cols, s, o, cb) -> np.ndarray:
        words = np.ascontiguousarray(words, dtype=np.uint32)
        s = _f32(s)
        affine = o is not None
        ov = _f32(o) if affine else s
        out = np.empty((words.shape[0], int(cols)), dtype=F32)
        _dequantize_kernel(words, int(k), int(B), int(cols), s, ov, affine, _f32(cb), out)
        return out
