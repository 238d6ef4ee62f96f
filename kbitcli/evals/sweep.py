"""Scaling-law sweeps: one model, many k-bit settings, one row of figures per setting
(Dettmers & Zettlemoyer, "The case for 4-bit precision: k-bit Inference Scaling Laws").

    rows = run_sweep(["embedded"], bits=[3, 4], dtypes=["int", "nf"], block_sizes=[64, 1024],
                     text=wiki_text(), out_dir="sweep-out", max_tokens=8192)

For each model the source is loaded once (kbit's runner, float32 on the CPU) and a float32
copy is kept of only the weights the recipe quantizes. Each combination is then evaluated by
fake quantization: every selected weight is quantized in memory with the CPU kernels
(kbitcli.kernels "cpu": the same bits `kbit quantize` writes), dequantized, and written into
the model's weight in place; the model is evaluated; the original weights are restored. At
most one quantized model exists at a time. Tensors the recipe keeps are set to what a
conversion stores for them (GGUF block-quantized and float8 tensors become float16, as
kbitcli.convert does), so a row evaluates exactly the model `kbit quantize` would produce.

Metrics (all rows of one sweep share the same tokens):
  ppl, kld  one forward pass per combination: kbitcli.evals.compare against the reference's
            saved top-k log-probabilities (REFERENCE_TOPK + a "rest" bucket: a lower bound of
            the exact KL, see compare.py), giving perplexity, mean KL(ref || quant), top-1
            agreement and the paired ln(ppl/ref ppl) with its standard error. The reference
            (unquantized) forward pass runs once per model; its top-k file is kept in out_dir
            so a resumed sweep does not run it again.
  lambada   last-word accuracy (kbitcli.evals.tasks, lm-evaluation-harness scoring) on a LAMBADA
            JSONL file, or, without one, on LAMBADA-style items cut from the text
            (cloze_items: the last word of paragraphs of the text; not the LAMBADA data set).

Cost accounting (the paper's x-axis): total model bits = sum over every stored tensor (a tied
LM head is stored once) of numel x bits per weight, with quantized tensors at their true
stored bits (qt.bits_per_weight: codes, scales, offsets, padding) and kept tensors at 16 bits
as the paper counts them. A 4-bit block-64 fp16-scale int tensor costs 4 + 16/64 = 4.25.
Rows also carry the paper's accounting (total_model_bits_paper: k + scale bits / block size,
no padding of rows to whole blocks; paper_bits_per_weight), which differs when a row is not a
multiple of the block size (SmolLM2's 576-wide rows in blocks of 1024 store 1024 codes).

Outlier-dependent quantization (the paper's section on outliers), fake-quant only: in every
quantized 2-D weight, the round(p * in_features) input columns (hidden units) whose weights have
the largest standard deviation are kept in float16 and the remaining columns are quantized as
one [out, in - n] tensor (blocks run along its rows). Cost: the quantized part at its stored
bits, 16 bits per kept weight, and OUTLIER_INDEX_BITS per kept column index. Stored, this would
be three tensors per weight: the kbit tensor [out, in - n], float16 values [out, n] and int32
column indices [n] (dequantize, then scatter the columns back); kbit format 1.0 has no such
layout, so `kbit quantize` cannot write it yet.

Results: one JSON object per line in out_dir/results.jsonl (RESULTS_NAME), appended and
fsync'ed as each combination finishes. A rerun skips combinations whose key is already there;
a truncated last line (a killed run) is dropped. `shard=(i, n)` runs every n-th combination
(i = 1..n) into results.shard-i-of-n.jsonl; merge_results (kbitcli.evals.report) joins files.
`jobs=n` runs the n shards in n local processes and merges them into results.jsonl.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from kbitcli.errors import InputError, UsageError

RESULTS_NAME = "results.jsonl"
REFERENCE_TOPK = 128
KEPT_BITS = 16.0          # the paper counts unquantized tensors at 16 bits
OUTLIER_INDEX_BITS = 32   # one int32 column index per kept hidden unit
METRICS = ("ppl", "kld", "lambada")
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_DTYPES = ("int", "fp", "nf", "quantile")
DEFAULT_BLOCKS = (32, 64, 128, 256, 1024)
#: lower is better for these row fields; higher for the accuracies
LOWER_IS_BETTER = {"ppl": True, "kld": True, "lambada": False, "lambada_acc": False, "lambada_ppl": True,
                   "ln_ppl_ratio": True}

ProgressFn = Callable[..., None]


def _version() -> str:
    from kbitcli import __version__
    return __version__


# ----------------------------------------------------------------------------- combinations
@dataclass(frozen=True)
class Combo:
    """One point of the grid."""
    bits: int
    dtype: str
    block_size: int
    scale: str = "fp16"
    outliers: float = 0.0

    def spec(self):
        from kbitformat import QuantSpec
        return QuantSpec(bits=self.bits, dtype=self.dtype, block_size=self.block_size, scale=self.scale)

    @property
    def label(self) -> str:
        s = self.spec().label()
        return s + (f":out{self.outliers:g}" if self.outliers else "")


def grid(bits: Iterable[int], dtypes: Iterable[str], block_sizes: Iterable[int], scale: str = "fp16",
         outliers: Iterable[float] | None = None) -> list[Combo]:
    """Every combination (bits x dtype x block x outlier fraction), in a fixed order; invalid
    settings raise UsageError before any work. Outlier fraction 0 means none."""
    from kbitformat import KbitValueError
    outs = sorted({float(p) for p in (outliers or [0.0])})
    for p in outs:
        if not 0.0 <= p < 0.5:
            raise UsageError(f"an outlier fraction must be at least 0 and below 0.5 (got {p:g}; write 0.02 for 2%)")
    combos = []
    for k, dt, b, p in itertools.product(sorted(set(bits)), list(dict.fromkeys(dtypes)), sorted(set(block_sizes)),
                                         outs):
        c = Combo(int(k), dt, int(b), scale, p)
        try:
            c.spec()
        except KbitValueError as e:
            raise UsageError(f"{c.bits}-bit {c.dtype} block {c.block_size}: {e}") from None
        combos.append(c)
    if not combos:
        raise UsageError("the grid is empty: give at least one value of --bits, --dtype and --block-size")
    return combos


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' (i = 1..N) -> (i, N)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(f"--shard {text!r}: write i/N with 1 <= i <= N, e.g. 2/4")
    return int(m.group(1)), int(m.group(2))


def shard_of(combos: Sequence, shard: tuple[int, int] | None) -> list:
    """Every N-th combination starting at the i-th (1-based)."""
    if shard is None:
        return list(combos)
    i, n = shard
    return list(combos)[i - 1::n]


def shard_file(shard: tuple[int, int] | None) -> str:
    return RESULTS_NAME if shard is None else f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


# ----------------------------------------------------------------------------- results file
def read_rows(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """The rows of a JSONL results file. A last line without its newline (a run killed while
    writing) is ignored, and with repair=True cut off the file so appends start clean; other
    unreadable lines are skipped."""
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
    rows = []
    for line in data[:end].split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
    return rows


def append_row(path: str | os.PathLike, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- models
def model_label(text: str) -> str:
    """A short, machine-independent name for a model argument (keys must match across machines)."""
    if text in (None, "", "embedded"):
        return "embedded:SmolLM2-135M-Instruct"
    p = Path(str(text)).expanduser()
    if p.exists():
        return p.name if p.is_dir() else p.stem
    return str(text)


def _resolve(model) -> tuple[str, Path]:
    """(label, path) from 'embedded', a local path, or a (label, path) pair."""
    if isinstance(model, (tuple, list)):
        return str(model[0]), Path(model[1])
    if model in (None, "", "embedded"):
        from kbitcli.sources import embedded_model_path
        return model_label("embedded"), embedded_model_path()
    p = Path(str(model)).expanduser()
    if not p.exists():
        raise InputError(f"{model}: no such file or folder (the sweep library takes local paths or 'embedded'; "
                         "`kbit sweep` also pulls Hub ids)")
    return model_label(str(model)), p


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "model"


def _rounded_on_keep(source_dtype: str) -> bool:
    """Whether a conversion stores a kept tensor of this source dtype as float16 (GGUF
    block-quantized and float8 tensors: kbitcli.convert._keep)."""
    return source_dtype[:1].isupper() or source_dtype.startswith("float8")


def _conversion_keep(arr: np.ndarray, source_dtype: str) -> np.ndarray:
    """The float32 values a conversion stores for a kept tensor (kbitcli.convert._keep): GGUF
    block-quantized and float8 tensors become float16 (when finite); others keep their values."""
    if _rounded_on_keep(source_dtype):
        h = arr.astype(np.float16)
        if np.isfinite(h).all():
            return h.astype(np.float32)
    return arr


def outlier_columns(w: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the round(fraction * in) input columns of w [out, in] with the largest
    standard deviation (at least one when fraction > 0; ties broken by the lower index)."""
    cols = w.shape[1]
    n = min(cols - 1, max(1, int(round(fraction * cols)))) if fraction > 0 else 0
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    sd = np.asarray(w, dtype=np.float64).std(axis=0)
    return np.sort(np.argsort(-sd, kind="stable")[:n])


def fake_quantize(x: np.ndarray, spec, name: str, ops, outliers: float = 0.0,
                  in_axis: int = -1) -> tuple[np.ndarray, float, dict]:
    """(dequantized float32 array, total stored bits, info) of one tensor, as `kbit quantize`
    would store it; with outliers > 0 (2-D tensors) the outlier columns along in_axis stay in
    float16 (module docstring)."""
    from kbitformat import dequantize, quantize
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not outliers or x.ndim != 2:
        qt = quantize(x, spec, name, ops=ops)
        return dequantize(qt, ops).reshape(x.shape), qt.bits_per_weight * x.size, {}
    w = x if in_axis in (-1, 1) else x.T
    keep = outlier_columns(w, outliers)
    rest = np.setdiff1d(np.arange(w.shape[1]), keep)
    qt = quantize(np.ascontiguousarray(w[:, rest]), spec, name, ops=ops)
    out = np.empty_like(w)
    out[:, rest] = dequantize(qt, ops).reshape(w.shape[0], rest.size)
    kept = w[:, keep].astype(np.float16)
    out[:, keep] = kept.astype(np.float32) if np.isfinite(kept).all() else w[:, keep]
    bits = qt.bits_per_weight * w.shape[0] * rest.size + KEPT_BITS * w.shape[0] * keep.size \
        + OUTLIER_INDEX_BITS * keep.size
    out = out if in_axis in (-1, 1) else out.T
    return np.ascontiguousarray(out), bits, {"outlier_columns": keep}


_SCALE_BITS = {"fp16": 16.0, "fp32": 32.0, "e8": 8.0, "dq": 8.0 + 32.0 / 256}
_OFFSET_BITS = {"fp16": 16.0, "fp32": 32.0, "e8": 8.0, "dq": 8.0}


def paper_bits_per_weight(spec, cols: int) -> float:
    """The paper's accounting of one quantized weight: k + (scale [+ offset] bits) / B, blocks
    taken as if they ran over the flattened tensor (no padding of rows to whole blocks, which
    kbit's stored bits include: a 576-wide row in blocks of 1024 stores 1024 codes)."""
    b = spec.block_size or cols
    over = _SCALE_BITS[spec.scale] + (_OFFSET_BITS[spec.scale] if spec.affine else 0.0)
    return spec.bits + over / b


@dataclass
class _Target:
    name: str            # checkpoint name
    param: torch.nn.Parameter
    shape: tuple
    source_dtype: str
    in_axis: int


class LoadedModel:
    """A model loaded for a sweep: the runner's model, its tokenizer, the stored tensors of a
    conversion (names, shapes, dtypes) and float32 copies of the weights a recipe quantizes."""

    def __init__(self, model_arg, rules: Sequence[str] = (), skips: Sequence[str] = ()) -> None:
        from kbitformat import QuantSpec

        from kbitcli.convert import plan_tensors
        from kbitcli.recipe import Recipe
        from kbitcli.runner import load
        from kbitcli.runner.load import _linear_modules
        from kbitcli.sources import open_source

        self.label, self.path = _resolve(model_arg)
        self.rules, self.skips = list(rules), list(skips)
        src = open_source(self.path)
        try:
            probe = Recipe.build(QuantSpec(), self.rules, self.skips)
            self.plans, self.dropped, self.warnings = plan_tensors(src, probe)
        finally:
            src.close()
        self.model, self.tokenizer, self.config = load(self.path, device="cpu", dtype="float32", fuse=False)  # not fused: the sweep swaps parameters by checkpoint name
        params = dict(self.model.named_parameters())
        tied = self.model.tied_weights()
        layouts = _linear_modules(self.model)
        self.targets: dict[str, _Target] = {}
        # tensors the runner does not load (a multimodal checkpoint's vision tower, stored rotary
        # tables) are not part of the model the sweep evaluates: left out, counts included
        loaded, unloaded = [], []
        for p in self.plans:
            pname = self.model.checkpoint_name(p.name)
            if pname is None:
                unloaded.append(p.name)
                continue
            loaded.append(p)
            if pname in tied:
                continue
            if pname not in params:
                raise InputError(f"{self.label}: the tensor {p.name!r} has no parameter in the runner's model")
            axis = 0 if layouts.get(pname) == "in_out" else -1
            self.targets[p.name] = _Target(p.name, params[pname], p.shape, p.dtype, axis)
        if unloaded:
            self.plans = loaded
            self.warnings.append(f"{len(unloaded)} stored tensors that the runner does not load (e.g. {unloaded[0]}) "
                                 "are left out of the sweep and its bit counts")
        self.parameters = int(sum(int(np.prod(p.shape)) for p in self.plans))
        self.originals: dict[str, torch.Tensor] = {}
        self.kept_originals: dict[str, torch.Tensor] = {}
        self._recipes: dict = {}

    def recipe(self, combo: Combo):
        from kbitcli.recipe import Recipe
        r = self._recipes.get(combo.spec())
        if r is None:
            r = self._recipes[combo.spec()] = Recipe.build(combo.spec(), self.rules, self.skips)
        return r

    def specs(self, combo: Combo) -> dict:
        """checkpoint name -> QuantSpec or None (kept), for every stored tensor."""
        r = self.recipe(combo)
        return {p.name: r.spec_for(p.name, p.shape, p.is_float, p.dtype) for p in self.plans}

    def keep_originals(self, combos: Sequence[Combo]) -> None:
        """float32 copies of every weight that some combination quantizes (and of kept tensors
        that a conversion rounds to float16)."""
        quantized = set()
        for c in combos:
            quantized |= {n for n, s in self.specs(c).items() if s is not None}
        for p in self.plans:
            t = self.targets.get(p.name)
            if t is None:
                continue
            if p.name in quantized and p.name not in self.originals:
                self.originals[p.name] = t.param.detach().clone()
            elif p.name not in quantized and p.name not in self.kept_originals and _rounded_on_keep(p.dtype):
                self.kept_originals[p.name] = t.param.detach().clone()

    def apply(self, combo: Combo, ops) -> dict:
        """Write the fake-quantized weights of `combo` into the model; returns the bit account."""
        specs = self.specs(combo)
        total = paper = 0.0
        qparams = 0
        qbits = 0.0
        n_out_cols = 0
        for p in self.plans:
            spec = specs[p.name]
            n = int(np.prod(p.shape))
            t = self.targets.get(p.name)
            if spec is None:
                total += KEPT_BITS * n
                paper += KEPT_BITS * n
                if t is not None and p.name in self.kept_originals:
                    orig = self.kept_originals[p.name].numpy()
                    t.param.data.copy_(torch.from_numpy(_conversion_keep(orig, p.dtype)))
                continue
            if t is None:
                raise InputError(f"{self.label}: {p.name} is quantized by the recipe but the runner has no parameter "
                                 "for it")
            orig = self.originals[p.name].numpy()
            deq, bits, info = fake_quantize(orig, spec, p.name, ops, combo.outliers, t.in_axis)
            t.param.data.copy_(torch.from_numpy(deq.reshape(t.param.shape)))
            n_kept = len(info.get("outlier_columns", ()))
            n_out_cols += n_kept
            cols = int(p.shape[-1]) if t.in_axis in (-1, 1) or len(p.shape) != 2 else int(p.shape[0])
            rows = n // max(1, cols)
            paper += paper_bits_per_weight(spec, cols - n_kept) * rows * (cols - n_kept) \
                + (KEPT_BITS * rows + OUTLIER_INDEX_BITS) * n_kept
            total += bits
            qbits += bits
            qparams += n
        return {"parameters": self.parameters, "quantized_parameters": qparams, "total_model_bits": total,
                "bits_per_weight": total / max(1, self.parameters),
                "bits_per_quantized_weight": qbits / max(1, qparams), "outlier_columns": n_out_cols,
                "total_model_bits_paper": paper, "bits_per_weight_paper": paper / max(1, self.parameters)}

    def restore(self) -> None:
        for name, orig in itertools.chain(self.originals.items(), self.kept_originals.items()):
            self.targets[name].param.data.copy_(orig)


# ----------------------------------------------------------------------------- evaluation
def cloze_items(text: str, n: int = 500, min_words: int = 40, max_words: int = 120) -> list[dict]:
    """LAMBADA-style items from a text: for each paragraph of at least min_words words, the
    passage up to a last word that is purely alphabetic (trailing punctuation dropped), at most
    max_words words long. Deterministic; the first n paragraphs that qualify."""
    items = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        if len(words) < min_words:
            continue
        for j in range(len(words) - 1, min_words - 2, -1):
            w = words[j].rstrip(".,;:!?\"')")
            if w.isalpha() and len(w) > 1:
                passage = words[max(0, j + 1 - max_words): j] + [w]
                items.append({"text": " ".join(passage)})
                break
        if len(items) >= n:
            break
    if not items:
        raise InputError("the text has no paragraph long enough for LAMBADA-style items")
    return items


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts a BOS in front of a text (as kbitcli.cli.eval_cmds.adds_bos)."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    with_special = tok.encode("a")
    return bool(with_special) and with_special[0] == bos and tok.encode("a", add_special_tokens=False)[:1] != [bos]


class Evaluator:
    """Evaluates the model as it is now, on one fixed set of tokens (or task items)."""

    def __init__(self, lm: LoadedModel, metric: str, text: str | None, ctx: int | None, max_tokens: int | None,
                 protocol: str = "hf", batch_size: int = 1, lambada_items: Sequence[dict] | None = None,
                 lambada_name: str | None = None, text_name: str = "text", cache_dir: Path | None = None) -> None:
        from kbitcli.evals.compare import tokens_sha256
        from kbitcli.evals.perplexity import fit_ctx, window_plan
        if metric not in METRICS:
            raise UsageError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
        ctx = fit_ctx(ctx, lm.model, str(lm.label))
        self.lm, self.metric, self.ctx, self.protocol, self.batch_size = lm, metric, ctx, protocol, batch_size
        self.text_name = text_name
        self.reference = None
        if metric == "lambada":
            if lambada_items is None:
                if text is None:
                    raise UsageError("the lambada metric needs a LAMBADA JSONL file or a text to cut items from")
                lambada_items = cloze_items(text)
                lambada_name = f"cloze items from {text_name}"
            self.items = list(lambada_items)
            self.task_name = lambada_name or "lambada"
            blob = json.dumps(self.items, sort_keys=True).encode()
            self.signature = f"lambada:{hashlib.sha256(blob).hexdigest()[:12]}"
            self.ids = None
            return
        if text is None:
            raise UsageError("the ppl and kld metrics need a text")
        ids = np.asarray(lm.tokenizer.encode(text), dtype=np.int64)
        if max_tokens is not None:
            if max_tokens < 2:
                raise UsageError(f"--max-tokens must be at least 2 (got {max_tokens})")
            ids = ids[:max_tokens]
        self.bos = lm.tokenizer.bos_token_id if protocol == "llama.cpp" and _adds_bos(lm.tokenizer) else None
        self.plan = window_plan(len(ids), ctx, None, protocol)
        self.ids = ids
        self.n_bytes = len(lm.tokenizer.decode(ids.tolist()).encode("utf-8"))
        sha = tokens_sha256(ids)
        self.signature = f"text:{sha[:12]}:ctx{ctx}:{protocol}:n{len(ids)}"
        self.cache_dir = cache_dir

    # -- reference
    def reference_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256(f"{self.lm.label}|{self.signature}|top{REFERENCE_TOPK}".encode()).hexdigest()[:12]
        return self.cache_dir / f"reference-{_slug(self.lm.label)}-{h}.safetensors"

    def run_reference(self) -> dict:
        """Evaluate the unquantized model (and keep its top-k log-probs for the KL of later rows)."""
        t0 = time.perf_counter()
        if self.metric == "lambada":
            return self._lambada(t0)
        from kbitcli.evals.compare import ReferenceLogits, tokens_sha256
        from kbitcli.evals.perplexity import iter_logprobs, summarize_nll
        path = self.reference_path()
        settings = {"tokens_sha256": tokens_sha256(self.ids), "n_tokens": int(len(self.ids)), "ctx": int(self.ctx),
                    "stride": int(self.ctx) if self.protocol == "hf" else None, "protocol": self.protocol,
                    "bos_id": self.bos, "n_scored": int(sum(w.n_scored for w in self.plan))}
        if path is not None and path.is_file():
            try:
                ref = ReferenceLogits.load(path)
                ref.check_matches(settings)
                self.reference = ref
            except Exception:  # noqa: BLE001 - a stale or damaged cache file: recompute it
                self.reference = None
        if self.reference is None:
            parts: dict[str, list] = {"ids": [], "lp": [], "rest": [], "target": []}
            for wl in iter_logprobs(self.lm.model, self.ids, self.plan, self.batch_size, self.bos):
                lp = wl.logprobs
                k = min(REFERENCE_TOPK, lp.shape[1])
                vals, tid = lp.topk(k, dim=-1)
                parts["ids"].append(tid.to(torch.int32).numpy())
                parts["lp"].append(vals.to(torch.float16).numpy())
                parts["rest"].append(lp.scatter(1, tid, float("-inf")).logsumexp(-1).float().numpy())
                parts["target"].append(wl.target_logprobs.float().numpy())
            self.reference = ReferenceLogits(*(np.concatenate(parts[k]) for k in ("ids", "lp", "rest", "target")),
                                             {**settings, "model": self.lm.label, "topk": REFERENCE_TOPK,
                                              "n_bytes": self.n_bytes, "kbit_version": _version()})
            if path is not None:
                self.reference.save(path)
        ppl, se, _, _ = summarize_nll(-self.reference.target_logprob.astype(np.float64))
        return {"ppl": ppl, "ppl_se": se, "kld": 0.0, "kld_se": 0.0, "top1": 1.0, "ln_ppl_ratio": 0.0,
                "ln_ppl_ratio_se": 0.0, "ref_ppl": ppl, **self._text_fields(), "eval_seconds": time.perf_counter() - t0}

    def _text_fields(self) -> dict:
        return {"text": self.text_name, "n_tokens": int(len(self.ids)), "n_scored": int(self.reference.n_scored),
                "ctx": self.ctx, "protocol": self.protocol, "kl_topk": REFERENCE_TOPK}

    def _lambada(self, t0: float) -> dict:
        from kbitcli.evals.tasks import evaluate_task
        r = evaluate_task(self.lm.model, self.lm.tokenizer, "lambada", self.items, batch_size=max(1, self.batch_size))
        return {"lambada_acc": r.acc, "lambada_acc_se": r.acc_se, "lambada_ppl": r.ppl, "task": self.task_name,
                "n_items": r.n, "eval_seconds": time.perf_counter() - t0}

    def run(self) -> dict:
        """Evaluate the model as it is now (run_reference first)."""
        t0 = time.perf_counter()
        if self.metric == "lambada":
            return self._lambada(t0)
        from kbitcli.evals.compare import compare
        r = compare(self.lm.model, self.reference, self.ids, ctx=self.ctx, protocol=self.protocol,
                    batch_size=self.batch_size, bos_id=self.bos, n_bytes=self.n_bytes)
        return {"ppl": r.ppl, "ppl_se": r.ppl_se, "kld": r.kld, "kld_se": r.kld_se, "top1": r.top1,
                "ln_ppl_ratio": r.ln_ppl_ratio, "ln_ppl_ratio_se": r.ln_ppl_ratio_se, "ref_ppl": r.ref_ppl,
                **self._text_fields(), "eval_seconds": time.perf_counter() - t0}


def metric_value(row: dict, metric: str) -> float | None:
    field = "lambada_acc" if metric == "lambada" else metric
    v = row.get(field)
    return None if v is None else float(v)


def row_key(model: str, what: str, signature: str) -> str:
    return f"{model}|{what}|{signature}"


# ----------------------------------------------------------------------------- the sweep
def run_sweep(models: Sequence, bits: Sequence[int] = DEFAULT_BITS, dtypes: Sequence[str] = DEFAULT_DTYPES,
              block_sizes: Sequence[int] = DEFAULT_BLOCKS, text: str | None = None, metric: str = "ppl",
              out_dir: str | os.PathLike = "kbit-sweep", jobs: int = 1, ctx: int | None = None,
              max_tokens: int | None = 8192, outlier_fraction: float | Sequence[float] | None = None,
              scale: str = "fp16", shard: tuple[int, int] | None = None, text_name: str = "text",
              lambada_items: Sequence[dict] | None = None, lambada_name: str | None = None,
              protocol: str = "hf", batch_size: int = 1, rules: Sequence[str] = (), skips: Sequence[str] = (),
              device: str = "cpu", progress: ProgressFn | None = None, results_name: str | None = None,
              _reference_only: bool = False) -> list[dict]:
    """Run the grid bits x dtypes x block_sizes x outlier fractions on every model (module
    docstring) and return all rows of the results file (old and new). outlier_fraction: None
    or 0 = plain quantization only; a number or a list of numbers adds those fractions (0 is
    always included, so each outlier point has its plain twin)."""
    from kbitcli.kernels import get_ops
    progress = progress or (lambda *a, **k: None)
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {jobs})")
    if isinstance(outlier_fraction, (int, float)):
        outlier_fraction = [outlier_fraction]
    outs = sorted({0.0, *(float(p) for p in (outlier_fraction or []))})
    combos = grid(bits, dtypes, block_sizes, scale, outs)
    if jobs > 1 and not _reference_only:
        if shard is not None:
            raise UsageError("--jobs and --shard do not go together: --jobs N runs N shards itself")
        return _run_parallel(models, jobs, combos, dict(
            bits=bits, dtypes=dtypes, block_sizes=block_sizes, text=text, metric=metric, out_dir=str(out_dir), ctx=ctx,
            max_tokens=max_tokens, outlier_fraction=outs, scale=scale, text_name=text_name,
            lambada_items=lambada_items, lambada_name=lambada_name, protocol=protocol, batch_size=batch_size,
            rules=list(rules), skips=list(skips), device=device), progress)
    mine = [] if _reference_only else shard_of(combos, shard)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / (results_name or shard_file(shard))
    rows = read_rows(results, repair=True)
    done = {r["key"] for r in rows}
    ops = get_ops(device)
    progress("start", models=len(models), combos=len(mine), results=str(results))
    for mi, model_arg in enumerate(models):
        t_load = time.perf_counter()
        progress("load", model=str(model_arg), index=mi)
        lm = LoadedModel(model_arg, rules, skips)
        ev = Evaluator(lm, metric, text, ctx, max_tokens, protocol, batch_size, lambada_items, lambada_name,
                       text_name, cache_dir=out)
        base = {"model": lm.label, "metric": metric, "kbit_version": _version()}
        todo = [c for c in mine if row_key(lm.label, c.label, ev.signature) not in done]
        progress("model", model=lm.label, todo=len(todo), done=len(mine) - len(todo),
                 load_seconds=time.perf_counter() - t_load)
        for w in lm.warnings:
            progress("warning", model=lm.label, message=w)
        ref_key = row_key(lm.label, "reference", ev.signature)
        if todo or ref_key not in done:
            progress("reference", model=lm.label)
            res = ev.run_reference()
            if ref_key not in done:
                row = {"key": ref_key, **base, "kind": "reference", "label": "reference", "bits": 16,
                       "dtype": "reference", "block_size": None, "scale": None, "outlier_fraction": 0.0,
                       "parameters": lm.parameters, "quantized_parameters": 0,
                       "total_model_bits": KEPT_BITS * lm.parameters, "bits_per_weight": KEPT_BITS,
                       "bits_per_quantized_weight": None, "total_model_bits_paper": KEPT_BITS * lm.parameters,
                       "bits_per_weight_paper": KEPT_BITS, **res, "quantize_seconds": 0.0,
                       "seconds": res["eval_seconds"], "signature": ev.signature, "time": time.time()}
                row["metric_value"] = metric_value(row, metric)
                append_row(results, row)
                rows.append(row)
                done.add(ref_key)
                progress("row", row=row)
        lm.keep_originals(todo)
        for ci, c in enumerate(todo):
            key = row_key(lm.label, c.label, ev.signature)
            progress("combo", model=lm.label, index=ci, total=len(todo), label=c.label)
            t0 = time.perf_counter()
            try:
                acct = lm.apply(c, ops)
                tq = time.perf_counter() - t0
                res = ev.run()
            finally:
                lm.restore()
            row = {"key": key, **base, "kind": "quantized", "label": c.label, "bits": c.bits, "dtype": c.dtype,
                   "block_size": c.block_size, "scale": c.scale, "outlier_fraction": c.outliers, **acct, **res,
                   "quantize_seconds": tq, "seconds": time.perf_counter() - t0, "signature": ev.signature,
                   "time": time.time()}
            row["metric_value"] = metric_value(row, metric)
            append_row(results, row)
            rows.append(row)
            done.add(key)
            progress("row", row=row)
        del lm, ev
    progress("end", results=str(results))
    return rows


def _shard_worker(models, shard, kwargs) -> str:
    threads = kwargs.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    run_sweep(models, shard=shard, **kwargs)
    return shard_file(shard)


def _run_parallel(models, jobs: int, combos: list[Combo], kwargs: dict, progress: ProgressFn) -> list[dict]:
    """--jobs N: the reference rows here, then N shard processes (spawned: no forked torch or
    Numba state), then their files merged into results.jsonl."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from .report import merge_results
    out = Path(kwargs["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    # The reference rows (and their top-k files) first, here, so the shards reuse them.
    progress("reference", model=", ".join(str(m if not isinstance(m, (tuple, list)) else m[0]) for m in models))
    run_sweep(models, **kwargs, _reference_only=True)
    threads = max(1, torch.get_num_threads() // jobs)
    files = [out / shard_file((i, jobs)) for i in range(1, jobs + 1)]
    total = len(combos) * len(models)
    progress("start", models=len(models), combos=total, results=str(out / RESULTS_NAME), jobs=jobs)
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futs = [pool.submit(_shard_worker, list(models), (i, jobs), {**kwargs, "threads": threads})
                for i in range(1, jobs + 1)]
        seen = 0
        while True:
            finished = all(f.done() for f in futs)
            rows = [r for f in files for r in read_rows(f) if r.get("kind") == "quantized"]
            if len(rows) > seen:
                for r in rows[seen:]:
                    progress("row", row=r)
                seen = len(rows)
            if finished:
                break
            time.sleep(1.0)
        for f in futs:
            f.result()  # re-raise a worker's error
    merged = merge_results([out / RESULTS_NAME, *files], out / RESULTS_NAME)
    progress("end", results=str(out / RESULTS_NAME))
    return merged


__all__ = ["Combo", "DEFAULT_BITS", "DEFAULT_BLOCKS", "DEFAULT_DTYPES", "Evaluator", "LoadedModel", "METRICS",
           "RESULTS_NAME", "cloze_items", "fake_quantize", "grid", "outlier_columns", "parse_shard", "read_rows",
           "run_sweep", "shard_of"]
