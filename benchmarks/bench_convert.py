#!/usr/bin/env python
"""Conversion benchmark: peak memory and throughput of `kbit quantize` on synthetic
Llama-shaped safetensors checkpoints, against loading the whole checkpoint, and the
time to convert the embedded SmolLM2-135M.

    .venv/bin/python benchmarks/bench_convert.py                      # 2 GB and 6 GB, ~5 min
    .venv/bin/python benchmarks/bench_convert.py --sizes 2 --markdown out.md
    .venv/bin/python benchmarks/bench_convert.py --quick              # one 1 GB checkpoint
    .venv/bin/python benchmarks/bench_convert.py --repeat 3           # min / median of 3 runs

For every size: write a checkpoint (bfloat16, Llama-2-13B layer shapes: 141.6 MB MLP
weights, 52 MB attention weights, 327.7 MB embedding and LM head; 3+ shards with
model.safetensors.index.json and config.json) under --workdir, then
  1. `cat` the shards to /dev/null twice: first after evicting them from the page cache
     with posix_fadvise(DONTNEED) (cold-ish), then again (warm);
  2. run `kbit quantize SRC OUT --bits 4 --dtype int --block-size 64 --quiet --json` as
     a subprocess (warm page cache) and record its wall time and peak RSS (the kernel's
     the max RSS reported by /usr/bin/time, plus RssAnon / RssFile polled from /proc);
     then (unless --no-cold-run) once more right after evicting the shards (cold-ish, like
     that repeat's first cat: the paired ratio divides the two rates);
     with --repeat N, steps 1 and 2 run N times, alternating (the table gives the median
     and the range, the peak RSS is the largest of the N runs);
  3. run the naive baseline: a subprocess that loads every shard with
     safetensors.torch.load_file and keeps them all.
Peak RSS includes file-backed pages of memory-mapped shards that the process touched
(RssFile); the private memory (RssAnon) is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, Report, machine, versions  # noqa: E402

import numpy as np  # noqa: E402

GB = 1e9
MB = 1e6
KBIT = Path(sys.executable).parent / "kbit"
# the `kbit` script of this interpreter's environment, else `python -m kbitcli` (a machine
# where kbit is not installed, only on PYTHONPATH: the GPU check machine)
KBIT_CMD = [str(KBIT)] if KBIT.exists() else [sys.executable, "-m", "kbitcli"]
THREADS = 2  # OMP / NUMBA / MKL threads of the kbit subprocesses (--threads)
DEVICE_ARGS: list = []  # --device cuda: ["--device", "cuda"]
SPEC_ARGS = ["--bits", "4", "--dtype", "int", "--block-size", "64"]
POOL_VALUES = 1 << 25  # bf16 values of random data reused (rotated) across tensors


# ----------------------------------------------------------------------------- checkpoint
def llama_tensors(layers: int, hidden: int, inter: int, vocab: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    t = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (hidden,)),
              (p + "self_attn.q_proj.weight", (hidden, hidden)),
              (p + "self_attn.k_proj.weight", (kv, hidden)),
              (p + "self_attn.v_proj.weight", (kv, hidden)),
              (p + "self_attn.o_proj.weight", (hidden, hidden)),
              (p + "post_attention_layernorm.weight", (hidden,)),
              (p + "mlp.gate_proj.weight", (inter, hidden)),
              (p + "mlp.up_proj.weight", (inter, hidden)),
              (p + "mlp.down_proj.weight", (hidden, inter))]
    t += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return t


def layers_for(size_bytes: float, hidden: int, inter: int, vocab: int, kv: int) -> int:
    per_layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    return max(1, round((size_bytes - fixed) / per_layer))


def bf16_pool(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(POOL_VALUES, dtype=np.float32) * np.float32(0.02)
    u = x.view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def write_checkpoint(folder: Path, tensors, n_shards: int, config: dict) -> dict:
    """Write bf16 safetensors shards tensor by tensor (never a whole shard in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = bf16_pool()
    ones = np.full(max(int(np.prod(s)) for _, s in tensors if len(s) == 1), 0x3F80, dtype=np.uint16)
    sizes = [2 * int(np.prod(s)) for _, s in tensors]
    total = sum(sizes)
    target = total / n_shards
    shards, cur, acc = [], [], 0
    for (name, shape), nb in zip(tensors, sizes):
        if cur and acc + nb > target * 1.02 and len(shards) < n_shards - 1:
            shards.append(cur)
            cur, acc = [], 0
        cur.append((name, shape, nb))
        acc += nb
    shards.append(cur)
    weight_map, files = {}, []
    rot = 0
    for si, shard in enumerate(shards):
        fname = f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, nb in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        path = folder / fname
        with open(path, "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            for name, shape, nb in shard:
                n = nb // 2
                if len(shape) == 1:
                    f.write(ones[:n].tobytes())
                    continue
                done = 0
                rot = (rot + 7_919_993) % POOL_VALUES
                start = rot
                while done < n:
                    m = min(n - done, POOL_VALUES - start)
                    f.write(pool[start:start + m].tobytes())
                    done += m
                    start = 0
            f.flush()
            os.fsync(f.fileno())
        files.append(path)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return {"files": files, "total": total, "largest": max(sizes), "shards": len(shards),
            "tensors": len(tensors)}


# ----------------------------------------------------------------------------- measuring
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


TIME = Path("/usr/bin/time")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; return wall s, rc, stdout, stderr, its peak RSS in bytes and the peaks of
    RssAnon / RssFile / VmRSS polled every 20 ms from /proc.

    The peak RSS comes from /usr/bin/time (%M) when present: a child forked straight from
    this (large) Python process would report this process's RSS at fork time as its
    ru_maxrss, since Linux carries the high-water mark across exec. Without
    /usr/bin/time it is the largest polled VmRSS."""
    use_time = TIME.is_file() and os.access(TIME, os.X_OK)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = [str(TIME), "-f", "%M", "-o", tf.name, *cmd] if use_time else cmd
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=out, stderr=err, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        stop = threading.Event()

        def poll():
            target = None
            while not stop.is_set():
                if target is None:
                    kids = _children(p.pid) if use_time else [p.pid]
                    target = kids[0] if kids else None
                if target is not None:
                    st = _status(target)
                    for k in peaks:
                        peaks[k] = max(peaks[k], st.get(k, 0))
                stop.wait(0.02)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            p.wait()
        finally:
            stop.set()
            th.join()
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        maxrss = peaks["VmRSS"]
        if use_time:
            try:
                maxrss = int(Path(tf.name).read_text().split()[-1]) * 1024
            except (ValueError, IndexError):
                pass
        return {"wall": wall, "rc": p.returncode, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace"), "maxrss": maxrss,
                "rss_source": "/usr/bin/time %M" if use_time else "polled VmRSS",
                "anon": peaks["RssAnon"], "file": peaks["RssFile"], "polled_rss": peaks["VmRSS"]}


def evict(files) -> bool:
    """Drop the files' clean pages from the page cache (no root needed)."""
    ok = True
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return ok


def cat_rate(files, total: int) -> float:
    t = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return total / (time.perf_counter() - t)


# safetensors >= 0.4 maps the file lazily in load_file: clone() makes the tensors real
# (the mapped pages are released when the shard's mapped dict goes away).
NAIVE = r"""
import glob, sys, torch
torch.set_num_threads(2)
from safetensors.torch import load_file
kept = [{k: v.clone() for k, v in load_file(f).items()} for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors"))]
print(sum(t.numel() * t.element_size() for d in kept for t in d.values()))
"""

# The library call without the per-tensor error measurement (the CLI always measures it).
# NUMBA_NUM_THREADS=2 comes from the environment. OMP_WAIT_POLICY=PASSIVE is set first, as
# `kbit quantize` does for itself (kbitcli.cli.main): spinning OpenMP workers take the cores
# from the read-ahead and writer threads (without it this row ran 2.5-3x slower than the CLI).
# The library does not set it: the OpenMP runtime is shared with torch in the process, and a
# passive policy slows the runner's decode steps (docs/cli.md).
NO_ERROR = r"""
import json, os, sys
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from kbitcli.convert import convert
from kbitcli.recipe import Recipe
from kbitformat import QuantSpec
s = convert(sys.argv[1], sys.argv[2], Recipe(QuantSpec(4, "int", 64)), force=True, measure_error=False)
print(json.dumps({"seconds": s.seconds, "output_bytes": s.output_bytes}))
"""

# The same CLI conversion with the fused CPU kernel switched off (the general path:
# float32 buffer, kbitformat.quantize + quantization_error): the before/after in one run.
GENERAL = r"""
import sys
from kbitcli import convert
convert._fused_ok = lambda ops, p: False
from kbitcli.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def env2() -> dict:
    e = dict(os.environ)
    n = str(THREADS)
    e.update({"OMP_NUM_THREADS": n, "NUMBA_NUM_THREADS": n, "MKL_NUM_THREADS": n})
    return e


def one_size(size_gb: float, a, rep: Report, results: list) -> None:
    work = Path(a.workdir)
    kv = a.hidden if a.kv is None else a.kv
    layers = layers_for(size_gb * GB, a.hidden, a.intermediate, a.vocab, kv)
    tensors = llama_tensors(layers, a.hidden, a.intermediate, a.vocab, kv)
    total = sum(2 * int(np.prod(s)) for _, s in tensors)
    need = total * 1.5 + 0.5 * GB
    free = shutil.disk_usage(work).free
    if free < need:
        rep.note(f"{size_gb:g} GB: skipped, {free / GB:.1f} GB free under {work} and about {need / GB:.1f} GB needed")
        return
    src = Path(tempfile.mkdtemp(prefix=f"ckpt-{size_gb:g}gb-", dir=work))
    out = src.parent / (src.name + "-kbit")
    try:
        t = time.perf_counter()
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
                  "intermediate_size": a.intermediate, "num_hidden_layers": layers,
                  "num_attention_heads": a.hidden // 128, "num_key_value_heads": kv // 128,
                  "vocab_size": a.vocab, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
        n_shards = max(3, math.ceil(total / (2 * GB)))
        ck = write_checkpoint(src, tensors, n_shards, config)
        gen = time.perf_counter() - t
        print(f"[{size_gb:g} GB] wrote {ck['tensors']} tensors, {ck['total'] / GB:.2f} GB in {ck['shards']} shards "
              f"({gen:.0f} s)", flush=True)
        cmd = [*KBIT_CMD, "quantize", str(src), str(out), *SPEC_ARGS, *DEVICE_ARGS, "--quiet", "--json", "--force"]
        colds, warms, runs, cold_runs, evicted = [], [], [], [], True
        for k in range(a.repeat):
            evicted = evict(ck["files"]) and evicted
            colds.append(cat_rate(ck["files"], ck["total"]))
            warms.append(cat_rate(ck["files"], ck["total"]))
            print(f"[{size_gb:g} GB] cat: cold-ish {colds[-1] / MB:.0f} MB/s, warm {warms[-1] / MB:.0f} MB/s",
                  flush=True)
            r = run_measured(cmd, env=env2())
            if r["rc"] != 0:
                rep.note(f"{size_gb:g} GB: kbit quantize failed (exit {r['rc']}): {r['stderr'][-2000:]}")
                return
            r["summary"] = json.loads(r["stdout"])
            runs.append(r)
            print(f"[{size_gb:g} GB] kbit quantize: {r['wall']:.1f} s, peak RSS {r['maxrss'] / GB:.2f} GB", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            if not a.no_cold_run:  # reading the shards from disk, like this repeat's cold-ish cat
                cold_ok = evict(ck["files"])
                c = run_measured(cmd, env=env2())
                shutil.rmtree(out, ignore_errors=True)
                if c["rc"] == 0:
                    c["evicted"] = cold_ok
                    c["paired"] = ck["total"] / c["wall"] / colds[-1]
                    cold_runs.append(c)
                    print(f"[{size_gb:g} GB] kbit quantize after eviction (cold-ish): {c['wall']:.1f} s, "
                          f"{c['paired'] * 100:.1f}% of this repeat's cold-ish cat", flush=True)
        cold, warm = float(np.median(colds)), float(np.median(warms))
        by_wall = sorted(runs, key=lambda x: x["wall"])
        r = dict(by_wall[(len(by_wall) - 1) // 2])  # the median run (the lower one of an even count)
        for key in ("maxrss", "anon", "file", "polled_rss"):
            r[key] = max(x[key] for x in runs)
        r["walls"] = [x["wall"] for x in runs]
        r["inproc"] = [x["summary"]["seconds"] for x in runs]
        summ = r["summary"]
        cold_run = None
        if cold_runs:  # the median cold-ish run, with every run's wall time and paired ratio
            cold_run = dict(sorted(cold_runs, key=lambda x: x["wall"])[(len(cold_runs) - 1) // 2])
            cold_run["walls"] = [x["wall"] for x in cold_runs]
            cold_run["paireds"] = [x["paired"] for x in cold_runs]
            cold_run["evicted"] = all(x["evicted"] for x in cold_runs)
            cold_run["maxrss"] = max(x["maxrss"] for x in cold_runs)
        noerr = None
        if not a.no_library_row:
            noerr = run_measured([sys.executable, "-c", NO_ERROR, str(src), str(out)], env=env2())
            if noerr["rc"] == 0:
                noerr["summary"] = json.loads(noerr["stdout"].strip().splitlines()[-1])
                print(f"[{size_gb:g} GB] convert(measure_error=False): {noerr['wall']:.1f} s, "
                      f"peak RSS {noerr['maxrss'] / GB:.2f} GB", flush=True)
            else:
                print(f"[{size_gb:g} GB] convert(measure_error=False) failed: {noerr['stderr'][-1500:]}")
                noerr = None
            shutil.rmtree(out, ignore_errors=True)
        general = None
        if not a.no_general:
            gen_cmd = [sys.executable, "-c", GENERAL, "quantize", str(src), str(out), *SPEC_ARGS, "--quiet",
                       "--json", "--force"]
            general = []
            for k in range(a.repeat):
                g = run_measured(gen_cmd, env=env2())
                shutil.rmtree(out, ignore_errors=True)
                if g["rc"] != 0:
                    print(f"[{size_gb:g} GB] general path failed: {g['stderr'][-1500:]}")
                    general = None
                    break
                general.append(g)
                print(f"[{size_gb:g} GB] kbit quantize, fused kernel off: {g['wall']:.1f} s", flush=True)
        naive = None
        if not a.no_naive:
            naive = run_measured([sys.executable, "-c", NAIVE, str(src)], env=env2())
            print(f"[{size_gb:g} GB] naive load_file: {naive['wall']:.1f} s, peak RSS {naive['maxrss'] / GB:.2f} GB",
                  flush=True)
        largest_q = max(2 * int(np.prod(s)) for n, s in tensors if len(s) == 2 and ".layers." in n)
        results.append({"size": size_gb, "ck": ck, "cold": cold, "warm": warm, "evicted": evicted, "kbit": r,
                        "colds": colds, "warms": warms, "cold_run": cold_run,
                        "summary": summ, "naive": naive, "noerr": noerr, "general": general, "largest_q": largest_q, "layers": layers,
                        "cmd": " ".join(["kbit", "quantize", "SRC", "OUT", *SPEC_ARGS, *DEVICE_ARGS, "--quiet", "--json", "--force"])})
    finally:
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def warm_up(a, rep: Report) -> None:
    """Convert a tiny checkpoint first: fills numba's on-disk kernel cache, so that the
    timed runs do not include compilation (reported here instead)."""
    src = Path(tempfile.mkdtemp(prefix="warmup-", dir=a.workdir))
    out = src.parent / (src.name + "-kbit")
    try:
        write_checkpoint(src, llama_tensors(1, 256, 512, 512, 256), 3, {"model_type": "llama"})
        cmd = [*KBIT_CMD, "quantize", str(src), str(out), *SPEC_ARGS, *DEVICE_ARGS, "--quiet", "--json", "--force"]
        first = run_measured(cmd, env=env2())
        shutil.rmtree(out, ignore_errors=True)
        second = run_measured(cmd, env=env2())
        rep.note(f"warm-up on a 2.6 MB checkpoint: `kbit quantize` took {first['wall']:.1f} s the first time "
                 f"(numba cache {'filled' if first['wall'] > second['wall'] + 2 else 'already warm'}) and "
                 f"{second['wall']:.1f} s the second (process start, imports, cached kernels)")
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


def report_sizes(results: list, rep: Report) -> None:
    if not results:
        return
    rep.section("Conversion: peak memory")
    rows = []
    for x in results:
        r, n, ck = x["kbit"], x["naive"], x["ck"]
        goal = 1.5 * GB + 3 * ck["largest"]
        rows.append([f"{ck['total'] / GB:.2f} GB ({x['layers']} layers, {ck['shards']} shards, {ck['tensors']} tensors)",
                     f"{ck['largest'] / MB:.0f} MB", f"{r['maxrss'] / GB:.2f} GB", f"{r['anon'] / GB:.2f} GB",
                     f"{r['file'] / GB:.2f} GB", f"{goal / GB:.2f} GB",
                     f"{n['maxrss'] / GB:.2f} GB" if n else "-",
                     f"{x['noerr']['maxrss'] / GB:.2f} GB (anon {x['noerr']['anon'] / GB:.2f})" if x["noerr"] else "-"])
    rep.table(["checkpoint (bf16)", "largest tensor", "kbit peak RSS", "of which anon (polled)",
               "file-backed (polled)", "goal: 1.5 GB + 3x largest", "naive load_file peak RSS",
               "convert(measure_error=False) peak RSS"], rows)
    rep.note(f"peak RSS = {results[0]['kbit']['rss_source']} of the process; anon / file-backed = peaks of RssAnon / RssFile "
             "polled from /proc every 20 ms (file-backed pages are the memory-mapped shards, which the "
             "kernel can drop under pressure). GB = 1e9 bytes.")
    for x in results:
        goal = 1.5 * GB + 3 * x["ck"]["largest"]
        rep.check(f"{x['ck']['total'] / GB:.1f} GB checkpoint: kbit peak RSS below 1.5 GB + 3x largest tensor",
                  x["kbit"]["maxrss"] < goal,
                  f"{x['kbit']['maxrss'] / GB:.2f} GB vs {goal / GB:.2f} GB (anon {x['kbit']['anon'] / GB:.2f} GB; "
                  f"naive {x['naive']['maxrss'] / GB:.2f} GB)" if x["naive"] else
                  f"{x['kbit']['maxrss'] / GB:.2f} GB vs {goal / GB:.2f} GB")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        d = b["kbit"]["maxrss"] - a["kbit"]["maxrss"]
        rep.check(f"peak RSS flat from {a['ck']['total'] / GB:.1f} GB to {b['ck']['total'] / GB:.1f} GB (growth < 10%)",
                  d < 0.1 * a["kbit"]["maxrss"],
                  f"{a['kbit']['maxrss'] / GB:.2f} GB -> {b['kbit']['maxrss'] / GB:.2f} GB ({d / MB:+.0f} MB; "
                  f"anon {a['kbit']['anon'] / GB:.2f} -> {b['kbit']['anon'] / GB:.2f} GB)")

    rep.section("Conversion: throughput")
    rows = []
    n_runs = len(results[0]["kbit"]["walls"])

    def spread(vals, fmt="{:.1f}"):  # "median" or "median (min-max)" of repeated runs
        return fmt.format(float(np.median(vals))) if len(vals) == 1 else \
            f"{fmt.format(float(np.median(vals)))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"

    for x in results:
        s, r, ck = x["summary"], x["kbit"], x["ck"]
        rate_wall = ck["total"] / float(np.median(r["walls"]))
        rate_in = ck["total"] / float(np.median(r["inproc"]))
        rows.append([f"{ck['total'] / GB:.2f} GB", spread([v / MB for v in x["colds"]], "{:.0f}"),
                     spread([v / MB for v in x["warms"]], "{:.0f}"),
                     spread(r["walls"]), spread(r["inproc"]), f"{rate_wall / MB:.0f}", f"{rate_in / MB:.0f}",
                     f"{rate_wall / x['warm'] * 100:.1f}%", f"{rate_wall / x['cold'] * 100:.1f}%",
                     f"{s['output_bytes'] / GB:.2f} GB", f"{s['bits_per_quantized_weight']:.3f}",
                     f"{s['bits_per_weight']:.3f}",
                     f"{x['noerr']['wall']:.1f} s = {ck['total'] / x['noerr']['wall'] / MB:.0f} MB/s" if x["noerr"] else "-"])
    rep.table(["checkpoint", "cat cold-ish MB/s", "cat warm MB/s", "kbit wall s", "kbit convert s (in-process)",
               "kbit MB/s (wall, median)", "kbit MB/s (in-process, median)", "vs warm cat", "vs cold-ish cat", "output",
               "bits/quantized weight", "bits/weight overall", "convert(measure_error=False) wall"], rows)
    rep.note("MB/s = source bytes read / seconds. The first cat runs after evicting the shards from the page "
             "cache with posix_fadvise(DONTNEED)" + ("" if all(x["evicted"] for x in results) else
                                                     " (eviction FAILED on some file: not really cold)") +
             "; the second cat and the conversion run with the shards in the page cache (warm). "
             "kbit wall includes the interpreter start and imports; 'in-process' is the summary's own time. "
             + (f"{n_runs} runs of each, alternating: the cat, wall and in-process columns give the median "
                "(min-max); the kbit MB/s and the ratios are of medians. " if n_runs > 1 else "") +
             f"Command: `{results[0]['cmd']}`.")
    gr = [x for x in results if x.get("general")]
    if gr:
        rep.table(["checkpoint", "fused (default) wall s", "general path wall s", "general / fused (medians)",
                   "fused MB/s", "general MB/s", "general peak RSS"],
                  [[f"{x['ck']['total'] / GB:.2f} GB", spread(x["kbit"]["walls"]),
                    spread([g["wall"] for g in x["general"]]),
                    f"{np.median([g['wall'] for g in x['general']]) / np.median(x['kbit']['walls']):.2f}x",
                    f"{x['ck']['total'] / np.median(x['kbit']['walls']) / MB:.0f}",
                    f"{x['ck']['total'] / np.median([g['wall'] for g in x['general']]) / MB:.0f}",
                    f"{max(g['maxrss'] for g in x['general']) / GB:.2f} GB"] for x in gr],
                  title="Fused kernel vs the general path (same run, warm page cache)")
        rep.note("The general path is the same CLI command with kbitcli.convert._fused_ok patched to False "
                 "(float32 buffer, kbitformat.quantize + quantization_error with CpuOps); its runs follow the "
                 "fused ones, so both see the same machine. Both write the same bytes.")
    cr = [x for x in results if x.get("cold_run")]
    if cr:
        rep.table(["checkpoint", "kbit wall s, cold-ish (median, range)", "kbit MB/s (median)",
                   "vs the same repeat's cold-ish cat (median, range)", "vs cold-ish cat (median)", "peak RSS"],
                  [[f"{x['ck']['total'] / GB:.2f} GB", spread(x["cold_run"]["walls"]),
                    f"{x['ck']['total'] / float(np.median(x['cold_run']['walls'])) / MB:.0f}",
                    spread([v * 100 for v in x["cold_run"]["paireds"]], "{:.1f}%"),
                    f"{x['ck']['total'] / float(np.median(x['cold_run']['walls'])) / x['cold'] * 100:.1f}%",
                    f"{x['cold_run']['maxrss'] / GB:.2f} GB"] for x in cr],
                  title="Conversion from a cold-ish page cache")
        rep.note("In every repeat the same command also runs right after evicting the shards with "
                 "posix_fadvise(DONTNEED)" + ("" if all(x["cold_run"]["evicted"] for x in cr) else
                                              " (eviction FAILED on some file)")
                 + ": the conversion reads the source from disk, as the cold-ish cat does. The paired ratio "
                 "divides each cold-ish conversion's rate by the cold-ish cat of the same repeat, minutes "
                 "apart at most, since this disk's read rate drifts between runs.")
    for x in results:
        rate = x["ck"]["total"] / float(np.median(x["kbit"]["walls"]))
        rep.check(f"{x['ck']['total'] / GB:.1f} GB: conversion >= 50% of warm cat read rate", rate >= 0.5 * x["warm"],
                  f"{rate / MB:.0f} MB/s vs {x['warm'] / MB:.0f} MB/s ({rate / x['warm'] * 100:.1f}%)")
        rep.check(f"{x['ck']['total'] / GB:.1f} GB: conversion >= 50% of cold-ish cat read rate", rate >= 0.5 * x["cold"],
                  f"{rate / MB:.0f} MB/s vs {x['cold'] / MB:.0f} MB/s ({rate / x['cold'] * 100:.1f}%)")
        if x.get("cold_run"):
            pr = float(np.median(x["cold_run"]["paireds"]))
            rep.check(f"{x['ck']['total'] / GB:.1f} GB: cold-ish conversion >= 50% of cold-ish cat read rate "
                      "(median of the paired ratios)", pr >= 0.5,
                      f"{pr * 100:.1f}% (range {min(x['cold_run']['paireds']) * 100:.1f}-"
                      f"{max(x['cold_run']['paireds']) * 100:.1f}%)")


def embedded(a, rep: Report) -> None:
    rep.section("Conversion: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF source)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kbit-smollm-", dir=a.workdir) as tmp:
        # the third run shows the cost of idle-spinning OpenMP workers (numba's omp layer)
        # competing with numpy's BLAS threads on small tensors
        for extra, env_extra in (([], {}), (SPEC_ARGS, {}), ([], {"OMP_WAIT_POLICY": "PASSIVE"})):
            out = Path(tmp) / "out"
            cmd = [*KBIT_CMD, "quantize", "embedded", str(out), *extra, "--quiet", "--json", "--force"]
            r = run_measured(cmd, env={**env2(), **env_extra})
            if r["rc"] != 0:
                rep.note(f"kbit quantize embedded failed (exit {r['rc']}): {r['stderr'][-1500:]}")
                return
            s = json.loads(r["stdout"])
            errs = [t["error"] for t in s["tensors"] if t.get("error") is not None]
            rows.append([" ".join([*(f"{k}={v}" for k, v in env_extra.items()), "kbit quantize embedded OUT", *extra,
                                   "--quiet --json"]), s["recipe"]["base"],
                         f"{r['wall']:.1f}", f"{s['seconds']:.1f}", f"{s['source_bytes'] / MB:.1f} MB",
                         f"{s['output_bytes'] / MB:.1f} MB", f"{s['bits_per_quantized_weight']:.4f}",
                         f"{s['bits_per_weight']:.3f}", f"{np.mean(errs):.4f}" if errs else "-",
                         f"{r['maxrss'] / GB:.2f} GB"])
            shutil.rmtree(out, ignore_errors=True)
    rep.table(["command", "spec", "wall s", "convert s", "source", "output", "bits/quantized weight",
               "bits/weight overall", "mean rel. error", "peak RSS"], rows)
    rep.note("134.5M parameters; the embedding (tied LM head) and norms stay unquantized by default, so the "
             "overall bits per weight include a 16-bit 28M-parameter embedding.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help="checkpoint sizes in GB, comma-separated (default 2,6; --quick 1)")
    ap.add_argument("--workdir", default="/tmp/kbit-bench", help="where the checkpoints are written (and removed)")
    ap.add_argument("--hidden", type=int, default=5120)
    ap.add_argument("--intermediate", type=int, default=13824)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--kv", type=int, default=None, help="rows of k_proj / v_proj (default: hidden)")
    ap.add_argument("--no-naive", action="store_true", help="skip the load-everything baseline")
    ap.add_argument("--no-library-row", action="store_true",
                    help="skip the extra run of convert(measure_error=False) through the library")
    ap.add_argument("--no-general", action="store_true",
                    help="skip the runs with the fused CPU kernel switched off (the general path)")
    ap.add_argument("--no-embedded", action="store_true", help="skip the SmolLM2-135M conversion")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    ap.add_argument("--quick", action="store_true", help="one ~1 GB checkpoint")
    ap.add_argument("--no-cold-run", action="store_true",
                    help="skip the extra conversion right after evicting the shards from the page cache")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the cat reads and the kbit conversion N times per size (min / median reported)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the tables as markdown")
    ap.add_argument("--threads", type=int, default=2,
                    help="OMP/NUMBA/MKL threads of the kbit subprocesses (default 2, the CI machine's cores)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="kbit quantize --device (cuda: the GPU kernels quantize)")
    a = ap.parse_args(argv)
    global THREADS
    THREADS = max(1, a.threads)
    DEVICE_ARGS[:] = ["--device", a.device] if a.device != "cpu" else []
    sizes = [float(s) for s in (a.sizes or ("1" if a.quick else "2,6")).split(",") if s.strip()]
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rep = Report()
    rep.note(f"machine: {machine()}")
    rep.note(f"versions: {versions('numpy', 'numba', 'torch', 'safetensors')}; kbit subprocess ({' '.join(KBIT_CMD)}) "
             f"with OMP_NUM_THREADS=NUMBA_NUM_THREADS={THREADS}"
             + (f", quantize {' '.join(DEVICE_ARGS)}" if DEVICE_ARGS else ""))
    rep.note(f"synthetic checkpoints: hidden {a.hidden}, intermediate {a.intermediate}, vocab {a.vocab}, bfloat16, "
             f"under {a.workdir} (free: {shutil.disk_usage(a.workdir).free / GB:.0f} GB)")
    results: list = []
    warm_up(a, rep)
    for s in sizes:
        one_size(s, a, rep, results)
    report_sizes(results, rep)
    if not a.no_embedded:
        embedded(a, rep)
    rep.checks_table()
    took = time.perf_counter() - t0
    rep.note(f"bench_convert took {took:.0f} s (sizes {', '.join(f'{s:g}' for s in sizes)} GB)")
    if a.markdown:
        cmd = "python benchmarks/bench_convert.py " + " ".join(argv if argv is not None else sys.argv[1:])
        rep.write(a.markdown, f"<!-- {cmd.strip()} -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
