"""The fused CPU conversion kernel (kbitcli.kernels.cpu_fused): the same output bytes and
the same recorded error as the general path (kbitformat.quantize + quantization_error with
CpuOps), the same errors for bad weights, and a check that conversion really uses it."""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kbitcli import convert as conv
from kbitcli.kernels import cpu_fused
from kbitcli.kernels.cpu import CpuOps
from kbitcli.recipe import Recipe
from kbitformat import KbitValueError, QuantSpec, quantization_error, quantize
from kbitformat.io import bf16_to_f32, f32_to_bf16

rng = np.random.default_rng(5)
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def stored(base: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored values as the source keeps them, their float32 values)."""
    if dtype == "bfloat16":
        raw = f32_to_bf16(base)
        return raw, bf16_to_f32(raw).reshape(base.shape)
    if dtype == "float16":
        raw = base.astype(np.float16)
        return raw, raw.astype(np.float32)
    return base, base


def weights(shape, scale=0.02) -> np.ndarray:
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x.reshape(-1)[::53] = 0.0
    x.reshape(-1)[7::211] *= 40  # outliers
    if x.ndim == 2 and x.shape[0] > 3:
        x[2] = 0.0  # an all-zero row (zero scales)
        x[3, : x.shape[1] // 2] = np.abs(x[3, : x.shape[1] // 2])  # blocks of one sign (affine)
    return x


def same_tensor(a, b) -> None:
    ca, cb = a.components(), b.components()
    assert ca.keys() == cb.keys()
    for key in ca:
        assert ca[key].dtype == cb[key].dtype and ca[key].shape == cb[key].shape, key
        assert ca[key].tobytes() == cb[key].tobytes(), key
    assert a.codebook.tobytes() == b.codebook.tobytes() and a.block_size == b.block_size
    assert a.shape == b.shape and a.orig_dtype == b.orig_dtype


SPECS = [QuantSpec(k, dt, b, sc) for k, dt, b, sc in itertools.product(
    (2, 3, 4, 8), ("int", "affine", "nf", "fp"), (32, 64, 128), ("fp16", "fp32"))]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_same_bits_and_error_as_quantize(dtype):
    # cols 200: not a multiple of any block size; 3 rows of 4100 cover row-sized blocks
    cases = [weights((45, 200)), weights((3, 4100)), weights((300,))]
    n = 0
    for base in cases:
        raw, x = stored(base, dtype)
        for spec in SPECS + [QuantSpec(4, "int", 0, "fp16"), QuantSpec(5, "dynamic", 64, "fp16"),
                             QuantSpec(6, "fp", 32, "fp32", fp_exponent=2)]:
            want = quantize(x, spec, "t", ops=CpuOps, orig_dtype=dtype)
            want_err = quantization_error(x, want, CpuOps)
            got, err = cpu_fused.quantize_fused(raw, dtype, spec, "t")
            same_tensor(got, want)
            assert err == want_err, (spec.label(), err, want_err)
            n += 1
    assert n == 3 * (len(SPECS) + 3)


@pytest.mark.parametrize("threads", [1, 2])
def test_error_equal_for_any_thread_count(threads):
    if threads > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("fewer Numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        base = weights((700, 3000))  # several row chunks of the error measurement
        raw, x = stored(base, "bfloat16")
        spec = QuantSpec(4, "int", 64, "fp16")
        want = quantize(x, spec, "t", ops=CpuOps, orig_dtype="bfloat16")
        got, err = cpu_fused.quantize_fused(raw, "bfloat16", spec, "t")
        same_tensor(got, want)
        assert err == quantization_error(x, want, CpuOps)
    finally:
        numba.set_num_threads(old)


def test_unsupported_recipes_are_declined():
    raw = f32_to_bf16(weights((4, 64)))
    for spec in (QuantSpec(4, "quantile", 64), QuantSpec(4, "int", 64, search="mse"),
                 QuantSpec(4, "int", 64, "dq"), QuantSpec(4, "nf", 64, "e8")):
        assert not cpu_fused.supported(spec, "bfloat16")
        assert cpu_fused.quantize_fused(raw, "bfloat16", spec) is None
    assert not cpu_fused.supported(QuantSpec(4, "int", 64), "float64")


def test_f32_to_f16_matches_numpy():
    """Every float32 bit pattern was checked once (7 minutes); here a stride through all of
    them plus the neighbourhoods of every rounding boundary."""
    u = np.arange(0, 1 << 32, 4099, dtype=np.uint64).astype(np.uint32)
    edges = [0x33000000, 0x33800000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000, 0x47800000, 0x7F7FFFFF]
    near = np.concatenate([np.arange(e - 4200, e + 4200, dtype=np.int64) for e in edges])
    near = near[(near >= 0) & (near < 1 << 31)].astype(np.uint32)
    u = np.concatenate([u, near, near | np.uint32(1 << 31)])
    f = u.view(np.float32)
    u = u[~np.isnan(f)]
    out = np.empty(u.size, dtype=np.uint16)
    cpu_fused.f32_to_f16_bits(u, out)
    with np.errstate(over="ignore"):
        want = u.view(np.float32).astype(np.float16).view(np.uint16)
    assert np.array_equal(out, want)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_nan_and_inf_raise_kbitformats_error(bad, dtype):
    base = weights((8, 96))
    base[5, 70] = bad
    raw, x = stored(base, dtype)
    for spec in (QuantSpec(4, "int", 64), QuantSpec(3, "affine", 32, "fp32")):
        with pytest.raises(KbitValueError) as want:
            quantize(x, spec, "w", ops=CpuOps)
        with pytest.raises(KbitValueError) as got:
            cpu_fused.quantize_fused(raw, dtype, spec, "w")
        assert str(got.value) == str(want.value) and "NaN or Inf" in str(got.value)


def test_out_of_range_scales_raise_kbitformats_error():
    cases = [(np.full((2, 64), 7e4, np.float32), QuantSpec(4, "int", 64, "fp16")),     # fp16 scale overflow
             (np.full((2, 64), 65510, np.float32), QuantSpec(4, "int", 64, "fp16")),   # rounds up past 65504
             (np.array([[3e38, -3e38] * 16], np.float32), QuantSpec(4, "affine", 32, "fp32"))]  # range overflows
    for x, spec in cases:
        with pytest.raises(KbitValueError) as want:
            quantize(x, spec, "w", ops=CpuOps)
        with pytest.raises(KbitValueError) as got:
            cpu_fused.quantize_fused(x, "float32", spec, "w")
        assert str(got.value) == str(want.value)


# ----------------------------------------------------------------------------- conversion
def make_source(folder: Path, dtype: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(64, 96), (40, 200), (33, 128), (16, 4100), (96, 64), (24, 160)]
    t = {f"model.layers.{i}.mlp.up_proj.weight": torch.from_numpy(weights(s)).to(TORCH[dtype])
         for i, s in enumerate(shapes)}
    t["model.layers.0.input_layernorm.weight"] = torch.ones(96, dtype=TORCH[dtype])
    t["model.embed_tokens.weight"] = torch.from_numpy(weights((50, 96))).to(TORCH[dtype])
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


RECIPES = [  # a base spec, and rules giving the tensors other specs (6 tensors, so 6 specs a run)
    Recipe.build(QuantSpec(4, "int", 64), ["*.1.*=2:affine:b32:fp32", "*.2.*=3:nf:b128", "*.3.*=8:fp:b64:fp32",
                                          "*.4.*=4:affine:b128", "*.5.*=3:int:b32:fp32"]),
    Recipe.build(QuantSpec(4, "affine", 64), ["*.1.*=8:int:b128", "*.2.*=2:fp:b32:fp32", "*.3.*=4:nf:row",
                                             "*.4.*=3:affine:b64:fp32", "*.5.*=2:int:b64"]),
    Recipe.build(QuantSpec(4, "int", 64), ["*.1.*=4:quantile", "*.2.*=4:int:b64:mse", "*.3.*=4:int:dq"]),
]


def _convert(src, out, recipe, monkeypatch, fused: bool, shard_size=1 << 30):
    calls = []
    real = cpu_fused.quantize_fused

    def spy(*a, **k):
        got = real(*a, **k)
        calls.append(got is not None)
        return got

    with monkeypatch.context() as m:
        m.setattr(cpu_fused, "quantize_fused", spy)
        if not fused:
            m.setattr(conv, "_fused_ok", lambda ops, p: False)
        s = conv.convert(src, out, recipe, shard_size=shard_size)
    return s, calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("ri", range(len(RECIPES)))
def test_conversion_bytes_equal_the_general_path(tmp_path, monkeypatch, dtype, ri):
    make_source(tmp_path / "src", dtype)
    recipe = RECIPES[ri]
    shard = 1 << 30 if ri else 30_000
    s1, calls = _convert(tmp_path / "src", tmp_path / "fused", recipe, monkeypatch, True, shard)
    s2, none = _convert(tmp_path / "src", tmp_path / "ref", recipe, monkeypatch, False, shard)
    # the fast path was taken for every supported tensor (quantile, mse and dq were not)
    assert calls == [True] * (3 if ri == 2 else 6) and none == []
    got, want = digests(tmp_path / "fused"), digests(tmp_path / "ref")
    assert got.keys() == want.keys() and (len([n for n in got if n.endswith(".safetensors")]) > 1) == (ri == 0)
    for name in got:
        if name != "README.md":  # the model card names the output folder
            assert got[name] == want[name], name
    assert [t.error for t in s1.tensors] == [t.error for t in s2.tensors]


def test_conversion_nan_error_is_the_same(tmp_path, monkeypatch):
    make_source(tmp_path / "src", "bfloat16")
    t = {"model.layers.0.mlp.up_proj.weight": torch.tensor([[0.1, float("nan")] * 32] * 2, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "src" / "model.safetensors"))
    msgs = []
    for fused in (True, False):
        with pytest.raises(KbitValueError) as e:
            _convert(tmp_path / "src", tmp_path / f"o{fused}", Recipe(QuantSpec(4, "int", 64)), monkeypatch, fused)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "NaN or Inf" in msgs[0]


# ----------------------------------------------------------------------------- fast paths
from kbitcli.kernels.cpu import _codes as _ref_codes_kernel  # noqa: E402
from kbitcli.kernels.cpu import CodeSearch  # noqa: E402
from kbitformat import codebooks  # noqa: E402


def _codes_both(ys: np.ndarray, k: int, dtype: str):
    """(the fused kernel's codes, _codes' codes) of normalised values ys (a multiple of 64),
    through the block code search as the kernel runs it."""
    cb = codebooks.fixed_codebook(dtype, k)
    mids = codebooks.midpoints(cb)
    up = np.array(cpu_fused._uniform(cb), dtype=np.float32)
    cs = CodeSearch(mids)
    return _codes_pair(ys.astype(np.float32), up, *cs.args())


@numba.njit(cache=False)
def _codes_pair(ys, up, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half):
    B = 64
    got = np.empty(ys.size, np.uint8)
    want = np.empty(ys.size, np.uint8)
    c32 = np.empty(B, np.uint32)
    cbuf = np.empty(B, np.uint8)
    ci = c32.view(np.int32)
    ua, ub, top, ubl, ubh, top2 = up[0], up[1], up[2], up[3], up[4], up[5]
    for s in range(0, ys.size, B):
        y = ys[s:s + B].copy()
        near = np.int32(0)
        for i in range(B):  # the kernel's code (see _quant_block)
            cl = cpu_fused._ucode_guess(y[i], ua, ubl, top2)
            ch = cpu_fused._ucode_guess(y[i], ua, ubh, top2)
            ci[i] = cl
            near |= cl ^ ch
        if near != 0:
            for i in range(B):
                j = cpu_fused._ucode_guess(y[i], ua, ub, top)
                ci[i] = j + np.int32(mids[j] < y[i])
        for i in range(B):
            got[s + i] = np.uint8(ci[i])
        _ref_codes_kernel(y, B, c32, cbuf, method, mids, mext, steps, lut, lo, sc, lut_steps, amin, sh, half)
        want[s:s + B] = cbuf
    return got, want


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", ["int", "affine"])
def test_uniform_code_search_is_exact(k, dtype):
    cb = codebooks.fixed_codebook(dtype, k)
    mids = codebooks.midpoints(cb)
    assert cpu_fused._uniform(cb) is not None  # the fast search is taken for int / affine
    # every midpoint, its float32 neighbours (ties go to the lower code), the codebook values,
    # the clamps (beyond the codebook's ends, +-inf) and random values
    lo_n = [mids]
    for _ in range(3):
        lo_n.append(np.nextafter(lo_n[-1], np.float32(-np.inf)))
    hi_n = [mids]
    for _ in range(3):
        hi_n.append(np.nextafter(hi_n[-1], np.float32(np.inf)))
    ys = np.concatenate(lo_n + hi_n + [cb, np.array([-np.inf, np.inf, -3, 3, -1.5, 1.5, 0, -0.0, 2, -2], np.float32),
                                       rng.uniform(-1.3, 1.3, 200_000).astype(np.float32),
                                       rng.uniform(-0.1, 1.1, 200_000).astype(np.float32)])
    ys = np.concatenate([ys, np.zeros(-ys.size % 64, np.float32)]).astype(np.float32)
    got, want = _codes_both(ys, k, dtype)
    assert np.array_equal(got, want)


def test_uniform_search_declines_uneven_codebooks():
    for dt, k in (("nf", 4), ("fp", 4), ("dynamic", 5), ("nf", 8)):
        assert cpu_fused._uniform(codebooks.fixed_codebook(dt, k)) is None


@pytest.mark.parametrize("cols", [1, 63, 65, 127, 200, 1031, 4100])
def test_error_bits_for_odd_lengths(cols):
    """Pieces that cut blocks, pieces shorter than a block, empty trailing pieces: the
    recorded error equals the general path's bit for bit, and measure_error=False writes
    the same bytes with no error."""
    for rows in (1, 3, 257):
        base = weights((rows, cols))
        raw, x = stored(base, "bfloat16")
        for spec in (QuantSpec(4, "int", 64, "fp16"), QuantSpec(3, "affine", 32, "fp32"), QuantSpec(4, "nf", 64)):
            want = quantize(x, spec, "t", ops=CpuOps, orig_dtype="bfloat16")
            got, err = cpu_fused.quantize_fused(raw, "bfloat16", spec, "t")
            same_tensor(got, want)
            assert err == quantization_error(x, want, CpuOps), (rows, cols, spec.label())
            got2, none = cpu_fused.quantize_fused(raw, "bfloat16", spec, "t", measure_error=False)
            same_tensor(got2, want)
            assert none is None
