"""Gemma, Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's own parts.

* RMSNorm in float32 with a (1 + weight) scale, cast back at the end;
* the embedding multiplied by sqrt(hidden_size) (rounded to the compute dtype), a tied head;
* a GELU (tanh) gated MLP; grouped-query attention scaled by query_pre_attn_scalar**-0.5
  (Gemma 2 and 3; head_dim**-0.5 for Gemma);
* Gemma 2 and 3: a norm after the attention and around the MLP (four per block), sliding-window
  attention on some layers (layer_types, or every other layer for Gemma 2 and five of every
  six for Gemma 3 when the config predates layer_types);
* Gemma 2: tanh soft-capping of the attention scores and of the final logits (SDPA has no
  soft-capping, so those layers compute attention explicitly);
* Gemma 3: an RMSNorm of each query and key head before the rotary, and a rotary of its own
  (rope_local_base_freq) on the sliding-window layers.

Gemma 3's multimodal checkpoints (Gemma3ForConditionalGeneration, the 4B-27B models) run as their
language model through multimodal.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from kbitcli.errors import InputError

from . import llama
from .base import Step, args_from_config, grouped_heads, positive, repeat_kv, rope_settings

#: defaults of transformers' configuration classes, for config.json files that omit a field
_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"query_pre_attn_scalar": None, "attn_logit_softcapping": None, "final_logit_softcapping": None,
              "sliding_window": None},
    "gemma2": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
               "sliding_window": 4096},
    "gemma3_text": {"query_pre_attn_scalar": 256, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                    "sliding_window": 4096},
}
_DEFAULTS["vaultgemma"] = _DEFAULTS["gemma2"]  # VaultGemmaConfig's are Gemma2Config's (vaultgemma.py)


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    model_type: str = "gemma"
    num_key_value_heads: int | None = None
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    use_bidirectional_attention: bool | None = None
    layer_types: list[str] | None = None
    # set from the raw config by from_config (null there means "off", absent means the default)
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    rope: dict[str, Any] = field(default_factory=dict)
    rope_local: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = str(cfg.get("model_type") or "gemma")
        # the configuration classes' key/value heads: GemmaConfig 16, the others 4
        cfg = {"num_key_value_heads": 16 if mt == "gemma" else 4, **cfg}
        a = args_from_config(cls, cfg, arch=mt)
        a.model_type = mt
        grouped_heads(a)
        positive(a, "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "head_dim", arch=mt)
        if a.use_bidirectional_attention:
            raise InputError("config.json: use_bidirectional_attention (an embedding model, not a causal LM) is "
                             "not supported by kbit's runner")
        for key, default in _DEFAULTS[mt].items():
            setattr(a, key, cfg.get(key, default))
        # Gemma: hidden_act ("gelu" in the first releases meant the tanh form); Gemma 2 and 3:
        # hidden_activation
        act = a.hidden_act if mt == "gemma" else (a.hidden_activation or "gelu_pytorch_tanh")
        a.hidden_act = "gelu_pytorch_tanh" if act == "gelu" else act
        if a.layer_types is None:
            every = {"gemma2": 2, "vaultgemma": 2, "gemma3_text": int(cfg.get("sliding_window_pattern") or 6)}.get(mt)
            a.layer_types = ["sliding_attention" if every and (i + 1) % every else "full_attention"
                             for i in range(a.num_hidden_layers)]
        if mt == "gemma3_text":
            full, local = _gemma3_rope(cfg)
            a.rope, a.rope_local = rope_settings(full), rope_settings(local)
        else:
            a.rope = rope_settings(cfg)
        return a

    @property
    def scale(self) -> float:
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim) ** -0.5

    # what llama.Attention reads
    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    o_bias = qkv_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "gemma3_text"

    @property
    def four_norms(self) -> bool:
        return self.model_type != "gemma"

    def window(self, layer: int) -> int | None:
        sliding = self.layer_types is not None and layer < len(self.layer_types) and \
            self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None


def _gemma3_rope(cfg: Mapping[str, Any]) -> tuple[dict, dict]:
    """Gemma 3's two RoPE settings as configs rope_settings reads: the full-attention layers'
    (rope_theta, default 1e6, and rope_scaling) and the sliding layers' (rope_local_base_freq,
    default 1e4); transformers 5 writes them as rope_parameters per layer type."""
    mp = cfg.get("max_position_embeddings")
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and any(isinstance(v, Mapping) for v in rp.values()):
        full = dict(rp.get("full_attention") or {})
        local = dict(rp.get("sliding_attention") or {})
    else:
        full = dict(rp or cfg.get("rope_scaling") or {})
        local = {"rope_theta": cfg.get("rope_local_base_freq", 1e4)}
        full.setdefault("rope_theta", cfg.get("rope_theta", 1e6))
    full.setdefault("rope_theta", 1e6)
    local.setdefault("rope_theta", 1e4)
    return ({"rope_parameters": full, "max_position_embeddings": mp},
            {"rope_parameters": local, "max_position_embeddings": mp})


class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight), all in float32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Step | torch.Tensor,
                         scale: float, cap: float, window: int | None = None) -> torch.Tensor:
    """attention() with Gemma 2's soft-capping of the scores (cap * tanh(scores / cap)) before
    the mask and a float32 softmax, computed explicitly. q [B,H,S,D], k/v [B,Hkv,T,D] -> [B,S,H*D]."""
    B, H, S, D = q.shape
    if k.shape[1] != H:
        k, v = repeat_kv(k, H), repeat_kv(v, H)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    scores = torch.tanh(scores / cap) * cap
    allowed = mask.mask(window) if isinstance(mask, Step) else mask
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).reshape(B, S, H * D)


class Attention(llama.Attention):
    """Llama's attention with Gemma's norm class; Gemma 2's soft-capped scores."""

    norm = GemmaRMSNorm

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.cap = a.attn_logit_softcapping

    def attend(self, q, k, v, step):
        if self.cap:
            return softcapped_attention(q, k, v, step, self.scale, self.cap, window=self.window)
        return super().attend(q, k, v, step)


class Block(llama.Block):
    attention_class = Attention
    norm_class = GemmaRMSNorm

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.four = a.four_norms
        if self.four:
            self.pre_feedforward_layernorm = GemmaRMSNorm(a.hidden_size, a.rms_norm_eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, x, cos, sin, step, cache):
        if not self.four:  # Gemma: the Llama block
            return super().forward(x, cos, sin, step, cache)
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, step, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Model(llama.Model):
    """Llama's model with Gemma's blocks and norm, the scaled embedding, soft-capped logits
    (Gemma 2) and Gemma 3's local rotary on the sliding layers."""

    block_class = Block
    norm_class = GemmaRMSNorm

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.embed_scale = math.sqrt(args.hidden_size)
        self._scales: dict[torch.dtype, float] = {}

    def _embed_scale(self, dtype: torch.dtype) -> float:
        """sqrt(hidden_size) rounded to `dtype`, as transformers multiplies by it (a Python
        float: no tensor to make or copy in a decode step)."""
        got = self._scales.get(dtype)
        if got is None:
            got = self._scales[dtype] = torch.tensor(self.embed_scale, dtype=torch.float32).to(dtype).item()
        return got

    def embed(self, input_ids):
        x = super().embed(input_ids)
        # transformers multiplies by the scale as a tensor of the embedding's dtype
        return x * self._embed_scale(x.dtype)

    def logits(self, x):
        logits = super().logits(x)
        cap = self.args.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits
