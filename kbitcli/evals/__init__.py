"""Quality checks for kbit models: perplexity (two protocols), comparison with a reference (KL
divergence, top-1 agreement, saved reference logits) and zero-shot tasks. A library: the
commands `kbit perplexity`, `kbit compare` and `kbit eval` (kbitcli.cli.eval_cmds) wrap it.

    from kbitcli.runner import load
    from kbitcli.evals import perplexity, compare, wiki_text
    model, tok, _ = load("out/model-kbit")
    ids = tok.encode(wiki_text())
    print(perplexity(model, ids, ctx=512, max_tokens=16384).ppl)

Modules: data (texts), perplexity (windows, NLL), compare (KL, top-1, reference files),
tasks (LAMBADA, HellaSwag, PIQA, WinoGrande). docs/quality.md describes the protocols.
"""
from __future__ import annotations

from .compare import CompareResult, Gate, ReferenceLogits, check_gates, compare, raise_failed
from .data import dataset_text, load_text, wiki_text, wikitext2
from .perplexity import PerplexityResult, Window, perplexity, window_plan
from .tasks import TASKS, TaskResult, evaluate_task, load_task_file

__all__ = ["CompareResult", "Gate", "PerplexityResult", "ReferenceLogits", "TASKS", "TaskResult", "Window",
           "check_gates", "compare", "dataset_text", "evaluate_task", "load_task_file", "load_text", "perplexity",
           "raise_failed", "wiki_text", "wikitext2", "window_plan"]
