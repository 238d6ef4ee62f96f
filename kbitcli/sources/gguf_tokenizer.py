"""Rebuild a Hugging Face tokenizer.json from a GGUF file's tokenizer metadata.

Byte-level BPE (tokenizer.ggml.model = "gpt2"): the vocabulary is stored in the byte-to-unicode
alphabet, exactly as in tokenizer.json, and the merges as "left right" strings. How text is
split before BPE (the pre-tokenizer) is only named, by tokenizer.ggml.pre; the table below
gives the Hugging Face pre-tokenizer llama.cpp's name stands for (llama.cpp's llama-vocab.cpp).

SentencePiece BPE (tokenizer.ggml.model = "llama": Llama 2, Mistral, Phi-3, Gemma ... GGUFs): the
pieces, their scores and types, but no merges; the merges are those SentencePiece's encoder implies
(every split of a piece into two pieces, ranked by the score of the piece made), with its space
handling (Gemma's: no space prefix), byte fallback and user-defined pieces. Gemma's vocabulary is
not byte-level: a Gemma GGUF with a "gpt2" tokenizer is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kbitcli.errors import InputError
from kbitcli.sources.gguf_archs import GEMMA_ARCHITECTURES

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer

    from kbitcli.sources.gguf_source import GGUFSource

# Pre-tokenizer families. "gpt2": the GPT-2 regex; "digits": each digit on its own, then the
# GPT-2 regex (SmolLM, StarCoder, Command-R); "llama3": the Llama-3 regex (numbers in groups of up to 3);
# "qwen2": the same regex with each digit on its own, after NFC normalization (Qwen2, Qwen2.5, Qwen3).
_PRE_FAMILIES = {
    "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2", "phi-2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits", "command-r": "digits",
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

#: tokenizer.ggml.model values rebuilt here: byte-level BPE, SentencePiece BPE
SUPPORTED_TOKENIZERS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}

# token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type)
_TOKEN_NORMAL = 1
_TOKEN_UNKNOWN = 2
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def build_tokenizer(src: "GGUFSource") -> tuple["Tokenizer", str | None]:
    """(tokenizer, warning or None) for the GGUF `src`."""
    from tokenizers import AddedToken, Tokenizer, processors

    model_kind = src.meta("tokenizer.ggml.model")
    if model_kind is None:
        raise InputError(f"{src.path}: the GGUF holds no tokenizer (no tokenizer.ggml.model)")
    if model_kind not in SUPPORTED_TOKENIZERS:
        raise InputError(
            f"{src.path}: rebuilding a tokenizer of kind {model_kind!r} from GGUF is not supported; supported: "
            + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_TOKENIZERS.items())
            + ". Convert from the original Hugging Face model instead."
        )
    if model_kind != "llama" and src.arch in GEMMA_ARCHITECTURES:
        raise InputError(f"{src.path}: a Gemma GGUF with a {model_kind!r} tokenizer: Gemma's SentencePiece vocabulary "
                         "is rebuilt only from a 'llama' (SentencePiece) one. Convert from the original Hugging Face "
                         "model instead.")
    tokens = src.meta("tokenizer.ggml.tokens")
    if not tokens:
        raise InputError(f"{src.path}: the GGUF has no tokenizer.ggml.tokens")
    types = src.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"{src.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")

    if model_kind == "llama":
        # llama.cpp's converter spells U+2581 as a space in user-defined pieces (Gemma's runs of
        # spaces); SentencePiece matches those pieces in the normalized text, where spaces are U+2581
        tokens = [t.replace(" ", "\u2581") if ty == _TOKEN_USER_DEFINED else t for t, ty in zip(tokens, types)]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    warning = None
    if len(vocab) != len(tokens):
        warning = f"{len(tokens) - len(vocab)} duplicate token strings in the GGUF vocabulary were dropped"
    if model_kind == "gpt2":
        tok, pre_warning = _byte_level_bpe(src, vocab)
        warning = warning or pre_warning
    else:
        tok = _sentencepiece_bpe(src, tokens, types, vocab)

    # Control tokens (<|im_start|>, <|endoftext|>, <s>, ...) and SentencePiece's unknown token are
    # matched whole and are special; user-defined ones (<think>, ...) are matched whole but are
    # ordinary text (SentencePiece's: matched in the normalized text).
    control = [t for t, ty in zip(tokens, types)
               if (ty == _TOKEN_CONTROL or (ty == _TOKEN_UNKNOWN and model_kind == "llama")) and vocab.get(t) is not None]
    user = [t for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and vocab.get(t) is not None]
    # already in the vocabulary: their ids are kept, nothing is appended
    if control:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=model_kind == "llama") for t in user])
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
        template = processors.TemplateProcessing(single=a, pair=f"{a} {b}",
                                                 special_tokens=list(dict.fromkeys(pre_ids + post_ids)))
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template]) \
            if model_kind == "gpt2" else template
    elif model_kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, warning


def _byte_level_bpe(src: "GGUFSource", vocab: dict[str, int]) -> tuple["Tokenizer", str | None]:
    """Byte-level BPE (tokenizer.ggml.model = "gpt2"): the stored merges, and the split rules of
    the pre-tokenizer that tokenizer.ggml.pre names (a warning when it names none we know)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges_raw = src.meta("tokenizer.ggml.merges")
    if merges_raw is None:
        raise InputError(f"{src.path}: the GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise InputError(f"{src.path}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        # the tokenizers library needs both parts and what they make in the vocabulary
        unknown = next((t for t in (parts[0], parts[1], parts[0] + parts[1]) if t not in vocab), None)
        if unknown is not None:
            raise InputError(f"{src.path}: the BPE merge {m!r} in tokenizer.ggml.merges names {unknown!r}, which is "
                             "not in tokenizer.ggml.tokens; the GGUF's tokenizer is inconsistent")
        merges.append((parts[0], parts[1]))

    warning = None
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
    return tok, warning


def sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float],
                         vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece BPE vocabulary implies. SentencePiece merges, among
    adjacent pieces, the pair whose concatenation is a (normal) piece of the highest score; so
    every split of a normal piece into two normal pieces is a merge, ranked by the score of the
    piece it makes (then its id, then the split point)."""
    normal = {t for t, ty in zip(tokens, types) if ty == _TOKEN_NORMAL}
    cands = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty != _TOKEN_NORMAL or vocab.get(t) != i:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in normal and right in normal:
                cands.append((-float(scores[i]), i, k, left, right))
    cands.sort(key=lambda c: c[:3])
    return [(c[3], c[4]) for c in cands]


def _sentencepiece_bpe(src: "GGUFSource", tokens: list[str], types: list[int], vocab: dict[str, int]) -> "Tokenizer":
    """SentencePiece BPE (tokenizer.ggml.model = "llama": Llama 2, Mistral, ...): pieces spell
    spaces as U+2581, with a space in front of the text (add_space_prefix, llama.cpp's default,
    as SentencePiece's add_dummy_prefix); characters outside the vocabulary fall back to byte
    pieces <0xNN>. Checked token for token against SentencePiece itself in the tests."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = src.meta("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise InputError(f"{src.path}: the GGUF SentencePiece tokenizer has no tokenizer.ggml.scores for its "
                         f"{len(tokens)} tokens")
    if src.meta("tokenizer.ggml.remove_extra_whitespaces", False):
        raise InputError(f"{src.path}: the GGUF SentencePiece tokenizer collapses whitespace "
                         "(remove_extra_whitespaces), which kbit does not rebuild; convert from the original "
                         "Hugging Face model instead")
    unk = next((t for t, ty in zip(tokens, types) if ty == _TOKEN_UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, types, scores, vocab),
                               unk_token=unk, byte_fallback=True, fuse_unk=True))
    prefix = bool(src.meta("tokenizer.ggml.add_space_prefix", True))
    spaces = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), spaces]) if prefix else spaces
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
