"""Static-cache decode steps (what a CUDA graph replays, kbitcli.runner.generate "static" and
"graph" modes) against the ordinary growing-cache steps, for every architecture: the same
logits to float32 rounding and the same greedy tokens, with padding, across attention
buckets and up to the cache's capacity. The graph capture itself needs a GPU
(tests/test_runner_gpu.py); everything it replays is this static computation."""
from __future__ import annotations

import pytest
import torch

from kbitcli.errors import UsageError
from kbitcli.runner import generate_ids, load
import importlib
gen_mod = importlib.import_module("kbitcli.runner.generate")  # the module (the package exports a function of that name)
from kbitcli.runner.models.base import KVCache
from test_runner import ARCHS, _ids, make_tiny, tiny  # noqa: F401 - tiny: a fixture

torch.set_num_threads(2)
TOL = 2e-5


@pytest.fixture(scope="module")
def tiny_model(tiny):  # noqa: F811 - test_runner's fixture of saved tiny models, loaded once here
    models = {}

    def get(arch):
        if arch not in models:
            models[arch] = load(tiny(arch)[0])[0]
        return models[arch]
    return get


def _batch():
    return [_ids(7, 11), _ids(3, 12), _ids(5, 13)]  # left padded to 7


def _prefill(model, batch, capacity):
    B, L = len(batch), max(len(s) for s in batch)
    ids = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, L - len(s):] = torch.tensor(s)
        mask[i, L - len(s):] = 1
    cache = KVCache(model.num_layers, capacity=capacity)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    return cache, mask, logits


@pytest.mark.parametrize("arch", ARCHS)
def test_static_steps_equal_dynamic_steps(arch, tiny_model, monkeypatch):
    """Step by step, the same fed tokens: logits of static steps (buckets of 4 positions, so
    the attended span changes several times) equal those of the growing cache."""
    monkeypatch.setattr(gen_mod, "ATTEND_BUCKET", 4)
    model = tiny_model(arch)
    batch = _batch()
    steps = 12
    with torch.inference_mode():
        dyn_cache, mask, logits = _prefill(model, batch, 7 + steps)
        st_cache, st_mask, st_logits = _prefill(model, batch, 7 + steps)
        assert torch.equal(logits, st_logits)
        dec = gen_mod._StaticDecoder(model, st_cache, st_mask, torch.device("cpu"), graph=False)
        worst = 0.0
        attends = set()
        for t in range(steps):
            feed = logits.argmax(-1)
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype)], dim=1)
            logits = model(feed[:, None], attention_mask=mask, cache=dyn_cache, last_only=True)[:, -1]
            got = dec.step(feed)
            attends.add(st_cache.attend)
            worst = max(worst, (got - logits).abs().max().item() / logits.abs().max().item())
        assert int(st_cache.slot) == 7 + steps
    assert worst < TOL, worst
    assert len(attends) >= 3  # the buckets really changed


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2", "bloom", "opt", "mixtral"])
def test_static_generation_same_tokens(arch, tiny_model, monkeypatch):
    monkeypatch.setattr(gen_mod, "ATTEND_BUCKET", 8)
    model = tiny_model(arch)
    batch = _batch()
    ref, reasons, tm = generate_ids(model, batch, 20, eos_token_ids=[], pad_token_id=0, decode="dynamic")
    got, reasons2, tm2 = generate_ids(model, batch, 20, eos_token_ids=[], pad_token_id=0, decode="static")
    assert got == ref and reasons == reasons2
    assert tm["decode_mode"] == "dynamic" and tm2["decode_mode"] == "static"
    # auto is the growing cache on the CPU
    assert generate_ids(model, batch, 3, eos_token_ids=[], pad_token_id=0)[2]["decode_mode"] == "dynamic"


def test_static_generation_up_to_the_context_window(tiny_model):
    """gpt2's window is 64: a 7-token prompt + 100 asked stops at the window, static like dynamic."""
    model = tiny_model("gpt2")
    batch = _batch()
    ref, reasons, _ = generate_ids(model, batch, 100, eos_token_ids=[], pad_token_id=0, decode="dynamic")
    got, reasons2, _ = generate_ids(model, batch, 100, eos_token_ids=[], pad_token_id=0, decode="static")
    assert got == ref and reasons == reasons2 == ["context"] * 3
    assert len(got[0]) == 64 - 7


def test_static_cache_errors(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        generate_ids(model, [[5, 6]], 2, decode="graph")
    with pytest.raises(UsageError, match="decode mode"):
        generate_ids(model, [[5, 6]], 2, decode="fast")
    with torch.inference_mode():
        cache, mask, _ = _prefill(model, [[5, 6, 7]], 8)
        with pytest.raises(ValueError, match="attention_mask must be"):
            cache.start_static(mask[:, :2])
        cache.start_static(mask)
        with pytest.raises(ValueError, match="one new token"):
            model(torch.tensor([[5, 6]]), cache=cache)
        with pytest.raises(ValueError, match="already in static mode"):
            cache.start_static(mask)
    with pytest.raises(ValueError, match="filled by a prompt pass"):
        KVCache(2, 8).start_static(torch.ones((1, 0), dtype=torch.long))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                                  "olmoe", "phimoe", "glm4_moe", "dots1", "ernie4_5_moe",
                                  "hunyuan_v1_moe"])
def test_moe_models_decode_without_cuda_graphs(arch, tiny_model):
    """An MoE layer reads on the host which experts its tokens chose (a CUDA graph cannot capture
    that): on a GPU, auto decodes MoE models dynamically and graph is refused by name; static
    steps (no graph) run, and equal the dynamic ones (test_static_steps_equal_dynamic_steps)."""
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    model = tiny_model(arch)
    assert gen_mod.resolve_decode_mode("auto", cuda, model) == "dynamic"
    assert gen_mod.resolve_decode_mode("static", cuda, model) == "static"
    assert gen_mod.resolve_decode_mode("auto", cuda, tiny_model("llama")) == "graph"
    with pytest.raises(UsageError, match=f"decode mode graph: the decode step of a {arch} model cannot be captured"):
        gen_mod.resolve_decode_mode("graph", cuda, model)


def test_cli_decode_option(tmp_path, capsys):
    import json

    from kbitcli.cli.main import main
    make_tiny("llama", tmp_path)
    capsys.readouterr()
    runs = {}
    for mode in ("static", "dynamic"):
        assert main(["generate", str(tmp_path), "-p", "t5 t6", "-p", "t9", "-n", "5", "--device", "cpu",
                     "--decode", mode, "--json"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out)
    assert runs["static"]["decode_mode"] == "static" and runs["dynamic"]["decode_mode"] == "dynamic"
    assert [c["token_ids"] for c in runs["static"]["completions"]] == \
        [c["token_ids"] for c in runs["dynamic"]["completions"]]
    for bad, msg in ((["--decode", "fast"], "decode mode must be one of"),
                     (["--decode", "graph", "--device", "cpu"], "needs a CUDA device")):
        assert main(["generate", str(tmp_path), "-p", "t5"] + bad) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and msg in err, err
