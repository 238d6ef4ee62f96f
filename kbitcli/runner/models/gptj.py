"""GPT-J (GPTJForCausalLM): GPT-2's configuration keys, with a parallel block (attention and MLP
both read the one ln_1: x + attn(ln_1 x) + mlp(ln_1 x)) as GPT-NeoX's, no position embeddings but
a rotary on the first rotary_dim features of each query and key head in the interleaved form
(adjacent pairs rotated, base.apply_rotary_interleaved; GPT-NeoX rotates the two halves), separate
q/k/v/out projections without biases, an fc_in -> gelu_new -> fc_out MLP with biases, and an
untied lm_head with a bias (which stays the head's own when the embeddings are tied)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import gpt2
from .base import (KVCache, Rotary, activation, apply_rotary_interleaved, attention, fuse_group, prepare_step,
                   rope_settings)


@dataclass
class ModelArgs(gpt2.ModelArgs):
    # GPTJConfig's defaults
    n_positions: int = 2048
    rotary_dim: int = 64
    tie_word_embeddings: bool = False
    arch: ClassVar[str] = "gptj"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config(cfg)
        hd = a.n_embd // a.n_head
        if "rotary_dim" in cfg and cfg["rotary_dim"] is None:
            # transformers then rotates n_embd features: the whole head with one head, else it fails
            if a.n_head != 1:
                raise InputError("config.json: rotary_dim is null, which GPT-J reads as the whole embedding "
                                 f"({a.n_embd}); that fits only a model with one head, not {a.n_head}")
            a.rotary_dim = hd
        r = a.rotary_dim
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or r % 2 or r > hd:
            raise InputError(f"config.json: rotary_dim must be an even positive integer of at most the head size "
                             f"({hd}) for a {cls.arch} model, got {r!r}")
        return a


class Attention(nn.Module):
    """Separate q/k/v projections (fused by fuse()), a rotary when the forward gives cos and sin;
    attend() is the hook GPT-Neo's attention (gpt_neo.py) overrides."""

    def __init__(self, a: ModelArgs, layer: int, out_bias: bool = False) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.n_head, a.n_embd // a.n_head
        self.scale = self.hd ** -0.5
        self.q_proj = nn.Linear(a.n_embd, a.n_embd, bias=False)
        self.k_proj = nn.Linear(a.n_embd, a.n_embd, bias=False)
        self.v_proj = nn.Linear(a.n_embd, a.n_embd, bias=False)
        self.out_proj = nn.Linear(a.n_embd, a.n_embd, bias=out_bias)
        self.qkv_proj = None  # q_proj, k_proj and v_proj as one layer, after fuse()

    def fuse(self) -> bool:
        return fuse_group(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, cos, sin, step, cache: KVCache | None):
        B, S, E = x.shape
        q, k, v = (t.view(B, S, self.nh, self.hd).transpose(1, 2) for t in self.project(x))
        if cos is not None:
            q, k = apply_rotary_interleaved(q, cos, sin), apply_rotary_interleaved(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.out_proj(self.attend(q, k, v, step))

    def project(self, x):
        """The queries, keys and values of x [B, S, n_embd] (CodeGen: from its fused layer)."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).chunk(3, dim=-1)

    def attend(self, q, k, v, step):
        return attention(q, k, v, step, self.scale)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.fc_in = nn.Linear(a.n_embd, a.n_inner)
        self.fc_out = nn.Linear(a.n_inner, a.n_embd)
        self.act = activation(a.activation_function, a.arch)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    attention_class: type[nn.Module] = Attention  # (CodeGen gives its own)

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)
        self.attn = self.attention_class(a, layer)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, step, cache):
        h = self.ln_1(x)
        return self.attn(h, cos, sin, step, cache) + self.mlp(h) + x


class Body(nn.Module):
    def __init__(self, a: ModelArgs, block: type[nn.Module] = Block) -> None:
        super().__init__()
        self.wte = nn.Embedding(a.vocab_size, a.n_embd)
        self.h = nn.ModuleList(block(a, i) for i in range(a.n_layer))
        self.ln_f = nn.LayerNorm(a.n_embd, eps=a.layer_norm_epsilon)


_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")  # the causal-mask buffers of old checkpoints


class Model(nn.Module):
    block_class: type[nn.Module] = Block  # (CodeGen gives its own)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.n_layer
        self.context_length = args.n_positions  # transformers' sin/cos table ends there
        self.transformer = Body(args, self.block_class)
        self.rotary = Rotary.from_settings(rope_settings({}), args.rotary_dim)  # base 10000, fixed
        self.tied = bool(args.tie_word_embeddings)
        if self.tied:  # the embedding matrix with the head's own bias (lm_head.bias)
            self.lm_head = nn.Module()
            self.lm_head.bias = nn.Parameter(torch.zeros(args.vocab_size))
        else:
            self.lm_head = nn.Linear(args.n_embd, args.vocab_size)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        return None if _BUFFER.search(name) else name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        t = self.transformer
        x = t.wte(input_ids)
        cos, sin = self.rotary(step.positions, x.dtype)
        for layer in t.h:
            x = layer(x, cos, sin, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = t.ln_f(x[:, -1:] if last_only else x)
        if self.tied:
            return F.linear(x, t.wte.weight, self.lm_head.bias)
        return self.lm_head(x)
