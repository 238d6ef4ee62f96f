"""Llama 4 (Llama4ForCausalLM, the language model of Llama 4 Scout and Maverick; the
Llama4ForConditionalGeneration checkpoints run it through multimodal.py): the Llama layout with

* layers with and without positions: no_rope_layers[i] is 1 for a layer with the rotary (by
  default every 4th layer has none, no_rope_layer_interval); the rotary turns adjacent pairs
  (Meta's complex-number form: base.apply_rotary_interleaved, in float32 from float32 tables);
* on the rotary layers, an L2 norm (an RMSNorm without weight, in float32) of each query and key
  head after the rotary (use_qk_norm), and chunked attention (layer_types "chunked_attention"):
  a token attends only to the tokens of its own attention_chunk_size-long chunk of positions;
* on the layers without positions, attention temperature tuning (attn_temperature_tuning): the
  query of the token at position p is scaled by log1p(floor((p + 1) / floor_scale)) * attn_scale + 1;
* a feed-forward (`feed_forward`) that is, on the layers moe_layers lists (by default every
  interleave_moe_layer_step-th), an MoE block: a router (`router`, [experts, hidden], kept
  unquantized by the default recipe) picks the top num_experts_per_tok experts by logit and weighs
  each by the sigmoid of its logit, the weight multiplies the token BEFORE the expert (not its
  output), and a shared expert (`shared_expert`, a SwiGLU of intermediate_size) runs on every
  token; the experts are stored stacked (`experts.gate_up_proj` [E, hidden, 2*I], gate then up on
  the last axis, and `experts.down_proj` [E, I, hidden]), kept packed in a kbit model
  (layers.KbitStacked) with only the chosen experts' rows dequantized. The other layers have a
  dense SwiGLU of intermediate_size_mlp.

Positions here are each sequence's own (a left-padded prompt is computed as if unpadded), for the
chunks and for the temperature, as the runner's rotary does; transformers counts the padding in
both. As in moe.py, only the experts some token chose run, grouped on the host: cuda_graphs = False.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import llama
from .base import Float32Rotary, activation, apply_rotary_interleaved, attention, per_layer, positive
from .moe import run_experts

#: Llama4TextConfig's defaults (Llama 4 Maverick's sizes), for config.json files that omit a field
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
    num_attention_heads=40, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0)


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "llama4_text"
    intermediate_size_mlp: int = 16384
    num_local_experts: int = 16
    num_experts_per_tok: int = 1
    moe_layers: list[int] | None = None
    interleave_moe_layer_step: int = 1
    use_qk_norm: bool = True
    no_rope_layers: list[int] | None = None
    no_rope_layer_interval: int = 4
    attention_chunk_size: int | None = 8192
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        a = super().from_config({**_DEFAULTS, **cfg, "model_type": "llama4_text"})
        positive(a, "intermediate_size_mlp", "num_local_experts", "num_experts_per_tok", "interleave_moe_layer_step",
                 "no_rope_layer_interval", "floor_scale", arch="llama4_text")
        if a.num_experts_per_tok > a.num_local_experts:
            raise InputError(f"config.json: num_experts_per_tok ({a.num_experts_per_tok}) is more than the "
                             f"{a.num_local_experts} experts of this llama4 model")
        if a.attention_chunk_size is not None:
            positive(a, "attention_chunk_size", arch="llama4_text")
        n = a.num_hidden_layers
        # Llama4TextConfig's derived lists (an empty no_rope_layers counts as none, as there)
        if not a.no_rope_layers:
            a.no_rope_layers = [int((i + 1) % a.no_rope_layer_interval != 0) for i in range(n)]
        if a.moe_layers is None:
            a.moe_layers = list(range(a.interleave_moe_layer_step - 1, n, a.interleave_moe_layer_step))
        if a.layer_types is None:
            a.layer_types = ["chunked_attention" if rope and a.attention_chunk_size is not None else "full_attention"
                             for rope in a.no_rope_layers]
        per_layer(a, "no_rope_layers", "layer_types")
        if not all(isinstance(i, int) and 0 <= i for i in a.moe_layers):
            raise InputError(f"config.json: moe_layers must list layer numbers, got {a.moe_layers!r}")
        return a

    def window(self, layer: int) -> int | None:
        return None  # chunks, not windows (Attention.chunk)

    def chunk(self, layer: int) -> int | None:
        return self.attention_chunk_size if self.layer_types[layer] == "chunked_attention" else None  # type: ignore[index]


class Attention(llama.Attention):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.rope = bool(a.no_rope_layers[layer])  # type: ignore[index]
        self.l2_eps = a.rms_norm_eps if (a.use_qk_norm and self.rope) else None
        self.chunk = a.chunk(layer)
        self.tuning = (a.floor_scale, a.attn_scale) if a.attn_temperature_tuning and not self.rope else None

    def forward(self, x, cos, sin, step, cache):
        if not self.rope:
            cos = sin = None
        return super().forward(x, cos, sin, step, cache)

    def rotate(self, x, cos, sin):
        """The rotary in float32 (rounded to x's dtype), then the L2 norm of each head in float32."""
        x = apply_rotary_interleaved(x.float(), cos, sin).to(x.dtype)
        if self.l2_eps is None:
            return x
        f = x.float()
        return (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + self.l2_eps)).to(x.dtype)

    def attend(self, q, k, v, step):
        if self.tuning is not None:
            floor_scale, attn_scale = self.tuning
            p = step.positions.float()[:, None, :, None]  # [B, 1, S, 1]
            q = (q * (torch.log1p(torch.floor((p + 1.0) / floor_scale)) * attn_scale + 1.0)).to(q.dtype)
        return attention(q, k, v, step if self.chunk is None else step.chunked_mask(self.chunk), self.scale)


class Experts(nn.Module):
    """The stacked experts (plain parameters [E, in, out] or, in a packed kbit model,
    layers.KbitStacked: either gives expert e's matrix as `self.gate_up_proj[e]`)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        E, h, i = a.num_local_experts, a.hidden_size, a.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(E, i, h))
        self.num_experts, self.inter = E, i
        self.act = activation(a.hidden_act, a.model_type)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj[e]).split(self.inter, dim=-1)
        return (self.act(gate) * up) @ self.down_proj[e]

    def forward(self, x, chosen, weights):
        return run_experts([functools.partial(self.expert, e) for e in range(self.num_experts)], x, chosen, weights,
                           weigh_inputs=True)


class MoE(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k = a.num_experts_per_tok
        self.router = nn.Linear(a.hidden_size, a.num_local_experts, bias=False)
        self.experts = Experts(a)
        self.shared_expert = llama.MLP(a)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, chosen = torch.topk(self.router(x), self.top_k, dim=-1)
        weights = torch.sigmoid(top.float()).to(x.dtype)
        return (self.shared_expert(x) + self.experts(x, chosen, weights)).view(shape)


class Block(llama.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        del self.mlp
        self.feed_forward = (MoE(a) if layer in a.moe_layers  # type: ignore[operator]
                             else llama.MLP(dataclasses.replace(a, intermediate_size=a.intermediate_size_mlp)))

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return x + self.feed_forward(self.post_attention_layernorm(x))


class Model(llama.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.rotary = Float32Rotary.from_settings(args.rope, args.head_dim)
