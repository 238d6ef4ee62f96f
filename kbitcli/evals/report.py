"""Reports of kbit sweeps: merged tables (CSV, JSONL), PNG plots, and a markdown report that
checks the k-bit inference scaling findings on the rows measured.

    rows = merge_results(["a/results.jsonl", "b/results.shard-1-of-2.jsonl"], "merged/results.jsonl")
    outputs = build_report(rows, "merged", metric="ppl")

Method of the markdown report (also written into the report itself):

Lower envelope. For one model, each quantized row is a point (total model bits, metric). A
point is on the lower envelope when no other point reaches a better metric with at most as many
bits. At a budget of B bits the best model is the envelope point with the most bits <= B; the
k of that point is the bit-optimal k at that budget. Within one model every k has an envelope
point at its own budget (more bits never hurt), so the envelope alone answers "how to spend a
budget on k, block size and data type", not the paper's question (a), which trades parameters
against bits across model sizes. That needs several model sizes (given: the envelope over all
models of one family that share tokens; each k's share of it is reported), or, for one model,
the iso-bit proxy below.

Iso-bit proxy (one model). At a fixed total budget T, a model with b bits per parameter has
N = T / b parameters. Near the measured model's size N0 the unquantized loss of the family
changes by dL/dlnN = -alpha * L0 nats per e-fold of N (Kaplan et al. 2020: L(N) = (Nc/N)^alpha,
alpha = 0.076; L0 = the measured reference's mean NLL = ln ppl), so at equal T a point with b
bits per parameter is scored
    score = ln(ppl) + alpha * L0 * ln(b)        (ppl metric; kld: kld + alpha * L0 * ln b)
assuming its measured quantization penalty carries over to the neighbouring sizes. The k of
the lowest score is the bit-optimal k under the proxy; the report also gives the winner for
alpha halved and doubled.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .sweep import LOWER_IS_BETTER, RESULTS_NAME, read_rows

ALPHA_N = 0.076
CSV_FIELDS = ["key", "model", "kind", "label", "bits", "dtype", "block_size", "scale", "outlier_fraction",
              "parameters", "quantized_parameters", "total_model_bits", "bits_per_weight",
              "bits_per_quantized_weight", "total_model_bits_paper", "bits_per_weight_paper", "outlier_columns",
              "metric", "metric_value", "ppl", "ppl_se", "kld", "kld_se", "top1", "ln_ppl_ratio", "ln_ppl_ratio_se",
              "ref_ppl", "lambada_acc", "lambada_acc_se", "lambada_ppl", "text", "task", "n_tokens", "n_scored",
              "n_items", "ctx", "protocol", "kl_topk", "quantize_seconds", "eval_seconds", "seconds", "kbit_version",
              "signature", "time"]
#: known caveats, by model label
MODEL_NOTES = {
    "embedded:SmolLM2-135M-Instruct": (
        "**Caveat: this model's linear weights are already 4-bit.** The embedded SmolLM2-135M-Instruct is a "
        "llama.cpp Q4_1 GGUF: every quantized linear weight was stored with 4-bit asymmetric codes in groups of 32 "
        "(plus an fp16 scale and minimum per group) and is dequantized to float by kbit before the sweep "
        "re-quantizes it. The 'reference' is therefore itself a 5-bit-per-weight model, the weights sit on a "
        "16-level grid per group of 32, and every conclusion about 4-bit optimality is biased by that: a "
        "re-quantization that matches the source grid (4-bit affine, block 32) is nearly free, one that does not "
        "(any other type or block) pays for a second rounding; 5+ bits can represent the 16 levels of each group "
        "much better than they could represent the original bf16 weights. Treat the numbers as a demonstration "
        "of the method on a real model, not as a replication of the paper."),
}


# ----------------------------------------------------------------------------- rows
def _files(paths: Iterable) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p).expanduser()
        if p.is_dir():
            out += sorted(p.glob("results*.jsonl"))
        else:
            out.append(p)
    return out


def load_results(paths: Iterable) -> list[dict]:
    """Rows of JSONL files (a folder means its results*.jsonl), merged (merge_rows)."""
    rows = []
    for f in _files(paths):
        if not f.is_file():
            from kbitcli.errors import InputError
            raise InputError(f"{f}: no such results file")
        rows += read_rows(f)
    return merge_rows(rows)


def merge_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per key: the first one seen (a combination measured twice gives the same
    figures, up to timing)."""
    seen, out = set(), []
    for r in rows:
        if r.get("key") in seen:
            continue
        seen.add(r.get("key"))
        out.append(r)
    return out


def merge_results(paths: Iterable, out_path: str | os.PathLike | None = None) -> list[dict]:
    """Merge results files (deduplicated by key); write them to out_path (atomically; it may be
    one of the inputs) when given."""
    rows = load_results(paths)
    if out_path is not None:
        write_jsonl(rows, out_path)
    return rows


def write_jsonl(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)
    return p


def write_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    p = Path(path)
    extra = sorted({k for r in rows for k in r} - set(CSV_FIELDS))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS + extra, extrasaction="ignore")
    w.writeheader()
    for r in _sorted(rows):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS + extra})
    p.write_text(buf.getvalue(), encoding="utf-8")
    return p


def _sorted(rows: Iterable[dict]) -> list[dict]:
    dtypes = ["reference", "int", "affine", "fp", "nf", "quantile", "lloyd", "dynamic"]
    return sorted(rows, key=lambda r: (r.get("model", ""), r.get("kind") != "reference", r.get("bits") or 0,
                                       dtypes.index(r["dtype"]) if r.get("dtype") in dtypes else 99,
                                       r.get("block_size") or 0, r.get("outlier_fraction") or 0))


# ----------------------------------------------------------------------------- analysis
def value(row: dict, metric: str) -> float | None:
    v = row.get("lambada_acc" if metric == "lambada" else metric)
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def better(a: float, b: float, metric: str) -> bool:
    """a strictly better than b."""
    return a < b if LOWER_IS_BETTER.get(metric, True) else a > b


def pick_metric(rows: Sequence[dict]) -> str:
    c = Counter(r.get("metric") for r in rows if r.get("metric"))
    return c.most_common(1)[0][0] if c else "ppl"


def groups(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """(model, evaluation signature) -> rows."""
    g: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        g[(r.get("model", "?"), r.get("signature", ""))].append(r)
    return dict(g)


def envelope(points: Sequence[dict], metric: str, x: str = "total_model_bits") -> list[dict]:
    """The lower envelope (module docstring), in increasing bits."""
    pts = sorted((p for p in points if value(p, metric) is not None and p.get(x) is not None),
                 key=lambda p: (p[x], value(p, metric) if LOWER_IS_BETTER.get(metric, True) else -value(p, metric)))
    out: list[dict] = []
    for p in pts:
        if not out or better(value(p, metric), value(out[-1], metric), metric):
            out.append(p)
    return out


def best_at_budget(env: Sequence[dict], budget: float, x: str = "total_model_bits") -> dict | None:
    fit = [p for p in env if p[x] <= budget * (1 + 1e-12)]
    return fit[-1] if fit else None


def _plain(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r.get("kind") == "quantized" and not r.get("outlier_fraction")]


def _find(rows, **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def proxy_scores(rows: Sequence[dict], ref: dict | None, metric: str, alpha: float = ALPHA_N) -> list[tuple[float, dict]]:
    """(score, row) of the iso-bit proxy (module docstring), lowest first; [] when it does not apply."""
    if metric not in ("ppl", "kld") or ref is None or not ref.get("ppl"):
        return []
    L0 = math.log(float(ref["ppl"]))
    out = []
    for r in rows:
        v = value(r, metric)
        if v is None or not r.get("bits_per_weight"):
            continue
        base = math.log(v) if metric == "ppl" else v
        out.append((base + alpha * L0 * math.log(float(r["bits_per_weight"])), r))
    return sorted(out, key=lambda t: t[0])


def _fmt(v, metric: str) -> str:
    if v is None:
        return "n/a"
    if metric == "lambada":
        return f"{100 * v:.2f}%"
    if metric == "kld":
        return f"{v:.4f}"
    return f"{v:.3f}" if v < 1e4 else f"{v:.3g}"


def _rel(a: float, b: float, metric: str) -> str:
    """How much better a is than b, in words."""
    if metric == "lambada":
        return f"{100 * (a - b):+.2f} points"
    return f"{100 * (a / b - 1):+.1f}%"


def analyze(rows: Sequence[dict], metric: str, alpha: float = ALPHA_N) -> dict:
    """Figures and verdicts for one (model, signature) group."""
    ref = next((r for r in rows if r.get("kind") == "reference"), None)
    plain = [r for r in _plain(rows) if value(r, metric) is not None]
    a: dict = {"ref": ref, "plain": plain, "metric": metric}
    env = envelope(plain, metric)
    a["envelope"] = env
    a["best_per_k"] = {}
    for k in sorted({r["bits"] for r in plain}):
        pts = [r for r in plain if r["bits"] == k]
        best = pts[0]
        for r in pts:
            if better(value(r, metric), value(best, metric), metric):
                best = r
        a["best_per_k"][k] = best
    # (a) iso-bit proxy
    sc = proxy_scores(plain, ref, metric, alpha)
    a["proxy"] = sc
    a["proxy_winner"] = sc[0][1]["bits"] if sc else None
    a["proxy_sensitivity"] = {f: (proxy_scores(plain, ref, metric, alpha * f) or [(None, {"bits": None})])[0][1]["bits"]
                              for f in (0.5, 1.0, 2.0)} if sc else {}
    # (b) block 64 vs 1024 at 3 and 4 bits
    blocks = []
    for k in (3, 4):
        for dt in sorted({r["dtype"] for r in plain}):
            r64, r1k = _find(plain, bits=k, dtype=dt, block_size=64), _find(plain, bits=k, dtype=dt, block_size=1024)
            if r64 and r1k:
                nxt = _find(plain, bits=k + 1, dtype=dt, block_size=1024)
                blocks.append({"bits": k, "dtype": dt, "b64": r64, "b1024": r1k, "next_k_b1024": nxt,
                               "wins": better(value(r64, metric), value(r1k, metric), metric)})
    a["blocks"] = blocks
    # (c) fp and quantile vs int at 3 and 4 bits, every block size measured for all three
    types = []
    for k in (3, 4):
        for b in sorted({r["block_size"] for r in plain if r["bits"] == k}):
            ri = _find(plain, bits=k, dtype="int", block_size=b)
            if not ri:
                continue
            for dt in ("fp", "quantile", "nf"):
                rd = _find(plain, bits=k, dtype=dt, block_size=b)
                if rd:
                    types.append({"bits": k, "block_size": b, "dtype": dt, "row": rd, "int": ri,
                                  "wins": better(value(rd, metric), value(ri, metric), metric)})
    a["types"] = types
    # outliers: each outlier row with its plain twin
    outl = []
    for r in rows:
        if r.get("kind") == "quantized" and r.get("outlier_fraction") and value(r, metric) is not None:
            twin = _find(plain, bits=r["bits"], dtype=r["dtype"], block_size=r["block_size"], scale=r.get("scale"))
            if twin:
                outl.append({"row": r, "plain": twin, "wins": better(value(r, metric), value(twin, metric), metric)})
    a["outliers"] = outl
    return a


def _verdict(wins: Sequence[bool]) -> str:
    if not wins:
        return "not measured"
    n = sum(wins)
    if n == len(wins):
        return "holds"
    if n == 0:
        return "does not hold"
    return f"partly holds ({n} of {len(wins)} comparisons)"


# ----------------------------------------------------------------------------- plots
DTYPE_STYLE = {"int": ("o", "C0"), "affine": ("v", "C5"), "fp": ("s", "C1"), "nf": ("^", "C2"),
               "quantile": ("D", "C3"), "lloyd": ("P", "C4"), "dynamic": ("X", "C6")}


def _slug(text: str) -> str:
    import re
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


def _block_size_axes(ax, logy: bool, title: str, clip_y: Callable[[], None] | None = None) -> None:
    """A small panel with the block size on a log2 x axis (and a log y axis when logy;
    clip_y, if given, sets the y limits before its ticks are labelled)."""
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
        if clip_y is not None:
            clip_y()
        _plain_log(ax, "y")
    _plain_log(ax, "x")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("block size", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.tick_params(labelsize=7)


def _plain_log(ax, which: str) -> None:
    """Plain number tick labels on a log axis (minor ones too when it spans less than a decade)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    axis = ax.yaxis if which == "y" else ax.xaxis
    lo, hi = (ax.get_ylim() if which == "y" else ax.get_xlim())
    fmt = FuncFormatter(lambda v, _: f"{v:.4g}")
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(fmt if lo > 0 and hi / lo < 10 else NullFormatter())
    ax.tick_params(axis=which, which="both", labelsize=7)


PPL_CLIP = 8.0  # perplexity plots show up to this multiple of the unquantized perplexity


def _clip(ax, values, top: float | None) -> None:
    """Cut the y-axis at `top` (log scale), saying how many points lie above."""
    if top is None:
        return
    above = sum(1 for v in values if v is not None and v > top)
    if above:
        lo = min(v for v in values if v is not None)
        ax.set_ylim(min(lo, top) / 1.15, top)
        ax.text(0.01, 0.99, f"{above} point{'s' if above > 1 else ''} above {top:.3g} not shown",
                transform=ax.transAxes, fontsize=6, va="top", ha="left", color="gray")


def make_plots(rows: Sequence[dict], out_dir: str | os.PathLike, metric: str | None = None,
               prefix: str = "", dpi: int = 80) -> list[Path]:
    """PNG plots per (model, signature) group: metric vs total model bits (one curve per k),
    metric vs block size (per k, one panel per data type), data types side by side at 3 and
    4 bits. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or pick_metric(rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    gs = groups(rows)
    for (model, sig), grows in gs.items():
        a = analyze(grows, metric)
        plain, ref = a["plain"], a["ref"]
        if not plain:
            continue
        tag = prefix + _slug(model) + ("" if len({m for m, _ in gs}) == len(gs) else "-" + _slug(sig)[-8:])
        ylab = {"ppl": "perplexity", "kld": "mean KL divergence (nats)", "lambada": "LAMBADA-style accuracy"}[metric]
        logy = metric in ("ppl", "kld")
        ks = sorted({r["bits"] for r in plain})
        top = PPL_CLIP * value(ref, metric) if metric == "ppl" and ref is not None and value(ref, metric) else None
        cmap = plt.get_cmap("viridis")
        kcol = {k: cmap(i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}

        # 1. metric vs total model bits
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k in ks:
            pts = [r for r in plain if r["bits"] == k]
            for r in pts:
                m, _ = DTYPE_STYLE.get(r["dtype"], ("o", "k"))
                ax.scatter(r["total_model_bits"], value(r, metric), marker=m, color=kcol[k], s=22, alpha=0.8)
            best = {}
            for r in pts:  # best data type per block size: the curve of k
                b = r["block_size"]
                if b not in best or better(value(r, metric), value(best[b], metric), metric):
                    best[b] = r
            line = sorted(best.values(), key=lambda r: r["total_model_bits"])
            ax.plot([r["total_model_bits"] for r in line], [value(r, metric) for r in line], "-", color=kcol[k],
                    label=f"{k}-bit", lw=1.3)
        for o in a["outliers"]:
            r = o["row"]
            ax.scatter(r["total_model_bits"], value(r, metric), marker="o", facecolors="none",
                       edgecolors=kcol.get(r["bits"], "k"), s=60, lw=1.2)
        env = a["envelope"]
        ax.step([r["total_model_bits"] for r in env], [value(r, metric) for r in env], where="post", color="k",
                lw=0.8, ls=":", label="lower envelope")
        if ref is not None and value(ref, metric) is not None and metric != "kld":
            ax.axhline(value(ref, metric), color="gray", ls="--", lw=1, label="unquantized")
        for dt, (m, _) in DTYPE_STYLE.items():
            if any(r["dtype"] == dt for r in plain):
                ax.scatter([], [], marker=m, color="gray", label=dt)
        if a["outliers"]:
            ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="+ outliers")
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
            _clip(ax, [value(r, metric) for r in plain] + [value(o["row"], metric) for o in a["outliers"]], top)
            _plain_log(ax, "y")
        _plain_log(ax, "x")
        ax.set_xlabel("total model bits (log scale)")
        ax.set_ylabel(ylab)
        ax.set_title(f"{model}: {metric} vs total model bits", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        f = out / f"{tag}-{metric}-vs-bits.png"
        fig.savefig(f, dpi=dpi)
        plt.close(fig)
        files.append(f)

        # 2. metric vs block size, one panel per data type, one line per k
        dts = [d for d in DTYPE_STYLE if any(r["dtype"] == d for r in plain)]
        ncol = min(2, len(dts))
        nrow = -(-len(dts) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.8 * nrow), squeeze=False, sharey=True)
        for i, dt in enumerate(dts):
            ax = axes[i // ncol][i % ncol]
            for k in ks:
                pts = sorted((r for r in plain if r["bits"] == k and r["dtype"] == dt), key=lambda r: r["block_size"])
                if pts:
                    ax.plot([r["block_size"] for r in pts], [value(r, metric) for r in pts], "o-", color=kcol[k],
                            ms=3, lw=1.2, label=f"{k}-bit")
            ys = [value(r, metric) for r in plain if r["dtype"] == dt]
            _block_size_axes(ax, logy, dt, lambda: _clip(ax, ys, top))
        for j in range(len(dts), nrow * ncol):
            axes[j // ncol][j % ncol].axis("off")
        axes[0][0].set_ylabel(ylab, fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"{model}: {metric} vs block size", fontsize=10)
        fig.tight_layout()
        f = out / f"{tag}-{metric}-vs-block.png"
        fig.savefig(f, dpi=dpi)
        plt.close(fig)
        files.append(f)

        # 3. data types side by side at 3 and 4 bits
        kk = [k for k in (3, 4) if k in ks] or ks[:2]
        fig, axes = plt.subplots(1, len(kk), figsize=(3.8 * len(kk), 3.2), squeeze=False)
        for i, k in enumerate(kk):
            ax = axes[0][i]
            for dt in dts:
                pts = sorted((r for r in plain if r["bits"] == k and r["dtype"] == dt), key=lambda r: r["block_size"])
                if pts:
                    m, c = DTYPE_STYLE[dt]
                    ax.plot([r["block_size"] for r in pts], [value(r, metric) for r in pts], marker=m, color=c,
                            ms=4, lw=1.2, label=dt)
            _block_size_axes(ax, logy, f"{k}-bit")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(ylab, fontsize=8)
        fig.suptitle(f"{model}: data types", fontsize=10)
        fig.tight_layout()
        f = out / f"{tag}-{metric}-dtypes.png"
        fig.savefig(f, dpi=dpi)
        plt.close(fig)
        files.append(f)
    return files


# ----------------------------------------------------------------------------- markdown
def _pt(r: dict) -> str:
    b = "row" if r.get("block_size") == 0 else r.get("block_size")
    s = f"{r['bits']}-bit {r['dtype']} b{b}"
    if r.get("outlier_fraction"):
        s += f" +{100 * r['outlier_fraction']:g}% outliers"
    return s


def _bpw(r: dict) -> str:
    return f"{r['bits_per_weight']:.3f}"


def markdown(rows: Sequence[dict], metric: str | None = None, plots: Sequence[Path] = (), plot_prefix: str = "",
             title: str = "kbit sweep report", notes: dict | None = None, alpha: float = ALPHA_N) -> str:
    """The markdown report (module docstring for the method)."""
    metric = metric or pick_metric(rows)
    mname = {"ppl": "perplexity", "kld": "mean KL divergence to the unquantized model",
             "lambada": "LAMBADA-style last-word accuracy"}[metric]
    lower = LOWER_IS_BETTER.get(metric, True)
    notes = {**MODEL_NOTES, **(notes or {})}
    q = [r for r in rows if r.get("kind") == "quantized"]
    L = [f"# {title}", ""]
    if not q:
        L += ["No quantized rows to report.", ""]
        return "\n".join(L)
    vers = sorted({r.get("kbit_version", "?") for r in rows})
    secs = sum(float(r.get("seconds") or 0) for r in rows)
    nref = sum(r.get("kind") == "reference" for r in rows)
    L += [f"Metric: **{mname}** ({'lower' if lower else 'higher'} is better). {len(q)} quantized rows and "
          f"{nref} reference row{'' if nref == 1 else 's'}; evaluation time summed over rows "
          f"{secs / 60:.1f} min; kbit {', '.join(vers)}.", "",
          f"- bits: {', '.join(map(str, sorted({r['bits'] for r in q})))}; data types: "
          f"{', '.join(sorted({r['dtype'] for r in q}))}; block sizes: "
          f"{', '.join(str(b) for b in sorted({r['block_size'] for r in q}))}; scale: "
          f"{', '.join(sorted({str(r.get('scale')) for r in q}))}; outlier fractions: "
          f"{', '.join(f'{p:g}' for p in sorted({r.get('outlier_fraction') or 0 for r in q}))}",
          "- total model bits = parameters x bits per weight, summed over every stored tensor: quantized tensors "
          "at their true stored bits (codes, scales, padding of rows to whole blocks), kept tensors (embeddings, "
          "norms, ...) at 16 bits as the paper counts them. 'bpw' below = total model bits / parameters; "
          "'paper bpw' counts k + scale bits / block size for the quantized weights (no padding).", ""]
    for (model, sig), grows in groups(rows).items():
        a = analyze(grows, metric, alpha)
        ref, plain = a["ref"], a["plain"]
        L += [f"## {model}", ""]
        ex = next(iter(plain), None) or ref or {}
        what = ex.get("task") or ex.get("text") or "?"
        extra = (f", {ex.get('n_tokens')} tokens ({ex.get('n_scored')} scored), ctx {ex.get('ctx')}, protocol "
                 f"{ex.get('protocol')}" if ex.get("n_tokens") else f", {ex.get('n_items')} items")
        L += [f"Evaluated on {what}{extra}. Parameters: {ex.get('parameters', 0):,} "
              f"({ex.get('quantized_parameters', 0):,} quantized). Signature `{sig}`.", ""]
        if model in notes:
            L += [notes[model], ""]
        if ref is not None:
            L += [f"Unquantized: {metric} {_fmt(value(ref, metric), metric)}"
                  + (f" (± {ref.get('ppl_se'):.3f})" if metric == "ppl" and ref.get("ppl_se") else "") + ".", ""]
        if not plain:
            L += ["No plain quantized rows.", ""]
            continue
        # best per k
        acc = metric == "lambada"
        L += ["### Best point per k", "",
              "| k | best setting | " + ("accuracy | " if acc else "") + "ppl | KL | bpw | paper bpw | bits/quantized weight |",
              "|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
        for k, r in a["best_per_k"].items():
            L.append(f"| {k} | {_pt(r)} | " + (f"{_fmt(value(r, metric), metric)} | " if acc else "")
                     + f"{_fmt(r.get('ppl'), 'ppl')} | {_fmt(r.get('kld'), 'kld')} | {_bpw(r)} | "
                     f"{r.get('bits_per_weight_paper') or float('nan'):.3f} | "
                     f"{r.get('bits_per_quantized_weight') or float('nan'):.3f} |")
        L.append("")
        # envelope
        env = a["envelope"]
        L += ["### Bit-optimal k", "",
              "Method: every quantized row (without outliers) is a point (total model bits, metric). A point is on "
              "the lower envelope when no other point reaches a better metric with at most as many bits; at a "
              "budget B the best model is the envelope point with the most bits <= B, and its k is the bit-optimal "
              "k at that budget. Envelope of this model (budgets in bits per parameter):", "",
              f"| budget (bpw) | bit-optimal k | setting | {metric} |", "|---|---|---|---|"]
        for r in env:
            L.append(f"| {_bpw(r)} | {r['bits']} | {_pt(r)} | {_fmt(value(r, metric), metric)} |")
        share = Counter(r["bits"] for r in env)
        L += ["", "Within one model each k owns the budgets just above its own cost (more bits never hurt), so the "
              "envelope shows how to spend a budget on k, block size and data type: "
              + "; ".join(f"k={k}: {n} envelope point{'s' if n > 1 else ''}" for k, n in sorted(share.items()))
              + ". Where a smaller k with a small block beats a larger k with a large block at fewer bits, that is "
              "visible here.", ""]
        if a["proxy"]:
            sc = a["proxy"]
            bestk: dict[int, tuple[float, dict]] = {}
            for s, r in sc:
                bestk.setdefault(r["bits"], (s, r))
            L += ["The paper's question (a) trades parameters against bits across model sizes, which one model "
                  "cannot show directly. Iso-bit proxy: at a fixed total budget a model with b bits per parameter "
                  "has 1/b as many parameters; near this model's size the unquantized loss changes by "
                  f"alpha x L0 = {alpha:g} x {math.log(float(ref['ppl'])):.3f} = "
                  f"{alpha * math.log(float(ref['ppl'])):.3f} nats per e-fold of parameters (Kaplan et al. 2020, "
                  "L(N) = (Nc/N)^0.076), so each point is scored "
                  + ("ln(ppl)" if metric == "ppl" else "KL") + " + alpha L0 ln(bpw) (lower is better), taking its "
                  "measured quantization penalty as it is at neighbouring sizes.", "",
                  "| k | best setting under the proxy | score | bpw |", "|---|---|---|---|"]
            for k, (s, r) in sorted(bestk.items()):
                L.append(f"| {k} | {_pt(r)} | {s:.4f} | {_bpw(r)} |")
            sens = a["proxy_sensitivity"]
            L += ["", f"Bit-optimal k under the proxy: **{a['proxy_winner']}** (alpha x0.5: k={sens.get(0.5)}, "
                  f"x2: k={sens.get(2.0)}).", ""]
        # cross-model envelope, when several models share the tokens
        fam = [r for (m2, s2), g2 in groups(rows).items() if s2 == sig for r in _plain(g2)]
        if len({r["model"] for r in fam}) > 1:
            fenv = envelope(fam, metric)
            fs = Counter(r["bits"] for r in fenv)
            L += [f"Across the {len({r['model'] for r in fam})} models evaluated on the same tokens, the lower "
                  "envelope holds " + "; ".join(f"k={k}: {n} point{'s' if n > 1 else ''}" for k, n in
                                                sorted(fs.items())) + ".", ""]
        # findings
        L += ["### The paper's findings on this model", ""]
        # (a)
        if a["proxy_winner"] is not None:
            holds = a["proxy_winner"] == 4
            L.append(f"- **(a) 4-bit is bit-optimal: {'holds' if holds else 'does not hold'}** under the iso-bit proxy "
                     f"(winner k={a['proxy_winner']}; alpha x0.5: k={a['proxy_sensitivity'].get(0.5)}, x2: "
                     f"k={a['proxy_sensitivity'].get(2.0)}).")
        elif len({r["model"] for r in fam}) > 1:
            fs = Counter(r["bits"] for r in envelope(fam, metric))
            L.append(f"- **(a) 4-bit is bit-optimal: {'holds' if fs and fs.most_common(1)[0][0] == 4 else 'does not hold'}** "
                     f"on the cross-model envelope (points per k: {dict(sorted(fs.items()))}).")
        else:
            L.append("- **(a) 4-bit is bit-optimal: not measured** (one model and a metric without the proxy).")
        # (b)
        bl = a["blocks"]
        if bl:
            L.append(f"- **(b) small blocks help at 3-4 bits (block 64 vs 1024): {_verdict([x['wins'] for x in bl])}.**")
            for x in bl:
                v64, v1k = value(x["b64"], metric), value(x["b1024"], metric)
                d_bits = x["b64"]["bits_per_weight"] - x["b1024"]["bits_per_weight"]
                d_paper = (x["b64"].get("bits_per_weight_paper") or 0) - (x["b1024"].get("bits_per_weight_paper") or 0)
                nxt = x["next_k_b1024"]
                nx = (f"; {x['bits'] + 1}-bit b1024: {_fmt(value(nxt, metric), metric)}" if nxt else "")
                L.append(f"  - {x['bits']}-bit {x['dtype']}: b64 {_fmt(v64, metric)} vs b1024 {_fmt(v1k, metric)} "
                         f"({_rel(v64, v1k, metric)}){nx}; bits per parameter {d_bits:+.3f} stored, "
                         f"{d_paper:+.3f} paper")
        else:
            L.append("- **(b) small blocks help at 3-4 bits: not measured** (needs 3- or 4-bit rows at block 64 and 1024).")
        # (c)
        ty = a["types"]
        if ty:
            fq = [x for x in ty if x["dtype"] in ("fp", "quantile")]
            L.append(f"- **(c) float and quantile beat int at 3-4 bits: {_verdict([x['wins'] for x in fq])}** "
                     f"(same k and block size; fp: {_verdict([x['wins'] for x in fq if x['dtype'] == 'fp'])}, "
                     f"quantile: {_verdict([x['wins'] for x in fq if x['dtype'] == 'quantile'])}; "
                     f"nf, not in the paper: {_verdict([x['wins'] for x in ty if x['dtype'] == 'nf'])}).")
            for k in (3, 4):
                for b in sorted({x["block_size"] for x in ty if x["bits"] == k}):
                    xs = [x for x in ty if x["bits"] == k and x["block_size"] == b]
                    ri = xs[0]["int"]
                    parts = ", ".join(f"{x['dtype']} {_fmt(value(x['row'], metric), metric)} "
                                      f"({_rel(value(x['row'], metric), value(ri, metric), metric)})" for x in xs)
                    L.append(f"  - {k}-bit b{b}: int {_fmt(value(ri, metric), metric)}; {parts}")
        else:
            L.append("- **(c) float and quantile beat int: not measured** (needs int and fp/quantile at 3 or 4 bits).")
        # outliers
        if a["outliers"]:
            L.append(f"- **Outlier-dependent quantization** (paper: stabilises 3-bit, nothing at 4-bit): better than "
                     f"its plain twin in {sum(o['wins'] for o in a['outliers'])} of {len(a['outliers'])} settings.")
            for o in sorted(a["outliers"], key=lambda o: (o["row"]["bits"], o["row"]["dtype"])):
                r, p = o["row"], o["plain"]
                L.append(f"  - {_pt(r)}: {_fmt(value(r, metric), metric)} vs {_fmt(value(p, metric), metric)} plain "
                         f"({_rel(value(r, metric), value(p, metric), metric)}) for {r['bits_per_weight'] - p['bits_per_weight']:+.3f} "
                         f"bits per parameter ({r.get('outlier_columns', '?')} columns kept)")
        L.append("")
        # every row
        allq = _sorted(r for r in grows if r.get("kind") == "quantized")
        L += ["### Every setting", "",
              "| setting | bpw | paper bpw | bits/quantized weight | " + ("accuracy | " if acc else "")
              + "ppl | ln(ppl/ref) ± se | KL | top-1 | seconds |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if acc else "")]
        for r in allq:
            lr = (f"{r['ln_ppl_ratio']:.3f} ± {r.get('ln_ppl_ratio_se') or 0:.3f}"
                  if r.get("ln_ppl_ratio") is not None else "n/a")
            t1 = f"{100 * r['top1']:.1f}%" if r.get("top1") is not None else "n/a"
            L.append(f"| {_pt(r)} | {_bpw(r)} | {r.get('bits_per_weight_paper') or float('nan'):.3f} | "
                     f"{r.get('bits_per_quantized_weight') or float('nan'):.3f} | "
                     + (f"{_fmt(value(r, metric), metric)} | " if acc else "")
                     + f"{_fmt(r.get('ppl'), 'ppl')} | {lr} | {_fmt(r.get('kld'), 'kld')} | {t1} | "
                     f"{float(r.get('seconds') or 0):.0f} |")
        L.append("")
        mine = [p for p in plots if Path(p).name.startswith(plot_prefix + _slug(model))]
        if mine:
            L += ["### Plots", ""] + [f"![{Path(p).stem}]({Path(p).name if not plot_prefix else p})" for p in mine] + [""]
    L += ["## Table", "", "Every row is in results.csv / results.jsonl next to this report.", ""]
    return "\n".join(L)


def build_report(rows_or_paths, out_dir: str | os.PathLike, metric: str | None = None,
                 title: str = "kbit sweep report", notes: dict | None = None, plots: bool = True) -> dict:
    """results.jsonl + results.csv + PNG plots + report.md in out_dir; returns their paths."""
    rows = list(rows_or_paths) if rows_or_paths and isinstance(next(iter(rows_or_paths)), dict) \
        else load_results(rows_or_paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or pick_metric(rows)
    jl = out / RESULTS_NAME
    if rows and {r.get("key") for r in read_rows(jl)} != {r.get("key") for r in rows}:
        write_jsonl(rows, jl)  # (left alone when it already holds these rows: a sweep may be appending to it)
    cs = write_csv(rows, out / "results.csv")
    pngs = make_plots(rows, out, metric) if plots and rows else []
    md = out / "report.md"
    md.write_text(markdown(rows, metric, pngs, title=title, notes=notes), encoding="utf-8")
    return {"jsonl": str(jl) if jl.is_file() else None, "csv": str(cs), "plots": [str(p) for p in pngs], "report": str(md),
            "rows": len(rows), "metric": metric}


__all__ = ["analyze", "build_report", "envelope", "load_results", "make_plots", "markdown", "merge_results",
           "merge_rows", "proxy_scores", "write_csv", "write_jsonl"]
