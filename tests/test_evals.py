"""kbitcli.evals and kbit perplexity / compare / eval: perplexity against transformers (the
guide's sliding window) and against a plain llama.cpp-protocol loop, self-comparison, a broken
model tripping every gate, saved reference logits, zero-shot tasks with known answers, the
offline Wikipedia text, and WikiText-2 through a loopback Hub."""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitcli.cli.main import main
from kbitcli.errors import EXIT_CHECK_FAILED, EXIT_HUB, EXIT_INPUT, EXIT_USAGE, InputError
from kbitcli.evals import (ReferenceLogits, check_gates, compare, evaluate_task, load_task_file, perplexity,
                           window_plan)
from kbitcli.evals.data import clean_wikitext
from kbitcli.runner import load

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, _Handler, isolate_hub_env  # noqa: E402

torch.set_num_threads(2)
VOCAB = 100
CTX = 64


# ----------------------------------------------------------------------------- a tiny Llama
def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "pad_token": "t0", "bos_token": "t1"}))


def _make_llama(folder: Path, head_scale: float = 1.0):
    """A random transformers Llama (vocabulary t0..t99) saved in folder; returns it."""
    import transformers as tf
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=1024, vocab_size=VOCAB, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.15 * torch.randn_like(p))
        hf.lm_head.weight.mul_(head_scale)
    hf.save_pretrained(folder)
    _write_tokenizer(folder)
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, transformers model, sampled token ids, text file): a random Llama with peaked
    predictions and 640 tokens it sampled itself at temperature 0.7 (10 samples of CTX tokens),
    so that it predicts its text, window by window, far better than chance."""
    folder = tmp_path_factory.mktemp("tiny")
    hf = _make_llama(folder, head_scale=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        out = hf.generate(torch.randint(10, VOCAB, (10, 2)), do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                          max_new_tokens=CTX - 2, min_new_tokens=CTX - 2, pad_token_id=0)
    ids = out.reshape(-1).tolist()
    text = folder.parent / "tiny.txt"
    text.write_text(" ".join(f"t{i}" for i in ids) + "\n")
    return folder, hf, ids, text


@pytest.fixture(scope="module")
def runner_model(tiny):
    model, tok, _ = load(tiny[0])
    return model, tok


@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """A copy of the tiny model with layer 0's down_proj zeroed."""
    from safetensors.torch import load_file, save_file
    src = tiny[0]
    dst = tmp_path_factory.mktemp("broken")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.mlp.down_proj.weight"] = torch.zeros_like(t["model.layers.0.mlp.down_proj.weight"])
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    """A 4-bit kbit conversion of the tiny model (nf, block 64)."""
    from kbitformat import QuantSpec

    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    out = tmp_path_factory.mktemp("q") / "kbit"
    convert(tiny[0], out, Recipe.build(QuantSpec(3, "int", 64)), measure_error=False)
    return out


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- window plans
def test_window_plans():
    # hf, no overlap: every window scores all but its first token
    assert [(w.begin, w.end, w.first) for w in window_plan(10, 4)] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # hf, stride 2: each token after the first scored exactly once
    plan = window_plan(10, 4, 2)
    assert [(w.begin, w.end, w.first) for w in plan] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [t for w in plan for t in range(w.first, w.end)]
    assert scored == list(range(1, 10))
    # llama.cpp: whole chunks only, second half scored
    plan = window_plan(21, 8, protocol="llama.cpp")
    assert [(w.begin, w.end, w.first) for w in plan] == [(0, 8, 5), (8, 16, 13)]
    assert all(w.n_scored == 8 - 1 - 4 for w in plan)


# ----------------------------------------------------------------------------- perplexity
def _guide_ppl(hf, ids: list[int], max_length: int, stride: int, exact_weights: bool = False) -> float:
    """transformers' perplexity guide, verbatim apart from names. The guide weights each window's
    mean loss by its count of targets minus one, one too few when windows overlap; exact_weights
    counts the targets the loss really averaged (what kbit computes)."""
    input_ids_all = torch.tensor([ids])
    seq_len = input_ids_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_ids_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = hf(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        if exact_weights:
            num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(nll_sum / n_tokens))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A random Llama with flat predictions (transformers model, runner model)."""
    folder = tmp_path_factory.mktemp("plain")
    hf = _make_llama(folder)
    return hf, load(folder)[0]


@pytest.mark.parametrize("ctx,stride", [(128, 128), (128, 64), (128, 48)])
def test_hf_protocol_matches_transformers_guide(plain, ctx, stride):
    hf, model = plain
    ids = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = _guide_ppl(hf, ids, ctx, stride)
    res = perplexity(model, ids, ctx=ctx, stride=stride, batch_size=2)
    assert abs(res.ppl - ref) / ref < 1e-3, (res.ppl, ref)
    assert res.n_scored == (len(ids) - 1 if stride < ctx else len(ids) - res.n_windows)
    assert res.ppl_se == pytest.approx(res.ppl * res.nll_sd / math.sqrt(res.n_scored))


@pytest.mark.parametrize("stride", [CTX, CTX // 2, 24])
def test_hf_protocol_small_windows_exact(tiny, runner_model, stride):
    """Short, overlapping windows: kbit equals the guide's computation with exact weights."""
    _, hf, ids, _ = tiny
    model, _ = runner_model
    ref = _guide_ppl(hf, ids, CTX, stride, exact_weights=True)
    res = perplexity(model, ids, ctx=CTX, stride=stride, batch_size=3)
    assert res.ppl == pytest.approx(ref, rel=1e-4)
    if stride == CTX:
        assert res.ppl < 0.2 * VOCAB  # the model predicts its own samples far better than chance


def test_llamacpp_protocol_matches_a_plain_loop(runner_model, tiny):
    model, _ = runner_model
    ids = tiny[2]
    bos = 1
    nll, n = 0.0, 0
    for c in range(len(ids) // CTX):  # llama-perplexity, written out
        chunk = list(ids[c * CTX:(c + 1) * CTX])
        chunk[0] = bos
        with torch.no_grad():
            logits = model(torch.tensor([chunk]))[0].double()
        for j in range(CTX // 2, CTX - 1):
            nll -= float(torch.log_softmax(logits[j], -1)[chunk[j + 1]])
            n += 1
    expected = math.exp(nll / n)
    for batch in (1, 4):
        res = perplexity(model, ids, ctx=CTX, protocol="llama.cpp", bos_id=bos, batch_size=batch)
        assert res.n_scored == n == (len(ids) // CTX) * (CTX - 1 - CTX // 2)
        assert res.ppl == pytest.approx(expected, rel=1e-5)
    no_bos = perplexity(model, ids, ctx=CTX, protocol="llama.cpp")
    assert no_bos.ppl != pytest.approx(expected, rel=1e-6)  # the BOS replacement matters


def test_cli_perplexity_json_and_text(tiny, runner_model, capsys):
    folder, _, ids, text = tiny
    code, out, err = _run(capsys, "perplexity", folder, "--text", text, "--ctx", CTX, "--stride", 32,
                          "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    lib = perplexity(runner_model[0], ids, ctx=CTX, stride=32)
    assert doc["ppl"] == pytest.approx(lib.ppl, rel=1e-9)
    assert doc["n_bytes"] == len(text.read_bytes())
    assert doc["bits_per_byte"] == pytest.approx(lib.nll / math.log(2) * len(ids) / doc["n_bytes"])
    code, out, err = _run(capsys, "perplexity", folder, "--text", text, "--ctx", CTX, "--protocol", "llama.cpp",
                          "--max-tokens", 300, "--device", "cpu")
    assert code == 0, err
    assert "perplexity" in out and "protocol llama.cpp" in out and f"{4 * (CTX - 1 - CTX // 2)} of 300 tokens scored" in out


@pytest.mark.parametrize("args,code,words", [
    (["--ctx", "64"], EXIT_USAGE, "--text"),
    (["--text", "T", "--protocol", "vllm"], EXIT_USAGE, "protocol"),
    (["--text", "T", "--ctx", "64", "--stride", "100"], EXIT_USAGE, "--stride"),
    (["--text", "T", "--protocol", "llama.cpp", "--ctx", "1024"], EXIT_INPUT, "fewer than one chunk"),
    (["--text", "missing.txt"], EXIT_INPUT, "missing.txt"),
    (["--text", "T", "--ctx", "2048"], EXIT_USAGE, "context window"),
])
def test_cli_perplexity_errors(tiny, capsys, args, code, words):
    folder, _, _, text = tiny
    args = [str(text) if a == "T" else a for a in args]
    got, _, err = _run(capsys, "perplexity", folder, *args, "--device", "cpu")
    assert got == code, err
    assert words in err and "Traceback" not in err


def test_default_ctx_fits_a_short_context_window(tiny, runner_model, capsys, tmp_path):
    """Without --ctx, a model whose context window is under 512 tokens is scored in windows of
    its window's length (the same figure as asking for it); a --ctx beyond the window is a
    usage error in perplexity, compare and sweep (sweep used to fail with an IndexError on
    models with learned positions)."""
    import shutil

    folder, _, ids, text = tiny
    short = tmp_path / "short"
    shutil.copytree(folder, short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 96
    (short / "config.json").write_text(json.dumps(cfg))
    code, out, err = _run(capsys, "perplexity", short, "--text", text, "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ctx"] == 96
    assert doc["ppl"] == pytest.approx(perplexity(runner_model[0], ids, ctx=96).ppl, rel=1e-9)
    code, out, err = _run(capsys, "perplexity", folder, "--text", text, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["ctx"] == 512  # the default for a long window
    code, out, err = _run(capsys, "compare", short, short, "--text", text, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["ctx"] == 96
    for cmd in (["perplexity", short, "--device", "cpu"], ["compare", short, folder, "--device", "cpu"],
                ["sweep", short, "-k", "4", "-t", "int", "-b", "64", "--out", tmp_path / "sweep"]):
        code, _, err = _run(capsys, *cmd, "--text", text, "--ctx", 200)
        assert code == EXIT_USAGE, err
        assert "context window" in err and "Traceback" not in err and "internal error" not in err


# ----------------------------------------------------------------------------- compare
def test_compare_with_itself(runner_model, tiny):
    model, _ = runner_model
    res = compare(model, model, tiny[2], ctx=CTX)
    assert res.kld == pytest.approx(0, abs=1e-6) and res.kld_percentiles["max"] < 1e-5
    assert res.top1 == 1.0 and res.ppl_ratio == pytest.approx(1.0, abs=1e-9) and res.dp_max == 0 == res.dp_min
    assert all(g.passed for g in check_gates(res, 1.0 + 1e-9, 1e-6, 1.0))


def test_cli_compare_with_itself_passes_gates(tiny, capsys):
    folder, _, _, text = tiny
    code, out, err = _run(capsys, "compare", folder, folder, "--text", text, "--ctx", CTX, "--device", "cpu",
                          "--max-ppl-ratio", "1.000001", "--max-kld", "1e-6", "--min-top1", "1")
    assert code == 0, err
    assert "top-1 agreement    100.000%" in out and out.count("PASS") == 3


def test_broken_model_trips_every_gate(tiny, broken, capsys):
    folder, _, _, text = tiny
    code, out, err = _run(capsys, "compare", broken, folder, "--text", text, "--ctx", CTX, "--device", "cpu",
                          "--max-ppl-ratio", "1.05", "--max-kld", "0.05", "--min-top1", "0.9")
    assert code == EXIT_CHECK_FAILED, err
    assert out.count("FAIL") == 3
    line = err.strip()
    assert len(line.splitlines()) == 1 and line.startswith("kbit: error: quality gates failed")
    for figure in ("perplexity ratio", "mean KL divergence", "top-1 agreement"):
        assert figure in line, line
    # --json still prints the figures, then exits 1
    code, out, err = _run(capsys, "compare", broken, folder, "--text", text, "--ctx", CTX, "--device", "cpu",
                          "--max-kld", "0.05", "--json")
    assert code == EXIT_CHECK_FAILED
    doc = json.loads(out)
    assert doc["passed"] is False and doc["gates"][0]["name"] == "kld" and doc["kld"] > 0.05


def test_saved_reference_gives_the_same_figures(tiny, quantized, tmp_path, capsys):
    folder, _, _, text = tiny
    ref_file = tmp_path / "ref.safetensors"
    common = ["--text", text, "--ctx", CTX, "--stride", 32, "--device", "cpu", "--json"]
    code, out, err = _run(capsys, "compare", quantized, folder, *common, "--save-reference", ref_file,
                          "--reference-topk", 16)
    assert code == 0, err
    exact = json.loads(out)
    n = exact["n_scored"]
    assert ref_file.stat().st_size < n * (6 * 16 + 8) + 4096  # (6k + 8) bytes per scored token + header
    code, out, err = _run(capsys, "compare", quantized, "--reference-logits", ref_file, *common)
    assert code == 0, err
    approx = json.loads(out)
    for key in ("ppl", "ref_ppl", "ppl_ratio", "top1", "dp_mean", "dp_max", "dp_min", "bits_per_byte"):
        assert approx[key] == pytest.approx(exact[key], rel=1e-5, abs=1e-7), key
    assert approx["kl_method"].startswith("top-16")
    # the lumped KL never exceeds the exact one (log-sum inequality) and keeps most of it
    assert 0.5 * exact["kld"] < approx["kld"] <= exact["kld"] * (1 + 1e-3)
    # the default k (256) keeps the whole 100-token vocabulary: the lumped KL is then the exact one
    full_file = tmp_path / "full.safetensors"
    code, out, err = _run(capsys, "compare", quantized, folder, *common, "--save-reference", full_file)
    assert code == 0, err
    assert ReferenceLogits.load(full_file).topk == VOCAB
    code, out, err = _run(capsys, "compare", quantized, "--reference-logits", full_file, *common)
    assert code == 0, err
    assert json.loads(out)["kld"] == pytest.approx(exact["kld"], rel=1e-2)
    # a reference made from other tokens or settings is refused, naming what differs
    code, _, err = _run(capsys, "compare", quantized, "--reference-logits", ref_file, *common, "--max-tokens", 500)
    assert code == EXIT_INPUT and "tokens" in err
    code, _, err = _run(capsys, "compare", quantized, "--reference-logits", ref_file, "--text", text, "--ctx", CTX,
                        "--device", "cpu")
    assert code == EXIT_INPUT and "stride" in err


def test_reference_file_errors(tmp_path, capsys, tiny):
    folder, _, _, text = tiny
    from safetensors.numpy import save_file
    bad = tmp_path / "other.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(bad))
    with pytest.raises(InputError, match="not a kbit reference file"):
        ReferenceLogits.load(bad)
    code, _, err = _run(capsys, "compare", folder, "--text", text, "--min-top1", "90")
    assert code == EXIT_USAGE
    code, _, err = _run(capsys, "compare", folder, "--text", text)
    assert code == EXIT_USAGE and "REFERENCE" in err


# ----------------------------------------------------------------------------- zero-shot tasks
def _ll(hf, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _w(ids) -> str:
    return " ".join(f"t{i}" for i in ids)


def _task_files(hf, folder: Path) -> dict:
    """Items whose answers transformers decides: the right answer labelled in even items, a wrong
    one in odd items, so every task's accuracy is exactly 0.5."""
    rng = np.random.default_rng(0)
    files: dict = {t: [] for t in ("lambada", "hellaswag", "winogrande")}
    expect: dict = {t: [] for t in files}
    for i in range(8):
        right = i % 2 == 0
        ctx = rng.integers(10, 100, 6).tolist()
        with torch.no_grad():
            nxt = torch.log_softmax(hf(torch.tensor([ctx])).logits[0, -1].double(), -1)
        # lambada: the greedy next token (acc) or the least likely one
        word = int(nxt.argmax()) if right else int(nxt.argmin())
        files["lambada"].append({"text": _w(ctx) + " " + f"t{word}"})
        # hellaswag: four endings of equal length (so acc_norm = acc); best, worst and two others
        two_digit = torch.arange(VOCAB) >= 10
        best = int(torch.where(two_digit, nxt, -torch.inf).argmax())
        worst = int(torch.where(two_digit, nxt, torch.inf).argmin())
        others = rng.choice([j for j in range(10, 100) if j not in (best, worst)], 2, replace=False).tolist()
        order = rng.permutation(4).tolist()
        endings = [[best, worst, *others][o] for o in order]
        label = order.index(0) if right else order.index(1)
        files["hellaswag"].append({"ctx": _w(ctx), "endings": [f"t{e}" for e in endings], "label": label})
        # winogrande: the option under which transformers finds the fixed continuation more likely
        s_ctx, opts, tail = ctx[:3], rng.integers(10, 100, 2).tolist(), ctx[3:]
        good = int(np.argmax([_ll(hf, s_ctx + [o], tail) for o in opts]))
        ans = good if right else 1 - good
        files["winogrande"].append({"sentence": _w(s_ctx) + " _ " + _w(tail), "option1": f"t{opts[0]}",
                                    "option2": f"t{opts[1]}", "answer": str(ans + 1)})
        for t in files:
            expect[t].append(right)
    out = {}
    for t, docs in files.items():
        p = folder / f"{t}.jsonl"
        p.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
        out[t] = (p, expect[t])
    return out


def test_tasks_with_known_answers(tiny, runner_model, tmp_path, capsys):
    folder, hf, _, _ = tiny
    model, tok = runner_model
    files = _task_files(hf, tmp_path)
    for task, (path, expect) in files.items():
        res = evaluate_task(model, tok, task, load_task_file(task, path), batch_size=3)
        assert res.n == 8 and res.acc == 0.5, task
        if task == "lambada":
            assert res.predictions == expect and res.ppl is not None
        if task == "hellaswag":
            assert res.acc_norm == 0.5  # equal-length endings
        if task == "winogrande":
            assert res.acc_norm is None
    path, _ = files["hellaswag"]
    code, out, err = _run(capsys, "eval", folder, "--task", "hellaswag", "--data", path, "--limit", 4,
                          "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n"] == 4 and doc["acc"] == 0.5 and len(doc["predictions"]) == 4


def test_task_file_errors(tmp_path, tiny, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "x", "sol1": "a"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*sol2, label"):
        load_task_file("piqa", bad)
    bad.write_text('{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_task_file("winogrande", bad)
    code, _, err = _run(capsys, "eval", tiny[0], "--task", "mmlu", "--data", bad)
    assert code == EXIT_USAGE and "lambada" in err


@pytest.mark.slow
def test_smollm2_easy_items(tmp_path):
    from kbitcli.sources import embedded_model_path
    model, tok, _ = load(embedded_model_path())
    lam = tmp_path / "l.jsonl"
    lam.write_text(json.dumps({"text": "The capital of France is Paris"}) + "\n")
    res = evaluate_task(model, tok, "lambada", load_task_file("lambada", lam))
    assert res.acc == 1.0
    piqa = tmp_path / "p.jsonl"
    piqa.write_text("\n".join(json.dumps(d) for d in [
        {"goal": "The capital of France is", "sol1": "banana.", "sol2": "Paris.", "label": 1},
        {"goal": "To boil water, you", "sol1": "heat it in a pot on the stove.", "sol2": "put it in the freezer.",
         "label": 0},
    ]) + "\n")
    res = evaluate_task(model, tok, "piqa", load_task_file("piqa", piqa))
    # raw acc favours the shorter ending of the second item; per-character normalisation does not
    assert res.predictions[0] == 1 and res.acc_norm == 1.0


# ----------------------------------------------------------------------------- texts
def test_clean_wikitext():
    raw = ("{{Infobox|name=x|{{nested}}}}\n'''Bold''' is a [[Target|label]] and [[plain]] word.<ref>cite</ref>"
           "[[File:x.png|thumb|a [[caption]]]] See [http://e.com site].\n\n== History ==\nA * line.\n"
           "{| class=wikitable\n|-\n| cell\n|}\n* item one\n\n== References ==\n* ref\n")
    assert clean_wikitext(raw) == "Bold is a label and plain word. See site.\n\nHistory\n\nA * line.\n\nitem one"


def test_wiki_text():
    from kbitcli.evals.data import wiki_text
    try:
        text = wiki_text()
    except InputError as e:
        pytest.skip(str(e))
    assert text.startswith("= Anarchism =\n\nAnarchism is a political philosophy")
    assert 2_500_000 < len(text) < 3_300_000
    assert "{{" not in text and "[[" not in text and "<ref" not in text
    assert wiki_text() is text


def test_wiki_text_missing(tmp_path, monkeypatch):
    from kbitcli.evals import data
    monkeypatch.setenv("KBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "repo_root", lambda: tmp_path)
    with pytest.raises(InputError, match="scripts/setup.sh"):
        data.wiki_xml()


class _DatasetHandler(_Handler):
    """tests/hub_server.py's routes, also under /datasets/ and /api/datasets/."""

    def _request(self):
        req = super()._request()
        if req.path.startswith("/datasets/"):
            req.path = req.path[len("/datasets"):]
        elif req.path.startswith("/api/datasets/"):
            req.path = "/api/models/" + req.path[len("/api/datasets/"):]
        return req


@pytest.fixture
def dataset_hub(tmp_path, monkeypatch):
    isolate_hub_env(monkeypatch, tmp_path / "hf-home")
    server = HubServer()
    server.httpd.RequestHandlerClass = type("H", (_DatasetHandler,), {"hub": server})
    with server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def test_wikitext2_through_the_hub(dataset_hub, tiny, capsys, monkeypatch, tmp_path):
    from kbitcli.evals.data import wikitext2
    body = " = Valkyria = \n \n " + " ".join(f"t{i % 90 + 10}" for i in range(400)) + " \n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("wikitext-2-raw/wiki.test.raw", body)
        z.writestr("wikitext-2-raw/wiki.valid.raw", "valid")
    dataset_hub.add_repo("ggml-org/ci", {"wikitext-2-raw-v1.zip": buf.getvalue()})
    assert wikitext2() == body
    assert wikitext2("validation") == "valid"
    assert dataset_hub.requested_files().count("wikitext-2-raw-v1.zip") >= 1
    assert any(r.path.startswith("/ggml-org/ci/resolve") for r in dataset_hub.requested("resolve"))
    # cached: offline works
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert wikitext2() == body
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # the CLI scores it
    code, out, err = _run(capsys, "perplexity", tiny[0], "--dataset", "wikitext-2", "--ctx", CTX, "--device", "cpu",
                          "--json")
    assert code == 0, err
    assert json.loads(out)["text"].startswith("WikiText-2 raw test")
    # a repo without the file: one Hub error line, exit 6
    dataset_hub.repos["ggml-org/ci"].commit({"wikitext-2-raw-v1.zip": None})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    code, _, err = _run(capsys, "perplexity", tiny[0], "--dataset", "wikitext-2", "--device", "cpu")
    assert code == EXIT_HUB and "wikitext-2-raw-v1.zip" in err and "Traceback" not in err


def test_wikitext2_parquet_needs_pyarrow(dataset_hub):
    from kbitcli.evals.data import wikitext2
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="pyarrow"):
            wikitext2(source="parquet")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["", " = A = \n", "", " b c \n"]}), buf)
    dataset_hub.add_repo("Salesforce/wikitext", {"wikitext-2-raw-v1/test-00000-of-00001.parquet": buf.getvalue()})
    assert wikitext2(source="parquet") == "\n\n = A = \n\n\n\n b c \n"
