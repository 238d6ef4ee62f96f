"""Codebooks against published values and independent constructions."""
from __future__ import annotations

import numpy as np
import pytest

from kbitformat import codebooks
from kbitformat.constants import DTYPES

QLORA_NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
             0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def test_nf4_equals_qlora():
    assert np.allclose(codebooks.nf_codebook(4), QLORA_NF4, atol=1e-6, rtol=0)


def test_nf_matches_scipy_construction():
    scipy = pytest.importorskip("scipy.stats")
    for k in range(2, 9):
        n = 2**k
        off = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
        v = np.concatenate([scipy.norm.ppf(np.linspace(off, 0.5, n // 2 + 1)[:-1]),
                            -scipy.norm.ppf(np.linspace(off, 0.5, n // 2)[:-1]), [0]])
        assert np.allclose(codebooks.nf_codebook(k), np.sort(v / np.abs(v).max()), atol=1e-6)


def test_fp4_e2m1_is_the_ocp_value_set():
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6]) / 6
    assert np.allclose(codebooks.fp_codebook(4, 2), np.sort(np.concatenate([-mags, mags])))


def test_fp8_e4m3_shape():
    cb = codebooks.fp_codebook(8, 4)
    pos = cb[cb > 0]
    # E4M3 without NaN/Inf: largest (1+7/8)*2**15 relative to itself, smallest subnormal 1/8*2**1
    assert np.isclose(pos.min(), (1 / 8 * 2) / (1.875 * 2**15))
    assert (cb == 0).sum() == 2  # +0 and -0


def test_int_codebook():
    assert np.allclose(codebooks.int_codebook(4), (np.arange(16) - 8) / 7)
    assert np.allclose(codebooks.int_codebook(2), [-2, -1, 0, 1])


def test_dynamic_8bit_properties():
    cb = codebooks.dynamic_codebook(8)
    assert cb.size == 256 and cb.max() == 1 and 0 in cb
    pos = np.sort(cb[cb > 0])
    # smallest exponent: one fraction, the midpoint of [0.1, 1] times 1e-6
    assert np.isclose(pos[0], 0.55e-6)
    assert np.allclose(np.sort(-cb[cb < 0]), pos[:-1])  # symmetric except +1


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d not in ("quantile", "lloyd")])
@pytest.mark.parametrize("k", range(2, 9))
def test_fixed_codebooks_are_sorted_and_sized(dtype, k):
    cb = codebooks.fixed_codebook(dtype, k)
    assert cb.dtype == np.float32 and cb.shape == (2**k,)
    assert np.all(np.diff(cb) >= 0)
    if dtype == "affine":
        assert cb[0] == 0 and cb[-1] == 1
    else:
        assert 0 in cb and cb.max() == 1


@pytest.mark.parametrize("k", range(2, 9))
def test_quantile_and_lloyd_from_data(k):
    rng = np.random.default_rng(k)
    y = np.clip(rng.standard_normal(50_000) / 3, -1, 1).astype(np.float32)
    for build in (codebooks.quantile_codebook, codebooks.lloyd_codebook):
        cb = build(k, y)
        assert cb.shape == (2**k,) and 0 in cb and cb[0] == -1 and cb[-1] == 1
        assert np.all(np.diff(cb) >= 0)


def test_quantile_of_uniform_is_evenly_spaced():
    y = np.linspace(-1, 1, 100_001)[1:-1]
    cb = codebooks.quantile_codebook(4, y).astype(np.float64)
    inner = cb[1:-1]
    # 14 inner values at the midpoints of 14 equal-probability bins of U(-1, 1), one moved to 0
    ideal = -1 + (np.arange(14) + 0.5) * 2 / 14
    assert (inner == 0).sum() == 1
    nonzero = inner[inner != 0]
    # the 13 others sit on the ideal points (one of the two nearest zero became 0)
    assert np.all(np.min(np.abs(nonzero[:, None] - ideal[None, :]), axis=1) < 1e-3)


def test_lloyd_beats_quantile_in_mse():
    rng = np.random.default_rng(0)
    y = np.clip(rng.standard_normal(200_000) / 2.5, -1, 1)

    def mse(cb):
        m = codebooks.midpoints(cb)
        return float(np.mean((y - cb[np.searchsorted(m, y.astype(np.float32))]) ** 2))

    assert mse(codebooks.lloyd_codebook(3, y)) < mse(codebooks.quantile_codebook(3, y))


def test_ndtri():
    assert abs(codebooks.ndtri(0.975) - 1.959963984540054) < 1e-12
    assert abs(codebooks.ndtri(0.5)) < 1e-15
