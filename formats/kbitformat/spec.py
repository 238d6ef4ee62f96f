"""QuantSpec: what to do to one tensor, validated before any work starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .constants import (DTYPES, FP_DEFAULT_EXPONENT, GROUP, MAX_BITS, MAX_BLOCK, MIN_BITS,
                        MIN_BLOCK, SCALE_ENCODINGS, SEARCHES)
from .errors import KbitValueError


@dataclass(frozen=True)
class QuantSpec:
    """k bits of `dtype` in blocks of `block_size` weights along each row.

    block_size 0 means "one block per row" (the row length rounded up to 32).
    """

    bits: int = 4
    dtype: str = "nf"
    block_size: int = 64
    scale: str = "fp16"
    search: str = "none"
    fp_exponent: int | None = None  # only for dtype 'fp'; None = the paper's heuristic

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise KbitValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        if self.dtype not in DTYPES:
            raise KbitValueError(f"unknown data type {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        b = self.block_size
        if not isinstance(b, int) or not (b == 0 or (MIN_BLOCK <= b <= MAX_BLOCK and b % GROUP == 0)):
            raise KbitValueError(
                f"block size must be a multiple of {GROUP} from {MIN_BLOCK} to {MAX_BLOCK} "
                f"(or 'row'), got {b!r}")
        if self.scale not in SCALE_ENCODINGS:
            raise KbitValueError(f"unknown scale encoding {self.scale!r}; choose one of {', '.join(SCALE_ENCODINGS)}")
        if self.search not in SEARCHES:
            raise KbitValueError(f"unknown scale search {self.search!r}; choose one of {', '.join(SEARCHES)}")
        if self.fp_exponent is not None:
            if self.dtype != "fp":
                raise KbitValueError("an exponent width only applies to the fp data type")
            if not 1 <= self.fp_exponent <= self.bits - 1:
                raise KbitValueError(f"fp with {self.bits} bits takes 1..{self.bits - 1} exponent bits, got {self.fp_exponent}")

    @property
    def affine(self) -> bool:
        return self.dtype == "affine"

    @property
    def exponent_bits(self) -> int | None:
        if self.dtype != "fp":
            return None
        return self.fp_exponent if self.fp_exponent is not None else FP_DEFAULT_EXPONENT[self.bits]

    def block_for(self, cols: int) -> int:
        """The block size used for rows of `cols` weights."""
        if self.block_size:
            return self.block_size
        return max(GROUP, -(-cols // GROUP) * GROUP)

    def label(self) -> str:
        """Short human form, e.g. '4:nf:b64:fp16' (also accepted by parse)."""
        b = "row" if self.block_size == 0 else str(self.block_size)
        s = f"{self.bits}:{self.dtype}:b{b}:{self.scale}"
        if self.search != "none":
            s += f":{self.search}"
        if self.fp_exponent is not None:
            s += f":e{self.fp_exponent}"
        return s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str, base: "QuantSpec | None" = None) -> "QuantSpec":
        """Parse 'K[:TYPE][:bB|:row][:SCALE][:mse][:eE]' (fields in any order after K)
        on top of `base`. Example: '6:fp', '3:quantile:b32:dq:mse'."""
        base = base or cls()
        fields = asdict(base)
        parts = [p.strip() for p in text.strip().split(":") if p.strip()]
        if not parts:
            raise KbitValueError("empty quantization spec")
        try:
            fields["bits"] = int(parts[0])
        except ValueError:
            raise KbitValueError(f"spec {text!r} must start with the number of bits, e.g. '4:nf'") from None
        for p in parts[1:]:
            if p in DTYPES:
                fields["dtype"] = p
            elif p in SCALE_ENCODINGS:
                fields["scale"] = p
            elif p in SEARCHES:
                fields["search"] = p
            elif p == "row":
                fields["block_size"] = 0
            elif p[0] == "b" and p[1:].isdigit():
                fields["block_size"] = int(p[1:])
            elif p[0] == "e" and p[1:].isdigit():
                fields["fp_exponent"] = int(p[1:])
            else:
                raise KbitValueError(f"cannot read {p!r} in spec {text!r}: expected a data type "
                                     f"({', '.join(DTYPES)}), bNN, row, a scale encoding "
                                     f"({', '.join(SCALE_ENCODINGS)}), mse or eN")
        if fields["dtype"] != "fp":
            fields["fp_exponent"] = None
        return cls(**fields)
