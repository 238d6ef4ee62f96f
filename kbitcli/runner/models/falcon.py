"""Falcon (FalconForCausalLM): LayerNorms, a fused query_key_value, rotary embeddings over the whole
head or, with alibi (Falcon-RW), BLOOM's ALiBi slopes instead, a dense_h_to_4h -> gelu ->
dense_4h_to_h MLP, biases on every projection only with `bias`, tied embeddings by default. The
variants differ in the key/value heads and in the block:

* Falcon-7B: multi_query (one key/value head), parallel_attn: x + attn(ln x) + mlp(ln x) with
  the one input_layernorm;
* Falcon-40B/180B (new_decoder_architecture): num_kv_heads groups of query heads, always parallel,
  with separate ln_attn and ln_mlp (Falcon 2 11B: num_ln_in_parallel_attn 1, the one
  input_layernorm);
* Falcon-RW: every head its own key and value, sequential (input_layernorm, then
  post_attention_layernorm before the MLP), ALiBi.

query_key_value's rows are laid out per group of query heads sharing a key/value head: the
group's queries, then its key, then its value. Multi-query is one group of every head, plain
multi-head attention one group per head ([q_h, k_h, v_h], as BLOOM's), so one split serves the
three. Falcon's ALiBi is BLOOM's with the bias rounded to bfloat16 and divided by sqrt(head_dim), as
transformers' build_alibi_tensor and FalconModel compute it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from .base import (KVCache, Rotary, activation, apply_rotary, args_from_config, attention, positive, prepare_step,
                   rope_settings)
from .bloom import alibi_slopes

ALIASES = {"n_embed": "hidden_size"}


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    # FalconConfig's defaults
    num_kv_heads: int | None = None
    num_ln_in_parallel_attn: int | None = None
    layer_norm_epsilon: float = 1e-5
    alibi: bool = False
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    max_position_embeddings: int = 2048
    ffn_hidden_size: int | None = None
    activation: str = "gelu"
    tie_word_embeddings: bool = True
    rope: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, ALIASES, arch="falcon")
        a.ffn_hidden_size = a.ffn_hidden_size or 4 * a.hidden_size
        positive(a, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "ffn_hidden_size",
                 arch="falcon")
        if a.hidden_size % a.num_attention_heads:
            raise InputError(f"config.json: hidden_size ({a.hidden_size}) is not a multiple of num_attention_heads "
                             f"({a.num_attention_heads})")
        if a.new_decoder_architecture:
            a.num_kv_heads = a.num_kv_heads or a.num_attention_heads
            positive(a, "num_kv_heads", arch="falcon")
            if a.num_attention_heads % a.num_kv_heads:
                raise InputError(f"config.json: num_attention_heads ({a.num_attention_heads}) is not a multiple of "
                                 f"num_kv_heads ({a.num_kv_heads})")
        a.rope = rope_settings(cfg)
        return a

    @property
    def kv_heads(self) -> int:
        if self.new_decoder_architecture:
            return self.num_kv_heads
        return 1 if self.multi_query else self.num_attention_heads

    @property
    def two_norms(self) -> bool:
        """ln_attn and ln_mlp (the 40B layout; new_decoder_architecture defaults to two)."""
        return bool(self.new_decoder_architecture) and (self.num_ln_in_parallel_attn or 2) == 2

    @property
    def parallel(self) -> bool:
        return bool(self.parallel_attn or self.new_decoder_architecture)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.nkv = layer, a.num_attention_heads, a.kv_heads
        self.hd = a.hidden_size // self.nh
        self.query_key_value = nn.Linear(a.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=a.bias)
        self.dense = nn.Linear(a.hidden_size, a.hidden_size, bias=a.bias)

    def forward(self, x, cos, sin, alibi, step, cache: KVCache | None):
        B, S, _ = x.shape
        # per key/value group: its nh / nkv query heads, then its key, then its value
        qkv = self.query_key_value(x).view(B, S, self.nkv, self.nh // self.nkv + 2, self.hd)
        q = qkv[..., :-2, :].reshape(B, S, self.nh, self.hd).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        if cos is not None:  # None: ALiBi
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.dense(attention(q, k, v, step, self.hd ** -0.5, bias=alibi))


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(a.hidden_size, a.ffn_hidden_size, bias=a.bias)
        self.dense_4h_to_h = nn.Linear(a.ffn_hidden_size, a.hidden_size, bias=a.bias)
        self.act = activation(a.activation, "falcon")

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.two_norms, self.parallel = a.two_norms, a.parallel
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
            self.ln_mlp = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        else:
            self.input_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)
        self.self_attention = Attention(a, layer)
        self.mlp = MLP(a)

    def forward(self, x, cos, sin, alibi, step, cache):
        h = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        attn = self.self_attention(h, cos, sin, alibi, step, cache)
        if not self.parallel:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        return x + (self.mlp(self.ln_mlp(x) if self.two_norms else h) + attn)


class Body(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.h = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.ln_f = nn.LayerNorm(a.hidden_size, eps=a.layer_norm_epsilon)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.num_hidden_layers
        self.context_length = None if args.alibi else args.max_position_embeddings  # ALiBi: no learned limit
        self.transformer = Body(args)
        hd = args.hidden_size // args.num_attention_heads
        self.rotary = None if args.alibi else Rotary.from_settings(args.rope, hd)
        self.register_buffer("slopes", alibi_slopes(args.num_attention_heads) if args.alibi else None,
                             persistent=False)
        self.alibi_div = math.sqrt(hd)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.word_embeddings.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        return None if name.endswith("rotary_emb.inv_freq") else name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        t = self.transformer
        x = t.word_embeddings(input_ids)
        cos = sin = alibi = None
        if self.rotary is not None:
            cos, sin = self.rotary(step.positions, x.dtype)
        else:
            km = step.key_mask.long()
            key_pos = (km.cumsum(-1) - 1) * km                               # [B, T]
            # bfloat16 slopes times the integer positions: a bfloat16 product, as transformers computes it
            slopes = self.slopes.to(x.device).bfloat16()[None, :, None, None]
            alibi = (slopes * key_pos[:, None, None, :]).to(x.dtype) / self.alibi_div  # [B, H, 1, T]
        for layer in t.h:
            x = layer(x, cos, sin, alibi, step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        x = t.ln_f(x[:, -1:] if last_only else x)
        return F.linear(x, t.word_embeddings.weight) if self.lm_head is None else self.lm_head(x)
