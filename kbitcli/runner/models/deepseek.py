"""DeepSeek-V2 (DeepseekV2ForCausalLM: V2, V2-Lite, V2.5, Coder-V2) and DeepSeek-V3
(DeepseekV3ForCausalLM: V3, R1, V3.1, and Kimi-K2, which uses the same class): the Llama layout
(llama.py: RMSNorm, SwiGLU, the final norm and head) with multi-head latent attention and
DeepSeekMoE.

Multi-head latent attention (MLA):
* queries straight from `q_proj` (q_lora_rank null: V2-Lite) or through a low rank:
  `q_a_proj` -> `q_a_layernorm` -> `q_b_proj`; each head's query is qk_nope_head_dim features
  without positions, then qk_rope_head_dim rotated ones;
* `kv_a_proj_with_mqa` gives a compressed kv (kv_lora_rank features, through `kv_a_layernorm`)
  and one rotated key shared by every head (qk_rope_head_dim); `kv_b_proj` expands the
  compressed kv to each head's key (qk_nope_head_dim) and value (v_head_dim);
* the rotary turns adjacent pairs (DeepSeek's interleaved layout: base.apply_rotary_interleaved;
  V3 with rope_interleave false: the two halves, base.apply_rotary); V2 rotates in float32 from
  float32 tables, as transformers' complex-number form does;
* the softmax scale is (qk_nope_head_dim + qk_rope_head_dim) ** -0.5, times YaRN's mscale
  (of mscale_all_dim) squared when rope_scaling has mscale_all_dim (the rotary's own factor on
  cos and sin is base.Rotary's);
* the q_a / kv_a norms have epsilon 1e-6 whatever rms_norm_eps says (transformers and DeepSeek's
  own code build them with the default).
The KV cache holds what MLA means it to hold: per position, the normalised compressed kv
(kv_lora_rank features) and the rotated shared key (qk_rope_head_dim), one "head" for all heads
(DeepSeek-V3: 576 numbers a position and layer, against 128 x (192 + 128) expanded). The prompt
pass without earlier positions attends as transformers does, through the expanded keys and values
(so its logits are transformers' bit for bit); a pass with cached positions absorbs kv_b_proj
into the query and the output instead (each head's query times its key block of kv_b_proj
attends over the compressed kv; the result times its value block is the head's output), the
same product in another order.
`q_proj` / `q_a_proj` and `kv_a_proj_with_mqa` read the same input and fuse into one layer.

DeepSeekMoE: the first `first_k_dense_replace` layers have a dense llama.MLP (intermediate_size),
then every `moe_layer_freq`-th layer an MoE block (as DeepSeek's code reads it; transformers'
classes ignore moe_layer_freq, 1 in every published config): `n_routed_experts` experts of
moe_intermediate_size (stored per expert, `mlp.experts.N.gate_proj/up_proj/down_proj`, run by
moe.run_experts: only the chosen ones) plus `n_shared_experts` shared experts as one MLP
(`mlp.shared_experts`) on every token. The router `mlp.gate` (weight, and V3's
e_score_correction_bias; kept unquantized by the default recipe, loaded and computed in float32)
scores the experts from the input in float32:
* V2: softmax; greedy top k, or group_limited_greedy (the best expert of each of n_group groups
  ranks the groups; the top k among the topk_group best groups); the weights are the
  probabilities times routed_scaling_factor;
* V3: sigmoid; the choice is by sigmoid + e_score_correction_bias, groups ranked by the sum of
  their two best; the weights are the plain sigmoids of the chosen experts, renormalised with
  norm_topk_prob, times routed_scaling_factor.
This is transformers' routing. DeepSeek's own code differs on options no published checkpoint
uses: V2 with norm_topk_prob renormalises instead of scaling (transformers ignores the flag), and
V3 renormalises only for k > 1.
Like moe.py's models, reading the expert counts on the host keeps these models out of CUDA graphs.

The multi-token-prediction layers that V3 checkpoints store after the last layer
(`model.layers.<num_hidden_layers>.*`) are ignored, as transformers ignores them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError

from . import llama, model_type_of
from .base import (Float32Rotary, KVCache, RMSNorm, _context_factor, _yarn_mscale, apply_rotary, apply_rotary_interleaved,
                   attention, fuse_group, positive)
from .moe import _mlp, run_experts

#: defaults of the transformers configuration classes, for config.json files that omit a field
#: (an explicit null q_lora_rank is V2-Lite's direct q_proj; an explicit null n_shared_experts: none)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"q_lora_rank": 1536, "n_routed_experts": 64, "n_shared_experts": 2, "moe_intermediate_size": 1407,
                    "max_position_embeddings": 2048},
    "deepseek_v3": {"q_lora_rank": 1536, "n_routed_experts": 256, "n_shared_experts": 1, "moe_intermediate_size": 2048,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
                    "norm_topk_prob": True, "routed_scaling_factor": 2.5, "max_position_embeddings": 4096},
}
_TOPK_METHODS = ("greedy", "group_limited_greedy")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "deepseek_v2"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    topk_method: str = "greedy"
    scoring_func: str | None = None
    n_group: int | None = None
    topk_group: int | None = None
    rope_interleave: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = model_type_of(cfg)  # Kimi-K2's model_type is kimi_k2, its class DeepSeek-V3's
        a = super().from_config({**_DEFAULTS[mt], **cfg, "model_type": mt})
        a.head_dim = a.qk_rope_head_dim  # the rotary's width (transformers sets head_dim so too)
        positive(a, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                 "num_experts_per_tok", "moe_intermediate_size", "moe_layer_freq", arch=mt)
        if a.q_lora_rank is not None:
            positive(a, "q_lora_rank", arch=mt)
        for name in ("first_k_dense_replace", "n_shared_experts"):
            v = getattr(a, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"config.json: {name} must be a non-negative integer for a {mt} model, got {v!r}")
        if a.qk_rope_head_dim % 2:
            raise InputError(f"config.json: qk_rope_head_dim must be even (rotated pairs), got {a.qk_rope_head_dim}")
        scoring = "softmax" if mt == "deepseek_v2" else "sigmoid"
        if a.scoring_func not in (None, scoring):
            raise InputError(f"config.json: scoring_func {a.scoring_func!r} is not {mt}'s ({scoring!r})")
        if mt == "deepseek_v2" and a.topk_method not in _TOPK_METHODS:
            raise InputError(f"config.json: topk_method {a.topk_method!r} is not supported for {mt} "
                             f"(supported: {', '.join(_TOPK_METHODS)})")
        check_routing(a, mt)
        return a

    @property
    def v3(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def grouped(self) -> bool:
        """Whether the router first keeps the topk_group best of n_group expert groups."""
        return self.v3 or self.topk_method == "group_limited_greedy"

    @property
    def scale(self) -> float:
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.rope["rope_type"] != "default" and self.rope.get("mscale_all_dim"):
            try:
                factor = _context_factor(self.rope)
            except (KeyError, TypeError, ZeroDivisionError):
                raise InputError("config.json: a RoPE scaling with mscale_all_dim needs its factor") from None
            scale *= _yarn_mscale(factor, self.rope["mscale_all_dim"]) ** 2
        return scale

    def window(self, layer: int) -> int | None:
        return None

    def sparse(self, layer: int) -> bool:
        """Whether the layer's feed-forward is the MoE block (else a dense llama.MLP)."""
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


def check_routing(a, mt: str) -> None:
    """InputError unless the router's settings (a: n_routed_experts, num_experts_per_tok, v3, grouped,
    n_group, topk_group) can choose num_experts_per_tok experts."""
    if a.num_experts_per_tok > a.n_routed_experts:
        raise InputError(f"config.json: num_experts_per_tok ({a.num_experts_per_tok}) is more than the "
                         f"{a.n_routed_experts} experts of this {mt} model")
    if a.grouped:
        positive(a, "n_group", "topk_group", arch=mt)
        size = a.n_routed_experts // a.n_group  # experts a group
        if (a.n_routed_experts % a.n_group or a.topk_group > a.n_group
                or size * a.topk_group < a.num_experts_per_tok):
            raise InputError(f"config.json: {a.n_routed_experts} experts in n_group {a.n_group} groups, of which "
                             f"topk_group {a.topk_group} are kept, cannot give num_experts_per_tok "
                             f"{a.num_experts_per_tok} experts")
        if a.v3 and size < 2:
            raise InputError(f"config.json: {mt} ranks each expert group by its two best experts; "
                             f"{a.n_routed_experts} experts in n_group {a.n_group} groups leave one a group")


class Attention(nn.Module):
    """Multi-head latent attention; the cache holds the compressed kv and the rotated key."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer, self.nh, self.scale = layer, a.num_attention_heads, a.scale
        self.nope, self.rope, self.vd, self.rank = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        qk = self.nh * (self.nope + self.rope)
        if a.q_lora_rank is None:
            self.q_proj = nn.Linear(a.hidden_size, qk, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
            self.q_first = "q_proj"
        else:
            self.q_a_proj = nn.Linear(a.hidden_size, a.q_lora_rank, bias=a.attention_bias)
            self.q_a_layernorm = RMSNorm(a.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(a.q_lora_rank, qk, bias=False)
            self.q_proj = None
            self.q_first = "q_a_proj"
        self.q_width = qk if a.q_lora_rank is None else a.q_lora_rank
        self.kv_a_proj_with_mqa = nn.Linear(a.hidden_size, self.rank + self.rope, bias=a.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, self.nh * (self.nope + self.vd), bias=False)
        self.o_proj = nn.Linear(self.nh * self.vd, a.hidden_size, bias=a.attention_bias)
        self.v3, self.interleave = a.v3, a.rope_interleave or not a.v3
        self.qkv_a_proj = None  # q_proj / q_a_proj and kv_a_proj_with_mqa as one layer, after fuse()

    def fuse(self) -> bool:
        return fuse_group(self, "qkv_a_proj", (self.q_first, "kv_a_proj_with_mqa"))

    def forward(self, x, cos, sin, step, cache: KVCache | None):
        B, S, _ = x.shape
        if self.qkv_a_proj is None:
            q, kv = getattr(self, self.q_first)(x), self.kv_a_proj_with_mqa(x)
        else:
            q, kv = self.qkv_a_proj(x).split((self.q_width, self.rank + self.rope), dim=-1)
        if self.q_b_proj is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q_nope, q_rot = q.view(B, S, self.nh, self.nope + self.rope).transpose(1, 2).split((self.nope, self.rope), -1)
        latent, k_rot = kv.split((self.rank, self.rope), dim=-1)
        q_rot, k_rot = self.rotate(q_rot, cos, sin), self.rotate(k_rot[:, None], cos, sin)  # k_rot: one head
        latent = self.kv_a_layernorm(latent)
        if cache is not None:
            # one cached "head" [B, 1, T, rank + rope]; the values are its first rank features (the
            # cache's value slot stays empty)
            cached, _ = cache.update(self.layer, torch.cat((latent[:, None], k_rot), dim=-1),
                                     latent.new_empty(B, 1, S, 0))
            if cache.static or cache.length:
                return self.o_proj(self.absorbed(q_nope, q_rot, cached, step))
        kv = self.kv_b_proj(latent).view(B, S, self.nh, self.nope + self.vd).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.vd), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, self.nh, S, self.rope)), dim=-1)
        return self.o_proj(attention(q, k, v, step, self.scale))

    def absorbed(self, q_nope, q_rot, cached, step):
        """Attention over the cached compressed kv [B, 1, T, rank + rope]: kv_b_proj's key block
        turns each head's query into the compressed space, its value block turns the attended
        compressed kv into the head's value (same scale: the scores are the same products)."""
        w = self.kv_b_proj.weight.view(self.nh, self.nope + self.vd, self.rank)
        w_k, w_v = w[:, :self.nope], w[:, self.nope:]
        q = torch.cat((torch.einsum("bhsn,hnr->bhsr", q_nope, w_k), q_rot), dim=-1)
        out = attention(q, cached, cached[..., :self.rank], step, self.scale)  # [B, S, heads * rank]
        B, S, _ = out.shape
        return torch.einsum("bshr,hvr->bshv", out.view(B, S, self.nh, self.rank), w_v).reshape(B, S, -1)

    def rotate(self, x, cos, sin):
        """The rotary of the rope features [B, heads, S, qk_rope_head_dim]."""
        if not self.interleave:
            return apply_rotary(x, cos, sin)
        if self.v3:
            return apply_rotary_interleaved(x, cos, sin)
        return apply_rotary_interleaved(x.float(), cos, sin).to(x.dtype)  # V2: in float32 (float32 tables)


class Router(nn.Module):
    """DeepSeek's `gate`: the expert scores of each token (weight [experts, hidden]; V3's
    e_score_correction_bias [experts]), in float32 -> (chosen [N, k], float32 weights [N, k])."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(a.n_routed_experts, a.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.empty(a.n_routed_experts)) if a.v3 else None
        self.top_k, self.scaling = a.num_experts_per_tok, float(a.routed_scaling_factor)
        self.groups, self.keep = (a.n_group, a.topk_group) if a.grouped else (None, None)
        # as transformers: V3 renormalises at any k, V2 never (DeepSeek's code: for k > 1 only, and V2
        # then without routed_scaling_factor; no published checkpoint sets norm_topk_prob with either)
        self.renormalise = bool(a.norm_topk_prob) and a.v3

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        if self.e_score_correction_bias is None:  # V2: softmax, chosen by the probabilities
            scores = choice = logits.softmax(dim=-1)
        else:  # V3: the biased sigmoid chooses, the plain sigmoid weighs
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
        if self.groups is not None:
            choice = self.limit_groups(choice)
        chosen = torch.topk(choice, self.top_k, dim=-1).indices
        # V2 weighs by its (group-masked) choice scores, as transformers does
        weights = (choice if self.e_score_correction_bias is None else scores).gather(1, chosen)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return chosen, weights * self.scaling

    def limit_groups(self, choice):
        """Only the experts of the `keep` best of the `groups` groups stay candidates: groups ranked
        by their best score (V2) or the sum of their two best (V3); the others get 0 (V2) or -inf (V3)."""
        g = choice.view(choice.shape[0], self.groups, -1)
        v3 = self.e_score_correction_bias is not None
        rank = g.topk(2, dim=-1).values.sum(dim=-1) if v3 else g.amax(dim=-1)
        kept = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, rank.topk(self.keep, dim=-1).indices, True)
        return g.masked_fill(~kept[..., None], float("-inf") if v3 else 0.0).flatten(1)


class MoE(nn.Module):
    """The router (`gate`), the routed experts and the shared experts (one MLP on every token)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.gate = Router(a)
        self.experts = nn.ModuleList(_mlp(a, a.moe_intermediate_size) for _ in range(a.n_routed_experts))
        self.shared_experts = _mlp(a, a.moe_intermediate_size * a.n_shared_experts) if a.n_shared_experts else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = run_experts(self.experts, x, *self.gate(x))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


class Block(llama.Block):
    attention_class = Attention

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        if a.sparse(layer):
            self.mlp = MoE(a)


class Model(llama.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
    #: the routers stay float32 in any compute dtype (transformers' _keep_in_fp32_modules_strict)
    float32_parameters = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        if not args.v3:
            self.rotary = Float32Rotary.from_settings(args.rope, args.head_dim)

    def checkpoint_name(self, name: str) -> str | None:
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.num_layers:  # V3's multi-token-prediction layers
            return None
        return super().checkpoint_name(name)
