"""Quantize and dequantize one tensor, with any implementation of the kernel ops.

The steps around the kernels (codebook, scale encodings, search candidates) are numpy
code shared by every implementation, so kernels only need to agree on four
operations (see reference.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import codebooks, scales
from .constants import QUANTILE_SAMPLE
from .errors import KbitValueError
from .reference import NumpyOps
from .spec import QuantSpec

F32 = np.float32
#: rows of a tensor searched at once (bounds the candidate arrays' memory)
SEARCH_CHUNK_BLOCKS = 1 << 15


@dataclass
class QuantizedTensor:
    """One quantized tensor: the stored components plus everything needed to decode."""

    shape: tuple[int, ...]          # logical shape
    spec: QuantSpec
    codebook: np.ndarray            # float32 (2**k,)
    block_size: int                 # the actual block size (spec.block_size or the padded row)
    codes: np.ndarray               # uint32 (rows, groups*k)
    scales: dict                    # {"scales": ..., ["dq_absmax": ...]} as stored
    offsets: np.ndarray | None = None
    orig_dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def cols(self) -> int:
        return int(self.shape[-1]) if self.shape else 1

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def blocks_per_row(self) -> int:
        return -(-self.cols // self.block_size)

    def components(self) -> dict[str, np.ndarray]:
        """Stored arrays by component name (codes, scales, dq_absmax, offsets)."""
        out = {"codes": self.codes, **self.scales}
        if self.offsets is not None:
            out["offsets"] = self.offsets
        return out

    def payload_bits(self) -> int:
        return sum(int(a.nbytes) * 8 for a in self.components().values())

    @property
    def bits_per_weight(self) -> float:
        """Stored payload bits (codes, scales, offsets, padding) per logical weight.
        The codebook lives in the header and is not counted (like a GGUF type table)."""
        return self.payload_bits() / self.numel

    def decoded_scales(self) -> np.ndarray:
        return scales.decode_scales(self.scales, self.spec.scale, (self.rows, self.blocks_per_row))

    def decoded_offsets(self, s: np.ndarray) -> np.ndarray | None:
        if self.offsets is None:
            return None
        return scales.decode_offsets(self.offsets, self.spec.scale, s)


def as_2d(x: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) view: rows = prod(shape[:-1]); 0-d and 1-d give one row."""
    x = np.asarray(x)
    cols = x.shape[-1] if x.ndim else 1
    return np.ascontiguousarray(x.reshape(-1, cols), dtype=F32)


def _check_finite(stats, name: str) -> None:
    arrays = stats if isinstance(stats, tuple) else (stats,)
    if not all(np.isfinite(a).all() for a in arrays):
        raise KbitValueError(f"{name}: the tensor holds NaN or Inf values; kbit will not quantize it "
                             "(fix the source, or keep this tensor unquantized with --skip)")


def _quantile_sample(x2: np.ndarray, B: int, s: np.ndarray, o) -> np.ndarray:
    """Normalised values of the tensor (every value, or a fixed stride: see codebooks)."""
    rows, cols = x2.shape
    n = x2.size
    idx = np.arange(0, n, -(-n // QUANTILE_SAMPLE) if n > QUANTILE_SAMPLE else 1)
    r, c = idx // cols, idx % cols
    sb = s[r, c // B]
    num = x2.ravel()[idx] if o is None else (x2.ravel()[idx] - o[r, c // B]).astype(F32)
    return np.where(sb == 0, F32(0), num / np.where(sb == 0, F32(1), sb)).astype(F32)


def quantize(x: np.ndarray, spec: QuantSpec, name: str = "tensor", ops=NumpyOps,
             orig_dtype: str | None = None) -> QuantizedTensor:
    """Quantize one tensor blockwise. `ops` is NumpyOps (the reference), or a kernel
    module's ops (kbitcli.kernels.cpu.CpuOps, kbitcli.kernels.cuda.CudaOps)."""
    x = np.asarray(x)
    if x.size == 0:
        raise KbitValueError(f"{name}: an empty tensor cannot be quantized")
    if not (np.issubdtype(x.dtype, np.floating)):
        raise KbitValueError(f"{name}: only floating-point tensors can be quantized (got {x.dtype})")
    shape = tuple(int(d) for d in x.shape)
    x2 = as_2d(x)
    rows, cols = x2.shape
    B = spec.block_for(cols)
    nb = -(-cols // B)
    k = spec.bits

    stats = ops.stats(x2, B, spec.affine)
    _check_finite(stats, name)

    # Scales and offsets at ratio 1 (also what the quantile codebook is estimated with).
    raw_s, raw_lo = next(scales.raw_candidates(stats, spec.affine, "none"))
    cb = codebooks.fixed_codebook(spec.dtype, k, spec.exponent_bits)
    cb_scales = None
    if cb is None:
        cb_scales = scales.encode_scales(raw_s, spec.scale, name)
        cb = codebooks.DATA_DEPENDENT[spec.dtype](k, _quantile_sample(x2, B, cb_scales[1], None))
    mids = codebooks.midpoints(cb)

    if spec.search == "mse":
        cands = list(scales.raw_candidates(stats, spec.affine, "mse"))
        evals = [scales.evaluated(cs, co, spec.scale) for cs, co in cands]
        best = np.zeros((rows, nb), dtype=np.int64)
        step = max(1, SEARCH_CHUNK_BLOCKS // nb)
        for r0 in range(0, rows, step):
            sl = slice(r0, min(rows, r0 + step))
            cs = np.stack([e[0][sl] for e in evals])
            co = None if not spec.affine else np.stack([e[1][sl] for e in evals])
            best[sl] = ops.search(x2[sl], B, np.ascontiguousarray(cs), None if co is None else np.ascontiguousarray(co), cb, mids)
        raw_s = np.take_along_axis(np.stack([c[0] for c in cands]), best[None], 0)[0]
        if spec.affine:
            raw_lo = np.take_along_axis(np.stack([c[1] for c in cands]), best[None], 0)[0]

    if spec.search == "mse" or cb_scales is None:
        stored, s = scales.encode_scales(raw_s, spec.scale, name)
    else:  # the ratio-1 scales the data-dependent codebook was estimated with
        stored, s = cb_scales
    offsets = o = None
    if spec.affine:
        offsets, o = scales.encode_offsets(raw_lo, s, spec.scale)
    words = ops.quantize_pack(x2, B, k, s, o, cb, mids)
    return QuantizedTensor(shape=shape, spec=spec, codebook=cb, block_size=B, codes=words,
                           scales=stored, offsets=offsets,
                           orig_dtype=orig_dtype or str(x.dtype))


def dequantize(qt: QuantizedTensor, ops=NumpyOps) -> np.ndarray:
    """float32 array of the logical shape."""
    s = qt.decoded_scales()
    o = qt.decoded_offsets(s)
    out = ops.dequantize(qt.codes, qt.spec.bits, qt.block_size, qt.cols, s, o, qt.codebook)
    return out.reshape(qt.shape)


#: elements processed at once by the error measurements (bounds their temporaries)
ERROR_CHUNK = 1 << 20


def _sums(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(sum (x - y)**2, sum x**2) in float64, chunk by chunk."""
    xf, yf = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
    dd = xx = 0.0
    for i in range(0, xf.size, ERROR_CHUNK):
        a = xf[i:i + ERROR_CHUNK].astype(np.float64)
        d = a - yf[i:i + ERROR_CHUNK].astype(np.float64)
        dd += float(np.dot(d, d))
        xx += float(np.dot(a, a))
    return dd, xx


def _ratio(dd: float, xx: float) -> float:
    return float(np.sqrt(dd / xx)) if xx > 0 else float(np.sqrt(dd))


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """||x - y|| / ||x|| in float64 (0 when x is all zeros and y equals it)."""
    return _ratio(*_sums(x, y))


def quantization_error(x: np.ndarray, qt: QuantizedTensor, ops=NumpyOps) -> float:
    """relative_error(x, dequantize(qt)) without materialising the dequantized tensor:
    rows are decoded a chunk at a time, so the memory needed is a chunk, not a tensor.
    Kernels may offer `ops.error_sums(x, y)` (float64 sums without numpy temporaries)."""
    x2 = as_2d(x)
    s = qt.decoded_scales()
    o = qt.decoded_offsets(s)
    step = max(1, ERROR_CHUNK // max(1, qt.cols))
    dd = xx = 0.0
    for r0 in range(0, qt.rows, step):
        r1 = min(qt.rows, r0 + step)
        y = ops.dequantize(qt.codes[r0:r1], qt.spec.bits, qt.block_size, qt.cols, s[r0:r1],
                           None if o is None else o[r0:r1], qt.codebook)
        a, b = (getattr(ops, "error_sums", None) or _sums)(x2[r0:r1], y)
        dd, xx = dd + a, xx + b
    return _ratio(dd, xx)
