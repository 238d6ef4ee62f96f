"""kbit generate: run a kbit model (or its source checkpoint) with kbit's own torch runner."""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .convert_cmds import resolve_source
from .main import app
from .options import JsonOpt, QuietOpt


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="A kbit folder, Hugging Face folder, .safetensors/.bin, .gguf, 'embedded' or a Hub id.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt text. Repeat for a batch (left padded).")] = [],  # noqa: B006
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate per prompt.")] = 64,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu or cuda.")] = "auto",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Compute dtype: float32, float16 or bfloat16 (default: float32 on the CPU, float16 on CUDA).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy; > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the K most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling: the smallest set of tokens with this probability (1 = off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed for sampling.")] = None,
    stop: Annotated[list[str], typer.Option("--stop", help="Stop when this text appears (not included). Repeatable.")] = [],  # noqa: B006
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the model's chat template as a user message.")] = False,
    system: Annotated[Optional[str], typer.Option("--system", help="System message for --chat.")] = None,
    dequantize_on_load: Annotated[bool, typer.Option("--dequantize-on-load", help="Dequantize kbit weights once at load time (faster, more memory) instead of in every forward.")] = False,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Run linear layers that share an input (q/k/v, gate/up) as one layer where compatible: fewer, larger products per step.")] = True,
    decode: Annotated[str, typer.Option("--decode", help="How decode steps run: auto (CUDA graphs on a GPU, else dynamic), graph, static (fixed-shape cache, no graphs) or dynamic (growing cache).")] = "auto",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate text with kbit's runner (torch only; no transformers needed)."""
    if not prompt:
        raise UsageError("give at least one --prompt")
    if system is not None and not chat:
        raise UsageError("--system needs --chat")
    from ..runner import generate as run_generate
    from ..runner import load
    from ..runner.load import resolve_device

    from ..runner.generate import resolve_decode_mode
    dev = resolve_device(device)  # before any loading: a missing GPU is reported at once
    resolve_decode_mode(decode, dev)  # a bad --decode before any loading too
    path, _ = resolve_source(model)
    m, tok, _ = load(path, device=dev, dtype=dtype, dequantize_on_load=dequantize_on_load, fuse=fuse)
    if m.kbit_info.get("language_model") and not quiet:
        print(f"kbit: {m.kbit_info['model_type']} is a multimodal model: generating from text only with its "
              f"{m.kbit_info['language_model']} language model (the vision tower is not loaded)", file=sys.stderr)
    stream = len(prompt) == 1 and not json_out
    if stream and not chat:  # the continuation follows the prompt, as in a text completion
        sys.stdout.write(prompt[0])
        sys.stdout.flush()

    def on_text(i: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = run_generate(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, stop=stop, chat=chat, system=system,
                       on_text=on_text if stream else None, decode=decode)
    info = m.kbit_info
    if json_out:
        doc = {"model": str(path), "kind": info["kind"], "model_type": info["model_type"], "device": info["device"],
               "dtype": info["dtype"], "packed_layers": info["packed"], "fused_groups": info.get("fused", 0), **res.to_dict()}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    if stream:
        sys.stdout.write("\n")
    else:
        for i, c in enumerate(res.completions):
            print(f"--- [{i + 1}] {c.prompt}")
            print(c.prompt + c.text if not chat else c.text)
    if not quiet:
        print(f"kbit: {res.generated_tokens} tokens in {res.seconds:.2f} s ({res.tokens_per_second:.2f} tokens/s; "
              f"prompt {res.prefill_tokens_per_second:.1f} tokens/s, decode {res.decode_tokens_per_second:.2f} tokens/s) "
              f"on {info['device']} {info['dtype']}, {info['kind']}, {res.decode_mode} decode"
              + (f" with {info['packed']} packed k-bit layers" if info["packed"] else "")
              + (f"; {info['fused']} groups of projections fused" if info.get("fused") else ""), file=sys.stderr)
