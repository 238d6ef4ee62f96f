"""Writer and reader: round trips, sharding, and every kind of damage a file can suffer."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from kbitformat import QuantSpec, dequantize, quantize
from kbitformat.errors import KbitChecksumError, KbitFormatError, KbitValueError, KbitVersionError
from kbitformat.io import INDEX_NAME, KbitReader, KbitWriter, bf16_to_f32, f32_to_bf16

rng = np.random.default_rng(1)


def write_model(path, n=6, shard=20_000, spec=QuantSpec(4, "nf", 64, "dq")):
    tensors = {f"layers.{i}.w": rng.standard_normal((48, 200)).astype(np.float32) for i in range(n)}
    qts = {}
    with KbitWriter(path, max_shard_bytes=shard, model_metadata={"source": "test"}, tool="kbit test") as w:
        for name, x in tensors.items():
            qts[name] = quantize(x, spec, name)
            w.add_quantized(name, qts[name])
        w.add_tensor("norm.weight", np.linspace(0, 1, 200, dtype=np.float32))
        w.add_tensor("embed.weight", f32_to_bf16(tensors["layers.0.w"]), st_dtype="BF16")
    return tensors, qts


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_round_trip_sharded(tmp_path):
    tensors, qts = write_model(tmp_path)
    files = shards(tmp_path)
    assert len(files) > 1 and files[0].name.endswith(f"-of-{len(files):05d}.safetensors")
    assert all(f.stat().st_size <= 20_000 + 20_000 for f in files)  # bounded (header beside)
    assert not list(tmp_path.glob("*.tmp"))
    r = KbitReader(tmp_path)
    assert r.model_metadata == {"source": "test"}
    assert set(r.names()) == set(tensors) | {"norm.weight", "embed.weight"}
    for name in tensors:
        assert np.array_equal(r.load(name), dequantize(qts[name]))
    assert np.array_equal(r.load("norm.weight"), np.linspace(0, 1, 200, dtype=np.float32))
    assert np.allclose(r.load("embed.weight"), tensors["layers.0.w"], rtol=1 / 128)
    assert r.recipe("embed.weight")["orig_dtype"] == "bfloat16"
    assert r.verify_all() == []


def test_files_open_with_plain_safetensors_and_index_is_complete(tmp_path):
    write_model(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    seen = {}
    for f in shards(tmp_path):
        with safe_open(str(f), "pt") as s:
            meta = s.metadata()
            assert meta["format"] == "pt" and meta["kbit.format"] == "kbit" and meta["kbit.version"] == "1.0"
            for key in s.keys():
                seen[key] = f.name
                s.get_tensor(key)
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(f.stat().st_size for f in shards(tmp_path)) - sum(
        8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in shards(tmp_path))


def test_one_tensor_per_shard_when_shards_are_tiny(tmp_path):
    write_model(tmp_path, n=3, shard=1)
    assert len(shards(tmp_path)) == 5


def test_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with KbitWriter(tmp_path, max_shard_bytes=1) as w:
            w.add_tensor("a", np.ones(10, np.float32))
            w.add_tensor("b", np.ones(10, np.float32))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writer_misuse(tmp_path):
    w = KbitWriter(tmp_path)
    w.add_tensor("a", np.ones(3, np.float32))
    with pytest.raises(KbitValueError, match="already"):
        w.add_tensor("a", np.ones(3, np.float32))
    w.close()
    with pytest.raises(KbitValueError, match="closed"):
        w.add_tensor("b", np.ones(3, np.float32))


def one_file(tmp_path):
    write_model(tmp_path, n=2, shard=10**9)
    (f,) = shards(tmp_path)
    return f


def rewrite_header(f, edit):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    f.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n:])


def test_truncated_file(tmp_path):
    f = one_file(tmp_path)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(KbitFormatError, match="truncated"):
        KbitReader(f)


def test_truncated_to_nothing(tmp_path):
    f = one_file(tmp_path)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(KbitFormatError, match="too short"):
        KbitReader(f)


def test_header_length_beyond_file(tmp_path):
    f = one_file(tmp_path)
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    with pytest.raises(KbitFormatError, match="header length"):
        KbitReader(f)


def test_garbage_header(tmp_path):
    f = one_file(tmp_path)
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    with pytest.raises(KbitFormatError, match="corrupt safetensors header"):
        KbitReader(f)


def test_overlapping_offsets(tmp_path):
    f = one_file(tmp_path)

    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    rewrite_header(f, edit)
    with pytest.raises(KbitFormatError, match="overlap|gap|after the last"):
        KbitReader(f)


def test_offsets_overflowing_the_file(tmp_path):
    f = one_file(tmp_path)

    def edit(h):
        k = next(k for k in h if k != "__metadata__")
        h[k]["data_offsets"] = [0, 2**62]
    rewrite_header(f, edit)
    with pytest.raises(KbitFormatError, match="truncated|ends at byte"):
        KbitReader(f)


def test_shape_that_disagrees_with_offsets(tmp_path):
    f = one_file(tmp_path)

    def edit(h):
        h["layers.0.w.kbit.scales"]["shape"] = [48, 5]
    rewrite_header(f, edit)
    with pytest.raises(KbitFormatError, match="need"):
        KbitReader(f)


def test_checksum_mismatch_detected_on_load(tmp_path):
    f = one_file(tmp_path)
    data = bytearray(f.read_bytes())
    data[-20] ^= 0x10  # inside the last tensor's data
    f.write_bytes(bytes(data))
    r = KbitReader(f)
    assert len(r.verify_all()) == 1
    with pytest.raises(KbitChecksumError, match="corrupt"):
        for name in r.names():
            r.load(name)


def test_unknown_major_version_is_refused(tmp_path):
    f = one_file(tmp_path)
    rewrite_header(f, lambda h: h["__metadata__"].update({"kbit.version": "2.3"}))
    with pytest.raises(KbitVersionError, match=r"needs kbit format version 2\.x.*Upgrade"):
        KbitReader(f)


def test_newer_minor_version_is_read(tmp_path):
    f = one_file(tmp_path)
    rewrite_header(f, lambda h: h["__metadata__"].update({"kbit.version": "1.9"}))
    assert KbitReader(f).verify_all() == []


def test_not_a_kbit_file(tmp_path):
    from safetensors.numpy import save_file
    save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(KbitFormatError, match="not a kbit file"):
        KbitReader(tmp_path / "plain.safetensors")


def test_missing_shard_and_missing_component(tmp_path):
    write_model(tmp_path)
    shards(tmp_path)[-1].unlink()
    with pytest.raises(KbitFormatError, match="missing shard"):
        KbitReader(tmp_path)


def test_recipe_that_does_not_fit_the_stored_parts(tmp_path):
    f = one_file(tmp_path)

    def edit(h):
        t = json.loads(h["__metadata__"]["kbit.tensors"])
        t["layers.0.w"]["bits"] = 3
        h["__metadata__"]["kbit.tensors"] = json.dumps(t)
    rewrite_header(f, edit)
    r = KbitReader(f, verify=False)
    with pytest.raises(KbitFormatError, match="layers.0.w"):
        r.load("layers.0.w")


def test_bf16_conversion():
    x = np.array([1.0, -2.5, 3.14159, 1e-30, np.inf, 65504.0, 1 + 2**-8], dtype=np.float32)
    b = f32_to_bf16(x)
    assert np.array_equal(bf16_to_f32(b)[[0, 1, 2, 4, 5]], np.array([1.0, -2.5, 3.140625, np.inf, 65536.0], np.float32))
    assert bf16_to_f32(b)[6] == 1.0  # ties to even
    import torch
    t = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(b, t)


def test_resume_adopts_finished_shards_and_drops_damaged_ones(tmp_path):
    meta = {"recipe": "r1"}
    w = KbitWriter(tmp_path, max_shard_bytes=1, model_metadata=meta)
    for i in range(4):
        w.add_tensor(f"t{i}", np.full(10, i, np.float32))
    w.abort(keep_finished=True)  # an interrupted run: shards for t0..t2 finished
    finished = sorted(tmp_path.glob(".shard-*.safetensors.tmp"))
    assert len(finished) == 3
    data = bytearray(finished[2].read_bytes())
    data[-1] ^= 1
    finished[2].write_bytes(bytes(data))
    w = KbitWriter(tmp_path, max_shard_bytes=1, model_metadata={"recipe": "other"}, resume=True)
    assert w.resumed == []  # another conversion's shards are not adopted
    w.abort()
    assert list(tmp_path.iterdir()) == []
    w = KbitWriter(tmp_path, max_shard_bytes=1, model_metadata=meta)
    for i in range(4):
        w.add_tensor(f"t{i}", np.full(10, i, np.float32))
    w.abort(keep_finished=True)
    data = bytearray(sorted(tmp_path.glob(".shard-*.safetensors.tmp"))[2].read_bytes())
    data[-1] ^= 1
    sorted(tmp_path.glob(".shard-*.safetensors.tmp"))[2].write_bytes(bytes(data))
    w = KbitWriter(tmp_path, max_shard_bytes=1, model_metadata=meta, resume=True)
    assert w.resumed == ["t0", "t1"]
    for i in (2, 3):
        w.add_tensor(f"t{i}", np.full(10, i, np.float32))
    w.close()
    r = KbitReader(tmp_path)
    assert [float(r.load(f"t{i}")[0]) for i in range(4)] == [0, 1, 2, 3]


def test_plain_export_has_no_kbit_metadata(tmp_path):
    with KbitWriter(tmp_path, kbit_metadata=False) as w:
        w.add_tensor("a", np.ones(3, np.float32))
    (f,) = shards(tmp_path)
    with safe_open(str(f), "np") as s:
        assert s.metadata() == {"format": "pt"}


def _write_with_room(path, reserve, spec=QuantSpec(8, "quantile", 64)):
    """Quantized (a quantile codebook of 256 values: the longest recipe) and plain tensors with
    long names, in shards of about two tensors, with KbitWriter(header_reserve=reserve)."""
    from kbitformat.io import header_bound
    r = np.random.default_rng(5)
    items = [(f"model.layers.{i}.self_attn.a_rather_long_projection_name_ü.weight", r.standard_normal((40, 130)))
             for i in range(5)] + [("model.norm.weight", np.ones(130, np.float32))]
    bounds = [header_bound(n, spec.bits if x.ndim == 2 else None) for n, x in items]
    with KbitWriter(path, max_shard_bytes=17_000, model_metadata={"source": "test ü"}, tool="kbit test",
                    header_reserve=reserve and (lambda k: reserve(bounds[k:]))) as w:
        for name, x in items:
            if x.ndim == 2:
                w.add_quantized(name, quantize(x.astype(np.float32), spec, name), {"error": 0.1234567890123})
            else:
                w.add_tensor(name, x)
    return items


def _split(f):
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return b[8:8 + n], b[8 + n:]


@pytest.mark.parametrize("kind", ["bound", "too small"])
def test_header_room_gives_the_same_shards_but_for_padding(tmp_path, kind, monkeypatch):
    """header_reserve: the data is written once, straight into the shard behind room for the
    header (no copy: _copy_rest is never called); the header is the same JSON padded with
    spaces, the data bytes the same, and plain safetensors reads it. Room that turns out too
    small falls back to the copy: byte for byte the shards written without room."""
    import kbitformat.io as kio
    _write_with_room(tmp_path / "plain", None)
    if kind == "bound":
        monkeypatch.setattr(kio, "_copy_rest", lambda *a: pytest.fail("the data was copied"))
        items = _write_with_room(tmp_path / "room", sum)
    else:
        items = _write_with_room(tmp_path / "room", lambda rest: 1)
    a, b = shards(tmp_path / "plain"), shards(tmp_path / "room")
    assert len(a) == len(b) >= 3
    for fa, fb in zip(a, b):
        (ha, da), (hb, db) = _split(fa), _split(fb)
        assert da == db
        if kind == "too small":
            assert ha == hb
        else:
            assert hb.rstrip(b" ") == ha.rstrip(b" ") and len(hb) % 8 == 0 and len(hb) > len(ha)
            with safe_open(str(fb), "np") as s:
                for key in s.keys():
                    s.get_tensor(key)
    r = KbitReader(tmp_path / "room")
    assert r.verify_all() == []
    ref = KbitReader(tmp_path / "plain")
    for name, _ in items:
        assert np.array_equal(r.load(name), ref.load(name))
    assert not [p for p in (tmp_path / "room").iterdir() if p.name.startswith(".")]


def test_header_bound_holds_for_long_names_and_codebooks(tmp_path):
    """The bound covers what a tensor really adds to the header (quantized with a 256-value
    codebook and an error, or plain), for names with characters JSON escapes."""
    from kbitformat.io import header_bound
    for name in ("w", "model.layers.0.mlp.down_proj.weight", 'we"ird\\name ü ' * 8):
        for bits, x in ((8, np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)), (None, None)):
            sizes = []
            for with_tensor in (False, True):
                out = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
                with KbitWriter(out, model_metadata={"s": 1}) as w:
                    w.add_tensor("anchor", np.zeros(8, np.float32))
                    if with_tensor and bits:
                        w.add_quantized(name, quantize(x, QuantSpec(bits, "quantile", 64), name),
                                        {"error": -1.2345678901234567e-300})
                    elif with_tensor:
                        w.add_tensor(name, np.zeros((3, 5, 7, 2), np.float32), orig_dtype="float32")
                sizes.append(len(_split(shards(out)[0])[0].rstrip(b" ")))
            bound = header_bound(name, bits, ndim=2 if bits else 4)
            assert 0 < sizes[1] - sizes[0] <= bound < 3 * (sizes[1] - sizes[0]) + 1024, (name, bits)


def test_interrupted_shard_with_room_is_removed_on_resume(tmp_path):
    w = KbitWriter(tmp_path, max_shard_bytes=1, header_reserve=lambda k: 4096)
    w.add_tensor("a", np.ones(10, np.float32))
    w.add_tensor("b", np.ones(10, np.float32))  # finishes shard 1, starts shard 2
    assert len(list(tmp_path.glob(".shard-*.safetensors.part"))) == 1
    del w  # killed: the unfinished shard stays as .part
    w2 = KbitWriter(tmp_path, max_shard_bytes=1, resume=True, header_reserve=lambda k: 4096)
    assert w2.resumed == ["a"] and not list(tmp_path.glob("*.part"))
    w2.add_tensor("b", np.ones(10, np.float32))
    w2.close()
    assert KbitReader(tmp_path).verify_all() == []


def _direct_model(path, direct_io):
    r = np.random.default_rng(9)
    with KbitWriter(path, max_shard_bytes=3_000_000, model_metadata={"source": "t"},
                    header_reserve=lambda k: 20_000, direct_io=direct_io) as w:
        for i in range(4):  # tensors of odd sizes, some larger than _DirectFile's staging buffer
            w.add_tensor(f"t{i}", r.integers(0, 255, 1_000_003 + i * 4_500_001, dtype=np.uint8))
        w.add_quantized("q", quantize(r.standard_normal((33, 100)).astype(np.float32), QuantSpec(4, "nf", 64)))


@pytest.mark.parametrize("refuse", [None, "open", "write"])
def test_direct_io_writes_the_same_bytes(tmp_path, monkeypatch, refuse):
    """direct_io=True (O_DIRECT from an aligned staging buffer, data at a multiple of
    DATA_ALIGN) gives the same files as buffered writes; where O_DIRECT is refused at open or
    at a write (EINVAL: tmpfs, ...), the writer goes on buffered, with the same bytes."""
    import errno as errno_mod
    import os
    import kbitformat.io as kio
    _direct_model(tmp_path / "buffered", False)
    direct_files, direct_opens = [], []
    real_open, real_pwrite = os.open, os.pwrite

    def fake_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            if refuse == "open":
                raise OSError(errno_mod.EINVAL, "no O_DIRECT here")
        fd = real_open(path, flags, *a)
        if flags & getattr(os, "O_DIRECT", 0):
            direct_files.append(fd)
            direct_opens.append(path)
        elif fd in direct_files:  # a closed O_DIRECT descriptor's number, reused
            direct_files.remove(fd)
        return fd

    def fake_pwrite(fd, data, offset):
        if refuse == "write" and fd in direct_files:
            raise OSError(errno_mod.EINVAL, "no O_DIRECT writes here")
        return real_pwrite(fd, data, offset)
    monkeypatch.setattr(kio.os, "open", fake_open)
    monkeypatch.setattr(kio.os, "pwrite", fake_pwrite)
    _direct_model(tmp_path / "direct", True)
    monkeypatch.undo()
    a, b = shards(tmp_path / "buffered"), shards(tmp_path / "direct")
    assert len(a) == len(b) > 1
    for fa, fb in zip(a, b):
        assert fa.read_bytes() == fb.read_bytes()
        assert (8 + struct.unpack("<Q", fb.read_bytes()[:8])[0]) % kio.DATA_ALIGN == 0
    assert KbitReader(tmp_path / "direct").verify_all() == []
    if refuse is None and hasattr(os, "O_DIRECT"):
        assert direct_opens  # O_DIRECT was really used where the file system offers it
