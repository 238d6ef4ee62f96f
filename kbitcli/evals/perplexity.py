"""Perplexity of a causal LM over a token stream, with two window protocols.

    res = perplexity(model, tokens, ctx=512, protocol="hf")          # transformers' guide
    res = perplexity(model, tokens, ctx=512, protocol="llama.cpp", bos_id=tok.bos_token_id)
    print(res.ppl, res.ppl_se, res.bits_per_byte)

`model(input_ids [B, S]) -> logits [B, S, V]` (kbit's runner, or anything with that call).

Protocols (docs/quality.md has the same text with examples):

hf (transformers' "Perplexity of fixed-length models" guide, sliding window): windows start at
0, stride, 2*stride, ... and hold tokens[begin : min(begin + ctx, n)]; the loop ends with the
window that reaches the last token. Each window scores only the targets that no earlier window
scored: targets prev_end .. end-1 (prev_end = where the previous window ended), and the first
window every target but its first token. With stride == ctx (the default) the windows do not
overlap and the first token of each window is never scored; with stride < ctx every token but the
very first is scored exactly once, each with at least ctx - stride tokens of context.
(The guide weights each window's mean loss by its count of targets minus one; we average over
tokens exactly: the two differ by far less than 1e-3 relative.)

llama.cpp (llama-perplexity): n // ctx non-overlapping chunks of exactly ctx tokens (the tail that
does not fill a chunk is dropped); when bos_id is given, the first token of every chunk is
replaced by it (llama-perplexity does so when the vocabulary adds a BOS: it also tokenized the
text with that BOS in front); only the second half of each chunk is scored: the predictions of
positions ctx//2 .. ctx-2 for targets ctx//2+1 .. ctx-1, i.e. ctx - 1 - ctx//2 tokens per chunk,
each with at least ctx//2 tokens of context.

Figures: ppl = exp(mean NLL); its standard error from the per-token NLL spread,
se(ppl) = ppl * sd(NLL) / sqrt(n) (first-order, tokens taken as independent, so optimistic);
bits per byte = mean NLL / ln 2 * (tokens / UTF-8 bytes of the evaluated text), given n_bytes.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from kbitcli.errors import InputError, UsageError

PROTOCOLS = ("hf", "llama.cpp")


@dataclass(frozen=True)
class Window:
    """Model input tokens[begin:end]; targets tokens[first:end] are scored (first > begin), each
    predicted by the logits of the position before it."""
    begin: int
    end: int
    first: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def n_scored(self) -> int:
        return self.end - self.first


#: tokens per window when none is asked for (shortened to a model's shorter context window)
DEFAULT_CTX = 512


def fit_ctx(ctx: int | None, model, where: str = "the model") -> int:
    """The window length to use with `model`: ctx when it fits the model's context window
    (UsageError naming `where` otherwise), or, with ctx None, DEFAULT_CTX shortened to that
    window: a model whose window is under 512 tokens works without --ctx."""
    limit = getattr(model, "context_length", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    if ctx is None:
        return DEFAULT_CTX if limit is None else min(DEFAULT_CTX, limit)
    if limit is not None and ctx > limit:
        raise UsageError(f"--ctx {ctx} is longer than the context window of {where} ({limit} tokens); "
                         f"use --ctx {limit} or less")
    return ctx


def window_plan(n_tokens: int, ctx: int, stride: int | None = None, protocol: str = "hf") -> list[Window]:
    """The windows of a protocol over n_tokens tokens (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2 (got {ctx})")
    if protocol == "llama.cpp":
        if stride is not None and stride != ctx:
            raise UsageError("the llama.cpp protocol has no stride (its chunks never overlap); drop --stride")
        if ctx < 4:
            raise UsageError(f"the llama.cpp protocol needs --ctx of at least 4 (got {ctx})")
        n_chunks = n_tokens // ctx
        if n_chunks == 0:
            raise InputError(f"the text has {n_tokens} tokens, fewer than one chunk of --ctx {ctx}; "
                             "give more text or a smaller --ctx")
        return [Window(i * ctx, (i + 1) * ctx, i * ctx + ctx // 2 + 1) for i in range(n_chunks)]
    stride = ctx if stride is None else stride
    if not 1 <= stride <= ctx:
        raise UsageError(f"--stride must be between 1 and --ctx ({ctx}); got {stride}")
    if n_tokens < 2:
        raise InputError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            plan.append(Window(begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


def _batches(plan: Sequence[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of the same length, at most batch_size at a time (keeps token order)."""
    batch: list[Window] = []
    for w in plan:
        if batch and (len(batch) == batch_size or w.length != batch[0].length):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@dataclass
class WindowLogProbs:
    """The scored positions of one window: the target ids [n], their log-probabilities [n], and
    (unless iter_logprobs(full=False)) the log-probabilities over the vocabulary [n, V], float32."""
    window: Window
    targets: torch.Tensor
    target_logprobs: torch.Tensor
    logprobs: torch.Tensor | None = None


def iter_logprobs(model: Callable, token_ids: Sequence[int] | np.ndarray | torch.Tensor, plan: Sequence[Window],
                  batch_size: int = 1, bos_id: int | None = None, counter: dict | None = None,
                  full: bool = True) -> Iterator[WindowLogProbs]:
    """Run the model over the plan's windows (batched by equal length) and yield, window by window,
    the log-probabilities of the scored positions (full=False: only the targets', which skips the
    [n, V] log-softmax). bos_id replaces each window's first input token (the llama.cpp protocol).
    counter["forward_tokens"] counts the tokens fed to the model."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    tokens = torch.as_tensor(np.asarray(token_ids, dtype=np.int64))
    dev = model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    for batch in _batches(plan, batch_size):
        x = torch.stack([tokens[w.begin:w.end] for w in batch])  # [B, S]
        if bos_id is not None:
            x[:, 0] = bos_id
        with torch.inference_mode():
            logits = model(x.to(dev))  # [B, S, V]
        if counter is not None:
            counter["forward_tokens"] = counter.get("forward_tokens", 0) + x.numel()
        for b, w in enumerate(batch):
            lo = w.first - 1 - w.begin  # logits at lo .. S-2 predict targets first .. end-1
            lg = logits[b, lo: w.length - 1].float()
            tgt = tokens[w.first:w.end]
            if full:
                lp = torch.log_softmax(lg, dim=-1).cpu()
                yield WindowLogProbs(w, tgt, lp.gather(1, tgt[:, None])[:, 0], lp)
            else:  # log p(target) = log_softmax(logits)[target], without the [n, V] result
                # (cross_entropy's fused kernel: the same float32 formula, fewer passes than logsumexp)
                t_lp = -torch.nn.functional.cross_entropy(lg, tgt.to(lg.device), reduction="none")
                yield WindowLogProbs(w, tgt, t_lp.cpu())
        del logits


@dataclass
class PerplexityResult:
    ppl: float
    ppl_se: float
    nll: float              # mean negative log-likelihood per scored token (nats)
    nll_sd: float
    bits_per_byte: float | None
    n_scored: int           # scored tokens
    n_tokens: int           # tokens in the stream given
    n_windows: int
    forward_tokens: int     # tokens fed to the model (windows overlap under hf with stride < ctx)
    seconds: float
    tokens_per_second: float  # forward tokens per second
    ctx: int
    stride: int | None
    protocol: str
    bos_id: int | None = None
    n_bytes: int | None = None
    nlls: np.ndarray | None = field(default=None, repr=False)  # per scored token, in stream order

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("nlls")
        return d


def summarize_nll(nlls: np.ndarray) -> tuple[float, float, float, float]:
    """(ppl, se(ppl), mean NLL, sd NLL) from per-token NLLs."""
    n = len(nlls)
    mean = float(np.mean(nlls, dtype=np.float64))
    sd = float(np.std(nlls, dtype=np.float64, ddof=1)) if n > 1 else 0.0
    ppl = math.exp(mean)
    return ppl, ppl * sd / math.sqrt(n), mean, sd


def bits_per_byte(mean_nll: float, n_tokens: int, n_bytes: int | None) -> float | None:
    if not n_bytes:
        return None
    return mean_nll / math.log(2) * n_tokens / n_bytes


def adds_bos(tok) -> bool:
    """Whether a runner Tokenizer puts a BOS in front of a text (llama.cpp's add_bos): then the
    llama.cpp protocol writes BOS over the first token of every chunk."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    with_special = tok.encode("a")
    return bool(with_special) and with_special[0] == bos and tok.encode("a", add_special_tokens=False)[:1] != [bos]


def token_plan(token_ids, ctx: int, stride: int | None, protocol: str, max_tokens: int | None,
               bos_id: int | None) -> tuple[np.ndarray, list[Window]]:
    """The token ids (int64, the first max_tokens of them) and their windows, with the checks
    that perplexity and compare share."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        if max_tokens < 2:
            raise UsageError(f"--max-tokens must be at least 2 (got {max_tokens})")
        ids = ids[:max_tokens]
    if bos_id is not None and protocol != "llama.cpp":
        raise UsageError("bos_id replaces the first token of each chunk in the llama.cpp protocol only")
    return ids, window_plan(len(ids), ctx, stride, protocol)


def perplexity(model: Callable, token_ids: Sequence[int] | np.ndarray | torch.Tensor, ctx: int = 512,
               stride: int | None = None, protocol: str = "hf", batch_size: int = 1, max_tokens: int | None = None,
               bos_id: int | None = None, n_bytes: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of `model` on token_ids under a protocol (module docstring).

    token_ids: the text tokenized as the protocol expects (with the tokenizer's special tokens);
    max_tokens: use only the first max_tokens of them; bos_id: llama.cpp protocol only, written
    over the first token of every chunk (None: chunks as they are); n_bytes: UTF-8 bytes of the
    text the (kept) tokens cover, for bits per byte; progress(done_windows, total_windows)."""
    ids, plan = token_plan(token_ids, ctx, stride, protocol, max_tokens, bos_id)
    counter: dict = {}
    parts: list[np.ndarray] = []
    t0 = time.perf_counter()
    for i, wl in enumerate(iter_logprobs(model, ids, plan, batch_size, bos_id, counter, full=False)):
        parts.append((-wl.target_logprobs).double().numpy())
        if progress is not None:
            progress(i + 1, len(plan))
    seconds = time.perf_counter() - t0
    nlls = np.concatenate(parts)
    ppl, se, mean, sd = summarize_nll(nlls)
    fwd = counter.get("forward_tokens", 0)
    return PerplexityResult(ppl=ppl, ppl_se=se, nll=mean, nll_sd=sd, bits_per_byte=bits_per_byte(mean, len(ids), n_bytes),
                            n_scored=len(nlls), n_tokens=len(ids), n_windows=len(plan), forward_tokens=fwd,
                            seconds=seconds, tokens_per_second=fwd / seconds if seconds > 0 else float("inf"),
                            ctx=ctx, stride=(stride or ctx) if protocol == "hf" else None, protocol=protocol,
                            bos_id=bos_id, n_bytes=n_bytes, nlls=nlls)
