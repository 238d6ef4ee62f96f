"""GGUF files (llama.cpp), read with the `gguf` package and turned back into Hugging Face form.

* Tensors are dequantized one at a time (gguf.quants.dequantize handles every ggml type) and
  renamed to Hugging Face names. GGUF lists dimensions in ggml order (innermost first); the
  numpy array the reader gives is already in row-major Hugging Face order, and every shape is
  checked against what the architecture expects.
* llama.cpp's converter permutes the rows of attn_q / attn_k (weights and biases) so that rotary
  pairs sit next to each other; `load` undoes it.
* config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  generation_config.json are rebuilt from the GGUF metadata.

Supported architectures: see SUPPORTED_ARCHITECTURES (llama, qwen2, qwen3: only llama's attn_q /
attn_k are permuted by llama.cpp; qwen3 adds attn_q_norm / attn_k_norm). Supported tokenizers:
byte-level BPE (tokenizer.ggml.model = "gpt2") and SentencePiece BPE ("llama").
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from kbitcli.errors import InputError, UnsupportedArchitectureError
from kbitcli.sources._base import BaseSource, SourceTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
#: GGUF architecture -> (Hugging Face model_type, class); llama.cpp's converter permutes the
#: attn_q / attn_k rows of "llama" only (LlamaModel.permute; Qwen2Model and Qwen3Model do not)
_HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
            "qwen3": ("qwen3", "Qwen3ForCausalLM")}
_PERMUTED_QK = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
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
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
}
# GGUF tensors with no Hugging Face counterpart: skipped, with a warning.
_SKIPPED = {
    "rope_freqs.weight": "rope_freqs.weight (llama.cpp's precomputed Llama-3 RoPE scaling) was skipped; "
    "the rebuilt config has no rope_scaling for it",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

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


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (Hugging Face -> GGUF); the inverse of unpermute_qk."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor name, or None if there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


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
        if int(self.meta(f"{self.arch}.expert_count", 0) or 0) > 0:
            raise UnsupportedArchitectureError(
                f"{path} is a mixture-of-experts model ({self.arch}.expert_count = "
                f"{self.meta(f'{self.arch}.expert_count')}); only dense models are supported"
            )
        self.hparams = self._hparams()
        self._by_name: dict[str, Any] = {}
        self._permute: dict[str, int] = {}
        hp = self.hparams
        for t in r.tensors:
            name = hf_name(t.name)
            if name is None:
                if t.name in _SKIPPED:
                    self.warnings.append(_SKIPPED[t.name])
                    continue
                raise InputError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face {self.arch} counterpart")
            ttype = t.tensor_type.name
            dtype = _FLOAT_TYPES.get(ttype) or _INT_TYPES.get(ttype) or ttype
            shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
            want = self._expected_shape(name)
            if want is not None and shape != want:
                raise InputError(
                    f"{path}: GGUF tensor {t.name!r} ({name}) has shape {list(shape)} but the metadata "
                    f"implies {list(want)}"
                )
            if self.arch in _PERMUTED_QK and ".attn_q." in t.name:
                self._permute[name] = hp["n_head"]
            elif self.arch in _PERMUTED_QK and ".attn_k." in t.name:
                self._permute[name] = hp["n_head_kv"]
            if name in self._infos:
                raise InputError(f"{path}: tensor {t.name!r} appears twice")
            self._infos[name] = SourceTensor(name, shape, dtype, int(t.n_bytes))
            self._by_name[name] = t
        if "model.embed_tokens.weight" not in self._infos:
            raise InputError(f"{path}: the GGUF has no token_embd.weight")
        for i in range(hp["n_layer"]):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                if f"model.layers.{i}.{part}.weight" not in self._infos:
                    raise InputError(f"{path}: the GGUF lacks the weight for model.layers.{i}.{part}")

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
            "rope_theta": _f32(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_dims": self.meta(f"{a}.rope.dimension_count"),
        }
        if hp["rope_dims"] is not None and int(hp["rope_dims"]) != head_dim:
            raise InputError(
                f"{self.path}: partial rotary embeddings ({a}.rope.dimension_count = {hp['rope_dims']}, "
                f"head size {head_dim}) are not supported for {a}"
            )
        return hp

    def _expected_shape(self, name: str) -> tuple[int, ...] | None:
        hp = self.hparams
        e, v, f = hp["n_embd"], hp["n_vocab"], hp["n_ff"]
        q, kv = hp["n_head"] * hp["head_dim"], hp["n_head_kv"] * hp["head_dim"]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (v, e)
        if name == "model.norm.weight":
            return (e,)
        suffix = name.split(".", 3)[-1]
        return {
            "self_attn.q_proj.weight": (q, e),
            "self_attn.k_proj.weight": (kv, e),
            "self_attn.v_proj.weight": (kv, e),
            "self_attn.o_proj.weight": (e, q),
            "self_attn.q_proj.bias": (q,),
            "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,),
            "self_attn.o_proj.bias": (e,),
            "mlp.gate_proj.weight": (f, e),
            "mlp.up_proj.weight": (f, e),
            "mlp.down_proj.weight": (e, f),
            "input_layernorm.weight": (e,),
            "post_attention_layernorm.weight": (e,),
            "self_attn.q_norm.weight": (hp["head_dim"],),
            "self_attn.k_norm.weight": (hp["head_dim"],),
        }.get(suffix)

    # -- data -----------------------------------------------------------------------------
    def _load_float(self, info: SourceTensor) -> np.ndarray:
        t = self._tensor(info)
        data = t.data
        out = np.empty(info.shape, dtype=np.float32)
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
        w = out
        n = self._permute.get(info.name)
        if n is not None:
            w = unpermute_qk(w, n)
        return np.ascontiguousarray(w)

    def _load_raw(self, info: SourceTensor) -> np.ndarray:
        t = self._tensor(info)
        data = np.array(t.data)  # copy out of the memory map
        if info.dtype == "bfloat16":
            data = data.view(np.uint16).reshape(info.shape)
        return data

    # -- side files -----------------------------------------------------------------------
    def config(self) -> dict:
        hp = self.hparams
        a = self.arch
        model_type, cls = _HF_ARCH[a]
        cfg: dict[str, Any] = {
            "architectures": [cls],
            "model_type": model_type,
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
            "vocab_size": hp["n_vocab"],
            "tie_word_embeddings": "lm_head.weight" not in self._infos,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._infos,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")):
            v = self.meta(f"tokenizer.ggml.{gkey}")
            if v is not None:
                cfg[key] = int(v)
        scaling = self.meta(f"{a}.rope.scaling.type")
        factor = self.meta(f"{a}.rope.scaling.factor")
        if scaling and scaling != "none" and factor:
            rs: dict[str, Any] = {"type": scaling, "rope_type": scaling, "factor": float(factor)}
            orig = self.meta(f"{a}.rope.scaling.original_context_length")
            if orig:
                rs["original_max_position_embeddings"] = int(orig)
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

    def _tensor(self, info: SourceTensor):
        t = self._by_name.get(info.name)
        if t is None:
            raise InputError(f"{self.path}: the source was closed; cannot read {info.name!r}")
        return t
