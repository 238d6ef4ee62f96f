"""Shape checks shared by the kernel implementations. Numba kernels do not check bounds,
so arrays that do not fit together are refused here, before any kernel runs."""
from __future__ import annotations

from kbitformat import KbitValueError


def _shape(a) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


def check_block(B: int) -> int:
    B = int(B)
    if B <= 0 or B % 32:
        raise KbitValueError(f"block size must be a positive multiple of 32, got {B}")
    return B


def check_x(x, B: int) -> tuple[int, int, int]:
    """(rows, cols, blocks per row) of a 2-D weight array."""
    if len(x.shape) != 2:
        raise KbitValueError(f"kernels take 2-D (rows, cols) arrays, got shape {_shape(x)}")
    rows, cols = _shape(x)
    return rows, cols, -(-cols // B)


def check_bits(k: int) -> int:
    k = int(k)
    if not 1 <= k <= 8:
        raise KbitValueError(f"bits must be 1..8, got {k}")
    return k


#: code layouts of a packed weight: the format's bit planes, or the runner's bytes
CODE_LAYOUTS = ("planes", "bytes")
#: widths with the runner's "bytes" code layout (8 // k whole codes per byte)
BYTE_LAYOUT_BITS = (2, 4, 8)


def check_byte_bits(k: int) -> int:
    """k, checked to be a width the byte code layout holds (2, 4 or 8)."""
    k = check_bits(k)
    if k not in BYTE_LAYOUT_BITS:
        raise KbitValueError(f"the byte code layout holds k = 2, 4 or 8 bits, got {k}")
    return k


def check_blockwise(name: str, a, shape: tuple[int, ...]) -> None:
    if a is not None and _shape(a) != tuple(shape):
        raise KbitValueError(f"{name} has shape {_shape(a)}, expected {tuple(shape)}")


def check_codebook(cb, mids, k: int | None = None) -> None:
    n = int(cb.shape[0])
    if len(cb.shape) != 1 or n < 2 or n > 256 or (k is not None and n != 1 << k):
        raise KbitValueError(f"codebook of shape {_shape(cb)} does not fit {k} bits")
    if mids is not None and _shape(mids) != (n - 1,):
        raise KbitValueError(f"midpoints of shape {_shape(mids)} for a codebook of {n} values")


def check_words(words, k: int, B: int, cols: int, s, o) -> tuple[int, int]:
    """(rows, blocks per row) of packed words that must decode to `cols` columns."""
    if len(words.shape) != 2 or len(s.shape) != 2:
        raise KbitValueError(f"words {_shape(words)} and scales {_shape(s)} must be 2-D")
    rows, nb = _shape(s)
    if nb * B < cols or (nb - 1) * B >= max(cols, 1):
        raise KbitValueError(f"{nb} blocks of {B} do not hold {cols} columns")
    check_blockwise("words", words, (rows, nb * (B // 32) * k))
    check_blockwise("offsets", o, (rows, nb))
    return rows, nb


def check_search(x, B: int, cand_s, cand_o, cb, mids) -> tuple[int, int, int, int]:
    """(B, rows, cols, blocks per row) for the `search` op: candidate scales (and offsets)
    shaped (candidates, rows, blocks), a codebook with its midpoints."""
    B = check_block(B)
    rows, cols, nb = check_x(x, B)
    if len(cand_s.shape) != 3:
        raise KbitValueError(f"candidate scales must be (candidates, rows, blocks), got {_shape(cand_s)}")
    check_blockwise("candidate scales", cand_s, (cand_s.shape[0], rows, nb))
    check_blockwise("candidate offsets", cand_o, (cand_s.shape[0], rows, nb))
    check_codebook(cb, mids)
    return B, rows, cols, nb

