"""kbit sweep: the k-bit inference scaling grid (kbitcli.evals.sweep) and its report
(kbitcli.evals.report); docs/scaling.md describes the method and a run on SmolLM2."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .main import app
from .options import JsonOpt, QuietOpt, stderr_is_tty


def _ints(text: str, what: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() == "row":
            out.append(0)
            continue
        try:
            out.append(int(part))
        except ValueError:
            raise UsageError(f"{what}: cannot read {part!r}; give comma-separated integers, e.g. 2,3,4") from None
    if not out:
        raise UsageError(f"{what}: give at least one value")
    return out


def _floats(text: str, what: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part:
            try:
                out.append(float(part.rstrip("%")) / (100 if part.endswith("%") else 1))
            except ValueError:
                raise UsageError(f"{what}: cannot read {part!r}; give fractions, e.g. 0.02 (or 2%)") from None
    return out


class SweepProgress:
    """A rich bar over the combinations on a terminal; plain lines otherwise; nothing when quiet."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.rich = not quiet and stderr_is_tty()
        self.t0 = time.perf_counter()
        self.progress = None
        self.task = None
        self.n = 0
        self.total = 0

    def _line(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def __call__(self, event: str, **kw) -> None:
        if self.quiet:
            return
        if event == "start" and self.progress is None:
            self.total = kw["combos"] * (kw["models"] if kw.get("jobs") else 1)
            if self.rich:
                from rich.console import Console
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                           TimeRemainingColumn)
                self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
                self.progress.start()
                self.task = self.progress.add_task("sweep", total=None)
            self._line(f"sweep: {kw['combos']} combination(s) per model, {kw['models']} model(s) -> {kw['results']}"
                       + (f", {kw['jobs']} processes" if kw.get("jobs") else ""))
        elif event == "load":
            self._line(f"loading {kw['model']}")
        elif event == "model":
            self.total = kw["todo"]
            if self.progress is not None:
                self.progress.reset(self.task, total=kw["todo"], description=kw["model"][-40:])
            self._line(f"{kw['model']}: {kw['todo']} to run, {kw['done']} already in the results file "
                       f"(loaded in {kw['load_seconds']:.0f} s)")
        elif event == "warning":
            self._line(f"kbit: warning: {kw['model']}: {kw['message']}")
        elif event == "reference":
            if self.progress is not None:
                self.progress.update(self.task, description="reference")
            else:
                self._line(f"{kw['model']}: unquantized reference")
        elif event == "combo":
            if self.progress is not None:
                self.progress.update(self.task, description=kw["label"])
        elif event == "row":
            r = kw["row"]
            if r.get("kind") == "quantized":
                self.n += 1
                if self.progress is not None:
                    self.progress.update(self.task, advance=1)
            fig = " ".join(f"{k} {r[k]:.4g}" for k in ("ppl", "kld", "lambada_acc") if r.get(k) is not None)
            line = (f"[{self.n}/{self.total}] " if r.get("kind") == "quantized" else "") + \
                f"{r['label']}: {fig}, {r['bits_per_weight']:.3f} bits/param ({r['seconds']:.0f} s)"
            self._line(line)
        elif event == "end":
            self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@app.command("sweep")
def sweep_cmd(
    models: Annotated[Optional[list[str]], typer.Argument(help="Models: folders, .safetensors/.bin, .gguf, Hub ids, "
                                                                "or 'embedded' (the offline SmolLM2-135M).")] = None,
    bits: Annotated[str, typer.Option("--bits", "-k", help="Bit widths, comma-separated.")] = "2,3,4,5,6,8",
    dtype: Annotated[str, typer.Option("--dtype", "-t", help="Data types, comma-separated (int, affine, fp, nf, "
                                                             "quantile, lloyd, dynamic).")] = "int,fp,nf,quantile",
    block_size: Annotated[str, typer.Option("--block-size", "-b", help="Block sizes, comma-separated "
                                                                      "(multiples of 32, or 'row').")] = "32,64,128,256,1024",
    scale: Annotated[str, typer.Option("--scale", help="Block scale encoding: fp16, fp32, dq or e8.")] = "fp16",
    outliers: Annotated[Optional[str], typer.Option("--outliers", help="Also run outlier-dependent quantization "
                                                    "keeping these fractions of hidden units in 16 bits, e.g. 0.02 "
                                                    "(comma-separated; each point keeps its plain twin).")] = None,
    text: Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file to evaluate on.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Built-in text: wiki (offline Wikipedia), "
                                                   "wikitext-2, wikitext-2-parquet.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="ppl, kld (both measured on every row; this picks the "
                                        "report's), or lambada.")] = "ppl",
    lambada: Annotated[Optional[Path], typer.Option("--lambada", help="LAMBADA JSONL ({\"text\": ...} a line) for "
                                                    "--metric lambada; without it, LAMBADA-style items are cut from "
                                                    "the text.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder (results.jsonl, report, plots).")] = Path("kbit-sweep"),
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Local processes, each running every N-th combination.")] = 1,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run only shard i/N (every N-th combination from "
                                                 "the i-th, 1-based) into results.shard-i-of-N.jsonl; join the "
                                                 "files with --merge.")] = None,
    ctx: Annotated[Optional[int], typer.Option("--ctx", help="Tokens per window (default: 512, or the model's "
                                               "context window when it is shorter).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Evaluate on the first N tokens.")] = 8192,
    protocol: Annotated[str, typer.Option("--protocol", help="Perplexity windows: hf or llama.cpp.")] = "hf",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 1,
    rule: Annotated[list[str], typer.Option("--rule", help="Recipe rule PATTERN=SPEC or PATTERN=keep, as in kbit "
                                            "quantize (applied to every combination).")] = [],  # noqa: B006
    skip: Annotated[list[str], typer.Option("--skip", help="Keep tensors matching this glob unquantized.")] = [],  # noqa: B006
    merge: Annotated[Optional[list[Path]], typer.Option("--merge", help="Merge these results files or folders "
                                                        "(deduplicated by key) into --out and report; runs "
                                                        "nothing. Repeatable.")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a grid of k-bit settings on one or more models (fake quantization in memory, the
    same bits `kbit quantize` writes) and report the scaling-law findings."""
    from ..evals.report import build_report, merge_results
    from ..evals.sweep import METRICS, RESULTS_NAME, grid, parse_shard, run_sweep, shard_file, shard_of
    if metric not in METRICS:
        raise UsageError(f"unknown --metric {metric!r}; choose {', '.join(METRICS)}")
    silent = quiet or json_out
    if merge:
        if models:
            raise UsageError("--merge only merges results files; give no MODEL with it")
        rows = merge_results(merge, out / RESULTS_NAME)
        outputs = build_report(rows, out, metric=metric if metric != "ppl" else None, plots=not no_plots)
        _finish(outputs, json_out, quiet, rows=len(rows))
        return
    if not models:
        raise UsageError("give at least one MODEL ('embedded' for the offline SmolLM2-135M), or --merge FILE...")
    sh = parse_shard(shard)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs})")
    if sh is not None and jobs > 1:
        raise UsageError("--jobs and --shard do not go together: --jobs N runs N shards itself")
    outs = _floats(outliers, "--outliers") if outliers else []
    combos = grid(_ints(bits, "--bits"), [d.strip() for d in dtype.split(",") if d.strip()],
                  _ints(block_size, "--block-size"), scale, [0.0, *outs])  # bad settings fail before any loading
    if sh is not None and not shard_of(combos, sh):
        raise UsageError(f"--shard {shard}: the grid has only {len(combos)} combinations")
    body, where, items, items_name = None, "", None, None
    if metric == "lambada" and lambada is not None:
        from ..evals.tasks import load_task_file
        items, items_name = load_task_file("lambada", lambada), str(lambada)
    if text is not None or dataset is not None or metric != "lambada" or lambada is None:
        from .eval_cmds import _read_text
        body, where = _read_text(text, dataset)
    resolved = []
    from .convert_cmds import resolve_source
    from ..evals.sweep import model_label
    for m in models:
        path, prov = resolve_source(m, quiet=silent)
        resolved.append((model_label(m), path))
    progress = SweepProgress(silent)
    try:
        run_sweep(resolved, bits=_ints(bits, "--bits"), dtypes=[d.strip() for d in dtype.split(",") if d.strip()],
                  block_sizes=_ints(block_size, "--block-size"), text=body, text_name=where, metric=metric,
                  out_dir=out, jobs=jobs, ctx=ctx, max_tokens=max_tokens, outlier_fraction=outs, scale=scale,
                  shard=sh, lambada_items=items, lambada_name=items_name, protocol=protocol, batch_size=batch_size,
                  rules=rule, skips=skip, progress=progress)
    finally:
        progress.stop()
    if sh is not None:  # a shard reports only its own file; --merge joins the shards
        outputs = {"results": str(out / shard_file(sh)), "shard": f"{sh[0]}/{sh[1]}"}
        if json_out:
            print(json.dumps(outputs, indent=2))
        elif not quiet:
            print(f"shard {sh[0]}/{sh[1]} done: {out / shard_file(sh)} (merge the shards with kbit sweep --merge)")
        return
    outputs = build_report([out / RESULTS_NAME], out, metric=metric, plots=not no_plots)
    _finish(outputs, json_out, quiet)


def _finish(outputs: dict, json_out: bool, quiet: bool, rows: int | None = None) -> None:
    if json_out:
        print(json.dumps(outputs, indent=2))
        return
    if quiet:
        return
    print(f"{outputs['rows']} rows -> {outputs['jsonl']}, {outputs['csv']}")
    for p in outputs["plots"]:
        print(f"plot: {p}")
    print(f"report: {outputs['report']}")
