"""kbitcli.sources: every source kind yields the same tensors; every broken input is an InputError;
the GGUF reader matches transformers' own GGUF loader tensor for tensor, config and tokenizer."""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kbitcli.errors import InputError, UnsupportedArchitectureError
from kbitcli.sources import SourceTensor, embedded_model_path, open_source
from kbitcli.sources.gguf_source import permute_qk, unpermute_qk
from hf_reference import transformers_gguf_model

# ---------------------------------------------------------------------------------------------
# a small checkpoint with mixed dtypes


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.0e38, -3.0e38, 1e-40, float("inf"), -float("inf")])
    gate = torch.randn(12, 8, generator=g)
    gate.view(-1)[: special.numel()] = special
    return {
        "model.embed_tokens.weight": torch.randn(32, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.float16),
        "model.layers.0.self_attn.k_proj.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.mlp.gate_proj.weight": gate.to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=torch.float32),
        "model.layers.1.mlp.down_proj.weight": torch.randn(8, 12, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(32, 8, generator=g),
        "model.rotary.step": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "model.quant.codes": torch.tensor([[1, -2, 127], [-128, 0, 5]], dtype=torch.int8),
    }


STATE = _state()
INT_NAMES = {"model.rotary.step", "model.quant.codes"}
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}


def _expected(name: str) -> np.ndarray:
    return STATE[name].float().numpy()


def _side_files(d: Path) -> None:
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "tokenizer.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")


def _split(state: dict) -> tuple[dict, dict]:
    names = list(state)
    return {n: state[n] for n in names[:5]}, {n: state[n] for n in names[5:]}


def make_st_dir(tmp: Path) -> Path:
    d = tmp / "st-dir"
    d.mkdir()
    save_file(STATE, str(d / "model.safetensors"))
    _side_files(d)
    return d


def make_st_sharded(tmp: Path) -> Path:
    d = tmp / "st-sharded"
    d.mkdir()
    a, b = _split(STATE)
    files = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(a, str(d / files[0]))
    save_file(b, str(d / files[1]))
    wm = {n: files[0] for n in a} | {n: files[1] for n in b}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _side_files(d)
    return d


def make_st_shards_no_index(tmp: Path) -> Path:
    d = make_st_sharded(tmp)
    (d / "model.safetensors.index.json").unlink()
    return d


def make_st_file(tmp: Path) -> Path:
    d = tmp / "st-file"
    d.mkdir()
    save_file(STATE, str(d / "weights.safetensors"))
    return d / "weights.safetensors"


def make_bin(tmp: Path) -> Path:
    d = tmp / "bin"
    d.mkdir()
    torch.save(STATE, d / "pytorch_model.bin")
    _side_files(d)
    return d


def make_bin_sharded(tmp: Path) -> Path:
    d = tmp / "bin-sharded"
    d.mkdir()
    a, b = _split(STATE)
    files = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
    torch.save(a, d / files[0])
    torch.save(b, d / files[1])
    wm = {n: files[0] for n in a} | {n: files[1] for n in b}
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    _side_files(d)
    return d


def make_bin_legacy(tmp: Path) -> Path:
    d = tmp / "bin-legacy"
    d.mkdir()
    torch.save(STATE, d / "model.pt", _use_new_zipfile_serialization=False)
    return d / "model.pt"


MAKERS = {
    "safetensors-dir": (make_st_dir, "safetensors-dir"),
    "safetensors-sharded": (make_st_sharded, "safetensors-dir"),
    "safetensors-shards-no-index": (make_st_shards_no_index, "safetensors-dir"),
    "safetensors-file": (make_st_file, "safetensors-file"),
    "bin": (make_bin, "torch-bin"),
    "bin-sharded": (make_bin_sharded, "torch-bin"),
    "bin-legacy-format": (make_bin_legacy, "torch-bin"),
}


@pytest.mark.parametrize("maker", list(MAKERS))
def test_every_kind_gives_identical_tensors(tmp_path, maker):
    make, kind = MAKERS[maker]
    with open_source(make(tmp_path)) as src:
        assert src.kind == kind
        infos = {t.name: t for t in src.tensors()}
        assert set(infos) == set(STATE)
        for name, t in STATE.items():
            info = infos[name]
            assert isinstance(info, SourceTensor)
            assert info.shape == tuple(t.shape)
            assert info.dtype == str(t.dtype).removeprefix("torch.")
            assert info.nbytes == t.numel() * t.element_size()
            assert info.is_float == (name not in INT_NAMES)
            if name in INT_NAMES:
                with pytest.raises(InputError, match=name.replace(".", r"\.")):
                    src.load(name)
                raw = src.load_raw(name)
                assert raw.dtype == t.numpy().dtype
                np.testing.assert_array_equal(raw, t.numpy())
                continue
            got = src.load(name)
            assert got.dtype == np.float32 and got.flags.c_contiguous and got.flags.writeable
            np.testing.assert_array_equal(got, _expected(name))  # bit-exact, inf included
            raw = src.load_raw(name)
            if t.dtype == torch.bfloat16:
                assert raw.dtype == np.uint16
                np.testing.assert_array_equal(raw, t.view(torch.int16).numpy().view(np.uint16))
            else:
                np.testing.assert_array_equal(raw, t.numpy())
        assert src.total_bytes() == sum(t.numel() * t.element_size() for t in STATE.values())
        with pytest.raises(InputError, match="no tensor named"):
            src.load("model.nope")


@pytest.mark.parametrize("maker", ["safetensors-dir", "safetensors-sharded", "bin", "bin-sharded"])
def test_folder_config_and_extra_files(tmp_path, maker):
    d = MAKERS[maker][0](tmp_path)
    src = open_source(d)
    assert src.config() == CONFIG
    extra = src.extra_files()
    assert set(extra) == {"tokenizer.json", "generation_config.json"}
    assert all(isinstance(p, Path) and p.parent == d for p in extra.values())


def test_single_file_config_only_when_beside(tmp_path):
    f = make_st_file(tmp_path)
    assert open_source(f).config() is None
    assert open_source(f).extra_files() == {}
    (f.parent / "config.json").write_text(json.dumps(CONFIG))
    assert open_source(f).config() == CONFIG


def test_tensor_order_follows_the_file(tmp_path):
    from kbitcli.sources.safetensors_source import parse_header

    f = make_st_file(tmp_path)
    _, entries = parse_header(f)
    assert [t.name for t in open_source(f).tensors()] == [e[0] for e in entries]
    begins = [e[3] for e in entries]
    assert begins == sorted(begins)


def test_matches_safetensors_library(tmp_path):
    from safetensors import safe_open

    d = make_st_sharded(tmp_path)
    src = open_source(d)
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as so:
            for name in so.keys():
                t = so.get_tensor(name)
                if t.is_floating_point():
                    np.testing.assert_array_equal(src.load(name), t.float().numpy())


def test_float8_tensors(tmp_path):
    st = {"a": torch.randn(4, 4).to(torch.float8_e4m3fn), "b": torch.randn(3).to(torch.float8_e5m2)}
    save_file(st, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    assert [t.dtype for t in src.tensors()] == ["float8_e4m3fn", "float8_e5m2"]
    for n, t in st.items():
        np.testing.assert_array_equal(src.load(n), t.float().numpy())
        assert src.load_raw(n).dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# refused and broken inputs


class _Evil:
    """Unpickling this would create a file: proof that no code ran."""

    marker: str = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bin_with_python_objects_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    torch.save({"w": torch.ones(2), "obj": evil}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="arbitrary Python objects") as e:
        open_source(tmp_path)
    assert "refuses to unpickle" in str(e.value)
    assert not marker.exists()


class Custom:
    def __init__(self):
        self.x = 1


def test_bin_with_custom_class_is_refused(tmp_path):
    torch.save({"w": torch.ones(2), "cfg": Custom()}, tmp_path / "model.bin")
    with pytest.raises(InputError, match="arbitrary Python objects"):
        open_source(tmp_path / "model.bin")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path):
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump({"w": Custom()}, f)
    with pytest.raises(InputError, match="arbitrary Python objects"):
        open_source(tmp_path / "model.pt")


def _peak_bytes(fn) -> int:
    """Peak of numpy/Python allocations while fn runs (memory-mapped file pages are not counted)."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del out
    return peak


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_safetensors_memory_is_one_tensor(tmp_path, dtype):
    n = 1 << 21  # 8 MB as float32
    st = {f"t{i}": torch.full((n // 1024, 1024), float(i), dtype=dtype) for i in range(6)}
    save_file(st, str(tmp_path / "model.safetensors"))
    src = _peak_bytes(lambda: open_source(tmp_path))
    assert src < 1 << 20  # opening reads headers only
    s = open_source(tmp_path)
    assert _peak_bytes(lambda: s.load("t3")) < 1.3 * n * 4
    assert s.load("t3")[0, 0] == 3.0


def test_truncated_bin(tmp_path):
    d = make_bin(tmp_path)
    f = d / "pytorch_model.bin"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        open_source(d)


def test_bin_index_names_missing_shard(tmp_path):
    d = make_bin_sharded(tmp_path)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(InputError, match="pytorch_model-00002-of-00002.bin"):
        open_source(d)


def test_truncated_safetensors_shard(tmp_path):
    d = make_st_sharded(tmp_path)
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated") as e:
        open_source(d)
    assert f.name in str(e.value)


def test_safetensors_cut_inside_header(tmp_path):
    f = make_st_file(tmp_path)
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(InputError, match="corrupt safetensors header"):
        open_source(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(InputError, match="truncated"):
        open_source(f)


def test_index_names_missing_shard(tmp_path):
    d = make_st_sharded(tmp_path)
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="model-00001-of-00002.safetensors"):
        open_source(d)


def test_missing_shard_without_index(tmp_path):
    d = make_st_shards_no_index(tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match=r"missing: model-00002-of-00002\.safetensors"):
        open_source(d)


def test_index_names_tensor_the_shard_lacks(tmp_path):
    d = make_st_sharded(tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InputError, match="model.ghost.weight"):
        open_source(d)


def test_bad_index_json(tmp_path):
    d = make_st_sharded(tmp_path)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        open_source(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": []}))
    with pytest.raises(InputError, match="weight_map"):
        open_source(d)


def _write_st(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    n = len(header) if length is None else length
    path.write_bytes(n.to_bytes(8, "little") + header + data)
    return path


@pytest.mark.parametrize(
    "header,data,length,message",
    [
        (b"{}", b"", 1 << 40, "claims a"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', b"\0" * 8, None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, None, "truncated"),
        (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', b"\0" * 8, None, "needs 16 bytes"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', b"\0" * 8, None, "bad offsets"),
        (b'{"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}', b"\0" * 8, None, "bad entry"),
        (b'{"a": {"shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, None, "bad entry"),
        (b"\xff\xfe{}", b"", None, "not valid JSON"),
    ],
)
def test_corrupt_safetensors_header(tmp_path, header, data, length, message):
    f = _write_st(tmp_path / "m.safetensors", header, data, length)
    with pytest.raises(InputError, match=message):
        open_source(f)


def test_unknown_safetensors_dtype(tmp_path):
    f = _write_st(tmp_path / "m.safetensors", b'{"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}', b"\0")
    src = open_source(f)
    assert src.tensor("a").dtype == "F4" and not src.tensor("a").is_float
    with pytest.raises(InputError, match="'a'"):
        src.load("a")
    with pytest.raises(InputError, match="'a'"):
        src.load_raw("a")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="no model weights"):
        open_source(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no model weights"):
        open_source(empty)


def test_folder_with_other_torch_file(tmp_path):
    torch.save({"w": torch.ones(2, 2)}, tmp_path / "model.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "optimizer.pt")
    src = open_source(tmp_path)
    assert src.kind == "torch-bin" and [t.name for t in src.tensors()] == ["w"]
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="several PyTorch files"):
        open_source(tmp_path)


def test_missing_path_and_unknown_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "nope")
    (tmp_path / "weights.dat").write_bytes(os.urandom(64))
    with pytest.raises(InputError, match="unknown checkpoint format"):
        open_source(tmp_path / "weights.dat")


def test_bad_config_json(tmp_path):
    d = make_st_dir(tmp_path)
    (d / "config.json").write_text("{oops")
    with pytest.raises(InputError, match="config"):
        open_source(d).config()


# ---------------------------------------------------------------------------------------------
# GGUF, synthetic: written here with gguf.GGUFWriter the way llama.cpp's converter does


def test_permute_roundtrip():
    w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
    for n in (1, 2, 3, 6, 12):
        p = permute_qk(w, n)
        assert not np.array_equal(p, w) or n == 12
        np.testing.assert_array_equal(unpermute_qk(p, n), w)
    b = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(b, 3), 3), b)


def _tiny_llama_gguf(path: Path, arch: str = "llama", tied: bool = False, n_layer: int = 2) -> dict[str, np.ndarray]:
    import gguf

    rng = np.random.default_rng(1)
    hidden, heads, kv_heads, ffn, vocab = 16, 4, 2, 24, 40
    hd = hidden // heads
    hf: dict[str, np.ndarray] = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden), dtype=np.float32)}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.context_length", 256)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", ffn)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", 500000.0)
    w.add_uint32(f"{arch}.rope.dimension_count", hd)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    for i in range(n_layer):
        p = f"model.layers.{i}."
        parts = {
            "attn_q": ("self_attn.q_proj", (heads * hd, hidden)),
            "attn_k": ("self_attn.k_proj", (kv_heads * hd, hidden)),
            "attn_v": ("self_attn.v_proj", (kv_heads * hd, hidden)),
            "attn_output": ("self_attn.o_proj", (hidden, heads * hd)),
            "ffn_gate": ("mlp.gate_proj", (ffn, hidden)),
            "ffn_up": ("mlp.up_proj", (ffn, hidden)),
            "ffn_down": ("mlp.down_proj", (hidden, ffn)),
            "attn_norm": ("input_layernorm", (hidden,)),
            "ffn_norm": ("post_attention_layernorm", (hidden,)),
        }
        for g, (h, shape) in parts.items():
            t = rng.standard_normal(shape, dtype=np.float32)
            hf[p + h + ".weight"] = t
            if g == "attn_q":
                t = permute_qk(t, heads)
            elif g == "attn_k":
                t = permute_qk(t, kv_heads)
            if g == "ffn_up":  # store one tensor as F16 to cover that path
                hf[p + h + ".weight"] = t.astype(np.float16).astype(np.float32)
                t = t.astype(np.float16)
            w.add_tensor(f"blk.{i}.{g}.weight", t)
    hf["model.norm.weight"] = rng.standard_normal(hidden, dtype=np.float32)
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        hf["lm_head.weight"] = rng.standard_normal((vocab, hidden), dtype=np.float32)
        w.add_tensor("output.weight", hf["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_gguf_roundtrip(tmp_path, tied):
    hf = _tiny_llama_gguf(tmp_path / "tiny.gguf", tied=tied)
    src = open_source(tmp_path / "tiny.gguf")
    assert src.kind == "gguf"
    assert {t.name for t in src.tensors()} == set(hf)
    for t in src.tensors():
        assert t.shape == hf[t.name].shape
        np.testing.assert_array_equal(src.load(t.name), hf[t.name])
        # as stored (what `kbit quantize` keeps or quantizes from): un-permuted too
        np.testing.assert_array_equal(src.load_raw(t.name).astype(np.float32), hf[t.name])
    cfg = src.config()
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 4)
    assert cfg["rope_theta"] == 500000.0 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["max_position_embeddings"] == 256 and cfg["vocab_size"] == 40
    # no tokenizer in this file: a clear error, not a traceback
    with pytest.raises(InputError, match="no tokenizer"):
        src.extra_files()
    # a folder holding one GGUF opens it
    assert open_source(tmp_path).kind == "gguf"


def test_gguf_unsupported_architecture(tmp_path):
    _tiny_llama_gguf(tmp_path / "x.gguf", arch="mamba", n_layer=1)
    with pytest.raises(UnsupportedArchitectureError, match="supported: llama"):
        open_source(tmp_path / "x.gguf")


def test_gguf_truncated(tmp_path):
    _tiny_llama_gguf(tmp_path / "t.gguf")
    data = (tmp_path / "t.gguf").read_bytes()
    for cut in (3, 40, len(data) - 100):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(InputError):
            open_source(tmp_path / "cut.gguf")


def test_embedded_model_path(monkeypatch):
    import importlib.util

    p = embedded_model_path()
    assert p.is_file() and p.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(InputError, match="scripts/setup.sh"):
        embedded_model_path()


# ---------------------------------------------------------------------------------------------
# GGUF, real: SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embedding) against transformers


@pytest.fixture(scope="module")
def smol():
    return open_source(embedded_model_path())


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = embedded_model_path()
    model = transformers_gguf_model(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_every_tensor_matches_transformers(smol, reference):
    model, _ = reference
    sd = model.state_dict()
    ours = {t.name: t for t in smol.tensors()}
    assert smol.warnings == []
    assert set(ours) | {"lm_head.weight"} == set(sd)
    assert "lm_head.weight" not in ours  # tied
    dtypes = {}
    for name, info in ours.items():
        got = smol.load(name)
        want = sd[name].float().numpy()
        assert got.shape == want.shape == info.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
        dtypes.setdefault(info.dtype, []).append(name)
    assert set(dtypes) == {"Q4_1", "Q8_0", "float32"}
    assert dtypes["Q8_0"] == ["model.embed_tokens.weight"]
    assert all(n.endswith("norm.weight") for n in dtypes["float32"])
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), smol.load("model.embed_tokens.weight"))


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smol, reference):
    model, _ = reference
    ref = model.config
    cfg = smol.config()
    assert cfg["model_type"] == ref.model_type == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id", "head_dim"):
        assert cfg[key] == getattr(ref, key), key
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)
    ref_theta = getattr(ref, "rope_theta", None) or ref.rope_parameters["rope_theta"]
    assert cfg["rope_theta"] == ref_theta
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (576, 30, 9, 3, 1536, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    assert cfg["rms_norm_eps"] == 1e-5


@pytest.mark.slow
def test_smollm2_rebuilt_model_gives_same_logits(smol, reference):
    """Our config + our tensors, loaded into a fresh transformers model, compute what the reference does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model, tokenizer = reference
    cfg = smol.config()
    mine = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    state = {t.name: torch.from_numpy(smol.load(t.name)) for t in smol.tensors()}
    result = mine.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    mine.tie_weights()
    ids = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        a = mine(ids).logits
        b = model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


TEXTS = [
    "Hello world! How are you today?",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "naïve café, Zürich, Ελληνικά, русский текст, 日本語のテキスト, 한국어, emoji 🤖🚀👍🏽",
    "   leading spaces, trailing spaces   \n\n\n\ttabs\t\tand   runs      of     whitespace  \r\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say it's fine; we've done it, hadn't we? DON'T SHOUT",
    "x=[1,2,3];y={'a':b}//comment /* c */ <html><body>&amp;</body></html>",
    "",
    " ",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def rebuilt(smol, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-tok")
    for name, content in smol.extra_files().items():
        assert isinstance(content, bytes)
        (d / name).write_bytes(content)
    return d


@pytest.mark.slow
def test_smollm2_tokenizer_encodes_like_transformers(rebuilt, reference):
    from tokenizers import Tokenizer

    _, ref = reference
    tok = Tokenizer.from_file(str(rebuilt / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) == 49152
    for text in TEXTS:
        want = ref(text, add_special_tokens=False).input_ids
        assert tok.encode(text, add_special_tokens=False).ids == want, text
        assert tok.encode(text).ids == ref(text).input_ids, text
        assert tok.decode(want, skip_special_tokens=False) == ref.decode(want), text
    # special tokens stay whole
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>").ids == [1, 2, 0]


@pytest.mark.slow
def test_smollm2_tokenizer_files_load_in_transformers(rebuilt, reference):
    from transformers import AutoTokenizer

    _, ref = reference
    cfg = json.loads((rebuilt / "tokenizer_config.json").read_text())
    assert cfg["chat_template"].startswith("{% for message in messages %}")
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert json.loads((rebuilt / "generation_config.json").read_text())["eos_token_id"] == 2
    mine = AutoTokenizer.from_pretrained(rebuilt)
    for text in TEXTS:
        assert mine(text).input_ids == ref(text).input_ids, text
    assert (mine.bos_token_id, mine.eos_token_id, mine.pad_token_id) == (1, 2, 2)
    chat = [{"role": "user", "content": "Hi there! 2+2=?"}]
    a = mine.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    b = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert a == b
    assert mine(a, add_special_tokens=False).input_ids == ref(b, add_special_tokens=False).input_ids


def test_smollm2_metadata_is_cheap(smol):
    infos = smol.tensors()
    assert len(infos) == 272
    assert smol.total_bytes() == sum(t.nbytes for t in infos)
    assert smol.total_bytes() < embedded_model_path().stat().st_size
    q = smol.tensor("model.layers.0.self_attn.q_proj.weight")
    assert (q.shape, q.dtype) == ((576, 576), "Q4_1")
    k = smol.tensor("model.layers.0.self_attn.k_proj.weight")
    assert k.shape == (192, 576)
    assert smol.tensor("model.layers.0.mlp.gate_proj.weight").shape == (1536, 576)
    assert smol.tensor("model.layers.0.mlp.down_proj.weight").shape == (576, 1536)
    assert smol.tensor("model.embed_tokens.weight").shape == (49152, 576)
    raw = smol.load_raw("model.layers.0.self_attn.q_proj.weight")
    assert raw.dtype == np.uint8 and raw.shape == (576, 576 // 32 * 20)


def test_smollm2_memory_is_one_tensor(smol):
    shape = smol.tensor("model.embed_tokens.weight").shape
    assert _peak_bytes(lambda: smol.load("model.embed_tokens.weight")) < 1.3 * shape[0] * shape[1] * 4


def test_gguf_copy_in_folder(tmp_path):
    """A folder holding only the GGUF opens as GGUF; two GGUFs are ambiguous."""
    src = embedded_model_path()
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(src, d / "a.gguf")
    assert open_source(d).kind == "gguf"
    os.symlink(src, d / "b.gguf")
    with pytest.raises(InputError, match="several GGUF"):
        open_source(d)


# ---------------------------------------------------------------------------------------------
# GGUF tokenizers, synthetic: train a small byte-level BPE the way each model family builds its
# tokenizer.json, store it in a GGUF as llama.cpp does, and check the rebuilt one encodes alike


_CORPUS = [
    "The year 2024 had 366 days; 1234567 + 89 = 1234656. Prices: $3.99, €12,50.",
    "def add(a, b):\n    return a + b  # 42\n\nclass Foo:\n    pass\n",
    "naïve café Zürich Ελληνικά русский 日本語 한국어 🤖🚀 I'm we'll they've DON'T",
    "   spaces   and\ttabs\n\n\nnewlines\r\n end",
] * 20


def _original_tokenizer(family: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from kbitcli.sources.gguf_tokenizer import _LLAMA3_SPLIT

    tok = Tokenizer(models.BPE())
    if family == "qwen2":  # as transformers' Qwen2 tokenizer builds it (its regex, NFC)
        from tokenizers import normalizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif family == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif family == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|begin|>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    if family == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin|> $A", pair="<|begin|> $A <|begin|>:1 $B:1", special_tokens=[("<|begin|>", 0)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _add_bpe_tokenizer(w, tok, pre: str, add_bos: bool) -> int:
    """Store a byte-level BPE tokenizer in the GGUF writer `w` as llama.cpp's converter does
    (<|...|> tokens as control tokens, BOS 0, EOS 1); returns the vocabulary size."""
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(add_bos)
    return len(vocab)


def _gguf_with_tokenizer(path: Path, tok, pre: str, add_bos: bool) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    n = _add_bpe_tokenizer(w, tok, pre, add_bos)
    _add_tiny_llama(w, n)


def _add_tiny_llama(w, n: int) -> None:
    """A 1-layer, 8-wide Llama of vocabulary n into the GGUF writer `w`, and write the file."""
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 8),
                 ("feed_forward_length", 8), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{k}", v)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((n, 8), dtype=np.float32))
    for g, shape in (("attn_q", (8, 8)), ("attn_k", (8, 8)), ("attn_v", (8, 8)), ("attn_output", (8, 8)),
                     ("ffn_gate", (8, 8)), ("ffn_up", (8, 8)), ("ffn_down", (8, 8)),
                     ("attn_norm", (8,)), ("ffn_norm", (8,))):
        w.add_tensor(f"blk.0.{g}.weight", rng.standard_normal(shape, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family,pre,add_bos", [
    ("llama3", "llama-bpe", True), ("digits", "smollm", False), ("gpt2", "gpt-2", False), ("qwen2", "qwen2", False),
    ("digits", "command-r", False),  # llama.cpp splits Command-R's text as StarCoder's and SmolLM's
])
def test_rebuilt_tokenizer_matches_original(tmp_path, family, pre, add_bos):
    from tokenizers import Tokenizer

    original = _original_tokenizer(family)
    _gguf_with_tokenizer(tmp_path / "m.gguf", original, pre, add_bos)
    src = open_source(tmp_path / "m.gguf")
    rebuilt = Tokenizer.from_str(src.extra_files()["tokenizer.json"].decode())
    assert src.warnings == []
    texts = _CORPUS[:4] + ["Numbers 1 22 333 4444 55555 and 3.14159", "<|begin|>x<|end|>", "", "  ",
                           "cafe\u0301 vs caf\u00e9 (NFD and NFC)"]
    for text in texts:
        for special in (False, True):
            assert rebuilt.encode(text, add_special_tokens=special).ids == \
                original.encode(text, add_special_tokens=special).ids, (text, special)
        ids = original.encode(text).ids
        assert rebuilt.decode(ids) == original.decode(ids)
    cfg = json.loads(src.extra_files()["tokenizer_config.json"])
    assert cfg["add_bos_token"] is add_bos and cfg["bos_token"] == "<|begin|>" and cfg["eos_token"] == "<|end|>"


def test_unknown_pre_tokenizer_warns(tmp_path):
    _gguf_with_tokenizer(tmp_path / "m.gguf", _original_tokenizer("gpt2"), "some-future-model", False)
    src = open_source(tmp_path / "m.gguf")
    src.extra_files()
    assert any("some-future-model" in w for w in src.warnings)


# Text that tells the families' splits apart: digit runs of 1, 3, 4 and more digits, contractions
# ('s 'll 'RE), CamelCase, punctuation runs, a slash before a newline, runs of spaces, tabs and
# newlines, CJK, kana, Hangul, full-width punctuation, accented Latin, emoji and mixed scripts.
_PRE_CORPUS = [
    "Call 7, 123, 4567 or 1234567890 now! It's John's; we'll see. THEY'RE HERE'S iPhone McDonald XMLHttpRequest",
    "path/to/file/\nfoo(bar)...!!! ?? --> a+=b;  {x: [1,2]}\t\t\ttab  \n\n  \n",
    "東京は日本の首都です。ひらがなとカタカナ！서울은 한국의 수도입니다。（全角）“quote”",
    "Ça a été très façile — naïve Ångström ÉCOLE élève 😀👍🏽 x²+y³ Ελληνικά ΑΒΓ русский ТЕКСТ",
    "mixed日本語text한국어123abc😀DEF ,.,; 'tis 'S",
]

# Each family's pre-tokenizer (and normalizer) as the original models' tokenizer.json holds it:
# (normalizer, pre_tokenizer, the BPE model's ignore_merges), with the llama.cpp names it stands for.
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_GPT2_BYTES = dict(_BYTES, use_regex=True)


def _isolated(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _seq(*steps) -> dict:
    return {"type": "Sequence", "pretokenizers": list(steps)}


_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CJK_RUNS = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_ORIGINALS = {
    # Mistral NeMo's tokenizer.json (tekken.json's pattern)
    "tekken": (None, _seq(_isolated(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
        r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"), _BYTES), True, ["tekken"]),
    # o200k's pattern: gpt-oss, Phi-4 (Xenova/gpt-4o), Llama 4
    "gpt-4o": (None, _seq(_isolated(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"), _BYTES), False, ["gpt-4o", "llama4"]),
    # DeepSeek-V3 / R1
    "deepseek-v3": (None, _seq(
        _isolated(r"\p{N}{1,3}"), _isolated("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
        _isolated("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
                  "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"), _BYTES), False, ["deepseek-v3"]),
    # DeepSeek LLM 7B/67B: its letter class lists the cased letters (Lu, Ll, Lt) of Unicode
    "deepseek-llm": (None, _seq(
        _isolated("[\r\n]"),
        _isolated(
            "\\s?[A-Za-z\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293\u0295-\u02AF"
            "\u0370-\u0373\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C\u038E-\u03A1\u03A3-\u03F5"
            "\u03F7-\u0481\u048A-\u052F\u0531-\u0556\u10A0-\u10C5\u13A0-\u13F5\u13F8-\u13FD\u1C90-\u1CBA"
            "\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77\u1D79-\u1D9A\u1E00-\u1F15\u1F18-\u1F1D\u1F20-\u1F45"
            "\u1F48-\u1F4D\u1F50-\u1F57\u1F59\u1F5B\u1F5D\u1F5F-\u1F7D\u1F80-\u1FB4\u1FB6-\u1FBC\u1FBE"
            "\u1FC2-\u1FC4\u1FC6-\u1FCC\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-\u1FF4\u1FF6-\u1FFC\u2102"
            "\u2107\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D\u212F-\u2134\u2139"
            "\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4\u2CEB-\u2CEE\u2CF2\u2CF3"
            "\uA640-\uA66D\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E\uAB70-\uABBF\uFB00-\uFB06"
            "\uFB13-\uFB17\uFF21-\uFF3A\uFF41-\uFF5A\U00010400-\U0001044F\U000104B0-\U000104D3"
            "\U000104D8-\U000104FB\U00010C80-\U00010CB2\U00010CC0-\U00010CF2\U000118A0-\U000118DF"
            "\U0001E900-\U0001E943]+"),
        _isolated("\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"), _isolated("\\s+$"),
        _isolated(_CJK_RUNS), {"type": "Digits", "individual_digits": True}, _BYTES), False, ["deepseek-llm"]),
    "deepseek-coder": (None, _seq(
        _isolated("[\r\n]"), _isolated("\\s?\\p{L}+"), _isolated("\\s?\\p{P}+"), _isolated(_CJK_RUNS),
        {"type": "Digits", "individual_digits": True}, _BYTES), False, ["deepseek-coder"]),
    # GLM-4 (-hf), GLM-4.5: Llama 3's regex, merges always applied
    "glm4": (None, _seq(_isolated(_LLAMA3_RE), _BYTES), False, ["glm4", "chatglm-bpe"]),
    # Pixtral 12B's tokenizer.json: Llama 3's (see test_pixtral_pre_tokenizer_warns)
    "llama3": (None, _seq(_isolated(_LLAMA3_RE), _BYTES), True, ["pixtral"]),
    # EXAONE 3.x: digits one by one, then GPT-2's; EXAONE 4: GPT-2's
    "exaone": (None, _seq({"type": "Digits", "individual_digits": True}, _GPT2_BYTES), False, ["exaone"]),
    "exaone4": (None, _GPT2_BYTES, False, ["exaone4"]),
    # DeepSeek-R1-Distill-Qwen: Qwen2.5's; StableLM 2's (Arcade100k) and Hunyuan's tiktoken tokenizers
    # split with Qwen's pattern after NFC too
    "deepseek-r1-qwen": ({"type": "NFC"}, _seq(_isolated(_LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")), _BYTES),
                         False, ["deepseek-r1-qwen", "stablelm2", "hunyuan"]),
    # Kimi K2: tiktoken (whole words looked up first), with tokenization_kimi.py's pattern
    "kimi-k2": (None, _seq(_isolated(
        r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"), _BYTES), True, ["kimi-k2"]),
    # Falcon 7B/40B: punctuation runs, GPT-2's, then digit runs cut in threes
    "falcon": (None, _seq({"type": "Punctuation", "behavior": "Contiguous"}, _GPT2_BYTES,
                          {"type": "Digits", "individual_digits": False}, _isolated("[0-9][0-9][0-9]")),
               False, ["falcon"]),
    # BLOOM
    "bloom": (None, _seq(_isolated(" ?[^(\\s|[.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c])]+"), _BYTES),
              False, ["bloom"]),
}


def _original_from_json(family: str):
    """A small byte-level BPE trained with `family`'s normalizer and pre-tokenizer as _ORIGINALS holds them."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    normalizer, pre, ignore_merges, _ = _ORIGINALS[family]
    byte_level = dict(_GPT2_BYTES, trim_offsets=False)
    tok = Tokenizer.from_str(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": normalizer,
        "pre_tokenizer": pre, "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "vocab": {}, "merges": []},
    }))
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|begin|>", "<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS + _PRE_CORPUS * 20, trainer)
    data = json.loads(tok.to_str())
    data["model"]["ignore_merges"] = ignore_merges
    # a word in the vocabulary that no merge makes (as in vocabularies converted from tiktoken's):
    # taken whole only where the tokenizer looks words up before merging
    data["model"]["vocab"]["\u0120qzqz"] = len(data["model"]["vocab"])
    return Tokenizer.from_str(json.dumps(data))


@pytest.mark.parametrize("family,pre", [(family, name) for family, o in _ORIGINALS.items() for name in o[3]])
def test_rebuilt_tokenizer_matches_original_of_each_family(tmp_path, family, pre):
    """For each llama.cpp pre-tokenizer name: a BPE trained with the original tokenizer.json's split,
    stored in a GGUF under that name, is rebuilt to encode token for token as the original."""
    from tokenizers import Tokenizer, pre_tokenizers

    original = _original_from_json(family)
    _gguf_with_tokenizer(tmp_path / "m.gguf", original, pre, False)
    src = open_source(tmp_path / "m.gguf")
    rebuilt = Tokenizer.from_str(src.extra_files()["tokenizer.json"].decode())
    if pre != "pixtral":  # see test_pixtral_pre_tokenizer_warns
        assert src.warnings == []
    texts = _CORPUS[:4] + _PRE_CORPUS + ["<|begin|>x<|end|>", "", "  ", "cafe\u0301 vs caf\u00e9 (NFD and NFC)",
                                         "a\r\n\r\nb \n c\t\n", "x  \t  y   ", "a qzqz qzqzqz"]
    for text in texts:
        for special in (False, True):
            assert rebuilt.encode(text, add_special_tokens=special).ids == \
                original.encode(text, add_special_tokens=special).ids, (text, special)
        ids = original.encode(text).ids
        assert rebuilt.decode(ids) == original.decode(ids)
        assert _pieces(rebuilt, text) == _pieces(original, text), text
    if family != "exaone4":  # the texts tell the family from GPT-2's split (which EXAONE 4 uses)
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)
        assert any(_pieces(original, t) != [p for p, _ in gpt2.pre_tokenize_str(t)] for t in texts)


def _pieces(tok, text: str) -> list[str]:
    """The pieces `tok` splits `text` into before BPE."""
    if tok.normalizer is not None:
        text = tok.normalizer.normalize_str(text)
    return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


def test_pixtral_pre_tokenizer_warns(tmp_path):
    """'pixtral' GGUFs come from tokenizer.json files with Llama 3's split, which Mistral's own tekken.json
    does not use: rebuilt as the tokenizer.json splits, with a warning that names the difference."""
    _gguf_with_tokenizer(tmp_path / "m.gguf", _original_from_json("llama3"), "pixtral", False)
    src = open_source(tmp_path / "m.gguf")
    src.extra_files()
    assert len(src.warnings) == 1 and "'pixtral'" in src.warnings[0] and "tekken" in src.warnings[0]


@pytest.mark.parametrize("merge,unknown", [("zz b", "zz"), ("a zz", "zz"), ("b a", "ba")])
def test_gguf_merge_of_unknown_token_is_refused(tmp_path, capsys, merge, unknown):
    """A merge whose parts, or the token they make, are not in the vocabulary: a clear error (it was
    an internal error from the tokenizers library), also from `kbit quantize`."""
    import gguf

    from kbitcli.cli.main import main

    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["a", "b", "ab", "c"])
    w.add_token_types([1, 1, 1, 1])
    w.add_token_merges(["a b", merge])
    _add_tiny_llama(w, 4)
    with pytest.raises(InputError, match=f"merge '{merge}' .* names '{unknown}', which is not in"):
        open_source(path).extra_files()
    assert main(["quantize", str(path), str(tmp_path / "out"), "--skip", "*", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "kbit: error:" in err and "internal error" not in err and f"names '{unknown}'" in err

# ---------------------------------------------------------------------------------------------
# GGUF of the Qwen family: a tiny transformers model written the way llama.cpp's converter
# writes it (Qwen2Model / Qwen3Model: no attn_q / attn_k permutation; qwen3's q_norm / k_norm as
# attn_q_norm / attn_k_norm), then read back and run through kbit's runner against transformers


def _qwen_gguf(path: Path, arch: str):
    import gguf
    import transformers as tf

    tok = _original_tokenizer("qwen2")
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=(arch == "qwen3"))
    if arch == "qwen3":
        cfg, cls = tf.Qwen3Config(head_dim=16, **common), tf.Qwen3ForCausalLM
    else:
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    torch.manual_seed(3)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
    hd = cfg.head_dim if arch == "qwen3" else cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (("block_count", 2), ("context_length", 64), ("embedding_length", 48), ("feed_forward_length", 80),
                 ("attention.head_count", 4), ("attention.head_count_kv", 2), ("rope.dimension_count", hd)):
        w.add_uint32(f"{arch}.{k}", v)
    if arch == "qwen3":
        w.add_uint32(f"{arch}.attention.key_length", hd)
        w.add_uint32(f"{arch}.attention.value_length", hd)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                w.add_tensor("output.weight", a)
        else:
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            w.add_tensor(f"blk.{i}.{names[part]}.{kind}", a.astype(np.float16) if part == "mlp.up_proj" else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.no_grad():  # the F16 up_proj, as stored
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.copy_(layer.mlp.up_proj.weight.half().float())
    return model, tok


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_runs_like_transformers(tmp_path, arch):
    from tokenizers import Tokenizer

    from kbitcli.runner import load

    hf, original = _qwen_gguf(tmp_path / "m.gguf", arch)
    src = open_source(tmp_path / "m.gguf")
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (arch, [type(hf).__name__])
    assert cfg["tie_word_embeddings"] is hf.config.tie_word_embeddings
    sd = hf.state_dict()
    ours = {t.name for t in src.tensors()}
    assert ours | ({"lm_head.weight"} if hf.config.tie_word_embeddings else set()) == set(sd)
    for name in ours:  # no permutation undone where llama.cpp made none
        np.testing.assert_array_equal(src.load(name), sd[name].float().numpy(), err_msg=name)
    rebuilt = Tokenizer.from_str(src.extra_files()["tokenizer.json"].decode())
    assert src.warnings == []
    for text in _CORPUS[:4]:
        assert rebuilt.encode(text).ids == original.encode(text).ids
    model, tok, _ = load(tmp_path / "m.gguf")
    ids = original.encode(_CORPUS[0]).ids[:20]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        got = model(torch.tensor([ids]))[0]
    assert (got - ref).abs().max().item() < 1e-4
    assert list(tok.encode(_CORPUS[2])) == original.encode(_CORPUS[2]).ids


# ---------------------------------------------------------------------------------------------
# GGUF with a SentencePiece tokenizer (Llama 2, Mistral): a SentencePiece BPE model trained here
# with Llama 2's settings, stored as llama.cpp's converter stores one, rebuilt by kbit and checked
# token for token against SentencePiece itself


def _spm_gguf(path: Path, vocab_size: int):
    import io

    import gguf
    import sentencepiece as spm

    docs = Path(__file__).resolve().parents[1] / "docs"
    lines = [ln for f in sorted(docs.glob("*.md")) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS + lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.9995, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    _add_tiny_llama(w, n)
    return sp


@pytest.mark.parametrize("vocab_size", [500, 3000])
def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path, vocab_size):
    from tokenizers import Tokenizer

    from kbitcli.runner import load

    sp = _spm_gguf(tmp_path / "m.gguf", vocab_size)
    src = open_source(tmp_path / "m.gguf")
    files = src.extra_files()
    rebuilt = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert src.warnings == []
    spec = (Path(__file__).resolve().parents[1] / "formats" / "SPEC.md").read_text(encoding="utf-8").splitlines()
    texts = spec[:300] + _CORPUS[:4] + ["Numbers 1 22 333 4444 55555 and 3.14159", "  leading and trailing  ",
                                        " ", "", "a\n\nb", "unseen \u2603 \u01c5 \U0001f9ea glyphs"]
    for text in texts:
        want = sp.encode(text)
        assert rebuilt.encode(text, add_special_tokens=False).ids == want, text
        assert rebuilt.encode(text).ids == [1] + want, text  # add_bos_token
        assert rebuilt.decode(want) == sp.decode(want), text
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["add_bos_token"] is True and (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")
    _, tok, _ = load(tmp_path / "m.gguf")  # the runner's tokenizer, from the rebuilt files
    assert list(tok.encode(_CORPUS[2])) == [1] + sp.encode(_CORPUS[2])


def test_sentencepiece_gguf_that_collapses_whitespace_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "\u2581a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.add_token_types([2, 3, 3, 1])
    w.add_bool("tokenizer.ggml.remove_extra_whitespaces", True)
    _add_tiny_llama(w, 4)
    with pytest.raises(InputError, match="remove_extra_whitespaces"):
        open_source(tmp_path / "m.gguf").extra_files()


def test_gguf_tokenizer_of_another_kind_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tokenizer_model("bert")
    w.add_token_list(["[UNK]", "a"])
    _add_tiny_llama(w, 2)
    with pytest.raises(InputError, match=r"kind 'bert'.*gpt2 \(byte-level BPE\), llama \(SentencePiece BPE\)"):
        open_source(tmp_path / "m.gguf").extra_files()


# ---------------------------------------------------------------------------------------------
# GGUF of Gemma (1, 2, 3) and Phi-3: tiny transformers models written the way llama.cpp's
# converter writes them (GemmaModel / Gemma2Model / Gemma3Model: every norm weight plus 1, no
# permutation, a SentencePiece tokenizer without a space prefix; Phi3MiniModel: attn_qkv, ffn_up
# holding gate then up, LongRoPE factors as tensors), run by kbit's runner from the GGUF and after
# `kbit quantize` (every tensor kept) against transformers

#: user-defined SentencePiece symbols as Gemma's tokenizer has them (turn markers, newlines, runs
#: of spaces), and whether Hugging Face's tokenizer_config.json marks them special
_GEMMA_ADDED = {"<start_of_turn>": True, "<end_of_turn>": True, "\n": False, "\n\n": False, "\u2581\u2581": False}


def _train_spm(gemma: bool):
    """A SentencePiece BPE model with Gemma's settings (no dummy prefix, its special ids and
    user-defined symbols) or Llama 2's (Phi-3)."""
    import io

    import sentencepiece as spm

    docs = Path(__file__).resolve().parents[1] / "docs"
    lines = [ln for f in sorted(docs.glob("*.md")) for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
               user_defined_symbols=list(_GEMMA_ADDED)) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS + lines), model_writer=model, vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=not gemma, allow_whitespace_only_pieces=True, character_coverage=0.9995, minloglevel=2,
        **ids)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _add_spm_tokenizer(w, sp, added: dict[str, bool], n_vocab: int, extra: dict[int, str] | None = None) -> None:
    """Store a SentencePiece tokenizer as llama.cpp's _create_vocab_sentencepiece does: the pieces
    typed by SentencePiece (user-defined ones read as normal), [PADi] up to n_vocab, then the added
    tokens of tokenizer_config.json (`added`: piece -> special; `extra`: id -> special token past the
    SentencePiece vocabulary) as control tokens, or as user-defined ones with U+2581 spelled as spaces."""
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, n_vocab)]
    scores = [sp.get_score(i) for i in range(n)] + [-10000.0] * (n_vocab - n)
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)] + [5] * (n_vocab - n)
    for i, special in [(sp.piece_to_id(p), s) for p, s in added.items()] + [(i, True) for i in (extra or {})]:
        piece = (extra or {}).get(i, tokens[i])
        tokens[i], scores[i], types[i] = (piece, -1000.0, 3) if special else (piece.replace("\u2581", " "), -1000.0, 4)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)


def _write(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_meta(w, arch: str, meta: dict) -> None:
    """`arch.key` metadata of the types llama.cpp's converter writes (None: left out)."""
    for k, v in meta.items():
        if v is None:
            continue
        if isinstance(v, bool):
            w.add_bool(f"{arch}.{k}", v)
        elif isinstance(v, list):
            w.add_array(f"{arch}.{k}", v)
        elif isinstance(v, float):
            w.add_float32(f"{arch}.{k}", v)
        elif isinstance(v, str):
            w.add_string(f"{arch}.{k}", v)
        else:
            w.add_uint32(f"{arch}.{k}", v)


def _gemma_gguf(path: Path, arch: str):
    import gguf
    import transformers as tf

    sp = _train_spm(gemma=True)
    common = dict(vocab_size=sp.get_piece_size(), hidden_size=48, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma":
        cfg, cls = tf.GemmaConfig(num_hidden_layers=2, **common), tf.GemmaForCausalLM
    elif arch == "gemma2":  # strong soft-capping and a short window, so that both show in the logits
        cfg, cls = tf.Gemma2Config(num_hidden_layers=2, query_pre_attn_scalar=16, sliding_window=4,
                                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **common), \
            tf.Gemma2ForCausalLM
    else:  # six layers: five sliding (local RoPE base), one global (base 1e6, linear scaling)
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        cfg, cls = tf.Gemma3TextConfig(num_hidden_layers=6, query_pre_attn_scalar=16, sliding_window=4,
                                       rope_parameters=rope, **common), tf.Gemma3ForCausalLM
    torch.manual_seed(5)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (("block_count", cfg.num_hidden_layers), ("context_length", 64), ("embedding_length", 48),
                 ("feed_forward_length", 80), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                 ("attention.key_length", 16), ("attention.value_length", 16)):
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", 2.0)
        w.add_float32(f"{arch}.final_logit_softcapping", 3.0)
    if arch != "gemma":
        w.add_uint32(f"{arch}.attention.sliding_window", 4)
    if arch == "gemma3":
        w.add_float32(f"{arch}.rope.freq_base", 1e6)
        w.add_string(f"{arch}.rope.scaling.type", "linear")
        w.add_float32(f"{arch}.rope.scaling.factor", 8.0)
    _add_spm_tokenizer(w, sp, _GEMMA_ADDED, sp.get_piece_size())
    w.add_add_space_prefix(False)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm"}
    names.update({"post_attention_layernorm": "ffn_norm"} if arch == "gemma" else
                 {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"})
    for name, t in model.state_dict().items():
        a = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)  # llama.cpp's +1
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", a)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", a)
        elif name != "lm_head.weight":  # tied
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            w.add_tensor(f"blk.{i}.{names[part]}.{kind}", a)
    _write(w)
    return model, sp


_GLOBAL_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def _phi3_gguf(path: Path, longrope: bool):
    import math

    import gguf
    import transformers as tf

    sp = _train_spm(gemma=False)
    n = sp.get_piece_size() + 4  # Phi-3's vocabulary: the SentencePiece one, its added tokens, padding
    extra = {n - 4: "<|endoftext|>", n - 3: "<|assistant|>"}
    kw: dict = dict(sliding_window=6)
    if longrope:  # partial rotary (6 of 12 dimensions: 3 factors), the long factors past 16 positions
        kw = dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "short_factor": [1.0, 1.5, 2.5], "long_factor": [3.0, 5.0, 9.0]})
    cfg = tf.Phi3Config(vocab_size=n, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=16,
                        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=n - 4, pad_token_id=n - 4, **kw)
    torch.manual_seed(7)
    model = tf.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
    rope_dims = 6 if longrope else 12
    w = gguf.GGUFWriter(str(path), "phi3")
    for k, v in (("block_count", 2), ("context_length", 64), ("rope.scaling.original_context_length", 16),
                 ("embedding_length", 48), ("feed_forward_length", 80), ("attention.head_count", 4),
                 ("attention.head_count_kv", 2), ("rope.dimension_count", rope_dims),
                 ("attention.sliding_window", 0 if longrope else 6)):
        w.add_uint32(f"phi3.{k}", v)
    w.add_float32("phi3.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("phi3.rope.freq_base", 10000.0)
    if longrope:
        w.add_float32("phi3.rope.scaling.attn_factor", math.sqrt(1 + math.log(64 / 16) / math.log(16)))
        w.add_tensor("rope_factors_long.weight", np.array([3.0, 5.0, 9.0], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array([1.0, 1.5, 2.5], dtype=np.float32))
    _add_spm_tokenizer(w, sp, {}, n, extra)
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name in _GLOBAL_GGUF:
            w.add_tensor(_GLOBAL_GGUF[name], a)
        else:
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            w.add_tensor(f"blk.{i}.{names[part]}.{kind}", a)
    _write(w)
    return model, sp


def _runs_like_transformers(tmp_path: Path, gguf_path: Path, hf, ids: list[int]):
    """kbit's runner gives transformers' logits from the GGUF, and from `kbit quantize` of it with
    every tensor kept (the tensors then pass through load_raw); returns the converted model's
    tokenizer."""
    from kbitcli.cli.main import main
    from kbitcli.runner import load

    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
        for path in (gguf_path, tmp_path / "out"):
            if path != gguf_path:
                assert main(["quantize", str(gguf_path), str(path), "--skip", "*", "--quiet"]) == 0
            model, tok, _ = load(path)
            got = model(torch.tensor([ids]))[0]
            assert (got - ref).abs().max().item() < 1e-4, path
    return tok


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gemma_gguf_runs_like_transformers(tmp_path, arch):
    from tokenizers import Tokenizer

    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    hf, sp = _gemma_gguf(path, arch)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["architectures"], cfg["tie_word_embeddings"]) == ([type(hf).__name__], True)
    sd = hf.state_dict()
    assert {t.name for t in src.tensors()} | {"lm_head.weight"} == set(sd)
    for t in src.tensors():  # llama.cpp's +1 taken off again (to float32 rounding)
        np.testing.assert_allclose(src.load(t.name), sd[t.name].numpy(), rtol=0, atol=1e-6, err_msg=t.name)
    files = src.extra_files()
    rebuilt = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert src.warnings == []
    texts = _CORPUS[:4] + ["<start_of_turn>user\nHi  there,   you\n\n\n<end_of_turn>", "  two", "x\u2581\u2581y",
                           "unseen \u2603 \U0001f9ea glyphs", " leading", ""]
    for text in texts:  # no space prefix; user-defined symbols matched whole, as SentencePiece does
        want = sp.encode(text)
        assert rebuilt.encode(text, add_special_tokens=False).ids == want, text
        assert rebuilt.encode(text).ids == [2] + want, text
        assert rebuilt.decode(want, skip_special_tokens=False) == sp.decode(want), text
    ids = [2] + sp.encode(_CORPUS[0])[:19]
    tok = _runs_like_transformers(tmp_path, path, hf, ids)
    assert list(tok.encode(texts[4])) == [2] + sp.encode(texts[4])  # the runner's, from the kbit folder


@pytest.mark.parametrize("longrope", [False, True])
def test_phi3_gguf_runs_like_transformers(tmp_path, longrope):
    from tokenizers import Tokenizer

    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    hf, sp = _phi3_gguf(path, longrope)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["architectures"], cfg["original_max_position_embeddings"]) == (["Phi3ForCausalLM"], 16)
    assert cfg["sliding_window"] == (None if longrope else 6)
    if longrope:
        assert cfg["partial_rotary_factor"] == 0.5
        assert (cfg["rope_scaling"]["long_factor"], cfg["rope_scaling"]["short_factor"]) == ([3.0, 5.0, 9.0],
                                                                                           [1.0, 1.5, 2.5])
    sd = hf.state_dict()
    assert {t.name for t in src.tensors()} == set(sd)
    for t in src.tensors():
        np.testing.assert_array_equal(src.load(t.name), sd[t.name].numpy(), err_msg=t.name)
    rebuilt = Tokenizer.from_str(src.extra_files()["tokenizer.json"].decode())
    for text in _CORPUS[:4]:
        assert rebuilt.encode(text).ids == [1] + sp.encode(text), text
    assert rebuilt.encode("a<|endoftext|>", add_special_tokens=False).ids == sp.encode("a") + [hf.config.eos_token_id]
    ids = [1] + sp.encode(_CORPUS[1])[:23]  # past original_max_position_embeddings (16): the long factors
    _runs_like_transformers(tmp_path, path, hf, ids)


def test_gemma_gguf_with_byte_level_tokenizer_is_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma")
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 8), ("feed_forward_length", 8),
                 ("attention.head_count", 2)):
        w.add_uint32(f"gemma.{k}", v)
    n = _add_bpe_tokenizer(w, _original_tokenizer("gpt2"), "gpt-2", False)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), dtype=np.float32))
    for g in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        w.add_tensor(f"blk.0.{g}.weight", np.zeros((8, 8), dtype=np.float32))
    _write(w)
    with pytest.raises(InputError, match="Gemma GGUF with a 'gpt2' tokenizer"):
        open_source(tmp_path / "m.gguf").extra_files()


# ---------------------------------------------------------------------------------------------
# Mixture-of-experts GGUFs: Mixtral (arch "llama", Q/K permuted), Qwen2-MoE (a shared expert) and
# Qwen3-MoE. llama.cpp's converter stacks the per-expert 2-D tensors of the checkpoint into one
# 3-D tensor per projection (ffn_gate_exps / ffn_up_exps / ffn_down_exps); kbit lists each expert
# again under its checkpoint name

_MOE_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm", "self_attn.q_norm": "attn_q_norm",
                   "self_attn.k_norm": "attn_k_norm", "block_sparse_moe.gate": "ffn_gate_inp",
                   "mlp.gate": "ffn_gate_inp",
                   "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
                   "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp"}
#: llama.cpp's stacked tensor -> the checkpoint's per-expert name (Mixtral: w1 gate, w2 down, w3 up)
_MOE_GGUF_EXPERTS = {"mixtral": {"ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
                                 "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
                                 "ffn_up_exps": "block_sparse_moe.experts.{}.w3"},
                     "qwen": {"ffn_gate_exps": "mlp.experts.{}.gate_proj", "ffn_up_exps": "mlp.experts.{}.up_proj",
                              "ffn_down_exps": "mlp.experts.{}.down_proj"}}


def _moe_gguf(tmp_path: Path, arch: str, experts: str = "stacked"):
    """A tiny transformers MoE model of `arch` ("mixtral", "qwen2moe", "qwen3moe") written into
    tmp_path/src/m.gguf as llama.cpp writes one, its experts "stacked", "fused" (--fuse-gate-up-exps:
    ffn_gate_up_exps, each expert's gate rows then its up rows) or "apart" (older Mixtral files:
    blk.N.ffn_gate.E.weight ...); returns (model, its checkpoint, tokenizer, path)."""
    import gguf
    import transformers as tf
    from safetensors.numpy import load_file

    tok = _original_tokenizer("qwen2")
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=0, eos_token_id=1, num_experts_per_tok=2)
    if arch == "mixtral":
        cfg, cls = tf.MixtralConfig(num_local_experts=4, **common), tf.MixtralForCausalLM
    elif arch == "qwen2moe":  # weights not renormalised, q/k/v biases, a shared expert
        cfg, cls = tf.Qwen2MoeConfig(num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                                     **common), tf.Qwen2MoeForCausalLM
    else:  # renormalised, head_dim 16 (not 48 / 4), q/k norms, tied
        cfg, cls = tf.Qwen3MoeConfig(num_experts=6, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True,
                                     tie_word_embeddings=True, **common), tf.Qwen3MoeForCausalLM
    torch.manual_seed(11)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
            if name.endswith("experts.gate_up_proj"):  # stored as F16 below (the up half)
                p.copy_(p.half().float())
    model.save_pretrained(tmp_path / "hf")  # the checkpoint's per-expert names
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    g = "llama" if arch == "mixtral" else arch
    n_exp = 4 if arch == "mixtral" else 6
    hd = 16 if arch == "qwen3moe" else 12
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    w = gguf.GGUFWriter(str(path), g)
    for k, v in (("block_count", 2), ("context_length", 64), ("embedding_length", 48), ("feed_forward_length", 64),
                 ("attention.head_count", 4), ("attention.head_count_kv", 2), ("rope.dimension_count", hd),
                 ("expert_count", n_exp), ("expert_used_count", 2)):
        w.add_uint32(f"{g}.{k}", v)
    if arch != "mixtral":
        w.add_uint32(f"{g}.expert_feed_forward_length", 32)
    if arch == "qwen2moe":
        w.add_uint32(f"{g}.expert_shared_feed_forward_length", 40)
    if arch == "qwen3moe":
        w.add_uint32(f"{g}.attention.key_length", hd)
        w.add_uint32(f"{g}.attention.value_length", hd)
    w.add_float32(f"{g}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{g}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    for name, a in sd.items():
        if name in _GLOBAL_GGUF:
            w.add_tensor(_GLOBAL_GGUF[name], a)
        elif ".experts." not in name:
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if part.endswith(("q_proj", "k_proj")) and arch == "mixtral":  # LlamaModel.permute
                a = permute_qk(a, 4 if part.endswith("q_proj") else 2)
            if part == "mlp.shared_expert_gate":
                a = a.reshape(-1)  # [1, 48] stored as a vector
            w.add_tensor(f"blk.{i}.{_MOE_GGUF_NAMES[part]}.{kind}", a)
    for i in range(2):
        stacked = {}
        for gname, hname in _MOE_GGUF_EXPERTS["mixtral" if arch == "mixtral" else "qwen"].items():
            stacked[gname] = np.stack([sd[f"model.layers.{i}.{hname.format(e)}.weight"] for e in range(n_exp)])
            if gname == "ffn_up_exps":
                stacked[gname] = stacked[gname].astype(np.float16)
        if experts == "fused":  # ModelBase.modify_tensors: torch.cat([gate, up], dim=1)
            up = stacked.pop("ffn_up_exps").astype(np.float32)
            stacked["ffn_gate_up_exps"] = np.concatenate([stacked.pop("ffn_gate_exps"), up], axis=1)
        for gname, a in stacked.items():
            if experts == "apart":
                for e in range(n_exp):
                    w.add_tensor(f"blk.{i}.{gname[:-5]}.{e}.weight", a[e])
            else:
                w.add_tensor(f"blk.{i}.{gname}.weight", a)
    _write(w)
    return model, sd, tok, path


@pytest.mark.parametrize("arch,experts", [("mixtral", "stacked"), ("qwen2moe", "stacked"), ("qwen3moe", "stacked"),
                                          ("mixtral", "apart"), ("qwen3moe", "fused")])
def test_moe_gguf_runs_like_transformers(tmp_path, arch, experts):
    hf, sd, tok, path = _moe_gguf(tmp_path, arch, experts)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    n_exp = 4 if arch == "mixtral" else 6
    assert cfg["num_local_experts" if arch == "mixtral" else "num_experts"] == n_exp
    assert cfg["num_experts_per_tok"] == 2
    if arch != "mixtral":
        assert (cfg["moe_intermediate_size"], cfg["norm_topk_prob"]) == (32, arch == "qwen3moe")
    if arch == "qwen2moe":
        assert (cfg["shared_expert_intermediate_size"], cfg["qkv_bias"]) == (40, True)
    assert {t.name for t in src.tensors()} == set(sd)  # every expert under its own name
    for t in src.tensors():  # Q/K un-permuted for Mixtral; each expert its own slice
        assert t.shape == sd[t.name].shape, t.name
        np.testing.assert_array_equal(src.load(t.name), sd[t.name], err_msg=t.name)
        np.testing.assert_array_equal(src.load_raw(t.name).astype(np.float32), sd[t.name], err_msg=t.name)
    ids = tok.encode(_CORPUS[0]).ids[:20]
    _runs_like_transformers(tmp_path, path, hf, ids)


def test_moe_gguf_expert_reads_one_slice(tmp_path):
    """An expert is dequantized from its own slice of the stacked Q8_0 tensor (the memory of one
    expert, not of all of them), and load_raw gives that slice's blocks."""
    import gguf

    n_exp, rows, cols = 16, 512, 1024  # 2 MB an expert as float32, 32 MB all of them
    rng = np.random.default_rng(2)
    stacked = rng.standard_normal((n_exp, rows, cols), dtype=np.float32)
    q8 = gguf.quants.quantize(stacked, gguf.GGMLQuantizationType.Q8_0)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "qwen3moe")
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", cols), ("feed_forward_length", rows),
                 ("attention.head_count", 8), ("expert_count", n_exp), ("expert_used_count", 2),
                 ("expert_feed_forward_length", rows)):
        w.add_uint32(f"qwen3moe.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((16, cols), dtype=np.float32))
    for g in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{g}.weight", np.zeros((cols, cols), dtype=np.float16))
    w.add_tensor("blk.0.ffn_gate_inp.weight", np.zeros((n_exp, cols), dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate_exps.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up_exps.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down_exps.weight", np.zeros((n_exp, cols, rows), dtype=np.float16))
    _write(w)
    src = open_source(tmp_path / "m.gguf")
    want = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    name = "model.layers.0.mlp.experts.2.gate_proj.weight"
    assert src.tensor(name).shape == (rows, cols) and src.tensor(name).dtype == "Q8_0"
    assert src.tensor(name).nbytes == q8[2].nbytes
    assert _peak_bytes(lambda: src.load(name)) < 4 * rows * cols * 4  # dequantize's temporaries included
    np.testing.assert_array_equal(src.load(name), want[2])
    np.testing.assert_array_equal(src.load_raw(name), q8[2])


def test_moe_gguf_bad_expert_tensors(tmp_path):
    """Stacked (or gate-up fused, or per-expert) experts that disagree with expert_count, or experts
    in an architecture kbit reads only dense, are refused clearly."""
    import gguf

    def write(arch: str, n_stacked: int, name: str = "blk.0.ffn_gate_exps.weight", rows: int = 8) -> Path:
        p = tmp_path / f"{arch}{n_stacked}{name}.gguf"
        w = gguf.GGUFWriter(str(p), arch)
        for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 8), ("feed_forward_length", 8),
                     ("attention.head_count", 2), ("expert_count", 4), ("expert_used_count", 2)):
            w.add_uint32(f"{arch}.{k}", v)
        w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
        w.add_tensor(name, np.zeros((n_stacked, rows, 8) if n_stacked else (rows, 8), dtype=np.float32))
        _write(w)
        return p

    with pytest.raises(InputError, match="not the 4 stacked experts"):
        open_source(write("llama", 3))
    with pytest.raises(InputError, match="not the 4 stacked experts"):  # gate and up rows of unequal halves
        open_source(write("llama", 4, "blk.0.ffn_gate_up_exps.weight", 15))
    with pytest.raises(InputError, match="an expert beyond the 4"):  # an older Mixtral file's experts apart
        open_source(write("llama", 0, "blk.0.ffn_gate.4.weight"))
    with pytest.raises(UnsupportedArchitectureError, match="mixture-of-experts qwen2 model"):
        open_source(write("qwen2", 4))


# ---------------------------------------------------------------------------------------------
# DeepSeek (deepseek2): multi-head latent attention, a dense leading layer, routed experts stacked
# and shared experts. "v3": DeepSeek-V3 as llama.cpp's converter writes it since its MLA change
# (kv_b_proj split into attn_k_b / attn_v_b, head_count_kv 1, the MLA sizes as key_length_mla /
# value_length_mla, a sigmoid router with exp_probs_b, grouped, renormalised, scaled; YaRN as
# yarn_log_multiplier); "v2-lite": DeepSeek-V2-Lite as older converters wrote it (attn_q,
# attn_kv_b whole, the per-head sizes as key_length / value_length, no gating function: softmax).
# attn_k_b / attn_v_b as F16 ("v3": kv_b_proj reads as float16) or Q8_0 ("v3-q8": as their float32 values)

_DEEPSEEK_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
                        "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
                        "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_a_layernorm": "attn_kv_a_norm",
                        "self_attn.kv_b_proj": "attn_kv_b", "self_attn.o_proj": "attn_output",
                        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
                        "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
                        "mlp.shared_experts.up_proj": "ffn_up_shexp", "mlp.shared_experts.down_proj": "ffn_down_shexp"}


def _deepseek_gguf(tmp_path: Path, variant: str, meta: dict | None = None, drop: str | None = None):
    """A tiny transformers DeepSeek model written into tmp_path/src/m.gguf as llama.cpp's converter
    writes one, with the metadata `meta` added and the tensors ending in `drop` left out; returns
    (model, its checkpoint, tokenizer, path)."""
    import gguf
    import transformers as tf
    from safetensors.numpy import load_file

    tok = _original_tokenizer("qwen2")
    nh, rank, nope, rope, vd = 4, 32, 32, 8, 12  # Q8_0 blocks of 32 along qk_nope (attn_k_b) and the rank
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                  num_hidden_layers=3, num_attention_heads=nh, num_key_value_heads=nh, kv_lora_rank=rank,
                  qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vd, num_experts_per_tok=2,
                  first_k_dense_replace=1, rms_norm_eps=1e-6, max_position_embeddings=64, bos_token_id=0,
                  eos_token_id=1)
    v3 = variant.startswith("v3")
    q8 = gguf.GGMLQuantizationType.Q8_0
    if v3:  # the rotary on adjacent pairs (llama.cpp's), YaRN with mscale = mscale_all_dim
        cfg = tf.DeepseekV3Config(q_lora_rank=20, n_routed_experts=8, n_shared_experts=2, n_group=4, topk_group=2,
                                  norm_topk_prob=True, routed_scaling_factor=2.5, rope_interleave=True,
                                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                                   "original_max_position_embeddings": 16, "mscale": 0.8,
                                                   "mscale_all_dim": 0.8}, **common)
        cls = tf.DeepseekV3ForCausalLM
    else:
        cfg, cls = tf.DeepseekV2Config(q_lora_rank=None, n_routed_experts=4, n_shared_experts=1, **common), \
            tf.DeepseekV2ForCausalLM
    torch.manual_seed(17)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
            if variant == "v3" and name.endswith("kv_b_proj.weight"):  # stored as F16 below
                p.copy_(p.half().float())
            if variant == "v3-q8" and name.endswith("kv_b_proj.weight"):  # the values Q8_0 holds
                kv_b = p.view(nh, nope + vd, rank)
                k_b = gguf.quants.quantize(kv_b[:, :nope].transpose(1, 2).numpy(), q8)
                kv_b[:, :nope] = torch.from_numpy(gguf.quants.dequantize(k_b, q8)).transpose(1, 2)
                kv_b[:, nope:] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(
                    kv_b[:, nope:].numpy(), q8), q8))
    model.save_pretrained(tmp_path / "hf")  # the checkpoint's per-expert names
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    n_exp = cfg.n_routed_experts
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_block_count(3)
    w.add_context_length(64)
    w.add_embedding_length(48)
    w.add_feed_forward_length(80)
    w.add_head_count(nh)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e4)
    w.add_vocab_size(cfg.vocab_size)
    w.add_leading_dense_block_count(1)
    w.add_kv_lora_rank(rank)
    w.add_rope_dimension_count(rope)
    w.add_expert_count(n_exp)
    w.add_expert_used_count(2)
    w.add_expert_feed_forward_length(24)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if v3:  # DeepseekV2Model.set_gguf_parameters since the MLA change, and TextModel's expert keys
        w.add_head_count_kv(1)
        w.add_key_length(rank + rope)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(vd)
        w.add_q_lora_rank(20)
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_group_count(4)
        w.add_expert_group_used_count(2)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(16)
        w.add_rope_scaling_yarn_log_mul(0.1 * 0.8)
    else:  # older converters: the per-head sizes, kv heads as in config.json
        w.add_head_count_kv(nh)
        w.add_key_length(nope + rope)
        w.add_value_length(vd)
        w.add_expert_weights_scale(1.0)
    for key, value in (meta or {}).items():
        {bool: w.add_bool, str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    add_tensor = w.add_tensor
    w.add_tensor = lambda n, a, **kw: None if drop and n.endswith(drop) else add_tensor(n, a, **kw)
    for name, a in sd.items():
        if name in _GLOBAL_GGUF:
            w.add_tensor(_GLOBAL_GGUF[name], a)
        elif ".experts." not in name or ".shared_experts." in name:
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if kind == "e_score_correction_bias":  # renamed e_score_correction.bias: exp_probs_b
                w.add_tensor(f"blk.{i}.exp_probs_b.bias", a)
            elif part == "self_attn.kv_b_proj" and v3:  # [head, key rows then value rows, rank], split
                kv_b = a.reshape(nh, nope + vd, rank)
                for gname, part in (("attn_k_b", kv_b[:, :nope].transpose(0, 2, 1)), ("attn_v_b", kv_b[:, nope:])):
                    part = np.ascontiguousarray(part)
                    if variant == "v3-q8":
                        w.add_tensor(f"blk.{i}.{gname}.weight", gguf.quants.quantize(part, q8), raw_dtype=q8)
                    else:
                        w.add_tensor(f"blk.{i}.{gname}.weight", part.astype(np.float16))
            else:
                w.add_tensor(f"blk.{i}.{_DEEPSEEK_GGUF_NAMES[part]}.{kind}", a)
    for i in (1, 2):
        for gname, hname in _MOE_GGUF_EXPERTS["qwen"].items():
            w.add_tensor(f"blk.{i}.{gname}.weight",
                         np.stack([sd[f"model.layers.{i}.{hname.format(e)}.weight"] for e in range(n_exp)]))
    _write(w)
    return model, sd, tok, path


@pytest.mark.parametrize("variant", ["v3", "v3-q8", "v2-lite"])
def test_deepseek_gguf_runs_like_transformers(tmp_path, variant):
    hf, sd, tok, path = _deepseek_gguf(tmp_path, variant)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "first_k_dense_replace",
                "num_experts_per_tok", "norm_topk_prob", "routed_scaling_factor", "num_key_value_heads"):
        assert cfg[key] == getattr(hf.config, key), key
    if variant != "v2-lite":
        assert (cfg["n_group"], cfg["topk_group"]) == (4, 2)
        assert src.tensor("model.layers.0.self_attn.kv_b_proj.weight").dtype == (
            "float32" if variant == "v3-q8" else "float16")
        assert {k: cfg["rope_scaling"][k] for k in ("factor", "original_max_position_embeddings", "mscale",
                                                    "mscale_all_dim")} == {
            k: hf.config.rope_parameters[k] for k in ("factor", "original_max_position_embeddings", "mscale",
                                                      "mscale_all_dim")}
    assert {t.name for t in src.tensors()} == set(sd)  # kv_b_proj rebuilt, every expert under its own name
    for t in src.tensors():
        assert t.shape == sd[t.name].shape, t.name
        np.testing.assert_array_equal(src.load(t.name), sd[t.name], err_msg=t.name)
        np.testing.assert_array_equal(src.load_raw(t.name), sd[t.name], err_msg=t.name)
    _runs_like_transformers(tmp_path, path, hf, tok.encode(_CORPUS[0]).ids[:20])


@pytest.mark.parametrize("variant,meta,drop,message", [
    ("v2-lite", {"deepseek2.expert_weights_norm": True}, None, "DeepSeek-V2's classes do not"),
    ("v2-lite", {"deepseek2.expert_gating_func": 3}, None, "neither softmax"),
    ("v2-lite", {"deepseek2.rope.scaling.type": "yarn", "deepseek2.rope.scaling.factor": 4.0}, None,
     "no rope.scaling.yarn_log_multiplier"),
    ("v3", None, ".attn_v_b.weight", "attn_k_b without attn_v_b"),
    ("v3", None, "blk.2.ffn_up_shexp.weight", "lacks the weight for model.layers.2.mlp.shared_experts.up_proj"),
])
def test_deepseek_gguf_that_cannot_be_rebuilt_is_refused(tmp_path, variant, meta, drop, message):
    """What llama.cpp runs otherwise than the checkpoint classes, and a broken MLA or MoE layout,
    are refused with a clear message."""
    *_, path = _deepseek_gguf(tmp_path, variant, meta, drop)
    with pytest.raises(InputError, match=message):
        open_source(path)


# ---------------------------------------------------------------------------------------------
# Llama-like GGUFs: Granite (its multipliers as embedding_scale, residual_scale, attention.scale and
# logit_scale), SmolLM3 (NoPE on every 4th layer, which llama.cpp fixes rather than stores), OLMo 2
# (post-norms, q/k norms over all heads) and StarCoder2 (LayerNorms with biases, a c_fc / c_proj
# MLP); llama.cpp permutes the Q/K of the first two only

_DENSE_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                     "post_attention_layernorm": "ffn_norm"}
_OLMO2_GGUF_NAMES = {**_DENSE_GGUF_NAMES, "post_attention_layernorm": "post_attention_norm",
                     "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                     "self_attn.k_norm": "attn_k_norm"}
_STARCODER2_GGUF_NAMES = {**_DENSE_GGUF_NAMES, "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def _llama_like_gguf(path: Path, arch: str):
    import gguf
    import transformers as tf

    tok = _original_tokenizer("qwen2")
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1)
    if arch == "granite":
        cfg, cls = tf.GraniteConfig(num_hidden_layers=2, embedding_multiplier=3.0, residual_multiplier=0.3,
                                    attention_multiplier=0.05, logits_scaling=4.0, **common), tf.GraniteForCausalLM
    elif arch == "smollm3":  # layer 3 has no rotary
        cfg, cls = tf.SmolLM3Config(num_hidden_layers=4, **common), tf.SmolLM3ForCausalLM
    elif arch == "olmo2":
        cfg, cls = tf.Olmo2Config(num_hidden_layers=2, **common), tf.Olmo2ForCausalLM
    elif arch.startswith("llama3"):  # Llama 3.1 / 3.2's llama3 RoPE (head_dim 12: wavelengths in all three bands)
        factor = 32.0 if arch == "llama3.2" else 8.0
        cfg, cls = tf.LlamaConfig(num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, **common), tf.LlamaForCausalLM
    else:  # no window: llama.cpp's starcoder2 attends over the whole context
        cfg, cls = tf.Starcoder2Config(num_hidden_layers=2, norm_epsilon=1e-6, sliding_window=None, **common), \
            tf.Starcoder2ForCausalLM
    torch.manual_seed(13)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
    arch = "llama" if arch.startswith("llama3") else arch
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (("block_count", cfg.num_hidden_layers), ("context_length", 64), ("embedding_length", 48),
                 ("feed_forward_length", 80), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                 ("rope.dimension_count", 12)):
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_{'' if arch == 'starcoder2' else 'rms_'}epsilon", 1e-6)
    w.add_float32(f"{arch}.rope.freq_base", float(cfg.rope_parameters["rope_theta"]))
    if arch == "granite":  # GraniteModel.set_gguf_parameters
        w.add_float32("granite.embedding_scale", 3.0)
        w.add_float32("granite.residual_scale", 0.3)
        w.add_float32("granite.attention.scale", 0.05)
        w.add_float32("granite.logit_scale", 4.0)
    if arch == "llama":  # LlamaModel.generate_extra_tensors: the llama3 RoPE only as the factors rope_freqs
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        plain = 1.0 / 10000.0 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
        w.add_tensor("rope_freqs.weight", (plain / ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].double()).float().numpy())
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    names = {"olmo2": _OLMO2_GGUF_NAMES, "starcoder2": _STARCODER2_GGUF_NAMES}.get(arch, _DENSE_GGUF_NAMES)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.norm.bias":
            w.add_tensor("output_norm.bias", a)
        elif name in _GLOBAL_GGUF:
            if name != "lm_head.weight" or not cfg.tie_word_embeddings:
                w.add_tensor(_GLOBAL_GGUF[name], a)
        else:
            _, _, i, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            if part in ("self_attn.q_proj", "self_attn.k_proj") and arch in ("granite", "smollm3", "llama"):  # permuted
                a = permute_qk(a, 4 if part.endswith("q_proj") else 2)
            w.add_tensor(f"blk.{i}.{names[part]}.{kind}", a)
    _write(w)
    return model, tok


@pytest.mark.parametrize("arch", ["granite", "smollm3", "olmo2", "starcoder2", "llama3.1", "llama3.2"])
def test_llama_like_gguf_runs_like_transformers(tmp_path, arch):
    """... and Llama 3.1 / 3.2, whose llama3 RoPE scaling the file holds only as the factors
    rope_freqs: read back into rope_scaling (without it every position would rotate differently)."""
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    hf, tok = _llama_like_gguf(path, arch)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    if arch.startswith("llama3"):
        rs, want = cfg["rope_scaling"], hf.config.rope_parameters
        assert src.warnings == [] and rs["rope_type"] == "llama3" and rs["factor"] == want["factor"]
    else:
        assert "rope_scaling" not in cfg
    if arch == "granite":
        assert [cfg[k] for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                 "logits_scaling")] == [3.0, 0.3, 0.05, 4.0]
    if arch == "smollm3":
        assert cfg["no_rope_layers"] == hf.config.no_rope_layers == [1, 1, 1, 0]
    sd = hf.state_dict()
    tied = hf.config.tie_word_embeddings
    assert {t.name for t in src.tensors()} | ({"lm_head.weight"} if tied else set()) == set(sd)
    for t in src.tensors():
        np.testing.assert_array_equal(src.load(t.name), sd[t.name].numpy(), err_msg=t.name)
    _runs_like_transformers(tmp_path, path, hf, tok.encode(_CORPUS[0]).ids[:20])


def test_llama_gguf_with_rope_freqs_of_no_llama3_setting_is_refused(tmp_path, capsys):
    """rope_freqs that no llama3 setting gives (here: one factor changed in the file) cannot be
    turned back into the checkpoint's RoPE: a clear input error, not a model that rotates otherwise."""
    import gguf

    from kbitcli.cli.main import main
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    _llama_like_gguf(path, "llama3.1")
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight")
    data = np.memmap(path, dtype=np.float32, mode="r+", offset=int(t.data_offset), shape=(int(t.n_elements),))
    data[2] *= 1.5
    data.flush()
    del data
    assert main(["quantize", str(path), str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "rope_freqs are not llama3 factors kbit can rebuild" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# GGUFs of the LayerNorm and GPT-2-like families: Cohere (command-r; with q/k norms) and Cohere 2,
# Phi-2 (q/k/v apart, or fused in older files), StableLM (per-head q/k norms stacked; a parallel
# block without ffn_norm), Falcon 7B / 40B / 11B, StarCoder (GPTBigCode), GPT-2, BLOOM, GPT-NeoX.
# Each tiny checkpoint (save_pretrained's names) is written as llama.cpp's converter writes it: its
# names, its query_key_value regrouping (Falcon per key/value group, BLOOM and GPT-NeoX per head),
# GPT-2's Conv1D transposes, StableLM's stacked norms, and the metadata it stores

_MORE_GGUF_GLOBALS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                      "model.final_layernorm": "output_norm", "transformer.wte": "token_embd",
                      "transformer.wpe": "position_embd", "transformer.ln_f": "output_norm",
                      "transformer.word_embeddings": "token_embd",
                      "transformer.word_embeddings_layernorm": "token_embd_norm", "gpt_neox.embed_in": "token_embd",
                      "gpt_neox.final_layer_norm": "output_norm", "embed_out": "output"}
_GPT2_GGUF_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_QKV_GGUF_NAMES = {"input_layernorm": "attn_norm", "ln_mlp": "attn_norm", "ln_attn": "attn_norm_2",
                   "self_attention.query_key_value": "attn_qkv", "self_attention.dense": "attn_output",
                   "attention.query_key_value": "attn_qkv", "attention.dense": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.dense_h_to_4h": "ffn_up",
                   "mlp.dense_4h_to_h": "ffn_down"}
_MORE_GGUF_NAMES = {"command-r": {**_DENSE_GGUF_NAMES, "self_attn.q_norm": "attn_q_norm",
                                  "self_attn.k_norm": "attn_k_norm"},
                    "cohere2": _DENSE_GGUF_NAMES, "stablelm": _DENSE_GGUF_NAMES,
                    "phi2": {**_DENSE_GGUF_NAMES, "self_attn.dense": "attn_output", "mlp.fc1": "ffn_up",
                             "mlp.fc2": "ffn_down"},
                    "starcoder": _GPT2_GGUF_NAMES, "gpt2": _GPT2_GGUF_NAMES}
_MORE_GGUF = ["command-r", "cohere2", "phi2", "phi2-fused", "stablelm", "stablelm-parallel", "falcon-7b", "falcon-40b",
              "falcon-11b", "starcoder", "gpt2", "bloom", "gptneox", "gptneox-sequential"]


def _more_model(variant: str, vocab: int):
    """(model, GGUF architecture, its metadata as llama.cpp's converter writes it)."""
    import transformers as tf

    arch = variant.split("-")[0] if variant != "command-r" else variant
    llama = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    meta: dict = {"block_count": 2, "context_length": 64, "embedding_length": 48, "feed_forward_length": 80,
                  "attention.head_count": 4, "attention.head_count_kv": 2, "attention.layer_norm_epsilon": 1e-5}
    if arch == "command-r":  # Command R+'s q/k norms; a logit scale
        cfg, cls = tf.CohereConfig(use_qk_norm=True, logit_scale=0.5, **llama), tf.CohereForCausalLM
        meta.update({"rope.freq_base": 500000.0, "logit_scale": 0.5, "rope.scaling.type": "none"})
    elif arch == "cohere2":  # 3 of 4 layers slide (window 4), with the rotary; the 4th attends to all
        cfg, cls = tf.Cohere2Config(sliding_window=4, logit_scale=0.5, **{**llama, "num_hidden_layers": 4}), \
            tf.Cohere2ForCausalLM
        meta.update({"block_count": 4, "rope.freq_base": 10000.0, "logit_scale": 0.5, "attention.sliding_window": 4,
                     "vocab_size": vocab, "rope.dimension_count": 12, "rope.scaling.type": "none"})
    elif arch == "phi2":  # 6 of each head's 12 dimensions rotated; no freq_base stored
        cfg, cls = tf.PhiConfig(partial_rotary_factor=0.5, **{**llama, "intermediate_size": 192,
                                                               "num_key_value_heads": 4}), tf.PhiForCausalLM
        meta.update({"feed_forward_length": 192, "attention.head_count_kv": 4, "rope.dimension_count": 6})
    elif arch == "stablelm":
        par = variant == "stablelm-parallel"  # with q/k/v biases and per-head q/k norms, no post-attention norm
        cfg, cls = tf.StableLmConfig(partial_rotary_factor=0.5, use_qkv_bias=par, qk_layernorm=par,
                                     use_parallel_residual=par, **llama), tf.StableLmForCausalLM
        meta.update({"rope.dimension_count": 6, "use_parallel_residual": par})
    elif arch == "falcon":
        kw = {"7b": dict(new_decoder_architecture=False, multi_query=True),
              "40b": dict(new_decoder_architecture=True, num_kv_heads=2),
              "11b": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1)}[variant[7:]]
        cfg, cls = tf.FalconConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   bos_token_id=0, eos_token_id=1, **kw), tf.FalconForCausalLM
        meta.update({"context_length": 2048, "feed_forward_length": 192,
                     "attention.head_count_kv": 1 if variant == "falcon-7b" else 2})
    elif arch in ("starcoder", "gpt2"):
        e = 48 if arch == "starcoder" else 64  # GPT-2: rows of 64 for the Q8_0 tensor
        kw = dict(vocab_size=vocab, n_embd=e, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
        cfg, cls = (tf.GPTBigCodeConfig(**kw), tf.GPTBigCodeForCausalLM) if arch == "starcoder" else \
            (tf.GPT2Config(**kw), tf.GPT2LMHeadModel)
        meta.update({"embedding_length": e, "feed_forward_length": 4 * e,
                     "attention.head_count_kv": 1 if arch == "starcoder" else 4})
        if arch == "gpt2":
            del meta["attention.head_count_kv"]
    elif arch == "bloom":
        cfg, cls = tf.BloomConfig(vocab_size=vocab, hidden_size=48, n_layer=2, n_head=4, bos_token_id=0,
                                  eos_token_id=1), tf.BloomForCausalLM
        meta.update({"feed_forward_length": 192, "attention.head_count_kv": 4})
    else:
        cfg, cls = tf.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=variant == "gptneox",
                                    **{k: v for k, v in llama.items() if k != "num_key_value_heads"}), \
            tf.GPTNeoXForCausalLM
        del meta["attention.head_count_kv"]
        meta.update({"rope.dimension_count": 6, "use_parallel_residual": variant == "gptneox"})
    if "rope.freq_base" in meta:
        assert cfg.rope_parameters["rope_theta"] == meta["rope.freq_base"]
    torch.manual_seed(17)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = ("norm" in name or ".ln_" in name) and name.endswith("weight")
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if norm else 0.15 * torch.randn_like(p))
    return model, arch, meta


def _more_gguf(tmp_path: Path, variant: str):
    """A tiny transformers model of `variant` written into tmp_path/src/m.gguf as llama.cpp's
    converter writes it; returns (model, its checkpoint, tokenizer, path)."""
    import gguf
    from safetensors.numpy import load_file

    tok = _original_tokenizer("qwen2")
    model, arch, meta = _more_model(variant, tok.get_vocab_size())
    if arch == "gpt2":  # one Conv1D weight stored as Q8_0, one as F16: the model holds those values
        with torch.no_grad():
            fc = model.transformer.h[0].mlp.c_fc.weight
            q8 = gguf.quants.quantize(fc.T.numpy().copy(), gguf.GGMLQuantizationType.Q8_0)
            fc.copy_(torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0).T.copy()))
            proj = model.transformer.h[1].attn.c_proj.weight
            proj.copy_(proj.half().float())
    model.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    _add_meta(w, arch, meta)
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    c = model.config
    nh = getattr(c, "num_attention_heads", None) or c.n_head
    nkv = {"falcon-7b": 1, "falcon-40b": 2, "falcon-11b": 2}.get(variant, nh)
    e = getattr(c, "hidden_size", None) or c.n_embd
    hd = e // nh
    names = _MORE_GGUF_NAMES.get(arch, _QKV_GGUF_NAMES)
    fused: dict[str, dict] = {}  # GGUF name -> {the position of the part: its tensor}
    for name, a in sd.items():
        base, kind = name.rsplit(".", 1)
        if base in _MORE_GGUF_GLOBALS:
            w.add_tensor(f"{_MORE_GGUF_GLOBALS[base]}.{kind}", a)
            continue
        layer, part = re.match(r"^(?:model\.layers|transformer\.h|gpt_neox\.layers)\.(\d+)\.(.+)$", base).groups()
        if ".norms." in part:  # StableLM: llama.cpp stacks the per-head norms (StableLMModel._stack_qk_norm)
            gname = f"blk.{layer}.attn_{'q' if '.q_layernorm.' in part else 'k'}_norm.{kind}"
            fused.setdefault(gname, {})[int(part.rsplit(".", 1)[1])] = a
            continue
        if variant == "phi2-fused" and part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            fused.setdefault(f"blk.{layer}.attn_qkv.{kind}", {})["qkv".index(part[10])] = a  # older files' Wqkv
            continue
        if part.endswith("query_key_value") and arch == "falcon":  # FalconModel.modify_tensors
            g = a.reshape(nkv, nh // nkv + 2, hd, e)
            a = np.concatenate([g[:, :-2].reshape(-1, e), g[:, -2].reshape(-1, e), g[:, -1].reshape(-1, e)])
        elif part.endswith("query_key_value"):  # BloomModel / GPTNeoXModel.modify_tensors
            g = a.reshape(nh, 3, hd, *a.shape[1:])
            a = np.concatenate([g[:, 0].reshape(-1, *a.shape[1:]), g[:, 1].reshape(-1, *a.shape[1:]),
                                g[:, 2].reshape(-1, *a.shape[1:])])
        elif arch == "gpt2" and kind == "weight" and part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            a = a.T.copy()  # GPT2Model.modify_tensors
        gname = f"blk.{layer}.{names[part]}.{kind}"
        if arch == "gpt2" and name == "transformer.h.0.mlp.c_fc.weight":
            w.add_tensor(gname, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif arch == "gpt2" and name == "transformer.h.1.attn.c_proj.weight":
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, a)
    for gname, parts in fused.items():
        ordered = [parts[i] for i in sorted(parts)]
        w.add_tensor(gname, np.stack(ordered) if "_norm." in gname else np.concatenate(ordered))
    _write(w)
    return model, sd, tok, path


@pytest.mark.parametrize("variant", _MORE_GGUF)
def test_more_gguf_runs_like_transformers(tmp_path, variant):
    hf, sd, tok, path = _more_gguf(tmp_path, variant)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    assert cfg["tie_word_embeddings"] == hf.config.tie_word_embeddings
    if variant == "cohere2":
        assert cfg["layer_types"] == hf.config.layer_types and cfg["sliding_window"] == 4
    if variant.startswith("falcon"):  # multi_query counts only without new_decoder_architecture, num_kv_heads with
        c = hf.config
        new = c.new_decoder_architecture
        keys = ("new_decoder_architecture", "multi_query", "num_kv_heads", "num_ln_in_parallel_attn")
        got = [cfg.get(k) for k in keys]
        assert got == [new, None if new else c.multi_query, c.num_kv_heads if new else None,
                       (c.num_ln_in_parallel_attn or 2) if new else None]
    assert {t.name for t in src.tensors()} == set(sd)
    for t in src.tensors():  # the checkpoint's names, shapes and row order
        assert t.shape == sd[t.name].shape, t.name
        np.testing.assert_array_equal(src.load(t.name), sd[t.name], err_msg=t.name)
        np.testing.assert_array_equal(src.load_raw(t.name).astype(np.float32), sd[t.name], err_msg=t.name)
    if variant == "gpt2":  # the transposed Q8_0 weight is listed as float32 values; F16 stays F16
        assert src.tensor("transformer.h.0.mlp.c_fc.weight").dtype == "float32"
        assert src.tensor("transformer.h.1.attn.c_proj.weight").dtype == "float16"
    ids = tok.encode(_CORPUS[0]).ids[:20]
    if variant in ("falcon-7b", "bloom"):  # the file as transformers' own GGUF reader (none for the others) sees it
        with torch.no_grad():
            diff = transformers_gguf_model(path)(torch.tensor([ids])).logits - hf(torch.tensor([ids])).logits
        assert diff.abs().max().item() < 1e-5
    _runs_like_transformers(tmp_path, path, hf, ids)


@pytest.mark.parametrize("arch,meta,message", [
    ("starcoder", {"attention.head_count_kv": 2}, "only with multi-query attention"),
    ("bloom", {"feed_forward_length": 24}, "not 4 x 8"),
    ("falcon", {"attention.head_count": 3}, "not groups of 2"),
    ("cohere2", {}, "lacks the metadata 'cohere2.attention.sliding_window'"),
])
def test_more_gguf_that_cannot_be_rebuilt_is_refused(tmp_path, arch, meta, message):
    """What llama.cpp would run otherwise than the checkpoint, or a checkpoint class cannot hold, is
    refused with a clear message."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    for k, v in {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 32,
                 "attention.head_count": 2, "attention.head_count_kv": 2, **meta}.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    _write(w)
    with pytest.raises(InputError, match=re.escape(message)):
        open_source(tmp_path / "m.gguf").config()


# ---------------------------------------------------------------------------------------------
# GGUFs of Llama 4 (stacked experts, llama.cpp's [expert, out, in] split into gate / up), gpt-oss
# (stacked experts with biases stored as MXFP4, gate / up alternating in the checkpoint, attention
# sinks), GLM-4 (fused gate / up, post-norms, partial rotary), GLM-4-9B's GlmForCausalLM (chatglm),
# GLM-4.5 (DeepSeek-V3's routing, a dense first layer, a multi-token-prediction layer after the
# model's), EXAONE 4 (sliding layers from sliding_window_pattern), OLMoE (experts stacked from the
# checkpoint's per-expert tensors), OLMo (q / k permuted, clip_qkv), Nemotron (LayerNorm1P weights
# + 1, partial rotary), MPT (ALiBi, clip_qkv, transformer.blocks) and Apertus (xIELU's scalars as
# metadata, llama3 RoPE as rope_freqs). Each tiny checkpoint is written as llama.cpp's converter
# writes it, its names from gguf-py's own tensor map.
_NEW_GGUF = ["llama4", "gpt-oss", "glm4", "glm4moe", "chatglm", "exaone4", "olmoe", "olmo", "nemotron", "mpt",
             "apertus"]


def _new_model(arch: str, vocab: int):
    """(model, the metadata llama.cpp's converter writes for it, beyond the sizes)."""
    import transformers as tf

    c = dict(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
             pad_token_id=1)
    meta: dict = {"attention.layer_norm_rms_epsilon": 1e-6, "rope.dimension_count": 12}
    if arch in _NEWER_GGUF:
        cfg, cls, meta = _newer_config(arch, c, meta)
    elif arch == "llama4":  # layers 1 and 3 MoE, layer 3 without rotary; F16 experts in layer 1; Scout's RoPE
        cfg, cls = tf.Llama4TextConfig(**{**c, "num_hidden_layers": 4, "intermediate_size": 32},
                                       intermediate_size_mlp=80, num_local_experts=4, num_experts_per_tok=1,
                                       interleave_moe_layer_step=2, rms_norm_eps=1e-6,
                                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                                        "original_max_position_embeddings": 8192}), \
            tf.Llama4ForCausalLM
        meta.update({"expert_count": 4, "expert_used_count": 1, "expert_feed_forward_length": 32,
                     "interleave_moe_layer_step": 2, "rope.freq_base": 500000.0, "vocab_size": vocab})
    elif arch == "gpt-oss":  # rows of 64 for MXFP4; every other layer slides (window 4); YaRN
        cfg, cls = tf.GptOssConfig(**{**c, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16},
                                   num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                   rms_norm_eps=1e-6), tf.GptOssForCausalLM
        meta.update({"embedding_length": 64, "feed_forward_length": 64, "expert_feed_forward_length": 64,
                     "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16,
                     "expert_count": 4, "expert_used_count": 2, "attention.sliding_window": 4,
                     "rope.freq_base": 150000.0, "rope.scaling.type": "yarn", "rope.scaling.factor": 32.0,
                     "rope.scaling.original_context_length": 4096})
    elif arch == "glm4":  # half of each head rotated, q/k/v biases
        cfg, cls = tf.Glm4Config(**c, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-6), \
            tf.Glm4ForCausalLM
        meta.update({"rope.dimension_count": 6, "rope.freq_base": 10000.0})
    elif arch == "chatglm":  # ChatGLMModel: a context_length of n_embd, the base 10000 x rope_ratio
        cfg, cls = tf.GlmConfig(**c, partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-6), \
            tf.GlmForCausalLM
        meta.update({"context_length": 48, "rope.dimension_count": 6, "rope.freq_base": 10000.0})
    elif arch == "glm4moe":  # layer 0 dense; a sigmoid router with its bias, renormalised and scaled
        cfg, cls = tf.Glm4MoeConfig(**{**c, "intermediate_size": 80}, n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                    use_qk_norm=True, partial_rotary_factor=0.5, attention_bias=True,
                                    norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-6), \
            tf.Glm4MoeForCausalLM
        meta.update({"block_count": 3, "nextn_predict_layers": 1, "expert_count": 4, "expert_used_count": 2,
                     "expert_feed_forward_length": 32, "expert_shared_count": 1, "leading_dense_block_count": 1,
                     "expert_gating_func": 2, "expert_weights_scale": 2.5, "expert_weights_norm": True,
                     "rope.dimension_count": 6, "rope.freq_base": 10000.0})
    elif arch == "exaone4":  # layers 0-2 slide (window 4, with the rotary), layer 3 is global
        cfg, cls = tf.Exaone4Config(**{**c, "num_hidden_layers": 4}, sliding_window=4, sliding_window_pattern=4,
                                    rms_norm_eps=1e-6), tf.Exaone4ForCausalLM
        meta.update({"block_count": 4, "attention.sliding_window": 4, "rope.freq_base": 10000.0,
                     "attention.sliding_window_pattern": [True, True, True, False]})
    elif arch == "olmoe":  # no renormalisation; OlmoeModel writes an epsilon of 1e-5
        cfg, cls = tf.OlmoeConfig(**{**c, "intermediate_size": 32}, num_experts=4, num_experts_per_tok=2,
                                  rms_norm_eps=1e-5), tf.OlmoeForCausalLM
        meta.update({"feed_forward_length": 32, "expert_count": 4, "expert_used_count": 2,
                     "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0})
    elif arch == "olmo":  # q, k, v clipped to 0.3
        cfg, cls = tf.OlmoConfig(**c, clip_qkv=0.3), tf.OlmoForCausalLM
        meta = {"attention.layer_norm_epsilon": 1e-5, "attention.clamp_kqv": 0.3, "rope.dimension_count": 12,
                "rope.freq_base": 10000.0}
    elif arch == "mpt":  # ALiBi, q, k, v clipped to 0.3, tied; MPTModel writes 4 x d_model and eps 1e-5
        cfg, cls = tf.MptConfig(vocab_size=vocab, d_model=48, n_heads=4, n_layers=2, max_seq_len=64,
                                attn_config={"alibi_bias_max": 8, "clip_qkv": 0.3}, bos_token_id=0,
                                eos_token_id=1), tf.MptForCausalLM
        meta = {"feed_forward_length": 192, "attention.head_count_kv": None, "attention.layer_norm_epsilon": 1e-5,
                "attention.clamp_kqv": 0.3, "attention.max_alibi_bias": 8.0}
    elif arch == "apertus":  # ApertusConfig's llama3 RoPE (theta 12e6, factor 8), stored as rope_freqs
        cfg, cls = tf.ApertusConfig(**c, rms_norm_eps=1e-6), tf.ApertusForCausalLM
        meta.update({"rope.freq_base": 12000000.0})
    else:  # Nemotron: half of each head rotated, squared ReLU
        cfg, cls = tf.NemotronConfig(**c, partial_rotary_factor=0.5, norm_eps=1e-5), tf.NemotronForCausalLM
        meta = {"attention.layer_norm_epsilon": 1e-5, "rope.dimension_count": 6, "rope.freq_base": 10000.0}
    torch.manual_seed(19)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 + 0.2 * torch.randn_like(p)) if "norm" in name else 0.15 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model, meta


def _new_gguf(tmp_path: Path, arch: str, meta_update: dict | None = None, drop: str | None = None):
    """A tiny transformers model of `arch` written into tmp_path/src/m.gguf as llama.cpp's converter
    writes it (with meta_update's metadata, None: left out; without the tensor `drop`); returns
    (model, its checkpoint, tokenizer, path)."""
    import gguf
    from safetensors.numpy import load_file

    tok = _original_tokenizer("qwen2")
    model, meta = _new_model(arch, tok.get_vocab_size())
    variant, arch = arch, {"granitemoeshared": "granitemoe"}.get(arch, arch)  # the GGUF architecture
    c = model.config
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    with torch.no_grad():
        for name, p in model.named_parameters():
            if arch == "gpt-oss" and name.endswith(("gate_up_proj", "down_proj")):  # the MXFP4 values
                q = gguf.quants.quantize(p.transpose(-1, -2).numpy().copy(), mxfp4)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, mxfp4)).transpose(-1, -2))
            if arch == "llama4" and ".layers.1.feed_forward.experts." in name:  # stored as F16
                p.copy_(p.half().float())
    model.save_pretrained(tmp_path / "hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "src").mkdir()
    path = tmp_path / "src" / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    sizes = {"block_count": c.num_hidden_layers, "context_length": 64, "embedding_length": c.hidden_size,
             "feed_forward_length": 80, "attention.head_count": 4, "attention.head_count_kv": 2}
    _add_meta(w, arch, {**sizes, **meta, **(meta_update or {})})
    _add_bpe_tokenizer(w, tok, "qwen2", False)
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     c.num_hidden_layers)
    experts: dict[str, dict] = {}  # OLMoE's per-expert tensors, stacked per block as the converter does
    if arch == "apertus":  # ApertusModel: xIELU's scalars as metadata
        for key in ("alpha_p", "alpha_n", "beta", "eps"):
            w.add_array(f"xielu.{key}", [float(sd[f"model.layers.{i}.mlp.act_fn.{key}"].reshape(-1)[0])
                                         for i in range(c.num_hidden_layers)])
    if arch in ("apertus", "llama4"):  # LlamaModel: the llama3 RoPE as the factors rope_freqs
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        theta = c.rope_parameters["rope_theta"]
        plain = 1.0 / theta ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12)
        scaled = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")[0].double()
        w.add_tensor("rope_freqs.weight", (plain / scaled).float().numpy())
    for name, a in sd.items():
        if ".act_fn." in name:
            continue
        if arch in ("olmo", "granitemoe", "arcee") and name.endswith(("q_proj.weight", "k_proj.weight")):
            # OlmoModel, GraniteMoeModel, ArceeModel: LlamaModel.permute
            a = permute_qk(a, 4 if "q_proj" in name else 2)
        if arch == "nemotron" and name.endswith("norm.weight"):  # NemotronModel: LayerNorm1P's weight + 1
            a = a + np.float32(1.0)
        if name.endswith("input_linear.weight"):  # GraniteMoeModel: the gate rows and the up rows apart
            i, kind = name.split(".")[2], "exps" if ".block_sparse_moe." in name else "shexp"
            if variant == "granitemoeshared" and kind == "exps":  # --fuse-gate-up-exps: as the checkpoint
                _add_new_tensor(w, arch, f"blk.{i}.ffn_gate_up_exps.weight", a, name, drop)
                continue
            for part, t in zip(("ffn_gate", "ffn_up"), np.split(a, 2, axis=-2)):
                _add_new_tensor(w, arch, f"blk.{i}.{part}_{kind}.weight", np.ascontiguousarray(t), name, drop)
            continue
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault(f"model.layers.{m[1]}.mlp.experts.{m[3]}.weight", {})[int(m[2])] = a
            continue
        if ".experts.gate_up_proj" in name:  # [expert, in, out] -> [expert, out, in], gate / up apart
            b = np.swapaxes(a, -1, -2) if a.ndim == 3 else a
            gate, up = (b[:, ::2], b[:, 1::2]) if arch == "gpt-oss" else np.split(b, 2, axis=1)
            kind = "bias" if name.endswith("_bias") else "weight"
            i = name.split(".")[2]
            for part, t in (("ffn_gate_exps", gate), ("ffn_up_exps", up)):
                _add_new_tensor(w, arch, f"blk.{i}.{part}.{kind}", np.ascontiguousarray(t), name, drop)
            continue
        if ".experts.down_proj" in name:
            kind = "bias" if name.endswith("_bias") else "weight"
            t = a if kind == "bias" else np.ascontiguousarray(np.swapaxes(a, -1, -2))
            _add_new_tensor(w, arch, f"blk.{name.split('.')[2]}.ffn_down_exps.{kind}", t, name, drop)
            continue
        if name.endswith("e_score_correction_bias"):  # the converter's rename
            name = name.replace("_bias", ".bias")
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if name.endswith(".sinks"):  # GptOssModel.filter_tensors
            gname += ".weight"
        _add_new_tensor(w, arch, gname, a, name, drop)
    for name, parts in experts.items():
        w.add_tensor(names.get_name(name, try_suffixes=(".weight",)), np.stack([parts[e] for e in sorted(parts)]))
    if arch == "glm4moe":  # a multi-token-prediction layer (Glm4MoeModel: after the model's layers)
        w.add_tensor("blk.2.nextn.eh_proj.weight", np.zeros((48, 96), dtype=np.float32))
        w.add_tensor("blk.2.attn_norm.weight", np.ones(48, dtype=np.float32))
    _write(w)
    return model, sd, tok, path


def _add_new_tensor(w, arch: str, gname: str, a: np.ndarray, name: str, drop: str | None) -> None:
    """gpt-oss's expert weights as MXFP4 (GptOssModel.repack_mxfp4); Llama 4's layer 1 experts as
    F16; `drop` left out."""
    import gguf

    if gname == drop:
        return
    if arch == "gpt-oss" and "_exps." in gname and gname.endswith(".weight"):
        mxfp4 = gguf.GGMLQuantizationType.MXFP4
        w.add_tensor(gname, gguf.quants.quantize(a, mxfp4), raw_dtype=mxfp4)
    elif arch == "llama4" and ".layers.1.feed_forward.experts." in name:
        w.add_tensor(gname, a.astype(np.float16))
    else:
        w.add_tensor(gname, a)


@pytest.mark.parametrize("arch", _NEW_GGUF)
def test_new_gguf_runs_like_transformers(tmp_path, arch):
    hf, sd, tok, path = _new_gguf(tmp_path, arch)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    if arch in ("exaone4", "gpt-oss", "llama4"):
        assert cfg["layer_types"] == hf.config.layer_types
    if arch == "glm4moe":
        assert cfg["num_hidden_layers"] == 2 and src.warnings == [
            "the multi-token-prediction layers (blk.2) were skipped: Glm4MoeForCausalLM does not run them"]
    assert {t.name for t in src.tensors()} == set(sd)  # Llama 4's and gpt-oss's experts stacked, as saved
    for t in src.tensors():  # the checkpoint's names, shapes and layout
        assert t.shape == sd[t.name].shape, t.name
        tol = 1e-6 if arch == "nemotron" and t.name.endswith("norm.weight") else 0  # +1 taken off (float32)
        np.testing.assert_allclose(src.load(t.name), sd[t.name], rtol=0, atol=tol, err_msg=t.name)
        np.testing.assert_allclose(src.load_raw(t.name).astype(np.float32), sd[t.name], rtol=0, atol=tol,
                                   err_msg=t.name)
    if arch == "llama4":  # joined from F16 parts: F16; from F32 ones: F32
        assert src.tensor("model.layers.1.feed_forward.experts.gate_up_proj").dtype == "float16"
        assert src.tensor("model.layers.3.feed_forward.experts.down_proj").dtype == "float32"
    if arch == "gpt-oss":  # from MXFP4: the dequantized values
        assert src.tensor("model.layers.0.mlp.experts.gate_up_proj").dtype == "float32"
    _runs_like_transformers(tmp_path, path, hf, tok.encode(_CORPUS[0]).ids[:20])


@pytest.mark.parametrize("arch,meta,drop,message", [
    ("llama4", {"attention.sliding_window": 0}, None, "only Llama 4's chunked attention"),
    ("llama4", {"interleave_moe_layer_step": None}, None, "lacks the metadata 'llama4.interleave_moe_layer_step'"),
    ("llama4", None, "blk.3.ffn_up_exps.weight", "block 3 has ffn_gate_exps without ffn_up_exps"),
    ("gpt-oss", {"attention.sliding_window": None}, None, "lacks the metadata 'gpt-oss.attention.sliding_window'"),
    ("gpt-oss", None, "blk.1.ffn_down_exps.weight", "lacks the weight for model.layers.1.mlp.experts.down_proj"),
    ("mpt", {"attention.max_alibi_bias": 0.0}, None, "an mpt GGUF without ALiBi"),
    ("apertus", {"rope.freq_base": 10000.0}, None, "this apertus GGUF's rope_freqs are not the llama3 factors"),
    ("llama4", {"rope.freq_base": 10000.0}, None, "this llama4 GGUF's rope_freqs are not the llama3 factors"),
    ("glm4moe", {"expert_gating_func": 1}, None, "GLM-4.5's router is a sigmoid (2)"),
    ("gpt-oss", {"expert_feed_forward_length": 32}, None, "'blk.0.ffn_gate_exps.weight' has shape [4, 64, 64] but "
                                                          "the metadata implies [4, 32, 64]"),
])
def test_new_gguf_that_cannot_be_rebuilt_is_refused(tmp_path, arch, meta, drop, message):
    """A layout llama.cpp runs otherwise than the checkpoint class, missing metadata, and stacked
    experts that do not fit are refused with a clear message."""
    *_, path = _new_gguf(tmp_path, arch, meta, drop)
    with pytest.raises(InputError, match=re.escape(message)):
        open_source(path).config()


def test_chatglm_gguf_of_thudm_layout_is_refused(tmp_path):
    """ChatGLM's own layout (one attn_qkv: ChatGLMForConditionalGeneration, remote code) is refused."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "chatglm")
    for k, v in {"block_count": 1, "context_length": 64, "embedding_length": 8, "feed_forward_length": 32,
                 "attention.head_count": 2, "attention.head_count_kv": 2}.items():
        w.add_uint32(f"chatglm.{k}", v)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((24, 8), dtype=np.float32))
    _write(w)
    with pytest.raises(UnsupportedArchitectureError, match="only GLM-4's Hugging Face layout"):
        open_source(tmp_path / "m.gguf")


# Granite MoE (the experts stacked in the checkpoint: input_linear [expert, 2 x width, hidden] split
# into ffn_gate_exps / ffn_up_exps, or one ffn_gate_up_exps with --fuse-gate-up-exps; the shared
# expert's input_linear split too), ERNIE 4.5 and its MoE (an MoE block every other layer after a
# dense one, the routing bias moe_statics [1, experts]), Arcee (squared ReLU, q / k permuted, YaRN),
# Seed-OSS (q/k/v biases, post_attention_norm before the MLP), dots.llm1 (DeepSeek-V3's sigmoid
# router with its bias, q/k norms, a dense first layer) and Hunyuan MoE (its NTK-alpha RoPE stored as
# the base it gives, q/k norms after the rotary, a shared expert), written by _new_gguf.
_NEWER_GGUF = ["granitemoe", "granitemoeshared", "ernie4_5", "ernie4_5-moe", "arcee", "seed_oss", "dots1",
               "hunyuan-moe"]


def _newer_config(arch: str, c: dict, meta: dict):
    """(config, class, the metadata llama.cpp's converter writes beyond the sizes) of _NEWER_GGUF."""
    import transformers as tf

    if arch.startswith("granitemoe"):  # GraniteModel drops head_dim; the shared expert 40 wide
        shared = {"shared_intermediate_size": 40} if arch == "granitemoeshared" else {}
        cls = tf.GraniteMoeSharedForCausalLM if shared else tf.GraniteMoeForCausalLM
        cfg = (tf.GraniteMoeSharedConfig if shared else tf.GraniteMoeConfig)(
            **{k: v for k, v in c.items() if k != "head_dim"} | {"intermediate_size": 32}, num_local_experts=4,
            num_experts_per_tok=2, embedding_multiplier=3.0, residual_multiplier=0.3, attention_multiplier=0.05,
            logits_scaling=4.0, rms_norm_eps=1e-6, **shared)
        meta.update({"feed_forward_length": 32, "expert_count": 4, "expert_used_count": 2, "embedding_scale": 3.0,
                     "residual_scale": 0.3, "attention.scale": 0.05, "logit_scale": 4.0, "rope.freq_base": 10000.0,
                     **({"expert_shared_feed_forward_length": 40} if shared else {})})
    elif arch == "ernie4_5":  # tied
        cfg, cls = tf.Ernie4_5Config(**c, rms_norm_eps=1e-6), tf.Ernie4_5ForCausalLM
        meta.update({"rope.freq_base": 500000.0, "attention.key_length": 12, "attention.value_length": 12})
    elif arch == "ernie4_5-moe":  # layers 1 and 3 MoE; the converter's shared width: intermediate_size / kv heads
        cfg, cls = tf.Ernie4_5_MoeConfig(**{**c, "num_hidden_layers": 4}, moe_num_experts=4, moe_k=2,
                                         moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1,
                                         moe_layer_interval=2, rms_norm_eps=1e-6), tf.Ernie4_5_MoeForCausalLM
        meta.update({"block_count": 4, "rope.freq_base": 500000.0, "attention.key_length": 12,
                     "attention.value_length": 12, "expert_count": 4, "expert_used_count": 2,
                     "interleave_moe_layer_step": 2, "leading_dense_block_count": 1, "expert_feed_forward_length": 32,
                     "expert_shared_count": 1, "expert_shared_feed_forward_length": 40})
    elif arch == "arcee":  # AFM's YaRN, with transformers' defaults for what the converter does not store
        cfg, cls = tf.ArceeConfig(**c, rms_norm_eps=1e-6, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}), \
            tf.ArceeForCausalLM
        meta.update({"rope.freq_base": 10000.0, "attention.key_length": 12, "attention.value_length": 12,
                     "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                     "rope.scaling.original_context_length": 16})
    elif arch == "seed_oss":
        cfg, cls = tf.SeedOssConfig(**c, attention_bias=True, rms_norm_eps=1e-6), tf.SeedOssForCausalLM
        meta.update({"rope.freq_base": 10000.0, "attention.key_length": 12, "attention.value_length": 12})
    elif arch == "hunyuan-moe":  # HunYuanMoEModel: the base scaled by alpha ** (dim / (dim - 2)), no scaling type
        cfg, cls = tf.HunYuanMoEV1Config(**c, num_experts=4, moe_topk=2, moe_intermediate_size=80, rms_norm_eps=1e-6,
                                         attention_bias=True, rope_parameters={
                                             "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                             "rope_theta": 10000.0}), tf.HunYuanMoEV1ForCausalLM
        meta.update({"rope.freq_base": 10000.0 * 1000.0 ** (12 / 10), "rope.scaling.type": "none",
                     "rope.scaling.factor": 1.0, "attention.key_length": 12, "attention.value_length": 12,
                     "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 80,
                     "expert_shared_feed_forward_length": 80, "expert_shared_count": 1})
    else:  # dots.llm1: layer 0 dense; a sigmoid router with its bias, renormalised and scaled
        cfg, cls = tf.Dots1Config(**c, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                  n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
                                  routed_scaling_factor=2.5, rms_norm_eps=1e-6), tf.Dots1ForCausalLM
        meta.update({"rope.freq_base": 10000.0, "attention.key_length": 12, "attention.value_length": 12,
                     "expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32,
                     "leading_dense_block_count": 1, "expert_shared_count": 1, "expert_weights_scale": 2.5,
                     "expert_weights_norm": True, "expert_gating_func": 2, "expert_group_count": 1,
                     "expert_group_used_count": 1})
    return cfg, cls, meta


@pytest.mark.parametrize("arch", _NEWER_GGUF)
def test_newer_gguf_runs_like_transformers(tmp_path, arch):
    hf, sd, tok, path = _new_gguf(tmp_path, arch)
    src = open_source(path)
    cfg = src.config()
    assert (cfg["model_type"], cfg["architectures"]) == (hf.config.model_type, [type(hf).__name__])
    assert {t.name for t in src.tensors()} == set(sd)  # Granite MoE's experts stacked, as saved
    for t in src.tensors():  # the checkpoint's names, shapes and layout
        assert t.shape == sd[t.name].shape, t.name
        np.testing.assert_array_equal(src.load(t.name), sd[t.name], err_msg=t.name)
        np.testing.assert_array_equal(src.load_raw(t.name), sd[t.name], err_msg=t.name)
    if arch == "ernie4_5-moe":  # MoE blocks on layers 1 and 3 only
        assert (cfg["moe_layer_start_index"], cfg["moe_layer_interval"], cfg["moe_layer_end_index"]) == (1, 2, 3)
    if arch == "arcee":
        assert cfg["rope_scaling"]["rope_type"] == "yarn" and cfg["rope_scaling"]["factor"] == 4.0
    if arch.startswith("granitemoe"):
        assert [cfg[k] for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                                 "logits_scaling", "shared_intermediate_size")] == [
            3.0, 0.3, 0.05, 4.0, 40 if arch == "granitemoeshared" else 0]
    _runs_like_transformers(tmp_path, path, hf, tok.encode(_CORPUS[0]).ids[:20])


@pytest.mark.parametrize("arch,meta,drop,message", [
    ("granitemoe", {"expert_count": None}, None, "a granitemoe GGUF without experts"),
    ("granitemoe", None, "blk.1.ffn_up_exps.weight", "block 1 has ffn_gate_exps without ffn_up_exps"),
    ("granitemoeshared", None, "blk.0.ffn_up_shexp.weight", "block 0 has ffn_gate_shexp without ffn_up_shexp"),
    ("granitemoe", {"feed_forward_length": 16}, None, "'blk.0.ffn_gate_exps.weight' has shape [4, 32, 48] but the "
                                                      "metadata implies [4, 16, 48]"),
    ("ernie4_5-moe", {"interleave_moe_layer_step": None}, None,
     "lacks the metadata 'ernie4_5-moe.interleave_moe_layer_step'"),
    ("ernie4_5-moe", {"leading_dense_block_count": 2}, None, "lacks the weight for model.layers.1.mlp.gate_proj"),
    ("dots1", {"expert_gating_func": 1}, None, "dots.llm1's router is a sigmoid (2)"),
    ("hunyuan-moe", {"expert_feed_forward_length": 32}, None,
     "HunYuanMoEV1ForCausalLM's experts are intermediate_size wide"),
])
def test_newer_gguf_that_cannot_be_rebuilt_is_refused(tmp_path, arch, meta, drop, message):
    """No experts, a lone half of a split gate / up, experts or layouts that do not fit the metadata,
    and a router other than the checkpoint's are refused with a clear message."""
    *_, path = _new_gguf(tmp_path, arch, meta, drop)
    with pytest.raises(InputError, match=re.escape(message)):
        open_source(path).config()


# -- checkpoints already quantized -------------------------------------------------------------

def _fp8_blocks(w: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [r, c] -> (float8 e4m3 values, float32 scale_inv [ceil(r / bm), ceil(c / bn)]) as the
    fine-grained fp8 checkpoints store it (DeepSeek-V3's block quantizer: amax / 448 per block)."""
    r, c = w.shape
    R, C = -(-r // bm), -(-c // bn)
    pad = torch.zeros(R * bm, C * bn)
    pad[:r, :c] = w
    blocks = pad.view(R, bm, C, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(R * bm, C * bn)[:r, :c].contiguous()
    return q, scale.float()


def _fp8_model(tmp_path: Path, bm: int = 32, bn: int = 48):
    """A tiny Llama stored as a fine-grained fp8 checkpoint (the blocks' weights float8 with
    weight_scale_inv, the rest bfloat16), and the same model with those weights dequantized by
    torch (float32 folder): (fp8 folder, dequantized folder, names of the fp8 weights)."""
    import transformers as tf
    from test_runner import _write_tokenizer

    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(cfg).eval()
    fp8, deq, names = tmp_path / "fp8", tmp_path / "deq", []
    m.save_pretrained(deq)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    stored = {}
    for k, v in sd.items():
        if v.dim() == 2 and ".layers." in k:
            q, s = _fp8_blocks(v.float(), bm, bn)
            stored[k], stored[k + "_scale_inv"] = q, s
            sd[k] = q.float() * s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:v.shape[0], :v.shape[1]]
            names.append(k)
        else:
            stored[k] = v.to(torch.bfloat16)
            sd[k] = stored[k].float()
    fp8.mkdir()
    save_file(stored, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    save_file(sd, str(deq / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [bm, bn]}
    (fp8 / "config.json").write_text(json.dumps({**json.loads((deq / "config.json").read_text()),
                                                 "quantization_config": qc}))
    for d in (fp8, deq):
        _write_tokenizer(d)
    return fp8, deq, names


def test_fp8_block_scaled_checkpoint_reads_as_its_values(tmp_path):
    """DeepSeek-V3 / Qwen3-FP8 style checkpoints: each float8 weight reads as its values times
    its block of weight_scale_inv (blocks that do not divide the shape cut at the edge), the scale
    tensors are not listed; the runner, and kbit quantize of it, give what they give for the same
    weights dequantized by torch."""
    from kbitcli.cli.main import main
    from kbitcli.runner import load

    fp8, deq, names = _fp8_model(tmp_path)
    src, ref = open_source(fp8), open_source(deq)
    assert {t.name for t in src.tensors()} == {t.name for t in ref.tensors()}
    for n in names:
        assert src.tensor(n).dtype == "float8_e4m3fn"
        np.testing.assert_array_equal(src.load(n), ref.load(n), err_msg=n)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64]])
    with torch.no_grad():
        want = load(deq)[0](ids)
        assert torch.equal(load(fp8)[0](ids), want)
        for d in (fp8, deq):
            assert main(["quantize", str(d), str(tmp_path / f"q-{d.name}"), "-k", "8", "--quiet"]) == 0
        a, b = load(tmp_path / "q-fp8")[0](ids), load(tmp_path / "q-deq")[0](ids)
    assert torch.equal(a, b)
    assert (a - want).abs().max().item() < 0.05 * want.abs().max().item()
    out_cfg = json.loads((tmp_path / "q-fp8" / "config.json").read_text())
    assert out_cfg["quantization_config"]["quant_method"] == "kbit"


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 4}, "is already quantized (gptq"),
    ({"quant_method": "awq"}, "is already quantized (awq"),
    ({"quant_method": "fp8"}, "is already quantized (fp8 with weight_block_size None"),
])
def test_quantized_checkpoint_of_another_kind_is_refused(tmp_path, qc, message, capsys):
    from kbitcli.cli.main import main

    fp8, _, _ = _fp8_model(tmp_path)
    cfg = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    capsys.readouterr()
    assert main(["quantize", str(fp8), str(tmp_path / "out"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_fp8_weight_without_its_scales_is_refused(tmp_path):
    from safetensors.torch import load_file

    fp8, _, names = _fp8_model(tmp_path)
    sd = load_file(str(fp8 / "model.safetensors"))
    del sd[names[0] + "_scale_inv"]
    save_file(sd, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="has no block scales"):
        open_source(fp8)


def test_quantized_bin_checkpoint_is_refused(tmp_path):
    """The same check for PyTorch .bin folders (fp8 block scales are read from safetensors only)."""
    d = tmp_path / "bin"
    d.mkdir()
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.zeros(4, 4)}, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                       "weight_block_size": [128, 128]}}))
    with pytest.raises(InputError, match=r"already quantized \(fp8.*kbit converts float checkpoints \(bf16, fp16, "
                                         r"fp32\): convert from the original model"):
        open_source(d)
