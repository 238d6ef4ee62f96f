"""Shared option types and small helpers of the commands."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UsageError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json output).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where kernels run: cpu or cuda.")]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'2GB', '500MiB', '1e9'-free integers... -> bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"cannot read the size {text!r}; write e.g. 2GB, 500MB, 4GiB or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n < 1024:
        raise UsageError(f"the size {text!r} is too small (at least 1KiB)")
    return n


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def stderr_is_tty() -> bool:
    return sys.stderr.isatty() and not __import__("os").environ.get("CI")


def existing_path(text: str) -> Path:
    p = Path(text).expanduser()
    if not p.exists():
        raise UsageError(f"{text}: no such file or folder")
    return p
