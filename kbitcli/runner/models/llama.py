"""Llama 2/3, Mistral, Qwen2, Qwen3 and SmolLM2 (the Llama family): RMSNorm, rotary
embeddings (default, linear, llama3, yarn, dynamic), grouped-query attention, SwiGLU, optional
tied embeddings; Qwen2 adds q/k/v biases, Qwen3 an RMSNorm of each query and key head
before the rotary (q_norm, k_norm), Mistral (and Qwen2/Qwen3 when enabled) a sliding
window."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .base import (KVCache, RMSNorm, Rotary, activation, apply_rotary, args_from_config, attention, fuse_group,
                   grouped_heads, positive, prepare_step, rope_settings)


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    model_type: str = "llama"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool = False
    max_window_layers: int | None = None
    layer_types: list[str] | None = None
    rope: dict[str, Any] = field(default_factory=dict)
    #: the sliding-window layers' own RoPE settings, when they differ (OLMo 3)
    rope_local: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = args_from_config(cls, cfg, arch=str(cfg.get("model_type") or "llama"))
        grouped_heads(a)
        positive(a, "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", arch=a.model_type)
        # Qwen3's configuration class defaults head_dim to 128, not hidden_size / heads
        a.head_dim = a.head_dim or (128 if a.model_type == "qwen3" else a.hidden_size // a.num_attention_heads)
        if a.max_window_layers is None and a.model_type in ("qwen2", "qwen3"):
            a.max_window_layers = 28  # their configuration classes' default
        a.rope = rope_settings(cfg)
        return a

    # per-architecture details
    @property
    def qkv_bias(self) -> bool:
        return True if self.model_type == "qwen2" else bool(self.attention_bias)

    @property
    def o_bias(self) -> bool:
        return False if self.model_type == "qwen2" else bool(self.attention_bias)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        if self.model_type in ("qwen2", "qwen3") and not self.use_sliding_window:
            return None  # their configurations drop sliding_window unless use_sliding_window
        if self.layer_types is not None and layer < len(self.layer_types):
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        if self.model_type == "mistral":
            return self.sliding_window
        if self.model_type in ("qwen2", "qwen3") and self.sliding_window:
            return self.sliding_window if layer >= (self.max_window_layers or 0) else None
        return None


class Attention(nn.Module):
    """Grouped-query attention with rotary embeddings. `a` gives the sizes, qkv_bias, o_bias,
    qk_norm (an RMSNorm of each query and key head before the rotary, of class `norm`), scale
    and window(layer); other modules' arguments (Gemma's) provide the same."""

    norm = RMSNorm

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.scale = a.scale
        self.window = a.window(layer)
        self.q_proj = nn.Linear(a.hidden_size, self.nh * self.hd, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, self.nkv * self.hd, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, a.hidden_size, bias=a.o_bias)
        # Qwen3: an RMSNorm over each head's query and key, before the rotary
        self.q_norm = self.norm(self.hd, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = self.norm(self.hd, a.rms_norm_eps) if a.qk_norm else None
        self.qkv_proj = None  # q_proj, k_proj and v_proj as one layer, after fuse()

    def fuse(self) -> bool:
        """Replace q_proj, k_proj and v_proj by one qkv_proj when they can be fused."""
        return fuse_group(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"))

    def forward(self, x, cos, sin, step, cache: KVCache | None):
        B, S, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.norm_qk(q.view(B, S, self.nh, self.hd), k.view(B, S, self.nkv, self.hd))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, S, self.nkv, self.hd).transpose(1, 2)
        q, k = self.position(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.output(self.attend(q, k, v, step))

    def project(self, x):
        """The queries, keys and values of x [B, S, hidden] (Persimmon: from its per-head fused layer)."""
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split((self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd), dim=-1)

    def norm_qk(self, q, k):
        """The q/k norms of each head ([B, S, heads, head_dim]), when the model has them."""
        return (q, k) if self.q_norm is None else (self.q_norm(q), self.k_norm(k))

    def position(self, q, k, cos, sin):
        """The rotary of the queries and keys [B, heads, S, head_dim] (HunYuan: then its q/k norms)."""
        if cos is None:  # a layer without positions (SmolLM3's NoPE layers)
            return q, k
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def rotate(self, x, cos, sin):
        """The rotary of the queries or keys [B, heads, S, head_dim] (Cohere: its interleaved form)."""
        return apply_rotary(x, cos, sin)

    def output(self, x):
        return self.o_proj(x)

    def attend(self, q, k, v, step):
        return attention(q, k, v, step, self.scale, window=self.window)


class MLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)
        self.act = activation(a.hidden_act, a.model_type)
        self.inter = a.intermediate_size
        self.gate_up_proj = None  # gate_proj and up_proj as one layer, after fuse()

    def fuse(self) -> bool:
        """Replace gate_proj and up_proj by one gate_up_proj when they can be fused."""
        return fuse_group(self, "gate_up_proj", ("gate_proj", "up_proj"))

    def forward(self, x):
        if self.gate_up_proj is None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(self.act(gate) * up)


class Block(nn.Module):
    #: the classes of the sublayers and of the two norms, built (hidden_size, rms_norm_eps) (a
    #: variant's module gives its own)
    attention_class: type[nn.Module] = Attention
    mlp_class: type[nn.Module] = MLP
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = self.attention_class(a, layer)
        self.mlp = self.mlp_class(a)
        self.input_layernorm = self.norm_class(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = self.norm_class(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, a: ModelArgs, block: type[nn.Module] = Block, norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(block(a, i) for i in range(a.num_hidden_layers))
        self.norm = norm(a.hidden_size, a.rms_norm_eps)


class Model(nn.Module):
    #: the classes of a layer and of the final norm (a variant's module gives its own)
    block_class: type[nn.Module] = Block
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.num_layers = args.num_hidden_layers
        self.context_length = args.max_position_embeddings
        self.model = Body(args, self.block_class, self.norm_class)
        self.rotary = Rotary.from_settings(args.rope, args.head_dim)
        self.rotary_local = Rotary.from_settings(args.rope_local, args.head_dim) if args.rope_local else None
        #: the layers that take rotary_local: those with a window
        self.local_layers = frozenset(i for i in range(args.num_hidden_layers)
                                      if self.rotary_local is not None and args.window(i) is not None)
        self.tied = bool(args.tie_word_embeddings)
        self.lm_head = None if self.tied else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    #: checkpoint name of the tied head -> the tensor it shares
    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.tied else {}

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        return name

    def forward(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                last_only: bool = False):
        step = prepare_step(input_ids, attention_mask, positions, cache)
        x = self.embed(input_ids)
        cos, sin = self.rotary(step.positions, x.dtype)
        local = self.rotary_local(step.positions, x.dtype) if self.rotary_local is not None else None
        for i, layer in enumerate(self.model.layers):
            x = layer(x, *(local if i in self.local_layers else (cos, sin)), step, cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        return self.logits(self.model.norm(x[:, -1:] if last_only else x))

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def logits(self, x):
        return F.linear(x, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)
