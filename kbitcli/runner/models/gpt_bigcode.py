"""GPTBigCode (GPTBigCodeForCausalLM: StarCoder 1, SantaCoder): GPT-2's model (gpt2.py) with
nn.Linear layers instead of Conv1D, a gelu_pytorch_tanh MLP and, with multi_query (the default),
multi-query attention: one key head and one value head shared by every query head, c_attn's rows
all queries, then the key, then the value. Without multi_query c_attn is laid out per head
([q_h, k_h, v_h] for each head h, as GPT-NeoX's query_key_value).

attention_softmax_in_fp32 and scale_attention_softmax_in_fp32 change nothing: transformers 5 no
longer reads them (its softmax is in float32 in every case, as scaled_dot_product_attention's)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from . import gpt2
from .base import KVCache, attention


@dataclass
class ModelArgs(gpt2.ModelArgs):
    # GPTBigCodeConfig's defaults
    n_positions: int = 1024
    activation_function: str = "gelu_pytorch_tanh"
    multi_query: bool = True
    arch: ClassVar[str] = "gpt_bigcode"


class Attention(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.hd = layer, a.n_head, a.n_embd // a.n_head
        self.multi_query = bool(a.multi_query)
        self.scale = (self.hd ** -0.5) if a.scale_attn_weights else 1.0
        self.c_attn = nn.Linear(a.n_embd, a.n_embd + 2 * (self.hd if self.multi_query else a.n_embd))
        self.c_proj = nn.Linear(a.n_embd, a.n_embd)

    def forward(self, x, step, cache: KVCache | None):
        B, S, E = x.shape
        qkv = self.c_attn(x)
        if self.multi_query:
            q, k, v = qkv.split((E, self.hd, self.hd), dim=-1)
            q, k, v = (t.view(B, S, -1, self.hd).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = qkv.view(B, S, self.nh, 3 * self.hd).transpose(1, 2).chunk(3, dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.c_proj(attention(q, k, v, step, self.scale))


class Block(gpt2.Block):
    attention_class = Attention
    mlp_class = gpt2.LinearMLP


class Model(gpt2.Model):
    block_class = Block
