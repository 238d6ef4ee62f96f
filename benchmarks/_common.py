"""Shared helpers of the benchmark scripts: timing, machine description, report tables
printed as aligned text and optionally collected as markdown."""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def set_threads(n: int = 2) -> None:
    """Pin torch and numba to n threads (the machines these figures come from have 2 cores)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


@dataclass
class Timing:
    min: float
    median: float
    runs: int

    def rate(self, n: float) -> float:
        """n per second at the best run."""
        return n / self.min if self.min > 0 else float("inf")


def timeit(fn, repeats: int = 5, warmup: int = 1) -> Timing:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return Timing(min(ts), statistics.median(ts), len(ts))


def timeit_interleaved(fns: dict, repeats: int = 5, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions round-robin (one run of each per round), so that a noisy
    machine's slow phases hit every contender alike; ratios of these are fair."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return {k: Timing(min(v), statistics.median(v), len(v)) for k, v in ts.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f", {int(line.split()[1]) / 1024**2:.0f} GiB RAM"
    except OSError:
        pass
    try:
        load = ", load average at start %.1f / %.1f / %.1f" % os.getloadavg()
    except OSError:
        load = ""
    return (f"{os.cpu_count()} CPUs (nproc), {cpu_model()}{mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}{load}")


def versions(*mods: str) -> str:
    from importlib import metadata
    out = []
    for m in mods:
        try:
            mod = __import__(m)
            v = getattr(mod, "__version__", None)
            if v is None:
                try:
                    v = metadata.version(m)
                except metadata.PackageNotFoundError:
                    v = "?"
            out.append(f"{m} {v}")
        except Exception:
            out.append(f"{m} (absent)")
    return ", ".join(out)


def fmt(v, digits: int = 4) -> str:
    """Cells: strings as they are, floats with `digits` significant digits."""
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "nan"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


class Report:
    """Prints as it goes; keeps a markdown copy of every section, table and note."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.checks: list[tuple[str, bool | None, str]] = []

    def section(self, title: str) -> None:
        print(f"\n=== {title} ===", flush=True)
        self.md += ["", f"### {title}", ""]

    def note(self, text: str) -> None:
        print(text, flush=True)
        self.md += [text, ""]

    def table(self, headers: list[str], rows: list[list], title: str | None = None) -> None:
        cells = [[fmt(c) for c in r] for r in rows]
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        if title:
            print(f"-- {title}")
            self.md += [f"**{title}**", ""]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        print("  ".join("-" * w for w in widths))
        for r in cells:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        sys.stdout.flush()
        self.md.append("| " + " | ".join(headers) + " |")
        self.md.append("|" + "|".join("---" for _ in headers) + "|")
        for r in cells:
            self.md.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
        self.md.append("")

    def check(self, what: str, ok: bool | None, detail: str) -> None:
        """A goal with PASS / FAIL (None: not measured)."""
        tag = "PASS" if ok else ("FAIL" if ok is not None else "SKIP")
        self.checks.append((what, ok, detail))
        print(f"[{tag}] {what}: {detail}", flush=True)

    def checks_table(self) -> None:
        self.section("Goals")
        self.table(["goal", "result", "measured"],
                   [[w, "PASS" if ok else ("FAIL" if ok is not None else "SKIP"), d] for w, ok, d in self.checks])

    def write(self, path: str | os.PathLike, header: str) -> None:
        Path(path).write_text(header.rstrip() + "\n" + "\n".join(self.md).rstrip() + "\n")
        print(f"\nmarkdown written to {path}")


def transformers_gguf_model(path: Path):
    """transformers' own loading of a GGUF file, the peer of the runner benchmarks (without
    `accelerate`, load_gguf_checkpoint into a model built from the GGUF config, as
    tests/hf_reference.py does)."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    if importlib.util.find_spec("accelerate") is not None:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()
