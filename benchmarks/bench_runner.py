#!/usr/bin/env python
"""Runner benchmark: kbit's torch runner on SmolLM2-135M (the embedded GGUF) against
transformers' generate on the same weights, fp32 and 4-bit kbit, batch 1.

    .venv/bin/python benchmarks/bench_runner.py                       # ~5 min on 2 cores
    .venv/bin/python benchmarks/bench_runner.py --quick               # 32 + 32 tokens, 2 repeats
    .venv/bin/python benchmarks/bench_runner.py --append-docs         # also (re)write docs/benchmarks.md's Runner section

CPU section: a 128-token prompt (token ids, identical for every contender) and 128 greedy new
tokens (EOS ignored, so every run makes exactly 128), timed round-robin (one run of each
contender per round) so a noisy machine slows all alike; min and median of the repeats.
  * transformers  AutoModelForCausalLM (fp32, the GGUF dequantized by transformers) .generate
  * kbit fp32     kbit's runner on the same GGUF (fp32)
  * kbit 4-bit    `kbit quantize` output (nf4, block 64, fp16 scales), linear layers packed;
                  decode steps (<= 8 input rows) through the fused Numba GEMV (reads only the
                  packed words), the prompt pass dequantized by the Numba CPU kernel + matmul;
                  the codes in the runner's byte layout (KbitLinear's default for k = 2, 4, 8)
  * kbit 4-bit, bit planes: the same with `byte_layout = False` (the codes kept in the
                  format's bit planes, the GEMV unpacking them)
  * kbit 4-bit, no GEMV: the same, every forward dequantizing the weight + matmul (the
                  packed path before the fused GEMV)
  * kbit 4-bit, dequantized on load (fp32 weights)
  * kbit 4-bit, torch dequantizer: the pure-torch path (slower; fewer new tokens, see table)
Memory: bytes of the loaded weights (packed components for the 4-bit layers) against the
same model in fp16.

GPU section (only when torch sees CUDA): decode tokens/s of the 4-bit packed model and the
fp16 model, and the fraction of the HBM-bandwidth bound (weight bytes read per token / the
measured device-to-device copy bandwidth). Skipped cleanly on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Report, machine, set_threads, timeit_interleaved, transformers_gguf_model, versions  # noqa: E402

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "salt, grain and cloth. Over the centuries the market grew into a town, the town into a city, and ")


def prompt_ids(tok, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(TEXT)
    return ids[:n]


def fp16_bytes(model) -> int:
    """The weights of `model` at 2 bytes each (packed layers counted by their logical size)."""
    from kbitcli.runner import KbitLinear
    n = 0
    for m in model.modules():
        if isinstance(m, KbitLinear):
            n += m.shape[0] * m.shape[1] + (0 if m.bias is None else m.bias.numel())
        else:
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return 2 * n


def cpu_section(rep: Report, args, src: Path, kbit_dir: Path) -> dict:
    import torch

    from kbitcli.runner import generate_ids, load, parameter_bytes
    from kbitcli.runner.layers import numba_dequantize, numba_gemv_plan

    t0 = time.perf_counter()
    fp32, tok, _ = load(src)
    packed, _, _ = load(kbit_dir)
    packed_planes, _, _ = load(kbit_dir)
    for m in packed_planes.modules():
        if hasattr(m, "byte_layout"):
            m.byte_layout = False
    dense4, _, _ = load(kbit_dir, dequantize_on_load=True)
    packed_torch, _, _ = load(kbit_dir, kernel="torch")
    packed_deq, _, _ = load(kbit_dir)
    for m in packed_deq.modules():
        if hasattr(m, "fused_gemv"):
            m.fused_gemv = False
    hf = transformers_gguf_model(src)
    rep.note(f"models loaded in {time.perf_counter() - t0:.1f} s; Numba CPU dequantizer "
             f"{'available' if numba_dequantize() else 'UNAVAILABLE (the torch code is used)'}, fused CPU GEMV "
             f"{'available' if numba_gemv_plan() else 'UNAVAILABLE'}")
    ids = prompt_ids(tok, args.prompt_tokens)
    n = args.new_tokens
    n_torch = max(1, min(n, args.torch_kernel_tokens))
    last = {}

    def ours(model, new):
        def run():
            out, _, tm = generate_ids(model, [ids], new, eos_token_ids=[], pad_token_id=0)
            assert len(out[0]) == new
            last[id(model)] = (out[0], tm)
        return run

    def theirs():
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        last["hf"] = out[0, len(ids):].tolist()

    contenders = {
        "transformers fp32": (theirs, n),
        "kbit runner fp32": (ours(fp32, n), n),
        "kbit runner 4-bit packed (fused GEMV)": (ours(packed, n), n),
        "kbit runner 4-bit packed (fused GEMV, bit planes)": (ours(packed_planes, n), n),
        "kbit runner 4-bit packed (no GEMV: Numba dequant)": (ours(packed_deq, n), n),
        "kbit runner 4-bit dequantized on load": (ours(dense4, n), n),
        "kbit runner 4-bit packed (torch dequant)": (ours(packed_torch, n_torch), n_torch),
    }
    for name, (f, new) in contenders.items():  # warm-up: a short run of each (JIT, allocator, caches)
        if name.startswith("transformers"):
            with torch.inference_mode():
                hf.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    for m in (fp32, packed, packed_planes, packed_deq, dense4, packed_torch):
        generate_ids(m, [ids], 2, eos_token_ids=[], pad_token_id=0)
    load_before = os.getloadavg()[0]
    times = timeit_interleaved({k: f for k, (f, _) in contenders.items()}, repeats=args.repeats, warmup=0)
    rep.note(f"load average (1 min) before / after the timed runs: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
             f"on {os.cpu_count()} CPUs (other processes share this machine)")
    base = times["transformers fp32"].min / n
    rows = []
    for name, (_, new) in contenders.items():
        t = times[name]
        rows.append([name, new, t.min, t.median, new / t.min, new / t.median, base / (t.min / new)])
    rep.table(["runner", "new tokens", "min s", "median s", "tokens/s (best)", "tokens/s (median)",
               "speed vs transformers"], rows,
              title=f"SmolLM2-135M, {len(ids)}-token prompt + greedy new tokens, batch 1, CPU, "
                    f"{args.threads} threads, {args.repeats} repeats (prompt pass included)")
    same = sum(1 for a, b in zip(last[id(fp32)][0], last["hf"]) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(last[id(fp32)][0], last["hf"])) if a != b), None)
    rep.note(f"greedy tokens, kbit fp32 vs transformers fp32: {same}/{n} equal"
             + ("" if first_diff is None else f" (first difference at new token {first_diff})"))
    layouts = sorted({m.code_layout for m in packed.modules() if hasattr(m, "code_layout")})
    layouts_p = sorted({m.code_layout for m in packed_planes.modules() if hasattr(m, "code_layout")})
    rep.note(f"code layout of the packed layers: {', '.join(layouts)}; bit-planes row: {', '.join(layouts_p)}")
    dec = {name: last[id(m)][1] for name, m in (("fp32", fp32), ("4-bit packed", packed),
                                                  ("4-bit packed, bit planes", packed_planes),
                                                  ("4-bit packed, no GEMV", packed_deq),
                                                  ("4-bit dequantized on load", dense4))}
    rep.note("decode-only tokens/s (last run, prompt pass excluded): " + ", ".join(
        f"{k} {tm['decode_steps'] / tm['decode_seconds']:.2f}" for k, tm in dec.items() if tm["decode_seconds"] > 0))
    pb_packed, pb_fp16 = parameter_bytes(packed), fp16_bytes(packed)
    pb_dense = parameter_bytes(dense4)
    packed16, _, _ = load(kbit_dir, dtype="float16")  # loaded only to count its bytes
    pb_packed16 = parameter_bytes(packed16)
    linear_params = sum(m.shape[0] * m.shape[1] for m in packed.modules() if hasattr(m, "packed_bytes"))
    linear_bytes = sum(m.packed_bytes() for m in packed.modules() if hasattr(m, "packed_bytes"))
    rep.table(["weights in memory", "bytes", "vs fp16"], [
        ["fp16 model (every parameter at 2 bytes)", pb_fp16, 1.0],
        ["kbit 4-bit packed, float16 compute (embedding and norms in fp16)", pb_packed16, pb_packed16 / pb_fp16],
        ["kbit 4-bit packed, float32 compute (embedding and norms in fp32; the CPU default)", pb_packed,
         pb_packed / pb_fp16],
        ["kbit 4-bit dequantized on load, float32", pb_dense, pb_dense / pb_fp16],
        [f"the {sum(1 for m in packed.modules() if hasattr(m, 'packed_bytes'))} packed linear layers alone "
         f"({linear_params:,} weights): {8 * linear_bytes / linear_params:.3f} bits/weight", linear_bytes,
         linear_bytes / (2 * linear_params)],
    ], title="Loaded weights (parameter bytes; SmolLM2's tied 28M-parameter embedding is not quantized by the "
             "default recipe)")
    return {"times": times, "packed_bytes": pb_packed, "fp16_bytes": pb_fp16}


def gpu_section(rep: Report, args, src: Path, kbit_dir: Path) -> None:
    import torch
    rep.section("GPU")
    if not torch.cuda.is_available():
        rep.note("skipped: torch sees no CUDA GPU on this machine")
        return
    from kbitcli.runner import generate_ids, load, parameter_bytes
    name = torch.cuda.get_device_name(0)
    x = torch.empty(256 * 1024**2, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 2 * x.numel() * 4 * 10 / (time.perf_counter() - t)
    del x, y
    rep.note(f"{name}; measured device-to-device copy bandwidth {bw / 1e9:.0f} GB/s")
    ids = list(range(1000, 1000 + args.prompt_tokens))
    rows = []
    for label, path, kw in (("fp16", src, {}), ("4-bit packed", kbit_dir, {}),
                            ("4-bit dequantized on load (fp16)", kbit_dir, {"dequantize_on_load": True})):
        model, _, _ = load(path, device="cuda", dtype="float16", **kw)
        generate_ids(model, [ids], 8, eos_token_ids=[], pad_token_id=0)
        best = None
        for _ in range(args.repeats):
            _, _, tm = generate_ids(model, [ids], args.new_tokens, eos_token_ids=[], pad_token_id=0)
            rate = tm["decode_steps"] / tm["decode_seconds"]
            best = rate if best is None else max(best, rate)
        weight_bytes = parameter_bytes(model)
        bound = bw / weight_bytes
        rows.append([label, weight_bytes, best, bound, best / bound])
        del model
        torch.cuda.empty_cache()
    rep.table(["model", "weight bytes", "decode tokens/s (best)", "HBM bound tokens/s", "fraction of bound"], rows,
              title=f"SmolLM2-135M decode, batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--torch-kernel-tokens", type=int, default=8,
                    help="new tokens for the (slow) pure-torch dequantizer row")
    ap.add_argument("--quick", action="store_true", help="32 + 32 tokens, 2 repeats")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--markdown", type=Path, help="write the report as markdown here")
    ap.add_argument("--append-docs", action="store_true", help="write the 'Runner' section of docs/benchmarks.md (replacing an earlier one)")
    args = ap.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.repeats, args.torch_kernel_tokens = 32, 32, 2, 4
    set_threads(args.threads)
    import torch

    from kbitformat import QuantSpec

    from kbitcli.convert import convert
    from kbitcli.recipe import Recipe
    from kbitcli.sources import embedded_model_path

    rep = Report()
    src = embedded_model_path()
    rep.note(f"machine: {machine()}")
    rep.note(f"versions: {versions('torch', 'transformers', 'numba', 'numpy')}")
    with tempfile.TemporaryDirectory(prefix="kbit-bench-runner-") as tmp:
        kbit_dir = Path(tmp) / "smollm2-nf4"
        t = time.perf_counter()
        convert(src, kbit_dir, Recipe.build(QuantSpec(4, "nf", 64)), measure_error=False)
        rep.note(f"converted {src.name} to 4-bit nf, block 64 in {time.perf_counter() - t:.1f} s")
        rep.section("CPU")
        cpu_section(rep, args, src, kbit_dir)
        if not args.no_gpu:
            gpu_section(rep, args, src, kbit_dir)
        else:
            rep.section("GPU")
            rep.note("skipped (--no-gpu)")
    header = "## Runner\n\n`benchmarks/bench_runner.py` (" + time.strftime("%Y-%m-%d") + \
             f"; {'--quick' if args.quick else 'defaults'}, --threads {args.threads})."
    if args.markdown:
        rep.write(args.markdown, header)
    if args.append_docs:
        doc = REPO / "docs" / "benchmarks.md"
        body = header.rstrip() + "\n" + "\n".join(rep.md).rstrip() + "\n"
        old = doc.read_text() if doc.exists() else "# Benchmarks\n"  # re-read just before writing
        if "\n## Runner\n" in old:  # replace our own section only, keep everyone else's
            head, rest = old.split("\n## Runner\n", 1)
            nxt = rest.find("\n## ")
            tail = rest[nxt:] if nxt >= 0 else ""
            doc.write_text(head.rstrip() + "\n\n" + body.rstrip() + "\n" + tail)
        else:
            doc.write_text(old.rstrip() + "\n\n" + body)
        print(f"wrote the Runner section of {doc}")
    del torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
