"""Text generation with a KV cache: a batch of prompts (left padded), greedy or sampled
(temperature, top-k, top-p, seed), stopping at EOS or stop strings, streamed text, and
tokens per second.

    model, tok, _ = load("out/model-kbit")
    res = generate(model, tok, ["The capital of France is"], max_new_tokens=20)
    print(res.completions[0].text, res.tokens_per_second)

Prompts longer than the model's context window are an error (InputError); when prompt +
max_new_tokens would pass the window, generation stops at the window (finish_reason
"context").
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from kbitcli.errors import InputError, UsageError

from .models.base import KVCache
from .tokenizer import Tokenizer

#: on_text(index of the prompt, new text) receives text as it is generated
TextCallback = Callable[[int, str], None]


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "stop", "length" or "context"


@dataclass
class GenerationResult:
    completions: list[Completion]
    prompt_tokens: int            # in the batch, without padding
    generated_tokens: int         # kept tokens (after a stop, none are counted)
    prefill_seconds: float        # the prompt pass (gives the first token)
    decode_seconds: float         # every later step
    decode_steps: int
    decode_mode: str = "none"     # how the decode steps ran (see DECODE_MODES; "none": no step)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of generation, prompt pass included."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode steps alone (batch x steps / time)."""
        n = self.decode_steps * len(self.completions)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"completions": [asdict(c) for c in self.completions], "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds, "tokens_per_second": self.tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second,
                "prefill_tokens_per_second": self.prefill_tokens_per_second, "decode_mode": self.decode_mode}


@dataclass
class SamplingParams:
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (float32 on the CPU)."""
    logits = logits.float()
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)
        drop = (cum - probs) >= p.top_p          # keep the smallest prefix reaching top_p (at least one)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _TextTracker:
    """Incremental detokenization of one sequence, with stop strings held back until decided."""

    def __init__(self, tok: Tokenizer, stops: Sequence[str]) -> None:
        self.tok, self.stops = tok, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; returns the text that is now safe to show."""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        self.text = text
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (not self.stopped or i < len(self.text)):
                self.text = text = text[:i]
                self.stopped = True
        safe = len(text)
        if not self.stopped:
            for s in self.stops:  # hold back a tail that could still become a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        safe = min(safe, len(text) - n)
                        break
        out = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out


def encode_prompts(tok: Tokenizer, prompts: Sequence[str], chat: bool = False,
                   system: str | None = None) -> list[list[int]]:
    out = []
    for text in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
        else:
            ids = tok.encode(text)
        if not ids:
            if tok.bos_token_id is None:
                raise UsageError("a prompt is empty and the model has no BOS token to start from")
            ids = [tok.bos_token_id]
        out.append(ids)
    return out


#: decode modes of generate_ids: "dynamic" (the cache grows, shapes change every step),
#: "static" (fixed shapes: KVCache.start_static), "graph" (static steps captured in CUDA graphs
#: and replayed: no per-kernel launch cost from Python), "auto" (graph on CUDA, else dynamic)
DECODE_MODES = ("auto", "dynamic", "static", "graph")
#: static steps attend over the cache in buckets of this many positions (one graph per bucket),
#: so a long generation budget does not make early steps read the whole cache
ATTEND_BUCKET = 256


class _StaticDecoder:
    """Decode steps with a static KV cache; in "graph" mode each step is a CUDA graph replay.

    The first step runs eagerly on a side stream (it compiles and warms up every kernel, the
    Numba ones included); then, per attention bucket, the step is captured once and replayed
    with the new token copied into a fixed input buffer. If a capture fails, a warning says
    so and the remaining steps run eagerly (the same static computation, the same results)."""

    def __init__(self, model, cache: KVCache, mask: torch.Tensor, device: torch.device, graph: bool) -> None:
        self.model, self.cache, self.device = model, cache, device
        cache.start_static(mask)
        self.cap = cache.key_mask.shape[1]  # type: ignore[union-attr]
        self.pos = cache.length                  # host copy of cache.slot
        self.ids = torch.zeros((mask.shape[0], 1), dtype=torch.long, device=device)
        self.graph = graph
        self.graphs: dict[int, tuple] = {}
        self.pool = None
        self.warm = False
        self.stream = torch.cuda.Stream(device) if graph else None
        self.captures = 0

    def _forward(self) -> torch.Tensor:
        return self.model(self.ids, cache=self.cache, last_only=True)[:, -1]

    def _capture(self, attend: int):
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)  # type: ignore[union-attr]
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = self._forward()
        cur.wait_stream(self.stream)  # type: ignore[arg-type]
        self.pool = g.pool()
        self.captures += 1
        self.graphs[attend] = (g, out)
        return g, out

    def step(self, feed: torch.Tensor) -> torch.Tensor:
        if self.pos >= self.cap:
            raise RuntimeError("static decode ran past the KV cache's capacity")
        self.ids.copy_(feed.view(-1, 1))
        self.cache.attend = min(self.cap, -(-(self.pos + 1) // ATTEND_BUCKET) * ATTEND_BUCKET)
        self.pos += 1
        if self.graph and self.warm:
            hit = self.graphs.get(self.cache.attend)
            if hit is None:
                try:
                    hit = self._capture(self.cache.attend)
                except Exception as e:  # noqa: BLE001 - any capture failure: eager static steps
                    import warnings
                    warnings.warn(f"kbit: capturing the decode step in a CUDA graph failed ({type(e).__name__}: "
                                  f"{e}); decoding without CUDA graphs", RuntimeWarning, stacklevel=3)
                    self.graph = False
            if hit is not None:
                hit[0].replay()
                return hit[1]
        if self.stream is not None and not self.warm:
            cur = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(cur)
            with torch.cuda.stream(self.stream):
                out = self._forward()
            cur.wait_stream(self.stream)
        else:
            out = self._forward()
        self.warm = True
        return out


def resolve_decode_mode(mode: str, device: torch.device, model=None) -> str:
    """The decode mode to run. A model whose class sets cuda_graphs = False (a decode step that
    reads device values on the host: the MoE models' expert grouping) decodes dynamically under
    auto, and graph is refused for it."""
    if mode not in DECODE_MODES:
        raise UsageError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
    graphs = getattr(model, "cuda_graphs", True)
    if mode == "auto":
        return "graph" if device.type == "cuda" and graphs else "dynamic"
    if mode == "graph" and device.type != "cuda":
        raise UsageError("decode mode graph (CUDA graphs) needs a CUDA device; on the CPU use static or dynamic")
    if mode == "graph" and not graphs:
        arch = getattr(model, "kbit_info", {}).get("model_type", "this")
        raise UsageError(f"decode mode graph: the decode step of a {arch} model cannot be captured in a CUDA graph "
                         "(its mixture-of-experts layers read on the host which experts to run); use static or dynamic")
    return mode


@torch.inference_mode()
def generate_ids(model, batch: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: SamplingParams | None = None,
                 eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                 on_token: Callable[[int, int], bool] | None = None,
                 decode: str = "auto") -> tuple[list[list[int]], list[str], dict]:
    """Token-level generation. on_token(i, token) returns True when sequence i must stop
    (e.g. a stop string). decode: one of DECODE_MODES (auto: CUDA graphs on a GPU, unless the
    model has cuda_graphs = False: resolve_decode_mode). Returns
    (new tokens per sequence, finish reasons, timings; timings["decode_mode"] is the mode
    the decode steps ran in, "static" when CUDA graphs were asked for but failed)."""
    sampling = sampling or SamplingParams()
    sampling.check()
    if max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not batch:
        return [], [], {"prefill_seconds": 0.0, "decode_seconds": 0.0, "decode_steps": 0}
    device = next(iter(model.buffers()), None)
    device = device.device if device is not None else next(model.parameters()).device
    mode = resolve_decode_mode(decode, device, model)
    B = len(batch)
    L = max(len(s) for s in batch)
    ctx = getattr(model, "context_length", None)
    if ctx is not None:
        for i, s in enumerate(batch):
            if len(s) > ctx:
                raise InputError(f"prompt {i + 1} has {len(s)} tokens, more than the model's context window of "
                                 f"{ctx} tokens; shorten it")
    budget = max_new_tokens if ctx is None else min(max_new_tokens, ctx - L)
    limited_by_ctx = budget < max_new_tokens
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, s in enumerate(batch):
        if len(s):
            ids[i, L - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, L - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = None
    if sampling.temperature > 0:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    eos = set(int(e) for e in eos_token_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    timings = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "decode_steps": 0}
    if budget <= 0:
        if limited_by_ctx:
            reasons = ["context"] * B
        return out, reasons, timings
    cache = KVCache(model.num_layers, capacity=L + budget)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    step = 0
    t_first = None
    static = None
    while True:
        if sampling.temperature == 0:  # greedy: the arg max on the device, only B ids come back
            nxt = logits.argmax(dim=-1).cpu()
        else:
            nxt = sample_next(logits.float().cpu(), sampling, gen)
        if t_first is None:
            sync()
            t_first = time.perf_counter()
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            if t in eos:
                done[i], reasons[i] = True, "eos"
                continue
            out[i].append(t)
            if on_token is not None and on_token(i, t):
                done[i], reasons[i] = True, "stop"
        step += 1
        if all(done) or step >= budget:
            break
        feed = torch.where(torch.tensor(done), torch.full_like(nxt, pad_token_id), nxt).to(device)
        if mode != "dynamic":
            if static is None:
                static = _StaticDecoder(model, cache, mask, device, graph=mode == "graph")
            logits = static.step(feed)
            continue
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        logits = model(feed[:, None], attention_mask=mask, cache=cache, last_only=True)[:, -1]
    sync()
    t_end = time.perf_counter()
    if limited_by_ctx:
        reasons = ["context" if r == "length" else r for r in reasons]
    ran = "static" if static is not None and mode == "graph" and not static.graph else mode  # a failed capture
    timings = {"prefill_seconds": t_first - t0, "decode_seconds": t_end - t_first, "decode_steps": step - 1,
               "decode_mode": ran if step > 1 else "none", "graph_captures": static.captures if static else 0}
    return out, reasons, timings


def generate(model, tokenizer: Tokenizer, prompts: str | Sequence[str], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             stop: Sequence[str] = (), chat: bool = False, system: str | None = None,
             on_text: TextCallback | None = None, decode: str = "auto") -> GenerationResult:
    """Generate a completion for each prompt (one batch, left padded). decode: see
    generate_ids (auto: decode steps replayed as CUDA graphs on a GPU)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    batch = encode_prompts(tokenizer, prompts, chat=chat, system=system)
    trackers = [_TextTracker(tokenizer, stop) for _ in prompts]

    def on_token(i: int, t: int) -> bool:
        new = trackers[i].add(t)
        if new and on_text is not None:
            on_text(i, new)
        return trackers[i].stopped

    ids, reasons, tm = generate_ids(model, batch, max_new_tokens,
                                    sampling=SamplingParams(temperature, top_k, top_p, seed),
                                    eos_token_ids=tokenizer.eos_token_ids, pad_token_id=tokenizer.pad_token_id,
                                    on_token=on_token, decode=decode)
    completions = []
    for i, p in enumerate(prompts):
        tail = trackers[i].flush() if not trackers[i].stopped or trackers[i].emitted < len(trackers[i].text) else ""
        if tail and on_text is not None:
            on_text(i, tail)
        text = trackers[i].text if trackers[i].ids else ""
        completions.append(Completion(p, text, ids[i], len(batch[i]), reasons[i]))
    return GenerationResult(completions, sum(len(b) for b in batch), sum(len(x) for x in ids),
                            tm["prefill_seconds"], tm["decode_seconds"], tm["decode_steps"],
                            tm.get("decode_mode", "none"))
