"""kbit: k-bit quantization of LLM checkpoints, with proof that they still work."""
from __future__ import annotations

__version__ = "0.1.0"
