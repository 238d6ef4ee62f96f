"""Property tests: the Numba CPU kernels give the numpy reference's bytes for any shape,
bit width, data type, block size, scale encoding and search, on any float32 values."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kbitformat import KbitValueError, NumpyOps, QuantSpec, dequantize, quantize
from kbitformat.constants import DTYPES, SCALE_ENCODINGS
from kbitcli.kernels import get_ops

F32 = np.float32
CPU = get_ops("cpu")


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _check(x, spec):
    try:
        want = quantize(x, spec, ops=NumpyOps)
    except KbitValueError:
        try:
            quantize(x, spec, ops=CPU)
        except KbitValueError:
            return
        raise AssertionError("the reference refused the tensor, the CPU kernels did not")
    got = quantize(x, spec, ops=CPU)
    assert _same(got.codebook, want.codebook)
    assert _same(got.codes, want.codes), "codes"
    assert sorted(got.scales) == sorted(want.scales)
    for name in want.scales:
        assert _same(got.scales[name], want.scales[name]), name
    assert (got.offsets is None) == (want.offsets is None)
    if want.offsets is not None:
        assert _same(got.offsets, want.offsets), "offsets"
    assert _same(dequantize(got, ops=CPU), dequantize(want, ops=NumpyOps)), "dequantized"


shapes = st.one_of(
    st.just(()),
    st.tuples(st.integers(1, 300)),
    st.tuples(st.integers(1, 12), st.integers(1, 300)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 90)),
)
specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    dtype=st.sampled_from(DTYPES),
    block_size=st.sampled_from([32, 64, 96, 128, 0]),
    scale=st.sampled_from(SCALE_ENCODINGS),
    search=st.sampled_from(["none", "none", "none", "mse"]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, spec=specs, seed=st.integers(0, 2**32 - 1),
       magnitude=st.sampled_from([1.0, 1e-3, 1e-30, 1e-42, 1e3, 1e30]),
       shift=st.sampled_from([0.0, 0.0, 0.5, -3.0]),
       zeros=st.floats(0.0, 1.0))
def test_cpu_equals_reference_on_random_tensors(shape, spec, seed, magnitude, shift, zeros):
    rng = np.random.default_rng(seed)
    with np.errstate(all="ignore"):
        x = ((rng.standard_normal(shape) + shift) * magnitude).astype(F32)
        if x.ndim:
            x[rng.random(shape) < zeros * 0.5] = 0.0
    _check(x, spec)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=hnp.arrays(F32, st.tuples(st.integers(1, 4), st.integers(1, 100)),
                    elements=st.floats(-1e6, 1e6, width=32, allow_subnormal=True)),
       spec=specs)
def test_cpu_equals_reference_on_arbitrary_values(x, spec):
    """Any float32 values hypothesis comes up with (repeats, signed zeros, subnormals)."""
    _check(x, spec)


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 200), B=st.sampled_from([32, 64, 128]),
       k=st.integers(2, 8), affine=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_cpu_dequantize_equals_reference_on_any_words(rows, cols, B, k, affine, seed):
    rng = np.random.default_rng(seed)
    nb = -(-cols // B)
    words = rng.integers(0, 2**32, size=(rows, nb * B // 32 * k), dtype=np.uint64).astype(np.uint32)
    cb = np.sort(rng.standard_normal(2**k)).astype(F32)
    s = np.abs(rng.standard_normal((rows, nb))).astype(F32)
    o = -np.abs(rng.standard_normal((rows, nb))).astype(F32) if affine else None
    assume(np.isfinite(s).all())
    assert _same(CPU.dequantize(words, k, B, cols, s, o, cb), NumpyOps.dequantize(words, k, B, cols, s, o, cb))
