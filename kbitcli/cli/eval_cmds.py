"""kbit perplexity / compare / eval: quality checks on kbit's runner (kbitcli.evals)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from ..errors import UsageError
from .convert_cmds import resolve_source
from .main import app
from .options import JsonOpt, QuietOpt, stderr_is_tty

ModelArg = Annotated[str, typer.Argument(help="A kbit folder, Hugging Face folder, .safetensors/.bin, .gguf, "
                                              "'embedded' or a Hub id.")]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="UTF-8 text file to score.")]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="Built-in text instead of --text: 'wiki' "
                                                   "(offline English Wikipedia, ~2.8M characters), 'wikitext-2' "
                                                   "(WikiText-2 raw test, fetched from the Hub once), or "
                                                   "'wikitext-2-parquet' (the Salesforce/wikitext parquet; needs "
                                                   "pyarrow).")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="Tokens per window (default: 512, or the model's "
                                               "context window when it is shorter).")]
StrideOpt = Annotated[Optional[int], typer.Option("--stride", help="hf protocol: tokens between window starts "
                                                  "(default: --ctx, no overlap).")]
ProtocolOpt = Annotated[str, typer.Option("--protocol", help="hf (transformers' sliding window) or llama.cpp "
                                          "(chunks of --ctx, BOS first, second half scored).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", help="Use only the first N tokens of the text.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: float32, float16 or bfloat16 "
                                                 "(default: float32 on the CPU, float16 on CUDA).")]
DeqOpt = Annotated[bool, typer.Option("--dequantize-on-load", help="Dequantize kbit weights once at load time "
                                      "(faster, more memory) instead of in every forward.")]


class _Progress:
    """'windows done/total' on stderr: a live line on a terminal, nothing otherwise."""

    def __init__(self, what: str, quiet: bool) -> None:
        self.what, self.on, self.t0 = what, (not quiet) and stderr_is_tty(), time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if self.on:
            el = time.perf_counter() - self.t0
            eta = el / done * (total - done)
            sys.stderr.write(f"\r{self.what}: {done}/{total} ({el:.0f} s, ~{eta:.0f} s left)   ")
            sys.stderr.flush()
            if done == total:
                sys.stderr.write("\n")


def _note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"kbit: {text}", file=sys.stderr, flush=True)


def _read_text(text: Optional[Path], dataset: Optional[str]) -> tuple[str, str]:
    from ..evals.data import dataset_text, load_text
    if (text is None) == (dataset is None):
        raise UsageError("give exactly one of --text FILE and --dataset wiki|wikitext-2")
    if text is not None:
        return load_text(text), str(text)
    return dataset_text(dataset)


def _load(model: str, device, dtype, deq: bool, quiet: bool):
    from ..runner import load
    path, prov = resolve_source(model, quiet=quiet)
    m, tok, _ = load(path, device=device, dtype=dtype, dequantize_on_load=deq)
    return m, tok, prov.get("source", str(path))


def _tokenize(tok, text: str, protocol: str, max_tokens: Optional[int]) -> tuple[np.ndarray, int | None, int]:
    """(token ids with the tokenizer's special tokens, BOS id for the llama.cpp protocol, UTF-8 bytes
    of the text those tokens cover)."""
    from ..evals.perplexity import adds_bos
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    bos = tok.bos_token_id if protocol == "llama.cpp" and adds_bos(tok) else None
    if max_tokens is not None and max_tokens < len(ids):
        ids = ids[:max_tokens]
        n_bytes = len(tok.decode(ids.tolist()).encode("utf-8"))
    else:
        n_bytes = len(text.encode("utf-8"))
    return ids, bos, n_bytes


def _resolve_dev(device: str):
    from ..runner.load import resolve_device
    return resolve_device(device)  # a missing GPU is reported before any loading


@app.command("perplexity")
def perplexity_cmd(
    model: ModelArg,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = None,
    stride: StrideOpt = None,
    protocol: ProtocolOpt = "hf",
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    dequantize_on_load: DeqOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Perplexity of a model on a text (docs/quality.md describes the protocols)."""
    from ..evals.perplexity import PROTOCOLS, fit_ctx, perplexity, window_plan
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {protocol!r}; choose hf or llama.cpp")
    dev = _resolve_dev(device)
    body, where = _read_text(text, dataset)
    m, tok, name = _load(model, dev, dtype, dequantize_on_load, quiet or json_out)
    ctx = fit_ctx(ctx, m, name)
    ids, bos, n_bytes = _tokenize(tok, body, protocol, max_tokens)
    window_plan(len(ids), ctx, stride, protocol)  # bad settings fail before the long run
    res = perplexity(m, ids, ctx=ctx, stride=stride, protocol=protocol, batch_size=batch_size, bos_id=bos,
                     n_bytes=n_bytes, progress=_Progress("perplexity", quiet or json_out))
    info = m.kbit_info
    if json_out:
        print(json.dumps({"model": name, "text": where, "kind": info["kind"], "device": info["device"],
                          "dtype": info["dtype"], **res.to_dict()}, indent=2))
        return
    stride_txt = f", stride {res.stride}" if res.protocol == "hf" else (", BOS first" if bos is not None else "")
    print(f"{name} on {where}")
    print(f"  protocol {res.protocol}, ctx {res.ctx}{stride_txt}: {res.n_windows} windows, {res.n_scored:,} of "
          f"{res.n_tokens:,} tokens scored")
    bpb = f", {res.bits_per_byte:.4f} bits/byte" if res.bits_per_byte is not None else ""
    print(f"  perplexity {res.ppl:.4f} ± {res.ppl_se:.4f}  (mean NLL {res.nll:.4f} nats{bpb})")
    if not quiet:
        print(f"  {res.forward_tokens:,} tokens in {res.seconds:.1f} s ({res.tokens_per_second:.0f} tokens/s) on "
              f"{info['device']} {info['dtype']}, {info['kind']}"
              + (f" with {info['packed']} packed k-bit layers" if info["packed"] else ""))


@app.command("compare")
def compare_cmd(
    quantized: Annotated[str, typer.Argument(help="The model to check (a kbit folder, or any model the runner loads).")],
    reference: Annotated[Optional[str], typer.Argument(help="The model it was made from (not needed with --reference-logits).")] = None,
    text: TextOpt = None,
    dataset: DatasetOpt = None,
    ctx: CtxOpt = None,
    stride: StrideOpt = None,
    protocol: ProtocolOpt = "hf",
    max_tokens: MaxTokensOpt = None,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    dequantize_on_load: DeqOpt = False,
    save_reference: Annotated[Optional[Path], typer.Option("--save-reference", help="Also store the reference's top-k log-probs in this file (safetensors) for later runs without the reference model.")] = None,
    reference_logits: Annotated[Optional[Path], typer.Option("--reference-logits", help="A file from --save-reference, used instead of a reference model.")] = None,
    reference_topk: Annotated[int, typer.Option("--reference-topk", help="Log-probs per token kept by --save-reference (1-1024; the file takes 6k + 8 bytes per scored token).")] = 256,
    max_ppl_ratio: Annotated[Optional[float], typer.Option("--max-ppl-ratio", help="Gate: fail when perplexity / reference perplexity exceeds this (e.g. 1.05).")] = None,
    max_kld: Annotated[Optional[float], typer.Option("--max-kld", help="Gate: fail when the mean KL divergence (nats) exceeds this (e.g. 0.05).")] = None,
    min_top1: Annotated[Optional[float], typer.Option("--min-top1", help="Gate: fail when top-1 agreement is below this fraction (e.g. 0.9).")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare a quantized model with its reference: perplexities, KL divergence, top-1 agreement,
    with gates that exit 1 when a figure is out of bounds."""
    from ..evals.compare import ReferenceLogits, check_gates, compare, raise_failed
    from ..evals.perplexity import PROTOCOLS, fit_ctx, window_plan
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown --protocol {protocol!r}; choose hf or llama.cpp")
    if (reference is None) == (reference_logits is None):
        raise UsageError("give the REFERENCE model or --reference-logits FILE (one of them)")
    if save_reference is not None and reference is None:
        raise UsageError("--save-reference needs the REFERENCE model")
    # gate values are checked before the long run
    if min_top1 is not None and not 0 <= min_top1 <= 1:
        raise UsageError(f"--min-top1 is a fraction between 0 and 1 (got {min_top1}; write 0.9 for 90%)")
    if max_kld is not None and max_kld < 0:
        raise UsageError(f"--max-kld must be at least 0 (got {max_kld})")
    if max_ppl_ratio is not None and not max_ppl_ratio > 0:
        raise UsageError(f"--max-ppl-ratio must be positive (got {max_ppl_ratio})")
    dev = _resolve_dev(device)
    body, where = _read_text(text, dataset)
    silent = quiet or json_out
    ref_file = ReferenceLogits.load(reference_logits) if reference_logits is not None else None
    q_model, q_tok, q_name = _load(quantized, dev, dtype, dequantize_on_load, silent)
    ctx = fit_ctx(ctx, q_model, q_name)
    ids, bos, n_bytes = _tokenize(q_tok, body, protocol, max_tokens)
    window_plan(len(ids), ctx, stride, protocol)
    if ref_file is None:
        r_model, r_tok, r_name = _load(reference, dev, dtype, dequantize_on_load, silent)
        fit_ctx(ctx, r_model, r_name)
        r_ids, r_bos, _ = _tokenize(r_tok, body, protocol, max_tokens)
        if len(r_ids) != len(ids) or not np.array_equal(r_ids, ids) or r_bos != bos:
            from ..errors import InputError
            raise InputError("the two models tokenize the text differently; compare a model with the checkpoint "
                             "it was made from")
        ref_obj = r_model
    else:
        ref_obj, r_name = ref_file, str(reference_logits)
    res = compare(q_model, ref_obj, ids, ctx=ctx, stride=stride, protocol=protocol, batch_size=batch_size,
                  bos_id=bos, n_bytes=n_bytes, save_reference=save_reference, reference_topk=reference_topk,
                  reference_name=r_name, progress=_Progress("compare", silent))
    gates = check_gates(res, max_ppl_ratio, max_kld, min_top1)
    if json_out:
        print(json.dumps({"quantized": q_name, "text": where, **res.to_dict(),
                          "passed": all(g.passed for g in gates),
                          "reference_file_saved": str(save_reference) if save_reference else None}, indent=2))
    else:
        _print_compare(q_name, where, res, bos, quiet)
        if save_reference is not None and not quiet:
            size = Path(save_reference).stat().st_size
            print(f"  reference top-{reference_topk} log-probs saved to {save_reference} ({size / 1e6:.2f} MB)")
        for g in gates:
            print(f"  gate {g.name}: {'PASS' if g.passed else 'FAIL'} ({_gate_line(g)})")
    raise_failed(gates)


def _gate_line(g) -> str:
    if g.name == "top1":
        return f"{100 * g.value:.2f}% {'>=' if g.passed else '<'} {100 * g.limit:.2f}%"
    fmt = ".5f" if g.name == "kld" else ".4f"
    return f"{g.value:{fmt}} {'<=' if g.passed else '>'} {g.limit:g}"


def _print_compare(q_name: str, where: str, r, bos, quiet: bool) -> None:
    stride_txt = f", stride {r.stride}" if r.protocol == "hf" else (", BOS first" if bos is not None else "")
    print(f"{q_name} vs {r.reference} on {where}")
    print(f"  protocol {r.protocol}, ctx {r.ctx}{stride_txt}: {r.n_windows} windows, {r.n_scored:,} tokens scored")
    print(f"  perplexity         {r.ppl:.4f} ± {r.ppl_se:.4f}   reference {r.ref_ppl:.4f} ± {r.ref_ppl_se:.4f}")
    print(f"  ppl ratio          {r.ppl_ratio:.4f}   (mean ln ratio {r.ln_ppl_ratio:.5f} ± {r.ln_ppl_ratio_se:.5f})")
    p = r.kld_percentiles
    print(f"  mean KL divergence {r.kld:.6f} ± {r.kld_se:.6f} nats   [{r.kl_method}]")
    print(f"  KL percentiles     median {p['50']:.5f}  90% {p['90']:.5f}  95% {p['95']:.5f}  99% {p['99']:.5f}  "
          f"99.9% {p['99.9']:.5f}  max {p['max']:.5f}")
    print(f"  top-1 agreement    {100 * r.top1:.3f}% ± {100 * r.top1_se:.3f}%")
    print(f"  Δp correct token   mean {100 * r.dp_mean:+.3f}% ± {100 * r.dp_se:.3f}%  rms {100 * r.dp_rms:.3f}%  "
          f"max {100 * r.dp_max:+.2f}%  min {100 * r.dp_min:+.2f}%")
    if not quiet:
        print(f"  {r.forward_tokens:,} tokens per model in {r.seconds:.1f} s")


@app.command("eval")
def eval_cmd(
    model: ModelArg,
    task: Annotated[str, typer.Option("--task", help="lambada, hellaswag, piqa or winogrande.")],
    data: Annotated[Path, typer.Option("--data", help="The task's items, JSONL (one JSON object a line).")],
    limit: Annotated[Optional[int], typer.Option("--limit", help="Score only the first N items.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    dequantize_on_load: DeqOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Zero-shot accuracy on LAMBADA, HellaSwag, PIQA or WinoGrande (lm-evaluation-harness scoring)."""
    from ..evals.tasks import TASKS, evaluate_task, load_task_file
    if task not in TASKS:
        raise UsageError(f"unknown --task {task!r}; choose {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1 (got {limit})")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    dev = _resolve_dev(device)
    items = load_task_file(task, data, limit)
    m, tok, name = _load(model, dev, dtype, dequantize_on_load, quiet or json_out)
    res = evaluate_task(m, tok, task, items, batch_size=batch_size, progress=_Progress(task, quiet or json_out))
    if json_out:
        print(json.dumps({"model": name, "data": str(data), **res.to_dict(with_predictions=True)}, indent=2))
        return
    print(f"{name} on {task} ({data}, {res.n} items)")
    print(f"  acc      {100 * res.acc:.2f}% ± {100 * res.acc_se:.2f}%")
    if res.acc_norm is not None:
        print(f"  acc_norm {100 * res.acc_norm:.2f}% ± {100 * res.acc_norm_se:.2f}%")
    if res.ppl is not None:
        print(f"  ppl      {res.ppl:.3f} (of the last word)")
    if not quiet:
        print(f"  {res.n} items in {res.seconds:.1f} s")
