"""GPT-NeoX / Pythia: LayerNorm, partial rotary embeddings (rotary_pct of each head),
fused query_key_value laid out per head ([q_h, k_h, v_h] for each head h), parallel
residual (x + attn(ln1 x) + mlp(ln2 x)) or sequential, untied embed_out by default."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn.functional as F
from torch import nn

from .base import (KVCache, Rotary, activation, apply_rotary, args_from_config, attention, positive, prepare_step,
                   rope_settings)


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int | None = None
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, arch="gpt_neox")
        positive(a, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 arch="gpt_neox")
        a.rope = rope_settings(cfg, default_partial=0.25)
        return a


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.num_attention_heads, a.hidden_size // a.num_attention_heads
        self.scale = self.hd ** -0.5
        self.query_key_value = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=a.attention_bias)
        self.dense = nn.Linear(a.hidden_size, a.hidden_size, bias=a.attention_bias)

    def forward(self, x, cos, sin, step, cache):
        B, S, _ = x.shape
        qkv = self.query_key_value(x).view(B, S, self.nh, 3 * self.hd).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.dense(attention(q, k, v, step, self.scale))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(a.hidden_size, a.intermediate_size)
        self.dense_4h_to_h = nn.Linear(a.intermediate_size, a.hidden_size)
        self.act = activation(a.hidden_act, "gpt_neox")

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.parallel = a.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)
        self.attention = Attention(a, layer)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, step, cache):
        attn = self.attention(self.input_layernorm(x), cos, sin, step, cache)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        attn = attn + x
        return self.mlp(self.post_attention_layernorm(attn)) + attn


class Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_eps)


_BUFFER = re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$|rotary_emb\.inv_freq$")


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.num_hidden_layers
        self.context_length = args.max_position_embeddings
        self.gpt_neox = Body(args)
        self.rotary = Rotary.from_settings(args.rope, args.hidden_size // args.num_attention_heads)
        self.tied = bool(args.tie_word_embeddings)
        self.embed_out = None if self.tied else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"embed_out.weight": "gpt_neox.embed_in.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        return None if _BUFFER.search(name) else name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        b = self.gpt_neox
        x = b.embed_in(input_ids)
        cos, sin = self.rotary(step.positions, x.dtype)
        for layer in b.layers:
            x = layer(x, cos, sin, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = b.final_layer_norm(x[:, -1:] if last_only else x)
        return F.linear(x, b.embed_in.weight) if self.embed_out is None else self.embed_out(x)
