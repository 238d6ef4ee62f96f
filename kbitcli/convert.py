"""The streaming conversion pipeline: one tensor in memory at a time.

    summary = convert("path/to/model", "out/model-kbit", Recipe(QuantSpec(4, "nf", 64)))

The output is assembled in a hidden folder beside OUT (".OUT.kbit-partial") and renamed
to OUT only when complete, so an interrupted run never leaves an OUT that looks done.
Finished shards survive Ctrl-C and are reused by resume=True after their checksums
are verified. Any other failure (disk full, bad input) removes the partial folder.

Three stages overlap, in order and with bounded queues, so the output bytes are the same
as one after the other and memory stays at about one tensor:
  * read-ahead: a thread asks the source to bring the coming tensors into the page cache,
    up to READ_AHEAD_BYTES past the one being converted (Source.prefetch; for safetensors
    posix_fadvise WILLNEED, which costs no memory of this process);
  * the main thread quantizes the tensor and measures its error: on the CPU, for the common
    recipes (fixed codebooks, no search, fp16/fp32 scales; bfloat16/float16/float32 sources)
    with one fused parallel kernel reading the source's memory-mapped values
    (kbitcli.kernels.cpu_fused); otherwise by reading it into one reused float32 buffer (no
    fresh allocation per tensor) and running kbitformat.quantize / quantization_error. Both
    give the same bytes;
  * a writer thread checksums and writes the results, at most one tensor behind: each shard
    in one pass, its data straight into the shard file behind room reserved for the header
    (an upper bound, kbitformat.io.header_bound, of the tensors still to come), with O_DIRECT
    where the file system takes it (no page-cache copy, no writeback work competing for the
    CPU; plain writes elsewhere, the same bytes); the header is written into its room when
    the shard is finished, then the fsync.
An error in a thread is raised in the main thread at its next hand-over; Ctrl-C stops the
threads (the writer after the tensor it is writing) before the partial folder is kept.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kbitformat import FORMAT_VERSION_STR, quantization_error, quantize
from kbitformat.io import INDEX_NAME, KbitWriter, f32_to_bf16, header_bound

from . import __version__
from .architectures import is_multimodal_config
from .errors import InputError, OutputError, UsageError
from .recipe import Recipe

ProgressFn = Callable[..., None]
TOOL = f"kbit {__version__}"


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    source_dtype: str
    quantized: bool
    spec: str | None
    stored_dtype: str
    bits_per_weight: float
    error: float | None
    seconds: float

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class Plan:
    name: str
    shape: tuple[int, ...]
    dtype: str
    is_float: bool
    nbytes: int
    spec: object  # QuantSpec | None


@dataclass
class ConvertSummary:
    source: str
    out: str
    recipe: dict
    tensors: list[TensorReport] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    source_bytes: int = 0
    output_bytes: int = 0
    resumed: int = 0

    @property
    def parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def quantized_parameters(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors if t.quantized)

    @property
    def total_bits(self) -> float:
        return sum(t.bits_per_weight * int(np.prod(t.shape)) for t in self.tensors)

    def to_dict(self) -> dict:
        q = [t for t in self.tensors if t.quantized]
        qbits = sum(t.bits_per_weight * int(np.prod(t.shape)) for t in q)
        return {
            "source": self.source, "out": self.out, "tool": TOOL, "format_version": FORMAT_VERSION_STR,
            "recipe": self.recipe, "parameters": self.parameters,
            "quantized_parameters": self.quantized_parameters,
            "total_model_bits": self.total_bits,
            "bits_per_weight": self.total_bits / max(1, self.parameters),
            "bits_per_quantized_weight": qbits / max(1, self.quantized_parameters),
            "source_bytes": self.source_bytes, "output_bytes": self.output_bytes,
            "size_vs_fp16": self.output_bytes / max(1, 2 * self.parameters),
            "seconds": round(self.seconds, 3), "resumed_tensors": self.resumed,
            "dropped": self.dropped, "warnings": self.warnings,
            "tensors": [t.to_dict() for t in self.tensors],
        }


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.kbit-partial"


def _check_paths(src_path: Path, out: Path, force: bool, resume: bool) -> None:
    src_root = src_path if src_path.is_dir() else src_path.parent
    o, s = out.resolve(), src_root.resolve()
    if o == s or s in o.parents:
        raise UsageError(f"the output {out} lies inside the source {src_root}; choose another folder")
    if o in s.parents or (src_path.resolve() == o):
        raise UsageError(f"the output {out} would contain the source; choose another folder")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")


def plan_tensors(source, recipe: Recipe) -> tuple[list[Plan], list[str], list[str]]:
    """(tensors to write in order, dropped names, warnings)."""
    infos = source.tensors()
    names = [t.name for t in infos]
    config = source.config() or {}
    dropped, warnings = [], []
    # a head stored beside embeddings the config ties is the embedding again, and is stored once;
    # not in a multimodal wrapper, whose stored head transformers (and the runner) keep
    tied = bool(config.get("tie_word_embeddings")) and not is_multimodal_config(config)
    for head in ("lm_head.weight",):
        if tied and head in names and len(names) > 1:
            dropped.append(head)
    for p in recipe.unmatched(names):
        warnings.append(f"the pattern {p!r} matches no tensor")
    plans = []
    for t in infos:
        if t.name in dropped:
            continue
        plans.append(Plan(t.name, tuple(t.shape), t.dtype, t.is_float, t.nbytes,
                          recipe.spec_for(t.name, tuple(t.shape), t.is_float, t.dtype)))
    return plans, dropped, warnings


def fingerprint(source, plans: list[Plan], recipe: Recipe) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([TOOL, FORMAT_VERSION_STR, recipe.to_dict()]).encode())
    for p in plans:
        h.update(json.dumps([p.name, list(p.shape), p.dtype, p.nbytes, None if p.spec is None else p.spec.label()]).encode())
    return h.hexdigest()[:32]


class _Worker:
    """One daemon thread running jobs in the order given, at most `depth` jobs behind.

    A job's exception is kept and raised in the submitting thread by the next submit() or
    finish() (later jobs are skipped), so an error never hangs the pipeline. cancel() drops
    the queued jobs and waits for the running one."""

    def __init__(self, name: str, depth: int = 1) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is None and not self._stopped:
                try:
                    job[0](*job[1], **job[2])
                except BaseException as e:  # handed to the main thread
                    self._error = e
            del job

    def _check(self) -> None:
        if self._error is not None:
            self._stopped = True  # before clearing the error: no later job may run
            e, self._error = self._error, None
            raise e

    def submit(self, fn, *args, **kwargs) -> None:
        self._check()
        while True:
            try:
                self._q.put((fn, args, kwargs), timeout=0.05)
                return
            except queue.Full:
                self._check()

    def offer(self, fn, *args) -> None:
        """submit() for a hint that may be dropped: never waits, never raises a job's error."""
        try:
            self._q.put_nowait((fn, args, {}))
        except queue.Full:
            pass

    def _end(self) -> None:
        while self._thread.is_alive():
            try:
                self._q.put(None, timeout=0.05)
                break
            except queue.Full:
                pass
        while self._thread.is_alive():
            self._thread.join(0.05)

    def finish(self) -> None:
        """Wait for every job; raise the first job error."""
        self._end()
        self._check()

    def cancel(self) -> None:
        """Skip what is queued, wait for the job running now; never raises a job's error.
        A second Ctrl-C while waiting stops the wait (the thread is a daemon)."""
        self._stopped = True
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        try:
            self._end()
        except KeyboardInterrupt:
            pass
        self._error = None


#: bytes of source the read-ahead keeps asked for beyond the tensor being converted (at least
#: the next tensor): on a cold page cache the disk reads them while the CPU works
READ_AHEAD_BYTES = 512 * 1024**2


class _ReadAhead:
    """Hints the source (Source.prefetch, on the read-ahead worker) to read the tensors of
    `todo` in order, up to READ_AHEAD_BYTES (and at least one tensor) past the one being
    converted; starting() is called as each tensor of todo starts."""

    def __init__(self, worker, prefetch, todo: list[Plan]) -> None:
        self.worker, self.prefetch, self.todo = worker, prefetch, todo
        self.cur = -1   # index in todo of the tensor being converted
        self.nxt = 0    # next index to hint
        self.window = 0  # bytes of todo[cur + 1 : nxt]

    def starting(self) -> None:
        if self.worker is None:
            return
        self.cur += 1
        if self.nxt <= self.cur:  # not hinted yet (the first tensor)
            self.worker.offer(self.prefetch, self.todo[self.cur].name)
            self.nxt = self.cur + 1
        else:
            self.window -= self.todo[self.cur].nbytes
        while self.nxt < len(self.todo) and (self.nxt == self.cur + 1 or self.window < READ_AHEAD_BYTES):
            self.worker.offer(self.prefetch, self.todo[self.nxt].name)
            self.window += self.todo[self.nxt].nbytes
            self.nxt += 1


def _keep(add, source, p: Plan) -> tuple[str, float]:
    """Store a tensor unquantized in its source dtype with add(name, arr, orig_dtype=...,
    st_dtype=...) (KbitWriter.add_tensor, or a call handing it to the writer thread); GGUF
    block-quantized tensors (which safetensors cannot hold) become float16.
    Returns (stored dtype, bits/weight)."""
    raw = getattr(source, "raw_view", None) or source.load_raw
    if p.dtype == "bfloat16":
        add(p.name, raw(p.name), orig_dtype="bfloat16", st_dtype="BF16")
        return "bfloat16", 16.0
    if p.dtype[:1].isupper() or p.dtype.startswith("float8"):
        arr = source.load(p.name).astype(np.float16)
        if not np.isfinite(arr).all():
            arr = source.load(p.name)
        add(p.name, arr, orig_dtype=p.dtype)
        return str(arr.dtype), arr.itemsize * 8.0
    arr = raw(p.name)
    add(p.name, arr, orig_dtype=p.dtype)
    return str(arr.dtype), arr.dtype.itemsize * 8.0


def plan_header_bound(p: Plan) -> int:
    """kbitformat.io.header_bound of one planned tensor: its name, dimensions, bits and stored
    parts (codes and scales, plus dq_absmax with dq scales, plus offsets when affine)."""
    if p.spec is None:
        return header_bound(p.name, None, ndim=len(p.shape))
    return header_bound(p.name, p.spec.bits, ndim=len(p.shape),
                        parts=2 + (p.spec.scale == "dq") + bool(p.spec.affine))


def _fused_ok(ops, p: Plan) -> bool:
    """True when the tensor takes the fused CPU kernel (kbitcli.kernels.cpu_fused)."""
    if getattr(ops, "name", None) != "cpu" or p.spec is None:
        return False
    from .kernels import cpu_fused
    return cpu_fused.supported(p.spec, p.dtype)


def _quantize_tensor(src, p: Plan, ops, scratch, measure_error: bool):
    """(QuantizedTensor, relative error or None) of one tensor.

    The CPU's common case (a fixed codebook, no search, fp16/fp32 scales, a bfloat16,
    float16 or float32 source) runs the fused kernel, one parallel pass over the source's
    stored values (cpu_fused.quantize_fused); everything else loads float32 values (into
    `scratch` when the source can) and runs kbitformat.quantize and quantization_error.
    Both give the same bits: the same output bytes and the same recorded error."""
    if _fused_ok(ops, p):
        from .kernels import cpu_fused
        raw = getattr(src, "raw_view", None) or src.load_raw
        got = cpu_fused.quantize_fused(raw(p.name), p.dtype, p.spec, p.name, shape=p.shape, orig_dtype=p.dtype,
                                       measure_error=measure_error)
        if got is not None:
            return got
    x = src.load(p.name, out=scratch) if scratch is not None else src.load(p.name)
    qt = quantize(x, p.spec, p.name, ops=ops, orig_dtype=p.dtype)
    err = quantization_error(x, qt, ops) if measure_error else None
    return qt, err


def convert(source, out: str | os.PathLike, recipe: Recipe, *, device: str = "cpu",
            shard_size: int = 2 * 1024**3, force: bool = False, resume: bool = False,
            provenance: dict | None = None, progress: ProgressFn | None = None,
            measure_error: bool = True) -> ConvertSummary:
    """Convert `source` (a path or an opened kbitcli.sources Source) into a kbit folder.

    On a machine with few cores, a library caller converts fastest with OMP_WAIT_POLICY=PASSIVE
    set before Numba's OpenMP pool starts (what `kbit quantize` sets for itself): spinning
    workers otherwise take the cores from the read-ahead and writer threads (2.5-3x slower on
    2 cores). convert() does not set it: the runtime is shared with torch in the process, and
    a passive policy slows the runner's decode steps."""
    from .architectures import config_architecture, describe_supported, is_supported_config
    from .kernels import get_ops
    from .sources import open_source
    from .sources._base import BaseSource

    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    out = Path(out)
    src = open_source(source) if isinstance(source, (str, os.PathLike)) else source
    _check_paths(Path(src.path), out, force, resume)
    ops = get_ops(device)
    extra_files = src.extra_files()  # fails now, not after an hour of conversion
    plans, dropped, warnings = plan_tensors(src, recipe)
    warnings = list(getattr(src, "warnings", [])) + warnings
    cfg = src.config()
    if cfg is not None and not is_supported_config(cfg):  # converted all the same: a note, not an error
        warnings.append(f"kbit's runner does not run {config_architecture(cfg)} models (it runs "
                        f"{describe_supported()}); the output can be inspected and verified, and kbit dequantize "
                        "turns it back into a plain checkpoint for other tools")
    summary = ConvertSummary(str((provenance or {}).get("source", src.path)), str(out), recipe.to_dict(),
                             dropped=dropped, warnings=warnings)
    meta = {"source": str(provenance.get("source", src.path)) if provenance else str(src.path),
            "source_kind": src.kind, "recipe": recipe.to_dict(), "fingerprint": fingerprint(src, plans, recipe),
            **({k: v for k, v in provenance.items() if k != "source"} if provenance else {})}
    work = partial_dir(out)
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    writer = out_q = ahead = None
    try:
        # header room for a shard about to start: the bounds of the tensors still to come, so
        # that each shard is written in one pass (filled once resume has said what is done)
        bounds: list[int] = []
        writer = KbitWriter(work, max_shard_bytes=shard_size, model_metadata=meta, tool=TOOL, resume=resume,
                            header_reserve=lambda added: sum(bounds[added:]), direct_io=True)
        done = set(writer.resumed)
        summary.resumed = len(done)
        todo = [p for p in plans if p.name not in done]
        bounds += [plan_header_bound(p) for p in todo]
        progress("start", total=len(plans), total_bytes=sum(p.nbytes for p in plans), resumed=len(done))
        out_q = _Worker("kbit-writer", depth=1)
        prefetch = getattr(src, "prefetch", None)
        if prefetch is not None and todo:
            ahead = _Worker("kbit-read-ahead", depth=64)
        read_ahead = _ReadAhead(ahead, prefetch, todo)
        # one float32 buffer for every tensor the source can read into one (no fresh
        # allocation, and no page faults on new memory, per tensor)
        fast = getattr(src, "load_into_dtypes", frozenset()) if isinstance(src, BaseSource) else frozenset()
        need = max((int(np.prod(p.shape)) for p in todo if p.spec is not None and p.dtype in fast
                    and not _fused_ok(ops, p)), default=0)
        scratch = np.empty(need, dtype=np.float32) if need else None
        for i, p in enumerate(plans):
            ts = time.perf_counter()
            if p.name in done:
                progress("tensor", index=i, name=p.name, nbytes=p.nbytes, skipped=True)
                continue
            read_ahead.starting()
            if p.spec is None:
                stored, bpw = _keep(functools.partial(out_q.submit, writer.add_tensor), src, p)
                rep = TensorReport(p.name, p.shape, p.dtype, False, None, stored, bpw, None, 0.0)
            else:
                qt, err = _quantize_tensor(src, p, ops, scratch if p.dtype in fast else None, measure_error)
                out_q.submit(writer.add_quantized, p.name, qt, {"error": err})
                rep = TensorReport(p.name, p.shape, p.dtype, True, p.spec.label(), "kbit",
                                   qt.bits_per_weight, err, 0.0)
                del qt
            rep.seconds = time.perf_counter() - ts
            summary.tensors.append(rep)
            progress("tensor", index=i, name=p.name, nbytes=p.nbytes, report=rep)
        scratch = None
        if ahead is not None:
            ahead.cancel()
        out_q.finish()
        writer.close()
        if done:  # describe the resumed tensors from their stored recipes
            summary.tensors = _reports_from_output(work, plans)
        _write_side_files(work, src, recipe, summary, meta, extra_files)
        _publish(work, out, force)
    except KeyboardInterrupt:
        _stop(ahead, out_q)
        if writer is not None:
            writer.abort(keep_finished=True)
        raise
    except BaseException as e:
        _stop(ahead, out_q)
        if writer is not None:
            writer.abort()
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OutputError(f"disk full while writing {out}; the partial output was removed, "
                              "the source is untouched") from None
        if isinstance(e, OSError) and not isinstance(e, (InputError,)):
            raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
        raise
    summary.seconds = time.perf_counter() - t0
    summary.source_bytes = src.total_bytes()
    summary.output_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    progress("done", summary=summary)
    return summary


def _stop(*workers) -> None:
    for w in workers:
        if w is not None:
            w.cancel()


def _reports_from_output(folder: Path, plans: list[Plan]) -> list[TensorReport]:
    from kbitformat.io import KbitReader
    r = KbitReader(folder, verify=False)
    reps = []
    for p in plans:
        rec = r.recipe(p.name)
        if rec.get("quantized"):
            reps.append(TensorReport(p.name, p.shape, p.dtype, True,
                                     f"{rec['bits']}:{rec['dtype']}:b{rec['block_size']}:{rec['scale']}",
                                     "kbit", rec["bits_per_weight"], rec.get("error"), 0.0))
        else:
            st = r.stored[p.name]
            bits = 8.0 * st.nbytes / max(1, int(np.prod(p.shape)))
            reps.append(TensorReport(p.name, p.shape, p.dtype, False, None, st.dtype, bits, None, 0.0))
    return reps


def _write_side_files(work: Path, src, recipe: Recipe, summary: ConvertSummary, meta: dict,
                      extra_files: dict) -> None:
    config = dict(src.config() or {})
    d = summary.to_dict()
    config["quantization_config"] = {
        "quant_method": "kbit", "format_version": FORMAT_VERSION_STR, "tool": TOOL,
        "recipe": recipe.to_dict(), "bits_per_weight": d["bits_per_weight"],
        "bits_per_quantized_weight": d["bits_per_quantized_weight"],
    }
    if src.config() is not None or config:
        (work / "config.json").write_text(json.dumps(config, indent=2))
    for name, data in extra_files.items():
        if name in ("config.json", INDEX_NAME) or name.endswith(".safetensors"):
            continue
        if isinstance(data, (bytes, bytearray)):
            (work / name).write_bytes(data)
        else:
            shutil.copyfile(data, work / name)
    (work / "README.md").write_text(model_card(summary, meta))


def model_card(summary: ConvertSummary, meta: dict) -> str:
    d = summary.to_dict()
    q = [t for t in summary.tensors if t.quantized]
    errs = [t.error for t in q if t.error is not None]
    lines = [
        "---", "tags: [kbit, quantized]", "---", "",
        f"# {Path(summary.out).name}", "",
        f"Converted with {TOOL} (kbit format {FORMAT_VERSION_STR}).", "",
        "| | |", "|---|---|",
        f"| source | `{meta.get('source')}` ({meta.get('source_kind')}) |",
        f"| revision | {meta.get('revision', 'n/a')} |",
        f"| recipe | `{json.dumps(summary.recipe)}` |",
        f"| parameters | {d['parameters']:,} ({d['quantized_parameters']:,} quantized) |",
        f"| bits per weight | {d['bits_per_weight']:.4f} overall, {d['bits_per_quantized_weight']:.4f} on quantized tensors |",
        f"| total model bits | {d['total_model_bits']:.4g} |",
    ]
    if errs:
        lines.append(f"| relative weight error | mean {np.mean(errs):.4f}, max {np.max(errs):.4f} |")
    if summary.dropped:
        lines.append(f"| not stored (tied to the embedding) | {', '.join(summary.dropped)} |")
    lines += ["", "Load with `kbit generate` / `kbitcli.runner`, inspect with `kbit inspect`, "
              "check with `kbit verify`.", ""]
    return "\n".join(lines)


def _publish(work: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place (atomically replacing an old OUT with --force)."""
    old = None
    if out.exists():
        if not force:
            raise OutputError(f"{out} already exists; pass --force to replace it")
        old = out.parent / f".{out.name}.kbit-old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
