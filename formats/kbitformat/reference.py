"""The numpy reference: the specification of quantization in code.

Readable rather than fast. Every kernel (Numba CPU, Numba CUDA) implements the same
four operations and must return identical bits:

  stats(x, B, affine)                 per-block absmax, or (lo, hi) = (min(min, 0), max(max, 0))
  search(x, B, cand_s, cand_o, cb, m) per block, the index of the candidate with least error
  quantize_pack(x, B, k, s, o, cb, m) codes packed into bit planes
  dequantize(words, k, B, cols, s, o, cb)

x is float32 (rows, cols); a row is cut into blocks of B weights, the last one padded
with zeros. Normalisation of a weight x in a block with scale s (offset o):
  y = x / s          (symmetric)         y = (x - o) / s   (affine)
  y = 0 when s == 0,
each operation rounded to float32. The code is #{i : m_i < y} with m the codebook's
float32 midpoints (= np.searchsorted(m, y, 'left')). Decoding:
  v = cb[code] * s   (symmetric)         v = cb[code] * s + o (affine; two roundings)
Packing: the padded row is cut into groups of 32 codes; group g gets k uint32 words,
word j holding bit j of code t in its bit t (LSB = first weight). Words are stored
row by row, group by group, plane by plane: shape (rows, groups * k).
The search error of a candidate is sum over the block, in order, of
(float64(x) - float64(v))**2, accumulated in float64; the first minimum wins.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def padded(x: np.ndarray, B: int) -> np.ndarray:
    """(rows, nb, B) view of x padded with zeros to whole blocks."""
    rows, cols = x.shape
    nb = -(-cols // B)
    p = np.zeros((rows, nb * B), dtype=F32)
    p[:, :cols] = x
    return p.reshape(rows, nb, B)


def normalize(xb: np.ndarray, s: np.ndarray, o: np.ndarray | None) -> np.ndarray:
    """y for blocked values xb (rows, nb, B) and per-block s, o (rows, nb)."""
    s3 = s[..., None]
    safe = np.where(s3 == 0, F32(1), s3)
    num = xb if o is None else (xb - o[..., None]).astype(F32)
    y = (num / safe).astype(F32)
    return np.where(s3 == 0, F32(0), y)


def decode_values(codes: np.ndarray, cb: np.ndarray, s: np.ndarray, o: np.ndarray | None) -> np.ndarray:
    v = (cb[codes] * s[..., None]).astype(F32)
    if o is not None:
        v = (v + o[..., None]).astype(F32)
    return v


def pack(codes: np.ndarray, k: int) -> np.ndarray:
    """codes (rows, n), n a multiple of 32, values < 2**k -> uint32 words (rows, n/32*k)."""
    rows, n = codes.shape
    c = codes.reshape(rows, n // 32, 32).astype(np.uint32)
    shifts = np.arange(32, dtype=np.uint32)
    words = np.zeros((rows, n // 32, k), dtype=np.uint32)
    for j in range(k):
        words[:, :, j] = (((c >> np.uint32(j)) & np.uint32(1)) << shifts).sum(axis=-1, dtype=np.uint64).astype(np.uint32)
    return words.reshape(rows, n // 32 * k)


def unpack(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack: uint32 words (rows, G*k) -> codes uint8 (rows, G*32)."""
    rows = words.shape[0]
    w = words.reshape(rows, -1, k, 1).astype(np.uint32)
    bits = (w >> np.arange(32, dtype=np.uint32)) & np.uint32(1)  # (rows, G, k, 32)
    codes = (bits << np.arange(k, dtype=np.uint32)[:, None]).sum(axis=2)
    return codes.reshape(rows, -1).astype(np.uint8)


class NumpyOps:
    """The reference implementation of the four kernel operations."""

    name = "numpy"

    @staticmethod
    def stats(x: np.ndarray, B: int, affine: bool):
        xb = padded(x, B)
        if affine:
            return (np.minimum(xb.min(axis=-1), F32(0)).astype(F32),
                    np.maximum(xb.max(axis=-1), F32(0)).astype(F32))
        return np.abs(xb).max(axis=-1).astype(F32)

    @staticmethod
    def search(x, B, cand_s, cand_o, cb, mids) -> np.ndarray:
        xb = padded(x, B)
        x64 = xb.astype(np.float64)
        best = np.zeros(xb.shape[:2], dtype=np.int32)
        best_err = np.full(xb.shape[:2], np.inf)
        for i in range(cand_s.shape[0]):
            o = None if cand_o is None else cand_o[i]
            v = decode_values(np.searchsorted(mids, normalize(xb, cand_s[i], o), side="left"), cb, cand_s[i], o)
            d = x64 - v.astype(np.float64)
            err = np.zeros(xb.shape[:2])
            for j in range(B):  # sequential accumulation: the order is part of the spec
                err += d[..., j] * d[..., j]
            better = err < best_err
            best[better] = i
            best_err[better] = err[better]
        return best

    @staticmethod
    def quantize_pack(x, B, k, s, o, cb, mids) -> np.ndarray:
        xb = padded(x, B)
        codes = np.searchsorted(mids, normalize(xb, s, o), side="left")
        return pack(codes.reshape(x.shape[0], -1), k)

    @staticmethod
    def dequantize(words, k, B, cols, s, o, cb) -> np.ndarray:
        codes = unpack(words, k)
        rows = words.shape[0]
        v = decode_values(codes.reshape(rows, -1, B), cb, s, o)
        return np.ascontiguousarray(v.reshape(rows, -1)[:, :cols])
