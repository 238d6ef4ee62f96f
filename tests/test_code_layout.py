"""KbitLinear's byte code layout (k = 2, 4, 8): the torch converters against the layout's
definition (written here from the reference's codes), dequantization bit-identical to the bit
planes', the state dict kept in the format's planes, and tiny models giving the same greedy
tokens and (within float32 rounding) the same logits in both layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kbitformat import QuantSpec, quantize
from kbitformat.constants import DTYPES
from kbitformat.reference import NumpyOps, pack, unpack

from kbitcli.runner import KbitLinear, generate_ids, load, parameter_bytes
from kbitcli.runner.layers import bytes_to_planes, dequantize_torch, planes_to_bytes
from test_gemv import spec_bytes
from test_runner import _convert, _ids, tiny  # noqa: F401 - the shared fixture of tiny transformers models

torch.set_num_threads(2)


@pytest.mark.parametrize("k", (2, 4, 8))
def test_planes_to_bytes_follows_the_spec(k):
    """Random codes (padding included) packed in planes by the reference: planes_to_bytes gives
    the layout's words, bytes_to_planes gives the planes back; other widths are refused."""
    rng = np.random.default_rng(k)
    for rows, G in ((1, 1), (5, 6), (3, 18)):
        codes = rng.integers(0, 1 << k, (rows, G * 32)).astype(np.uint8)
        words = pack(codes, k)
        assert np.array_equal(unpack(words, k), codes)
        got = planes_to_bytes(torch.from_numpy(words.view(np.int32)), k)
        assert got.dtype == torch.int32 and tuple(got.shape) == words.shape
        want = spec_bytes(words, k)
        assert np.array_equal(got.numpy().view(np.uint32), want)
        # the byte view: code i at bits [(i % (8//k)) * k, +k) of byte i // (8//k)
        b = got.numpy().view(np.uint8).reshape(rows, -1)
        per = 8 // k
        i = np.arange(G * 32)
        assert np.array_equal((b[:, i // per] >> ((i % per) * k)) & ((1 << k) - 1), codes)
        back = bytes_to_planes(got, k)
        assert back.dtype == torch.int32 and np.array_equal(back.numpy().view(np.uint32), words)
    with pytest.raises(ValueError, match="byte code layout"):
        planes_to_bytes(torch.zeros((1, 3), dtype=torch.int32), 3)


@pytest.mark.parametrize("k", (2, 4, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_byte_layout_dequantizes_bit_identically(dtype, k):
    """use_byte_layout converts the codes in place (same tensor, same bytes); dequantized() gives
    the reference's values bit for bit with every kernel; the state dict keeps the planes and
    loads back into a byte-layout layer; use_plane_layout restores the planes."""
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((37, 150)) * rng.uniform(0.01, 3, (37, 1))).astype(np.float32)
    qt = quantize(x, QuantSpec(k, dtype, 64))
    ref = NumpyOps.dequantize(np.asarray(qt.codes, np.uint32), k, qt.block_size, qt.cols,
                              qt.decoded_scales().astype(np.float32),
                              None if qt.decoded_offsets(qt.decoded_scales()) is None else
                              qt.decoded_offsets(qt.decoded_scales()).astype(np.float32),
                              qt.codebook.astype(np.float32))
    planes = np.asarray(qt.codes, np.uint32)
    for kernel in ("auto", "torch", "numba"):
        layer = KbitLinear.from_quantized(qt, kernel=kernel)
        ptr, nbytes = layer.codes.data_ptr(), layer.packed_bytes()
        assert layer.code_layout == "planes" and layer.use_byte_layout() and layer.code_layout == "bytes"
        assert layer.codes.data_ptr() == ptr and layer.packed_bytes() == nbytes
        assert np.array_equal(layer.codes.numpy().view(np.uint32), spec_bytes(planes, k))
        got = layer.dequantized().numpy()
        assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)), kernel
        sd = layer.state_dict()
        assert np.array_equal(sd["codes"].numpy().view(np.uint32), planes)
        assert layer.code_layout == "bytes"  # saving does not change the layer
        other = KbitLinear.from_quantized(qt, kernel=kernel)
        other.use_byte_layout()
        other.load_state_dict(sd)
        assert other.code_layout == "planes"
        assert np.array_equal(other.dequantized().numpy().view(np.uint32), ref.view(np.uint32))
        layer.use_plane_layout()
        assert layer.code_layout == "planes" and np.array_equal(layer.codes.numpy().view(np.uint32), planes)
    bt = KbitLinear.from_quantized(qt).codes
    bt = planes_to_bytes(bt, k)
    w = dequantize_torch(bt, k, qt.block_size, qt.cols, torch.from_numpy(qt.decoded_scales().astype(np.float32)),
                         None if qt.decoded_offsets(qt.decoded_scales()) is None else
                         torch.from_numpy(qt.decoded_offsets(qt.decoded_scales()).astype(np.float32)),
                         torch.from_numpy(qt.codebook.astype(np.float32)), layout="bytes")
    assert np.array_equal(w.numpy().view(np.uint32), ref.view(np.uint32))


def test_layer_chooses_its_layout_at_the_first_forward():
    """k = 2, 4, 8 switch to bytes at the first forward (unless byte_layout is False); k = 3
    keeps the planes; the decode GEMV and the many-row path agree with the planes layer."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = rng.standard_normal((33, 96)).astype(np.float32)
    for k, want in ((2, "bytes"), (3, "planes"), (4, "bytes"), (8, "bytes")):
        qt = quantize(w, QuantSpec(k, "affine", 32))
        a = KbitLinear.from_quantized(qt)
        b = KbitLinear.from_quantized(qt)
        b.byte_layout = False
        with torch.no_grad():
            for n in (1, 3, 5):
                ya, yb = a(torch.from_numpy(x[:n])), b(torch.from_numpy(x[:n]))
                assert (ya - yb).abs().max().item() <= 1e-5 * yb.abs().max().item(), (k, n)
            big = torch.from_numpy(np.concatenate([x, x]))  # 10 rows: dequantize + matmul, bit-identical
            assert torch.equal(a(big), b(big))
        assert a.code_layout == want and b.code_layout == "planes", k
        assert a.state_dict()["codes"].equal(b.state_dict()["codes"])


def _layouts(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, KbitLinear):
            m.byte_layout = on


@pytest.mark.parametrize("arch,spec", [("llama", QuantSpec(4, "nf", 64)), ("qwen2", QuantSpec(2, "affine", 32)),
                                       ("gpt2", QuantSpec(8, "int", 64))])
def test_tiny_models_same_in_both_layouts(arch, spec, tiny, tmp_path):
    """Greedy tokens of a packed tiny model are the same with the byte layout and with the bit
    planes; decode-step logits agree within float32 rounding, prompt-pass logits exactly."""
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", spec)
    planes, _, _ = load(out)
    nbytes = parameter_bytes(planes)
    _layouts(planes, False)
    byt, _, _ = load(out)
    prompts = [_ids(6, 31), _ids(9, 32)]
    got, _, _ = generate_ids(byt, prompts, 10, eos_token_ids=[], pad_token_id=0)
    ref, _, _ = generate_ids(planes, prompts, 10, eos_token_ids=[], pad_token_id=0)
    assert got == ref
    kl = [m for m in byt.modules() if isinstance(m, KbitLinear)]
    assert kl and all(m.code_layout == "bytes" for m in kl)
    assert all(m.code_layout == "planes" for m in planes.modules() if isinstance(m, KbitLinear))
    assert parameter_bytes(byt) == nbytes
    with torch.no_grad():
        for n in (1, 4, 12):
            ids = torch.tensor([_ids(n, 40 + n)])
            a, b = byt(ids), planes(ids)
            if n > 8:
                assert torch.equal(a, b), (arch, n)
            else:
                assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), (arch, n)
    sd = byt.state_dict()
    for name, t in planes.state_dict().items():
        assert torch.equal(sd[name], t), name
