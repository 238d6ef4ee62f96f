"""Mixtral, Qwen2-MoE and Qwen3-MoE (mixture-of-experts): the Llama layout (Qwen3-MoE's attention
is Qwen3's, with q_norm / k_norm) whose feed-forward is a sparse MoE block.

* a router (`gate`, a linear layer [experts, hidden], kept unquantized by the default recipe)
  scores every token; the softmax of its logits in float32 picks the `num_experts_per_tok`
  best experts, whose weights are renormalised to sum to 1 (always for Mixtral, with
  `norm_topk_prob` for Qwen);
* each expert is a SwiGLU MLP stored per expert as 2-D tensors (Mixtral:
  `block_sparse_moe.experts.N.w1/w3/w2` = gate/up/down; Qwen: `mlp.experts.N.gate_proj/up_proj/
  down_proj`), so the loader packs each projection as a KbitLinear and fuse() joins an expert's
  gate and up as in llama.MLP;
* Qwen2-MoE adds a shared expert on every token, scaled by sigmoid(shared_expert_gate(x));
* Qwen: the layers in `mlp_only_layers`, or off every `decoder_sparse_step`-th, have a dense
  llama.MLP of `intermediate_size` (the experts' width is `moe_intermediate_size`).

olmoe.py (OLMoE) and phimoe.py (Phi-3.5-MoE) are entries here (_DEFAULTS, _ALL_SPARSE,
_MIXTRAL_NAMES) with their own attention / norms / router in their modules.

Only the experts that some token chose are computed (a decode step of one sequence reads k
experts' weights). Grouping the tokens by expert reads the expert counts on the host once per
MoE layer, which a CUDA graph cannot capture: these models set `cuda_graphs = False`, so
generate() decodes them without graphs (dynamic on a GPU by default; `--decode graph` is refused).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from kbitcli.errors import InputError

from . import llama
from .base import activation, fuse_group, positive

#: defaults of the transformers configuration classes, for config.json files that omit a field
#: (rope_theta: under rope_parameters when given there)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"num_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6, "rms_norm_eps": 1e-5},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "max_window_layers": 28},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "olmoe": {"num_experts": 64, "num_experts_per_tok": 8, "rms_norm_eps": 1e-5},
    "phimoe": {"num_experts": 16, "num_experts_per_tok": 2, "num_key_value_heads": 8, "rope_theta": 1e6,
               "rms_norm_eps": 1e-5},
}
#: the model_types whose every layer is the MoE block, its experts of intermediate_size (olmoe.py, phimoe.py)
_ALL_SPARSE = ("mixtral", "olmoe", "phimoe")
#: the model_types that store the block as block_sparse_moe, its experts as w1 / w3 / w2 (phimoe.py)
_MIXTRAL_NAMES = ("mixtral", "phimoe")


@dataclass
class ModelArgs(llama.ModelArgs):
    model_type: str = "mixtral"
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    # a field here, not llama's property: Qwen2-MoE's config has its own qkv_bias (set by from_config)
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        mt = str(cfg.get("model_type") or "mixtral")
        cfg = dict(cfg)
        if "num_local_experts" in cfg:  # Mixtral's name (transformers also writes it for Qwen3-MoE)
            cfg.setdefault("num_experts", cfg["num_local_experts"])
        a = super().from_config({**_DEFAULTS[mt], **cfg, "model_type": mt})
        a.qkv_bias = bool(cfg.get("qkv_bias", True)) if mt == "qwen2_moe" else bool(a.attention_bias)
        if mt in _ALL_SPARSE:
            a.moe_intermediate_size = a.intermediate_size  # the experts are the only MLPs
        positive(a, "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", arch=mt)
        if mt == "qwen2_moe":
            positive(a, "shared_expert_intermediate_size", arch=mt)
        if a.num_experts_per_tok > a.num_experts:
            raise InputError(f"config.json: num_experts_per_tok ({a.num_experts_per_tok}) is more than the "
                             f"{a.num_experts} experts of this {mt} model")
        if not isinstance(a.mlp_only_layers, list) or not all(isinstance(i, int) for i in a.mlp_only_layers):
            raise InputError(f"config.json: mlp_only_layers must list layer numbers, got {a.mlp_only_layers!r}")
        return a

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3_moe"

    def window(self, layer: int) -> int | None:
        if self.model_type == "mixtral":
            return self.sliding_window  # every layer (MixtralConfig: none by default)
        if not self.use_sliding_window:
            return None  # the Qwen configurations drop sliding_window unless use_sliding_window
        if self.model_type == "qwen3_moe":
            return self.sliding_window  # every layer
        if self.layer_types is not None and layer < len(self.layer_types):
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        # Qwen2MoeConfig's layer_types when config.json has none: every other layer below max_window_layers
        return self.sliding_window if layer % 2 == 0 and layer < (self.max_window_layers or 0) else None

    def sparse(self, layer: int) -> bool:
        """Whether the layer's feed-forward is the MoE block (else a dense llama.MLP)."""
        if self.model_type in _ALL_SPARSE:
            return True
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def _mlp(a: ModelArgs, width: int) -> llama.MLP:
    """llama.MLP of another intermediate width (a Qwen expert, the shared expert)."""
    return llama.MLP(dataclasses.replace(a, intermediate_size=width))


class MixtralExpert(nn.Module):
    """llama.MLP's SwiGLU under Mixtral's checkpoint names: w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.w3 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.act = activation(a.hidden_act, a.model_type)
        self.inter = a.intermediate_size
        self.gate_up_proj = None  # w1 and w3 as one layer, after fuse()

    def fuse(self) -> bool:
        return fuse_group(self, "gate_up_proj", ("w1", "w3"))

    def forward(self, x):
        if self.gate_up_proj is None:
            return self.w2(self.act(self.w1(x)) * self.w3(x))
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.w2(self.act(gate) * up)


def run_experts(experts: nn.ModuleList, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor,
                weigh_inputs: bool = False) -> torch.Tensor:
    """The routed experts' output for tokens x [N, hidden] that chose the experts `chosen` [N, k]
    with `weights` [N, k]: each chosen expert runs once over the tokens that chose it, and the
    weighted outputs are summed in expert order (as transformers does); with weigh_inputs the
    weight multiplies the token before the expert instead (Llama 4). The (token, choice) pairs
    are grouped by expert with one read of the counts on the host."""
    top_k = chosen.shape[-1]
    flat = chosen.flatten()
    order = torch.argsort(flat, stable=True)
    tokens, weights = order // top_k, weights.flatten()[order]
    out = torch.zeros_like(x)
    start = 0
    for expert, n in zip(experts, torch.bincount(flat, minlength=len(experts)).tolist()):
        if n:
            idx = tokens[start:start + n]
            w = weights[start:start + n, None]
            y = expert(x[idx] * w) if weigh_inputs else expert(x[idx]) * w
            out.index_add_(0, idx, y.to(x.dtype))
            start += n
    return out


class SparseMoe(nn.Module):
    """The router (`gate`), the experts and, for Qwen2-MoE, the shared expert."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.top_k = a.num_experts_per_tok
        self.mixtral = a.model_type == "mixtral"
        self.renormalise = self.mixtral or a.norm_topk_prob
        self.gate = nn.Linear(a.hidden_size, a.num_experts, bias=False)
        self.experts = nn.ModuleList(MixtralExpert(a) if self.mixtral else _mlp(a, a.moe_intermediate_size)
                                     for _ in range(a.num_experts))
        if a.model_type == "qwen2_moe":
            self.shared_expert = _mlp(a, a.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(a.hidden_size, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [N, k]
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.mixtral:  # Qwen rounds the weights to the compute dtype; Mixtral keeps them in float32
            weights = weights.to(x.dtype)
        out = run_experts(self.experts, x, chosen, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(shape)


class Block(llama.Block):
    """llama.Block whose feed-forward is a SparseMoe: Mixtral's block_sparse_moe, Qwen's mlp (a
    dense llama.MLP on Qwen's layers that are not sparse)."""

    #: the class of the MoE block (a variant's module gives its own)
    moe_class: type[nn.Module] = SparseMoe

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__(a, layer)
        self.ffn = "block_sparse_moe" if a.model_type in _MIXTRAL_NAMES else "mlp"  # the checkpoint's name
        if a.sparse(layer):
            del self.mlp
            setattr(self, self.ffn, self.moe_class(a))

    def forward(self, x, cos, sin, step, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
        return x + getattr(self, self.ffn)(self.post_attention_layernorm(x))


class Model(llama.Model):
    block_class = Block
    #: the expert grouping reads device values on the host: no CUDA graph capture (generate.py)
    cuda_graphs = False
