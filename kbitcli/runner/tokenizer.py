"""The tokenizer of a model folder: tokenizer.json (Hugging Face `tokenizers`), the special
tokens of tokenizer_config.json / generation_config.json / config.json, and the chat
template (rendered with jinja2, as transformers does)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from kbitcli.errors import InputError


def _read(data: bytes | Path | None, name: str) -> str | None:
    if data is None:
        return None
    try:
        raw = data.read_bytes() if isinstance(data, Path) else bytes(data)
        return raw.decode("utf-8")
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None


def _json(data: bytes | Path | None, name: str) -> dict:
    text = _read(data, name)
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{name} is not valid JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # AddedToken as saved by transformers
        return v["content"]
    return None


class Tokenizer:
    """encode/decode, special tokens and the chat template of one model."""

    def __init__(self, tok, tokenizer_config: Mapping[str, Any] | None = None,
                 generation_config: Mapping[str, Any] | None = None, model_config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None, where: str = "the model") -> None:
        self.tok = tok
        self.where = where
        self.tokenizer_config = dict(tokenizer_config or {})
        gen = dict(generation_config or {})
        cfg = dict(model_config or {})
        self.chat_template = chat_template
        self.special: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            t = _token_text(self.tokenizer_config.get(key))
            if t is not None:
                self.special[key] = t
        eos: list[int] = []
        for src in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            for v in (src if isinstance(src, list) else [src]):
                if isinstance(v, int) and v not in eos:
                    eos.append(v)
        if "eos_token" in self.special:
            i = tok.token_to_id(self.special["eos_token"])
            if i is not None and i not in eos:
                eos.append(i)
        self.eos_token_ids = eos
        pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
        if not isinstance(pad, int) and "pad_token" in self.special:
            pad = tok.token_to_id(self.special["pad_token"])
        self.pad_token_id = pad if isinstance(pad, int) else (eos[0] if eos else 0)
        bos = cfg.get("bos_token_id", gen.get("bos_token_id"))
        if not isinstance(bos, int) and "bos_token" in self.special:
            bos = tok.token_to_id(self.special["bos_token"])
        self.bos_token_id = bos if isinstance(bos, int) else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(int(i) for i in ids), skip_special_tokens=skip_special_tokens)

    # -- chat
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, rendered like transformers' apply_chat_template."""
        if not self.chat_template:
            raise InputError(f"{self.where} has no chat template (tokenizer_config.json has no chat_template); "
                             "run without --chat")
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise InputError("--chat renders the model's chat template with jinja2, which is not installed; "
                             "install it (pip install jinja2) or run without --chat") from None

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            from datetime import datetime
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   **self.special)
        except jinja2.exceptions.TemplateError as e:
            raise InputError(f"the chat template of {self.where} failed: {e}") from None


def _chat_template(files: Mapping[str, bytes | Path], tcfg: Mapping[str, Any]) -> str | None:
    jinja = _read(files.get("chat_template.jinja"), "chat_template.jinja")
    if jinja:
        return jinja
    ct = _json(files.get("chat_template.json"), "chat_template.json").get("chat_template") or tcfg.get("chat_template")
    if isinstance(ct, list):  # named templates: take "default"
        named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    return ct if isinstance(ct, str) else None


def load_tokenizer(files: Mapping[str, bytes | Path], model_config: Mapping[str, Any] | None,
                   where: str) -> Tokenizer:
    """From the side files of a model (name -> bytes or path)."""
    from tokenizers import Tokenizer as HFTokenizer

    text = _read(files.get("tokenizer.json"), "tokenizer.json")
    if text is None:
        raise InputError(f"{where} has no tokenizer.json; kbit's runner needs the fast-tokenizer file "
                         "(save the tokenizer with transformers' save_pretrained, or convert from a folder that has it)")
    try:
        tok = HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
        raise InputError(f"{where}: tokenizer.json cannot be read ({e})") from None
    tcfg = _json(files.get("tokenizer_config.json"), "tokenizer_config.json")
    gen = _json(files.get("generation_config.json"), "generation_config.json")
    return Tokenizer(tok, tcfg, gen, model_config, _chat_template(files, tcfg), where)
