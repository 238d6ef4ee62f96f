"""Constants of the kbit format: names, versions, limits and the fixed tables.

Everything a reader needs to interpret a file is either here (fixed by the format
version) or written into the file itself.
"""
from __future__ import annotations

import numpy as np

FORMAT_NAME = "kbit"
#: (major, minor). A reader accepts any minor of its own major; a new major means the
#: meaning of some byte changed and old readers must refuse the file.
FORMAT_VERSION = (1, 0)
FORMAT_VERSION_STR = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"

DTYPES = ("int", "affine", "fp", "nf", "quantile", "lloyd", "dynamic")
SCALE_ENCODINGS = ("fp16", "fp32", "dq", "e8")
SEARCHES = ("none", "mse")

MIN_BITS, MAX_BITS = 2, 8
MIN_BLOCK, MAX_BLOCK = 32, 4096
GROUP = 32  # weights per packed group: k uint32 bit-planes per 32 weights

#: Paper's heuristic: exponent bits of the k-bit float for k = 2..8.
FP_DEFAULT_EXPONENT = {2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4}

#: Double quantization: 8-bit codes for the block scales in groups of DQ_GROUP
#: consecutive blocks (row-major over the whole tensor), one fp32 maximum per group.
DQ_GROUP = 256

#: e8 scales: one byte per block, code c decodes to 2 ** ((c - E8_BIAS) / 16), i.e.
#: 1/16-octave steps from 2**-11.5 (3.5e-4) to 2**4.4375 (21.7). No per-tensor constant.
E8_BIAS = 184
E8_TABLE = np.exp2((np.arange(256, dtype=np.float64) - E8_BIAS) / 16.0).astype(np.float32)

#: Affine zero points (with e8 or dq scales) are bytes z: offset = -(scale * z) / 255.
ZP_LEVELS = 255

#: Clip ratios tried by the `mse` scale search, in this order (first minimum wins).
SEARCH_RATIOS_SYM = (1.0 - 0.02 * np.arange(20)).astype(np.float32)
SEARCH_RATIOS_AFFINE = (1.0 - 0.02 * np.arange(11)).astype(np.float32)
SEARCH_SHIFTS_AFFINE = np.array([0.0, -0.02, 0.02], dtype=np.float32)

#: The quantile type estimates its codebook from at most this many values (a fixed
#: stride through the flattened tensor); smaller tensors use every value.
QUANTILE_SAMPLE = 1 << 18
