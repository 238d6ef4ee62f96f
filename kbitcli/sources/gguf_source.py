"""GGUF files (llama.cpp), read with the `gguf` package and turned back into Hugging Face form.

* Tensors are dequantized one at a time (gguf.quants.dequantize handles every ggml type) and
  renamed to Hugging Face names. GGUF lists dimensions in ggml order (innermost first); the
  numpy array the reader gives is already in row-major Hugging Face order, and every shape is
  checked against what the architecture expects.
* llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) so that rotary
  pairs sit next to each other; `load` and `load_raw` undo it.
* It adds 1 to every Gemma norm weight (Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the
  weight); `load` and `load_raw` subtract it again (those tensors read as float32).
* config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  generation_config.json are rebuilt from the GGUF metadata.

Supported architectures: see SUPPORTED_ARCHITECTURES (llama, qwen2, qwen3: only llama's attn_q /
attn_k are permuted by llama.cpp, and those of the llama-derived granite and smollm3; qwen3 adds
attn_q_norm / attn_k_norm; gemma, gemma2, gemma3: norms shifted by 1, Gemma 2 and 3 with four
norms per block, Gemma 3 with q/k norms; phi3: the fused attn_qkv and gate/up ffn_up, LongRoPE
factors as the tensors rope_factors_long / _short; granite: its four multipliers as metadata;
olmo2: norms after the sublayers, q/k norms over all heads; starcoder2: LayerNorms with biases,
output_norm.bias included, and the c_fc / c_proj MLP as ffn_up / ffn_down).
Mixtures of experts: Mixtral (arch "llama" with {arch}.expert_count), qwen2moe (with a shared
expert) and qwen3moe. llama.cpp stacks the experts of a layer into one 3-D tensor per projection
(ffn_gate_exps / ffn_up_exps / ffn_down_exps, [expert, rows, columns]); each expert is listed as
its own 2-D tensor under its Hugging Face name, a view of its slice of the file (one expert is
read at a time).
Settings llama.cpp does not store but fixes per architecture (Gemma's attention scale, which
layers slide, Gemma 3's local RoPE base, SmolLM3's NoPE layers, whether Qwen-MoE renormalises
the routing weights) are rebuilt as llama.cpp's llama-model.cpp sets them.
The LayerNorm and GPT-2-like families are read under their checkpoints' names (model.layers.<i>,
transformer.h.<i>, gpt_neox.layers.<i> ...), with what llama.cpp's converter rearranged undone:
* command-r (Cohere) and cohere2: llama's tensors, LayerNorms without bias, the rotary llama.cpp runs
  on adjacent pairs as Cohere does (nothing permuted), tied; Command R+'s attn_q_norm /
  attn_k_norm are [heads, head_dim] as in the checkpoint; Cohere 2's sliding layers from
  attention.sliding_window_pattern (three of every four without it);
* phi2: q/k/v (or the fused attn_qkv of older files, split back into q/k/v rows), the dense /
  fc1 / fc2 names, the head's bias; stablelm: LayerNorms with biases, the per-head q/k norms
  llama.cpp stacks into one [heads, head_dim] tensor listed again as q_layernorm.norms.<h>, a
  parallel block when the layers have no ffn_norm;
* falcon, bloom, gptneox: the converter regroups query_key_value's rows (Falcon: per group of
  query heads sharing a key/value head; BLOOM, GPT-NeoX: per head) into all queries, all keys,
  all values; `load` and `load_raw` restore the checkpoint's order. Falcon-40B's two norms are
  attn_norm_2 (ln_attn) and attn_norm (ln_mlp);
* starcoder (GPTBigCode) with its single key/value head, gpt2: c_attn as stored; llama.cpp
  transposes GPT-2's Conv1D weights, which are transposed back (listed as float32 when quantized).
Their converters store no RoPE base for phi2, stablelm and gptneox (llama.cpp's 10000 is used),
and what llama.cpp's graphs decide from the tensors (StableLM's parallel block, Falcon's layout,
Command R+'s q/k norms) is decided here the same way.
Supported tokenizers: byte-level BPE (tokenizer.ggml.model = "gpt2") and SentencePiece BPE ("llama").
"""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from kbitcli.errors import InputError, UnsupportedArchitectureError
from kbitcli.sources._base import BaseSource, SourceTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen2moe",
                           "qwen3moe", "granite", "olmo2", "smollm3", "starcoder2", "command-r", "cohere2", "phi2",
                           "stablelm", "falcon", "starcoder", "gpt2", "bloom", "gptneox")
#: GGUF architecture ("mixtral": "llama" with experts) -> (Hugging Face model_type, class)
_HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
            "qwen3": ("qwen3", "Qwen3ForCausalLM"), "gemma": ("gemma", "GemmaForCausalLM"),
            "gemma2": ("gemma2", "Gemma2ForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
            "phi3": ("phi3", "Phi3ForCausalLM"), "mixtral": ("mixtral", "MixtralForCausalLM"),
            "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"), "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
            "granite": ("granite", "GraniteForCausalLM"), "olmo2": ("olmo2", "Olmo2ForCausalLM"),
            "smollm3": ("smollm3", "SmolLM3ForCausalLM"), "starcoder2": ("starcoder2", "Starcoder2ForCausalLM"),
            "command-r": ("cohere", "CohereForCausalLM"), "cohere2": ("cohere2", "Cohere2ForCausalLM"),
            "phi2": ("phi", "PhiForCausalLM"), "stablelm": ("stablelm", "StableLmForCausalLM"),
            "falcon": ("falcon", "FalconForCausalLM"), "falcon-40b": ("falcon", "FalconForCausalLM"),
            "starcoder": ("gpt_bigcode", "GPTBigCodeForCausalLM"), "gpt2": ("gpt2", "GPT2LMHeadModel"),
            "bloom": ("bloom", "BloomForCausalLM"), "gptneox": ("gpt_neox", "GPTNeoXForCausalLM")}
#: llama.cpp's converter permutes the attn_q / attn_k rows of LlamaModel and its subclasses
#: (LlamaModel.permute; Mixtral is "llama"), not of the others
_PERMUTED_QK = ("llama", "mixtral", "granite", "smollm3")
MOE_ARCHITECTURES = ("mixtral", "qwen2moe", "qwen3moe")
#: GemmaModel / Gemma2Model / Gemma3Model add 1 to every tensor whose name ends in norm.weight
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

#: the tensors outside the blocks, without .weight / .bias (output_norm.bias: LayerNorms)
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_GLOBALS = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
                 "output": "lm_head"}
_FALCON_GLOBALS = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f", "output": "lm_head"}
_ARCH_GLOBAL_NAMES = {"phi2": {**_GLOBAL_NAMES, "output_norm": "model.final_layernorm"},
                      "starcoder": _GPT2_GLOBALS, "gpt2": _GPT2_GLOBALS, "falcon": _FALCON_GLOBALS,
                      "falcon-40b": _FALCON_GLOBALS,
                      "bloom": {**_FALCON_GLOBALS, "token_embd_norm": "transformer.word_embeddings_layernorm"},
                      "gptneox": {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
                                  "output": "embed_out"}}
#: where the blocks are, when not model.layers; these layouts name every block tensor in
#: _ARCH_BLOCK_NAMES (no fallback to the llama names of _BLOCK_NAMES)
_LAYER_PREFIX = {"starcoder": "transformer.h", "gpt2": "transformer.h", "falcon": "transformer.h",
                 "falcon-40b": "transformer.h", "bloom": "transformer.h", "gptneox": "gpt_neox.layers"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # qwen3, gemma3
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 2 and 3: a norm after the attention and one on each side of the MLP (ffn_norm is the one
# before it); Phi-3: q, k, v rows in one tensor, and gate then up rows in ffn_up.
_GEMMA2_NAMES = {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
_GPT2_NAMES = {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
               "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}
_FALCON_NAMES = {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
                 "attn_output": "self_attention.dense", "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
# Mixture of experts: the router, and Qwen2-MoE's shared expert and its gate.
_QWEN_MOE_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
                   "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                   "ffn_down_shexp": "mlp.shared_expert.down_proj"}
_ARCH_BLOCK_NAMES = {"gemma2": _GEMMA2_NAMES, "gemma3": _GEMMA2_NAMES,
                     "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
                     "mixtral": {"ffn_gate_inp": "block_sparse_moe.gate"},
                     "qwen2moe": _QWEN_MOE_NAMES, "qwen3moe": _QWEN_MOE_NAMES,
                     "olmo2": {"post_attention_norm": "post_attention_layernorm",
                               "post_ffw_norm": "post_feedforward_layernorm"},
                     "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                     "phi2": {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
                     "starcoder": _GPT2_NAMES, "gpt2": _GPT2_NAMES, "falcon": _FALCON_NAMES,
                     # llama.cpp's Falcon-40B graph: attn_norm_2 before the attention, attn_norm before the MLP
                     "falcon-40b": {**_FALCON_NAMES, "attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"},
                     "bloom": {**_FALCON_NAMES, "ffn_norm": "post_attention_layernorm"},
                     "gptneox": {"attn_norm": "input_layernorm", "attn_qkv": "attention.query_key_value",
                                 "attn_output": "attention.dense", "ffn_norm": "post_attention_layernorm",
                                 "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}}
#: GGUF tensors listed as several Hugging Face tensors, each a block of their rows (None: one row,
#: as a vector): older phi2 files' fused attn_qkv (q, k, v rows), StableLM's per-head q/k norms
#: (llama.cpp stacks them, StableLMModel._stack_qk_norm)
_SPLIT = {"phi2": {"attn_qkv": lambda hp: [("self_attn.q_proj", hp["n_head"] * hp["head_dim"]),
                                           ("self_attn.k_proj", hp["n_head_kv"] * hp["head_dim"]),
                                           ("self_attn.v_proj", hp["n_head_kv"] * hp["head_dim"])]},
          "stablelm": {"attn_q_norm": lambda hp: [(f"self_attn.q_layernorm.norms.{h}", None)
                                                  for h in range(hp["n_head"])],
                       "attn_k_norm": lambda hp: [(f"self_attn.k_layernorm.norms.{h}", None)
                                                  for h in range(hp["n_head_kv"])]}}
#: the converter regroups these query_key_value rows (weight and bias) as all queries, all keys, all
#: values (FalconModel / BloomModel / GPTNeoXModel.modify_tensors)
_GROUPED_QKV = ("falcon", "falcon-40b", "bloom", "gptneox")
#: GPT-2's Conv1D weights, which GPT2Model.modify_tensors transposes to [out, in]
_TRANSPOSED = {"gpt2": ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}
#: the families whose rotary may cover part of each head (rope.dimension_count)
_PARTIAL_ROTARY = ("phi3", "phi2", "stablelm", "gptneox")
#: the stacked experts: GGUF name -> Hugging Face name of expert {}
_QWEN_EXPERTS = {"ffn_gate_exps": "mlp.experts.{}.gate_proj", "ffn_up_exps": "mlp.experts.{}.up_proj",
                 "ffn_down_exps": "mlp.experts.{}.down_proj"}
_EXPERT_NAMES = {"mixtral": {"ffn_gate_exps": "block_sparse_moe.experts.{}.w1",
                             "ffn_down_exps": "block_sparse_moe.experts.{}.w2",
                             "ffn_up_exps": "block_sparse_moe.experts.{}.w3"},
                 "qwen2moe": _QWEN_EXPERTS, "qwen3moe": _QWEN_EXPERTS}
_LAYER_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_ATTENTION_WEIGHTS = _LAYER_WEIGHTS[:4]
_FALCON_LAYER_WEIGHTS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                         "mlp.dense_4h_to_h")
_GPT2_LAYER_WEIGHTS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: the weights every layer must have, where not llama's (_LAYER_WEIGHTS) or the experts'
_ARCH_LAYER_WEIGHTS = {"phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
                       "starcoder2": _ATTENTION_WEIGHTS + ("mlp.c_fc", "mlp.c_proj"),
                       "phi2": _LAYER_WEIGHTS[:3] + ("self_attn.dense", "mlp.fc1", "mlp.fc2"),
                       "falcon": _FALCON_LAYER_WEIGHTS, "falcon-40b": _FALCON_LAYER_WEIGHTS,
                       "bloom": _FALCON_LAYER_WEIGHTS, "starcoder": _GPT2_LAYER_WEIGHTS, "gpt2": _GPT2_LAYER_WEIGHTS,
                       "gptneox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                   "mlp.dense_4h_to_h")}
#: Phi-3's LongRoPE factors (Phi3MiniModel.generate_extra_tensors): config values, not weights
_ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
# GGUF tensors with no Hugging Face counterpart: skipped, with a warning.
_SKIPPED = {
    "rope_freqs.weight": "rope_freqs.weight (llama.cpp's precomputed Llama-3 RoPE scaling) was skipped; "
    "the rebuilt config has no rope_scaling for it",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")

_FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_INT_TYPES = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (1e-05, not
    9.999999747378752e-06): what the original config.json said."""
    return float(str(np.float32(v)))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute for attn_q (n_head) / attn_k (n_head_kv), weight or bias.

    llama.cpp: w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise InputError(f"cannot un-permute a tensor with {rows} rows for {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=4)
def checkpoint_qkv_rows(rows: int, n_head: int, n_kv: int) -> np.ndarray:
    """Undo the regrouping of query_key_value llama.cpp's converter does for Falcon, BLOOM and
    GPT-NeoX: for each row of the checkpoint's tensor, the GGUF row that holds it.

    The checkpoint's rows go per group of query heads sharing a key/value head: the group's
    n_head / n_kv queries, its key, its value (n_kv = n_head: q, k, v of each head in turn); the
    GGUF's are all queries, all keys, all values."""
    hd = rows // (n_head + 2 * n_kv)
    q = np.arange(n_head * hd).reshape(n_kv, n_head // n_kv, hd)
    k = n_head * hd + np.arange(n_kv * hd).reshape(n_kv, 1, hd)
    return np.concatenate([q, k, k + n_kv * hd], axis=1).ravel()


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face -> GGUF); the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor name of layout `arch`, or None if there is none."""
    base, _, kind = gguf_name.rpartition(".")
    glob = _ARCH_GLOBAL_NAMES.get(arch, _GLOBAL_NAMES).get(base)
    if glob and kind in ("weight", "bias"):
        return f"{glob}.{kind}"
    m = _BLOCK_RE.match(gguf_name)
    names = _ARCH_BLOCK_NAMES.get(arch, {})
    part = m and (names.get(m.group(2)) or (None if arch in _LAYER_PREFIX else _BLOCK_NAMES.get(m.group(2))))
    return f"{_LAYER_PREFIX.get(arch, 'model.layers')}.{m.group(1)}.{part}.{m.group(3)}" if part else None


class GGUFSource(BaseSource):
    kind = "gguf"

    def __init__(self, path: Path) -> None:
        super().__init__(path, None)
        try:
            import gguf
        except ImportError:  # pragma: no cover - a dependency
            raise InputError("reading GGUF files needs the 'gguf' package (run scripts/setup.sh)") from None
        self._gguf = gguf
        try:
            self.reader = gguf.GGUFReader(path, "r")
        except (ValueError, IndexError, OSError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a valid GGUF file, or it is truncated ({e})") from None
        r = self.reader
        # The reader keeps several numpy objects per metadata string (~1.5 KB per token of the
        # vocabulary): copy the metadata out as plain Python values and let those go.
        self._metadata: dict[str, Any] = {}
        self._bad_meta: dict[str, str] = {}
        for key, field in r.fields.items():
            try:
                self._metadata[key] = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
                self._bad_meta[key] = str(e)
        r.fields.clear()
        self.arch = self._meta_str("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{path}: GGUF architecture {self.arch!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        if int(self.meta("split.count", 1) or 1) > 1:
            raise InputError(
                f"{path} is one part of a split GGUF ({self.meta('split.count')} parts); merge the parts "
                "first with llama.cpp's `llama-gguf-split --merge`"
            )
        experts = int(self.meta(f"{self.arch}.expert_count", 0) or 0)
        #: the layout: the GGUF architecture, or "mixtral" for a "llama" one with experts
        self.layout = "mixtral" if self.arch == "llama" and experts else self.arch
        if self.arch == "falcon" and any(t.name == "blk.0.attn_norm_2.weight" for t in r.tensors):
            self.layout = "falcon-40b"  # a norm for the attention and one for the MLP
        if experts and self.layout not in MOE_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{path} is a mixture-of-experts {self.arch} model ({self.arch}.expert_count = {experts}); "
                "the supported mixtures of experts are Mixtral (llama), qwen2moe and qwen3moe"
            )
        self.hparams = self._hparams()
        self._by_name: dict[str, tuple[Any, np.ndarray]] = {}  # name -> (GGUF tensor, its data)
        self._permute: dict[str, int] = {}
        self._grouped: set[str] = set()  # query_key_value rows to put back in the checkpoint's order
        self._transposed: set[str] = set()
        self._shifted: set[str] = set()
        self._as_float32: set[str] = set()  # listed as float32: values computed from the file's
        self._rope_factors: dict[str, list[float]] = {}
        hp = self.hparams
        for t in r.tensors:
            if t.name in _ROPE_FACTORS and self.arch == "phi3":
                factors = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
                self._rope_factors[_ROPE_FACTORS[t.name]] = [_f32(v) for v in factors]
                continue
            ttype = t.tensor_type.name
            dtype = _FLOAT_TYPES.get(ttype) or _INT_TYPES.get(ttype) or ttype
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            m = _BLOCK_RE.match(t.name)
            expert = _EXPERT_NAMES.get(self.layout, {}).get(m.group(2)) if m else None
            if expert:  # [expert, rows, columns]: each expert a 2-D view of its slice of the file
                if len(shape) != 3 or shape[0] != hp["n_expert"]:
                    raise InputError(f"{path}: GGUF tensor {t.name!r} has shape {list(shape)}, not the "
                                     f"{hp['n_expert']} stacked experts the metadata implies")
                for e in range(shape[0]):
                    self._add(t, f"model.layers.{m.group(1)}.{expert.format(e)}.{m.group(3)}", shape[1:], dtype,
                              int(t.n_bytes) // shape[0], t.data[e])
                continue
            split = _SPLIT.get(self.layout, {}).get(m.group(2)) if m else None
            if split:
                self._add_rows(t, m, split(hp), shape, dtype)
                continue
            name = hf_name(t.name, self.layout)
            if name is None:
                if t.name in _SKIPPED:
                    self.warnings.append(_SKIPPED[t.name])
                    continue
                raise InputError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face {self.layout} counterpart")
            nbytes = int(t.n_bytes)
            if self.arch in GEMMA_ARCHITECTURES and name.endswith("norm.weight"):
                self._shifted.add(name)
                self._as_float32.add(name)
                dtype, nbytes = "float32", 4 * int(np.prod(shape))  # the shifted values, computed in float32
            if name.endswith("shared_expert_gate.weight") and shape == (hp["n_embd"],):
                shape = (1, hp["n_embd"])  # llama.cpp stores Qwen2-MoE's [1, hidden] gate as a vector
            if self.layout in _PERMUTED_QK and ".attn_q." in t.name:
                self._permute[name] = hp["n_head"]
            elif self.layout in _PERMUTED_QK and ".attn_k." in t.name:
                self._permute[name] = hp["n_head_kv"]
            if self.layout in _GROUPED_QKV and ".attn_qkv." in t.name:
                self._grouped.add(name)
            transposed = m is not None and m.group(3) == "weight" and m.group(2) in _TRANSPOSED.get(self.layout, ())
            self._add(t, name, shape, dtype, nbytes, t.data, transposed)
        if _ARCH_GLOBAL_NAMES.get(self.layout, _GLOBAL_NAMES)["token_embd"] + ".weight" not in self._infos:
            raise InputError(f"{path}: the GGUF has no token_embd.weight")
        if len(self._rope_factors) == 1:
            raise InputError(f"{path}: the GGUF has only one of rope_factors_long / rope_factors_short")
        required = self._layer_weights()
        prefix = _LAYER_PREFIX.get(self.layout, "model.layers")
        for i in range(hp["n_layer"]):
            for part in required:
                if f"{prefix}.{i}.{part}.weight" not in self._infos:
                    raise InputError(f"{path}: the GGUF lacks the weight for {prefix}.{i}.{part}")

    def _add(self, t: Any, name: str, shape: tuple[int, ...], dtype: str, nbytes: int, data: np.ndarray,
             transposed: bool = False) -> None:
        """List the tensor `name`, read from `data` (the GGUF tensor t's data, or a slice of it);
        `transposed`: the file holds its transpose, [out, in] (GPT-2's Conv1D weights)."""
        want = self._expected_shape(name)  # for a Conv1D weight: as nn.Linear's, the file's
        if want is not None and shape != want:
            raise InputError(f"{self.path}: GGUF tensor {t.name!r} ({name}) has shape {list(shape)} but the "
                             f"metadata implies {list(want)}")
        if transposed:
            self._transposed.add(name)
            shape = shape[::-1]
            if dtype not in _FLOAT_TYPES.values():  # quantized blocks cannot be transposed: float32 values
                dtype, nbytes = "float32", 4 * int(np.prod(shape))
                self._as_float32.add(name)
        if name in self._infos:
            raise InputError(f"{self.path}: tensor {t.name!r} appears twice")
        self._infos[name] = SourceTensor(name, shape, dtype, nbytes)
        self._by_name[name] = (t, data)

    def _add_rows(self, t: Any, m: re.Match, parts: list[tuple[str, int | None]], shape: tuple[int, ...],
                  dtype: str) -> None:
        """List the GGUF tensor t (of block m) as the Hugging Face tensors `parts`, (name, rows) in
        order, each a view of its rows (rows None: one row, as a vector)."""
        rows = [1 if n is None else n for _, n in parts]
        if not shape or shape[0] != sum(rows):
            raise InputError(f"{self.path}: GGUF tensor {t.name!r} has shape {list(shape)}, not the {sum(rows)} "
                             "rows the metadata implies")
        row_bytes = int(t.n_bytes) // shape[0]
        start = 0
        for (part, n), k in zip(parts, rows):
            name = f"{_LAYER_PREFIX.get(self.layout, 'model.layers')}.{m.group(1)}.{part}.{m.group(3)}"
            if n is None:
                self._add(t, name, shape[1:], dtype, row_bytes, t.data[start])
            else:
                self._add(t, name, (k, *shape[1:]), dtype, k * row_bytes, t.data[start:start + k])
            start += k

    def _layer_weights(self) -> tuple[str, ...]:
        """The weights every layer must have (without ".weight")."""
        if self.layout in _ARCH_LAYER_WEIGHTS:
            return _ARCH_LAYER_WEIGHTS[self.layout]
        if self.layout not in MOE_ARCHITECTURES:
            return _LAYER_WEIGHTS
        names = _ARCH_BLOCK_NAMES[self.layout]
        shared = tuple(v for k, v in names.items() if k.endswith("shexp")) if self.layout == "qwen2moe" else ()
        n = self.hparams["n_expert"]
        experts = tuple(name.format(e) for name in _EXPERT_NAMES[self.layout].values() for e in range(n))
        return _ATTENTION_WEIGHTS + (names["ffn_gate_inp"],) + shared + experts

    # -- metadata -------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value as a Python value (str, int, float, bool, list), or default."""
        if key in self._bad_meta:
            raise InputError(f"{self.path}: GGUF metadata {key!r} is unreadable ({self._bad_meta[key]})")
        return self._metadata.get(key, default)

    def _meta_str(self, key: str) -> str:
        v = self.meta(key)
        if not isinstance(v, str):
            raise InputError(f"{self.path}: the GGUF lacks the metadata {key!r}")
        return v

    def _hparams(self) -> dict[str, Any]:
        a = self.arch

        def need(key: str) -> Any:
            v = self.meta(f"{a}.{key}")
            if v is None:
                raise InputError(f"{self.path}: the GGUF lacks the metadata '{a}.{key}'")
            return v

        n_embd = int(need("embedding_length"))
        n_head = int(need("attention.head_count"))
        n_head_kv = self.meta(f"{a}.attention.head_count_kv", n_head)
        if isinstance(n_head_kv, list):  # per-layer list in some files
            if len(set(n_head_kv)) != 1:
                raise InputError(f"{self.path}: a different number of KV heads per layer is not supported")
            n_head_kv = n_head_kv[0]
        head_dim = int(self.meta(f"{a}.attention.key_length", n_embd // n_head))
        embd = next((t for t in self.reader.tensors if t.name == "token_embd.weight"), None)
        n_vocab = self.meta(f"{a}.vocab_size")
        if n_vocab is None:
            toks = self.meta("tokenizer.ggml.tokens")
            n_vocab = len(toks) if toks else (int(embd.shape[1]) if embd is not None else None)
        if n_vocab is None:
            raise InputError(f"{self.path}: cannot tell the vocabulary size")
        hp = {
            "n_embd": n_embd,
            "n_head": n_head,
            "n_head_kv": int(n_head_kv),
            "head_dim": head_dim,
            "n_layer": int(need("block_count")),
            "n_ff": int(need("feed_forward_length")),
            "n_vocab": int(n_vocab),
            "n_ctx": int(self.meta(f"{a}.context_length", 2048)),
            "rms_eps": _f32(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "norm_eps": _f32(self.meta(f"{a}.attention.layer_norm_epsilon", 1e-5)),  # LayerNorms
            "rope_theta": _f32(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_dims": self.meta(f"{a}.rope.dimension_count"),
        }
        if self.layout in MOE_ARCHITECTURES:
            hp["n_expert"] = int(need("expert_count"))
            hp["n_expert_used"] = int(need("expert_used_count"))
            # Mixtral's experts are n_ff wide; Qwen's as llama.cpp reads them (n_ff / k without the key)
            hp["n_ff_exp"] = hp["n_ff"] if self.layout == "mixtral" else int(
                self.meta(f"{a}.expert_feed_forward_length", 0) or hp["n_ff"] // hp["n_expert_used"])
            hp["n_ff_shexp"] = int(self.meta(f"{a}.expert_shared_feed_forward_length", 0) or hp["n_ff"])
        if self.layout in _GROUPED_QKV and (hp["n_head_kv"] < 1 or hp["n_head"] % hp["n_head_kv"]):
            raise InputError(f"{self.path}: {hp['n_head']} attention heads are not groups of {hp['n_head_kv']} "
                             "key/value heads")
        if a == "cohere2" and not self.meta(f"{a}.attention.sliding_window"):  # llama.cpp requires it
            raise InputError(f"{self.path}: the GGUF lacks the metadata '{a}.attention.sliding_window'")
        if a == "starcoder" and hp["n_head_kv"] != 1:  # llama.cpp reads c_attn as all queries, one key, one value
            raise InputError(f"{self.path}: a starcoder GGUF with {hp['n_head_kv']} key/value heads: llama.cpp runs "
                             "GPTBigCode only with multi-query attention (one key/value head)")
        if a == "bloom" and hp["n_ff"] != 4 * n_embd:  # BloomConfig has no feed-forward size of its own
            raise InputError(f"{self.path}: a bloom GGUF with a feed-forward of {hp['n_ff']}, not 4 x {n_embd}")
        if hp["rope_dims"] is not None and int(hp["rope_dims"]) != head_dim and a not in _PARTIAL_ROTARY:
            raise InputError(
                f"{self.path}: partial rotary embeddings ({a}.rope.dimension_count = {hp['rope_dims']}, "
                f"head size {head_dim}) are not supported for {a}"
            )
        return hp

    def _expected_shape(self, name: str) -> tuple[int, ...] | None:
        hp = self.hparams
        e, v, f = hp["n_embd"], hp["n_vocab"], hp["n_ff"]
        q, kv = hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
        glob = {"token_embd": (v, e), "output": (v, e), "position_embd": (hp["n_ctx"], e)}
        for gguf_base, base in _ARCH_GLOBAL_NAMES.get(self.layout, _GLOBAL_NAMES).items():
            if name.rpartition(".")[0] == base:  # norms: (e,); a bias: the first dimension
                shape = glob.get(gguf_base, (e,))
                return shape if name.endswith(".weight") else shape[:1]
        suffix = re.sub(r"(experts|norms)\.\d+\.", r"\1.E.", name.split(".", 3)[-1])
        if self.arch == "olmo2" and suffix in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            return (q,) if suffix.startswith("self_attn.q") else (kv,)  # over all heads of a token
        if self.arch == "command-r" and suffix in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            return (hp["n_head"] if suffix.startswith("self_attn.q") else hp["n_head_kv"], hp["head_dim"])
        if self.layout in MOE_ARCHITECTURES:
            n, fe, fs = hp["n_expert"], hp["n_ff_exp"], hp["n_ff_shexp"]
            moe = {"block_sparse_moe.gate.weight": (n, e), "mlp.gate.weight": (n, e),
                   "block_sparse_moe.experts.E.w1.weight": (fe, e), "block_sparse_moe.experts.E.w3.weight": (fe, e),
                   "block_sparse_moe.experts.E.w2.weight": (e, fe), "mlp.experts.E.gate_proj.weight": (fe, e),
                   "mlp.experts.E.up_proj.weight": (fe, e), "mlp.experts.E.down_proj.weight": (e, fe),
                   "mlp.shared_expert.gate_proj.weight": (fs, e), "mlp.shared_expert.up_proj.weight": (fs, e),
                   "mlp.shared_expert.down_proj.weight": (e, fs), "mlp.shared_expert_gate.weight": (1, e)}
            if suffix in moe:
                return moe[suffix]
        return {
            "self_attn.q_proj.weight": (q, e),
            "self_attn.k_proj.weight": (kv, e),
            "self_attn.v_proj.weight": (kv, e),
            "self_attn.o_proj.weight": (e, q),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.bias": (e,),
            "self_attn.qkv_proj.weight": (q + 2 * kv, e),
            "mlp.gate_up_proj.weight": (2 * f, e),
            "mlp.gate_proj.weight": (f, e),
            "mlp.up_proj.weight": (f, e),
            "mlp.down_proj.weight": (e, f),
            "mlp.c_fc.weight": (f, e),
            "mlp.c_proj.weight": (e, f),
            "mlp.c_fc.bias": (f,),
            "mlp.c_proj.bias": (e,),
            "input_layernorm.bias": (e,),
            "post_attention_layernorm.bias": (e,),
            "input_layernorm.weight": (e,),
            "post_attention_layernorm.weight": (e,),
            "pre_feedforward_layernorm.weight": (e,),
            "post_feedforward_layernorm.weight": (e,),
            "self_attn.q_norm.weight": (hp["head_dim"],),
            "self_attn.k_norm.weight": (hp["head_dim"],),
            "self_attn.q_layernorm.norms.E.weight": (hp["head_dim"],),
            "self_attn.k_layernorm.norms.E.weight": (hp["head_dim"],),
            "self_attn.dense.weight": (e, q),
            "self_attn.dense.bias": (e,),
            "mlp.fc1.weight": (f, e),
            "mlp.fc1.bias": (f,),
            "mlp.fc2.weight": (e, f),
            "mlp.fc2.bias": (e,),
            # the GPT-2-like families' fused q, k, v rows and their output projection
            "attn.c_attn.weight": (q + 2 * kv, e),
            "attn.c_attn.bias": (q + 2 * kv,),
            "attn.c_proj.weight": (e, q),
            "attn.c_proj.bias": (e,),
            "self_attention.query_key_value.weight": (q + 2 * kv, e),
            "self_attention.query_key_value.bias": (q + 2 * kv,),
            "attention.query_key_value.weight": (q + 2 * kv, e),
            "attention.query_key_value.bias": (q + 2 * kv,),
            "self_attention.dense.weight": (e, q),
            "self_attention.dense.bias": (e,),
            "attention.dense.weight": (e, q),
            "attention.dense.bias": (e,),
            "mlp.dense_h_to_4h.weight": (f, e),
            "mlp.dense_h_to_4h.bias": (f,),
            "mlp.dense_4h_to_h.weight": (e, f),
            "mlp.dense_4h_to_h.bias": (e,),
            **{f"{n}.{k}": (e,) for n in ("ln_1", "ln_2", "ln_attn", "ln_mlp") for k in ("weight", "bias")},
        }.get(suffix)

    # -- data -----------------------------------------------------------------------------
    def _load_float(self, info: SourceTensor) -> np.ndarray:
        t, data = self._tensor(info)
        transposed = info.name in self._transposed
        out = np.empty(info.shape[::-1] if transposed else info.shape, dtype=np.float32)  # as the file holds it
        # Dequantize a few MB of rows at a time: dequantize's temporaries stay small, and the
        # peak is about the output tensor itself.
        rows = out.reshape(-1, out.shape[-1]) if out.ndim > 1 else out.reshape(1, -1)
        src = data.reshape(rows.shape[0], -1)
        step = max(1, (4 << 20) // max(1, rows.shape[1] * 4))
        try:
            for i in range(0, rows.shape[0], step):
                rows[i : i + step] = self._gguf.quants.dequantize(src[i : i + step], t.tensor_type)
        except NotImplementedError:
            raise InputError(
                f"{self.path}: tensor {info.name!r} is stored as {t.tensor_type.name}, which the installed "
                "gguf package cannot dequantize"
            ) from None
        w = out.T if transposed else out
        n = self._permute.get(info.name)
        if n is not None:
            w = unpermute_qk(w, n)
        if info.name in self._grouped:
            w = w[self._qkv_rows(w.shape[0])]
        if info.name in self._shifted:
            w -= np.float32(1.0)
        return np.ascontiguousarray(w)

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        if info.name in self._as_float32:  # Gemma's norms less llama.cpp's 1, quantized transposed weights
            return self._load_float(info)
        _, data = self._tensor(info)
        data = np.array(data)  # copy out of the memory map
        transposed = info.name in self._transposed  # float values: transposed back below
        shape = info.shape[::-1] if transposed else info.shape  # as the file holds it
        if info.dtype == "bfloat16":
            data = data.view(np.uint16).reshape(shape)
        elif len(shape) == 2:  # rows of values or of quantized blocks (a [1, n] gate stored as a vector)
            data = data.reshape(shape[0], -1)
        n = self._permute.get(info.name)
        if n is not None:  # reorder whole rows: values, bfloat16 bits or rows of quantized blocks alike
            data = unpermute_qk(data.reshape(shape[0], -1), n).reshape(data.shape)
        if info.name in self._grouped:
            data = data[self._qkv_rows(data.shape[0])]
        return np.ascontiguousarray(data.T) if transposed else data

    def _qkv_rows(self, rows: int) -> np.ndarray:
        return checkpoint_qkv_rows(rows, self.hparams["n_head"], self.hparams["n_head_kv"])

    # -- side files -----------------------------------------------------------------------
    def config(self) -> dict:
        hp = self.hparams
        a = self.arch
        model_type, cls = _HF_ARCH[self.layout]
        head = _ARCH_GLOBAL_NAMES.get(self.layout, _GLOBAL_NAMES)["output"]
        cfg: dict[str, Any] = {"architectures": [cls], "model_type": model_type, "vocab_size": hp["n_vocab"],
                               "tie_word_embeddings": f"{head}.weight" not in self._infos, "torch_dtype": "float32"}
        for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            v = self.meta(f"tokenizer.ggml.{gkey}")
            if v is not None:
                cfg[key] = int(v)
        if self.layout in _LAYER_PREFIX:  # the GPT-2-like families, in their own keys
            cfg.update(self._gpt_config())
            return cfg
        cfg.update({
            "hidden_size": hp["n_embd"],
            "intermediate_size": hp["n_ff"],
            "num_hidden_layers": hp["n_layer"],
            "num_attention_heads": hp["n_head"],
            "num_key_value_heads": hp["n_head_kv"],
            "head_dim": hp["head_dim"],
            "hidden_act": "silu",
            "rms_norm_eps": hp["rms_eps"],
            "rope_theta": hp["rope_theta"],
            "max_position_embeddings": hp["n_ctx"],
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._infos,
            "mlp_bias": False,
        })
        scaling = self.meta(f"{a}.rope.scaling.type")
        factor = self.meta(f"{a}.rope.scaling.factor")
        if scaling and scaling != "none" and factor:
            rs: dict[str, Any] = {"type": scaling, "rope_type": scaling, "factor": float(factor)}
            orig = self.meta(f"{a}.rope.scaling.original_context_length")
            if orig:
                rs["original_max_position_embeddings"] = int(orig)
            cfg["rope_scaling"] = rs
        if a in GEMMA_ARCHITECTURES:
            cfg.update(self._gemma_config())
        elif a == "phi3":
            cfg.update(self._phi3_config())
        elif self.layout in MOE_ARCHITECTURES:
            cfg.update(self._moe_config(cfg["attention_bias"]))
        elif a == "granite":
            # the multipliers llama.cpp stores as scales; without a key, llama.cpp scales by 1 and the
            # attention by 1/sqrt(head_dim)
            cfg.update(embedding_multiplier=_f32(self.meta(f"{a}.embedding_scale", 1.0)),
                       residual_multiplier=_f32(self.meta(f"{a}.residual_scale", 1.0)),
                       attention_multiplier=_f32(self.meta(f"{a}.attention.scale", 0.0)) or hp["head_dim"] ** -0.5,
                       logits_scaling=_f32(self.meta(f"{a}.logit_scale", 1.0)))
        elif a == "starcoder2":  # LayerNorms; llama.cpp attends over the whole context (no window)
            cfg.update(hidden_act="gelu_pytorch_tanh", use_bias=cfg["attention_bias"], sliding_window=None,
                       norm_epsilon=_f32(self.meta(f"{a}.attention.layer_norm_epsilon", 1e-5)))
        elif a in ("command-r", "cohere2", "phi2", "stablelm"):  # LayerNorms
            del cfg["rms_norm_eps"]
            cfg.update(self._cohere_config() if a in ("command-r", "cohere2") else self._stablelm_config())
        elif a == "smollm3":  # llama.cpp: no rotary on every 4th layer (n_no_rope_layer_step), no window
            cfg.update(no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(hp["n_layer"])],
                       use_sliding_window=False)
        return cfg

    def _cohere_config(self) -> dict[str, Any]:
        """Cohere's LayerNorm epsilon and logit scale (llama.cpp scales by 1 without one), Command R+'s
        q/k norms, and Cohere 2's window, on the layers attention.sliding_window_pattern marks (a
        list, or every n-th layer full) or, llama.cpp's default, on three of every four."""
        a, hp = self.arch, self.hparams
        cfg: dict[str, Any] = {"layer_norm_eps": hp["norm_eps"],
                               "logit_scale": _f32(self.meta(f"{a}.logit_scale", 0.0)) or 1.0}
        if a == "command-r":
            cfg["use_qk_norm"] = "model.layers.0.self_attn.q_norm.weight" in self._infos
            return cfg
        pattern = self.meta(f"{a}.attention.sliding_window_pattern", 4)
        n = hp["n_layer"]
        if isinstance(pattern, list):
            if len(pattern) != n:
                raise InputError(f"{self.path}: {a}.attention.sliding_window_pattern has {len(pattern)} entries for "
                                 f"{n} layers")
            sliding = [bool(p) for p in pattern]
        else:  # llama_hparams::set_swa_pattern: the last layer of every `pattern` is full (0: all slide)
            every = int(pattern)
            sliding = [every == 0 or i % every < every - 1 for i in range(n)]
        cfg.update(sliding_window=int(self.meta(f"{a}.attention.sliding_window")),
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
        return cfg

    def _stablelm_config(self) -> dict[str, Any]:
        """StableLM's and Phi's LayerNorm epsilon and partial rotary; for StableLM what the tensors
        tell, as llama.cpp's graph reads them: q/k/v biases, per-head q/k norms, and a parallel
        block when the layers have no ffn_norm (post_attention_layernorm)."""
        a, hp = self.arch, self.hparams
        cfg: dict[str, Any] = {"layer_norm_eps": hp["norm_eps"],
                               "partial_rotary_factor": int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"]}
        if a == "phi2":
            return {**cfg, "hidden_act": "gelu_new", "qk_layernorm": False}
        layer = "model.layers.0."
        return {**cfg, "use_qkv_bias": f"{layer}self_attn.q_proj.bias" in self._infos,
                "qk_layernorm": f"{layer}self_attn.q_layernorm.norms.0.weight" in self._infos,
                "use_parallel_residual": f"{layer}post_attention_layernorm.weight" not in self._infos}

    def _gpt_config(self) -> dict[str, Any]:
        """config.json's sizes and settings for the GPT-2-like families, in their own keys, with what
        llama.cpp fixes: GPT-2's and StarCoder's GELUs (tanh), multi-query StarCoder, GPT-NeoX's GELU
        and its parallel residual (use_parallel_residual), and Falcon's layout from its key/value
        heads and norms."""
        a, hp = self.arch, self.hparams
        e, eps = hp["n_embd"], hp["norm_eps"]
        if a in ("gpt2", "starcoder"):
            cfg: dict[str, Any] = {"n_embd": e, "n_layer": hp["n_layer"], "n_head": hp["n_head"],
                                   "n_positions": hp["n_ctx"], "n_inner": hp["n_ff"], "layer_norm_epsilon": eps}
            if a == "gpt2":
                return {**cfg, "activation_function": "gelu_new"}
            return {**cfg, "activation_function": "gelu_pytorch_tanh", "multi_query": True}
        if a == "bloom":
            return {"hidden_size": e, "n_layer": hp["n_layer"], "n_head": hp["n_head"], "layer_norm_epsilon": eps}
        cfg = {"hidden_size": e, "num_hidden_layers": hp["n_layer"], "num_attention_heads": hp["n_head"],
               "max_position_embeddings": hp["n_ctx"], "rope_theta": hp["rope_theta"]}
        if a == "gptneox":
            return {**cfg, "intermediate_size": hp["n_ff"], "hidden_act": "gelu", "layer_norm_eps": eps,
                    "partial_rotary_factor": int(hp["rope_dims"] or hp["head_dim"]) / hp["head_dim"],
                    "use_parallel_residual": bool(self.meta(f"{a}.use_parallel_residual", True)),
                    "attention_bias": "gpt_neox.layers.0.attention.query_key_value.bias" in self._infos}
        # Falcon, always parallel: 7B (one key/value head, one norm), 40B / 180B (key/value groups, two
        # norms: the falcon-40b layout), 11B (groups, one norm)
        nkv = hp["n_head_kv"]
        new = self.layout == "falcon-40b" or nkv > 1
        cfg.update(new_decoder_architecture=new, parallel_attn=True, bias=False, alibi=False,
                   ffn_hidden_size=hp["n_ff"], activation="gelu", layer_norm_epsilon=eps)
        if new:
            cfg.update(num_kv_heads=nkv, num_ln_in_parallel_attn=2 if self.layout == "falcon-40b" else 1)
        else:
            cfg["multi_query"] = True
        return cfg

    def _moe_config(self, bias: bool) -> dict[str, Any]:
        """The expert counts and widths; how llama.cpp routes: every layer sparse, the top-k weights
        renormalised for Mixtral and Qwen3-MoE but not Qwen2-MoE (build_moe_ffn's norm_w)."""
        hp = self.hparams
        if self.layout == "mixtral":
            return {"num_local_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"],
                    "sliding_window": None}
        cfg: dict[str, Any] = {"num_experts": hp["n_expert"], "num_experts_per_tok": hp["n_expert_used"],
                               "moe_intermediate_size": hp["n_ff_exp"], "norm_topk_prob": self.layout == "qwen3moe",
                               "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
        if self.layout == "qwen2moe":
            # Qwen2MoeConfig: biases on q, k, v (qkv_bias), none on o_proj
            cfg.update(shared_expert_intermediate_size=hp["n_ff_shexp"], qkv_bias=bias, attention_bias=False)
        return cfg

    def _gemma_config(self) -> dict[str, Any]:
        """What Gemma adds to config.json: the GELU, and for Gemma 2 and 3 the attention scale, the
        soft-capping and which layers slide, as llama.cpp's llama-model.cpp reads or fixes them."""
        a, hp = self.arch, self.hparams
        cfg: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh"}
        if a == "gemma":
            return cfg
        # the scores are scaled by 1/sqrt(head_dim), but by 1/sqrt(n_embd / n_head) for the 27B
        # models, which llama.cpp tells by their layer count
        big = hp["n_layer"] == {"gemma2": 46, "gemma3": 62}[a]
        cfg["query_pre_attn_scalar"] = hp["n_embd"] // hp["n_head"] if big else hp["head_dim"]
        window = self.meta(f"{a}.attention.sliding_window")
        final_cap = self.meta(f"{a}.final_logit_softcapping")
        if a == "gemma2":  # llama.cpp's defaults: a window of 4096, caps 50 and 30; every other layer slides
            window = 4096 if window is None else window
            cfg["attn_logit_softcapping"] = _f32(self.meta(f"{a}.attn_logit_softcapping", 50.0))
            cfg["final_logit_softcapping"] = _f32(30.0 if final_cap is None else final_cap)
            every = 2
        else:  # Gemma 3: five of every six layers slide, with a RoPE base of 10000; none without a window
            cfg["attn_logit_softcapping"] = None
            cfg["final_logit_softcapping"] = _f32(final_cap) if final_cap else None
            cfg["rope_local_base_freq"] = 10000.0
            every = 6 if window else 0
        cfg["sliding_window"] = int(window) if window else None
        cfg["layer_types"] = ["sliding_attention" if every and (i + 1) % every else "full_attention"
                              for i in range(hp["n_layer"])]
        return cfg

    def _phi3_config(self) -> dict[str, Any]:
        """What Phi-3 adds to config.json: partial rotary embeddings, the sliding window (llama.cpp's
        converter writes 0 for none) and LongRoPE (the factors from their tensors)."""
        a, hp = self.arch, self.hparams
        cfg: dict[str, Any] = {}
        if hp["rope_dims"] is not None and int(hp["rope_dims"]) != hp["head_dim"]:
            cfg["partial_rotary_factor"] = int(hp["rope_dims"]) / hp["head_dim"]
        window = self.meta(f"{a}.attention.sliding_window")
        cfg["sliding_window"] = int(window) if window else None
        orig = self.meta(f"{a}.rope.scaling.original_context_length")
        if orig:
            cfg["original_max_position_embeddings"] = int(orig)
        if self._rope_factors:
            rs = {"type": "longrope", "rope_type": "longrope", **self._rope_factors}
            attn = self.meta(f"{a}.rope.scaling.attn_factor")
            if attn is not None:
                rs["attention_factor"] = _f32(attn)
            cfg["rope_scaling"] = rs
        return cfg

    def _token(self, gkey: str) -> str | None:
        idx = self.meta(f"tokenizer.ggml.{gkey}")
        if idx is None:
            return None
        toks = self.meta("tokenizer.ggml.tokens") or []
        if not 0 <= int(idx) < len(toks):
            return None
        return toks[int(idx)]

    def extra_files(self) -> dict[str, bytes | Path]:
        """tokenizer.json and friends, rebuilt from the metadata. InputError when the GGUF's
        tokenizer kind is not supported: call this before a long conversion."""
        from kbitcli.sources.gguf_tokenizer import build_tokenizer

        tok, pre_warning = build_tokenizer(self)
        if pre_warning and pre_warning not in self.warnings:
            self.warnings.append(pre_warning)
        add_bos = bool(self.meta("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(self.meta("tokenizer.ggml.add_eos_token", False))
        special = {k: self._token(g) for k, g in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                                                   ("unk_token", "unknown_token_id"),
                                                   ("pad_token", "padding_token_id"))}
        special = {k: v for k, v in special.items() if v is not None}
        tcfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": add_bos,
            "add_eos_token": add_eos,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.hparams["n_ctx"],
            **special,
        }
        template = self.meta("tokenizer.chat_template")
        if isinstance(template, str):
            tcfg["chat_template"] = template
        gen: dict[str, Any] = {"_from_model_config": True}
        cfg = self.config()
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if k in cfg:
                gen[k] = cfg[k]
        eot = self.meta("tokenizer.ggml.eot_token_id")
        if eot is not None and "eos_token_id" in gen and int(eot) != gen["eos_token_id"]:
            gen["eos_token_id"] = [gen["eos_token_id"], int(eot)]

        def dump(obj: dict) -> bytes:
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

        return {
            "tokenizer.json": tok.to_str(pretty=True).encode("utf-8"),
            "tokenizer_config.json": dump(tcfg),
            "special_tokens_map.json": dump(special),
            "generation_config.json": dump(gen),
        }

    def close(self) -> None:
        # the reader holds a read-only memory map; dropping it unmaps the file once unreferenced
        self._by_name.clear()

    def _tensor(self, info: SourceTensor) -> tuple[Any, np.ndarray]:
        """(the GGUF tensor, the memory-mapped data of `info`: all of it, or one expert's slice)"""
        t = self._by_name.get(info.name)
        if t is None:
            raise InputError(f"{self.path}: the source was closed; cannot read {info.name!r}")
        return t
