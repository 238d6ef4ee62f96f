"""kbit sweep: rows, resume, bit accounting, fake quantization == a real conversion, outliers,
merge, report and plots, on a tiny random Llama (hidden 64, 2 layers)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kbitformat import QuantSpec, dequantize, quantize

from kbitcli.cli.main import main
from kbitcli.evals import report as rep
from kbitcli.evals import sweep as sw
from kbitcli.kernels import get_ops
from kbitcli.recipe import Recipe

VOCAB = 96
CTX, TOKENS = 64, 257  # 4 windows of 64 tokens (the last one holds a single token)


def _make_model(folder: Path, hidden: int = 64, seed: int = 0) -> Path:
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    m = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights large enough that quantization changes the output
        for name, p in m.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if p.dim() == 1 else 0.15 * torch.randn_like(p))
    m.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "pad_token": "t0", "bos_token": "t1"}))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model runs fastest on one thread (and the machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _make_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def text():
    rng = np.random.default_rng(1)
    # some structure (repeated phrases) so the model's predictions are not all alike
    words = [f"t{int(i)}" for i in rng.integers(3, VOCAB, 400)]
    return " ".join(words[:40] * 3 + words[40:])


def _count_evals(monkeypatch) -> dict:
    calls = {"run": 0, "reference": 0}
    run, ref = sw.Evaluator.run, sw.Evaluator.run_reference

    def counted_run(self):
        calls["run"] += 1
        return run(self)

    def counted_ref(self):
        calls["reference"] += 1
        return ref(self)
    monkeypatch.setattr(sw.Evaluator, "run", counted_run)
    monkeypatch.setattr(sw.Evaluator, "run_reference", counted_ref)
    return calls


def _sweep(tiny, text, out, **kw):
    args = dict(bits=[3, 4], dtypes=["int", "nf"], block_sizes=[32, 64], text=text, out_dir=out, ctx=CTX,
                max_tokens=TOKENS)
    args.update(kw)
    return sw.run_sweep([tiny], **args)


def test_rows_resume_and_truncated_line(tiny, text, tmp_path, monkeypatch):
    calls = _count_evals(monkeypatch)
    out = tmp_path / "sweep"
    rows = _sweep(tiny, text, out)
    q = [r for r in rows if r["kind"] == "quantized"]
    assert len(q) == 8 and calls == {"run": 8, "reference": 1}
    assert len({r["key"] for r in rows}) == 9
    assert sum(r["kind"] == "reference" for r in rows) == 1
    for r in q:
        for field in ("model", "bits", "dtype", "block_size", "scale", "outlier_fraction", "parameters",
                      "total_model_bits", "bits_per_weight", "metric_value", "ppl", "kld", "seconds", "kbit_version",
                      "key"):
            assert r.get(field) is not None, field
        assert r["metric"] == "ppl" and r["metric_value"] == r["ppl"] and r["kld"] > 0
    # fewer bits, further from the unquantized model (on average over the grid)
    by_k = {k: np.mean([r["kld"] for r in q if r["bits"] == k]) for k in (3, 4)}
    assert by_k[3] > by_k[4] > 0

    again = _sweep(tiny, text, out)
    assert calls == {"run": 8, "reference": 1} and len(again) == 9  # nothing re-run

    f = out / sw.RESULTS_NAME
    data = f.read_bytes()
    lines = data.splitlines(keepends=True)
    f.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a run killed mid-write
    lost = json.loads(lines[-1])["key"]
    assert len(sw.read_rows(f)) == 8
    third = _sweep(tiny, text, out)
    assert calls["run"] == 9 and calls["reference"] == 2  # only the lost row again (+ its reference logits)
    assert len(third) == 9 and lost in {r["key"] for r in third}
    for line in f.read_text().splitlines():
        json.loads(line)  # the file is clean JSONL again
    # the reference's top-k log-probs were reused from the file, not recomputed by a forward pass
    assert len(list(out.glob("reference-*.safetensors"))) == 1


def _independent_bits(tiny: Path, spec: QuantSpec) -> tuple[int, float, int]:
    """(parameters, total model bits, quantized parameters) from the checkpoint and the recipe,
    with the paper's formula k + 16/B for fp16 scales (the tiny model's rows are whole blocks)."""
    from safetensors import safe_open
    recipe = Recipe.build(spec)
    params = total = qn = 0
    with safe_open(str(tiny / "model.safetensors"), "np") as f:
        for name in f.keys():
            shape = tuple(f.get_slice(name).get_shape())
            n = int(np.prod(shape))
            params += n
            s = recipe.spec_for(name, shape, True)
            if s is None:
                total += 16 * n
            else:
                over = 16 + (16 if s.affine else 0)
                total += n * (s.bits + over / s.block_size)
                qn += n
    return params, total, qn


def test_total_model_bits(tiny, text, tmp_path):
    rows = sw.run_sweep([tiny], bits=[4, 3], dtypes=["int", "affine"], block_sizes=[64, 32], text=text,
                        out_dir=tmp_path, ctx=CTX, max_tokens=TOKENS)
    got = {(r["bits"], r["dtype"], r["block_size"]): r for r in rows if r["kind"] == "quantized"}
    r = got[(4, "int", 64)]
    assert r["bits_per_quantized_weight"] == pytest.approx(4.25)
    assert got[(4, "affine", 64)]["bits_per_quantized_weight"] == pytest.approx(4.5)
    assert got[(3, "int", 32)]["bits_per_quantized_weight"] == pytest.approx(3.5)
    for (k, dt, b), r in got.items():
        params, total, qn = _independent_bits(tiny, QuantSpec(k, dt, b))
        assert r["parameters"] == params and r["quantized_parameters"] == qn
        assert r["total_model_bits"] == pytest.approx(total, rel=1e-12)
        assert r["total_model_bits_paper"] == pytest.approx(total, rel=1e-12)  # no padding at these sizes
        assert r["bits_per_weight"] == pytest.approx(total / params)
    ref = next(r for r in rows if r["kind"] == "reference")
    assert ref["total_model_bits"] == 16 * ref["parameters"]


def test_padding_counted_in_stored_bits():
    x = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    deq, bits, _ = sw.fake_quantize(x, QuantSpec(4, "int", 64), "w", get_ops("cpu"))
    assert bits / x.size == pytest.approx(quantize(x, QuantSpec(4, "int", 64)).bits_per_weight)
    assert bits / x.size == pytest.approx((128 * 4 + 2 * 16) / 96)  # a 96-wide row stores two blocks of 64
    assert sw.paper_bits_per_weight(QuantSpec(4, "int", 64), 96) == pytest.approx(4.25)


@pytest.mark.parametrize("setting", [("4", "nf", "32", "fp16"), ("3", "int", "64", "dq")])
def test_fake_quant_equals_a_real_conversion(tiny, text, tmp_path, setting):
    """The sweep evaluates what `kbit quantize` produces: same perplexity as the runner on the
    converted folder (packed KbitLinear layers)."""
    from kbitcli.evals.perplexity import perplexity
    from kbitcli.runner import load
    k, dt, b, scale = setting
    out = tmp_path / "q"
    assert main(["quantize", str(tiny), str(out), "-q", "--bits", k, "--dtype", dt, "--block-size", b,
                 "--scale", scale]) == 0
    model, tok, _ = load(out, device="cpu")
    assert model.kbit_info["packed"] > 0
    ids = np.asarray(tok.encode(text), dtype=np.int64)[:TOKENS]
    real = perplexity(model, ids, ctx=CTX)
    rows = sw.run_sweep([tiny], bits=[int(k)], dtypes=[dt], block_sizes=[int(b)], scale=scale, text=text,
                        out_dir=tmp_path / "s", ctx=CTX, max_tokens=TOKENS)
    row = next(r for r in rows if r["kind"] == "quantized")
    assert row["ppl"] == pytest.approx(real.ppl, rel=1e-5)
    assert row["n_scored"] == real.n_scored
    summary = json.loads((out / "config.json").read_text())["quantization_config"]
    assert row["bits_per_quantized_weight"] == pytest.approx(summary["bits_per_quantized_weight"], rel=1e-12)


def test_outlier_columns_and_their_bits():
    rng = np.random.default_rng(3)
    w = (0.02 * rng.standard_normal((48, 200))).astype(np.float32)
    planted = np.array([5, 17, 120, 199])
    w[:, planted] *= 40
    ops = get_ops("cpu")
    spec = QuantSpec(3, "int", 64)
    deq, bits, info = sw.fake_quantize(w, spec, "w", ops, outliers=0.02)
    assert list(info["outlier_columns"]) == list(planted)  # round(0.02 * 200) = 4 columns
    assert np.array_equal(deq[:, planted], w[:, planted].astype(np.float16).astype(np.float32))
    rest = np.setdiff1d(np.arange(200), planted)
    qt = quantize(np.ascontiguousarray(w[:, rest]), spec, ops=ops)
    assert np.array_equal(deq[:, rest], dequantize(qt, ops))
    assert bits == pytest.approx(qt.bits_per_weight * 48 * 196 + 16 * 48 * 4 + 32 * 4)
    plain, _, _ = sw.fake_quantize(w, spec, "w", ops)
    assert np.linalg.norm(deq - w) < 0.5 * np.linalg.norm(plain - w)  # the outliers ruined the plain blocks
    # transposed layout (GPT-2 Conv1D: [in, out]): the same columns become rows
    deq_t, bits_t, info_t = sw.fake_quantize(np.ascontiguousarray(w.T), spec, "w", ops, outliers=0.02, in_axis=0)
    assert list(info_t["outlier_columns"]) == list(planted) and np.array_equal(deq_t, deq.T) and bits_t == bits


def test_outliers_in_the_sweep(tiny, text, tmp_path):
    rows = sw.run_sweep([tiny], bits=[3], dtypes=["int"], block_sizes=[32], text=text, out_dir=tmp_path, ctx=CTX,
                        max_tokens=TOKENS, outlier_fraction=0.05)
    q = {r["outlier_fraction"]: r for r in rows if r["kind"] == "quantized"}
    assert set(q) == {0.0, 0.05}
    o, p = q[0.05], q[0.0]
    # every quantized weight: in = 64 (q, k, v, o, gate, up) -> 3 columns; in = 128 (down) -> 6 columns
    assert o["outlier_columns"] == 2 * (6 * 3 + 6) and p["outlier_columns"] == 0
    assert o["total_model_bits"] > p["total_model_bits"] and o["label"].endswith(":out0.05")
    assert o["ppl"] != p["ppl"]


def test_shards_merge_and_dedupe(tiny, text, tmp_path):
    out = tmp_path / "shards"
    for i in (1, 2):
        sw.run_sweep([tiny], bits=[4], dtypes=["int", "nf", "fp"], block_sizes=[64], text=text, out_dir=out,
                     ctx=CTX, max_tokens=TOKENS, shard=(i, 2))
    f1, f2 = out / "results.shard-1-of-2.jsonl", out / "results.shard-2-of-2.jsonl"
    r1, r2 = sw.read_rows(f1), sw.read_rows(f2)
    assert len([r for r in r1 if r["kind"] == "quantized"]) == 2 and len([r for r in r2 if r["kind"] == "quantized"]) == 1
    merged = rep.merge_results([f1, f2, f1], tmp_path / "m" / "results.jsonl")
    assert len(merged) == 4 and len({r["key"] for r in merged}) == 4  # 3 combinations + 1 reference (in both)
    assert len(sw.read_rows(tmp_path / "m" / "results.jsonl")) == 4
    # the CLI: --merge of a folder writes the table, plots and report
    assert main(["sweep", "--merge", str(out), "--out", str(tmp_path / "cli"), "-q", "--no-plots"]) == 0
    assert len(sw.read_rows(tmp_path / "cli" / "results.jsonl")) == 4
    assert (tmp_path / "cli" / "results.csv").read_text().count("\n") == 5
    assert (tmp_path / "cli" / "report.md").is_file()
    labels = {c.label for c in sw.grid([4], ["int", "nf", "fp"], [64])}
    assert {r["label"] for r in merged} == labels | {"reference"}  # the shards cover the grid once


def _row(bits, dtype, block, ppl, bpw_q, params=1000, qparams=800, outliers=0.0):
    total = qparams * bpw_q + (params - qparams) * 16
    label = f"{bits}:{dtype}:b{block}:fp16" + (f":out{outliers:g}" if outliers else "")
    return {"key": f"m|{label}|sig", "model": "m", "kind": "quantized", "label": label, "bits": bits, "dtype": dtype,
            "block_size": block, "scale": "fp16", "outlier_fraction": outliers, "parameters": params,
            "quantized_parameters": qparams, "total_model_bits": total, "bits_per_weight": total / params,
            "bits_per_quantized_weight": bpw_q, "total_model_bits_paper": total, "bits_per_weight_paper": total / params,
            "metric": "ppl", "metric_value": ppl, "ppl": ppl, "kld": 0.0, "signature": "sig", "seconds": 1.0,
            "kbit_version": "0", "outlier_columns": 7 if outliers else 0}


def _synthetic_rows():
    """A grid where 4-bit wins under the proxy, block 64 beats 1024, fp beats int but quantile does not."""
    ref = {"key": "m|reference|sig", "model": "m", "kind": "reference", "label": "reference", "bits": 16,
           "dtype": "reference", "block_size": None, "parameters": 1000, "total_model_bits": 16000,
           "bits_per_weight": 16.0, "ppl": 10.0, "metric": "ppl", "metric_value": 10.0, "signature": "sig",
           "seconds": 1.0, "kbit_version": "0"}
    pen = {2: 3.0, 3: 0.5, 4: 0.05, 5: 0.045, 6: 0.035, 8: 0.03}  # ln(ppl / ref) of the best type at block 64
    rows = [ref]
    for k, p in pen.items():
        for dt, f in (("int", 1.5), ("fp", 1.0), ("quantile", 2.0)):
            for b, g in ((64, 1.0), (1024, 1.4)):
                rows.append(_row(k, dt, b, 10.0 * np.exp(p * f * g), k + 16 / b))
    rows.append(_row(3, "int", 64, 10.0 * np.exp(0.3), 3.25 + 0.3, outliers=0.02))
    return rows


def test_report_states_the_findings(tmp_path):
    rows = _synthetic_rows()
    out = rep.build_report(rows, tmp_path)
    md = Path(out["report"]).read_text()
    assert "(a) 4-bit is bit-optimal: holds" in md and "Bit-optimal k under the proxy: **4**" in md
    assert "(b) small blocks help at 3-4 bits (block 64 vs 1024): holds" in md
    assert "(c) float and quantile beat int at 3-4 bits: partly holds" in md
    assert "fp: holds, quantile: does not hold" in md
    assert "Outlier-dependent quantization" in md and "better than its plain twin in 1 of 1" in md
    assert "lower envelope" in md
    assert len(out["plots"]) == 3
    for p in out["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert Path(out["csv"]).read_text().count("\n") == len(rows) + 1
    # a model where 6-bit wins: the report says so
    for r in rows:
        if r["kind"] == "quantized" and r["bits"] <= 5:
            r["ppl"] = r["metric_value"] = r["ppl"] * 3
    md2 = rep.markdown(rows, "ppl")
    assert "(a) 4-bit is bit-optimal: does not hold" in md2


def test_envelope():
    pts = [{"total_model_bits": b, "ppl": p, "bits": k} for b, p, k in
           [(3.0, 50, 2), (4.0, 20, 3), (4.5, 25, 3), (5.0, 12, 4), (6.0, 12, 5), (9.0, 11, 8)]]
    env = rep.envelope(pts, "ppl")
    assert [p["total_model_bits"] for p in env] == [3.0, 4.0, 5.0, 9.0]
    assert rep.best_at_budget(env, 4.7)["bits"] == 3 and rep.best_at_budget(env, 2.0) is None


def test_cli_sweep_and_lambada(tiny, text, tmp_path, capsys):
    tf = tmp_path / "t.txt"
    tf.write_text(text)
    args = ["sweep", str(tiny), "--text", str(tf), "--bits", "4", "--dtype", "int", "--block-size", "64",
            "--ctx", str(CTX), "--max-tokens", str(TOKENS), "--out", str(tmp_path / "o")]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 2 and Path(out["report"]).is_file() and len(out["plots"]) == 3
    assert main(args + ["--shard", "1/1", "-q", "--no-plots"]) == 0
    assert (tmp_path / "o" / "results.shard-1-of-1.jsonl").is_file()
    assert main(args + ["--shard", "3/2"]) == 2
    assert main(args + ["--bits", "9"]) == 2
    assert main(["sweep", str(tiny), "--text", str(tf), "--outliers", "0.7"]) == 2
    # LAMBADA from a file
    items = [{"text": " ".join(text.split()[i:i + 12])} for i in range(0, 120, 12)]
    lf = tmp_path / "lambada.jsonl"
    lf.write_text("".join(json.dumps(d) + "\n" for d in items))
    assert main(["sweep", str(tiny), "--metric", "lambada", "--lambada", str(lf), "--bits", "4", "--dtype", "nf",
                 "--block-size", "32", "--out", str(tmp_path / "l"), "-q", "--no-plots"]) == 0
    rows = sw.read_rows(tmp_path / "l" / "results.jsonl")
    q = next(r for r in rows if r["kind"] == "quantized")
    assert q["metric"] == "lambada" and 0 <= q["lambada_acc"] <= 1 and q["n_items"] == 10
    assert q["metric_value"] == q["lambada_acc"]


def test_cloze_items():
    para = " ".join(f"w{i}" for i in range(50)) + " the end."
    items = sw.cloze_items(para + "\n\nshort one.\n\n" + para.replace("end.", "finish!"), n=5, min_words=10)
    assert [d["text"].split()[-1] for d in items] == ["end", "finish"]


@pytest.mark.slow
def test_jobs_runs_processes(tiny, text, tmp_path):
    rows = sw.run_sweep([tiny], bits=[4], dtypes=["int", "nf"], block_sizes=[64], text=text, out_dir=tmp_path,
                        ctx=CTX, max_tokens=TOKENS, jobs=2)
    assert len([r for r in rows if r["kind"] == "quantized"]) == 2
    assert len(sw.read_rows(tmp_path / "results.jsonl")) == 3
    assert (tmp_path / "results.shard-2-of-2.jsonl").is_file()


def test_multimodal_checkpoint_sweeps_its_language_model(text, tmp_path):
    """A Gemma 3 multimodal checkpoint: the sweep quantizes and counts the language model the
    runner runs; the vision tower's tensors (which the default recipe would quantize) are left
    out with a warning, and the quantized model differs from the reference."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from test_runner import make_tiny
    hf = make_tiny("gemma3-mm", tmp_path / "mm")
    events = []
    rows = sw.run_sweep([tmp_path / "mm"], bits=[3], dtypes=["int"], block_sizes=[32], text=text,
                        out_dir=tmp_path / "o", ctx=CTX, max_tokens=TOKENS, progress=lambda e, **kw: events.append((e, kw)))
    lm_params = sum(p.numel() for n, p in hf.named_parameters() if "language_model" in n and "lm_head" not in n)
    ref = next(r for r in rows if r["kind"] == "reference")
    q = next(r for r in rows if r["kind"] == "quantized")
    assert ref["parameters"] == q["parameters"] == lm_params
    assert q["ppl"] != ref["ppl"] and q["quantized_parameters"] > 0
    assert any(e == "warning" and "left out of the sweep" in kw["message"] for e, kw in events)
