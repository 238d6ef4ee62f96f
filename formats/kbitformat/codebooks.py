"""Codebooks: every data type reduces to 2**k sorted float32 values.

Symmetric types (int, fp, nf, dynamic, quantile) live in [-1, 1] and are scaled by a
per-block absmax; `affine` lives in [0, 1] and is scaled by the block range and shifted
by a per-block offset. The file stores the codebook itself, so a reader never needs
these builders; they only decide which values get written.
"""
from __future__ import annotations

import math

import numpy as np

from .constants import FP_DEFAULT_EXPONENT, QUANTILE_SAMPLE
from .errors import KbitValueError


def _finish(values, k: int) -> np.ndarray:
    cb = np.sort(np.asarray(values, dtype=np.float64)).astype(np.float32)
    assert cb.shape == (2**k,), (cb.shape, k)
    return cb


def int_codebook(k: int) -> np.ndarray:
    """Symmetric signed integers -L..L (L = 2**(k-1) - 1) over L.

    That is 2**k - 1 levels; code 0 decodes to -(L+1)/L, outside [-1, 1], so the
    nearest-value rule never picks it (the paper's Int spends one code this way).
    """
    L = 2 ** (k - 1) - 1
    return _finish((np.arange(2**k) - (L + 1)) / L, k)


def affine_codebook(k: int) -> np.ndarray:
    """Uniform levels i / (2**k - 1) on [0, 1]."""
    return _finish(np.arange(2**k) / (2**k - 1), k)


def fp_codebook(k: int, exponent_bits: int | None = None) -> np.ndarray:
    """Sign + E exponent bits + M = k-1-E mantissa bits, subnormals, no NaN/Inf,
    normalised so the largest magnitude is 1. Both +0 and -0 are codes (both decode to 0)."""
    e = FP_DEFAULT_EXPONENT[k] if exponent_bits is None else exponent_bits
    if not 1 <= e <= k - 1:
        raise KbitValueError(f"fp with k={k} needs 1..{k - 1} exponent bits, got {e}")
    m = k - 1 - e
    mags = []
    for ef in range(2**e):
        for mf in range(2**m):
            if ef == 0:  # subnormal: 0.m * 2**(1-bias); bias cancels in the normalisation
                mags.append(mf / 2**m * 2.0**1)
            else:
                mags.append((1 + mf / 2**m) * 2.0**ef)
    mags = np.array(mags) / max(mags)
    return _finish(np.concatenate([-mags, mags]), k)


def ndtri(p: float) -> float:
    """Inverse of the standard normal CDF (float64), by Newton steps on math.erfc."""
    if not 0.0 < p < 1.0:
        raise ValueError(p)
    x = 0.0
    for _ in range(100):
        cdf = 0.5 * math.erfc(-x / math.sqrt(2.0))
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        step = (cdf - p) / pdf
        x -= max(-2.0, min(2.0, step))
        if abs(step) < 1e-15 * max(1.0, abs(x)):
            break
    return x


def nf_codebook(k: int) -> np.ndarray:
    """Normal-float (QLoRA) generalised to k bits: 2**(k-1) positive and
    2**(k-1)-1 negative N(0,1) quantiles plus an exact zero, scaled to [-1, 1].

    The outermost quantile is taken at offset = 1 - (1/(2(2**k-1)) + 1/(2*2**k))/2
    (0.9677083 for k=4, QLoRA's constant), so k=4 reproduces NF4.
    """
    n = 2**k
    offset = 1.0 - 0.5 * (1.0 / (2 * (n - 1)) + 1.0 / (2 * n))
    pos = [ndtri(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-ndtri(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    v = np.array(pos + neg + [0.0])
    return _finish(v / np.abs(v).max(), k)


def dynamic_codebook(k: int) -> np.ndarray:
    """Dynamic exponent type (Dettmers 8-bit optimizers) generalised to k bits.

    After the sign, a run of leading zeros sets a decimal exponent and the bits after
    the first 1 form a linear fraction: exponent i (0..k-2) carries 2**i fractions, the
    midpoints of 2**i equal steps over [0.1, 1], scaled by 10**(i-(k-2)). Both signs,
    plus 0 and 1: 2*(2**(k-1)-1) + 2 = 2**k values.
    """
    vals = [0.0, 1.0]
    for i in range(k - 1):
        b = np.linspace(0.1, 1.0, 2**i + 1)
        means = (b[:-1] + b[1:]) / 2 * 10.0 ** (i - (k - 2))
        vals += list(means) + list(-means)
    return _finish(vals, k)


def _sample(normalized: np.ndarray) -> np.ndarray:
    y = np.asarray(normalized, dtype=np.float32).ravel()
    if y.size > QUANTILE_SAMPLE:
        y = y[:: -(-y.size // QUANTILE_SAMPLE)]
    return y.astype(np.float64)


def quantile_codebook(k: int, normalized: np.ndarray) -> np.ndarray:
    """The paper's quantile type, estimated from the tensor's absmax-normalised values y.

    Every block's absmax normalises to exactly -1 or +1, so those two are codebook
    endpoints. The other n = 2**k - 2 values are the paper's midpoints of consecutive
    quantiles, q_i = (Q(p_i) + Q(p_{i+1})) / 2, i = 0..n-1, with p_i = i/n evenly spaced
    over [0, 1] (the paper writes p_i = i/(n+1), which leaves the top tail out), over the
    values strictly inside (-1, 1) (Q: numpy's 'linear' empirical quantile); then the
    value nearest zero is set to exactly 0. At most QUANTILE_SAMPLE values are used: every s-th value of the
    flattened tensor, s = ceil(size / QUANTILE_SAMPLE).
    """
    y = _sample(normalized)
    inner = y[np.abs(y) < 1]
    if inner.size == 0:
        inner = np.zeros(1)
    n = 2**k - 2
    Q = np.quantile(inner, np.arange(n + 1) / n)
    q = np.concatenate([[-1.0], (Q[:-1] + Q[1:]) / 2, [1.0]])
    q[np.argmin(np.abs(q))] = 0.0
    return _finish(q, k)


def lloyd_codebook(k: int, normalized: np.ndarray, iterations: int = 60, bins: int = 8192) -> np.ndarray:
    """Lloyd-Max (1-D k-means) codebook minimising the squared error of the tensor's
    normalised values: starts from the quantile codebook and iterates on a histogram of
    `bins` equal bins over [-1, 1] (deterministic and fast). The level nearest zero is
    held at exactly 0 and the endpoints at -1 and +1."""
    y = _sample(normalized)
    hist, edges = np.histogram(y, bins=bins, range=(-1.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    cb = quantile_codebook(k, y).astype(np.float64)
    zero = int(np.argmin(np.abs(cb)))
    for _ in range(iterations):
        m = (cb[1:] + cb[:-1]) / 2
        cell = np.searchsorted(m, centers, side="left")
        mass = np.bincount(cell, weights=hist, minlength=cb.size)
        tot = np.bincount(cell, weights=hist * centers, minlength=cb.size)
        new = np.where(mass > 0, tot / np.where(mass > 0, mass, 1), cb)
        new[zero], new[0], new[-1] = 0.0, -1.0, 1.0
        new = np.sort(new)
        if np.allclose(new, cb, atol=1e-9):
            break
        cb = new
    return _finish(cb, k)


DATA_DEPENDENT = {"quantile": quantile_codebook, "lloyd": lloyd_codebook}


def fixed_codebook(dtype: str, k: int, fp_exponent: int | None = None) -> np.ndarray | None:
    """The codebook of a data-independent type; None for quantile and lloyd."""
    if dtype == "int":
        return int_codebook(k)
    if dtype == "affine":
        return affine_codebook(k)
    if dtype == "fp":
        return fp_codebook(k, fp_exponent)
    if dtype == "nf":
        return nf_codebook(k)
    if dtype == "dynamic":
        return dynamic_codebook(k)
    if dtype in DATA_DEPENDENT:
        return None
    raise KbitValueError(f"unknown data type {dtype!r}")


def midpoints(codebook: np.ndarray) -> np.ndarray:
    """Decision thresholds: m_i = (c_i + c_{i+1}) / 2 in float32. A normalised value y
    gets code #{i : m_i < y} (ties go to the lower code)."""
    cb = codebook.astype(np.float32)
    return ((cb[1:] + cb[:-1]) / np.float32(2)).astype(np.float32)
