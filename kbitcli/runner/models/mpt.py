"""MosaicML MPT (MptForCausalLM: MPT-7B/30B and their fine-tunes): BLOOM's ALiBi family (bloom.py)
with MPT's own parts: no biases anywhere (LayerNorms without bias too), a fused Wqkv laid out as
all queries, then all keys, then all values, optionally clamped to [-clip_qkv, clip_qkv], MPT's
ALiBi slopes (2 ** -(alibi_bias_max * i / n) over the next power of two of the heads, interleaved
as MPT does when the heads are not a power of two), a GELU MLP of expansion_ratio x hidden, a tied
head, no LayerNorm after the embedding, and no sequence longer than max_seq_len (transformers'
ALiBi table is that long). The options transformers' MPT does not implement (learned positions
instead of ALiBi, q/k LayerNorms, multi-query attention, biases) are refused."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from .base import KVCache, args_from_config, attention, positive, prepare_step

ALIASES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"}


@dataclass
class ModelArgs:
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    # MptConfig's defaults
    expansion_ratio: int = 4
    max_seq_len: int = 2048
    layer_norm_epsilon: float = 1e-5
    no_bias: bool = True
    tie_word_embeddings: bool = True
    attn_config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, ALIASES, arch="mpt")
        positive(a, "d_model", "n_heads", "n_layers", "vocab_size", "expansion_ratio", "max_seq_len", arch="mpt")
        if a.d_model % a.n_heads:
            raise InputError(f"config.json: d_model ({a.d_model}) is not a multiple of n_heads ({a.n_heads})")
        ac = a.attn_config
        attn_type = ac.get("attn_type", "multihead_attention")
        unsupported = [name for name, bad in (("no_bias false", not a.no_bias),
                                              ("alibi false", not ac.get("alibi", True)), ("qk_ln", ac.get("qk_ln")),
                                              (f"attn_type {attn_type}", attn_type != "multihead_attention")) if bad]
        if unsupported:
            raise InputError(f"config.json: this mpt model uses {', '.join(unsupported)}, which kbit's runner (as "
                             "transformers' MPT) does not support")
        return a

    @property
    def scale(self) -> float:
        s = self.attn_config.get("softmax_scale")
        return float(s) if s else (self.d_model / self.n_heads) ** -0.5


def alibi_slopes(num_heads: int, bias_max: float = 8) -> torch.Tensor:
    """MPT's ALiBi slope of each head (float32)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, dtype=torch.int64, device="cpu").float() * (bias_max / n))
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.n_heads, a.d_model // a.n_heads
        self.scale = a.scale
        self.clip = a.attn_config.get("clip_qkv")
        self.Wqkv = nn.Linear(a.d_model, 3 * a.d_model, bias=False)
        self.out_proj = nn.Linear(a.d_model, a.d_model, bias=False)

    def forward(self, x, alibi, step, cache):
        B, S, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip:
            qkv = qkv.clamp(min=-self.clip, max=self.clip)
        q, k, v = (t.view(B, S, self.nh, self.hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.out_proj(attention(q, k, v, step, self.scale, bias=alibi))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.up_proj = nn.Linear(a.d_model, a.expansion_ratio * a.d_model, bias=False)
        self.down_proj = nn.Linear(a.expansion_ratio * a.d_model, a.d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(a.d_model, eps=a.layer_norm_epsilon, bias=False)
        self.attn = Attention(a, layer)
        self.norm_2 = nn.LayerNorm(a.d_model, eps=a.layer_norm_epsilon, bias=False)
        self.ffn = MLP(a)

    def forward(self, x, alibi, step, cache):
        x = x + self.attn(self.norm_1(x), alibi, step, cache)
        return x + self.ffn(self.norm_2(x))


class Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.wte = nn.Embedding(a.vocab_size, a.d_model)
        self.blocks = nn.ModuleList(Block(a, i) for i in range(a.n_layers))
        self.norm_f = nn.LayerNorm(a.d_model, eps=a.layer_norm_epsilon, bias=False)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.n_layers
        self.context_length = args.max_seq_len
        self.transformer = Body(args)
        self.register_buffer("slopes", alibi_slopes(args.n_heads, args.attn_config.get("alibi_bias_max", 8)),
                             persistent=False)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.d_model, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        t = self.transformer
        x = t.wte(input_ids)
        # MPT's bias: slope * (key index - the last new token's), the same for every query (the softmax
        # ignores a constant per row); relative, so left padding does not change it
        rel = (step.k_index - step.q_index[-1:]).float()
        alibi = (self.slopes.to(x.device)[None, :, None, None] * rel).to(x.dtype)  # [1, H, 1, T]
        for layer in t.blocks:
            x = layer(x, alibi, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = t.norm_f(x[:, -1:] if last_only else x)
        return F.linear(x, t.wte.weight) if self.lm_head is None else self.lm_head(x)
