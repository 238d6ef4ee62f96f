"""The runner on a real CUDA GPU (scripts/gpu_check.sh sets KBIT_REAL_GPU=1): every
architecture's logits against transformers, the 4-bit packed path (Numba CUDA dequantizer
for prefill, fused GEMV for decode) against dequantize-on-load and against the CPU.

Without KBIT_REAL_GPU=1 these are skipped (the CUDA code paths are covered under Numba's
simulator by test_runner.py and test_gemv_cuda.py); with it, a missing GPU is a failure.
"""
from __future__ import annotations

import os

import pytest
import torch

from kbitformat import QuantSpec
from test_runner import tiny  # noqa: F401 - the shared fixture of tiny transformers models

REAL_GPU = os.environ.get("KBIT_REAL_GPU", "") == "1"
pytestmark = pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU: scripts/gpu_check.sh (KBIT_REAL_GPU=1)")

# fp32 on the GPU: matmuls in another order (and no TF32: torch's default for fp32 matmul
# is full precision) differ from the CPU reference by rounding, a little more than TOL
GPU_TOL = 3e-4


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.fail("KBIT_REAL_GPU=1 but torch sees no CUDA GPU")
    assert not torch.backends.cuda.matmul.allow_tf32
    return torch.device("cuda")


def _ids(n, seed):
    from test_runner import _ids as ids
    return ids(n, seed)


def _arches():
    from test_runner import ARCHS
    return ARCHS


@pytest.mark.parametrize("arch", _arches())
def test_logits_match_transformers_on_cuda(arch, tiny, cuda):
    from kbitcli.runner import load
    from kbitcli.runner.models.base import KVCache
    from test_runner import _hf_logits
    folder, hf = tiny(arch)
    model, _, _ = load(folder, device="cuda", dtype="float32")
    ids = _ids(12, 1)
    ref = _hf_logits(hf, ids)
    with torch.no_grad():
        full = model(torch.tensor([ids], device=cuda))[0].cpu()
        cache = KVCache(model.num_layers)
        parts = [model(torch.tensor([ids[:5]], device=cuda), cache=cache)[0]]
        for t in ids[5:]:
            parts.append(model(torch.tensor([[t]], device=cuda), cache=cache)[0])
        inc = torch.cat(parts).cpu()
    assert (full - ref).abs().max().item() < GPU_TOL
    assert (inc - ref).abs().max().item() < GPU_TOL


def _convert(src, out, spec):
    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    convert(src, out, Recipe.build(spec), device="cuda", measure_error=False)
    return out


@pytest.mark.parametrize("arch,spec", [("llama", "4:nf:b64"), ("llama-tied-bias", "4:affine:b32"),
                                       ("qwen2", "3:fp:b64"), ("qwen3", "4:nf:b64"), ("gpt_neox", "8:int:b64"),
                                       ("opt", "2:quantile:b32"), ("bloom", "4:affine:b64:dq"),
                                       ("gpt2", "4:nf:b64")])
def test_packed_on_cuda(arch, spec, tiny, cuda, tmp_path):
    """Prefill through the CUDA dequantizer equals dequantize-on-load exactly; decode steps
    (the fused GEMV) agree to float rounding, and greedy generation gives the same tokens on
    the GPU packed, GPU dequantized-on-load and CPU packed."""
    from kbitcli.runner import KbitLinear, generate_ids, load, parameter_bytes
    from kbitcli.runner.models.base import KVCache
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec.parse(spec))
    packed, _, _ = load(out, device="cuda", dtype="float32")
    dense, _, _ = load(out, device="cuda", dtype="float32", dequantize_on_load=True)
    cpu, _, _ = load(out, device="cpu", dtype="float32")
    assert any(isinstance(m, KbitLinear) and m.codes.is_cuda for m in packed.modules())
    assert parameter_bytes(packed) < parameter_bytes(dense)
    ids = _ids(10, 7)
    with torch.no_grad():
        a = packed(torch.tensor([ids], device=cuda))
        b = dense(torch.tensor([ids], device=cuda))
        c = cpu(torch.tensor([ids]))
        assert torch.equal(a, b)
        assert (a.cpu() - c).abs().max().item() < GPU_TOL
        steps = {}
        for name, m, dev in (("packed", packed, cuda), ("dense", dense, cuda), ("cpu", cpu, "cpu")):
            cache = KVCache(m.num_layers)
            m(torch.tensor([ids[:6]], device=dev), cache=cache)
            steps[name] = torch.cat([m(torch.tensor([[t]], device=dev), cache=cache)[0] for t in ids[6:]]).cpu()
    assert (steps["packed"] - steps["dense"]).abs().max().item() < GPU_TOL
    assert (steps["packed"] - steps["cpu"]).abs().max().item() < GPU_TOL
    prompts = [_ids(6, 5), _ids(3, 6)]
    got = [generate_ids(m, prompts, 8, eos_token_ids=[], pad_token_id=0)[0] for m in (packed, dense, cpu)]
    assert got[0] == got[1] == got[2]
    # the decode steps really went through the fused GEMV (a failure would have switched it off)
    assert all(m.fused_gemv for m in packed.modules() if isinstance(m, KbitLinear) and m.layout == "out_in")


def test_float16_generation_on_cuda(tiny, cuda, tmp_path):
    """The GPU default compute dtype (float16): runs, finite, same greedy tokens packed vs
    dequantized on load."""
    from kbitcli.runner import generate_ids, load
    folder, _ = tiny("llama")
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 64))
    packed, _, _ = load(out, device="cuda", dtype="float16")
    dense, _, _ = load(out, device="cuda", dtype="float16", dequantize_on_load=True)
    with torch.no_grad():
        logits = packed(torch.tensor([_ids(9, 2)], device=cuda))
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()
    prompts = [_ids(6, 8)]
    assert generate_ids(packed, prompts, 8, eos_token_ids=[], pad_token_id=0)[0] == \
        generate_ids(dense, prompts, 8, eos_token_ids=[], pad_token_id=0)[0]
    assert all(m.fused_gemv for m in packed.modules() if hasattr(m, "fused_gemv"))


@pytest.mark.parametrize("arch,spec", [("llama", None), ("mistral", None), ("gpt2", None), ("bloom", None),
                                       ("opt", None), ("gpt_neox", None), ("llama", "4:nf:b64"),
                                       ("qwen2", "4:affine:b64"), ("gpt_neox", "8:int:b64"), ("opt", "3:fp:b64")])
def test_cuda_graph_decode(arch, spec, tiny, cuda, tmp_path, monkeypatch):
    """Decode steps captured in CUDA graphs (the default on a GPU; buckets of 8 positions, so
    several graphs are captured) give the same greedy tokens as the growing cache, with no
    capture failure (a failure would warn and report decode_mode "static"); packed 4-bit
    models capture the Numba GEMV kernels inside the graphs."""
    import importlib
    import warnings

    from kbitcli.runner import KbitLinear, generate_ids, load
    gen = importlib.import_module("kbitcli.runner.generate")
    monkeypatch.setattr(gen, "ATTEND_BUCKET", 8)
    folder, _ = tiny(arch)
    if spec is not None:
        folder = _convert(folder, tmp_path / "kbit", QuantSpec.parse(spec))
    for dtype in ("float32", "float16"):
        model, _, _ = load(folder, device="cuda", dtype=dtype)
        prompts = [_ids(6, 5), _ids(3, 6)]
        ref, r1, t1 = generate_ids(model, prompts, 20, eos_token_ids=[], pad_token_id=0, decode="dynamic")
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="kbit:")  # kbit's own fallback warnings
            got, r2, t2 = generate_ids(model, prompts, 20, eos_token_ids=[], pad_token_id=0)
        assert t2["decode_mode"] == "graph" and t2["graph_captures"] >= 3, t2
        if dtype == "float32":
            assert got == ref and r1 == r2
        else:  # float16: sums in other orders may flip a near tie late in the sequence
            assert got[0][:8] == ref[0][:8] and got[1][:8] == ref[1][:8]
        if spec is not None:
            assert all(m.fused_gemv for m in model.modules() if isinstance(m, KbitLinear) and m.layout == "out_in")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text", "granitemoe"])
def test_moe_decode_on_cuda(arch, tiny, cuda, tmp_path):
    """4-bit MoE models on the GPU: auto decodes dynamically (their expert grouping reads the
    host, no CUDA graphs), static steps give the same greedy tokens, and so does the CPU
    (gpt-oss, Llama 4 and Granite MoE: stacked experts, dequantized by rows on the GPU;
    DeepSeek-V3: the compressed latent KV cache)."""
    from kbitcli.runner import generate_ids, load
    folder, _ = tiny(arch)
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 64))
    gpu, _, _ = load(out, device="cuda", dtype="float32")
    cpu, _, _ = load(out, device="cpu", dtype="float32")
    prompts = [_ids(6, 5), _ids(3, 6)]
    got, _, tm = generate_ids(gpu, prompts, 8, eos_token_ids=[], pad_token_id=0)
    assert tm["decode_mode"] == "dynamic"
    st, _, tm = generate_ids(gpu, prompts, 8, eos_token_ids=[], pad_token_id=0, decode="static")
    assert tm["decode_mode"] == "static" and st == got
    assert generate_ids(cpu, prompts, 8, eos_token_ids=[], pad_token_id=0)[0] == got


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_projections_on_cuda(dtype, tiny, cuda, tmp_path):
    """q/k/v and gate/up fused into one CUDA GEMV each (load's default) against the separate
    layers: decode steps agree to float rounding and greedy generation (CUDA graphs) gives the
    same tokens."""
    from kbitcli.runner import generate_ids, load
    from kbitcli.runner.models.base import KVCache
    folder, _ = tiny("llama")
    out = _convert(folder, tmp_path / "kbit", QuantSpec(4, "nf", 64))
    fused, _, _ = load(out, device="cuda", dtype=dtype)
    plain, _, _ = load(out, device="cuda", dtype=dtype, fuse=False)
    assert fused.kbit_info["fused"] == 2 * fused.num_layers and plain.kbit_info["fused"] == 0
    ids = _ids(10, 9)
    tol = GPU_TOL if dtype == "float32" else 2e-2
    with torch.no_grad():
        steps = []
        for m in (fused, plain):
            cache = KVCache(m.num_layers)
            m(torch.tensor([ids[:6]], device=cuda), cache=cache)
            steps.append(torch.cat([m(torch.tensor([[t]], device=cuda), cache=cache)[0] for t in ids[6:]]).float())
    assert (steps[0] - steps[1]).abs().max().item() <= tol * steps[1].abs().max().item()
    prompts = [_ids(6, 10), _ids(4, 11)]
    assert generate_ids(fused, prompts, 8, eos_token_ids=[], pad_token_id=0)[0] == \
        generate_ids(plain, prompts, 8, eos_token_ids=[], pad_token_id=0)[0]
