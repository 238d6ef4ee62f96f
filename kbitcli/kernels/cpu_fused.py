"""The fused conversion kernel: source bytes -> packed words, scales, offsets and the
quantization error in one parallel pass (the common case of `kbit quantize`).

    qt, err = quantize_fused(raw, "bfloat16", spec, name)   # None when not supported

What it replaces, with the same bits
------------------------------------
The general path (kbitcli.convert) converts the tensor to a float32 buffer, then runs
``kbitformat.quantize(x, spec, ops=CpuOps)`` (``stats``, the scale and offset encodings of
kbitformat.scales in numpy, ``quantize_pack``) and ``kbitformat.quantization_error`` (a
second pass: ``dequantize`` a chunk of rows at a time, then ``CpuOps.error_sums``). That is
five passes over the tensor, three of them over float32 copies. This kernel reads the
source's stored values (bfloat16 or float16 bits, or float32) straight from the memory map,
a block at a time into a small float32 buffer, and for each block computes what the general
path computes, by the same float operations in the same order:

* stats: absmax, or (min(min, 0), max(max, 0)), over the block padded with zeros (bit
  compares for the absmax, float compares for lo / hi: equal on every finite value, +0.0 on
  ties with zero as numpy gives); a block holding NaN or Inf is flagged and the caller raises
  kbitformat's "holds NaN or Inf values" error;
* the raw scale of search "none": absmax * 1 (sym), or hi*1 - lo*1 and lo*1 + 0*s (affine),
  in float32 (kbitformat.scales.raw_candidates);
* the scale encodings fp32 (as is) and fp16 (round to nearest even, then one fp16 step up
  when the fp16 value lies below the raw scale; the affine offset rounded to nearest even),
  encode_scales / encode_offsets; the float32 -> float16 rounding is integer code
  (``_f32_to_f16``), checked against numpy's on every non-negative float32 by the tests'
  exhaustive check (tests/test_convert_fused.py) and the fp16 -> float32 decoding is a
  table built by numpy; e8 and dq scales (whose encodings are tables and groups of blocks)
  are not taken here;
* normalisation and the bit-plane packing of kbitcli.kernels.cpu (the same compiled
  helpers: ``_normalize_block``, ``_pack_plane``); the exact code search ``_codes`` of
  kbitcli.kernels.cpu, except for evenly spaced codebooks (int, affine; `uniform_search`):
  there a float32 bracket floor(y * a + c -+ e) gives the code without a table look-up for
  all values but those within ~e steps of a midpoint, whose block takes one guess and one
  compare a value; both proven exact at construction (4n checks, see uniform_search) and
  checked against ``_codes`` at midpoints, their float32 neighbours and random values by
  the tests;
* the dequantized value cb[code] * s (+ o) in float32, and the error sums
  sum (float64(x) - float64(v))**2, sum float64(x)**2.

The error sums in kbitformat's order
------------------------------------
``quantization_error`` cuts the tensor into chunks of ``step = ERROR_CHUNK // cols`` rows;
``CpuOps.error_sums`` cuts each chunk (flattened, row-major) into 64 pieces of
ceil(n / 64) values, sums each piece in element order in float64, adds the 64 piece sums in
order, and the chunks' sums are added in order starting from 0.0. The parallel units of
this kernel are exactly those pieces: a unit quantizes every block that overlaps its piece
(a block cut by a piece boundary is quantized by both units; only the unit holding the
block's first weight writes its words, scale and offset) and sums the errors of its piece's
weights in element order. The pieces' sums are then combined in kbitformat's order, so the
recorded error is the same float64 value, bit for bit, as the general path's. A parallel
unit takes UNIT_PIECES consecutive pieces of a chunk, one after the other (summing several
pieces side by side as independent chains was tried: 8 or 32 pieces buffered in cache cost
more in the stores than the chains saved, and two pieces in lock step did not pay either).
With measure_error=False the sums are skipped and a unit quantizes the blocks that start
in its pieces.

Blocks never share outputs and no sum depends on the number of threads: the results are
the same on any machine and thread count, and equal to the general path's (the tests
compare the output files byte for byte over a grid of recipes and source dtypes).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from kbitformat import KbitValueError, QuantSpec
from kbitformat import codebooks
from kbitformat.quantize import ERROR_CHUNK, QuantizedTensor, _ratio

from .cpu import CodeSearch, _codes, _normalize_block, _pack_plane

F32 = np.float32
#: pieces per row chunk of kbitformat.quantization_error (the chunks of CpuOps.error_sums)
ERROR_PIECES = 64
#: source dtypes the kernel reads, and the numpy dtype of their stored values
SOURCE_KINDS = {"bfloat16": (0, np.uint16), "float16": (1, np.uint16), "float32": (2, np.uint32)}
#: scale encodings computed in the kernel
SCALES = {"fp32": 0, "fp16": 1}

#: fp16 bits -> float32 (numpy's conversion, exact)
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)

BAD_NONFINITE, BAD_RANGE, BAD_FP16 = 1, 2, 4


def supported(spec: QuantSpec, source_dtype: str) -> bool:
    """True when quantize_fused takes a tensor of this spec and source dtype: a fixed
    codebook (not quantile / lloyd), no scale search, fp16 or fp32 scales, and bfloat16,
    float16 or float32 source values."""
    return (spec.search == "none" and spec.scale in SCALES and source_dtype in SOURCE_KINDS
            and spec.dtype not in codebooks.DATA_DEPENDENT)


# ----------------------------------------------------------------------------- fp16
@njit(cache=True, inline="always")
def _f32_to_f16(u):
    """float32 bits u (uint32) -> float16 bits (uint32), round to nearest even, overflow to
    +-inf; the value must not be NaN (never called with one)."""
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x477FF000):  # >= 65520: rounds past 65504
        return sign | np.uint32(0x7C00)
    if a >= np.uint32(0x38800000):  # normal in fp16 (>= 2**-14): rebias, round 13 bits off
        a2 = a - np.uint32(0x38000000)
        return sign | ((a2 + np.uint32(0xFFF) + ((a2 >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    e = a >> np.uint32(23)
    if e < np.uint32(102):  # below 2**-25: rounds to zero
        return sign
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    sh = np.uint32(126) - e  # 14..24
    q = m >> sh
    rem = m & ((np.uint32(1) << sh) - np.uint32(1))
    half = np.uint32(1) << (sh - np.uint32(1))
    if rem > half or (rem == half and (q & np.uint32(1)) == np.uint32(1)):
        q += np.uint32(1)
    return sign | q


@njit(parallel=True, nogil=True, cache=True)
def f32_to_f16_bits(u, out):
    """Vector form of _f32_to_f16 (for the tests): out[i] = float16 bits of float32 bits u[i]."""
    for i in prange(u.size):
        out[i] = np.uint16(_f32_to_f16(u[i]))


# ----------------------------------------------------------------------------- uniform codes
@njit(cache=True, inline="always")
def _ucode_guess(y, ua, ub, top):
    """floor(clamp(y * ua + ub, 0, top)): the uniform codebooks' guess of the code (see
    uniform_search); NaN gives 0."""
    w = y * ua + ub
    w = w if w > np.float32(0.0) else np.float32(0.0)
    w = w if w < top else top
    return np.int32(w)


@njit(cache=True)
def _ucode_guesses(ys, ua, ub, top, out):
    for i in range(ys.size):
        out[i] = _ucode_guess(ys[i], ua, ub, top)


def uniform_search(mids: np.ndarray) -> tuple | None:
    """(ua, ub, top, ubl, ubh, top2) of the direct code search for evenly spaced midpoints
    (int, affine), or None (the general search of kbitcli.kernels.cpu then runs).

    The exact code of y is t(y) = #{i : mids[i] < y} (NaN never reaches it: the kernel
    raises for NaN weights). Write g(y, c, T) = floor(clamp(y * ua + c, 0, T)) in float32,
    with ua = 1 / spacing. Two uses:

    * the guess j(y) = g(y, ub, n - 0.5), ub = 0.5 - mids[0] * ua: the index of the nearest
      midpoint, so t(y) is j or j + 1 and the code is j + (mids[j] < y), one compare;
    * the bracket lo(y) = g(y, ubl, n + 0.5) <= t(y) <= hi(y) = g(y, ubh, n + 0.5), ubl and
      ubh = 1 - mids[0] * ua -+ e: where lo == hi (all values but those within ~e steps of a
      midpoint) the code is lo, with no table look-up; a block holding a value where they
      differ takes the guess and compare for all its values.

    Both hold for every float32 y when they hold where the step functions involved step,
    since g is non-decreasing in y (float32 multiply and add by constants, ua > 0, clamp and
    floor are monotone) and t steps just above each midpoint: j(mids[i]) <= i and
    j(nextup(mids[i])) >= i for the guess; lo(mids[i]) <= i and hi(nextup(mids[i])) >= i + 1
    for the bracket, for every i. These 4n checks run here with the kernel's own compiled g;
    the smallest e (from 2**-14 up) that passes is taken; None when the guess fails."""
    m = np.ascontiguousarray(mids, dtype=F32)
    n = m.size
    if n < 2 or not np.all(np.isfinite(m)) or not np.all(np.diff(m) > 0):
        return None
    d = (float(m[-1]) - float(m[0])) / (n - 1)
    if np.max(np.abs(np.diff(m.astype(np.float64)) - d)) > 1e-3 * d:
        return None  # not evenly spaced (nf, fp, dynamic)
    ua = F32(1.0 / d)
    up = np.nextafter(m, F32(np.inf))
    i = np.arange(n)
    at = np.empty(n, np.int32)
    above = np.empty(n, np.int32)

    def g(ys, c, top, out):
        _ucode_guesses(ys, ua, F32(c), F32(top), out)
        return out

    ub = 0.5 - float(m[0]) / d
    if not (np.all(g(m, ub, n - 0.5, at) <= i) and np.all(g(up, ub, n - 0.5, above) >= i)):
        return None
    c = 1.0 - float(m[0]) / d
    for e in (2.0**-14, 2.0**-12, 2.0**-10, 2.0**-8, 2.0**-6):
        if np.all(g(m, c - e, n + 0.5, at) <= i) and np.all(g(up, c + e, n + 0.5, above) >= i + 1):
            return ua, F32(ub), F32(n - 0.5), F32(c - e), F32(c + e), F32(n + 0.5)
    return ua, F32(ub), F32(n - 0.5), F32(0), F32(1), F32(n + 0.5)  # the bracket never closes


# ----------------------------------------------------------------------------- the kernel
@njit(cache=True, inline="always")
def _load_block(raw, kind, f16, g, nv, B, xbuf):
    """xbuf[:nv] = float32 values of raw[g:g + nv]; xbuf[nv:B] = 0."""
    rs = raw[g:g + nv]  # a slice, not raw[g + i]: indexes from 0 let the loops vectorize
    if kind == 0:
        xi = xbuf.view(np.uint32)
        for i in range(nv):
            xi[i] = np.uint32(rs[i]) << np.uint32(16)
    elif kind == 1:
        for i in range(nv):
            xbuf[i] = f16[rs[i]]
    else:
        xi = xbuf.view(np.uint32)
        for i in range(nv):
            xi[i] = np.uint32(rs[i])
    for i in range(nv, B):
        xbuf[i] = np.float32(0.0)


@njit(cache=True, inline="always")
def _quant_block(raw, kind, f16, gs, nv, B, affine, enc, method, mids, mext, steps, lut, lo, sc, lut_steps,
                 amin, sh, half, up, xbuf, ybuf, c32, cbuf, tu, tf):
    """Quantize the block of nv weights starting at flat index gs: xbuf = its float32 values,
    cbuf = its codes (B of them, the padding included). Returns (flags, raw scale, fp16 bits
    of the scale, fp16 bits of the offset, decoded scale, decoded offset)."""
    flag = 0
    _load_block(raw, kind, f16, gs, nv, B, xbuf)
    # stats and the raw scale (search "none": ratio 1, shift 0)
    xi = xbuf.view(np.uint32)
    if affine:
        lo_v = np.float32(0.0)
        hi_v = np.float32(0.0)
        am = np.uint32(0)
        for i in range(nv):
            v = xbuf[i]
            lo_v = v if v < lo_v else lo_v
            hi_v = v if v > hi_v else hi_v
            t = xi[i] & np.uint32(0x7FFFFFFF)
            am = t if t > am else am
        if am >= np.uint32(0x7F800000):
            flag |= BAD_NONFINITE
            sraw = np.float32(0.0)
            lraw = np.float32(0.0)
        else:
            lo_r = lo_v * np.float32(1.0)
            hi_r = hi_v * np.float32(1.0)
            sraw = np.float32(hi_r - lo_r)
            lraw = np.float32(lo_r + np.float32(0.0) * sraw)
            if not np.isfinite(sraw):
                flag |= BAD_RANGE
                sraw = np.float32(0.0)
    else:
        am = np.uint32(0)
        for i in range(nv):
            t = xi[i] & np.uint32(0x7FFFFFFF)
            am = t if t > am else am
        if am >= np.uint32(0x7F800000):
            flag |= BAD_NONFINITE
            am = np.uint32(0)
        tu[0] = am
        sraw = tf[0] * np.float32(1.0)
        lraw = np.float32(0.0)
    # the encodings
    if enc == 1:
        tf[0] = sraw
        h = _f32_to_f16(tu[0])
        if h >= np.uint32(0x7C00):
            flag |= BAD_FP16
            h = np.uint32(0)
        elif f16[h] < sraw:
            h += np.uint32(1)
            if h >= np.uint32(0x7C00):
                flag |= BAD_FP16
                h = np.uint32(0)
        sv = f16[h]
        if affine:
            tf[0] = lraw
            oh = _f32_to_f16(tu[0])
            ov = f16[oh]
        else:
            oh = np.uint32(0)
            ov = np.float32(0.0)
    else:
        h = np.uint32(0)
        oh = np.uint32(0)
        sv = sraw
        ov = lraw
    _normalize_block(xbuf, nv, B, sv, ov, affine, ybuf)
    ua = up[0]
    if ua > np.float32(0.0):  # evenly spaced codebook (see uniform_search)
        ub, top, ubl, ubh, top2 = up[1], up[2], up[3], up[4], up[5]
        ci = c32.view(np.int32)
        near = np.int32(0)
        for i in range(B):  # the bracket [lo, hi] of the code; equal but near a midpoint
            y = ybuf[i]
            cl = _ucode_guess(y, ua, ubl, top2)
            ch = _ucode_guess(y, ua, ubh, top2)
            ci[i] = cl
            near |= cl ^ ch
        if near != 0:  # a value near a midpoint: the exact guess and compare for the block
            for i in range(B):
                y = ybuf[i]
                j = _ucode_guess(y, ua, ub, top)
                ci[i] = j + np.int32(mids[j] < y)
        for i in range(B):
            cbuf[i] = np.uint8(ci[i])
    else:
        _codes(ybuf, B, c32, cbuf, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half)
    return flag, sraw, h, oh, sv, ov


@njit(cache=True, inline="always")
def _store_block(r, b, B, k, affine, enc, h, oh, sv, ov, cbuf, words, s_out, s16_out, o_out, o16_out):
    """Write the block's scale, offset and packed words."""
    if enc == 1:
        s16_out[r, b] = np.uint16(h)
        if affine:
            o16_out[r, b] = np.uint16(oh)
    else:
        s_out[r, b] = sv
        if affine:
            o_out[r, b] = ov
    c64 = cbuf.view(np.uint64)
    gpb = B // 32
    w0 = b * gpb * k
    for gi in range(gpb):
        for j in range(k):
            words[r, w0 + gi * k + j] = _pack_plane(c64, gi, j)


#: pieces of one row chunk per parallel unit (units: ERROR_PIECES // UNIT_PIECES per chunk)
UNIT_PIECES = 8


@njit(parallel=True, nogil=True, cache=True)
def _fused_kernel(raw, kind, f16, rows, cols, B, k, affine, enc, step, cb, method, mids, mext, steps, lut,
                  lo, sc, lut_steps, amin, sh, half, up, measure,
                  words, s_out, s16_out, o_out, o16_out, dd, xx, bad, rawmax):
    nb = s_out.shape[1]
    nrc = (rows + step - 1) // step
    G = UNIT_PIECES
    ngroups = ERROR_PIECES // G
    for u in prange(nrc * ngroups):
        rc = u // ngroups
        grp = u - rc * ngroups
        r0 = rc * step
        n = (min(rows, r0 + step) - r0) * cols
        pstep = (n + ERROR_PIECES - 1) // ERROR_PIECES
        base = r0 * cols
        flag = 0
        mx = np.float32(0.0)
        xbuf = np.empty(B, dtype=np.float32)
        ybuf = np.empty(B, dtype=np.float32)
        c32 = np.empty(B, dtype=np.uint32)
        cbuf = np.empty(B, dtype=np.uint8)
        tu = np.empty(1, dtype=np.uint32)  # float32 <-> bits of one value
        tf = tu.view(np.float32)
        start = np.empty(G, dtype=np.int64)  # the pieces' flat ranges [start, end)
        end = np.empty(G, dtype=np.int64)
        for p in range(G):
            f0 = min(n, (grp * G + p) * pstep)
            start[p] = base + f0
            end[p] = base + min(n, f0 + pstep)
        if not measure:
            # every block whose first weight lies in the group's range, once
            g0 = start[0]
            g1 = end[G - 1]
            if g0 < g1:
                r = g0 // cols
                b = (g0 - r * cols + B - 1) // B
                if b == nb:
                    b = 0
                    r += 1
                while True:
                    gs = r * cols + b * B
                    if gs >= g1:
                        break
                    nv = min(B, cols - b * B)
                    fl, sraw, h, oh, sv, ov = _quant_block(raw, kind, f16, gs, nv, B, affine, enc, method, mids,
                                                           mext, steps, lut, lo, sc, lut_steps, amin, sh, half,
                                                           up, xbuf, ybuf, c32, cbuf, tu, tf)
                    flag |= fl
                    mx = sraw if sraw > mx else mx
                    _store_block(r, b, B, k, affine, enc, h, oh, sv, ov, cbuf, words, s_out, s16_out, o_out,
                                 o16_out)
                    b += 1
                    if b == nb:
                        b = 0
                        r += 1
            for p in range(G):
                dd[u * G + p] = 0.0
                xx[u * G + p] = 0.0
        else:
            # the G pieces one after another: each piece's blocks in order, its two sums in
            # element order (one float64 chain each, as CpuOps.error_sums adds a chunk)
            for p in range(G):
                g = start[p]
                a_dd = 0.0
                a_xx = 0.0
                while g < end[p]:
                    r = g // cols
                    b = (g - r * cols) // B
                    gs = r * cols + b * B
                    nv = min(B, cols - b * B)
                    fl, sraw, h, oh, sv, ov = _quant_block(raw, kind, f16, gs, nv, B, affine, enc, method,
                                                           mids, mext, steps, lut, lo, sc, lut_steps, amin,
                                                           sh, half, up, xbuf, ybuf, c32, cbuf, tu, tf)
                    flag |= fl
                    mx = sraw if sraw > mx else mx
                    if gs >= start[p]:  # this piece holds the block's first weight: it writes the block
                        _store_block(r, b, B, k, affine, enc, h, oh, sv, ov, cbuf, words, s_out, s16_out,
                                     o_out, o16_out)
                    e0 = g - gs
                    e1 = min(end[p], gs + nv) - gs
                    if affine:
                        for i in range(e0, e1):
                            v = np.float32(np.float32(cb[cbuf[i]] * sv) + ov)
                            xv = np.float64(xbuf[i])
                            d = xv - np.float64(v)
                            a_dd += d * d
                            a_xx += xv * xv
                    else:
                        for i in range(e0, e1):
                            v = np.float32(cb[cbuf[i]] * sv)
                            xv = np.float64(xbuf[i])
                            d = xv - np.float64(v)
                            a_dd += d * d
                            a_xx += xv * xv
                    g = gs + e1
                dd[u * G + p] = a_dd
                xx[u * G + p] = a_xx
        bad[u] = flag
        rawmax[u] = mx


@njit(parallel=True, nogil=True, cache=True)
def _piece_sums(dd, xx):
    """The sum of one chunk's 64 piece sums, written as CpuOps.error_sums' kernel writes it
    (``dd.sum()`` in a parallel function: Numba makes it a parallel reduction whose order
    follows the thread count), so that it gives the same float64 bits."""
    return dd.sum(), xx.sum()


def _combine(dd: np.ndarray, xx: np.ndarray) -> tuple[float, float]:
    """kbitformat's order: each row chunk's piece sums as error_sums adds them, then the
    chunks from 0.0 in order (quantization_error)."""
    tdd = txx = 0.0
    for u in range(0, dd.size, ERROR_PIECES):
        a, b = _piece_sums(dd[u:u + ERROR_PIECES], xx[u:u + ERROR_PIECES])
        tdd, txx = tdd + float(a), txx + float(b)
    return tdd, txx


_UNIFORM: dict[bytes, tuple | None] = {}


def _uniform(cb: np.ndarray):
    """uniform_search of the codebook's midpoints, computed once per codebook."""
    key = np.ascontiguousarray(cb, dtype=F32).tobytes()
    if key not in _UNIFORM:
        _UNIFORM[key] = uniform_search(codebooks.midpoints(cb))
    return _UNIFORM[key]


def quantize_fused(raw: np.ndarray, source_dtype: str, spec: QuantSpec, name: str = "tensor",
                   shape: tuple[int, ...] | None = None, orig_dtype: str | None = None,
                   measure_error: bool = True) -> tuple[QuantizedTensor, float | None] | None:
    """(QuantizedTensor, relative error) equal to ``quantize(x, spec, name, ops=CpuOps)`` and
    ``quantization_error(x, qt, CpuOps)`` for x = the float32 values of `raw` (the stored
    values of a `source_dtype` tensor: bfloat16 / float16 bits as uint16, float32), or None
    when the spec or source dtype is not supported (see `supported`). Raises kbitformat's
    errors for NaN / Inf weights and scales out of range, as quantize does. With
    measure_error=False the error sums are skipped and the error is None."""
    if not supported(spec, source_dtype):
        return None
    kind, np_dtype = SOURCE_KINDS[source_dtype]
    raw = np.asarray(raw)
    shape = tuple(int(d) for d in (raw.shape if shape is None else shape))
    flat = raw.reshape(-1)
    if flat.dtype.itemsize != np.dtype(np_dtype).itemsize:
        raise KbitValueError(f"{name}: {source_dtype} values stored as {flat.dtype}")
    flat = flat.view(np_dtype)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    numel = int(np.prod(shape)) if shape else 1
    if flat.size != numel:
        raise KbitValueError(f"{name}: {flat.size} stored values for shape {shape}")
    if numel == 0:
        raise KbitValueError(f"{name}: an empty tensor cannot be quantized")
    cols = shape[-1] if len(shape) else 1
    rows = numel // cols
    B = spec.block_for(cols)
    nb = -(-cols // B)
    k = spec.bits
    affine = spec.affine
    enc = SCALES[spec.scale]
    cb = codebooks.fixed_codebook(spec.dtype, k, spec.exponent_bits)
    mids = codebooks.midpoints(cb)
    cs = CodeSearch(mids)
    us = _uniform(cb)
    up = np.array(us if us is not None else (0,) * 6, dtype=F32)  # ua = 0: the general search
    step = max(1, ERROR_CHUNK // max(1, cols))
    pieces = -(-rows // step) * ERROR_PIECES
    units = pieces // UNIT_PIECES
    words = np.empty((rows, nb * (B // 32) * k), dtype=np.uint32)
    if enc == 1:
        s16 = np.empty((rows, nb), dtype=np.uint16)
        o16 = np.empty((rows, nb), dtype=np.uint16) if affine else np.empty((1, 1), np.uint16)
        s32 = np.empty((1, nb), dtype=F32)
        o32 = s32
    else:
        s32 = np.empty((rows, nb), dtype=F32)
        o32 = np.empty((rows, nb), dtype=F32) if affine else np.empty((1, 1), F32)
        s16 = o16 = np.empty((1, 1), np.uint16)
    dd = np.empty(pieces)
    xx = np.empty(pieces)
    bad = np.empty(units, dtype=np.int64)
    rawmax = np.empty(units, dtype=F32)
    _fused_kernel(flat, kind, F16_TO_F32, rows, cols, B, k, affine, enc, step, cb, *cs.args(), up,
                  bool(measure_error), words, s32, s16, o32, o16, dd, xx, bad, rawmax)
    flags = int(np.bitwise_or.reduce(bad)) if bad.size else 0
    if flags & BAD_NONFINITE:
        raise KbitValueError(f"{name}: the tensor holds NaN or Inf values; kbit will not quantize it "
                             "(fix the source, or keep this tensor unquantized with --skip)")
    if flags & BAD_RANGE:
        raise KbitValueError(f"{name}: a block's range overflows float32 (values near +-3.4e38); "
                             "kbit cannot quantize it")
    if flags & BAD_FP16:
        raise KbitValueError(f"{name}: a block scale ({float(rawmax.max()):.6g}) exceeds the fp16 range; "
                             "use fp32 scales (--scale fp32)")
    if enc == 1:
        stored = {"scales": s16.view(np.float16)}
        offsets = o16.view(np.float16) if affine else None
    else:
        stored = {"scales": s32}
        offsets = o32 if affine else None
    qt = QuantizedTensor(shape=shape, spec=spec, codebook=cb, block_size=B, codes=words, scales=stored,
                         offsets=offsets, orig_dtype=orig_dtype or source_dtype)
    return qt, (_ratio(*_combine(dd, xx)) if measure_error else None)
