"""Rebuild a Hugging Face tokenizer.json from a GGUF file's tokenizer metadata.

Byte-level BPE (tokenizer.ggml.model = "gpt2"): the vocabulary is stored in the byte-to-unicode
alphabet, exactly as in tokenizer.json, and the merges as "left right" strings. How text is
split before BPE (the pre-tokenizer) is only named, by tokenizer.ggml.pre; the table below
gives the Hugging Face pre-tokenizer llama.cpp's name stands for (llama.cpp's llama-vocab.cpp).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kbitcli.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

    from kbitcli.sources.gguf_source import GGUFSource

# Pre-tokenizer families. "gpt2": the GPT-2 regex; "digits": each digit on its own, then the
# GPT-2 regex (SmolLM, StarCoder); "llama3": the Llama-3 regex (numbers in groups of up to 3);
# "qwen2": the same regex with each digit on its own, after NFC normalization (Qwen2, Qwen2.5, Qwen3).
_PRE_FAMILIES = {
    "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2", "phi-2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3",
    "dbrx": "llama3", "falcon3": "llama3",
    "qwen2": "qwen2",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
assert _QWEN2_SPLIT != _LLAMA3_SPLIT

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def build_tokenizer(src: "GGUFSource") -> tuple["Tokenizer", str | None]:
    """(tokenizer, warning or None) for the GGUF `src`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    model_kind = src.meta("tokenizer.ggml.model")
    if model_kind is None:
        raise InputError(f"{src.path}: the GGUF holds no tokenizer (no tokenizer.ggml.model)")
    if model_kind != "gpt2":
        raise InputError(
            f"{src.path}: rebuilding a tokenizer of kind {model_kind!r} from GGUF is not supported; "
            "supported: gpt2 (byte-level BPE). Convert from the original Hugging Face model instead."
        )
    tokens = src.meta("tokenizer.ggml.tokens")
    merges_raw = src.meta("tokenizer.ggml.merges")
    if not tokens:
        raise InputError(f"{src.path}: the GGUF has no tokenizer.ggml.tokens")
    if merges_raw is None:
        raise InputError(f"{src.path}: the GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    types = src.meta("tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    warning = None
    if len(vocab) != len(tokens):
        warning = f"{len(tokens) - len(vocab)} duplicate token strings in the GGUF vocabulary were dropped"
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise InputError(f"{src.path}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        merges.append((parts[0], parts[1]))

    pre = src.meta("tokenizer.ggml.pre")
    family = _PRE_FAMILIES.get(pre) if isinstance(pre, str) else None
    if family is None:
        family = "gpt2"
        msg = f"unknown GGUF pre-tokenizer {pre!r}" if pre else "the GGUF names no pre-tokenizer"
        warning = f"{msg}: text is split the GPT-2 way, which may not match the original tokenizer exactly"

    bpe = models.BPE(
        vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=(family == "llama3")
    )
    tok = Tokenizer(bpe)
    if family in ("llama3", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if family == "llama3" else _QWEN2_SPLIT),
                                 behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
        if family == "qwen2":
            tok.normalizer = normalizers.NFC()
    elif family == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)

    # Control tokens (<|im_start|>, <|endoftext|>, ...) are matched whole and are special;
    # user-defined ones (<think>, ...) are matched whole but are ordinary text.
    control = [t for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and vocab.get(t) is not None]
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and vocab.get(t) is not None]
    # already in the vocabulary: their ids are kept, nothing is appended
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise InputError(f"{src.path}: rebuilding the tokenizer changed the vocabulary size (internal error)")

    add_bos = bool(src.meta("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(src.meta("tokenizer.ggml.add_eos_token", False))
    bos, eos = src._token("bos_token_id"), src._token("eos_token_id")
    if (add_bos and bos) or (add_eos and eos):
        pre_ids = [(bos, vocab[bos])] if add_bos and bos else []
        post_ids = [(eos, vocab[eos])] if add_eos and eos else []
        a = " ".join([f"{t}:0" for t, _ in pre_ids] + ["$A:0"] + [f"{t}:0" for t, _ in post_ids])
        b = " ".join([f"{t}:1" for t, _ in pre_ids] + ["$B:1"] + [f"{t}:1" for t, _ in post_ids])
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=a, pair=f"{a} {b}",
                                          special_tokens=list(dict.fromkeys(pre_ids + post_ids))),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, warning
