"""GPT-2: learned positions, pre-LayerNorm blocks, fused c_attn, GELU (tanh) MLP, tied head.

Hugging Face stores GPT-2's projections as Conv1D, whose weight is (in, out): the transpose
of nn.Linear's. The runner keeps that layout (Conv1D below; a quantized one becomes a
KbitLinear with layout "in_out"), so tensors load unchanged."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from .base import KVCache, activation, args_from_config, attention, positive, prepare_step

ALIASES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
           "max_position_embeddings": "n_positions", "n_ctx": "n_positions"}


@dataclass
class ModelArgs:
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    #: the model_type named in errors and the config keys read as other fields' (the modules built on
    #: this one give theirs)
    arch: ClassVar[str] = "gpt2"
    aliases: ClassVar[Mapping[str, str]] = ALIASES

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, cls.aliases, arch=cls.arch)
        positive(a, "n_embd", "n_layer", "n_head", "vocab_size", "n_positions", arch=cls.arch)
        if a.n_embd % a.n_head:
            raise InputError(f"config.json: the hidden size n_embd ({a.n_embd}) is not a multiple of n_head "
                             f"({a.n_head})")
        a.n_inner = a.n_inner or 4 * a.n_embd
        return a


class Conv1D(nn.Module):
    """y = x @ weight + bias with weight (in, out), as in Hugging Face's GPT-2."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.n_head, a.n_embd // a.n_head
        self.scale = (self.hd ** -0.5) if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer + 1)
        self.c_attn = Conv1D(a.n_embd, 3 * a.n_embd)
        self.c_proj = Conv1D(a.n_embd, a.n_embd)

    def forward(self, x, step, cache):
        B, S, E = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (t.view(B, S, self.nh, self.hd).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.c_proj(attention(q, k, v, step, self.scale))


class MLP(nn.Module):
    layer: type[nn.Module] = Conv1D

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.c_fc = self.layer(a.n_embd, a.n_inner)
        self.c_proj = self.layer(a.n_inner, a.n_embd)
        self.act = activation(a.activation_function, a.arch)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class LinearMLP(MLP):
    """GPT-2's MLP with nn.Linear layers (GPT-Neo, GPTBigCode): the same arguments, the usual layout."""

    layer = nn.Linear


class Block(nn.Module):
    #: the classes of the sublayers (a variant's module gives its own)
    attention_class: type[nn.Module] = Attention
    mlp_class: type[nn.Module] = MLP

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)
        self.attn = self.attention_class(a, layer)
        self.ln_2 = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)
        self.mlp = self.mlp_class(a)

    def forward(self, x, step, cache):
        x = x + self.attn(self.ln_1(x), step, cache)
        return x + self.mlp(self.ln_2(x))


class Body(nn.Module):
    def __init__(self, a: ModelArgs, block: type[nn.Module] = Block) -> None:
        super().__init__()
        self.wte = nn.Embedding(a.vocab_size, a.n_embd)
        self.wpe = nn.Embedding(a.n_positions, a.n_embd)
        self.h = nn.ModuleList(block(a, i) for i in range(a.n_layer))
        self.ln_f = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)


_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")


class Model(nn.Module):
    #: the class of a layer (a variant's module gives its own)
    block_class: type[nn.Module] = Block

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.n_layer
        self.context_length = args.n_positions
        self.transformer = Body(args, self.block_class)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.n_embd, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if _BUFFER.search(name):  # the causal-mask buffers of old checkpoints
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            return "transformer." + name  # the original openai-community/gpt2 layout
        return name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(step.positions)
        for layer in t.h:
            x = layer(x, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = t.ln_f(x[:, -1:] if last_only else x)
        return F.linear(x, t.wte.weight) if self.lm_head is None else self.lm_head(x)
