"""Per-block scale and offset encodings, and the candidates of the `mse` search.

These run on the small per-block arrays (one value per block), in numpy, for every
implementation: kernels receive already decoded float32 scales and offsets, so the
encodings are defined once, here.

Encodings (stored arrays have shape (rows, blocks_per_row) unless noted):
  fp16  scale F16, rounded up (never below the block's absmax / range);
        affine offset F16, rounded to nearest.
  fp32  scale F32, offset F32, exact.
  e8    scale U8 code c -> E8_TABLE[c] = 2**((c - 184)/16), the smallest entry >= the value;
        affine offset U8 zero point z -> -(scale * z) / 255.
  dq    scale U8 code c -> (gmax * c) / 255 where gmax (F32, one per DQ_GROUP consecutive
        blocks of the row-major block order) is the group's largest scale and
        c = ceil(scale / gmax * 255) in float32 (float rounding can leave the decoded scale
        one ulp below the raw one; codes then clamp at the codebook's end); affine offset as for e8.
"""
from __future__ import annotations

import numpy as np

from .constants import (DQ_GROUP, E8_TABLE, SEARCH_RATIOS_AFFINE, SEARCH_RATIOS_SYM,
                        SEARCH_SHIFTS_AFFINE, ZP_LEVELS)
from .errors import KbitValueError

F32 = np.float32


def encode_scales(raw: np.ndarray, enc: str, name: str = "tensor") -> tuple[dict, np.ndarray]:
    """Encode non-negative float32 scales. Returns ({component: array}, decoded float32)."""
    raw = np.ascontiguousarray(raw, dtype=F32)
    if not np.isfinite(raw).all():
        raise KbitValueError(f"{name}: a block's range overflows float32 (values near +-3.4e38); "
                             "kbit cannot quantize it")
    if enc == "fp32":
        return {"scales": raw.copy()}, raw.copy()
    if enc == "fp16":
        with np.errstate(over="ignore"):
            h = raw.astype(np.float16)
        if not np.isfinite(h).all():
            raise KbitValueError(f"{name}: a block scale ({float(raw.max()):.6g}) exceeds the fp16 range; "
                                 "use fp32 scales (--scale fp32)")
        # raw >= 0, so the next float16 up is the next bit pattern (65504 + 1 ulp = inf)
        h.view(np.uint16)[h.astype(F32) < raw] += np.uint16(1)
        if not np.isfinite(h).all():  # rounding up past 65504 reaches inf
            raise KbitValueError(f"{name}: a block scale ({float(raw.max()):.6g}) exceeds the fp16 range; "
                                 "use fp32 scales (--scale fp32)")
        return {"scales": h}, h.astype(F32)
    if enc == "e8":
        c = np.searchsorted(E8_TABLE, raw, side="left")
        if (c >= 256).any():
            raise KbitValueError(f"{name}: a block scale ({float(raw.max()):.6g}) exceeds the e8 range "
                                 f"(max {float(E8_TABLE[-1]):.6g}); use fp16 or dq scales")
        c = c.astype(np.uint8)
        return {"scales": c}, E8_TABLE[c]
    if enc == "dq":
        flat = raw.ravel()
        ng = -(-flat.size // DQ_GROUP)
        padded = np.zeros(ng * DQ_GROUP, dtype=F32)
        padded[: flat.size] = flat
        gmax = padded.reshape(ng, DQ_GROUP).max(axis=1).astype(F32)
        g = np.repeat(gmax, DQ_GROUP)[: flat.size]
        safe = np.where(g > 0, g, F32(1))
        c = np.clip(np.ceil(flat / safe * F32(255)), 0, 255).astype(np.uint8)
        stored = {"scales": c.reshape(raw.shape), "dq_absmax": gmax}
        return stored, decode_scales(stored, enc, raw.shape)
    raise KbitValueError(f"unknown scale encoding {enc!r}")


def decode_scales(stored: dict, enc: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decoded float32 block scales from the stored components."""
    s = np.asarray(stored["scales"])
    if enc in ("fp16", "fp32"):
        return s.astype(F32).reshape(shape)
    if enc == "e8":
        return E8_TABLE[s.astype(np.intp)].reshape(shape)
    if enc == "dq":
        gmax = np.asarray(stored["dq_absmax"], dtype=F32)
        g = np.repeat(gmax, DQ_GROUP)[: s.size]
        return ((g * s.ravel().astype(F32)) / F32(255)).astype(F32).reshape(shape)
    raise KbitValueError(f"unknown scale encoding {enc!r}")


def uses_zero_points(enc: str) -> bool:
    """Affine offsets are bytes (zero points) with e8/dq scales, floats otherwise."""
    return enc in ("e8", "dq")


def encode_offsets(lo: np.ndarray, scales: np.ndarray, enc: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode affine offsets (the block's low end, <= 0) given decoded scales.
    Returns (stored array, decoded float32 offsets)."""
    lo = np.ascontiguousarray(lo, dtype=F32)
    if enc == "fp32":
        return lo.copy(), lo.copy()
    if enc == "fp16":
        h = lo.astype(np.float16)  # |lo| <= the scale, which fit in fp16
        return h, h.astype(F32)
    safe = np.where(scales > 0, scales, F32(1))
    z = np.clip(np.rint(-lo / safe * F32(ZP_LEVELS)), 0, ZP_LEVELS).astype(np.uint8)
    return z, decode_offsets(z, enc, scales)


def decode_offsets(stored: np.ndarray, enc: str, scales: np.ndarray) -> np.ndarray:
    stored = np.asarray(stored)
    if uses_zero_points(enc):
        return (-(scales * stored.astype(F32)) / F32(ZP_LEVELS)).astype(F32).reshape(scales.shape)
    return stored.astype(F32).reshape(scales.shape)


def block_bits(enc: str, affine: bool) -> float:
    """Bits of scale (and offset) stored per block, excluding dq's per-group maximum."""
    s = {"fp16": 16, "fp32": 32, "e8": 8, "dq": 8}[enc]
    if affine:
        s += 8 if uses_zero_points(enc) else s
    return s


# ----------------------------------------------------------------------------- search
def raw_candidates(stats, affine: bool, search: str):
    """Yield (raw_scale, raw_low or None) per candidate, in the fixed search order.

    sym:    scale = absmax * r                 for r in SEARCH_RATIOS_SYM
    affine: lo_r = lo * r, hi_r = hi * r, s = hi_r - lo_r, low = lo_r + t * s
                                               for r in SEARCH_RATIOS_AFFINE, t in SEARCH_SHIFTS_AFFINE
    (all float32 operations). Without a search there is one candidate, r = 1, t = 0.
    """
    if not affine:
        am = stats
        ratios = SEARCH_RATIOS_SYM if search == "mse" else SEARCH_RATIOS_SYM[:1]
        for r in ratios:
            yield (am * r).astype(F32), None
        return
    lo, hi = stats
    ratios = SEARCH_RATIOS_AFFINE if search == "mse" else SEARCH_RATIOS_AFFINE[:1]
    shifts = SEARCH_SHIFTS_AFFINE if search == "mse" else SEARCH_SHIFTS_AFFINE[:1]
    for r in ratios:
        lo_r = (lo * r).astype(F32)
        hi_r = (hi * r).astype(F32)
        s = (hi_r - lo_r).astype(F32)
        for t in shifts:
            yield s, (lo_r + t * s).astype(F32)


def evaluated(raw_s: np.ndarray, raw_lo, enc: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The (scale, offset) a candidate is judged with: its decoded encoding where each
    block's encoding is independent (fp16, fp32, e8), the raw values for dq (whose codes
    depend on the group and are fixed only after the search)."""
    if enc == "dq":
        return raw_s, raw_lo
    _, s = encode_scales(raw_s, enc)
    if raw_lo is None:
        return s, None
    _, o = encode_offsets(raw_lo, s, enc)
    return s, o
