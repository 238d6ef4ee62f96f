"""Build the golden files in this folder WITHOUT the kbitformat library.

Each vector is written with the plain `safetensors` package from hand-chosen codes,
scales and codebooks, packed by the straightforward bit loop below, with the expected
dequantized values computed here by the formulas of SPEC.md. tests/test_vectors.py
checks that kbitformat's reader decodes every file to exactly these values, so the
reader is tested against an independent writer of the spec.

    python formats/vectors/make_vectors.py      # rewrites the vectors (deterministic)
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HERE = Path(__file__).parent
E8 = np.exp2((np.arange(256, dtype=np.float64) - 184) / 16.0).astype(np.float32)


def pack_bitplanes(codes: np.ndarray, k: int) -> np.ndarray:
    rows, n = codes.shape
    out = np.zeros((rows, n // 32 * k), dtype=np.uint32)
    for r in range(rows):
        for g in range(n // 32):
            for j in range(k):
                w = 0
                for t in range(32):
                    w |= ((int(codes[r, g * 32 + t]) >> j) & 1) << t
                out[r, g * k + j] = w
    return out


def crc(a: np.ndarray) -> str:
    return "crc32:%08x" % (zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF)


def vector(name, shape, k, dtype, block, scale, codebook, seed, affine=False):
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    cols = shape[-1]
    B = block if block else -(-cols // 32) * 32
    nb = -(-cols // B)
    codes = rng.integers(0, 2**k, size=(rows, nb * B))
    cb = np.asarray(codebook, dtype=np.float32)
    t = {}
    if scale == "fp32":
        s = rng.uniform(0.01, 2, size=(rows, nb)).astype(np.float32)
        t["scales"] = s
    elif scale == "fp16":
        h = rng.uniform(0.01, 2, size=(rows, nb)).astype(np.float16)
        t["scales"], s = h, h.astype(np.float32)
    elif scale == "e8":
        c = rng.integers(100, 250, size=(rows, nb)).astype(np.uint8)
        t["scales"], s = c, E8[c]
    elif scale == "dq":
        c = rng.integers(0, 256, size=(rows, nb)).astype(np.uint8)
        ng = -(-rows * nb // 256)
        gmax = rng.uniform(0.1, 3, size=ng).astype(np.float32)
        g = np.repeat(gmax, 256)[: rows * nb].reshape(rows, nb)
        t["scales"], t["dq_absmax"] = c, gmax
        s = ((g * c.astype(np.float32)) / np.float32(255)).astype(np.float32)
    v = (cb[codes].reshape(rows, nb, B) * s[..., None]).astype(np.float32)
    if affine:
        if scale in ("e8", "dq"):
            z = rng.integers(0, 256, size=(rows, nb)).astype(np.uint8)
            t["offsets"] = z
            o = (-(s * z.astype(np.float32)) / np.float32(255)).astype(np.float32)
        else:
            o = -rng.uniform(0, 1, size=(rows, nb)).astype(np.float32 if scale == "fp32" else np.float16)
            t["offsets"] = o
            o = o.astype(np.float32)
        v = (v + o[..., None]).astype(np.float32)
    expected = v.reshape(rows, nb * B)[:, :cols].reshape(shape)
    stored = {"codes": pack_bitplanes(codes, k), **t}
    tensors = {f"{name}.kbit.{c}": a for c, a in stored.items()}
    recipe = {"quantized": True, "shape": list(shape), "orig_dtype": "float32", "bits": k,
              "dtype": dtype, "block_size": B, "scale": scale, "search": "none",
              "fp_exponent": None, "codebook": [float(x) for x in cb],
              "components": {c: f"{name}.kbit.{c}" for c in stored}}
    plain = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    tensors["plain"] = plain
    meta = {"format": "pt", "kbit.format": "kbit", "kbit.version": "1.0", "kbit.tool": "make_vectors.py",
            "kbit.tensors": json.dumps({name: recipe, "plain": {"quantized": False, "shape": [2, 3], "orig_dtype": "float32"}}),
            "kbit.checksums": json.dumps({n: crc(a) for n, a in tensors.items()}), "kbit.model": "{}"}
    save_file(tensors, str(HERE / f"{name}.safetensors"), metadata=meta)
    np.save(HERE / f"{name}.expected.npy", expected)


def main() -> None:
    L = 7
    int4 = (np.arange(16) - 8) / L
    vector("int4_b32_fp32", (2, 40), 4, "int", 32, "fp32", int4, 1)
    vector("custom3_b64_e8", (3, 64), 3, "quantile", 64, "e8", [-1, -0.5, -0.2, 0, 0.1, 0.3, 0.6, 1], 2)
    vector("affine5_b32_dq", (1, 100), 5, "affine", 32, "dq", np.arange(32) / 31, 3, affine=True)
    vector("affine4_b64_fp16", (4, 64), 4, "affine", 64, "fp16", np.arange(16) / 15, 4, affine=True)
    vector("nf2_1d_fp16", (33,), 2, "nf", 32, "fp16", [-1, 0, 0.3379, 1], 5)
    vector("int8_row_3d_fp32", (2, 3, 70), 8, "int", 0, "fp32", (np.arange(256) - 128) / 127, 6)
    vector("dq_many_groups", (3, 320 * 32), 2, "int", 32, "dq", [-2, -1, 0, 1], 7)


if __name__ == "__main__":
    main()
