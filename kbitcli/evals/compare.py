"""A quantized model against its reference on the same token windows (llama-perplexity's
--kl-divergence figures): both perplexities and their ratio, KL(ref || quant) per token (mean,
percentiles), top-1 agreement, and the change in probability of the correct token.

    res = compare(quant_model, ref_model, tokens, ctx=512, protocol="llama.cpp", bos_id=...)
    res = compare(quant_model, ref_model, tokens, save_reference="ref.safetensors")   # keep ref
    res = compare(quant_model, ReferenceLogits.load("ref.safetensors"), tokens)        # ref not loaded

A saved reference keeps, per scored token, the reference's top-k log-probabilities (float16)
with their token ids (int32), the log of the remaining probability mass (float32), and the
log-probability of the correct token (float32): (6k + 8) bytes per scored token, 1,544 bytes at
the default k = 256 (16,384 scored tokens: 25 MB), 200 bytes at k = 32. Against a saved reference the KL is computed over k + 1
buckets (the top-k tokens and one lumped "rest" bucket), never over the full vocabulary: by the
log-sum inequality this is never more than the exact KL, and it misses exactly
p_rest * KL(p(.|rest) || q(.|rest)), the divergence inside the rest bucket weighted by its mass.
Perplexities, their ratio, the probability changes of the correct token are exact (the correct
token's log-probability is stored in float32); top-1 agreement is exact but for exact ties.
docs/quality.md gives the gap measured on SmolLM2.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kbitcli.errors import CheckFailed, InputError, OutputError, UsageError

from .perplexity import Window, bits_per_byte, iter_logprobs, summarize_nll, token_plan

REFERENCE_FORMAT = "kbit.reference-logprobs"
REFERENCE_VERSION = "1"
DEFAULT_TOPK = 256  # measured on SmolLM2: the lumped KL keeps ~92% of the exact KL (k = 32: ~78%)
MAX_TOPK = 1024
PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def tokens_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


@dataclass
class ReferenceLogits:
    """The reference's top-k log-probabilities per scored token, and how they were made."""
    topk_ids: np.ndarray        # int32 [N, k], most likely first
    topk_logprobs: np.ndarray   # float16 [N, k]
    rest_logprob: np.ndarray    # float32 [N]: log(1 - sum of the top-k probabilities)
    target_logprob: np.ndarray  # float32 [N]: log-probability of the correct next token
    meta: dict = field(default_factory=dict)

    @property
    def n_scored(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def topk(self) -> int:
        return int(self.topk_ids.shape[1])

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file
        p = Path(path).expanduser()
        meta = {k: json.dumps(v) for k, v in self.meta.items()}  # every value JSON: types survive
        meta.update({"format": REFERENCE_FORMAT, "version": REFERENCE_VERSION})
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            save_file({"topk_ids": np.ascontiguousarray(self.topk_ids, np.int32),
                       "topk_logprobs": np.ascontiguousarray(self.topk_logprobs, np.float16),
                       "rest_logprob": np.ascontiguousarray(self.rest_logprob, np.float32),
                       "target_logprob": np.ascontiguousarray(self.target_logprob, np.float32)}, str(tmp), metadata=meta)
            tmp.replace(p)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write the reference file {p}: {e.strerror or e}") from None
        return p

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceLogits":
        from safetensors import safe_open
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"{p}: no such reference file")
        try:
            with safe_open(str(p), "numpy") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != REFERENCE_FORMAT:
                    raise InputError(f"{p} is not a kbit reference file (made by kbit compare --save-reference)")
                if meta.get("version") != REFERENCE_VERSION:
                    raise InputError(f"{p} is a kbit reference file of version {meta.get('version')!r}; this kbit "
                                     f"reads version {REFERENCE_VERSION}: make it again with --save-reference")
                t = {k: f.get_tensor(k) for k in ("topk_ids", "topk_logprobs", "rest_logprob", "target_logprob")}
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises plain errors on a damaged file
            raise InputError(f"{p} cannot be read as a kbit reference file ({e})") from None
        parsed = {}
        for k, v in meta.items():
            try:
                parsed[k] = v if k in ("format", "version") else json.loads(v)
            except (json.JSONDecodeError, TypeError):
                raise InputError(f"{p}: the metadata field {k!r} of the reference file is damaged") from None
        ref = cls(t["topk_ids"], t["topk_logprobs"], t["rest_logprob"], t["target_logprob"], parsed)
        n = ref.n_scored
        if not (ref.topk_logprobs.shape == ref.topk_ids.shape and ref.rest_logprob.shape == (n,)
                and ref.target_logprob.shape == (n,)):
            raise InputError(f"{p}: the arrays of the reference file do not agree in shape")
        return ref

    def check_matches(self, settings: dict, where: str = "the reference file") -> None:
        """InputError naming the first setting that differs from the ones it was made with."""
        for key in ("tokens_sha256", "n_tokens", "ctx", "stride", "protocol", "bos_id", "n_scored"):
            mine, theirs = self.meta.get(key), settings.get(key)
            if mine != theirs:
                what = {"tokens_sha256": "tokens (a different text, --max-tokens or tokenizer)",
                        "n_tokens": "number of tokens (--max-tokens or a different text)"}.get(key, key)
                raise InputError(f"{where} was made with other {what}: {key} {_short(mine)} there, {_short(theirs)} "
                                 "here; compare with the same settings or make it again with --save-reference")


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s[:16] + "..." if len(s) > 19 else s


@dataclass
class CompareResult:
    ppl: float                 # quantized model
    ppl_se: float
    ref_ppl: float
    ref_ppl_se: float
    ppl_ratio: float           # ppl / ref_ppl
    ln_ppl_ratio: float
    ln_ppl_ratio_se: float     # from the per-token NLL differences
    kld: float                 # mean KL(ref || quant) per token, nats
    kld_se: float
    kld_percentiles: dict      # "50", "90", "95", "99", "99.9", "max" -> nats
    top1: float                # fraction of scored tokens where both models' most likely token agree
    top1_se: float
    dp_mean: float             # mean of p_quant(correct) - p_ref(correct)
    dp_se: float
    dp_rms: float
    dp_max: float              # largest increase
    dp_min: float              # largest decrease (negative)
    bits_per_byte: float | None
    ref_bits_per_byte: float | None
    n_scored: int
    n_tokens: int
    n_windows: int
    forward_tokens: int        # tokens fed to each model
    seconds: float
    tokens_per_second: float   # forward tokens of the quantized model per second (both models timed)
    ctx: int
    stride: int | None
    protocol: str
    bos_id: int | None
    kl_method: str             # "exact (full vocabulary)" or "top-K + rest bucket (saved reference)"
    reference: str = ""
    gates: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Gate:
    name: str      # "ppl_ratio", "kld", "top1"
    value: float
    limit: float
    passed: bool

    def describe(self) -> str:
        if self.name == "top1":
            return f"top-1 agreement {100 * self.value:.2f}% < {100 * self.limit:.2f}% (--min-top1)"
        if self.name == "kld":
            return f"mean KL divergence {self.value:.5f} > {self.limit:g} (--max-kld)"
        return f"perplexity ratio {self.value:.4f} > {self.limit:g} (--max-ppl-ratio)"


def check_gates(res: CompareResult, max_ppl_ratio: float | None = None, max_kld: float | None = None,
                min_top1: float | None = None) -> list[Gate]:
    """The gates asked for, each with its verdict (also stored in res.gates)."""
    gates = []
    if max_ppl_ratio is not None:
        if not max_ppl_ratio > 0:
            raise UsageError(f"--max-ppl-ratio must be positive (got {max_ppl_ratio})")
        gates.append(Gate("ppl_ratio", res.ppl_ratio, max_ppl_ratio, res.ppl_ratio <= max_ppl_ratio))
    if max_kld is not None:
        if max_kld < 0:
            raise UsageError(f"--max-kld must be at least 0 (got {max_kld})")
        gates.append(Gate("kld", res.kld, max_kld, res.kld <= max_kld))
    if min_top1 is not None:
        if not 0 <= min_top1 <= 1:
            raise UsageError(f"--min-top1 is a fraction between 0 and 1 (got {min_top1}; write 0.9 for 90%)")
        gates.append(Gate("top1", res.top1, min_top1, res.top1 >= min_top1))
    res.gates = [asdict(g) for g in gates]
    return gates


def raise_failed(gates: Sequence[Gate]) -> None:
    failed = [g for g in gates if not g.passed]
    if failed:
        raise CheckFailed("quality gates failed: " + "; ".join(g.describe() for g in failed))


class _Acc:
    """Per-token figures, gathered window by window."""

    def __init__(self) -> None:
        self.nll_q: list[np.ndarray] = []
        self.nll_r: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.top1: list[np.ndarray] = []
        self.dp: list[np.ndarray] = []

    def add(self, lq_t, lr_t, kl, top1) -> None:
        self.nll_q.append(-lq_t.double().numpy())
        self.nll_r.append(-lr_t.double().numpy())
        self.kl.append(kl.double().numpy())
        self.top1.append(top1.numpy())
        self.dp.append((lq_t.double().exp() - lr_t.double().exp()).numpy())

    def cat(self):
        return tuple(np.concatenate(x) for x in (self.nll_q, self.nll_r, self.kl, self.top1, self.dp))


def _rest_logsumexp(lp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids`, per row."""
    return lp.scatter(1, ids, float("-inf")).logsumexp(-1)


def _kl_exact(lp_r: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    # KL(p || q) = sum_v p_v (log p_v - log q_v); terms with p_v = 0 contribute 0
    p = lp_r.exp()
    return torch.where(p > 0, p * (lp_r - lp_q), torch.zeros_like(p)).sum(-1).clamp_min(0.0)


def kl_topk(topk_ids: torch.Tensor, topk_lp: torch.Tensor, rest_lp: torch.Tensor, lp_q: torch.Tensor) -> torch.Tensor:
    """KL(ref || quant) over k + 1 buckets: the reference's top-k tokens and the rest lumped.
    The reference's stored (float16) buckets are renormalised so they sum to 1."""
    ref = torch.cat([topk_lp.double(), rest_lp.double()[:, None]], 1)
    ref = ref - ref.logsumexp(-1, keepdim=True)
    q = torch.cat([lp_q.gather(1, topk_ids).double(), _rest_logsumexp(lp_q, topk_ids).double()[:, None]], 1)
    p = ref.exp()
    return torch.where(p > 0, p * (ref - q), torch.zeros_like(p)).sum(-1).clamp_min(0.0)


def compare(quant: Callable, reference: Callable | ReferenceLogits, token_ids: Sequence[int] | np.ndarray,
            ctx: int = 512, stride: int | None = None, protocol: str = "hf", batch_size: int = 1,
            max_tokens: int | None = None, bos_id: int | None = None, n_bytes: int | None = None,
            save_reference: str | Path | None = None, reference_topk: int = DEFAULT_TOPK,
            reference_name: str = "", progress: Callable[[int, int], None] | None = None) -> CompareResult:
    """Run `quant` and `reference` (a model, or a ReferenceLogits saved earlier) over the same
    windows (perplexity.window_plan) and gather the figures of CompareResult. save_reference
    (with a reference model) writes the reference's top-k log-probs there for later runs."""
    ids, plan = token_plan(token_ids, ctx, stride, protocol, max_tokens, bos_id)
    n_scored = sum(w.n_scored for w in plan)
    settings = {"tokens_sha256": tokens_sha256(ids), "n_tokens": int(len(ids)), "ctx": int(ctx),
                "stride": int(stride or ctx) if protocol == "hf" else None, "protocol": protocol, "bos_id": bos_id,
                "n_scored": int(n_scored)}
    from_file = isinstance(reference, ReferenceLogits)
    if from_file:
        if save_reference is not None:
            raise UsageError("--save-reference needs a reference model, not --reference-logits")
        reference.check_matches(settings)
        if n_bytes is None and reference.meta.get("n_bytes"):
            n_bytes = int(reference.meta["n_bytes"])
    if save_reference is not None and not 1 <= reference_topk <= MAX_TOPK:
        raise UsageError(f"--reference-topk must be between 1 and {MAX_TOPK} (got {reference_topk})")

    acc = _Acc()
    saved: dict[str, list] = {"ids": [], "lp": [], "rest": [], "target": []}
    counter_q: dict = {}
    counter_r: dict = {}
    t0 = time.perf_counter()
    q_iter = iter_logprobs(quant, ids, plan, batch_size, bos_id, counter_q)
    r_iter = None if from_file else iter_logprobs(reference, ids, plan, batch_size, bos_id, counter_r)
    offset = 0
    for i, wq in enumerate(q_iter):
        lq = wq.logprobs
        lq_t = wq.target_logprobs
        n = lq.shape[0]
        if from_file:
            sl = slice(offset, offset + n)
            tid = torch.from_numpy(reference.topk_ids[sl].astype(np.int64))
            if tid.numel() and int(tid.max()) >= lq.shape[1]:
                raise InputError(f"the reference file holds token ids up to {int(tid.max())}, beyond the quantized "
                                 f"model's vocabulary of {lq.shape[1]}")
            tlp = torch.from_numpy(reference.topk_logprobs[sl].astype(np.float32))
            rest = torch.from_numpy(reference.rest_logprob[sl])
            lr_t = torch.from_numpy(reference.target_logprob[sl])
            kl = kl_topk(tid, tlp, rest, lq)
            top1 = tid[:, 0] == lq.argmax(-1)
        else:
            wr = next(r_iter)  # type: ignore[arg-type]
            lr = wr.logprobs
            if lr.shape[1] != lq.shape[1]:
                raise InputError(f"the models have different vocabularies ({lq.shape[1]} and {lr.shape[1]} tokens); "
                                 "compare a model with the checkpoint it was made from")
            lr_t = wr.target_logprobs
            kl = _kl_exact(lr, lq)
            top1 = lr.argmax(-1) == lq.argmax(-1)
            if save_reference is not None:
                k = min(reference_topk, lr.shape[1])
                vals, tid = lr.topk(k, dim=-1)
                saved["ids"].append(tid.to(torch.int32).numpy())
                saved["lp"].append(vals.to(torch.float16).numpy())
                saved["rest"].append(_rest_logsumexp(lr, tid).float().numpy())
                saved["target"].append(lr_t.float().numpy())
        acc.add(lq_t, lr_t, kl, top1)
        offset += n
        if progress is not None:
            progress(i + 1, len(plan))
    seconds = time.perf_counter() - t0

    nll_q, nll_r, kl, top1, dp = acc.cat()
    ppl, ppl_se, mq, _ = summarize_nll(nll_q)
    rppl, rppl_se, mr, _ = summarize_nll(nll_r)
    n = len(nll_q)
    d = nll_q - nll_r
    sd = lambda a: float(np.std(a, ddof=1)) if n > 1 else 0.0  # noqa: E731
    t1 = float(np.mean(top1))
    pct = {f"{p:g}": float(np.percentile(kl, p)) for p in PERCENTILES}
    pct["max"] = float(np.max(kl))
    if from_file:
        kl_method = f"top-{reference.topk} + rest bucket (saved reference)"
        ref_name = reference_name or str(reference.meta.get("model", ""))
    else:
        kl_method = "exact (full vocabulary)"
        ref_name = reference_name
    fwd = counter_q.get("forward_tokens", 0)
    res = CompareResult(
        ppl=ppl, ppl_se=ppl_se, ref_ppl=rppl, ref_ppl_se=rppl_se, ppl_ratio=ppl / rppl, ln_ppl_ratio=float(np.mean(d)),
        ln_ppl_ratio_se=sd(d) / math.sqrt(n), kld=float(np.mean(kl)), kld_se=sd(kl) / math.sqrt(n),
        kld_percentiles=pct, top1=t1, top1_se=math.sqrt(t1 * (1 - t1) / max(1, n - 1)),
        dp_mean=float(np.mean(dp)), dp_se=sd(dp) / math.sqrt(n), dp_rms=float(np.sqrt(np.mean(dp ** 2))),
        dp_max=float(np.max(dp)), dp_min=float(np.min(dp)),
        bits_per_byte=bits_per_byte(mq, len(ids), n_bytes), ref_bits_per_byte=bits_per_byte(mr, len(ids), n_bytes),
        n_scored=n, n_tokens=int(len(ids)), n_windows=len(plan), forward_tokens=fwd, seconds=seconds,
        tokens_per_second=fwd / seconds if seconds > 0 else float("inf"), ctx=ctx, stride=settings["stride"],
        protocol=protocol, bos_id=bos_id, kl_method=kl_method, reference=ref_name)
    if save_reference is not None:
        ReferenceLogits(np.concatenate(saved["ids"]), np.concatenate(saved["lp"]), np.concatenate(saved["rest"]),
                        np.concatenate(saved["target"]),
                        {**settings, "model": reference_name, "topk": int(saved["ids"][0].shape[1]),
                         "n_bytes": n_bytes, "kbit_version": _kbit_version()}).save(save_reference)
    return res


def _kbit_version() -> str:
    from kbitcli import __version__
    return __version__


__all__ = ["CompareResult", "Gate", "ReferenceLogits", "Window", "check_gates", "compare", "kl_topk", "raise_failed",
           "tokens_sha256"]
