"""Zero-shot accuracy on LAMBADA, HellaSwag, PIQA and WinoGrande, scored as lm-evaluation-harness
scores them (its 0.4 task definitions), from local JSONL files.

    items = load_task_file("hellaswag", "hellaswag_val.jsonl")
    res = evaluate_task(model, tok, "hellaswag", items, limit=500)
    print(res.acc, res.acc_norm)

Every task is a set of (context, continuation) log-likelihood requests:
  log P(continuation | context) = sum of the continuation tokens' log-probabilities, with the
  harness's tokenization: the context and context+continuation are encoded without special
  tokens (trailing spaces of the context move to the continuation first), the continuation's
  tokens are those of the whole past the context's, and an empty context gets the BOS (else EOS)
  token as its only token. Inputs longer than the model's context keep their last tokens.

lambada  {"text"}: context = text up to its last space, continuation = " " + last word.
         acc: the greedy (argmax) prediction reproduces every token of the continuation;
         ppl = exp(-mean over items of log P(continuation)).
hellaswag {"ctx" or "ctx_a"/"ctx_b", "endings", "label", optional "activity_label"}: query =
         preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) (or ctx when
         ctx_a is absent), continuations " " + preprocess(ending); preprocess strips, turns
         " [title]" into ". ", drops "[...]" and double spaces.
piqa     {"goal", "sol1", "sol2", "label"}: context "Question: {goal}\\nAnswer:", continuations
         " " + sol1 / " " + sol2.
winogrande {"sentence", "option1", "option2", "answer"}: partial scoring: for each option the
         context is the sentence up to "_" with the option put in, the continuation is
         " " + the rest of the sentence after "_" (stripped); both score the same continuation.
Multiple choice: acc = argmax of log P(continuation) is the gold choice; acc_norm = argmax of
log P / len(choice text in characters) (winogrande: not applicable, its continuations are equal).
Standard errors: sqrt(p (1 - p) / (n - 1)), as the harness reports them.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kbitcli.errors import InputError, UsageError

from .data import load_text
from .perplexity import model_device

TASKS = ("lambada", "hellaswag", "piqa", "winogrande")
_FIELDS = {"lambada": ("text",), "hellaswag": ("endings", "label"), "piqa": ("goal", "sol1", "sol2", "label"),
           "winogrande": ("sentence", "option1", "option2", "answer")}


# ------------------------------------------------------------------------------------------
# files


def load_task_file(task: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """The items of a JSONL file (one JSON object a line; blank lines skipped), checked for the
    task's fields; InputError names the line."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    p = Path(path).expanduser()
    lines = load_text(p).splitlines()  # a missing, unreadable, non-UTF-8 or empty file: InputError
    items = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{no}: not a JSON object ({e.msg})") from None
        if not isinstance(doc, dict):
            raise InputError(f"{p}:{no}: not a JSON object")
        missing = [f for f in _FIELDS[task] if f not in doc]
        if task == "hellaswag" and "ctx" not in doc and "ctx_a" not in doc:
            missing.insert(0, "ctx")
        if missing:
            raise InputError(f"{p}:{no}: a {task} item needs the field(s) {', '.join(missing)} "
                             f"(has {', '.join(sorted(doc)) or 'none'})")
        try:
            build_requests(task, doc)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise InputError(f"{p}:{no}: not a valid {task} item ({e})") from None
        items.append(doc)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise InputError(f"{p} holds no items")
    return items


# ------------------------------------------------------------------------------------------
# task definitions (lm-evaluation-harness 0.4)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _label(v: Any, n: int) -> int:
    i = int(v)
    if not 0 <= i < n:
        raise ValueError(f"label {v!r} is not one of 0..{n - 1}")
    return i


@dataclass
class Requests:
    contexts: list[str]
    continuations: list[str]
    gold: int | None           # index of the right choice (None: lambada)
    choice_lengths: list[int]  # characters of each choice, for acc_norm


def build_requests(task: str, doc: dict) -> Requests:
    if task == "lambada":
        text = str(doc["text"])
        ctx, _, word = text.rpartition(" ")
        if not ctx or not word:
            raise ValueError("the text needs a context and a last word separated by a space")
        return Requests([ctx], [" " + word], None, [len(word)])
    if task == "hellaswag":
        if "ctx_a" in doc:
            ctx = str(doc["ctx_a"]) + " " + str(doc.get("ctx_b", "")).capitalize()
        else:
            ctx = str(doc["ctx"])
        query = _hellaswag_preprocess(f"{doc['activity_label']}: {ctx}" if doc.get("activity_label") else ctx)
        endings = doc["endings"]
        if not isinstance(endings, list) or len(endings) < 2:
            raise ValueError("endings must be a list of at least two strings")
        choices = [_hellaswag_preprocess(str(e)) for e in endings]
        return Requests([query] * len(choices), [" " + c for c in choices], _label(doc["label"], len(choices)),
                        [len(c) for c in choices])
    if task == "piqa":
        choices = [str(doc["sol1"]), str(doc["sol2"])]
        ctx = f"Question: {doc['goal']}\nAnswer:"
        return Requests([ctx, ctx], [" " + c for c in choices], _label(doc["label"], 2), [len(c) for c in choices])
    if task == "winogrande":
        s = str(doc["sentence"])
        i = s.index("_")
        opts = [str(doc["option1"]), str(doc["option2"])]
        target = " " + s[i + 1:].strip()
        ans = str(doc["answer"]).strip()
        if ans not in ("1", "2"):
            raise ValueError(f"answer {doc['answer']!r} is not 1 or 2")
        return Requests([s[:i] + o for o in opts], [target, target], int(ans) - 1, [len(s[:i] + o) for o in opts])
    raise UsageError(f"unknown task {task!r}; choose {', '.join(TASKS)}")


# ------------------------------------------------------------------------------------------
# log-likelihoods


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair: (context tokens, continuation tokens)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    if not ctx:  # an empty context: the harness starts from its prefix token (BOS, else EOS)
        prefix = tok.bos_token_id if tok.bos_token_id is not None else (tok.eos_token_ids or [0])[0]
        return [prefix], whole
    return ctx, whole[len(ctx):]


def loglikelihoods(model: Callable, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_length: int | None = None) -> list[tuple[float, bool]]:
    """(log P(continuation | context), whether greedy decoding reproduces the continuation) for each
    (context, continuation) pair. Batches right-padded sequences (causal attention: padding after
    a sequence cannot change its logits), longest first."""
    max_length = max_length or getattr(model, "context_length", None) or 2048
    seqs = []
    for ctx, cont in pairs:
        c_enc, k_enc = encode_pair(tok, ctx, cont)
        if not k_enc:
            raise InputError(f"the continuation {cont!r} encodes to no token")
        inp = (c_enc + k_enc)[-(max_length + 1):][:-1]
        seqs.append((inp, k_enc))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(seqs)
    dev = model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    for b0 in range(0, len(order), batch_size):
        idx = order[b0:b0 + batch_size]
        width = max(len(seqs[i][0]) for i in idx)
        x = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(seqs[i][0])] = torch.tensor(seqs[i][0])
        with torch.inference_mode():
            logits = model(x.to(dev))
        for r, i in enumerate(idx):
            inp, cont = seqs[i]
            n = len(cont)
            lp = torch.log_softmax(logits[r, len(inp) - n: len(inp)].float(), -1).cpu()
            target = torch.tensor(cont)
            ll = float(lp.gather(1, target[:, None]).sum())
            out[i] = (ll, bool(torch.equal(lp.argmax(-1), target)))
    return out


# ------------------------------------------------------------------------------------------
# evaluation


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_se: float
    acc_norm: float | None
    acc_norm_se: float | None
    ppl: float | None          # lambada: exp(-mean log P(last word))
    seconds: float
    items_per_second: float
    predictions: list = field(default_factory=list, repr=False)  # per item: chosen index (or greedy hit)

    def to_dict(self, with_predictions: bool = False) -> dict:
        d = asdict(self)
        if not with_predictions:
            d.pop("predictions")
        return d


def _se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def evaluate_task(model: Callable, tok, task: str, items: Sequence[dict], limit: int | None = None,
                  batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> TaskResult:
    """Zero-shot accuracy of `model` on items of `task` (module docstring)."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose {', '.join(TASKS)}")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"--limit must be at least 1 (got {limit})")
        items = list(items)[:limit]
    reqs = [build_requests(task, doc) for doc in items]
    t0 = time.perf_counter()
    hits, hits_norm, lls_l, preds = [], [], [], []
    step = max(1, 64 // max(1, len(reqs[0].contexts)))  # items per log-likelihood call
    for s in range(0, len(reqs), step):
        chunk = reqs[s:s + step]
        pairs = [(c, k) for r in chunk for c, k in zip(r.contexts, r.continuations)]
        res = loglikelihoods(model, tok, pairs, batch_size=batch_size)
        j = 0
        for r in chunk:
            got = res[j: j + len(r.contexts)]
            j += len(r.contexts)
            if r.gold is None:  # lambada
                ll, greedy = got[0]
                hits.append(greedy)
                lls_l.append(ll)
                preds.append(bool(greedy))
                continue
            lls = np.array([g[0] for g in got])
            pick = int(np.argmax(lls))
            hits.append(pick == r.gold)
            preds.append(pick)
            if task != "winogrande":
                hits_norm.append(int(np.argmax(lls / np.array(r.choice_lengths, dtype=np.float64).clip(1))) == r.gold)
        if progress is not None:
            progress(min(s + step, len(reqs)), len(reqs))
    seconds = time.perf_counter() - t0
    n = len(reqs)
    acc = float(np.mean(hits))
    acc_norm = float(np.mean(hits_norm)) if hits_norm else None
    return TaskResult(task=task, n=n, acc=acc, acc_se=_se(acc, n), acc_norm=acc_norm,
                      acc_norm_se=_se(acc_norm, n) if acc_norm is not None else None,
                      ppl=math.exp(-float(np.mean(lls_l))) if lls_l else None, seconds=seconds,
                      items_per_second=n / seconds if seconds > 0 else float("inf"), predictions=preds)
