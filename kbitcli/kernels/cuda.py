"""Numba CUDA kernels for the four kernel operations of kbitformat (see
kbitformat/reference.py, the specification), bit for bit equal to NumpyOps.

Parallel decomposition
----------------------
  stats          one thread per block of B weights (absmax, or min/max against 0).
  search         one thread per block: every candidate in order, the block's error
                 summed element by element in float64 (the order is part of the spec,
                 so the sum is never split across threads).
  quantize_pack  one thread per weight of the padded grid, 256 threads = 8 groups of 32
                 weights: each thread finds the code of its weight and puts it in shared
                 memory; after a barrier, thread (group, j) of the first 8k threads
                 gathers bit j of the group's 32 codes into word j. Loads of x and
                 stores of the words are coalesced (a group's k words are contiguous and
                 so are consecutive groups': word (r, g*k+j) is flat index (r*G+g)*k+j).
  dequantize     one thread per weight: the 32 lanes of a warp cover one group, lane t
                 reads the group's k words (the same addresses across the warp, one
                 broadcast transaction) and takes bit t of each; stores are coalesced.
Weights past ``cols`` in the last block of a row are read as 0.0 (the reference's
padding) and never written back. No warp intrinsics are used, so every kernel also runs
in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which the tests use.

Why the bits are identical
--------------------------
* Each float operation is the reference's, rounded as the reference rounds it:
  y = x / s or y = (x - o) / s (IEEE division, two roundings), y = 0 when s == 0,
  v = cb[c] * s then v + o, each rounded to float32. On a real GPU NVVM may contract
  a multiply feeding an add into one FMA (one rounding instead of two); the kernels
  therefore call libdevice's explicitly rounded intrinsics (__nv_fmul_rn, __nv_fadd_rn,
  __nv_fsub_rn, __nv_fdiv_rn, and __nv_dmul_rn / __nv_dadd_rn for the float64 error
  sum), which are never contracted. Kernels are compiled without fastmath (no
  flush-to-zero, IEEE division). In the simulator, where libdevice does not exist, the
  same operations are numpy float32/float64 scalar operations (rounded the same way).
* The code of y is #{i : mids[i] < y}, found by a lower-bound binary search over the
  sorted midpoints (exact); NaN gets 2**k - 1 like numpy's searchsorted.
* Stats: absmax / min / max have one correct value whatever the order; signed zeros and
  NaN follow numpy (an all-zero block gives +0.0, any NaN gives NaN).
* The search error sum runs in the reference's order in one thread; the first candidate
  with the least error wins (strict <).
"""
from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

from kbitformat import KbitValueError

from ._checks import (check_bits, check_block, check_blockwise, check_byte_bits, check_codebook, check_search,
                      check_words, check_x)

F32 = np.float32
SIMULATOR = bool(getattr(config, "ENABLE_CUDASIM", False))
#: threads per CUDA block (a multiple of 32); the simulator runs every thread as a
#: Python thread, so it gets small blocks (less idle work on tiny test tensors)
TPB = 64 if SIMULATOR else 256
GROUPS_PER_CTA = TPB // 32
#: shared codes of one CTA, 33 per group (a pad word against bank conflicts); a plain
#: module constant, as cuda.shared.array needs a compile-time size
SHARED_CODES = GROUPS_PER_CTA * 33

# ----------------------------------------------------------------------------- arithmetic
if SIMULATOR:
    @cuda.jit(device=True)
    def _fmul(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) * np.float32(b))

    @cuda.jit(device=True)
    def _fadd(a, b):
        return np.float32(np.float32(a) + np.float32(b))

    @cuda.jit(device=True)
    def _fsub(a, b):
        return np.float32(np.float32(a) - np.float32(b))

    @cuda.jit(device=True)
    def _fdiv(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) / np.float32(b))

    @cuda.jit(device=True)
    def _dmul(a, b):
        return np.float64(np.float64(a) * np.float64(b))

    @cuda.jit(device=True)
    def _dadd(a, b):
        return np.float64(np.float64(a) + np.float64(b))
else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _fmul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True)
    def _fadd(a, b):
        return libdevice.fadd_rn(a, b)

    @cuda.jit(device=True)
    def _fsub(a, b):
        return libdevice.fsub_rn(a, b)

    @cuda.jit(device=True)
    def _fdiv(a, b):
        return libdevice.fdiv_rn(a, b)

    @cuda.jit(device=True)
    def _dmul(a, b):
        return libdevice.dmul_rn(a, b)

    @cuda.jit(device=True)
    def _dadd(a, b):
        return libdevice.dadd_rn(a, b)


@cuda.jit(device=True)
def _normalize(xv, sv, ov, affine):
    if sv == np.float32(0.0):
        return np.float32(0.0)
    if affine:
        return _fdiv(_fsub(xv, ov), sv)
    return _fdiv(xv, sv)


@cuda.jit(device=True)
def _code(y, mids):
    """#{i : mids[i] < y} (lower bound; NaN -> len(mids))."""
    n = mids.shape[0]
    if y != y:
        return n
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) // 2
        if mids[mid] < y:
            lo = mid + 1
        else:
            hi = mid
    return lo


@cuda.jit(device=True)
def _decode(cbv, sv, ov, affine):
    v = _fmul(cbv, sv)
    if affine:
        v = _fadd(v, ov)
    return v


# ----------------------------------------------------------------------------- kernels
@cuda.jit
def _stats_kernel(x, B, nb, affine, out_a, out_b):
    L = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows = x.shape[0]
    cols = x.shape[1]
    if L >= rows * nb:
        return
    r = L // nb
    b = L - r * nb
    c0 = b * B
    c1 = c0 + B
    if c1 > cols:  # (no min(): it does not compile for CUDA in every numba version)
        c1 = cols
    nan = False
    if affine:
        lo = np.float32(0.0)
        hi = np.float32(0.0)
        for c in range(c0, c1):
            v = x[r, c]
            if v != v:
                nan = True
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        if nan:
            lo = np.float32(math.nan)
            hi = np.float32(math.nan)
        out_a[r, b] = lo
        out_b[r, b] = hi
    else:
        m = np.float32(0.0)
        for c in range(c0, c1):
            v = x[r, c]
            if v != v:
                nan = True
            a = abs(v)
            if a > m:
                m = a
        if nan:
            m = np.float32(math.nan)
        out_a[r, b] = m


@cuda.jit
def _quantize_pack_kernel(x, B, k, s, o, affine, mids, G, words):
    """words: flat uint32 (rows*G*k,)."""
    tid = cuda.threadIdx.x
    codes = cuda.shared.array(SHARED_CODES, dtype=np.int32)
    rows = x.shape[0]
    cols = x.shape[1]
    ngroups = rows * G
    lg = tid // 32
    t = tid - lg * 32
    grp = cuda.blockIdx.x * GROUPS_PER_CTA + lg
    if grp < ngroups:
        r = grp // G
        col = (grp - r * G) * 32 + t
        b = col // B
        xv = x[r, col] if col < cols else np.float32(0.0)
        ov = o[r, b] if affine else np.float32(0.0)
        codes[lg * 33 + t] = _code(_normalize(xv, s[r, b], ov, affine), mids)
    cuda.syncthreads()
    if tid < GROUPS_PER_CTA * k:
        lg2 = tid // k
        j = tid - lg2 * k
        grp2 = cuda.blockIdx.x * GROUPS_PER_CTA + lg2
        if grp2 < ngroups:
            w = 0
            for tt in range(32):
                w |= ((codes[lg2 * 33 + tt] >> j) & 1) << tt
            words[grp2 * k + j] = w


@cuda.jit
def _search_kernel(x, B, cand_s, cand_o, affine, cb, mids, best):
    L = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows = x.shape[0]
    cols = x.shape[1]
    ncand = cand_s.shape[0]
    nb = cand_s.shape[2]
    if L >= rows * nb:
        return
    r = L // nb
    b = L - r * nb
    c0 = b * B
    bi = 0
    best_err = math.inf
    for i in range(ncand):
        sv = cand_s[i, r, b]
        ov = cand_o[i, r, b] if affine else np.float32(0.0)
        err = 0.0
        for e in range(B):
            c = c0 + e
            xv = x[r, c] if c < cols else np.float32(0.0)
            v = _decode(cb[_code(_normalize(xv, sv, ov, affine), mids)], sv, ov, affine)
            d = np.float64(xv) - np.float64(v)
            err = _dadd(err, _dmul(d, d))
        if err < best_err:
            best_err = err
            bi = i
    best[r, b] = bi


@cuda.jit
def _dequantize_kernel(words, k, B, G, s, o, affine, cb, out):
    """words: flat uint32 (rows*G*k,); out (rows, cols)."""
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows = out.shape[0]
    cols = out.shape[1]
    grp = idx // 32
    if grp >= rows * G:
        return
    t = idx - grp * 32
    r = grp // G
    col = (grp - r * G) * 32 + t
    if col >= cols:
        return
    c = 0
    for j in range(k):
        c |= ((words[grp * k + j] >> t) & 1) << j
    b = col // B
    ov = o[r, b] if affine else np.float32(0.0)
    out[r, col] = _decode(cb[c], s[r, b], ov, affine)


# ----------------------------------------------------------------------------- host side
def _on_device(a) -> bool:
    if hasattr(a, "__cuda_array_interface__"):
        return True
    return SIMULATOR and type(a).__name__ == "FakeCUDAArray"  # the simulator's device arrays


def _dev(a, dtype):
    """A contiguous device array of `dtype` (device inputs are used in place; int32 device
    words, e.g. a torch int32 tensor, are reinterpreted as uint32)."""
    if _on_device(a):
        d = cuda.as_cuda_array(a) if hasattr(a, "__cuda_array_interface__") else a
        if np.dtype(dtype) == np.uint32 and d.dtype == np.int32:
            d = d.view(np.uint32)
        if d.dtype != np.dtype(dtype):
            raise TypeError(f"device array of dtype {d.dtype}, expected {np.dtype(dtype)}")
        if not d.is_c_contiguous():
            raise ValueError("device arrays must be C-contiguous")
        return d
    return cuda.to_device(np.ascontiguousarray(a, dtype=dtype))


def _launch(n: int) -> tuple[int, int]:
    """(blocks, threads per block) for n independent threads."""
    threads = min(TPB, max(32, -(-n // 32) * 32))
    return max(1, -(-n // threads)), threads


class CudaOps:
    """Numba CUDA implementation of the four kernel operations (see module docstring).

    Inputs are numpy arrays (copied to the GPU and results copied back), except that
    `dequantize` also takes device arrays (anything with __cuda_array_interface__, such
    as a torch CUDA tensor) and then returns a device array."""

    name = "cuda"

    @staticmethod
    def stats(x: np.ndarray, B: int, affine: bool):
        B = check_block(B)
        rows, cols, nb = check_x(x, B)
        dx = _dev(x, F32)
        da = cuda.device_array((rows, nb), dtype=F32)
        db = cuda.device_array((rows, nb), dtype=F32) if affine else da
        _stats_kernel[_launch(rows * nb)](dx, B, nb, bool(affine), da, db)
        if affine:
            return da.copy_to_host(), db.copy_to_host()
        return da.copy_to_host()

    @staticmethod
    def search(x, B, cand_s, cand_o, cb, mids) -> np.ndarray:
        B, rows, cols, nb = check_search(x, B, cand_s, cand_o, cb, mids)
        if cand_s.shape[0] == 0:
            return np.zeros((rows, nb), dtype=np.int32)
        affine = cand_o is not None
        dcs = _dev(cand_s, F32)
        dco = _dev(cand_o, F32) if affine else dcs
        best = cuda.device_array((rows, nb), dtype=np.int32)
        _search_kernel[_launch(rows * nb)](_dev(x, F32), B, dcs, dco, affine, _dev(cb, F32),
                                           _dev(mids, F32), best)
        return best.copy_to_host()

    @staticmethod
    def quantize_pack_device(x, B, k, s, o, cb, mids):
        """quantize_pack on device arrays (or host arrays, copied): a device array back."""
        B, k = check_block(B), check_bits(k)
        rows, cols, nb = check_x(x, B)
        check_blockwise("scales", s, (rows, nb))
        check_blockwise("offsets", o, (rows, nb))
        check_codebook(cb, mids, k)
        G = nb * B // 32
        affine = o is not None
        ds = _dev(s, F32)
        do = _dev(o, F32) if affine else ds
        words = cuda.device_array(rows * G * k, dtype=np.uint32)
        ngroups = rows * G
        _quantize_pack_kernel[max(1, -(-ngroups // GROUPS_PER_CTA)), TPB](
            _dev(x, F32), B, k, ds, do, affine, _dev(mids, F32), G, words)
        return words.reshape(rows, G * k)

    @staticmethod
    def quantize_pack(x, B, k, s, o, cb, mids) -> np.ndarray:
        return CudaOps.quantize_pack_device(x, B, k, s, o, cb, mids).copy_to_host()

    @staticmethod
    def dequantize_device(words, k, B, cols, s, o, cb):
        """dequantize on device arrays (or host arrays, copied): a device array back."""
        B, k, cols = check_block(B), check_bits(k), int(cols)
        rows, nb = check_words(words, k, B, cols, s, o)
        check_codebook(cb, None, k)
        G = nb * B // 32
        affine = o is not None
        dw = _dev(words, np.uint32).reshape(rows * G * k)
        ds = _dev(s, F32)
        do = _dev(o, F32) if affine else ds
        out = cuda.device_array((rows, cols), dtype=F32)
        _dequantize_kernel[_launch(rows * G * 32)](dw, k, B, G, ds, do, affine, _dev(cb, F32), out)
        return out

    @staticmethod
    def dequantize(words, k, B, cols, s, o, cb):
        out = CudaOps.dequantize_device(words, k, B, cols, s, o, cb)
        if _on_device(words):
            return out
        return out.copy_to_host()


# ----------------------------------------------------------------------------- fused GEMV
# y = x @ W.T for a packed W (rows, cols) and a few input rows x (M <= GEMV_MAX_M): the
# decode step of a transformer at batch 1..8, where dequantizing W to a dense matrix first
# would write and re-read 4 (or 2) bytes per weight. This kernel reads only the packed
# words (k/32 words per weight) and the block scales.
#
# Decomposition: a CTA of WARPS warps; warp w handles rows (cta*WARPS + w)*RPW .. +RPW-1.
# The columns are walked in tiles of 32 groups (1024 weights): the CTA stages the tile of
# x (M x 1024 float32) into shared memory, with a pad word after every group (stride 33)
# so that lane l reading x[group l, i] hits bank (l + i) % 32 (no conflicts); then lane l
# of each warp decodes group l of the tile for each of its rows: it loads the group's k
# words (the warp's loads cover k*128 contiguous bytes), rebuilds code i from bit i of
# every plane, looks the value up in the codebook (shared memory) and accumulates
# v * x[m, i] per input row; the group's sum is multiplied by the block's scale (affine:
# plus offset * the group's sum of x, precomputed). Each lane keeps RPW*M accumulators; at
# the end they are summed across the warp in a fixed order (through shared memory, lane 0
# adds the 32 partial sums in lane order), so results are deterministic for a launch
# shape. Unlike dequantize, this is not bit-identical to the reference dequantization
# followed by a matmul (the sums run in another order, and multiply-adds may be fused);
# the tests bound the difference against a float64 product.
#
# Measured on an H200 (2026-11-28, docs/benchmarks.md "GPU"): correct at every real layer
# size, but each call cost about 250 us, while the bytes it reads need a few us at the copy
# bandwidth: the time is the host side of a Numba launch from Python (argument typing and
# marshalling, device-array views), not the kernel. The kernel was then rewritten as
# generated straight-line code (scalars and constant shifts; the PTX has no local memory
# and about 16 instructions per weight at k=4, inspected offline with numba-cuda's
# compile_ptx for sm_90); that version is tested in the simulator but its GPU time is not
# yet measured.
GEMV_MAX_M = 8
GEMV_WARPS = TPB // 32
_GEMV_TILE = 32  # groups per tile
_GEMV_KERNELS: dict = {}


def _gemv_source(k: int, M: int, affine: bool, rpw: int) -> str:
    """The kernel's Python source for one (k, M, affine, rows-per-warp): straight-line code
    with scalar variables (the k words w0.., the per-group sums p0.., the accumulators
    a<row>_<m>) and constant shifts, so that everything lives in registers (a local array
    indexed in a loop would go to local memory) and the 32 codes of a group are rebuilt with
    one shift and one mask-or per plane."""
    L = []
    e = L.append
    e("def kern(words, B, G, s, o, cb, x, xsum, out):")
    e("    tid = cuda.threadIdx.x")
    e("    warp = tid // 32")
    e("    lane = tid - warp * 32")
    e("    rows = out.shape[1]")
    e("    xcols = x.shape[1]")
    e("    xs = cuda.shared.array(XT, dtype=f32)")
    e("    cbs = cuda.shared.array(NCB, dtype=f32)")
    e("    red = cuda.shared.array(NRED, dtype=f32)")
    e("    for q in range(tid, NCB, NT):")
    e("        cbs[q] = cb[q]")
    e("    row0 = (cuda.blockIdx.x * WARPS + warp) * RPW")
    for rr in range(rpw):
        for m in range(M):
            e(f"    a{rr}_{m} = f32(0.0)")
    e("    ntiles = (G + TILE - 1) // TILE")
    e("    xb = lane * 33")
    e("    for tile in range(ntiles):")
    e("        cuda.syncthreads()")
    e("        base = tile * TILE_W")
    e("        for q in range(tid, M * TILE_W, NT):")
    e("            m = q // TILE_W")
    e("            c = q - m * TILE_W")
    e("            col = base + c")
    e("            gl = c // 32")
    e("            xv = f32(0.0)")
    e("            if col < xcols:")
    e("                xv = x[m, col]")
    e("            xs[m * XSTRIDE + gl * 33 + (c - gl * 32)] = xv")
    e("        cuda.syncthreads()")
    e("        g = tile * TILE + lane")
    e("        if g < G:")
    e("            b = (g * 32) // B")
    for rr in range(rpw):
        e(f"            r = row0 + {rr}")
        e("            if r < rows:")
        e(f"                wb = (r * G + g) * {k}")
        for j in range(k):
            e(f"                w{j} = words[wb + {j}]")
        for m in range(M):
            e(f"                p{m} = f32(0.0)")
        for i in range(32):
            parts = []
            for j in range(k):
                sh = i - j
                if sh > 0:
                    parts.append(f"((w{j} >> U{sh}) & U{1 << j})")
                elif sh < 0:
                    parts.append(f"((w{j} << U{-sh}) & U{1 << j})")
                else:
                    parts.append(f"(w{j} & U{1 << j})")
            e(f"                v = cbs[{' | '.join(parts)}]")
            for m in range(M):
                e(f"                p{m} += v * xs[{m * 33 * 32} + xb + {i}]")
        e("                sv = s[r, b]")
        if affine:
            e("                ov = o[r, b]")
        for m in range(M):
            extra = f" + ov * xsum[{m}, g]" if affine else ""
            e(f"                a{rr}_{m} += p{m} * sv{extra}")
    # reduction: every accumulator to shared memory, one barrier, lane 0 adds in lane order
    e("    cuda.syncthreads()")
    for rr in range(rpw):
        for m in range(M):
            e(f"    red[{(rr * M + m)} * NT + tid] = a{rr}_{m}")
    e("    cuda.syncthreads()")
    e("    if lane == 0:")
    for rr in range(rpw):
        e(f"        r = row0 + {rr}")
        e("        if r < rows:")
        for m in range(M):
            e(f"            t = f32(0.0)")
            e(f"            for q in range({(rr * M + m)} * NT + warp * 32, {(rr * M + m)} * NT + warp * 32 + 32):")
            e("                t += red[q]")
            e(f"            out[{m}, r] = t")
    return "\n".join(L) + "\n"


def _gemv_kernel(k: int, M: int, affine: bool, rpw: int):
    key = (k, M, affine, rpw)
    kern = _GEMV_KERNELS.get(key)
    if kern is not None:
        return kern
    ns = {"cuda": cuda, "f32": np.float32, "NCB": 1 << k, "WARPS": GEMV_WARPS, "NT": GEMV_WARPS * 32,
          "XSTRIDE": _GEMV_TILE * 33, "XT": M * _GEMV_TILE * 33, "TILE": _GEMV_TILE, "TILE_W": _GEMV_TILE * 32,
          "NRED": rpw * M * GEMV_WARPS * 32, "RPW": rpw, "M": M}
    ns.update({f"U{v}": np.uint32(v) for v in list(range(32)) + [1 << j for j in range(8)]})
    src = _gemv_source(k, M, affine, rpw)
    exec(compile(src, f"<kbit gemv k={k} M={M} affine={affine} rpw={rpw}>", "exec"), ns)  # noqa: S102
    kern = _GEMV_KERNELS[key] = cuda.jit(ns["kern"])
    return kern


def gemv_rows_per_warp(rows: int) -> int:
    """Rows per warp: more rows per CTA re-read each x tile less often, but a small matrix
    needs every row in its own warp to fill the GPU's multiprocessors."""
    if rows >= 32768:
        return 2
    return 1


def _check_gemv_x(x, cols: int) -> int:
    """M, the input rows of a GEMV call, after checking x's shape."""
    if len(x.shape) != 2 or x.shape[1] != cols:
        raise KbitValueError(f"x must be (M, {cols}), got {tuple(x.shape)}")
    M = int(x.shape[0])
    if not 1 <= M <= GEMV_MAX_M:
        raise KbitValueError(f"the fused GEMV takes 1 to {GEMV_MAX_M} input rows, got {M}")
    return M


def _gemv_config(k: int, M: int, affine: bool, rows: int):
    """(compiled kernel, grid) of a GEMV launch."""
    rpw = gemv_rows_per_warp(rows)
    return _gemv_kernel(k, M, affine, rpw), max(1, -(-rows // (GEMV_WARPS * rpw)))


def gemv_device(words, k, B, cols, s, o, cb, x, xsum=None):
    """out (M, rows) float32 = x (M, cols) @ dequantize(words, ...).T on the GPU (device
    arrays or host arrays, copied). xsum (M, G): x summed per 32-column group, needed for
    affine types (computed here when not given)."""
    B, k, cols = check_block(B), check_bits(k), int(cols)
    rows, nb = check_words(words, k, B, cols, s, o)
    check_codebook(cb, None, k)
    G = nb * B // 32
    M = _check_gemv_x(x, cols)
    affine = o is not None
    dx = _dev(x, F32)
    if affine and xsum is None:
        hx = np.zeros((M, G * 32), dtype=F32)
        hx[:, :cols] = dx.copy_to_host() if _on_device(dx) else x
        xsum = hx.reshape(M, G, 32).sum(axis=2, dtype=F32)
    dw = _dev(words, np.uint32).reshape(rows * G * k)
    ds = _dev(s, F32)
    do = _dev(o, F32) if affine else ds
    dxs = _dev(xsum, F32) if affine else dx
    out = cuda.device_array((M, rows), dtype=F32)
    kern, grid = _gemv_config(k, M, affine, rows)
    kern[grid, TPB](dw, B, G, ds, do, _dev(cb, F32), dx, dxs, out)
    return out


def gemv(words, k, B, cols, s, o, cb, x) -> np.ndarray:
    """Host version of gemv_device (numpy in, numpy out)."""
    return gemv_device(words, k, B, cols, s, o, cb, np.ascontiguousarray(x, dtype=F32)).copy_to_host()


# torch glue: KbitLinear's decode step calls gemv_torch with its buffers. Numba views of
# persistent buffers are made once (without a reference back to the tensor, so the cache
# entry dies with the tensor) and without the CUDA Array Interface's stream synchronisation
# (the kernel is launched on torch's current stream, so the order is already right).
def _view(t):
    """A Numba device array over a CUDA torch tensor, sharing its memory."""
    return cuda.from_cuda_array_interface(t.__cuda_array_interface__, owner=None, sync=False)


def _cached_view(t):
    """_view of a persistent tensor (a layer's buffer), made once and kept on the tensor
    itself, so it lives exactly as long as the tensor (the view holds no reference back)."""
    v = getattr(t, "_kbit_numba_view", None)
    if v is None or v[1] != t.data_ptr() or v[2] != tuple(t.shape):
        v = (_view(t), t.data_ptr(), tuple(t.shape))
        t._kbit_numba_view = v
    return v[0]


_STREAMS: dict = {}


def _launch_on_torch_stream(kern, grid, threads, device, *args):
    import torch
    sptr = torch.cuda.current_stream(device).cuda_stream
    if sptr:
        st = _STREAMS.get(sptr)
        if st is None:
            st = _STREAMS[sptr] = cuda.external_stream(sptr)
        kern[grid, threads, st](*args)
    else:
        kern[grid, threads](*args)


def _check_torch_codes(codes, k: int, B: int, G: int, scales) -> None:
    import torch
    rows = codes.shape[0]
    if codes.dtype != torch.int32 or tuple(codes.shape) != (rows, G * k) or scales.shape[0] != rows:
        raise KbitValueError(f"packed codes {tuple(codes.shape)} {codes.dtype} do not fit k={k}, B={B}, "
                             f"scales {tuple(scales.shape)}")


def dequantize_torch(codes, k, B, cols, scales, offsets, codebook):
    """dequantize for CUDA torch tensors (KbitLinear's buffers): float32 (rows, cols) torch
    tensor, launched on torch's current stream, the buffers' Numba views cached."""
    import torch
    B, k, cols = check_block(B), check_bits(k), int(cols)
    rows = codes.shape[0]
    nb = scales.shape[1]
    G = nb * B // 32
    _check_torch_codes(codes, k, B, G, scales)
    affine = offsets is not None
    out = torch.empty((rows, cols), dtype=torch.float32, device=codes.device)
    dw = _cached_view(codes).view(np.uint32).reshape(rows * G * k)
    ds = _cached_view(scales)
    do = _cached_view(offsets) if affine else ds
    grid, threads = _launch(rows * G * 32)
    _launch_on_torch_stream(_dequantize_kernel, grid, threads, codes.device,
                            dw, k, B, G, ds, do, affine, _cached_view(codebook), _view(out))
    return out


def gemv_torch(codes, k, B, cols, scales, offsets, codebook, x):
    """torch wrapper: codes int32 (rows, G*k) (the uint32 words), scales/offsets float32
    (rows, nb), codebook float32 (2**k,), x (M, cols) -> float32 (M, rows) on x's device.
    CPU tensors (Numba's CUDA simulator, in the tests) are copied over and back."""
    import torch
    M = x.shape[0]
    rows = codes.shape[0]
    G = codes.shape[1] // k
    x = x.to(torch.float32).contiguous()
    _check_gemv_x(x, int(cols))  # before x is padded to whole groups
    xsum = None
    if offsets is not None:
        xsum = torch.nn.functional.pad(x, (0, G * 32 - cols)).view(M, G, 32).sum(dim=2)
    if not codes.is_cuda:
        return torch.from_numpy(gemv_device(
            codes.numpy().view(np.uint32), k, B, cols, scales.numpy(),
            None if offsets is None else offsets.numpy(), codebook.numpy(), x.numpy(),
            None if xsum is None else xsum.numpy()).copy_to_host())
    B, k, cols = check_block(B), check_bits(k), int(cols)
    _check_torch_codes(codes, k, B, G, scales)
    out = torch.empty((M, rows), dtype=torch.float32, device=x.device)
    affine = offsets is not None
    dw = _cached_view(codes).view(np.uint32).reshape(rows * G * k)
    ds = _cached_view(scales)
    do = _cached_view(offsets) if affine else ds
    dx = _view(x)
    dxs = _view(xsum.contiguous()) if affine else dx
    kern, grid = _gemv_config(k, M, affine, rows)
    _launch_on_torch_stream(kern, grid, TPB, x.device, dw, B, G, ds, do, _cached_view(codebook), dx, dxs, _view(out))
    return out


# ----------------------------------------------------------------------------- "bytes" layout
# The runner's internal layout (not the file format): the codes c_0 .. c_{nb*B-1} of a row
# packed little-endian, 8//k codes per byte, so that uint32 word t of a row holds codes
# 32/k*t .. 32/k*t + 32/k - 1, code i of the word at bits [i*k, i*k + k). The array has
# the bit planes' shape (rows, G*k) (G = nb*B/32), and a word never straddles a block
# (B is a multiple of 32). k must divide 8 (2, 4 or 8).
#
# GEMV (gemv_bytes_*): the kernel is generated per configuration (like _gemv_source) as
# straight-line code over scalar variables.
#   * A lane works on "vectors" of V consecutive words (V = 4, 16 bytes, or 2 when a block
#     holds a number of words that is not a multiple of 4), loaded with one 128-bit (64-bit)
#     load: lane l of a warp reads vector l, l+32, ... of a row, so a warp's load covers
#     512 contiguous bytes. A vector holds P = 32*V/k codes, all in one block.
#   * A warp works on R rows at once with the same vector positions, so each x value read
#     from shared memory serves R rows (and each decoded weight serves M input rows).
#   * The CTA stages a tile of x (TV vectors wide) into shared memory in a padded layout:
#     the P columns of vector q at q*(P+4), so the 128-bit loads of 8 lanes (a quarter warp)
#     hit 8 different 16-byte bank groups ((P+4)/4 is odd): conflict-free.
#   * Codes are taken out of the word registers with a constant shift and mask each, and
#     looked up in a shared-memory copy of the codebook: for k <= 4 the 2**k entries lie in
#     different banks (lanes that read the same entry get a broadcast), so one copy is
#     conflict-free; for k = 8 each lane gets its own copy (entry e of lane l at e*32 + l,
#     bank l) when the shared memory allows it.
#   * Per vector and row the products are summed in float32 (NP interleaved chains) and
#     the block's scale is applied once: acc += p * s (+ o * sum of the vector's x for
#     affine types). The next vector's words and scales are loaded before the current one
#     is used (software prefetch).
#   * CTAs loop over groups of NW*R rows (grid = min(row groups, a few per SM)); columns
#     are walked tile by tile in the outer loop, so x is staged once per tile per CTA.
#     After a tile each warp writes its lanes' accumulators to shared memory and lane j
#     adds the 32 partial sums of accumulator j in a fixed order (4 chains), then adds the
#     result to out (stored for the first tile). No atomics: results are deterministic.
# Only device arrays are passed, nothing is allocated or copied by Numba, so a launch on
# torch's current stream can be captured in a CUDA graph (compile on a warm-up call first).
_BYTES_KERNELS: dict = {}
_SHARED_BUDGET = 46 * 1024  # bytes of static shared memory a kernel may use (limit 48 KiB)



@cuda.jit(device=True)
def _scalar_load4(a, i):
    return a[i], a[i + 1], a[i + 2], a[i + 3]


@cuda.jit(device=True)
def _scalar_load2(a, i):
    return a[i], a[i + 1]


if SIMULATOR:
    _vload4, _vload2 = _scalar_load4, _scalar_load2
    _VECTOR_LOADS = False
else:  # pragma: no cover - needs a GPU (or numba-cuda's compile_ptx)
    try:
        from llvmlite import ir as _ir
        from numba import types as _nbtypes
        try:
            from numba.cuda import cgutils as _cgutils
            from numba.cuda.extending import intrinsic as _intrinsic
        except ImportError:
            from numba.core import cgutils as _cgutils
            from numba.core.extending import intrinsic as _intrinsic

        def _make_vload(n):
            @_intrinsic
            def vload(typingctx, arr, idx):
                """Elements idx .. idx+n-1 of a 1-D array of a 32-bit type, as one n*32-bit
                load (idx a multiple of n, the array's data aligned to n*4 bytes)."""
                if not isinstance(arr, _nbtypes.Array) or arr.ndim != 1 or not isinstance(idx, _nbtypes.Integer):
                    return None
                sig = _nbtypes.UniTuple(arr.dtype, n)(arr, idx)

                def codegen(context, builder, sig, args):
                    aryty, idxty = sig.args
                    ary = context.make_array(aryty)(context, builder, value=args[0])
                    i = context.cast(builder, args[1], idxty, _nbtypes.intp)
                    ptr = _cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)
                    lty = context.get_value_type(aryty.dtype)
                    vptr = builder.bitcast(ptr, _ir.VectorType(lty, n).as_pointer(ptr.type.addrspace))
                    vec = builder.load(vptr, align=4 * n)
                    vals = [builder.extract_element(vec, _ir.Constant(_ir.IntType(32), j)) for j in range(n)]
                    return context.make_tuple(builder, sig.return_type, vals)
                return sig, codegen
            return vload

        _vload4 = _make_vload(4)
        _vload2 = _make_vload(2)
        _VECTOR_LOADS = True
    except Exception:  # an old numba without these hooks: scalar loads
        _vload4, _vload2 = _scalar_load4, _scalar_load2
        _VECTOR_LOADS = False


class BytesGemvConfig:
    """Launch shape of a bytes GEMV (see the comment above): V words per lane vector, R rows
    per warp, NW warps per CTA, C codes per x chunk, NP partial-sum chains, CBREP codebook
    copies (1 or 32), TV vectors per x tile, at most CTAS_PER_SM CTAs per multiprocessor."""

    __slots__ = ("V", "R", "NW", "C", "NP", "CBREP", "TV", "CTAS_PER_SM")

    def __init__(self, V, R, NW, C, NP, CBREP, TV, CTAS_PER_SM):
        self.V, self.R, self.NW, self.C, self.NP = V, R, NW, C, NP
        self.CBREP, self.TV, self.CTAS_PER_SM = CBREP, TV, CTAS_PER_SM

    def key(self):
        return (self.V, self.R, self.NW, self.C, self.NP, self.CBREP, self.TV)

    def __repr__(self):
        return "BytesGemvConfig(" + ", ".join(f"{a}={getattr(self, a)}" for a in self.__slots__) + ")"


#: overrides of the default launch shape (the benchmark sweeps these): name -> value
BYTES_TUNING: dict = {}


def _bytes_shared_bytes(k, M, cfg_V, R, NW, CBREP, TV) -> int:
    P = 32 * cfg_V // k
    return 4 * ((1 << k) * CBREP + M * TV * (P + 4) + 2 * R * M * (NW * 32 + 1))


def bytes_gemv_config(k: int, M: int, B: int, rows: int, NV: int, **over) -> BytesGemvConfig:
    """The launch shape for one call (defaults, then BYTES_TUNING, then `over`)."""
    t = dict(BYTES_TUNING)
    t.update(over)
    WB = B * k // 32
    V = t.get("V") or (4 if WB % 4 == 0 else 2)
    if WB % V:
        V = 2
    P = 32 * V // k
    if M <= 2:
        R, C = 4, 8
    elif M <= 4:
        R, C = 2, 8
    else:
        R, C = 2, 4
    if SIMULATOR:
        R = min(R, 2)
    R = int(t.get("R", R))
    C = int(t.get("C", C))
    if P % C or C % 4:
        C = 4
    # 8 warps a CTA: measured on an H200 (4096x4096, k=4, M=1: 10.3 us against 13.2 with 4)
    NW = int(t.get("NW", 2 if SIMULATOR else 8))
    NP = int(t.get("NP", 2 if R * M <= 4 else 1))
    if R * M > 32:
        raise KbitValueError(f"rows per warp {R} x input rows {M} > 32")
    CBREP = int(t.get("CBREP", 32 if k == 8 else 1))
    tv_need = max(32, -(-NV // 32) * 32)
    tv_max = int(t.get("TV_MAX", 1 << 20))

    def fits(cbrep, tv):
        return _bytes_shared_bytes(k, M, V, R, NW, cbrep, tv) <= _SHARED_BUDGET

    if CBREP > 1 and not fits(CBREP, 32):
        CBREP = 1
    while NW > 1 and not fits(CBREP, 32):
        NW //= 2
    TV = min(tv_need, max(32, tv_max // 32 * 32))
    while TV > 32 and not fits(CBREP, TV):
        TV -= 32
    if not fits(CBREP, TV):
        raise KbitValueError(f"no bytes GEMV launch shape fits the shared memory (k={k}, M={M})")
    # fewer tiles of equal width: same number of tiles, less staging of padding columns
    ntiles = -(-NV // TV)
    per_tile = -(-NV // ntiles)
    TV = max(32, -(-per_tile // 32) * 32)
    ctas = int(t.get("CTAS_PER_SM", 8))
    return BytesGemvConfig(V, R, NW, C, NP, CBREP, TV, ctas)


def _bytes_code_expr(k: int, cbrep: int, w: str, pos: int) -> str:
    """Shared-codebook index of code `pos` of word variable `w`."""
    mask = (1 << k) - 1
    sh = pos * k
    if cbrep == 1:
        if sh == 0:
            return f"({w} & U{mask})"
        if sh + k == 32:
            return f"({w} >> U{sh})"
        return f"(({w} >> U{sh}) & U{mask})"
    # entry e of lane l at e*32 + l: the code shifted to bit 5
    m5 = mask << 5
    if sh < 5:
        return f"((({w} << U{5 - sh}) & U{m5}) | lane_u)"
    if sh == 5:
        return f"(({w} & U{m5}) | lane_u)"
    return f"((({w} >> U{sh - 5}) & U{m5}) | lane_u)"


def _emit_zero_vectors(e, indent: int, rows: int, V: int, affine: bool, code: str, scale: str, offset: str):
    """Emit (through e) the zeroing of the code words, scale and offset variables of `rows`
    rows (a lane with no vector to load): code a format string of r (row) and j (word),
    scale / offset of r."""
    sp = " " * indent
    for r in range(rows):
        for j in range(V):
            e(f"{sp}{code.format(r=r, j=j)} = U0")
        e(f"{sp}{scale.format(r=r)} = f32(0.0)")
        if affine:
            e(f"{sp}{offset.format(r=r)} = f32(0.0)")


def _emit_vector_loads(e, indent: int, rows: int, V: int, affine: bool, vl: str, code: str, scale: str,
                       offset: str, addr: str, row: str):
    """Emit (through e) the loads of `rows` rows' code words (V words by `vl` from `addr`),
    block scale and offset (at [row, bn]) into the variables that _emit_zero_vectors zeroes:
    code a format string of r (row) and j (word); scale, offset, addr and row of r."""
    sp = " " * indent
    for r in range(rows):
        names = ", ".join(code.format(r=r, j=j) for j in range(V))
        e(f"{sp}{names} = {vl}(words, {addr.format(r=r)})")
        e(f"{sp}{scale.format(r=r)} = s[{row.format(r=r)}, bn]")
        if affine:
            e(f"{sp}{offset.format(r=r)} = o[{row.format(r=r)}, bn]")


def _bytes_gemv_source(k: int, M: int, affine: bool, cfg: BytesGemvConfig, wbshift: int, split: bool = False) -> str:
    """Source of one bytes GEMV kernel. split: the split-K variant (see "split-K" below): CTA
    (x, y) works on the vectors [y*NVS, min((y+1)*NVS, NV)) of its rows and writes its partial
    sums to out[y, m, row] of a float32 workspace (S, M, rows); without it the source is the
    one-pass kernel's, unchanged."""
    V, R, NW, C, NP, CBREP, TV = cfg.V, cfg.R, cfg.NW, cfg.C, cfg.NP, cfg.CBREP, cfg.TV
    P = 32 * V // k
    PP = P + 4
    CPW = 32 // k  # codes per word
    NT = NW * 32
    NTP = NT + 1
    RM = R * M
    vl = "_vload4" if V == 4 else "_vload2"
    L = []
    e = L.append
    e("def kern(words, NV, WB, s, o, cb, x, out" + (", NVS):" if split else "):"))
    e("    tid = cuda.threadIdx.x")
    e("    warp = tid // 32")
    e("    lane = tid - warp * 32")
    e("    lane_u = u32(lane)")
    e(f"    rows = out.shape[{2 if split else 1}]")
    e("    cols = x.shape[1]")
    e(f"    cbs = cuda.shared.array({(1 << k) * CBREP}, dtype=f32)")
    e(f"    xs = cuda.shared.array({M * TV * PP}, dtype=f32{'' if SIMULATOR else ', alignment=16'})")
    e(f"    red = cuda.shared.array({2 * RM * NTP}, dtype=f32)")
    e(f"    for q in range(tid, {(1 << k) * CBREP}, {NT}):")
    e(f"        cbs[q] = cb[q >> {5 if CBREP > 1 else 0}]")
    e(f"    nrg = (rows + {R * NW - 1}) // {R * NW}")
    if split:  # this CTA's slice of the vectors: [v0, v1)
        e("    sl = cuda.blockIdx.y")
        e("    v0 = sl * NVS")
        e("    v1 = v0 + NVS")
        e("    if v1 > NV:")
        e("        v1 = NV")
        e(f"    ntiles = (v1 - v0 + {TV - 1}) // {TV}")
    else:
        e(f"    ntiles = (NV + {TV - 1}) // {TV}")
    e("    par = 0")
    e("    for tile in range(ntiles):")
    e("        cuda.syncthreads()")
    if split:
        e(f"        vt0 = v0 + tile * {TV}")
        e(f"        cbase = vt0 * {P}")
    else:
        e(f"        cbase = tile * {TV * P}")
    e(f"        for q in range(tid, {M * TV * P}, {NT}):")
    e(f"            m = q // {TV * P}")
    e(f"            c = q - m * {TV * P}")
    e("            col = cbase + c")
    e("            xv = f32(0.0)")
    e("            if col < cols:")
    e("                xv = f32(x[m, col])")  # x float32 or float16 (exact conversion)
    e(f"            xs[m * {TV * PP} + (c // {P}) * {PP} + (c % {P})] = xv")
    e("        cuda.syncthreads()")
    if not split:
        e(f"        vt0 = tile * {TV}")
    e(f"        vend = vt0 + {TV}")
    e(f"        if vend > {'v1' if split else 'NV'}:")
    e(f"            vend = {'v1' if split else 'NV'}")
    e("        for rg in range(cuda.blockIdx.x, nrg, cuda.gridDim.x):")
    e(f"            rbase = rg * {R * NW} + warp * {R}")
    for rr in range(R):
        e(f"            rl{rr} = rbase + {rr}")
        e(f"            if rl{rr} >= rows:")
        e(f"                rl{rr} = rows - 1")
        e(f"            wb{rr} = rl{rr} * NV * {V}")
        for m in range(M):
            e(f"            a{rr}_{m} = f32(0.0)")
    e("            vi = vt0 + lane")

    def load(prefix, vexpr, indent):
        sp = " " * indent
        if wbshift >= 0:
            e(f"{sp}bn = ({vexpr} * {V}) >> {wbshift}")
        else:
            e(f"{sp}bn = ({vexpr} * {V}) // WB")
        _emit_vector_loads(e, indent, R, V, affine, vl, prefix + "{r}_{j}", prefix + "s{r}", prefix + "o{r}",
                           "wb{r} + " + f"{vexpr} * {V}", "rl{r}")

    e("            if vi < vend:")
    load("n", "vi", 16)
    e("            else:")
    _emit_zero_vectors(e, 16, R, V, affine, "n{r}_{j}", "ns{r}", "no{r}")
    e("            while vi < vend:")
    for rr in range(R):
        for j in range(V):
            e(f"                c{rr}_{j} = n{rr}_{j}")
        e(f"                cs{rr} = ns{rr}")
        if affine:
            e(f"                co{rr} = no{rr}")
    e("                vn = vi + 32")
    e("                if vn < vend:")
    load("n", "vn", 20)
    e(f"                xo = (vi - vt0) * {PP}")
    for rr in range(R):
        for m in range(M):
            for h in range(NP):
                e(f"                p{rr}_{m}_{h} = f32(0.0)")
    if affine:
        for m in range(M):
            e(f"                xsum{m} = f32(0.0)")
    for ch in range(P // C):
        for m in range(M):
            for q in range(C // 4):
                names = ", ".join(f"x{m}_{4 * q + t}" for t in range(4))
                e(f"                {names} = _vload4(xs, {m * TV * PP} + xo + {ch * C + 4 * q})")
            if affine:
                e(f"                xsum{m} += " + " + ".join(f"x{m}_{i}" for i in range(C)))
        for rr in range(R):
            for i in range(C):
                ci = ch * C + i
                e(f"                v = cbs[{_bytes_code_expr(k, CBREP, f'c{rr}_{ci // CPW}', ci % CPW)}]")
                for m in range(M):
                    e(f"                p{rr}_{m}_{ci % NP} += v * x{m}_{i}")
    for rr in range(R):
        for m in range(M):
            psum = " + ".join(f"p{rr}_{m}_{h}" for h in range(NP))
            extra = f" + co{rr} * xsum{m}" if affine else ""
            e(f"                a{rr}_{m} += ({psum}) * cs{rr}{extra}")
    e("                vi = vn")
    # reduction over the warp's lanes: accumulator j of every lane to shared memory, one
    # barrier, lane j < R*M adds the 32 values of accumulator j in a fixed order
    e(f"            rb = par * {RM * NTP}")
    for rr in range(R):
        for m in range(M):
            e(f"            red[rb + {(rr * M + m) * NTP} + tid] = a{rr}_{m}")
    e("            cuda.syncthreads()")
    e(f"            if lane < {RM}:")
    e(f"                q0 = rb + lane * {NTP} + warp * 32")
    e("                t0 = red[q0]")
    e("                t1 = red[q0 + 1]")
    e("                t2 = red[q0 + 2]")
    e("                t3 = red[q0 + 3]")
    e("                for q in range(4, 32, 4):")
    e("                    t0 += red[q0 + q]")
    e("                    t1 += red[q0 + q + 1]")
    e("                    t2 += red[q0 + q + 2]")
    e("                    t3 += red[q0 + q + 3]")
    e("                t = (t0 + t1) + (t2 + t3)")
    e(f"                rj = lane // {M}")
    e(f"                mj = lane - rj * {M}")
    e("                r = rbase + rj")
    dst = "out[sl, mj, r]" if split else "out[mj, r]"
    e("                if r < rows:")
    e("                    if tile == 0:")
    e(f"                        {dst} = t")
    e("                    else:")
    e(f"                        {dst} = {dst} + t")
    e("            par = 1 - par")
    return "\n".join(L) + "\n"


def bytes_gemv_pyfunc(k: int, M: int, affine: bool, cfg: BytesGemvConfig, wbshift: int, split: bool = False):
    """The Python function of one bytes GEMV kernel (before cuda.jit; for compile_ptx).
    wbshift: log2 of the words per block when that is a power of two, else -1; split: the
    split-K variant (arguments ..., out = the (S, M, rows) float32 workspace, NVS)."""
    ns = {"cuda": cuda, "f32": np.float32, "u32": np.uint32, "_vload4": _vload4, "_vload2": _vload2}
    ns.update({f"U{v}": np.uint32(v) for v in set(range(33)) | {(1 << k) - 1, ((1 << k) - 1) << 5}})
    src = _bytes_gemv_source(k, M, affine, cfg, wbshift, split)
    name = f"<kbit bytes gemv k={k} M={M} affine={affine}{' split-K' if split else ''} {cfg}>"
    exec(compile(src, name, "exec"), ns)  # noqa: S102
    return ns["kern"]


def _wbshift(k: int, B: int) -> int:
    WB = B * k // 32
    return WB.bit_length() - 1 if WB & (WB - 1) == 0 else -1


def _bytes_gemv_kernel(k: int, M: int, affine: bool, cfg: BytesGemvConfig, wbshift: int, split: bool = False,
                       maxreg: int = 0):
    """maxreg > 0: registers a thread capped there (cuda.jit max_registers; ignored in the
    simulator). R4 NW8 takes 128 (2 CTAs of 8 warps an SM), R2 NW8 72 (3); ptxas (sm_90)
    fits R2 NW8 in 64 without spills (4 CTAs an SM: worth a try with split-K), R4 NW8 spills
    below about 100."""
    key = (k, M, affine, wbshift) + cfg.key() + (("split",) if split else ()) + ((maxreg,) if maxreg else ())
    kern = _BYTES_KERNELS.get(key)
    if kern is None:
        opts = {"max_registers": maxreg} if maxreg and not SIMULATOR else {}
        kern = _BYTES_KERNELS[key] = cuda.jit(bytes_gemv_pyfunc(k, M, affine, cfg, wbshift, split), **opts)
    return kern


_NSM: list = []


def _sm_count() -> int:
    if not _NSM:
        n = 0
        if not SIMULATOR:
            try:
                n = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
            except Exception:  # pragma: no cover
                n = 0
        _NSM.append(n)
    return _NSM[0]


# split-K (off by default: BYTES_TUNING["SPLIT"] / over SPLIT = S, or "auto"): at M = 1 the
# one-pass kernel is latency-bound, not bandwidth-bound (4096x4096, k=4 on an H200: 128 CTAs
# of 8 warps for 132 SMs, each lane walking all the columns of its rows; k=2 takes as long as
# k=4). With S > 1 the vectors of a row are cut into S slices of NVS vectors (the last one
# shorter) and CTA (x, y) of a grid (row-group CTAs, S) works on slice y only (x staged for
# that slice only, tiles sized for NVS vectors): S times the CTAs, each over 1/S of the
# columns. Each slice's sums (the same per-slice arithmetic as the one-pass kernel) are
# stored, not added, into a float32 workspace (S, M, rows) allocated by the caller (torch:
# torch.empty, so CUDA graphs capture it in their pool), and a second kernel
# (_bytes_splitk_reduce, one thread an output) adds the S partials in slice order and writes
# out once: float32, or float16 rounded once from the float32 sum. No atomics: deterministic
# (the same bits on every call; not the bits of S = 1, which adds in another order). Both
# kernels go on torch's stream; nothing is allocated, copied or synced by Numba.
# "auto": S so that row-group CTAs x S >= SPLIT_CTAS (4) x SMs, at most SPLIT_MAX (8) and
# at most NV/32 (each lane a vector a slice at least), NVS rounded up to a multiple of 32
# vectors (lanes evenly loaded); S = 1 where the rows alone give enough CTAs (32000x4096) and
# in the simulator (no SM count).
@cuda.jit
def _bytes_splitk_reduce(ws, out):
    """out[m, r] = ws[0, m, r] + ws[1, m, r] + ... (float32, in slice order), rounded once to
    out's dtype; one thread per output."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows = out.shape[1]
    if i < out.shape[0] * rows:
        m = i // rows
        r = i - m * rows
        t = ws[0, m, r]
        for q in range(1, ws.shape[0]):
            t += ws[q, m, r]
        out[m, r] = t


def bytes_gemv_split(k: int, M: int, B: int, rows: int, NV: int, **over) -> tuple[int, int]:
    """(S, NVS) of a bytes GEMV call: S column slices of NVS vectors each (S = 1: the one-pass
    kernel, NVS = NV). From BYTES_TUNING / `over` "SPLIT" (default 1; "auto": see above)."""
    t = dict(BYTES_TUNING)
    t.update(over)
    sp = t.get("SPLIT", 1)
    if sp == "auto":
        nsm = _sm_count()
        if nsm == 0:
            return 1, NV
        cfg = bytes_gemv_config(k, M, B, rows, NV, **over)
        nrg = -(-rows // (cfg.R * cfg.NW))
        S = math.ceil(float(t.get("SPLIT_CTAS", 4)) * nsm / nrg)
        S = min(S, int(t.get("SPLIT_MAX", 8)), NV // 32)
        if S <= 1:
            return 1, NV
        NVS = -(-(-(-NV // S)) // 32) * 32
    else:
        S = int(sp or 1)
        if S <= 1:
            return 1, NV
        NVS = -(-NV // min(S, NV))
    return -(-NV // NVS), NVS


def _bytes_gemv_launch(k, M, affine, B, rows, NV, **over):
    """(kernel, grid, threads, split, once) of a tile-kernel launch (bytes_gemv_plan caches
    it); split None for the one-pass kernel, else (S, NVS, reduce grid, reduce threads);
    once: every output is written once (split-K, or one column tile), so it may be float16
    (rounded once)."""
    S, NVS = bytes_gemv_split(k, M, B, rows, NV, **over)
    cfg = bytes_gemv_config(k, M, B, rows, NVS, **over)
    maxreg = int(dict(BYTES_TUNING, **over).get("MAXREG") or 0)
    kern = _bytes_gemv_kernel(k, M, affine, cfg, _wbshift(k, B), S > 1, maxreg)
    nrg = -(-rows // (cfg.R * cfg.NW))
    nsm = _sm_count()
    grid = nrg if nsm == 0 else min(nrg, nsm * cfg.CTAS_PER_SM)
    if "GRID" in over:
        grid = min(nrg, int(over["GRID"]))
    if S == 1:
        return kern, max(1, grid), cfg.NW * 32, None, -(-NV // cfg.TV) == 1
    return kern, (max(1, grid), S), cfg.NW * 32, (S, NVS, max(1, -(-M * rows // TPB)), TPB), True


# x-in-registers GEMV (bytes layout, one input row: the decode step of a batch of one). The
# tile kernel above stages x in shared memory and walks every column of its rows in each
# lane; on an H200 it reached 20-35% of the memory bandwidth, and split-K made it slower: it
# is limited by the instructions and shared-memory loads spent per code and by how few warps
# hold a whole row's work, not by too few CTAs. Here a row is cut across the lanes of a
# "row group" of nwg = ceil(NV/32) warps: lane l of warp w of the group owns vector
# v = w*32 + l (P = 32V/k codes) of every row, so its P values of x are loaded once, into
# registers, and each code costs one shift-and-mask, one codebook load from shared memory
# and one fused multiply-add (no x loads in the loop). A CTA holds NG row groups; each takes D
# rows at a time (all D rows' vectors loaded before any is used: D x 16 bytes in flight a
# lane), then every lane's partial sums are added across the warp by a butterfly of shuffles
# (the same tree on every lane), lane 0 of each warp stores its warp's sum and one thread a
# row adds the nwg warp sums in warp order and writes out (once: float16 out allowed). No
# atomics: the same bits on every call. Rows past the end are clamped (computed, not
# stored). Eligible when M = 1, a vector holds at most 32 codes (V = 2 at k = 2, V = 4 at
# k = 4 and 8) and nwg <= 32 (cols <= 32768 at k = 4); otherwise the tile kernel runs.
# Not the default (BYTES_TUNING["KERNEL"] = "xr" selects it): measured on an H200 (k = 4,
# docs/data/gpu-2026-11-28e) it is slower than the tile kernel on every Llama-7B shape:
# 4096x4096 24.8 us against 10.1 (D = 8: 14.2), 11008x4096 31.0 against 20.9, 4096x11008
# 63.9 against 27.0, 32000x4096 55.5 against 51.6. Kept opt-in for launch-shape experiments
# (deeper D helped most); the tile kernel is the default.
# Numba's simulator has no shuffles: there the butterfly exchanges values through shared
# memory (_xr_sim_xor), with the same additions in the same order.
XR_KEYS = ("KERNEL", "XR_NG", "XR_D", "XR_CTAS", "XR_GRID", "MAXREG")
#: the M = 1 bytes GEMV when BYTES_TUNING / a call names no KERNEL ("tile" or "xr")
DEFAULT_KERNEL = "tile"


def _xr_vector_words(k: int) -> int:
    """Words a lane's vector holds: 32 codes at k = 2 and 4, 16 at k = 8. Blocks are multiples
    of 32 codes (B*k/32 words, a multiple of V), so a vector never spans two blocks."""
    return 2 if k == 2 else 4


def xr_gemv_config(k: int, M: int, B: int, rows: int, NV: int, **over):
    """(V, NG, D, nwg) of the x-in-registers kernel for this call, or None when the tile
    kernel runs (KERNEL, from `over` / BYTES_TUNING / DEFAULT_KERNEL, is not "xr"; M > 1; too
    many vectors; a tile-kernel setting or split-K asked for). NV: vectors of V words a row
    (V from _xr_vector_words)."""
    t = dict(BYTES_TUNING)
    t.update(over)
    kern = t.get("KERNEL", DEFAULT_KERNEL)
    if kern not in ("tile", "xr"):
        raise KbitValueError(f"KERNEL must be 'tile' or 'xr', got {kern!r}")
    split = t.get("SPLIT", 1)
    if kern != "xr" or M != 1 or any(key not in XR_KEYS for key in t if key != "SPLIT") or \
            (split != "auto" and int(split) > 1):
        return None
    V = _xr_vector_words(k)
    nwg = -(-NV // 32)
    if nwg > 32:
        return None
    NG = int(t.get("XR_NG", 0)) or max(1, 4 // nwg)  # about 4 warps a CTA
    NG = max(1, min(NG, 32 // nwg))
    D = max(1, int(t.get("XR_D", 4)))
    if SIMULATOR:
        D = min(D, 2)
    return V, NG, D, nwg


@cuda.jit(device=True)
def _xr_sim_xor(buf, tid, lane, v, m):
    """v of lane (lane ^ m) of this warp, through shared memory (the simulator has no shuffles;
    every thread of the block calls this at the same point)."""
    buf[tid] = v
    cuda.syncthreads()
    w = buf[tid - lane + (lane ^ m)]
    cuda.syncthreads()
    return w


def _xr_gemv_source(k: int, affine: bool, V: int, NG: int, D: int, CBREP: int, wbshift: int) -> str:
    P = 32 * V // k
    CPW = 32 // k
    NP = 2
    vl = "_vload4" if V == 4 else "_vload2"
    L = []
    e = L.append
    e("def kern(words, NV, WB, s, o, cb, x, out):")
    e("    tid = cuda.threadIdx.x")
    e("    warp = tid // 32")
    e("    lane = tid - warp * 32")
    e("    lane_u = u32(lane)")
    e("    nwg = (NV + 31) // 32")
    e("    g = warp // nwg")
    e("    v = (warp - g * nwg) * 32 + lane")
    e("    live = v < NV")
    e("    rows = out.shape[1]")
    e("    cols = x.shape[1]")
    e(f"    cbs = cuda.shared.array({(1 << k) * CBREP}, dtype=f32)")
    e(f"    red = cuda.shared.array({32 * D}, dtype=f32)")
    if SIMULATOR:
        e("    xbuf = cuda.shared.array(1024, dtype=f32)")
    e(f"    for q in range(tid, {(1 << k) * CBREP}, cuda.blockDim.x):")
    e(f"        cbs[q] = cb[q >> {5 if CBREP > 1 else 0}]")
    e(f"    c0 = v * {P}")
    for i in range(P):
        e(f"    x{i} = f32(0.0)")
    e("    bn = 0")
    e("    if live:")
    if wbshift >= 0:
        e(f"        bn = (v * {V}) >> {wbshift}")
    else:
        e(f"        bn = (v * {V}) // WB")
    for i in range(P):
        e(f"        if c0 + {i} < cols:")
        e(f"            x{i} = f32(x[0, c0 + {i}])")
    if affine:
        e("    xs = " + " + ".join(f"x{i}" for i in range(P)))
    e("    woff = v * " + str(V))
    e(f"    rstride = NV * {V}")
    e(f"    nch = (rows + {NG * D - 1}) // {NG * D}")
    e("    cuda.syncthreads()")
    e("    for ch in range(cuda.blockIdx.x, nch, cuda.gridDim.x):")
    e(f"        rb = ch * {NG * D} + g * {D}")
    for d in range(D):
        e(f"        r{d} = rb + {d}")
        e(f"        if r{d} >= rows:")
        e(f"            r{d} = rows - 1")
    e("        if live:")
    _emit_vector_loads(e, 12, D, V, affine, vl, "c{r}_{j}", "s{r}", "o{r}", "r{r} * rstride + woff", "r{r}")
    e("        else:")
    _emit_zero_vectors(e, 12, D, V, affine, "c{r}_{j}", "s{r}", "o{r}")
    for d in range(D):
        for h in range(NP):
            e(f"        p{d}_{h} = f32(0.0)")
    for i in range(P):
        for d in range(D):
            e(f"        p{d}_{i % NP} += cbs[{_bytes_code_expr(k, CBREP, f'c{d}_{i // CPW}', i % CPW)}] * x{i}")
    for d in range(D):
        extra = f" + o{d} * xs" if affine else ""
        e(f"        a{d} = (" + " + ".join(f"p{d}_{h}" for h in range(NP)) + f") * s{d}{extra}")
    for m in (16, 8, 4, 2, 1):
        for d in range(D):
            if SIMULATOR:
                e(f"        a{d} = a{d} + _xr_sim_xor(xbuf, tid, lane, a{d}, {m})")
            else:
                e(f"        a{d} = a{d} + cuda.shfl_xor_sync(0xFFFFFFFF, a{d}, {m})")
    e("        if lane == 0:")
    for d in range(D):
        e(f"            red[warp * {D} + {d}] = a{d}")
    e("        cuda.syncthreads()")
    e(f"        if tid < {NG * D}:")
    e(f"            gg = tid // {D}")
    e(f"            dd = tid - gg * {D}")
    e(f"            r = ch * {NG * D} + tid")
    e(f"            q = gg * nwg * {D} + dd")
    e("            t = red[q]")
    e("            for w in range(1, nwg):")
    e(f"                t += red[q + w * {D}]")
    e("            if r < rows:")
    e("                out[0, r] = t")
    e("        cuda.syncthreads()")
    return "\n".join(L) + "\n"


def xr_gemv_pyfunc(k: int, affine: bool, V: int, NG: int, D: int, CBREP: int, wbshift: int):
    """The Python function of one x-in-registers GEMV kernel (before cuda.jit)."""
    ns = {"cuda": cuda, "f32": np.float32, "u32": np.uint32, "_vload4": _vload4, "_vload2": _vload2,
          "_xr_sim_xor": _xr_sim_xor}
    ns.update({f"U{v}": np.uint32(v) for v in set(range(33)) | {(1 << k) - 1, ((1 << k) - 1) << 5}})
    src = _xr_gemv_source(k, affine, V, NG, D, CBREP, wbshift)
    name = f"<kbit xr gemv k={k} affine={affine} V={V} NG={NG} D={D} CBREP={CBREP}>"
    exec(compile(src, name, "exec"), ns)  # noqa: S102
    return ns["kern"]


def _xr_gemv_kernel(k, affine, V, NG, D, CBREP, wbshift, maxreg=0):
    key = ("xr", k, affine, V, NG, D, CBREP, wbshift, maxreg)
    kern = _BYTES_KERNELS.get(key)
    if kern is None:
        opts = {"max_registers": maxreg} if maxreg and not SIMULATOR else {}
        kern = _BYTES_KERNELS[key] = cuda.jit(xr_gemv_pyfunc(k, affine, V, NG, D, CBREP, wbshift), **opts)
    return kern


def _xr_gemv_launch(k, affine, B, rows, xr, **over):
    """(kernel, grid, threads, None, True) of an x-in-registers launch (xr: xr_gemv_config's)."""
    V, NG, D, nwg = xr
    t = dict(BYTES_TUNING, **over)
    CBREP = 32 if k == 8 else 1
    kern = _xr_gemv_kernel(k, affine, V, NG, D, CBREP, _wbshift(k, B), int(t.get("MAXREG") or 0))
    nch = -(-rows // (NG * D))
    nsm = _sm_count()
    grid = nch if nsm == 0 else min(nch, nsm * int(t.get("XR_CTAS", 8)))
    if "XR_GRID" in t:  # tests: fewer CTAs than row chunks (each loops)
        grid = min(nch, int(t["XR_GRID"]))
    return kern, max(1, grid), NG * nwg * 32, None, True


_BYTES_PLANS: dict = {}


def bytes_gemv_plan(k, M, affine, B, rows, W, **over):
    """(V, NV, kernel, grid, threads, split, once) of a bytes GEMV call over rows of W words:
    the x-in-registers kernel where xr_gemv_config allows it, else the tile kernel
    (_bytes_gemv_launch). Cached: the decode step's host cost."""
    key = (k, M, affine, B, rows, W, tuple(sorted(BYTES_TUNING.items())), tuple(sorted(over.items())))
    hit = _BYTES_PLANS.get(key)
    if hit is None:
        V = _xr_vector_words(k)
        xr = xr_gemv_config(k, M, B, rows, W // V, **over)
        if xr is not None:
            hit = (V, W // V) + _xr_gemv_launch(k, affine, B, rows, xr, **over)
        else:
            V = bytes_gemv_config(k, M, B, rows, 1, **over).V
            hit = (V, W // V) + _bytes_gemv_launch(k, M, affine, B, rows, W // V, **over)
        _BYTES_PLANS[key] = hit
    return hit


def _bytes_dims(words, k, B, cols, s, o, cb):
    B, k, cols = check_block(B), check_byte_bits(k), int(cols)
    rows, nb = check_words(words, k, B, cols, s, o)
    check_codebook(cb, None, k)
    return B, k, cols, rows, nb, nb * B // 32


def gemv_bytes_device(words, k, B, cols, s, o, cb, x, x_dtype=F32, out_dtype=F32, **over):
    """out (M, rows) float32 = x (M, cols) @ W.T for W in the bytes layout, on the GPU
    (device arrays, or host arrays copied over). `over`: launch-shape overrides (tests).
    x_dtype / out_dtype float16: the kernel reads x / writes out in float16 (what
    gemv_bytes_torch does for float16 models; out float16 only for rows of one column tile,
    or with split-K, where the reduction kernel writes out). over SPLIT: split-K (see above)."""
    B, k, cols, rows, nb, G = _bytes_dims(words, k, B, cols, s, o, cb)
    M = _check_gemv_x(x, cols)
    affine = o is not None
    _, NV, kern, grid, threads, split, once = bytes_gemv_plan(k, M, affine, B, rows, G * k, **over)
    dw = _dev(words, np.uint32).reshape(rows * G * k)
    ds = _dev(s, F32)
    do = _dev(o, F32) if affine else ds
    if np.dtype(out_dtype) != F32 and not once:
        raise KbitValueError("a float16 output needs rows of one column tile (or split-K)")
    out = cuda.device_array((M, rows), dtype=out_dtype)
    if split is None:
        kern[grid, threads](dw, NV, B * k // 32, ds, do, _dev(cb, F32), _dev(x, x_dtype), out)
        return out
    S, NVS, rgrid, rthreads = split
    ws = cuda.device_array((S, M, rows), dtype=F32)
    kern[grid, threads](dw, NV, B * k // 32, ds, do, _dev(cb, F32), _dev(x, x_dtype), ws, NVS)
    _bytes_splitk_reduce[rgrid, rthreads](ws, out)
    return out




def gemv_bytes(words, k, B, cols, s, o, cb, x, **over) -> np.ndarray:
    """Host version of gemv_bytes_device (numpy in, numpy out)."""
    return gemv_bytes_device(words, k, B, cols, s, o, cb, np.ascontiguousarray(x, dtype=F32), **over).copy_to_host()


# dequantize (bytes layout): one thread per output weight, a 2-D grid (column blocks,
# rows looped by gridDim.y), stores coalesced; bit-identical to the reference (v = cb[c]*s,
# + o for affine, each rounded to float32, as _dequantize_kernel).
_DQ_MAX_GRID_Y = 65535


@cuda.jit
def _dequantize_bytes_kernel(words, k, W, B, s, o, affine, cb, out):
    """words: flat uint32 (rows*W,); out (rows, cols)."""
    col = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    rows = out.shape[0]
    cols = out.shape[1]
    if col >= cols:
        return
    cpw = 32 // k
    t = col // cpw
    sh = np.uint32((col - t * cpw) * k)
    mask = np.uint32((1 << k) - 1)
    b = col // B
    for r in range(cuda.blockIdx.y, rows, cuda.gridDim.y):
        c = (words[r * W + t] >> sh) & mask
        ov = o[r, b] if affine else np.float32(0.0)
        out[r, col] = _decode(cb[c], s[r, b], ov, affine)


def _dq_bytes_grid(rows, cols):
    threads = min(TPB, max(32, -(-cols // 32) * 32))
    return (max(1, -(-cols // threads)), max(1, min(rows, _DQ_MAX_GRID_Y))), threads


def dequantize_bytes_device(words, k, B, cols, s, o, cb):
    """dequantize of the bytes layout on device arrays (or host arrays, copied): float32
    (rows, cols) device array, bit-identical to the reference."""
    B, k, cols, rows, nb, G = _bytes_dims(words, k, B, cols, s, o, cb)
    affine = o is not None
    dw = _dev(words, np.uint32).reshape(rows * G * k)
    ds = _dev(s, F32)
    do = _dev(o, F32) if affine else ds
    out = cuda.device_array((rows, cols), dtype=F32)
    grid, threads = _dq_bytes_grid(rows, cols)
    _dequantize_bytes_kernel[grid, threads](dw, k, G * k, B, ds, do, affine, _dev(cb, F32), out)
    return out


def dequantize_bytes(words, k, B, cols, s, o, cb) -> np.ndarray:
    return dequantize_bytes_device(words, k, B, cols, s, o, cb).copy_to_host()


def _check_torch_bytes(codes, k: int, B: int, cols: int, scales, offsets, codebook) -> tuple[int, int, int]:
    """(B, k, cols) checked against KbitLinear-style torch buffers."""
    B, k, cols = check_block(B), check_byte_bits(k), int(cols)
    rows, nb = check_words(codes, k, B, cols, scales, offsets)
    check_codebook(codebook, None, k)
    _check_torch_codes(codes, k, B, nb * B // 32, scales)
    return B, k, cols


def gemv_bytes_torch(codes, k, B, cols, scales, offsets, codebook, x, out_dtype=None, **over):
    """torch wrapper of the bytes GEMV: codes int32 (rows, G*k) in the bytes layout,
    scales/offsets float32 (rows, nb) (offsets None for symmetric types), codebook float32
    (2**k,), x (M, cols) in any float dtype -> float32 (M, rows) on x's device. On CUDA the
    kernel runs on torch's current stream with no copies or syncs (capturable in a CUDA
    graph once a first call has compiled it); CPU tensors (Numba's CUDA simulator, in the
    tests) are copied over and back.

    A float16 x is read by the kernel as it is (converted exactly to float32 inside), and with
    out_dtype=torch.float16 the result is float16 when the kernel writes each output once
    (rows of one column tile: the float32 sum rounded once, what .to(float16) of the float32
    result gives, and always with split-K, whose reduction kernel writes out); otherwise it is
    float32. Each saves a conversion kernel per call (decode steps of a float16 model).
    over / BYTES_TUNING "SPLIT" = S or "auto": split-K (two kernels, a float32 workspace from
    torch's allocator; see the comment above bytes_gemv_split)."""
    import torch
    B, k, cols = _check_torch_bytes(codes, k, B, cols, scales, offsets, codebook)
    if x.dtype not in (torch.float32, torch.float16) or not codes.is_cuda:
        x = x.to(torch.float32)
    x = x.contiguous()
    M = _check_gemv_x(x, cols)
    if not codes.is_cuda:
        return torch.from_numpy(gemv_bytes(
            codes.numpy().view(np.uint32), k, B, cols, scales.numpy(),
            None if offsets is None else offsets.numpy(), codebook.numpy(), x.numpy(), **over))
    rows = codes.shape[0]
    G = codes.shape[1] // k
    affine = offsets is not None
    V, NV, kern, grid, threads, split, once = bytes_gemv_plan(k, M, affine, B, rows, G * k, **over)
    if codes.data_ptr() % (4 * V):
        raise KbitValueError(f"packed codes must be {4 * V}-byte aligned for the bytes GEMV")
    odt = torch.float16 if out_dtype == torch.float16 and once else torch.float32
    out = torch.empty((M, rows), dtype=odt, device=x.device)
    dw = _cached_view(codes).view(np.uint32).reshape(rows * G * k)
    ds = _cached_view(scales)
    do = _cached_view(offsets) if affine else ds
    if split is None:
        _launch_on_torch_stream(kern, grid, threads, x.device, dw, NV, B * k // 32, ds, do, _cached_view(codebook),
                                _view(x), _view(out))
        return out
    S, NVS, rgrid, rthreads = split
    ws = torch.empty((S, M, rows), dtype=torch.float32, device=x.device)  # torch's pool: graph-capturable
    _launch_on_torch_stream(kern, grid, threads, x.device, dw, NV, B * k // 32, ds, do, _cached_view(codebook),
                            _view(x), _view(ws), NVS)
    _launch_on_torch_stream(_bytes_splitk_reduce, rgrid, rthreads, x.device, _view(ws), _view(out))
    return out


def dequantize_bytes_torch(codes, k, B, cols, scales, offsets, codebook):
    """dequantize of the bytes layout for torch tensors: float32 (rows, cols), bit-identical
    to the reference; on CUDA launched on torch's current stream (capturable), CPU tensors
    (the simulator) copied over and back."""
    import torch
    B, k, cols = _check_torch_bytes(codes, k, B, cols, scales, offsets, codebook)
    if not codes.is_cuda:
        return torch.from_numpy(dequantize_bytes(
            codes.numpy().view(np.uint32), k, B, cols, scales.numpy(),
            None if offsets is None else offsets.numpy(), codebook.numpy()))
    rows = codes.shape[0]
    W = codes.shape[1]
    affine = offsets is not None
    out = torch.empty((rows, cols), dtype=torch.float32, device=codes.device)
    dw = _cached_view(codes).view(np.uint32).reshape(rows * W)
    ds = _cached_view(scales)
    do = _cached_view(offsets) if affine else ds
    grid, threads = _dq_bytes_grid(rows, cols)
    _launch_on_torch_stream(_dequantize_bytes_kernel, grid, threads, codes.device,
                            dw, k, W, B, ds, do, affine, _cached_view(codebook), _view(out))
    return out
