"""Pieces every architecture shares: config parsing, the KV cache, masks, attention,
rotary embeddings, norms and activations.

Conventions of every model module (see docs/adding-an-architecture.md):
  * ``ModelArgs.from_config(cfg)`` builds the arguments from config.json (unknown keys are
    ignored; a missing required field raises InputError naming it);
  * ``Model(args)`` is an ``nn.Module`` whose parameter names are the Hugging Face checkpoint
    names, so loading is name for name; ``Model.checkpoint_name(name)`` maps a stored name to
    a parameter name (or None to ignore the tensor);
  * ``Model.forward(input_ids [B,S], attention_mask [B,T] or None, positions [B,S] or None,
    cache) -> logits [B,S,V]`` with T = cache.length + S.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kbitcli.errors import InputError


# ----------------------------------------------------------------------------- config
def args_from_config(cls, cfg: Mapping[str, Any], aliases: Mapping[str, str] | None = None,
                     arch: str = "model"):
    """Instantiate the dataclass `cls` from config.json: keys are taken by field name (or by
    an alias: aliases maps config key -> field), everything else is ignored. A required
    field (no default) that is absent or null raises InputError naming it."""
    aliases = dict(aliases or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key, field_name in aliases.items():  # aliases first, so a canonical key wins
        if key in cfg and cfg[key] is not None and field_name in names:
            kw[field_name] = cfg[key]
    for key, value in cfg.items():
        if key in names and value is not None:
            kw[key] = value
    for f in names.values():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        if required and f.name not in kw:
            alt = [k for k, v in aliases.items() if v == f.name]
            also = f" (or {', '.join(repr(a) for a in alt)})" if alt else ""
            raise InputError(f"config.json lacks the field {f.name!r}{also}, which a {arch} model needs")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise InputError(f"config.json: invalid {arch} configuration ({e})") from None


def positive(args, *fields_: str, arch: str = "model") -> None:
    for name in fields_:
        v = getattr(args, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise InputError(f"config.json: {name} must be a positive integer for a {arch} model, got {v!r}")


def per_layer(args, *fields_: str) -> None:
    """Each of the per-layer lists `fields_` (layer_types, no_rope_layers, ...) that is set has one
    entry a layer."""
    for name in fields_:
        v = getattr(args, name)
        if v is not None and len(v) != args.num_hidden_layers:
            raise InputError(f"config.json: {name} has {len(v)} entries for {args.num_hidden_layers} layers")


def grouped_heads(args) -> None:
    """num_key_value_heads defaults to num_attention_heads, and must divide it."""
    args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
    if isinstance(args.num_key_value_heads, int) and isinstance(args.num_attention_heads, int) \
            and args.num_key_value_heads > 0 and args.num_attention_heads % args.num_key_value_heads:
        raise InputError(f"config.json: num_attention_heads ({args.num_attention_heads}) is not a multiple of "
                         f"num_key_value_heads ({args.num_key_value_heads})")


# ----------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of every layer, preallocated for `capacity` positions (grown when
    exceeded). `length` is the number of positions already stored; a model's forward writes
    the new positions of every layer with `update` and then calls `advance`.

    Static mode (`start_static`, for decode steps captured in a CUDA graph): every tensor a
    decode step touches keeps its address and shape. One new token per sequence is written
    at the device-side index `slot`, attention runs over the first `attend` positions (the
    rest masked), and the key mask, the position ids and `slot` are advanced on the device,
    inside the step, so a replayed graph needs no host-side bookkeeping. `length` then stays
    at the length where static mode started; `slot` holds the true length on the device."""

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.capacity = int(capacity)
        self.length = 0
        self.static = False
        self.slot: torch.Tensor | None = None        # [1] long: where the next token goes
        self.key_mask: torch.Tensor | None = None    # [B, capacity] bool
        self.positions: torch.Tensor | None = None   # [B, 1] long: the next token's position ids
        self.k_index: torch.Tensor | None = None     # [capacity] long
        self.attend = 0                              # positions attention reads (static mode)

    def _grow(self, layer: int, like_k: torch.Tensor, like_v: torch.Tensor, end: int) -> None:
        buf = self.k[layer]
        cap = max(end, self.capacity, 0 if buf is None else 2 * buf.shape[2])
        nk = like_k.new_empty(like_k.shape[0], like_k.shape[1], cap, like_k.shape[3])
        nv = like_v.new_empty(like_v.shape[0], like_v.shape[1], cap, like_v.shape[3])
        if buf is not None:
            nk[:, :, :self.length] = buf[:, :, :self.length]
            nv[:, :, :self.length] = self.v[layer][:, :, :self.length]  # type: ignore[index]
        self.k[layer], self.v[layer] = nk, nv

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H, S, D] for the new positions -> all keys/values [B, H, length+S, D]
        (static mode: [B, H, attend, D], the new position written at `slot`)."""
        if self.static:
            kb, vb = self.k[layer], self.v[layer]
            kb.index_copy_(2, self.slot, k)  # type: ignore[union-attr]
            vb.index_copy_(2, self.slot, v)  # type: ignore[union-attr]
            return kb[:, :, :self.attend], vb[:, :, :self.attend]  # type: ignore[index]
        end = self.length + k.shape[2]
        buf = self.k[layer]
        if buf is None or end > buf.shape[2]:
            self._grow(layer, k, v, end)
        kb, vb = self.k[layer], self.v[layer]
        kb[:, :, self.length:end] = k  # type: ignore[index]
        vb[:, :, self.length:end] = v  # type: ignore[index]
        return kb[:, :, :end], vb[:, :, :end]  # type: ignore[index]

    def advance(self, n: int) -> None:
        if self.static:  # on the device, so that a replayed step advances too
            self.slot.add_(int(n))  # type: ignore[union-attr]
            self.positions.add_(int(n))  # type: ignore[union-attr]
        else:
            self.length += int(n)

    def start_static(self, attention_mask: torch.Tensor) -> None:
        """Switch to static decode steps after the prompt pass. attention_mask [B, length]:
        the mask the cache was filled with (1: real token, 0: padding). Every layer's buffers
        get the full capacity, zeroed past `length` (masked positions are multiplied by a
        zero weight in attention, which must not meet NaN garbage)."""
        if self.static:
            raise ValueError("the KV cache is already in static mode")
        if any(b is None for b in self.k):
            raise ValueError("static mode needs a cache filled by a prompt pass")
        B = attention_mask.shape[0]
        if tuple(attention_mask.shape) != (B, self.length):
            raise ValueError(f"attention_mask must be [batch, {self.length}], got {list(attention_mask.shape)}")
        self.capacity = max(self.capacity, self.length + 1)
        for i, kb in enumerate(self.k):
            if kb.shape[2] < self.capacity:  # type: ignore[union-attr]
                self._grow(i, kb, self.v[i], self.capacity)  # type: ignore[arg-type]
            self.k[i][:, :, self.length:].zero_()  # type: ignore[index]
            self.v[i][:, :, self.length:].zero_()  # type: ignore[index]
        dev = attention_mask.device
        cap = self.k[0].shape[2]  # type: ignore[union-attr]
        self.key_mask = torch.zeros(B, cap, dtype=torch.bool, device=dev)
        self.key_mask[:, :self.length] = attention_mask.bool()
        # the position id of the next token: the real tokens before it (what the dynamic path's
        # cumulative sum of the mask gives)
        self.positions = attention_mask.long().sum(-1, keepdim=True)
        self.slot = torch.tensor([self.length], dtype=torch.long, device=dev)
        self.k_index = torch.arange(cap, device=dev)
        self.attend = cap
        self.static = True

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


# ----------------------------------------------------------------------------- masks
def _torch_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


#: scaled_dot_product_attention(..., enable_gqa=True) exists (torch >= 2.5)
SDPA_GQA = _torch_at_least(2, 5)


@dataclasses.dataclass
class Step:
    """What the attention layers of one forward call need. The masks are built once per
    forward (per sliding-window size) and shared by every layer."""

    positions: torch.Tensor        # [B, S] position ids of the new tokens
    key_mask: torch.Tensor         # [B, T] bool, True for real (non-padding) tokens
    past: int                      # positions already in the cache
    q_index: torch.Tensor          # [S] absolute indices of the new tokens
    k_index: torch.Tensor          # [T]
    dense: bool = False            # no padding: key_mask is all True
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """[B, 1, S, T] bool: True where a query may attend a key (causal, not padding,
        inside the sliding window). Every query also sees itself, so that padding rows
        never become all-masked (their outputs are never used). Built once per window size."""
        key = ("bool", window or None)
        m = self._cache.get(key)
        if m is None:
            q, k = self.q_index[:, None], self.k_index[None, :]
            allowed = k <= q
            if window:
                allowed = allowed & (k > q - window)
            m = allowed[None, None] & self.key_mask[:, None, None, :]
            m = self._cache[key] = m | (k == q)[None, None]
        return m

    def chunked_mask(self, chunk: int) -> torch.Tensor:
        """mask() keeping only the keys whose position lies in the query's chunk of `chunk`
        positions (Llama 4's chunked attention; positions: each sequence's own, its real tokens
        counted from 0); every query still sees itself. Built once per chunk size."""
        key = ("chunk", chunk)
        m = self._cache.get(key)
        if m is None:
            k_pos = self.key_mask.long().cumsum(-1) - 1                                   # [B, T]
            same = (k_pos[:, None, :] // chunk) == (self.positions[:, :, None] // chunk)  # [B, S, T]
            itself = (self.k_index[None, :] == self.q_index[:, None])[None, None]
            m = self._cache[key] = (self.mask() & same[:, None]) | itself
        return m

    def plain(self, window: int | None = None) -> str | None:
        """'causal' when the mask is exactly the causal one of queries at 0..S-1 over keys 0..S-1
        (no cache, no padding, a window that covers every key): SDPA's is_causal path; 'all'
        when every query may attend every key (one new token after the cache, no padding, the
        window covering every key): no mask at all; None when an explicit mask is needed."""
        T = self.k_index.shape[0]
        if not self.dense or (window and window < T):
            return None
        if self.past == 0:
            return "causal"
        return "all" if self.q_index.shape[0] == 1 else None

    def float_mask(self, dtype: torch.dtype, window: int | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        """The additive form of mask(window) for SDPA: 0 where allowed, -inf elsewhere, plus
        `bias` (broadcast to [B, H, S, T]) where given. Built once per forward for the same
        window, dtype and bias tensor."""
        key = ("float", window or None, dtype)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is bias:
            return hit[1]
        allowed = self.mask(window)
        if bias is None:
            m = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
        else:
            m = bias.to(dtype).masked_fill(~allowed, float("-inf"))
        self._cache[key] = (bias, m)
        return m


def prepare_step(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None, cache: KVCache | None) -> Step:
    B, S = input_ids.shape
    if cache is not None and cache.static:
        return _static_step(input_ids, positions, cache)
    past = cache.length if cache is not None else 0
    T = past + S
    dev = input_ids.device
    if attention_mask is None:
        key_mask = torch.ones(B, T, dtype=torch.bool, device=dev)
        dense = True
    else:
        key_mask = attention_mask.to(device=dev).bool()
        if tuple(key_mask.shape) != (B, T):
            raise ValueError(f"attention_mask must be [batch, past + new] = [{B}, {T}], got {list(key_mask.shape)}")
        dense = bool(key_mask.all())
    if positions is None:
        if dense:
            positions = torch.arange(past, T, device=dev).expand(B, S)
        else:
            positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    idx = torch.arange(T, device=dev)
    return Step(positions=positions.to(dev), key_mask=key_mask, past=past, q_index=idx[past:], k_index=idx,
                dense=dense)


def _static_step(input_ids: torch.Tensor, positions: torch.Tensor | None, cache: KVCache) -> Step:
    """The Step of a static-mode decode step (KVCache.start_static): device tensors only, no
    host synchronisation, the same shapes at every step (the mask is built over the first
    `cache.attend` positions; the attention mask of the call is the cache's own)."""
    if input_ids.shape[1] != 1:
        raise ValueError(f"a static-cache step takes one new token per sequence, got {input_ids.shape[1]}")
    if input_ids.shape[0] != cache.key_mask.shape[0]:  # type: ignore[union-attr]
        raise ValueError(f"a static-cache step takes a batch of {cache.key_mask.shape[0]}, "  # type: ignore[union-attr]
                         f"got {input_ids.shape[0]}")
    cache.key_mask.index_fill_(1, cache.slot, True)  # type: ignore[union-attr,arg-type]
    a = cache.attend
    return Step(positions=cache.positions if positions is None else positions,  # type: ignore[arg-type]
                key_mask=cache.key_mask[:, :a], past=-1, q_index=cache.slot,  # type: ignore[index,arg-type]
                k_index=cache.k_index[:a], dense=False)  # type: ignore[index]


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] keys or values -> [B, heads, T, D], each kv head repeated for its group of
    query heads (grouped-query attention)."""
    B, Hkv, T, D = x.shape
    return x[:, :, None].expand(B, Hkv, heads // Hkv, T, D).reshape(B, heads, T, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Step | torch.Tensor, scale: float,
              bias: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """q [B,H,S,D], k/v [B,Hkv,T,D] (grouped-query when Hkv < H) -> [B,S,H*D].

    mask: the forward's Step (the usual argument: its causal / padding / sliding-`window` mask,
    built once per forward; no mask at all when it is purely causal, SDPA's is_causal path),
    or an explicit [B,1,S,T] bool tensor (True: may attend). bias: an optional additive bias
    broadcastable to [B,H,S,T] (ALiBi), added where attention is allowed."""
    H, Hkv = q.shape[1], k.shape[1]
    attn_mask: torch.Tensor | None = None
    is_causal = False
    if isinstance(mask, Step):
        plain = mask.plain(window)
        if plain is None or (bias is not None and plain == "causal"):
            attn_mask = mask.float_mask(q.dtype, window, bias)
        elif bias is not None:  # "all": the bias alone
            attn_mask = bias.to(q.dtype)
        else:
            is_causal = plain == "causal"
    elif bias is None:
        attn_mask = mask
    else:
        attn_mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
    kw = {}
    if Hkv != H:
        # SDPA's own grouped-query path (no copies of k and v) where its kernel takes it: on the CPU
        # always, elsewhere without a mask (CUDA falls back to the math kernel with one)
        if SDPA_GQA and (attn_mask is None or q.device.type == "cpu"):
            kw["enable_gqa"] = True
        else:
            k, v = repeat_kv(k, H), repeat_kv(v, H)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **kw)
    B, _, S, D = out.shape
    return out.transpose(1, 2).reshape(B, S, H * D)


# ----------------------------------------------------------------------------- rotary
def rope_settings(cfg: Mapping[str, Any], default_theta: float = 10000.0,
                  default_partial: float = 1.0) -> dict[str, Any]:
    """The RoPE parameters of a config in either spelling (transformers 5 `rope_parameters`,
    or the older `rope_theta` + `rope_scaling` / GPT-NeoX's `rotary_emb_base` + `rotary_pct`)."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise InputError("config.json: per-layer RoPE parameters are not supported by kbit's runner")
    theta = rp.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", default_theta)))
    partial = rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", default_partial)))
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    rtype = "longrope" if rtype == "su" else rtype  # Phi-3's first configs
    out = dict(rp)
    out.update(rope_type=rtype, rope_theta=float(theta), partial_rotary_factor=float(partial))
    if rtype == "longrope" and cfg.get("original_max_position_embeddings"):
        # transformers gives a top-level original_max_position_embeddings (Phi-3) priority
        out["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    if rtype in ("llama3", "yarn", "longrope"):
        out.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    if rtype in ("yarn", "longrope"):
        out["max_position_embeddings"] = cfg.get("max_position_embeddings")
    return out


#: "dynamic" (dynamic NTK) is the default RoPE for every sequence within max_position_embeddings,
#: which is as far as the runner goes (a longer prompt is refused): transformers only rescales
#: its base for longer sequences
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _context_factor(settings: Mapping[str, Any]) -> float:
    """YaRN's and LongRoPE's factor; without one, the ratio of the extended and the pretrained
    context (DeepSeek, Phi-3)."""
    factor = settings.get("factor")
    if factor is None:
        factor = settings["max_position_embeddings"] / settings["original_max_position_embeddings"]
    return float(factor)


def rope_attention_scaling(settings: Mapping[str, Any]) -> float:
    """The factor YaRN and LongRoPE apply to cos and sin (1.0 for the other RoPE types)."""
    rtype = settings["rope_type"]
    if rtype not in ("yarn", "longrope"):
        return 1.0
    try:
        if settings.get("attention_factor") is not None:
            return float(settings["attention_factor"])
        factor = _context_factor(settings)
        if rtype == "longrope":
            old = settings["original_max_position_embeddings"]
            return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        mscale, mscale_all_dim = settings.get("mscale"), settings.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        return _yarn_mscale(factor)
    except (KeyError, TypeError, ZeroDivisionError):
        raise InputError(f"config.json: the {rtype} RoPE scaling needs a factor (or max_position_embeddings and "
                         "original_max_position_embeddings)") from None


def _rope_powers(base: float, dim: int) -> torch.Tensor:
    """base ** (2i / dim) for the dim / 2 rotated pairs, float32 (1 / it: the default RoPE)."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim)


def _yarn_inv_freq(settings: Mapping[str, Any], dim: int, pos: torch.Tensor) -> torch.Tensor:
    """YaRN's blend of interpolated (divided by factor) and extrapolated (unchanged)
    frequencies, with a linear ramp between the dimensions that turn beta_fast and beta_slow
    times over the pretrained context; in float32, in transformers' order of operations."""
    factor = _context_factor(settings)
    base = settings["rope_theta"]
    old = settings["original_max_position_embeddings"]
    fast, slow = settings.get("beta_fast") or 32, settings.get("beta_slow") or 1

    def dim_of(turns: float) -> float:  # the dimension whose wavelength fits `turns` times into old
        return (dim * math.log(old / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of(fast), dim_of(slow)
    if settings.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # weight of the extrapolated (unscaled) frequency
    return (1.0 / (factor * pos)) * (1 - keep) + (1.0 / pos) * keep


def rope_inv_freq(settings: Mapping[str, Any], head_dim: int) -> torch.Tensor:
    """float32 inverse frequencies, computed exactly as transformers does (on the CPU)."""
    rtype = settings["rope_type"]
    if rtype not in SUPPORTED_ROPE:
        raise InputError(f"config.json: RoPE type {rtype!r} is not supported by kbit's runner "
                         f"(supported: {', '.join(SUPPORTED_ROPE)})")
    base = settings["rope_theta"]
    dim = int(head_dim * settings["partial_rotary_factor"])
    if dim <= 0 or dim % 2:  # the features rotate in pairs (transformers fails on such a model too)
        raise InputError(f"config.json: the rotary covers {dim} of the {head_dim} features of a head "
                         f"(partial_rotary_factor {settings['partial_rotary_factor']}); it must be a positive "
                         "even number")
    pos = _rope_powers(base, dim)
    inv_freq = 1.0 / pos
    try:
        if rtype == "linear":
            inv_freq = inv_freq / settings["factor"]
        elif rtype == "yarn":
            inv_freq = _yarn_inv_freq(settings, dim, pos)
        elif rtype == "longrope":  # the short factors; rope_long_inv_freq gives the long ones
            inv_freq = _longrope_inv_freq(settings["short_factor"], pos)
        elif rtype == "llama3":
            factor = settings["factor"]
            low, high = settings["low_freq_factor"], settings["high_freq_factor"]
            old = settings["original_max_position_embeddings"]
            low_wl, high_wl = old / low, old / high
            wavelen = 2 * math.pi / inv_freq
            f = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
            smooth = (old / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * f / factor + smooth * f
            medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
            inv_freq = torch.where(medium, smoothed, f)
    except KeyError as e:
        raise InputError(f"config.json: the {rtype} RoPE scaling lacks the field {e.args[0]!r}") from None
    return inv_freq


def _longrope_inv_freq(factors, pos: torch.Tensor) -> torch.Tensor:
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
    if ext.shape != pos.shape:
        raise InputError(f"config.json: a LongRoPE factor list has {ext.numel()} values; the rotary needs "
                         f"{pos.numel()}")
    return 1.0 / (ext * pos)


def rope_long_inv_freq(settings: Mapping[str, Any], head_dim: int) -> torch.Tensor | None:
    """LongRoPE's frequencies for sequences longer than original_max_position_embeddings
    (None for the other types)."""
    if settings["rope_type"] != "longrope":
        return None
    try:
        dim = int(head_dim * settings["partial_rotary_factor"])
        return _longrope_inv_freq(settings["long_factor"], _rope_powers(settings["rope_theta"], dim))
    except KeyError as e:
        raise InputError(f"config.json: the longrope RoPE scaling lacks the field {e.args[0]!r}") from None


class Rotary(nn.Module):
    """cos/sin tables for position ids; inv_freq is a non-persistent buffer. With LongRoPE,
    a forward whose positions reach past `switch` uses long_inv_freq for all its tokens (as
    transformers does; chosen on the device, so a CUDA graph keeps the choice live)."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0, long_inv_freq: torch.Tensor | None = None,
                 switch: int | None = None) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.to(device="cpu"), persistent=False)
        self.scaling = float(scaling)  # YaRN's and LongRoPE's attention factor on cos and sin
        self.register_buffer("long_inv_freq", None if long_inv_freq is None else long_inv_freq.to(device="cpu"),
                             persistent=False)
        self.switch = switch

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], head_dim: int) -> "Rotary":
        """The rotary of rope_settings(config) for heads of head_dim features."""
        long = rope_long_inv_freq(settings, head_dim)
        return cls(rope_inv_freq(settings, head_dim), rope_attention_scaling(settings), long,
                   settings.get("original_max_position_embeddings") if long is not None else None)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, 1, S, dim] for apply_rotary; sin has its first half negated (the sign
        of rotate_half folded in once per forward instead of in every layer)."""
        inv = self.inv_freq
        if inv.device != positions.device:
            inv = inv.to(positions.device)
        if self.long_inv_freq is not None:
            inv = torch.where(positions.max() + 1 > self.switch, self.long_inv_freq.to(positions.device), inv)
        freqs = positions.float()[..., None] * inv.float()        # [B, S, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = freqs.sin()
        cos, sin = emb.cos(), torch.cat((-sin, sin), dim=-1)
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


class Float32Rotary(Rotary):
    """Rotary whose tables stay float32 whatever the compute dtype (DeepSeek-V2's and Llama 4's
    complex-number rotaries, OLMo's float32 one)."""

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(positions, torch.float32)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,S,D]; rotates the first cos.shape[-1] features (partial rotary) and keeps the rest.
    cos, sin: Rotary's (sin with its first half negated).
    The result has x's memory order: when x is a [B,S,H,D] tensor seen as [B,H,S,D] (a projection
    viewed per head and transposed), so is the result, and attention's output then needs no copy."""
    if x.dim() == 4 and x.stride(1) < x.stride(2):
        return _rotate(x.transpose(1, 2), cos.transpose(1, 2), sin.transpose(1, 2)).transpose(1, 2)
    return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # transformers' x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1): here
    # (x2, x1) * (-s, s) with the sign in Rotary's sin, the same bits ((-x2) * s == x2 * (-s))
    # in four kernels (cat, mul, mul, add) instead of seven
    rd = cos.shape[-1]
    h = rd // 2
    xr = x if rd == x.shape[-1] else x[..., :rd]
    out = xr * cos + torch.cat((xr[..., h:], xr[..., :h]), dim=-1) * sin
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J's rotary ("rotate every two"): the rotated pairs are adjacent features (x[2i], x[2i+1])
    instead of the two halves. x [B,H,S,D]; rotates the first cos.shape[-1] features and keeps the
    rest. cos, sin: Rotary's, whose halves each hold every frequency once (sin's first half negated,
    so its second half is the plain sin). Bit for bit transformers' x * cos + rotate_every_two(x) * sin
    (x1 * c - x2 * s is x1 * c + (-x2) * s exactly)."""
    rd = cos.shape[-1]
    h = rd // 2
    c, s = cos[..., :h], sin[..., h:]
    pairs = x[..., :rd].unflatten(-1, (h, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


# ----------------------------------------------------------------------------- norms, activations
#: F.rms_norm (torch >= 2.4; a single fused kernel on CUDA in recent releases)
FUSED_RMS_NORM = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    #: round the normalised value to x's dtype before the weight multiplies it (Llama), or
    #: after (OLMo 2: the product in float32, then rounded)
    round_first = True

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if x.is_cuda and FUSED_RMS_NORM and self.weight.dtype == dtype:
            # one kernel (torch's fused CUDA RMSNorm) instead of eight; it multiplies by the
            # weight before rounding to x's dtype (transformers rounds, then multiplies): at
            # most an ulp of float16 apart, the same to float32 rounding in float32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype) if self.round_first else (self.weight * h).to(dtype)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),  # ReLU² (Arcee)
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "tanh": torch.tanh,
}


def activation(name: str, arch: str = "model"):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise InputError(f"config.json: activation {name!r} of this {arch} model is not supported "
                         f"(supported: {', '.join(sorted(ACTIVATIONS))})") from None


def linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias)


def fuse_projections(model: nn.Module) -> int:
    """Ask every submodule with a fuse() method (attention: q/k/v; gated MLPs: gate/up) to run
    its projections that share an input as one layer (layers.fuse_linears); returns how many
    groups were fused. Done once after loading (runner.load(fuse=True))."""
    return sum(bool(m.fuse()) for m in list(model.modules()) if callable(getattr(m, "fuse", None)))


def fuse_group(module: nn.Module, fused_name: str, names: tuple[str, ...]) -> bool:
    """module's linear layers `names` (fed the same input) -> one layer `fused_name` whose
    output is theirs concatenated in that order (layers.fuse_linears); the separate layers are
    dropped. False (nothing changed) when they cannot be fused; True when fused (now or before)."""
    if getattr(module, fused_name, None) is None:
        from ..layers import fuse_linears
        fused = fuse_linears([getattr(module, n) for n in names])
        if fused is None:
            return False
        for n in names:
            delattr(module, n)
        setattr(module, fused_name, fused)
    return True
