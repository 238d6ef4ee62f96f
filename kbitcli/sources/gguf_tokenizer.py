"""Rebuild a Hugging Face tokenizer.json from a GGUF file's tokenizer metadata.

Byte-level BPE (tokenizer.ggml.model = "gpt2"): the vocabulary is stored in the byte-to-unicode
alphabet, exactly as in tokenizer.json, and the merges as "left right" strings. How text is
split before BPE (the pre-tokenizer) is only named, by tokenizer.ggml.pre; the tables below give,
for each name llama.cpp writes, the pre-tokenizer (and normalizer) of the original models'
tokenizer.json, not llama.cpp's rewrite of it. A name that stands for originals which split
differently is rebuilt as the GGUF's tokenizer.json split, with a warning.

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

# llama.cpp's tokenizer.ggml.pre names -> the pre-tokenizer family of the original tokenizer.json.
# "gpt2": the GPT-2 regex; "digits": each digit on its own, then the GPT-2 regex (SmolLM, StarCoder,
# Command-R, EXAONE 3); "llama3": the Llama-3 regex (numbers in groups of up to 3), whole words
# looked up before merging (ignore_merges); "glm4": the same regex, merging always (GLM-4, GLM-4.5);
# "qwen2": the Llama-3 regex with each digit on its own, after NFC (Qwen2/2.5/3, DeepSeek-R1
# distilled into Qwen, StableLM 2's and Hunyuan's tiktoken tokenizers); "tekken": Mistral's split
# at case changes, digits one by one (NeMo, Small 3, Ministral); "gpt-4o": o200k's, the same with
# contractions kept on words and numbers in threes (gpt-oss, Phi-4, Llama 4); "kimi-k2": o200k's
# with runs of Han characters apart (Kimi K2's tiktoken pattern); "deepseek-v3", "deepseek-llm",
# "deepseek-coder": DeepSeek's chains of splits (the first: V3/R1); "falcon": punctuation runs,
# GPT-2, then numbers cut in threes; "bloom": words with one leading space, punctuation apart.
_PRE_FAMILIES = {
    "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2", "phi-2": "gpt2",
    "exaone4": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits", "command-r": "digits",
    "exaone": "digits",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3",
    "dbrx": "llama3", "falcon3": "llama3", "pixtral": "llama3",
    "glm4": "glm4", "chatglm-bpe": "glm4",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2", "hunyuan": "qwen2",
    "tekken": "tekken", "kimi-k2": "kimi-k2",
    "gpt-4o": "gpt-4o", "llama4": "gpt-4o",
    "deepseek-v3": "deepseek-v3", "deepseek-llm": "deepseek-llm", "deepseek-coder": "deepseek-coder",
    "falcon": "falcon", "bloom": "bloom",
}

# names whose GGUFs come from models whose originals split text in more than one way
_AMBIGUOUS_PRE = {
    "pixtral": "GGUFs named 'pixtral' (Pixtral 12B, Devstral Small 2, ...) come from a tokenizer.json with the "
               "Llama-3 split, which is how the text is split here; Mistral's own tokenizer (tekken.json) splits "
               "it the Tekken way (transformers' fix_mistral_regex), so tokens may differ from Mistral's",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
assert _QWEN2_SPLIT != _LLAMA3_SPLIT

# a word: an optional non-letter, then upper-case (or caseless) letters and lower-case ones
_CASED_WORDS = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+{c}"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*{c}"
)
_O200K_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_TEKKEN_SPLIT = _CASED_WORDS.replace("{c}", "") + r"|\p{N}" + _O200K_TAIL
_GPT4O_SPLIT = _CASED_WORDS.replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?") + r"|\p{N}{1,3}" + _O200K_TAIL
# Kimi K2: Han runs first, the o200k words without Han (&&: class intersection), no "/" kept on punctuation
_KIMI_K2_SPLIT = (
    r"[\p{Han}]+|"
    + _CASED_WORDS.replace(r"\p{M}]", r"\p{M}&&[^\p{Han}]]").replace("{c}", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?")
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, hiragana, katakana
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# DeepSeek LLM / Coder: runs of U+0800 to the end of the CJK ideographs, and of Hangul
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM's cased letters (Lu, Ll, Lt), as its tokenizer.json lists them
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00B5\u00C0-\u00D6\u00D8-\u00F6\u00F8-\u01BA\u01BC-\u01BF\u01C4-\u0293\u0295-\u02AF\u0370-\u0373"
    "\u0376\u0377\u037B-\u037D\u037F\u0386\u0388-\u038A\u038C\u038E-\u03A1\u03A3-\u03F5\u03F7-\u0481\u048A-\u052F"
    "\u0531-\u0556\u10A0-\u10C5\u13A0-\u13F5\u13F8-\u13FD\u1C90-\u1CBA\u1CBD-\u1CBF\u1D00-\u1D2B\u1D6B-\u1D77"
    "\u1D79-\u1D9A\u1E00-\u1F15\u1F18-\u1F1D\u1F20-\u1F45\u1F48-\u1F4D\u1F50-\u1F57\u1F59\u1F5B\u1F5D\u1F5F-\u1F7D"
    "\u1F80-\u1FB4\u1FB6-\u1FBC\u1FBE\u1FC2-\u1FC4\u1FC6-\u1FCC\u1FD0-\u1FD3\u1FD6-\u1FDB\u1FE0-\u1FEC\u1FF2-\u1FF4"
    "\u1FF6-\u1FFC\u2102\u2107\u210A-\u2113\u2115\u2119-\u211D\u2124\u2126\u2128\u212A-\u212D\u212F-\u2134\u2139"
    "\u213C-\u213F\u2145-\u2149\u214E\u2183\u2184\u2C00-\u2C7B\u2C7E-\u2CE4\u2CEB-\u2CEE\u2CF2\u2CF3\uA640-\uA66D"
    "\uA680-\uA69B\uA722-\uA76F\uA771-\uA787\uA78B-\uA78E\uAB70-\uABBF\uFB00-\uFB06\uFB13-\uFB17\uFF21-\uFF3A"
    "\uFF41-\uFF5A\U00010400-\U0001044F\U000104B0-\U000104D3\U000104D8-\U000104FB\U00010C80-\U00010CB2"
    "\U00010CC0-\U00010CF2\U000118A0-\U000118DF\U0001E900-\U0001E943"
)
_DEEPSEEK_LLM_SPLITS = (
    r"[\r\n]", r"\s?[" + _DEEPSEEK_LLM_LETTERS + "]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",  # ASCII, full-width punctuation, quotes
    r"\s+$", _DEEPSEEK_CJK,
)
_DEEPSEEK_CODER_SPLITS = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK)
# BLOOM: a word with at most one space before it, ending at whitespace or punctuation
_BLOOM_SPLIT = " ?[^(\\s|[.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c])]+"

# each family's chain: ("split", regex) isolates the regex's matches, ("digits", individually),
# ("punctuation",) isolates punctuation runs, ("bytes", use_regex) is the byte-level step
_CHAINS: dict[str, list[tuple]] = {
    "gpt2": [("bytes", True)],
    "digits": [("digits", True), ("bytes", True)],
    "llama3": [("split", _LLAMA3_SPLIT), ("bytes", False)],
    "glm4": [("split", _LLAMA3_SPLIT), ("bytes", False)],
    "qwen2": [("split", _QWEN2_SPLIT), ("bytes", False)],
    "tekken": [("split", _TEKKEN_SPLIT), ("bytes", False)],
    "gpt-4o": [("split", _GPT4O_SPLIT), ("bytes", False)],
    "kimi-k2": [("split", _KIMI_K2_SPLIT), ("bytes", False)],
    "deepseek-v3": [("split", r) for r in _DEEPSEEK_V3_SPLITS] + [("bytes", False)],
    "deepseek-llm": [("split", r) for r in _DEEPSEEK_LLM_SPLITS] + [("digits", True), ("bytes", False)],
    "deepseek-coder": [("split", r) for r in _DEEPSEEK_CODER_SPLITS] + [("digits", True), ("bytes", False)],
    "falcon": [("punctuation",), ("bytes", True), ("digits", False), ("split", "[0-9][0-9][0-9]")],
    "bloom": [("split", _BLOOM_SPLIT), ("bytes", False)],
}
# families whose tokenizer looks a whole word up in the vocabulary before merging (Kimi K2's: tiktoken)
_IGNORE_MERGES = {"llama3", "tekken", "kimi-k2"}
# families whose tokenizer.json composes text to NFC first
_NFC = {"qwen2"}

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
    elif pre in _AMBIGUOUS_PRE:
        warning = f"GGUF pre-tokenizer {pre!r}: {_AMBIGUOUS_PRE[pre]}"

    bpe = models.BPE(
        vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=family in _IGNORE_MERGES
    )
    tok = Tokenizer(bpe)
    steps = []
    for kind, *arg in _CHAINS[family]:
        if kind == "split":
            steps.append(pre_tokenizers.Split(Regex(arg[0]), behavior="isolated", invert=False))
        elif kind == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=arg[0]))
        elif kind == "punctuation":
            steps.append(pre_tokenizers.Punctuation(behavior="contiguous"))
        else:
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=arg[0]))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    if family in _NFC:
        tok.normalizer = normalizers.NFC()
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
