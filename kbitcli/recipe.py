"""Which tensor gets which quantization: the default policy plus user rules.

Default: every 2-D floating-point `.weight` inside a numbered transformer block
(`...layers.7...`, `h.7.`, `blocks.7.`) is quantized with the base spec; embeddings,
the LM head, norms, biases and anything else keep their source dtype. A tied LM head is
stored once (the embedding). Mixture-of-experts routers keep their dtype too, as llama.cpp
keeps its ffn_gate_inp: Mixtral's `block_sparse_moe.gate.weight`, Qwen's `mlp.gate.weight`
and `mlp.shared_expert_gate.weight`, gpt-oss's `mlp.router.weight` (tiny, and they decide which
experts run; not to be confused with a gated MLP's `gate_proj`, which is quantized).
Experts stored stacked, one 3-D tensor per projection (gpt-oss's and Llama 4's
`experts.gate_up_proj` / `experts.down_proj` [experts, in, out], and `gate_proj` / `up_proj` stacked
the same way; Granite MoE's `block_sparse_moe.input_linear.weight` / `output_linear.weight`
[experts, out, in]), are quantized too; their biases are kept, and so is Granite MoE's router
`block_sparse_moe.router.layer.weight`.

Rules, in the order given, override the default; the LAST matching rule wins:
  --rule 'PATTERN=SPEC'   quantize matching tensors with SPEC ("6:fp", "8:int:b32", ...),
                          parsed on top of the base spec (even tensors the default keeps)
  --rule 'PATTERN=keep'   keep matching tensors unquantized
  --skip PATTERN          the same as --rule 'PATTERN=keep', and wins over every rule
Patterns are shell globs (fnmatch) over full tensor names: '*.mlp.down_proj.weight',
'model.layers.0.*', 'lm_head.weight'.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from kbitformat import KbitValueError, QuantSpec

from .errors import UsageError

_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
#: an MoE router: Mixtral's and Phi-3.5-MoE's block_sparse_moe.gate, Qwen-MoE's, OLMoE's, DeepSeek's, GLM-4.5's
#: and ERNIE 4.5's mlp.gate, Qwen2-MoE's mlp.shared_expert_gate, Hunyuan MoE's mlp.gate.wg, Granite MoE's
#: block_sparse_moe.router.layer
_ROUTER = re.compile(r"\.(gate|shared_expert_gate|router|gate\.wg|router\.layer)\.weight$")
#: an MoE layer's experts stacked in one tensor (gpt-oss, Llama 4: [experts, in, out]; Granite MoE:
#: [experts, out, in])
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)$"
                              r"|\.block_sparse_moe\.(input_linear|output_linear)\.weight$")


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: QuantSpec | None  # None = keep unquantized

    def text(self) -> str:
        return f"{self.pattern}={'keep' if self.spec is None else self.spec.label()}"


@dataclass
class Recipe:
    base: QuantSpec = field(default_factory=QuantSpec)
    rules: list[Rule] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, base: QuantSpec, rules: list[str] = (), skips: list[str] = ()) -> "Recipe":
        parsed = []
        for text in rules:
            if "=" not in text:
                raise UsageError(f"rule {text!r} must look like PATTERN=SPEC (e.g. '*.down_proj.weight=6:fp') or PATTERN=keep")
            pattern, spec = text.rsplit("=", 1)
            pattern, spec = pattern.strip(), spec.strip()
            if not pattern:
                raise UsageError(f"rule {text!r} has an empty pattern")
            if spec in ("keep", "skip", "none"):
                parsed.append(Rule(pattern, None))
                continue
            try:
                parsed.append(Rule(pattern, QuantSpec.parse(spec, base)))
            except KbitValueError as e:
                raise UsageError(f"rule {text!r}: {e}") from None
        return cls(base, parsed, [s.strip() for s in skips if s.strip()])

    @staticmethod
    def default_quantized(name: str, shape: tuple[int, ...], is_float: bool) -> bool:
        linear = len(shape) == 2 and name.endswith(".weight") and not _ROUTER.search(name)
        stacked = len(shape) == 3 and bool(_STACKED_EXPERTS.search(name))
        return (linear or stacked) and bool(_BLOCK.search(name)) and is_float and min(shape) > 1

    def spec_for(self, name: str, shape: tuple[int, ...], is_float: bool, dtype: str = "?") -> QuantSpec | None:
        """The spec for a tensor, or None to keep it as it is."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.skips):
            return None
        chosen = self.base if self.default_quantized(name, shape, is_float) else None
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                chosen = rule.spec
        if chosen is not None and not is_float:
            raise UsageError(f"{name}: a {dtype} tensor cannot be quantized; remove the rule that selects it")
        return chosen

    def unmatched(self, names: list[str]) -> list[str]:
        """Rule and skip patterns that match no tensor (worth a warning)."""
        pats = [r.pattern for r in self.rules] + self.skips
        return [p for p in pats if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    def to_dict(self) -> dict:
        return {"base": self.base.label(), "rules": [r.text() for r in self.rules], "skip": list(self.skips)}
