"""`kbit quantize / inspect / verify / dequantize` end to end on real files, and bad input."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from kbitcli.cli.main import main
from kbitformat import QuantSpec, dequantize, quantize
from kbitformat.io import KbitReader

KBIT = [sys.executable, "-m", "kbitcli"]
rng = np.random.default_rng(3)

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 100, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": True, "max_position_embeddings": 128}


def llama_tensors(layers=2, h=64, f=96, v=100, dtype=np.float32):
    t = {"model.embed_tokens.weight": rng.standard_normal((v, h)), "model.norm.weight": np.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": rng.standard_normal((h, h)),
                  p + "self_attn.k_proj.weight": rng.standard_normal((h // 2, h)),
                  p + "self_attn.v_proj.weight": rng.standard_normal((h // 2, h)),
                  p + "self_attn.o_proj.weight": rng.standard_normal((h, h)),
                  p + "mlp.gate_proj.weight": rng.standard_normal((f, h)),
                  p + "mlp.up_proj.weight": rng.standard_normal((f, h)),
                  p + "mlp.down_proj.weight": rng.standard_normal((h, f)),
                  p + "input_layernorm.weight": np.ones(h), p + "post_attention_layernorm.weight": np.ones(h)})
    return {k: (0.02 * a).astype(dtype) for k, a in t.items()}


def make_model(folder: Path, shards=2, tensors=None, config=CONFIG) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensors or llama_tensors()
    names = list(tensors)
    per = -(-len(names) // shards)
    wm = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        wm.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return tensors


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def model(tmp_path):
    src = tmp_path / "src"
    return src, make_model(src)


def test_quantize_default_recipe_json_and_outputs(model, tmp_path, capsys):
    src, tensors = model
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", src, out, "--json", "--quiet"], capsys)
    assert code == 0, err
    d = json.loads(stdout)
    byname = {t["name"]: t for t in d["tensors"]}
    assert byname["model.layers.0.mlp.up_proj.weight"]["quantized"]
    assert byname["model.layers.0.mlp.up_proj.weight"]["bits_per_weight"] == pytest.approx(4.25)
    assert not byname["model.embed_tokens.weight"]["quantized"]
    assert not byname["model.norm.weight"]["quantized"]
    assert d["parameters"] == sum(a.size for a in tensors.values())
    # bits overall: 4-bit codes of padded rows + one fp16 scale per block of 64; 32 on kept fp32 tensors
    bits = 0
    for n, a in tensors.items():
        if byname[n]["quantized"]:
            nb = -(-a.shape[1] // 64)
            bits += a.shape[0] * nb * (64 * 4 + 16)
        else:
            bits += 32 * a.size
    assert byname["model.layers.0.mlp.down_proj.weight"]["bits_per_weight"] == pytest.approx(128 * 4.25 / 96)
    assert d["bits_per_weight"] == pytest.approx(bits / d["parameters"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model-00001-of-00001.safetensors",
                                                     "model.safetensors.index.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "kbit" and cfg["hidden_size"] == 64
    r = KbitReader(out)
    # every quantized tensor equals an independent quantization of the same source tensor
    for name, x in tensors.items():
        if byname[name]["quantized"]:
            assert np.array_equal(r.load(name), dequantize(quantize(x, QuantSpec(4, "nf", 64))))
        else:
            assert np.array_equal(r.load(name), x)
    assert not list(tmp_path.glob(".*kbit-partial"))


def test_rules_skip_and_warning(model, tmp_path, capsys):
    src, _ = model
    out = tmp_path / "out"
    code, stdout, err = run(["quantize", src, out, "--json", "-q", "--rule", "*.mlp.down_proj.weight=6:fp",
                             "--rule", "model.embed_tokens.weight=8:int:b32", "--skip", "*.layers.1.self_attn.*",
                             "--rule", "no.such.*=3"], capsys)
    assert code == 0, err
    assert "no.such.*" in err and "matches no tensor" in err
    t = {x["name"]: x for x in json.loads(stdout)["tensors"]}
    assert t["model.layers.0.mlp.down_proj.weight"]["spec"] == "6:fp:b64:fp16"
    assert t["model.embed_tokens.weight"]["spec"] == "8:int:b32:fp16"
    assert not t["model.layers.1.self_attn.q_proj.weight"]["quantized"]
    assert t["model.layers.0.self_attn.q_proj.weight"]["spec"] == "4:nf:b64:fp16"
    r = KbitReader(out)
    assert r.recipe("model.layers.0.mlp.down_proj.weight")["dtype"] == "fp"
    assert r.model_metadata["recipe"]["rules"][0] == "*.mlp.down_proj.weight=6:fp:b64:fp16"


def test_default_recipe_keeps_moe_routers():
    """MoE routers stay unquantized by default (as llama.cpp keeps ffn_gate_inp); the experts and
    a gated MLP's gate_proj are quantized; a rule can still quantize a router."""
    from kbitcli.recipe import Recipe
    recipe = Recipe.build(QuantSpec(4, "nf", 64))
    kept = ["model.layers.0.block_sparse_moe.gate.weight", "model.layers.3.mlp.gate.weight"]
    quantized = ["model.layers.0.block_sparse_moe.experts.3.w1.weight", "model.layers.3.mlp.experts.0.gate_proj.weight",
                 "model.layers.3.mlp.shared_expert.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    for name in kept + quantized:
        assert (recipe.spec_for(name, (8, 64), True) is None) == (name in kept), name
    assert recipe.spec_for("model.layers.3.mlp.shared_expert_gate.weight", (1, 64), True) is None
    assert recipe.spec_for("model.layers.3.mlp.shared_expert_gate.weight", (2, 64), True) is None  # by name too
    # GLM-4.5's (DeepSeek-V3's) routing bias: 1-D, never quantized by default
    assert recipe.spec_for("model.layers.3.mlp.gate.e_score_correction_bias", (8,), True) is None
    # Hunyuan MoE's router (mlp.gate.wg); its experts and shared MLP are quantized
    assert recipe.spec_for("model.layers.3.mlp.gate.wg.weight", (8, 64), True) is None
    assert recipe.spec_for("model.layers.3.mlp.shared_mlp.gate_proj.weight", (8, 64), True) is not None
    ruled = Recipe.build(QuantSpec(4, "nf", 64), ["*.gate.weight=8:int"])
    assert ruled.spec_for(kept[0], (8, 64), True).label() == "8:int:b64:fp16"


@pytest.mark.parametrize("args,code,msg", [
    (["--rule", "oops"], 2, "PATTERN=SPEC"),
    (["--rule", "*.weight=4:nope"], 2, "nope"),
    (["--bits", "9"], 2, "bits"),
    (["--block-size", "48"], 2, "multiple of 32"),
    (["--dtype", "int3"], 2, "data type"),
    (["--shard-size", "lots"], 2, "size"),
])
def test_bad_flags_fail_before_any_work(model, tmp_path, capsys, args, code, msg):
    src, _ = model
    c, _, err = run(["quantize", src, tmp_path / "out"] + args, capsys)
    assert c == code and msg in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_output_exists_inside_source_and_force(model, tmp_path, capsys):
    src, _ = model
    out = tmp_path / "out"
    assert run(["quantize", src, out, "-q"], capsys)[0] == 0
    c, _, err = run(["quantize", src, out, "-q"], capsys)
    assert c == 5 and "--force" in err
    assert run(["quantize", src, out, "-q", "--force", "--bits", "3"], capsys)[0] == 0
    assert KbitReader(out).recipe("model.layers.0.mlp.up_proj.weight")["bits"] == 3
    c, _, err = run(["quantize", src, src / "inner", "-q"], capsys)
    assert c == 2 and "inside the source" in err


def test_missing_truncated_and_corrupt_sources(model, tmp_path, capsys):
    src, _ = model
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    c, _, err = run(["quantize", bad, tmp_path / "o1"], capsys)
    assert c == 3 and "00002" in err and "Traceback" not in err
    shutil.rmtree(bad)
    shutil.copytree(src, bad)
    f = bad / "model-00001-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    c, _, err = run(["quantize", bad, tmp_path / "o2"], capsys)
    assert c == 3 and "Traceback" not in err
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    c, _, err = run(["quantize", bad, tmp_path / "o3"], capsys)
    assert c == 3 and "Traceback" not in err
    c, _, err = run(["quantize", tmp_path / "nowhere", tmp_path / "o4"], capsys)
    assert c == 3 and "no such file" in err
    assert not any(p.name.startswith(("o1", "o2", "o3", "o4")) for p in tmp_path.iterdir())


def test_an_architecture_the_runner_cannot_run_converts_with_a_warning(tmp_path, capsys):
    src = tmp_path / "src"
    make_model(src, config={**CONFIG, "architectures": ["RwkvForCausalLM"], "model_type": "rwkv"})
    c, out, err = run(["quantize", src, tmp_path / "q", "--json", "--quiet"], capsys)
    assert c == 0, err
    assert "does not run RwkvForCausalLM" in err and "kbit dequantize" in err
    assert any("RwkvForCausalLM" in w for w in json.loads(out)["warnings"])
    make_model(tmp_path / "llama")  # a supported one: no such warning
    c, out, err = run(["quantize", tmp_path / "llama", tmp_path / "q3", "--json", "--quiet"], capsys)
    assert c == 0 and json.loads(out)["warnings"] == [] and "warning" not in err


def test_a_kbit_model_is_not_a_source(model, tmp_path, capsys):
    """Converting a kbit output again would copy its packed codes and scales as if they were
    weights and write a model that looks complete: refused, pointing at kbit dequantize, for
    the folder and for one of its shard files; the dequantized checkpoint converts."""
    src, _ = model
    c, _, err = run(["quantize", src, tmp_path / "q", "--quiet"], capsys)
    assert c == 0, err
    shard = next((tmp_path / "q").glob("*.safetensors"))
    for again in (tmp_path / "q", shard):
        c, _, err = run(["quantize", again, tmp_path / "again", "--quiet"], capsys)
        assert c == 3 and "kbit dequantize" in err and "Traceback" not in err
        assert not any(p.name.startswith("again") for p in tmp_path.iterdir())
    c, _, err = run(["sweep", tmp_path / "q", "-k", "4", "-t", "int", "-b", "64", "--text", __file__,
                     "--out", tmp_path / "sw"], capsys)
    assert c == 3 and "kbit dequantize" in err
    c, _, err = run(["dequantize", tmp_path / "q", tmp_path / "plain"], capsys)
    assert c == 0, err
    c, _, err = run(["quantize", tmp_path / "plain", tmp_path / "again", "--quiet"], capsys)
    assert c == 0, err


class Evil:
    """Any object outside torch's weights_only allow-list."""


def test_pickle_bin_is_refused(tmp_path, capsys):
    import torch
    src = tmp_path / "binmodel"
    src.mkdir()
    torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(4, 64), "x": Evil()}, src / "pytorch_model.bin")
    c, _, err = run(["quantize", src, tmp_path / "out"], capsys)
    assert c == 3 and "Traceback" not in err and not (tmp_path / "out").exists()


def test_nan_weights_name_the_tensor(tmp_path, capsys):
    t = llama_tensors()
    t["model.layers.1.mlp.up_proj.weight"][3, 3] = np.nan
    src = tmp_path / "src"
    make_model(src, tensors=t)
    c, _, err = run(["quantize", src, tmp_path / "out"], capsys)
    assert c == 2 and "model.layers.1.mlp.up_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # the documented way out: keep it unquantized
    c, _, err = run(["quantize", src, tmp_path / "out", "-q", "--skip", "model.layers.1.mlp.up_proj.weight"], capsys)
    assert c == 0, err


def test_integer_tensor_passes_through_but_cannot_be_quantized(tmp_path, capsys):
    t = llama_tensors()
    t["model.layers.0.mlp.up_proj.weight"] = rng.integers(-100, 100, size=(96, 64)).astype(np.int8)
    src = tmp_path / "src"
    make_model(src, tensors=t)
    assert run(["quantize", src, tmp_path / "out", "-q"], capsys)[0] == 0
    assert np.array_equal(KbitReader(tmp_path / "out").load("model.layers.0.mlp.up_proj.weight"),
                          t["model.layers.0.mlp.up_proj.weight"])
    c, _, err = run(["quantize", src, tmp_path / "out2", "--rule", "*.up_proj.weight=4"], capsys)
    assert c == 2 and "int8" in err


def test_bf16_source_keeps_bf16(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file as save_pt
    src = tmp_path / "src"
    src.mkdir()
    t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in llama_tensors().items()}
    save_pt(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(CONFIG))
    assert run(["quantize", src, tmp_path / "out", "-q"], capsys)[0] == 0
    r = KbitReader(tmp_path / "out")
    assert r.stored["model.norm.weight"].dtype == "BF16"
    emb = t["model.embed_tokens.weight"].float().numpy()
    assert np.array_equal(r.load("model.embed_tokens.weight"), emb)
    assert r.recipe("model.layers.0.mlp.up_proj.weight")["orig_dtype"] == "bfloat16"


def test_no_error_same_bytes_without_recorded_errors(model, tmp_path, capsys):
    """--no-error skips the per-tensor error measurement: the same codes and scales (the
    stored tensors bit for bit), recipes with "error": null, errors null in --json; inspect and
    verify still work."""
    from kbitformat.io import read_header
    src, _ = model
    assert run(["quantize", src, tmp_path / "a", "-q"], capsys)[0] == 0
    c, stdout, _ = run(["quantize", src, tmp_path / "b", "--no-error", "--json"], capsys)
    d = json.loads(stdout)
    assert c == 0 and all(t["error"] is None for t in d["tensors"]) and any(t["quantized"] for t in d["tensors"])
    fa, fb = (tmp_path / x / "model-00001-of-00001.safetensors" for x in ("a", "b"))
    (_, sa, ka), (_, sb, kb) = read_header(fa), read_header(fb)
    assert {n: t.crc for n, t in sa.items()} == {n: t.crc for n, t in sb.items()}
    assert all(r["error"] > 0 for r in ka["kbit.tensors"].values() if r["quantized"])
    assert all(r.get("error") is None for r in kb["kbit.tensors"].values())
    assert run(["inspect", tmp_path / "b"], capsys)[0] == 0
    assert run(["verify", tmp_path / "b", "--against", src], capsys)[0] == 0


def test_inspect_and_verify(model, tmp_path, capsys):
    src, tensors = model
    out = tmp_path / "out"
    assert run(["quantize", src, out, "-q"], capsys)[0] == 0
    c, stdout, _ = run(["inspect", out, "--json"], capsys)
    d = json.loads(stdout)
    assert c == 0 and d["format_version"] == "1.0" and d["parameters"] == sum(a.size for a in tensors.values())
    c, stdout, _ = run(["inspect", out], capsys)
    # piped (not a terminal): every tensor's whole name on its line, for grep
    assert c == 0 and all(any(line.startswith(f"│ {t['name']} ") for line in stdout.splitlines()) for t in d["tensors"])
    c, stdout, err = run(["verify", out, "--against", src, "--json"], capsys)
    d = json.loads(stdout)
    assert c == 0 and d["ok"] and 0.05 < d["max_error"] < 0.15
    c, _, err = run(["verify", out, "--against", src, "--max-error", "0.01"], capsys)
    assert c == 1 and "exceeds" in err
    f = out / "model-00001-of-00001.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF
    f.write_bytes(bytes(data))
    c, _, err = run(["verify", out], capsys)
    assert c == 1 and "corrupt" in err
    c, _, err = run(["inspect", tmp_path / "nothing"], capsys)
    assert c == 2


def test_dequantize_loads_in_transformers(tmp_path, capsys):
    import torch
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    src = tmp_path / "hf"
    ref.save_pretrained(src)
    out, deq = tmp_path / "q", tmp_path / "deq"
    assert run(["quantize", src, out, "-q", "--bits", "5", "--dtype", "affine"], capsys)[0] == 0
    assert run(["dequantize", out, deq, "--dtype", "float32", "-q"], capsys)[0] == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(deq)
    r = KbitReader(out)
    sd = model.state_dict()
    for name in r.names():
        assert np.array_equal(sd[name].numpy(), r.load(name)), name
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=0.5) and not torch.equal(a, b)


def test_disk_full_removes_partial_output(model, tmp_path):
    src, _ = model
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        p = subprocess.run(KBIT + ["quantize", str(src), str(mnt / "out"), "--block-size", "32"],
                           capture_output=True, text=True)
        assert p.returncode == 5, p.stderr
        assert "disk full" in p.stderr and "Traceback" not in p.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_ctrl_c_then_resume(tmp_path):
    t = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((512, 1024)) * 0.02).astype(np.float32)
         for i in range(40)}
    src = tmp_path / "src"
    make_model(src, shards=3, tensors=t)
    out = tmp_path / "out"
    work = tmp_path / ".out.kbit-partial"
    cmd = KBIT + ["quantize", str(src), str(out), "--shard-size", "64KiB", "--search", "mse", "--dtype", "int"]
    # SIGINT back to its default in the child: a test run started in the background (`cmd &`
    # in a script, nohup) ignores SIGINT, the child would inherit that, and Python then
    # installs no KeyboardInterrupt handler (this test failed so in a fresh-clone CI run)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    t_start, seen = time.time(), []
    while time.time() < deadline and p.poll() is None:
        seen.append(len(list(work.glob(".shard-*.safetensors.tmp"))))
        if seen[-1] >= 3:
            break
        time.sleep(0.01)
    # the conversion must still be running: otherwise this run cannot test Ctrl-C (say why)
    assert p.poll() is None, (f"the conversion ended (exit {p.returncode}) after {time.time() - t_start:.1f} s "
                              f"before 3 finished shards were seen (largest count seen: {max(seen, default=0)})")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert not out.exists()
    kept = len(list(work.glob(".shard-*.safetensors.tmp")))
    assert 3 <= kept < 40
    p = subprocess.run(cmd + ["--resume", "--json", "-q"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["resumed_tensors"] >= 3
    r = KbitReader(out)
    for name, x in t.items():
        assert np.array_equal(r.load(name), dequantize(quantize(x, QuantSpec(4, "int", 64, search="mse"))))
    assert not work.exists()


@pytest.mark.parametrize("argv,policy", [(["quantize", "--help"], "PASSIVE"), (["inspect", "--help"], "PASSIVE"),
                                         (["generate", "--help"], None), (["perplexity", "--help"], None),
                                         (["--quiet-none"], "PASSIVE")])
def test_openmp_wait_policy_per_command(argv, policy):
    """Conversion commands make Numba's OpenMP workers sleep between kernels (they would
    starve numpy's BLAS threads); the runner's commands keep them spinning (decode steps
    alternate short Numba and torch regions). A user's own setting is never overridden."""
    code = ("import os, sys; from kbitcli.cli.main import main; main(sys.argv[1:]); "
            "print('POLICY', os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env).stdout
    assert f"POLICY {policy}" in out
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env).stdout
    assert "POLICY ACTIVE" in out
