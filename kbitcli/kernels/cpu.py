"""Numba CPU kernels for the four kernel operations of kbitformat (see
kbitformat/reference.py, the specification), bit for bit equal to NumpyOps.

Parallel decomposition
----------------------
Every operation works block by block, and blocks are independent. The (rows,
blocks_per_row) grid of blocks is flattened into one linear block index and cut into
chunks of consecutive blocks (about CHUNK_WEIGHTS weights each); ``prange`` runs over
the chunks and each chunk runs a plain serial loop over its blocks, with its own small
scratch buffers. (A prange over single weights costs several times more.) Nothing is
shared between chunks: each block writes only its own outputs (its stats, its search
index, its B/32 groups of k packed words, its decoded values), so the number of threads
and the order in which they run cannot change any result.

Inside a block the work is split into short passes over the block's B values (normalise,
find codes, pack or decode) so that LLVM vectorises each pass; indices are unsigned or
counted from 0 so that no negative-index wraparound test blocks the vectoriser.

There is no padded copy of the input: weights of the last, partial block of a row past
``cols`` are taken as 0.0, exactly the value the reference pads with.

Why the bits are identical
--------------------------
* Every float operation is the reference's, in the same precision and order: float32
  ``y = x / s`` or ``y = (x - o) / s`` (two roundings), ``y = 0`` when ``s == 0``,
  ``v = cb[c] * s`` then ``v + o`` (each rounded to float32); constants are typed
  ``np.float32`` so that nothing is promoted to float64 by a Python literal. Numba
  compiles without fast-math, so LLVM neither contracts a*b+c into an FMA nor
  reassociates, and a division stays an IEEE division (never a multiplication by 1/s).
* The code of y is ``#{i : mids[i] < y}`` = ``np.searchsorted(mids, y, 'left')``,
  computed by one of four exact methods, whichever is cheapest for the codebook
  (``CodeSearch``): counting (``sum(mids[i] < y)``, few midpoints); a branchless binary
  search (k halving steps, exact for sorted mids); or a guess table over buckets of y,
  either equal buckets over [mids[0], mids[-1]] or log-spaced ones (on the float's bits,
  64 per octave: codebooks dense near zero, fp and dynamic). Either bucket function
  ``bkt`` is monotone in y, and the table holds ``lut[b] = #{i : bkt(mids[i]) < b}``
  (built with the same compiled ``bkt``), so for y in bucket b every midpoint counted is
  below y and every one not counted lies in bucket b or above: the code is lut[b] plus at
  most M = the most midpoints one bucket holds, and M steps of ``g += mids[g] < y`` end
  exactly on it. NaN gets 2**k - 1, as numpy's searchsorted sorts NaN last. The tests
  force each method on every codebook.
* Packing takes 8 codes as the bytes of a uint64 C: ``((C >> j) & 0x0101..01) *
  0x0102040810204080 >> 56`` gathers bit j of the 8 codes into one byte (no carries:
  tested on all 256 patterns); unpacking spreads a byte of a word back with a 256-entry
  table. Pure integer work: nothing to round.
* Stats compare the float bits as integers (vectorisable, and order-free): absmax is the
  largest ``bits & 0x7fffffff``; min/max use the usual order-preserving integer key. The
  results equal numpy's, signed zeros included (``np.minimum(m, 0)`` and
  ``np.maximum(m, 0)`` give +0.0 on a tie, ``abs`` clears the sign); any NaN gives NaN.
* The search error of each candidate is accumulated over the block in float64, element
  by element in order, padding included; candidates are kept in separate accumulators,
  and the first candidate with the least error wins (strict <), as in the reference.

The fused GEMV (not one of the four ops)
----------------------------------------
``gemv`` computes x @ W.T for a packed W without building W, for the runner's decode steps
(x with 1..8 rows). It is parallel over chunks of rows; a row is decoded block by block:
the bit planes of each group spread to 32 byte codes (the unpacking table above), then
``v = cb[code]`` (unscaled, a gather), and every row of x is dotted with v in float32; the
block's sum is multiplied by its scale once (affine: plus offset times the block's sum of
x). The padding past ``cols`` is never read. k = 2, 3, 4 get compiled variants with k a
constant (the plane loop unrolled). Its dot product ``_dot`` is the one piece of this module
compiled with fast-math (reassociation, FMA) so that it vectorises: the GEMV is not
bit-identical to dequantize + matmul (another summation order), only within float32
rounding of it, and its order is fixed by the compiled code, never by the threads.

``gemv(..., layout="bytes")`` is the same GEMV over the runner's byte layout of the codes
(k = 2, 4, 8: 8 // k codes per byte, code i at bits [(i % (8//k)) * k, +k) of byte i // (8//k),
the int32 words of the same shape as the planes; see kbitcli/runner/layers.py). A block is
decoded with one look-up per byte in ``byte_table`` (256 rows of the 8 // k codebook values a
byte stands for, moved as uint64: one at k = 4, two at k = 2; at k = 8 the codebook itself),
then dotted as above: ~0.2 ns per weight on 2 threads against ~0.3 for the bit planes (the
unpacking is gone). A LUT GEMV (T-MAC style: per call, tables of 256 partial dot products per
byte position, one look-up + add per byte and row) was measured slower here (0.2-0.6 ns per
weight at M = 1, worse at M > 1: the tables, 1 KiB per byte position, do not stay in L1), as
was a nibble unpack with cb[code] gathers (~10% slower). ``dequantize_bytes`` is dequantize
for the byte layout, with the reference's float32 operations (bit-identical).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kbitformat import KbitValueError

from ._checks import (CODE_LAYOUTS, check_bits, check_block, check_blockwise, check_byte_bits, check_codebook,
                      check_search, check_words, check_x)

F32 = np.float32
#: weights per parallel chunk (a chunk is a whole number of blocks)
CHUNK_WEIGHTS = 1 << 14
#: buckets of the code-search guess table
LUT_BUCKETS = 2048

METHOD_COUNT, METHOD_BSEARCH, METHOD_LUT, METHOD_LOGLUT = 0, 1, 2, 3
#: mantissa bits kept by the log-spaced table's buckets (64 buckets per octave)
LOGLUT_MANTISSA = 6

_ABS = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_NAN_BITS = np.uint32(0x7FC00000)


def _per_chunk(B: int) -> int:
    return max(1, CHUNK_WEIGHTS // B)


# ----------------------------------------------------------------------------- code search
@njit(cache=True, inline="always")
def _bkt(y, lo, sc, nbm1):
    """Monotone bucket of y in 0..nbm1 (NaN -> 0)."""
    t = (y - lo) * sc
    t = t if t > np.float32(0.0) else np.float32(0.0)
    t = t if t < nbm1 else nbm1
    return np.uint32(t)


@njit(cache=True)
def _lut_from_counts(cnt):
    """(lut, most): lut[b] = the number of midpoints in the buckets before b (where bucket b's
    search starts), most = the largest bucket."""
    lut = np.zeros(cnt.size, np.uint32)
    acc = 0
    most = 0
    for b in range(cnt.size):
        lut[b] = acc
        acc += cnt[b]
        most = max(most, cnt[b])
    return lut, most


@njit(cache=True)
def _build_lut(mids, lo, sc, nbk):
    cnt = np.zeros(nbk, np.int64)
    nbm1 = np.float32(nbk - 1)
    for m in mids:
        cnt[_bkt(m, lo, sc, nbm1)] += 1
    return _lut_from_counts(cnt)


@njit(cache=True, inline="always")
def _lbkt(yi, amin, sh, half, nbm1):
    """Monotone log-spaced bucket of the float32 whose bits are yi, in 0..nbm1.

    g = sign(y) * max(|bits(y)| - amin, 0) is non-decreasing in y (both zeros give 0,
    magnitudes below the float with bits amin share the buckets next to 0), and so is
    (g >> sh) + half, an arithmetic shift. NaN lands in some bucket; callers mask it."""
    a = np.int32(yi & np.int32(0x7FFFFFFF)) - amin
    a = a if a > np.int32(0) else np.int32(0)
    g = -a if yi < np.int32(0) else a
    b = np.int32(g >> sh) + half
    b = b if b > np.int32(0) else np.int32(0)
    b = b if b < nbm1 else nbm1
    return np.uint32(b)


@njit(cache=True)
def _build_loglut(mids, amin, sh, half, nbk):
    cnt = np.zeros(nbk, np.int64)
    nbm1 = np.int32(nbk - 1)
    mi = mids.view(np.int32)
    for i in range(mi.size):
        cnt[_lbkt(mi[i], amin, sh, half, nbm1)] += 1
    return _lut_from_counts(cnt)


def _loglut_params(mids: np.ndarray) -> tuple[int, int, int, int]:
    """(amin, sh, half, buckets) spanning one octave below the smallest nonzero |mid| to
    one octave above the largest."""
    mags = np.abs(mids[np.isfinite(mids)]).astype(F32)
    nz = mags[mags > 0]
    if nz.size == 0:
        return 0, 23, 1, 2
    amin = max(0, int(nz.min().view(np.int32)) - (1 << 23))
    top = min(0x7F800000, int(nz.max().view(np.int32)) + (1 << 23))
    sh = 23 - LOGLUT_MANTISSA
    half = ((top - amin) >> sh) + 1
    return amin, sh, half, 2 * half + 1


class CodeSearch:
    """Precomputed tables of the exact code search for one codebook's midpoints."""

    #: force one method (METHOD_COUNT, METHOD_BSEARCH, METHOD_LUT) for every codebook;
    #: for tests and benchmarks only (all three give the same codes)
    force_method: int | None = None

    def __init__(self, mids: np.ndarray):
        mids = np.ascontiguousarray(mids, dtype=F32)
        n = mids.size
        self.mids = mids
        self.mext = np.append(mids, F32(np.inf)).astype(F32)  # mext[n] = +inf: walks stop at n
        self.steps = int(max(1, int(n + 1).bit_length() - 1))  # halving steps: n + 1 = 2**k
        lo, hi = float(mids[0]), float(mids[-1])
        if np.isfinite(lo) and np.isfinite(hi) and hi > lo and n + 1 == 1 << self.steps:
            self.lo, self.sc = F32(lo), F32(LUT_BUCKETS / (hi - lo))
            self.lut, most = _build_lut(mids, self.lo, self.sc, LUT_BUCKETS)
        else:
            self.lo, self.sc = F32(0), F32(0)
            self.lut, most = np.zeros(1, np.uint32), n
        self.lut_steps = int(most)
        amin, sh, half, nbk = _loglut_params(mids)
        self.amin, self.sh, self.half = np.int32(amin), np.int32(sh), np.int32(half)
        self.llut, most = _build_loglut(mids, self.amin, self.sh, self.half, nbk)
        self.llut_steps = int(most)
        # rough costs (per value) of the methods, measured on AVX-512
        if n + 1 != 1 << self.steps:
            self.method = METHOD_COUNT  # not 2**k codes: counting is always exact
        else:
            costs = {METHOD_COUNT: 0.3 * n + 1, METHOD_BSEARCH: 2.0 * self.steps + 1,
                     METHOD_LUT: 5.0 + 2.0 * self.lut_steps, METHOD_LOGLUT: 6.0 + 2.0 * self.llut_steps}
            self.method = min(costs, key=costs.get)
            if self.force_method is not None:
                self.method = int(self.force_method)

    def args(self):
        steps = self.llut_steps if self.method == METHOD_LOGLUT else self.lut_steps
        lut = self.llut if self.method == METHOD_LOGLUT else self.lut
        return (self.method, self.mids, self.mext, self.steps, lut, self.lo, self.sc, steps,
                self.amin, self.sh, self.half)


@njit(cache=True, inline="always")
def _codes(ybuf, n, c32, c8, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half):
    """c8[i] = #{j : mids[j] < ybuf[i]} for i < n, exactly (NaN -> len(mids)).
    c32 is uint32 scratch (the gathers of the table methods are much faster on 32-bit lanes)."""
    nn = np.uint8(mids.size)
    if method == 0:
        for i in range(n):
            c8[i] = 0
        for m in mids:
            for i in range(n):
                c8[i] += m < ybuf[i]
        for i in range(n):
            y = ybuf[i]
            c8[i] = nn if y != y else c8[i]
        return
    if method == 1:
        for i in range(n):
            c32[i] = 0
        for b in range(steps - 1, -1, -1):
            h = np.uint32(1 << b)
            hm1 = np.uint32(h - np.uint32(1))
            for i in range(n):
                g = c32[i]
                c32[i] = g + h if mids[g + hm1] < ybuf[i] else g
    else:
        if method == 2:
            nbm1 = np.float32(lut.size - 1)
            for i in range(n):
                c32[i] = lut[_bkt(ybuf[i], lo, sc, nbm1)]
        else:
            yi = ybuf.view(np.int32)
            nbi = np.int32(lut.size - 1)
            for i in range(n):
                c32[i] = lut[_lbkt(yi[i], amin, sh, half, nbi)]
        for _ in range(lut_steps):
            for i in range(n):
                g = c32[i]
                c32[i] = g + np.uint32(mext[g] < ybuf[i])
    for i in range(n):
        y = ybuf[i]
        c8[i] = nn if y != y else np.uint8(c32[i])


@njit(cache=True, inline="always")
def _normalize_block(xs, nv, B, sv, ov, affine, ybuf):
    """ybuf[:B] = normalised values of the block's nv weights xs, then the padding."""
    if sv == np.float32(0.0):
        for i in range(B):
            ybuf[i] = np.float32(0.0)
        return
    if affine:
        for i in range(nv):
            ybuf[i] = np.float32(xs[i] - ov) / sv
        pad = np.float32(np.float32(0.0) - ov) / sv
    else:
        for i in range(nv):
            ybuf[i] = xs[i] / sv
        pad = np.float32(0.0) / sv
    for i in range(nv, B):
        ybuf[i] = pad


# ----------------------------------------------------------------------------- bit planes
_ONES = np.uint64(0x0101010101010101)
_GATHER = np.uint64(0x0102040810204080)  # sum of 2**(56 - 7t): bit 8t -> bit 56 + t


@njit(cache=True, inline="always")
def _pack_plane(c64, gi, j):
    """Word j of group gi: bit t = bit j of code t, codes as bytes of c64[4gi:4gi+4]."""
    ju = np.uint64(j)
    w = np.uint64(0)
    for q in range(4):
        C = c64[gi * 4 + q]
        w |= ((((C >> ju) & _ONES) * _GATHER) >> np.uint64(56)) << np.uint64(8 * q)
    return np.uint32(w)


def _spread_table() -> np.ndarray:
    """T[byte] = uint64 whose byte t is bit t of byte (the inverse of _pack_plane's gather)."""
    b = np.arange(256, dtype=np.uint64)
    t = np.zeros(256, dtype=np.uint64)
    for i in range(8):
        t |= ((b >> np.uint64(i)) & np.uint64(1)) << np.uint64(8 * i)
    return t


SPREAD = _spread_table()


@njit(cache=True, inline="always")
def _unpack_group(wrow, gi, k, spread, c64):
    """Codes of group gi (k words at wrow[gi*k:]) as bytes of c64[4gi:4gi+4]."""
    for q in range(4):
        C = np.uint64(0)
        for j in range(k):
            byte = (wrow[gi * k + j] >> np.uint32(8 * q)) & np.uint32(0xFF)
            C |= spread[byte] << np.uint64(j)
        c64[gi * 4 + q] = C


# ----------------------------------------------------------------------------- stats
@njit(parallel=True, nogil=True, cache=True)
def _stats_sym_kernel(xi, B, nb, per, out):
    """absmax bits of each block: xi is x viewed as uint32."""
    rows, cols = xi.shape
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            xs = xi[r, c0:min(cols, c0 + B)]
            m = np.uint32(0)
            for i in range(xs.size):
                a = np.uint32(xs[i] & _ABS)
                m = a if a > m else m
            out[r, b] = _NAN_BITS if m > _INF_BITS else m


@njit(parallel=True, nogil=True, cache=True)
def _stats_affine_kernel(xi, B, nb, per, lo_out, hi_out):
    """(min(min, 0), max(max, 0)) bits of each block: xi is x viewed as int32."""
    rows, cols = xi.shape
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    mask = np.int32(0x7FFFFFFF)
    for ch in prange(nchunks):
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            xs = xi[r, c0:min(cols, c0 + B)]
            lo = np.int32(0)   # the key of +0.0 (and the padding zeros)
            hi = np.int32(0)
            am = np.int32(0)
            for i in range(xs.size):
                v = xs[i]
                key = np.int32(v ^ np.int32((v >> np.int32(31)) & mask))
                lo = key if key < lo else lo
                hi = key if key > hi else hi
                a = np.int32(v & mask)
                am = a if a > am else am
            if am > np.int32(0x7F800000):  # a NaN
                lo_out[r, b] = np.int32(0x7FC00000)
                hi_out[r, b] = np.int32(0x7FC00000)
            else:
                if lo == np.int32(-1):  # -0.0: numpy's minimum(-0, +0) gives +0
                    lo = np.int32(0)
                lo_out[r, b] = np.int32(lo ^ np.int32((lo >> np.int32(31)) & mask))
                hi_out[r, b] = hi


# ----------------------------------------------------------------------------- quantize
@njit(parallel=True, nogil=True, cache=True)
def _quantize_pack_kernel(x, B, k, s, o, affine, per, method, mids, mext, steps, lut, lo, sc,
                          lut_steps, amin, sh, half, words):
    rows, cols = x.shape
    nb = s.shape[1]
    gpb = B // 32  # groups per block
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        ybuf = np.empty(B, dtype=np.float32)
        c32 = np.empty(B, dtype=np.uint32)
        cbuf = np.empty(B, dtype=np.uint8)
        c64 = cbuf.view(np.uint64)  # 8 codes per uint64, code t in byte t
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            xs = x[r, c0:min(cols, c0 + B)]
            sv = s[r, b]
            ov = o[r, b] if affine else np.float32(0.0)
            _normalize_block(xs, xs.size, B, sv, ov, affine, ybuf)
            _codes(ybuf, B, c32, cbuf, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half)
            wrow = words[r, b * gpb * k:(b + 1) * gpb * k]
            for gi in range(gpb):
                for j in range(k):
                    wrow[gi * k + j] = _pack_plane(c64, gi, j)


# ----------------------------------------------------------------------------- search
@njit(parallel=True, nogil=True, cache=True)
def _search_kernel(x, B, cand_s, cand_o, affine, cb, per, method, mids, mext, steps, lut, lo,
                   sc, lut_steps, amin, sh, half, best):
    rows, cols = x.shape
    ncand = cand_s.shape[0]
    nb = cand_s.shape[2]
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        xbuf = np.empty(B, dtype=np.float32)
        ybuf = np.empty(B, dtype=np.float32)
        c32 = np.empty(B, dtype=np.uint32)
        cbuf = np.empty(B, dtype=np.uint8)
        d2 = np.empty((B, ncand), dtype=np.float64)
        err = np.empty(ncand, dtype=np.float64)
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            xs = x[r, c0:min(cols, c0 + B)]
            nv = xs.size
            for e in range(nv):
                xbuf[e] = xs[e]
            for e in range(nv, B):
                xbuf[e] = np.float32(0.0)
            for i in range(ncand):
                sv = cand_s[i, r, b]
                ov = cand_o[i, r, b] if affine else np.float32(0.0)
                _normalize_block(xbuf, B, B, sv, ov, affine, ybuf)
                _codes(ybuf, B, c32, cbuf, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half)
                if affine:
                    for e in range(B):
                        v = np.float32(np.float32(cb[cbuf[e]] * sv) + ov)
                        d = np.float64(xbuf[e]) - np.float64(v)
                        d2[e, i] = d * d
                else:
                    for e in range(B):
                        v = np.float32(cb[cbuf[e]] * sv)
                        d = np.float64(xbuf[e]) - np.float64(v)
                        d2[e, i] = d * d
            # per candidate, the sum in element order (candidates side by side)
            for i in range(ncand):
                err[i] = 0.0
            for e in range(B):
                for i in range(ncand):
                    err[i] += d2[e, i]
            bi = 0
            best_err = np.inf
            for i in range(ncand):
                if err[i] < best_err:
                    best_err = err[i]
                    bi = i
            best[r, b] = bi


# ----------------------------------------------------------------------------- dequantize
@njit(parallel=True, nogil=True, cache=True)
def _dequantize_kernel(words, k, B, cols, s, o, affine, cb, spread, per, out):
    rows = words.shape[0]
    nb = s.shape[1]
    gpb = B // 32
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        cbuf = np.empty(B, dtype=np.uint8)
        c64 = cbuf.view(np.uint64)
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            orow = out[r, c0:min(cols, c0 + B)]
            nv = orow.size
            wrow = words[r, b * gpb * k:(b + 1) * gpb * k]
            for gi in range((nv + 31) // 32):
                _unpack_group(wrow, gi, k, spread, c64)
            _decode_block(orow, cbuf, cb, s[r, b], o[r, b], affine)


@njit(inline="always", nogil=True, cache=True)
def _decode_block(orow, cbuf, cb, sv, ov, affine):
    """orow[t] = cb[code t] * s (+ o), each operation rounded to float32 (the reference's)."""
    if affine:
        for t in range(orow.size):
            orow[t] = np.float32(np.float32(cb[cbuf[t]] * sv) + ov)
    else:
        for t in range(orow.size):
            orow[t] = np.float32(cb[cbuf[t]] * sv)


# ----------------------------------------------------------------------------- gemv
@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(v, x, n):
    """sum(v[:n] * x[:n]) in float32. The only fast-math code of the module (reassociation and
    fused multiply-adds, so that LLVM vectorises the sum into several vector accumulators):
    the GEMV is not bit-exact anyway, and the order of the sum is fixed by the compiled code,
    never by the threads."""
    d = np.float32(0.0)
    for t in range(n):
        d += v[t] * x[t]
    return d


@njit(cache=True, inline="always")
def _block_sums(x, B, cols, nb, affine):
    """(M, nb) float32: x summed over each block (what the offsets of affine types multiply);
    zeros when not affine."""
    M = x.shape[0]
    xsum = np.zeros((M, nb), dtype=np.float32)
    if affine:
        for m in range(M):
            for b in range(nb):
                a = np.float32(0.0)
                for c in range(b * B, min(cols, b * B + B)):
                    a += x[m, c]
                xsum[m, b] = a
    return xsum


@njit(cache=True, inline="always")
def _gemv_rows(words, k, B, cols, s, o, affine, cb, spread, x, xsum, r0, r1, cbuf, c64, v, acc, out):
    """out[:, r0:r1]: each row decoded block by block into v, dotted with every row of x."""
    M = x.shape[0]
    nb = s.shape[1]
    gpb = B // 32
    for r in range(r0, r1):
        wrow = words[r]
        for m in range(M):
            acc[m] = np.float32(0.0)
        for b in range(nb):
            c0 = b * B
            nv = min(B, cols - c0)  # the padding past cols is never read
            wblk = wrow[b * gpb * k:(b + 1) * gpb * k]
            for gi in range((nv + 31) // 32):
                _unpack_group(wblk, gi, k, spread, c64)
            for t in range(nv):
                v[t] = cb[cbuf[t]]
            _block_dot(acc, v, x, c0, nv, s[r, b], o[r, b], xsum, b, affine)
        for m in range(M):
            out[m, r] = acc[m]


@njit(cache=True, inline="always")
def _block_dot(acc, v, x, c0, nv, sv, ov, xsum, b, affine):
    """acc[m] += (v . x[m, block]) * s (+ o * the block's sum of x[m]): one block of a row."""
    for m in range(acc.size):
        if affine:
            acc[m] += _dot(v, x[m, c0:c0 + nv], nv) * sv + ov * xsum[m, b]
        else:
            acc[m] += _dot(v, x[m, c0:c0 + nv], nv) * sv


@njit(parallel=True, nogil=True, cache=True)
def _gemv_kernel(words, k, B, cols, s, o, affine, cb, spread, x, rpc, out):
    rows = words.shape[0]
    M = x.shape[0]
    nb = s.shape[1]
    xsum = _block_sums(x, B, cols, nb, affine)
    nchunks = (rows + rpc - 1) // rpc
    for ch in prange(nchunks):
        cbuf = np.empty(B, dtype=np.uint8)
        c64 = cbuf.view(np.uint64)  # 8 codes per uint64, code t in byte t
        v = np.empty(B, dtype=np.float32)
        acc = np.empty(M, dtype=np.float32)
        r0 = ch * rpc
        r1 = min(rows, r0 + rpc)
        # k as a constant for the common widths: LLVM unrolls the plane loop of the unpacking
        # (about 20% faster at k = 3, 4; no gain measured at k >= 5)
        if k == 4:
            _gemv_rows(words, 4, B, cols, s, o, affine, cb, spread, x, xsum, r0, r1, cbuf, c64, v, acc, out)
        elif k == 3:
            _gemv_rows(words, 3, B, cols, s, o, affine, cb, spread, x, xsum, r0, r1, cbuf, c64, v, acc, out)
        elif k == 2:
            _gemv_rows(words, 2, B, cols, s, o, affine, cb, spread, x, xsum, r0, r1, cbuf, c64, v, acc, out)
        else:
            _gemv_rows(words, k, B, cols, s, o, affine, cb, spread, x, xsum, r0, r1, cbuf, c64, v, acc, out)


# ----------------------------------------------------------------------------- byte layout


def byte_table(cb, k: int) -> np.ndarray:
    """float32 (256, 8 // k): row b holds cb[code] of the 8 // k codes byte b packs, in order
    (code t of a byte at bits [t*k, t*k + k)). For k = 8 it is the codebook itself."""
    per = 8 // k
    b = np.arange(256)
    idx = (b[:, None] >> (np.arange(per) * k)) & ((1 << k) - 1)
    return np.ascontiguousarray(np.asarray(cb, dtype=F32)[idx], dtype=F32)


@njit(cache=True, inline="always")
def _decode_bytes(cblk, nbytes, k, tab, tab64, v, v64):
    """v[:nbytes * 8 // k] = cb[codes] of the bytes cblk[:nbytes]: one table load per byte,
    the 8 // k float32 values moved as uint64 (k = 4: one, k = 2: two; k = 8: one float)."""
    if k == 4:
        for j in range(nbytes):
            v64[j] = tab64[cblk[j]]
    elif k == 2:
        for j in range(nbytes):
            c = np.intp(cblk[j]) * 2
            v64[2 * j] = tab64[c]
            v64[2 * j + 1] = tab64[c + 1]
    else:
        for j in range(nbytes):
            v[j] = tab[cblk[j]]


@njit(cache=True, inline="always")
def _gemv_bytes_rows(c8, k, B, cols, s, o, affine, tab, tab64, x, xsum, r0, r1, v, v64, acc, out):
    """out[:, r0:r1] for the byte layout: each block's bytes decoded into v, dotted with x."""
    M = x.shape[0]
    nb = s.shape[1]
    bpb = B * k // 8  # bytes per block
    for r in range(r0, r1):
        crow = c8[r]
        for m in range(M):
            acc[m] = np.float32(0.0)
        for b in range(nb):
            c0 = b * B
            nv = min(B, cols - c0)  # the padding past cols is never dotted
            _decode_bytes(crow[b * bpb:(b + 1) * bpb], (nv * k + 7) // 8, k, tab, tab64, v, v64)
            _block_dot(acc, v, x, c0, nv, s[r, b], o[r, b], xsum, b, affine)
        for m in range(M):
            out[m, r] = acc[m]


@njit(parallel=True, nogil=True, cache=True)
def _gemv_bytes_kernel(c8, k, B, cols, s, o, affine, tab, tab64, x, rpc, out):
    rows = c8.shape[0]
    M = x.shape[0]
    nb = s.shape[1]
    xsum = _block_sums(x, B, cols, nb, affine)
    nchunks = (rows + rpc - 1) // rpc
    for ch in prange(nchunks):
        v = np.empty(B, dtype=np.float32)
        v64 = v.view(np.uint64)
        acc = np.empty(M, dtype=np.float32)
        r0 = ch * rpc
        r1 = min(rows, r0 + rpc)
        if k == 4:
            _gemv_bytes_rows(c8, 4, B, cols, s, o, affine, tab, tab64, x, xsum, r0, r1, v, v64, acc, out)
        elif k == 2:
            _gemv_bytes_rows(c8, 2, B, cols, s, o, affine, tab, tab64, x, xsum, r0, r1, v, v64, acc, out)
        else:
            _gemv_bytes_rows(c8, 8, B, cols, s, o, affine, tab, tab64, x, xsum, r0, r1, v, v64, acc, out)


@njit(inline="always", nogil=True, cache=True)
def _spread_bytes(cblk, k, nbytes, cbuf):
    """The codes of a block's bytes, one per byte of cbuf (k a constant in each call site, so
    the loops have fixed shifts)."""
    if k == 4:
        for j in range(nbytes):
            v = cblk[j]
            cbuf[2 * j] = v & np.uint8(15)
            cbuf[2 * j + 1] = v >> np.uint8(4)
    elif k == 2:
        for j in range(nbytes):
            v = cblk[j]
            cbuf[4 * j] = v & np.uint8(3)
            cbuf[4 * j + 1] = (v >> np.uint8(2)) & np.uint8(3)
            cbuf[4 * j + 2] = (v >> np.uint8(4)) & np.uint8(3)
            cbuf[4 * j + 3] = v >> np.uint8(6)
    else:
        for j in range(nbytes):
            cbuf[j] = cblk[j]


@njit(parallel=True, nogil=True, cache=True)
def _dequantize_bytes_kernel(c8, k, B, cols, s, o, affine, cb, per, out):
    """dequantize for the byte layout, with the reference's float32 operations (no fast-math):
    a block's codes spread to bytes, then cb[code] * s (+ o), as the bit-plane kernel does."""
    rows = c8.shape[0]
    nb = s.shape[1]
    bpb = B * k // 8
    nblocks = rows * nb
    nchunks = (nblocks + per - 1) // per
    for ch in prange(nchunks):
        cbuf = np.empty(B, dtype=np.uint8)
        L0 = ch * per
        L1 = min(nblocks, L0 + per)
        for L in range(L0, L1):
            r = L // nb
            b = L - r * nb
            c0 = b * B
            orow = out[r, c0:min(cols, c0 + B)]
            cblk = c8[r, b * bpb:(b + 1) * bpb]
            if k == 4:
                _spread_bytes(cblk, 4, bpb, cbuf)
            elif k == 2:
                _spread_bytes(cblk, 2, bpb, cbuf)
            else:
                _spread_bytes(cblk, 8, bpb, cbuf)
            _decode_block(orow, cbuf, cb, s[r, b], o[r, b], affine)

# ----------------------------------------------------------------------------- the ops
def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32)


@njit(parallel=True, nogil=True, cache=True)
def _error_sums_kernel(x, y, chunks):
    """(sum (x - y)**2, sum x**2) over two flat float32 arrays, accumulated in float64 per
    chunk (in order within a chunk), chunks added in order: deterministic for a given size."""
    n = x.size
    step = (n + chunks - 1) // chunks
    dd = np.zeros(chunks)
    xx = np.zeros(chunks)
    for c in prange(chunks):
        a = 0.0
        b = 0.0
        for i in range(c * step, min(n, (c + 1) * step)):
            xi = np.float64(x[i])
            d = xi - np.float64(y[i])
            a += d * d
            b += xi * xi
        dd[c] = a
        xx[c] = b
    return dd.sum(), xx.sum()


class CpuOps:
    """Numba CPU implementation of the four kernel operations (see module docstring)."""

    name = "cpu"

    @staticmethod
    def stats(x: np.ndarray, B: int, affine: bool):
        B = check_block(B)
        rows, cols, nb = check_x(x, B)
        x = _f32(x)
        a = np.empty((rows, nb), dtype=F32)
        if affine:
            hi = np.empty((rows, nb), dtype=F32)
            _stats_affine_kernel(x.view(np.int32), B, nb, _per_chunk(B), a.view(np.int32), hi.view(np.int32))
            return a, hi
        _stats_sym_kernel(x.view(np.uint32), B, nb, _per_chunk(B), a.view(np.uint32))
        return a

    @staticmethod
    def search(x, B, cand_s, cand_o, cb, mids) -> np.ndarray:
        B, rows, cols, nb = check_search(x, B, cand_s, cand_o, cb, mids)
        affine = cand_o is not None
        x, cand_s = _f32(x), _f32(cand_s)
        co = _f32(cand_o) if affine else cand_s
        cs = CodeSearch(mids)
        best = np.zeros((rows, nb), dtype=np.int32)
        if cand_s.shape[0]:
            _search_kernel(x, B, cand_s, co, affine, _f32(cb), _per_chunk(B), *cs.args(), best)
        return best

    @staticmethod
    def quantize_pack(x, B, k, s, o, cb, mids) -> np.ndarray:
        B, k = check_block(B), check_bits(k)
        rows, cols, nb = check_x(x, B)
        check_blockwise("scales", s, (rows, nb))
        check_blockwise("offsets", o, (rows, nb))
        check_codebook(cb, mids, k)
        x, s = _f32(x), _f32(s)
        affine = o is not None
        ov = _f32(o) if affine else s
        cs = CodeSearch(mids)
        words = np.empty((rows, nb * (B // 32) * k), dtype=np.uint32)
        _quantize_pack_kernel(x, B, k, s, ov, affine, _per_chunk(B), *cs.args(), words)
        return words

    @staticmethod
    def error_sums(x, y) -> tuple[float, float]:
        """(sum (x - y)**2, sum x**2) in float64: what kbitformat's error measurement needs,
        without numpy's float64 temporaries."""
        xf = np.ascontiguousarray(x, dtype=F32).reshape(-1)
        yf = np.ascontiguousarray(y, dtype=F32).reshape(-1)
        if xf.size != yf.size:
            raise KbitValueError(f"error_sums: {xf.size} values against {yf.size}")
        dd, xx = _error_sums_kernel(xf, yf, 64)
        return float(dd), float(xx)

    @staticmethod
    def dequantize(words, k, B, cols, s, o, cb) -> np.ndarray:
        B, k, cols = check_block(B), check_bits(k), int(cols)
        check_words(words, k, B, cols, s, o)
        check_codebook(cb, None, k)
        words = np.ascontiguousarray(words, dtype=np.uint32)
        s = _f32(s)
        affine = o is not None
        ov = _f32(o) if affine else s
        out = np.empty((words.shape[0], cols), dtype=F32)
        _dequantize_kernel(words, k, B, cols, s, ov, affine, _f32(cb), SPREAD, _per_chunk(B), out)
        return out

    @staticmethod
    def gemv(words, k, B, cols, s, o, cb, x) -> np.ndarray:
        """out (M, rows) float32 = x (M, cols) @ W.T, W = dequantize(words, k, B, cols, s, o, cb),
        without building W (see gemv)."""
        return gemv(words, k, B, cols, s, o, cb, x)


#: weights per parallel chunk of the GEMV (a chunk is a whole number of rows)
GEMV_CHUNK_WEIGHTS = 1 << 14


def _gemv_array(name: str, a, kinds: str, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype.kind not in kinds:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise KbitValueError(f"gemv: {name} must be a numpy array of {what}, got {got}")
    return a


def _check_gemv_args(words, k, B, cols, s, o, cb, layout: str):
    """(B, k, cols, words) after the checks of gemv / gemv_plan (x apart)."""
    if layout not in CODE_LAYOUTS:
        raise KbitValueError(f"gemv: code layout must be one of {', '.join(CODE_LAYOUTS)}, got {layout!r}")
    B, k, cols = check_block(B), check_bits(k), int(cols)
    if layout == "bytes":
        k = check_byte_bits(k)
    words = _gemv_array("packed words", words, "ui", "uint32 (or int32) words")
    if words.dtype.itemsize != 4:
        raise KbitValueError(f"gemv: packed words must be uint32 (or int32), got {words.dtype}")
    for name, a in (("scales", s), ("offsets", o), ("codebook", cb)):
        if a is not None:
            _gemv_array(name, a, "f", "floats")
    check_words(words, k, B, cols, s, o)
    check_codebook(cb, None, k)
    return B, k, cols, words


def gemv(words, k, B, cols, s, o, cb, x, layout: str = "planes") -> np.ndarray:
    """out (M, rows) float32 = x @ W.T for a packed weight W = dequantize(words, k, B, cols,
    s, o, cb), read straight from the packed words (W is never built): the decode step of the
    runner, where x has a few rows (M = 1..8; any M >= 1 works).

    words uint32 (or int32, viewed as uint32) (rows, G*k); s, o float32 (rows, nb) (o None for
    symmetric types); cb float32 (2**k,); x float (M, cols). layout "planes" (the format's bit
    planes) or "bytes" (the runner's byte layout, k = 2, 4, 8: see dequantize_bytes). Each row
    of W is decoded block by block (bit planes: a group's planes spread to 32 byte codes, then
    cb[code]; bytes: one look-up per byte in byte_table, 8 // k values at once) into a float32
    buffer and dotted with every row of x; the sum over a block is float32 and is multiplied
    by the block's scale once (affine: plus offset * the block's sum of x). The columns past
    `cols` (the padding of the last block) are never read. Not bit-identical to
    dequantize + matmul (the sum runs in another order, with fused multiply-adds); the error
    is that of a float32 dot product, within about cols * 2**-24 * sum|x||w| per output."""
    B, k, cols, words = _check_gemv_args(words, k, B, cols, s, o, cb, layout)
    _gemv_array("x", x, "f", "floats")
    return GemvPlan(words, k, B, cols, s, o, cb, layout)(x)  # the plan checks x's shape


class GemvPlan:
    """A packed weight made ready for repeated gemv calls: the arguments are checked and
    converted once, so a call costs only the kernel (the runner calls it 210 times a token
    for SmolLM2; the checks and conversions were ~30 us a call). Callable: plan(x) -> out."""

    __slots__ = ("words", "k", "B", "cols", "s", "ov", "affine", "cb", "rows", "rpc", "layout", "tab", "tab64")

    def __init__(self, words, k, B, cols, s, o, cb, layout: str = "planes"):
        self.words = np.ascontiguousarray(words).view(np.uint32)
        self.k, self.B, self.cols, self.layout = k, B, cols, layout
        self.s = _f32(s)
        self.affine = o is not None
        self.ov = _f32(o) if self.affine else self.s
        self.cb = _f32(cb)
        self.rows = self.words.shape[0]
        self.rpc = max(1, GEMV_CHUNK_WEIGHTS // (self.s.shape[1] * B))
        if layout == "bytes":
            self.words = _code_bytes(self.words)
            self.tab = byte_table(self.cb, k).reshape(-1)
            self.tab64 = self.tab.view(np.uint64) if k < 8 else np.zeros(1, np.uint64)

    def __call__(self, x) -> np.ndarray:
        if x.dtype != F32 or not x.flags.c_contiguous:
            x = _f32(x)
        if x.ndim != 2 or x.shape[1] != self.cols:
            raise KbitValueError(f"x must be (M, {self.cols}), got {tuple(x.shape)}")
        if x.shape[0] < 1:
            raise KbitValueError("the fused GEMV takes at least 1 input row, got 0")
        out = np.empty((x.shape[0], self.rows), dtype=F32)
        if self.layout == "bytes":
            _gemv_bytes_kernel(self.words, self.k, self.B, self.cols, self.s, self.ov, self.affine, self.tab,
                               self.tab64, x, self.rpc, out)
        else:
            _gemv_kernel(self.words, self.k, self.B, self.cols, self.s, self.ov, self.affine, self.cb, SPREAD, x,
                         self.rpc, out)
        return out


def gemv_plan(words, k, B, cols, s, o, cb, layout: str = "planes", checked: bool = False) -> GemvPlan:
    """GemvPlan for a packed weight (layout "planes" or "bytes"), after the same checks as
    gemv (skipped when the caller has just made them: checked=True)."""
    if not checked:
        B, k, cols, words = _check_gemv_args(words, k, B, cols, s, o, cb, layout)
    return GemvPlan(words, k, B, cols, s, o, cb, layout)


@njit(parallel=True, nogil=True, cache=True)
def _planes_to_bytes_kernel(words, k, spread):
    """In place, row by row: bit-plane words -> the byte layout (the same codes)."""
    rows, W = words.shape
    G = W // k
    per = 8 // k
    for r in prange(rows):
        cbuf = np.empty(G * 32, dtype=np.uint8)
        c64 = cbuf.view(np.uint64)
        wrow = words[r]
        for gi in range(G):
            _unpack_group(wrow, gi, k, spread, c64)
        b8 = wrow.view(np.uint8)
        for q in range(W * 4):
            v = np.uint32(0)
            for t in range(per):
                v |= np.uint32(cbuf[q * per + t]) << np.uint32(t * k)
            b8[q] = np.uint8(v)


def planes_to_bytes_inplace(words, k: int) -> None:
    """Convert C-contiguous uint32 (or int32) bit-plane words (rows, G*k), k = 2, 4 or 8, to
    the runner's byte layout, in place (no second copy of the codes; ~1000x the torch path)."""
    k = check_byte_bits(k)
    if not isinstance(words, np.ndarray) or words.dtype.itemsize != 4 or words.dtype.kind not in "ui" \
            or words.ndim != 2 or not words.flags.c_contiguous or words.shape[1] % k:
        raise KbitValueError(f"planes_to_bytes_inplace takes C-contiguous 32-bit words (rows, G*{k})")
    _planes_to_bytes_kernel(words.view(np.uint32), k, SPREAD)


def _code_bytes(words) -> np.ndarray:
    """(rows, bytes) uint8 view of C-contiguous (rows, W) 32-bit words."""
    words = np.ascontiguousarray(words)
    return words.view(np.uint8).reshape(words.shape[0], words.shape[1] * 4)


def dequantize_bytes(words, k, B, cols, s, o, cb) -> np.ndarray:
    """CpuOps.dequantize for the runner's byte layout (words: int32/uint32 (rows, G*k), each
    word 32 // k consecutive codes, code i at bits [i*k, i*k + k)): the same float32 values,
    bit for bit, as dequantizing the bit planes the bytes were converted from."""
    B, k, cols = check_block(B), check_byte_bits(k), int(cols)
    words = _gemv_array("packed words", words, "ui", "uint32 (or int32) words")
    if words.dtype.itemsize != 4:
        raise KbitValueError(f"packed words must be uint32 (or int32), got {words.dtype}")
    check_words(words, k, B, cols, s, o)
    check_codebook(cb, None, k)
    s = _f32(s)
    affine = o is not None
    out = np.empty((words.shape[0], cols), dtype=F32)
    _dequantize_bytes_kernel(_code_bytes(words), k, B, cols, s, _f32(o) if affine else s, affine, _f32(cb),
                             _per_chunk(B), out)
    return out
