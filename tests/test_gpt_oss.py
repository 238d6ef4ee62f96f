"""gpt-oss through the whole tool: its stacked (3-D) expert tensors through kbit quantize /
verify / inspect / dequantize and the fused conversion kernel, and checkpoints whose experts are
stored in MXFP4 (the released gpt-oss models) read as their values. References: transformers
(its logits, its own MXFP4 dequantization function convert_moe_packed_tensors) and the general
conversion path. The runner's logits are tested in test_runner.py (the "gpt_oss" tiny model)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kbitcli.cli.main import main
from kbitcli.errors import InputError
from kbitcli.runner import load
from kbitcli.sources import open_source
from kbitformat.io import KbitReader
from test_convert_fused import _convert as convert_spied, digests
from test_runner import _ids, make_tiny

torch.set_num_threads(2)
TOL = 1e-4
STACKED = ("experts.gate_up_proj", "experts.down_proj")


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt_oss")
    return d, make_tiny("gpt_oss", d)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _transformers(folder: Path):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_bfloat16_same_bits_as_transformers(tiny):
    """In bfloat16 the runner's logits equal transformers' bit for bit (its eager experts): the
    norms round after the weight, the sink softmax subtracts its maximum in bfloat16 first."""
    import transformers
    folder, _ = tiny
    hf = transformers.GptOssForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                        experts_implementation="eager").eval()
    model, _, _ = load(folder, dtype="bfloat16", fuse=False)
    ids = torch.tensor([_ids(12, 1)])
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


# ----------------------------------------------------------------------------- stacked experts
def test_cli_round_trip_of_stacked_experts(tiny, tmp_path, capsys):
    """quantize keeps the 3-D expert tensors 3-D (quantized along their last axis), verify
    --against measures their error, inspect shows them, dequantize writes them back in their shape:
    transformers loads the result, with the model's logits within 8-bit quantization error and
    the kbit runner's logits of the packed model; quantize --skip '*' then dequantize gives
    transformers' logits of the model."""
    folder, hf = tiny
    q, deq = tmp_path / "q", tmp_path / "deq"
    assert run(["quantize", folder, q, "-q", "--bits", "8"], capsys)[0] == 0
    code, out, _ = run(["verify", q, "--against", folder], capsys)
    assert code == 0 and "OK" in out
    code, out, _ = run(["verify", q, "--against", folder, "--json"], capsys)
    errors = json.loads(out)["errors"]
    assert all(0 < errors[f"model.layers.{i}.mlp.{n}"] < 0.03 for i in range(3) for n in STACKED)
    code, out, _ = run(["inspect", q, "--json"], capsys)
    recipes = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert recipes["model.layers.1.mlp.experts.down_proj"]["shape"] == [4, 32, 64]
    assert recipes["model.layers.1.mlp.experts.down_proj"]["bits"] == 8
    assert run(["dequantize", q, deq, "--dtype", "float32", "-q"], capsys)[0] == 0
    model = _transformers(deq)
    r, sd = KbitReader(q), model.state_dict()
    for name in r.names():
        assert np.array_equal(sd[name].numpy(), r.load(name)), name
    ids = _ids(12, 1)
    a, b = _logits(hf, ids), _logits(model, ids)
    assert ((a - b).norm() / a.norm()).item() < 0.1 and not torch.equal(a, b)
    runner, _, _ = load(q)  # the packed kbit model in kbit's runner: the dequantized model's logits
    with torch.no_grad():
        assert (runner(torch.tensor([ids]))[0] - b).abs().max().item() < TOL
    plain, deq2 = tmp_path / "plain", tmp_path / "deq2"
    assert run(["quantize", folder, plain, "-q", "--skip", "*"], capsys)[0] == 0
    assert run(["dequantize", plain, deq2, "--dtype", "float32", "-q"], capsys)[0] == 0
    assert (_logits(_transformers(deq2), ids) - a).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_conversion_of_stacked_experts(tiny, tmp_path, monkeypatch, dtype):
    """The fused CPU kernel takes the 3-D expert tensors and writes the bytes of the general path."""
    from kbitcli.recipe import Recipe
    from kbitformat import QuantSpec
    folder, _ = tiny
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.to(dtype) for k, v in load_file(str(folder / "model.safetensors")).items()},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((folder / "config.json").read_text())
    recipe = Recipe.build(QuantSpec(4, "int", 32))
    s1, calls = convert_spied(src, tmp_path / "fused", recipe, monkeypatch, True)
    s2, none = convert_spied(src, tmp_path / "ref", recipe, monkeypatch, False)
    assert calls == [True] * (3 * 2 + 3 * 4) and none == []  # the 6 stacked tensors among them
    got, want = digests(tmp_path / "fused"), digests(tmp_path / "ref")
    assert {n: d for n, d in got.items() if n != "README.md"} == {n: d for n, d in want.items() if n != "README.md"}
    assert [t.error for t in s1.tensors] == [t.error for t in s2.tensors]
    assert sum(len(t.shape) == 3 and t.quantized for t in s1.tensors) == 6


# ----------------------------------------------------------------------------- MXFP4 sources
def _mxfp4(shape_in_out: tuple[int, int, int], g: torch.Generator, lo: int = 118, hi: int = 127):
    """Random MXFP4 blocks and scales of a stacked tensor [E, in, out] (stored [E, out, in / 32, 16])."""
    E, i, o = shape_in_out
    blocks = torch.randint(0, 256, (E, o, i // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(lo, hi, (E, o, i // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def _write_mxfp4(folder: Path, tensors: dict, config: dict) -> None:
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}}))


def test_mxfp4_values_are_transformers_dequantization(tmp_path):
    """Random blocks and scales (every code, exponents from tiny to large) read as the values, in
    the layout, that transformers' own MXFP4 dequantization gives: float32 values and bfloat16 bits."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks, scales = _mxfp4((3, 96, 40), g, 1, 254)
    _write_mxfp4(tmp_path / "m", {"model.layers.0.mlp.experts.down_proj_blocks": blocks,
                                  "model.layers.0.mlp.experts.down_proj_scales": scales,
                                  "model.layers.0.mlp.experts.down_proj_bias": torch.ones(3, 40)}, {})
    with open_source(tmp_path / "m") as src:
        infos = {t.name: t for t in src.tensors()}
        name = "model.layers.0.mlp.experts.down_proj"
        assert set(infos) == {name, name + "_bias"}
        assert infos[name].shape == (3, 96, 40) and infos[name].dtype == "bfloat16"
        want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(torch.from_numpy(src.load(name)), want)
        bits = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16).view(torch.uint16).numpy()
        assert np.array_equal(src.load_raw(name), bits) and np.array_equal(src.raw_view(name), bits)


@pytest.mark.parametrize("drop,method,match", [
    ("model.layers.0.mlp.experts.down_proj_scales", "mxfp4", "needs uint8 blocks"),
    ("model.layers.0.mlp.experts.down_proj_blocks", "mxfp4", "no matching _blocks"),
    (None, "gptq", "already quantized"),
])
def test_mxfp4_bad_checkpoints_are_refused(tmp_path, drop, method, match):
    g = torch.Generator().manual_seed(1)
    blocks, scales = _mxfp4((2, 64, 32), g)
    t = {"model.layers.0.mlp.experts.down_proj_blocks": blocks, "model.layers.0.mlp.experts.down_proj_scales": scales}
    t.pop(drop, None)
    _write_mxfp4(tmp_path / "m", t, {})
    if method != "mxfp4":
        cfg = json.loads((tmp_path / "m" / "config.json").read_text())
        cfg["quantization_config"]["quant_method"] = method
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=match):
        open_source(tmp_path / "m")


@pytest.fixture(scope="module")
def mxfp4_model(tiny, tmp_path_factory):
    """The tiny gpt-oss with its experts in the MXFP4 layout of a released checkpoint, and the same
    model in transformers with the experts set to transformers' dequantization of those blocks."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    folder, hf = tiny
    d = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    g = torch.Generator().manual_seed(2)
    tensors, ref = {}, {}
    for name, t in load_file(str(folder / "model.safetensors")).items():
        if name.endswith(STACKED):
            blocks, scales = _mxfp4(tuple(t.shape), g, 122, 125)  # values up to 6 / 8: a working model
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            ref[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            tensors[name] = t
    _write_mxfp4(d / "m", tensors, json.loads((folder / "config.json").read_text()))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / "m" / f).write_bytes((folder / f).read_bytes())
    model = _transformers(folder)
    missing, unexpected = model.load_state_dict(ref, strict=False)
    assert not unexpected and len(missing) == len(model.state_dict()) - len(ref)
    return d / "m", model


def test_mxfp4_checkpoint_runs_quantizes_and_dequantizes(mxfp4_model, tmp_path, capsys):
    """A checkpoint in the MXFP4 layout: the runner gives transformers' logits of its values;
    quantize --skip '*' then dequantize gives a plain checkpoint with the same logits in
    transformers; a 4-bit quantize runs in kbit generate."""
    folder, ref = mxfp4_model
    ids = _ids(12, 1)
    want = _logits(ref, ids)
    model, _, _ = load(folder)
    with torch.no_grad():
        assert (model(torch.tensor([ids]))[0] - want).abs().max().item() < TOL
    plain, deq = tmp_path / "plain", tmp_path / "deq"
    assert run(["quantize", folder, plain, "-q", "--skip", "*"], capsys)[0] == 0
    assert run(["dequantize", plain, deq, "--dtype", "float32", "-q"], capsys)[0] == 0
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    assert (_logits(_transformers(deq), ids) - want).abs().max().item() < TOL
    q = tmp_path / "q"
    assert run(["quantize", folder, q, "-q", "--bits", "4"], capsys)[0] == 0
    assert all(KbitReader(q).is_quantized(f"model.layers.{i}.mlp.{n}") for i in range(3) for n in STACKED)
    code, out, _ = run(["generate", q, "-p", "t5 t6 t7", "-n", "4", "--device", "cpu"], capsys)
    assert code == 0 and out.strip()


# ----------------------------------------------------------------------------- config.json
def test_config_defaults_are_gptossconfigs():
    """A config.json without the optional keys (and the released checkpoints' older rope_scaling
    spelling) gives the runner GptOssConfig's values; a bad expert count is a clear error."""
    import transformers
    from kbitcli.runner.models.gpt_oss import ModelArgs
    sizes = dict(hidden_size=64, intermediate_size=32, num_hidden_layers=5, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
    ref = transformers.GptOssConfig(**sizes)
    full = ModelArgs.from_config(ref.to_dict())
    bare = ModelArgs.from_config({**sizes, "model_type": "gpt_oss"})
    assert bare == full
    assert bare.layer_types == ref.layer_types and bare.head_dim == ref.head_dim == 64
    assert (bare.num_local_experts, bare.num_experts_per_tok, bare.sliding_window) == (128, 4, 128)
    assert [bare.window(i) for i in range(5)] == [128, None, 128, None, 128]
    rope = dict(ref.rope_parameters)
    theta = rope.pop("rope_theta")
    released = ModelArgs.from_config({**sizes, "model_type": "gpt_oss", "rope_scaling": rope, "rope_theta": theta})
    assert released.rope == full.rope and full.rope["rope_type"] == "yarn" and full.rope["truncate"] is False
    with pytest.raises(InputError, match="num_experts_per_tok"):
        ModelArgs.from_config({**sizes, "num_local_experts": 2, "num_experts_per_tok": 3})
    with pytest.raises(InputError, match="layer_types"):
        ModelArgs.from_config({**sizes, "layer_types": ["full_attention"]})


def test_default_recipe_quantizes_stacked_experts():
    """The stacked experts (gpt-oss, Llama 4) are quantized by name and dimensions; their biases,
    gpt-oss's router and sinks, and other 3-D tensors are kept."""
    from kbitcli.recipe import Recipe
    from kbitformat import QuantSpec
    recipe = Recipe.build(QuantSpec(4, "nf", 64))
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "language_model.model.layers.2.feed_forward.experts.gate_up_proj",
                 "model.layers.3.mlp.experts.gate_proj", "model.layers.3.mlp.experts.up_proj"):
        assert recipe.spec_for(name, (4, 64, 128), True) is not None, name
    for name, shape in (("model.layers.0.mlp.experts.gate_up_proj_bias", (4, 128)),
                        ("model.layers.0.mlp.router.weight", (4, 64)), ("model.layers.0.mlp.router.bias", (4,)),
                        ("model.layers.0.self_attn.sinks", (8,)), ("model.layers.0.mlp.experts.gate_up_proj", (4, 64)),
                        ("model.layers.0.conv.weight", (4, 64, 3)), ("model.experts.down_proj", (4, 64, 128))):
        assert recipe.spec_for(name, shape, True) is None, name
