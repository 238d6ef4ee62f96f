"""BLOOM: ALiBi position biases (no position embeddings), LayerNorm after the word
embeddings, fused query_key_value laid out per head, GELU (tanh) MLP of 4 x hidden, tied head."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import KVCache, args_from_config, attention, positive, prepare_step

ALIASES = {"n_embed": "hidden_size", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}


@dataclass
class ModelArgs:
    hidden_size: int
    n_layer: int
    n_head: int
    vocab_size: int
    layer_norm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    tie_word_embeddings: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, ALIASES, arch="bloom")
        positive(a, "hidden_size", "n_layer", "n_head", "vocab_size", arch="bloom")
        return a


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slope of each head (as in BLOOM's reference implementation)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device="cpu")
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device="cpu"))
    if closest != num_heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device="cpu")
        n = min(closest, num_heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * n, 2, dtype=torch.int32, device="cpu"))])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.n_head, a.hidden_size // a.n_head
        self.scale = 1.0 / math.sqrt(self.hd)
        self.query_key_value = nn.Linear(a.hidden_size, 3 * a.hidden_size, bias=True)
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)

    def forward(self, x, alibi, step, cache):
        B, S, _ = x.shape
        qkv = self.query_key_value(x).view(B, S, self.nh, 3, self.hd)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.dense(attention(q, k, v, step, self.scale, bias=alibi))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(a.hidden_size, 4 * a.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * a.hidden_size, a.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.post = a.apply_residual_connection_post_layernorm
        self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        self.self_attention = Attention(a, layer)
        self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        self.mlp = MLP(a)

    def forward(self, x, alibi, step, cache):
        h = self.input_layernorm(x)
        x = self.self_attention(h, alibi, step, cache) + (h if self.post else x)
        h = self.post_attention_layernorm(x)
        return self.mlp(h) + (h if self.post else x)


class Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        self.h = nn.ModuleList(Block(a, i) for i in range(a.n_layer))
        self.ln_f = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.n_layer
        self.context_length = None  # ALiBi: no learned limit
        self.transformer = Body(args)
        self.register_buffer("slopes", alibi_slopes(args.n_head), persistent=False)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.word_embeddings.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if not name.startswith(("transformer.", "lm_head.")):
            return "transformer." + name  # bigscience/bloom-* checkpoints saved from BloomModel
        return name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        t = self.transformer
        x = t.word_embeddings_layernorm(t.word_embeddings(input_ids))
        km = step.key_mask.long()
        key_pos = ((km.cumsum(-1) - 1) * km).to(torch.float32)             # [B, T]
        alibi = (self.slopes.to(x.device)[None, :, None, None] * key_pos[:, None, None, :]).to(x.dtype)  # [B,H,1,T]
        for layer in t.h:
            x = layer(x, alibi, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = t.ln_f(x[:, -1:] if last_only else x)
        return F.linear(x, t.word_embeddings.weight) if self.lm_head is None else self.lm_head(x)
