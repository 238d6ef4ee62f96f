#!/usr/bin/env python
"""GPU benchmark of the runner and the conversion (run by scripts/gpu_check.sh).

No model needs to be carried to the GPU machine: the script writes random-weight fp16
Llama checkpoints of real shapes (weights N(0, 0.02); throughput does not depend on the
values) and a word-level tokenizer, then:

  1. measures the device-to-device copy bandwidth (bytes read + written / time): the
     memory-bandwidth bound used below;
  2. converts each checkpoint to 4-bit nf, block 64 (`kbit quantize --device cuda`), times
     it, and for the small model also converts on the CPU and checks that every output
     tensor is bit-identical (the GPU conversion path end to end);
  3. decode tokens/s at batch 1 (128-token prompt, 128 new tokens, EOS ignored), best of
     --repeats: kbit fp16 (the HF folder) and kbit 4-bit packed (fused GEMV decode), each
     with its decode steps replayed as CUDA graphs (the runner's default on a GPU; the
     captures are inside the timed decode) and eager (the growing cache, every kernel
     launched from Python); both with q/k/v and gate/up as separate layers (load(fuse=False),
     against the default fused projections); 4-bit packed with the x-in-registers GEMV
     (BYTES_TUNING["KERNEL"] = "xr", opt-in, measured slower) and with the format's bit planes
     kept (no byte layout);
     4-bit packed with the GEMV switched off (the whole weight
     dequantized in every forward), 4-bit dequantized on load (fp16), and transformers'
     fp16 generate as the peer. Each with the weight bytes one decode step reads (every
     weight, but one row of an untied embedding table), the bound (copy bandwidth / those
     bytes) and the fraction of it reached;
  4. kernel-level: the time of all the model's linear layers for one decode token, fused
     GEMV on packed weights against F.linear on fp16 weights (CUDA events), launched
     eagerly from Python and replayed from one CUDA graph (the kernels alone).

    python benchmarks/bench_gpu.py [--models small,7b8] [--repeats 3] [--markdown FILE]
    python benchmarks/bench_gpu.py --device cpu --models tiny    # a dry run of the code
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Report, machine, versions  # noqa: E402,F401

# name: (hidden, intermediate, layers, heads, kv heads, vocab)
SHAPES = {
    "tiny": (128, 256, 2, 4, 2, 1000),
    "small": (576, 1536, 30, 9, 3, 49152),          # SmolLM2-135M's shape
    "7b8": (4096, 11008, 8, 32, 32, 32000),         # Llama-2-7B's layer shape, 8 of its 32 layers
}


def write_checkpoint(folder: Path, shape, seed: int = 0, device: str = "cpu") -> int:
    """A random fp16 Llama checkpoint (config, safetensors shards, tokenizer); returns the
    parameter count."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    h, inter, layers, heads, kv, vocab = shape
    folder.mkdir(parents=True, exist_ok=True)
    hd = h // heads
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16", "hidden_act": "silu"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):  # drawn on the GPU when there is one (a 7B-shaped draw takes a while on a CPU)
        return (torch.randn(*s, generator=g, device=device) * 0.02).to(torch.float16).cpu()
    n = 0
    shard: dict = {}
    index: dict = {}
    part = 0

    def flush():
        nonlocal shard, part
        if shard:
            name = f"model-{part:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            part += 1
            shard = {}
    shard["model.embed_tokens.weight"] = rnd(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shard[p + "self_attn.q_proj.weight"] = rnd(heads * hd, h)
        shard[p + "self_attn.k_proj.weight"] = rnd(kv * hd, h)
        shard[p + "self_attn.v_proj.weight"] = rnd(kv * hd, h)
        shard[p + "self_attn.o_proj.weight"] = rnd(h, heads * hd)
        shard[p + "mlp.gate_proj.weight"] = rnd(inter, h)
        shard[p + "mlp.up_proj.weight"] = rnd(inter, h)
        shard[p + "mlp.down_proj.weight"] = rnd(h, inter)
        shard[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        if sum(t.numel() for t in shard.values()) > 400_000_000:
            n += sum(t.numel() for t in shard.values())
            flush()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    shard["lm_head.weight"] = rnd(vocab, h)
    n += sum(t.numel() for t in shard.values())
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "pad_token": "t0", "bos_token": "t1"}))
    return n


def copy_bandwidth(device) -> float:
    import torch
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(512 * 1024**2, dtype=torch.float32, device=device)  # 2 GiB
    x.uniform_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    del x, y
    torch.cuda.empty_cache()
    return 2 * 512 * 1024**2 * 4 / best


def tensors_equal(a: Path, b: Path) -> tuple[bool, str]:
    """Every tensor of two kbit folders identical (bytes), and the same names."""
    from safetensors.numpy import load_file
    ta, tb = {}, {}
    for f in sorted(a.glob("*.safetensors")):
        ta.update(load_file(str(f)))
    for f in sorted(b.glob("*.safetensors")):
        tb.update(load_file(str(f)))
    if set(ta) != set(tb):
        return False, f"different tensor names: {sorted(set(ta) ^ set(tb))[:5]}"
    for k in ta:
        if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or ta[k].tobytes() != tb[k].tobytes():
            return False, f"tensor {k} differs"
    return True, f"{len(ta)} tensors identical"


def set_gemv(model, on: bool) -> int:
    from kbitcli.runner import KbitLinear
    n = 0
    for m in model.modules():
        if isinstance(m, KbitLinear):
            m.fused_gemv = on
            n += 1
    return n


def bytes_per_token(model) -> int:
    """Weight bytes one decode step reads: every weight, except that of an embedding table only
    its row is read (a table that is also the tied output head is read whole)."""
    from torch import nn

    from kbitcli.runner import parameter_bytes
    total = parameter_bytes(model)
    tied = bool(getattr(model, "tied", False))
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    head = max(embs, key=lambda m: m.weight.numel()) if tied and embs else None
    for m in embs:
        if m is not head:
            w = m.weight
            total -= w.numel() * w.element_size() - w.shape[1] * w.element_size()
    return total


def decode_rate(model, ids, new_tokens: int, repeats: int, budget_s: float = 8.0,
                decode: str = "auto") -> tuple[float, int, str]:
    """Best decode tokens/s, the new tokens per run (new_tokens, or fewer when a run would
    take longer than budget_s: a slow contender must not eat the whole time limit) and the
    decode mode the runs used. In graph mode the capture of each run's graphs is inside its
    decode time (as a user gets it)."""
    from kbitcli.runner import generate_ids
    kw = dict(eos_token_ids=[], pad_token_id=0, decode=decode)
    _, _, tm = generate_ids(model, [ids], 4, **kw)  # warm-up (JIT compiles)
    _, _, tm = generate_ids(model, [ids], 4, **kw)
    est = tm["decode_steps"] / max(tm["decode_seconds"], 1e-9)
    n = max(8, min(new_tokens, int(est * budget_s)))
    best = 0.0
    for _ in range(repeats):
        _, _, tm = generate_ids(model, [ids], n, **kw)
        best = max(best, tm["decode_steps"] / tm["decode_seconds"])
    return best, n, tm["decode_mode"]


def hf_decode_rate(folder: Path, device, ids, new_tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).to(device).eval()
    inp = torch.tensor([ids], device=device)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        with torch.no_grad():
            model.generate(inp, max_new_tokens=n, min_new_tokens=n, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
    run(4)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        run(1)
        t1 = time.perf_counter() - t  # the prompt pass + one token
        t = time.perf_counter()
        run(new_tokens + 1)
        t2 = time.perf_counter() - t
        best = max(best, new_tokens / max(t2 - t1, 1e-9))
    del model
    return best


def kernel_level(model_packed, model_fp16, device, repeats: int = 20) -> tuple[float, float, int, int]:
    """Seconds for one decode token's worth of linear layers: fused GEMV over every packed
    layer, and F.linear over every fp16 layer (same shapes); plus the bytes each reads."""
    import torch
    import torch.nn.functional as F
    from kbitcli.runner import KbitLinear
    packed = [m for n, m in model_packed.named_modules() if isinstance(m, KbitLinear)]
    dense = [m for n, m in model_fp16.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n]
    if len(dense) != len(packed):
        raise RuntimeError(f"{len(packed)} packed layers but {len(dense)} fp16 block layers")
    xs_p = [torch.randn(1, m.in_features, device=device, dtype=torch.float16) for m in packed]
    xs_d = [torch.randn(1, m.in_features, device=device, dtype=torch.float16) for m in dense]

    def run_p():
        for m, x in zip(packed, xs_p):
            m(x)

    def run_d():
        for m, x in zip(dense, xs_d):
            F.linear(x, m.weight)

    def graphed(fn):  # the same launches captured once in a CUDA graph: kernel time alone
        cur = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            fn()
        cur.wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="thread_local"):
            fn()
        return g.replay

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b) / 1e3)
        return best
    bp = sum(m.packed_bytes() for m in packed)
    bd = sum(m.weight.numel() * 2 for m in dense)
    try:
        gp, gd = timed(graphed(run_p)), timed(graphed(run_d))
    except Exception as e:  # noqa: BLE001 - report, keep the eager figures
        print(f"kernel level: CUDA graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        gp = gd = float("nan")
    return timed(run_p), timed(run_d), bp, bd, gp, gd


def profile_decode(model, ids, steps: int = 16, top: int = 12) -> list[list]:
    """Kernels of `steps` graph-replayed decode steps (torch.profiler, CUPTI: Numba's kernels
    too): per kernel name, calls per step, GPU microseconds per step, share of GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kbitcli.runner import generate_ids
    kw = dict(eos_token_ids=[], pad_token_id=0)
    generate_ids(model, [ids], 4, **kw)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate_ids(model, [ids], steps + 1, **kw)
        torch.cuda.synchronize()
    rows: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = ev.time_range.elapsed_us()
            r = rows.setdefault(ev.name[:70], [0, 0.0])
            r[0] += 1
            r[1] += t
    total = sum(r[1] for r in rows.values()) or 1.0
    out = [[name, n / steps, t / steps, t / total] for name, (n, t) in rows.items()]
    out.sort(key=lambda r: -r[2])
    kernels = sum(r[1] for r in out)
    return out[:top] + [["all kernels (prompt pass included)", kernels, total / steps, 1.0]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small,7b8", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--spec", default="4:nf:b64")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--skip", default="", help="comma-separated substrings: skip the decode contenders whose "
                    "label contains one (e.g. 'eager,bit planes,dequantize every' for a short GPU lease)")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temp folder)")
    args = ap.parse_args()
    import torch

    from kbitformat import QuantSpec

    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    from kbitcli.runner import load

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU", file=sys.stderr)
        return 1
    rep = Report()
    rep.note(f"machine: {machine()}")
    if device.type == "cuda":
        rep.note(f"GPU: {torch.cuda.get_device_name(0)}")
    rep.note(f"versions: {versions('torch', 'transformers', 'numba', 'numba_cuda', 'numpy')}")
    bw = copy_bandwidth(device)
    rep.note(f"device-to-device copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")
    results: dict = {"bandwidth": bw, "models": {}}
    failures = []
    spec = QuantSpec.parse(args.spec)
    tmp = tempfile.TemporaryDirectory(prefix="kbit-bench-gpu-") if args.workdir is None else None
    work = Path(tmp.name) if tmp else args.workdir
    ids = [(7 * i + 11) % 900 + 3 for i in range(args.prompt_tokens)]
    for name in args.models.split(","):
        shape = SHAPES[name]
        res = results["models"][name] = {}
        rep.section(f"Model '{name}': hidden {shape[0]}, intermediate {shape[1]}, {shape[2]} layers, "
                    f"vocab {shape[5]}")
        src = work / f"{name}-fp16"
        t = time.perf_counter()
        n = write_checkpoint(src, shape, device=device.type)
        rep.note(f"random fp16 checkpoint: {n / 1e6:.0f} M parameters, written in {time.perf_counter() - t:.1f} s")
        out = work / f"{name}-kbit-{device.type}"
        try:
            t = time.perf_counter()
            s = convert(src, out, Recipe.build(spec), device=device.type)
            dt = time.perf_counter() - t
            res["convert_s"] = dt
            src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            rep.note(f"kbit quantize --device {device.type} ({args.spec}): {dt:.1f} s, "
                     f"{src_bytes / dt / 1e6:.0f} MB/s of source, {s.total_bits / s.parameters:.3f} bits per weight "
                     "over all parameters")
            if name in ("tiny", "small") and device.type == "cuda":
                cpu_out = work / f"{name}-kbit-cpu"
                t = time.perf_counter()
                convert(src, cpu_out, Recipe.build(spec), device="cpu")
                dc = time.perf_counter() - t
                same, why = tensors_equal(out, cpu_out)
                res["gpu_equals_cpu"] = same
                rep.note(f"kbit quantize --device cpu: {dc:.1f} s; GPU output bit-identical to CPU output: "
                         f"{'YES' if same else 'NO'} ({why})")
                if not same:
                    failures.append(f"{name}: GPU conversion differs from CPU: {why}")
        except Exception as e:  # noqa: BLE001 - report and go on with the other sections
            traceback.print_exc()
            failures.append(f"{name}: conversion failed: {type(e).__name__}: {e}")
            continue
        rows = []
        graph = "graph" if device.type == "cuda" else "dynamic"
        contenders = [("kbit fp16 (HF folder), CUDA graphs", src, {}, None, graph),
                      ("kbit 4-bit packed, fused GEMV, CUDA graphs", out, {}, True, graph),
                      ("kbit fp16 (HF folder), separate q/k/v and gate/up (--no-fuse), CUDA graphs", src,
                       {"fuse": False}, None, graph),
                      ("kbit 4-bit packed, separate q/k/v and gate/up (--no-fuse), CUDA graphs", out,
                       {"fuse": False}, True, graph),
                      ("kbit fp16 (HF folder), eager", src, {}, None, "dynamic"),
                      ("kbit 4-bit packed, fused GEMV, eager", out, {}, True, "dynamic"),
                      ("kbit 4-bit packed, x-in-registers GEMV (KERNEL=xr, opt-in), CUDA graphs",
                       out, {"tuning": {"KERNEL": "xr"}}, True, graph),
                      ("kbit 4-bit packed, fused GEMV on the format's bit planes, CUDA graphs", out,
                       {"byte_layout": False}, True, graph),
                      ("kbit 4-bit packed, dequantize every forward, CUDA graphs", out, {}, False, graph),
                      ("kbit 4-bit dequantized on load (fp16), CUDA graphs", out, {"dequantize_on_load": True},
                       None, graph)]
        fp16_rate = None
        skip = [w.strip() for w in args.skip.split(",") if w.strip()]
        for label, path, kw, gemv, decode in contenders:
            if any(w in label for w in skip):
                print(f"  (skipped: {label})")
                continue
            kw = dict(kw)
            byte_layout = kw.pop("byte_layout", True)
            tuning = kw.pop("tuning", {})
            if tuning and device.type != "cuda":
                continue
            saved = None
            try:
                if tuning:  # the CUDA byte-layout GEMV's launch tuning, for this contender only
                    from kbitcli.kernels import cuda as kcuda
                    saved = dict(kcuda.BYTES_TUNING)
                    kcuda.BYTES_TUNING.update(tuning)
                model, _, _ = load(path, device=device, dtype="float16", **kw)
                if not byte_layout:  # before the first forward, which would switch the codes to bytes
                    for m in model.modules():
                        if hasattr(m, "byte_layout"):
                            m.byte_layout = False
                if gemv is not None:
                    set_gemv(model, gemv)
                rate, ntok, ran = decode_rate(model, ids, args.new_tokens, args.repeats, decode=decode)
                if ran != decode:
                    failures.append(f"{name}: {label}: decode ran as {ran!r}, not {decode!r} (see the warning)")
                    label += f" (RAN AS {ran.upper()})"
                if gemv:
                    used = all(m.fused_gemv for m in model.modules() if hasattr(m, "fused_gemv"))
                    if not used:
                        failures.append(f"{name}: the fused GEMV fell back to dequantize+matmul (see the warning)")
                    label += "" if used else " (FELL BACK)"
                if ntok < args.new_tokens:
                    label += f" [{ntok} new tokens]"
                wb = bytes_per_token(model)
                bound = bw / wb
                rows.append([label, wb, rate, bound, rate / bound])
                res[label] = {"tokens_per_s": rate, "weight_bytes": wb, "bound": bound}
                if fp16_rate is None:
                    fp16_rate = rate
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"{name}: {label}: {type(e).__name__}: {e}")
            finally:
                if saved is not None:
                    kcuda.BYTES_TUNING.clear()
                    kcuda.BYTES_TUNING.update(saved)
        if not args.no_hf:
            try:
                rate = hf_decode_rate(src, device, ids, args.new_tokens, args.repeats)
                wb = rows[0][1] if rows else float("nan")
                rows.append(["transformers fp16 generate", wb, rate, bw / wb, rate / (bw / wb)])
                res["transformers fp16"] = {"tokens_per_s": rate}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"{name}: transformers: {type(e).__name__}: {e}")
        for r in rows:
            r.append(r[2] / fp16_rate if fp16_rate else float("nan"))
        rep.table(["model", "weight bytes read per token", "decode tokens/s (best)", "bandwidth bound tokens/s",
                   "fraction of bound", "vs kbit fp16"], rows,
                  title=f"decode at batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
                        f"best of {args.repeats}")
        if device.type == "cuda":
            for label, path in (("4-bit packed", out), ("fp16", src)):
                try:
                    m, _, _ = load(path, device=device, dtype="float16")
                    rep.table(["kernel", "calls per step", "GPU us per step", "share"], profile_decode(m, ids),
                              title=f"profile of 16 graph-replayed decode steps, {label} (torch.profiler; the "
                                    "prompt pass is included in the totals)")
                    del m
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    failures.append(f"{name}: profile {label}: {type(e).__name__}: {e}")
            try:
                mp, _, _ = load(out, device=device, dtype="float16")
                md, _, _ = load(src, device=device, dtype="float16")
                tp, td, bp, bd, gp, gd = kernel_level(mp, md, device)
                res["kernel"] = {"gemv_s": tp, "fp16_s": td, "packed_bytes": bp, "fp16_bytes": bd,
                                 "gemv_graph_s": gp, "fp16_graph_s": gd}
                rep.table(["linear layers of one decode token", "bytes read", "time (best of 20)",
                           "GB/s", "fraction of copy bandwidth"],
                          [["fused GEMV, packed 4-bit, eager launches", bp, tp, bp / tp / 1e9, bp / tp / bw],
                           ["F.linear, fp16, eager launches", bd, td, bd / td / 1e9, bd / td / bw],
                           ["fused GEMV, packed 4-bit, one CUDA graph", bp, gp, bp / gp / 1e9, bp / gp / bw],
                           ["F.linear, fp16, one CUDA graph", bd, gd, bd / gd / 1e9, bd / gd / bw],
                           ["ratio GEMV / fp16 time (eager)", "", tp / td, "", ""],
                           ["ratio GEMV / fp16 time (graph)", "", gp / gd, "", ""]],
                          title="kernel level (CUDA events around the model's linear layers alone)")
                del mp, md
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                failures.append(f"{name}: kernel level: {type(e).__name__}: {e}")
    if args.markdown:
        rep.write(args.markdown, "## GPU\n\n`benchmarks/bench_gpu.py` (" + time.strftime("%Y-%m-%d") + ")")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if tmp:
        tmp.cleanup()
    if failures:
        print("\nbench_gpu: FAILURES:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
