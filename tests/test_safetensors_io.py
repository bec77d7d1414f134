"""Header parsing, lazy reads, streaming writes and shard planning (engine/safetensors_io.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny_qwen2vl, load_state_dict  # noqa: E402

from omnimerge.engine.errors import (  # noqa: E402
    PlanError,
    ShardJobError,
    SourceError,
    SourceNotFoundError,
    TensorMismatchError,
    UnsafeCheckpointError,
)
from omnimerge.engine.safetensors_io import (  # noqa: E402
    DTYPES,
    SUPPORTED_FLOAT,
    ShardWriter,
    TensorIndex,
    TensorReader,
    plan_shards,
    read_header,
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("qwen") / "base")


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(5, dtype=torch.int64),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f8a": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "f8b": torch.randn(6, generator=g).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# -- dtypes and headers ----------------------------------------------------------------------------------


def test_dtype_table() -> None:
    for name, info in DTYPES.items():
        assert torch.empty(0, dtype=info.torch).element_size() == info.itemsize, name
    assert set(DTYPES) == {"F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}
    assert SUPPORTED_FLOAT == {"F32", "F16", "BF16", "F64"}


def test_header_matches_safe_open(tmp_path: Path) -> None:
    f = tmp_path / "mixed.safetensors"
    save_file(_mixed_tensors(), str(f), metadata={"format": "pt", "note": "x"})
    header = read_header(f)
    with safe_open(str(f), framework="pt") as so:
        assert sorted(t.name for t in header.tensors) == sorted(so.keys())
        assert header.metadata == so.metadata()
        for t in header.tensors:
            sl = so.get_slice(t.name)
            assert t.dtype == sl.get_dtype()
            assert list(t.shape) == sl.get_shape()
            # The byte range holds exactly this tensor's bytes.
            raw = f.read_bytes()[t.start : t.end]
            assert raw == so.get_tensor(t.name).reshape(-1).view(torch.uint8).numpy().tobytes()
    assert header.size == f.stat().st_size


def test_sharded_index_in_weight_map_order(qwen: Path) -> None:
    idx = TensorIndex.from_dir(qwen)
    weight_map = json.loads((qwen / "model.safetensors.index.json").read_text())["weight_map"]
    assert idx.names() == list(weight_map)
    assert list(idx) == list(weight_map) and len(idx) == len(weight_map) == 58
    assert len(idx.files) == 17 and all(f.parent == qwen for f in idx.files)
    state = load_state_dict(qwen)
    assert idx.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    info = idx["model.layers.0.self_attn.k_proj.weight"]
    assert (info.dtype, info.shape, info.numel, info.nbytes) == ("F32", (32, 64), 2048, 8192)
    assert info.file == qwen / weight_map[info.name]
    assert "lm_head.weight" in idx and "nope" not in idx
    with pytest.raises(KeyError, match="Tensor 'nope' is not in checkpoint"):
        idx["nope"]
    assert all(m == {"format": "pt"} for m in idx.metadata.values())


def test_single_file_and_other_files_sorted(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    idx = TensorIndex.from_dir(tmp_path)
    assert idx.names() == ["a", "b"] and idx.files == [tmp_path / "model.safetensors"]
    other = tmp_path / "other"
    other.mkdir()
    save_file({"z": torch.ones(1)}, str(other / "x.safetensors"))
    save_file({"c": torch.ones(1)}, str(other / "y.safetensors"))
    assert TensorIndex.from_dir(other).names() == ["c", "z"]
    assert TensorIndex.from_files([other / "y.safetensors"]).names() == ["c"]


def test_duplicate_tensor_across_files(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(SourceError, match=r"Tensor 'w' appears in both '.*a.safetensors' and '.*b.safetensors'"):
        TensorIndex.from_dir(tmp_path)


# -- malformed headers -------------------------------------------------------------------------------------


def test_truncated_file(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00")
    with pytest.raises(SourceError, match=r"'.*model.safetensors' is 3 bytes, too short to be a safetensors file"):
        TensorIndex.from_dir(tmp_path)


def test_header_length_past_end(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(SourceError, match=r"declares a 1000-byte header but the file has 2 bytes after the length"):
        read_header(f)


def test_header_bad_json(tmp_path: Path) -> None:
    f = _write_raw(tmp_path / "x.safetensors", b"{not json")
    with pytest.raises(SourceError, match=r"'.*x.safetensors' has a header that is not valid JSON"):
        read_header(f)


def test_offsets_overlap(tmp_path: Path) -> None:
    f = _write_raw(
        tmp_path / "x.safetensors",
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
    )
    with pytest.raises(SourceError, match=r"tensors 'a' and 'b' overlap"):
        read_header(f)


def test_offsets_past_end_of_file(tmp_path: Path) -> None:
    f = _write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    with pytest.raises(SourceError, match=r"tensor 'a' ends at data byte 16 but the file holds only 8 data bytes"):
        read_header(f)


def test_offsets_disagree_with_shape(tmp_path: Path) -> None:
    f = _write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(SourceError, match=r"tensor 'a' is F16 \[4\] \(8 bytes\) but its data_offsets \[0, 16\] span 16"):
        read_header(f)


def test_unknown_dtype(tmp_path: Path) -> None:
    f = _write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(SourceError, match=r"tensor 'a' has dtype 'C64', which omnimerge does not read"):
        read_header(f)


# -- indexes: unsafe paths, missing shards --------------------------------------------------------------


def _sharded(tmp_path: Path, weight_map: dict[str, str]) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_path_outside_dir(tmp_path: Path, shard: str) -> None:
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": shard})
    with pytest.raises(UnsafeCheckpointError, match=rf"names shard '{shard}', which is outside the model directory"):
        TensorIndex.from_dir(d)


def test_index_symlink_escape(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2)}, str(tmp_path / "secret.safetensors"))
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    (d / "s2.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(UnsafeCheckpointError, match=r"names shard 's2.safetensors', a symlink that leads outside"):
        TensorIndex.from_dir(d)


def test_index_symlink_inside_dir_is_fine(tmp_path: Path) -> None:
    d = _sharded(tmp_path, {"a": "link.safetensors"})
    (d / "link.safetensors").symlink_to(d / "s1.safetensors")
    assert TensorIndex.from_dir(d).names() == ["a"]


def test_index_missing_shard(tmp_path: Path) -> None:
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(SourceNotFoundError, match=r"names shard 's2.safetensors', which does not exist in"):
        TensorIndex.from_dir(d)


def test_index_tensor_absent_from_shard(tmp_path: Path) -> None:
    d = _sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(SourceError, match=r"maps tensor 'b' to 's1.safetensors', but that shard does not contain it"):
        TensorIndex.from_dir(d)


def test_missing_and_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match=r"Checkpoint directory '.*nowhere' does not exist"):
        TensorIndex.from_dir(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceNotFoundError, match=r"holds no weights"):
        TensorIndex.from_dir(tmp_path)


# -- pickle ---------------------------------------------------------------------------------------------------


def test_pickle_refused_then_allowed(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save({"step": torch.tensor(1)}, tmp_path / "optimizer.pt")  # trainer leftovers are not weights
    with pytest.raises(UnsafeCheckpointError) as e:
        TensorIndex.from_dir(tmp_path)
    msg = str(e.value)
    assert "has only pickle weights (pytorch_model.bin)" in msg
    assert "Pickle files can run arbitrary code" in msg
    assert "`allow_pickle: true`" in msg and "convert it to safetensors" in msg
    idx = TensorIndex.from_dir(tmp_path, allow_pickle=True)
    assert idx.pickle and idx.names() == ["b", "w"]
    assert idx["b"].dtype == "BF16" and idx["w"].shape == (2, 3) and idx["w"].nbytes == 24
    with TensorReader(idx) as r:
        for name, t in state.items():
            assert _same_bytes(r.read(name), t)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):  # would run os.system on an unsafe load
            return (os.system, ("echo pwned",))

    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"could not be loaded with torch.load\(weights_only=True\)"):
        TensorIndex.from_dir(tmp_path, allow_pickle=True)


# -- reader -----------------------------------------------------------------------------------------------


def test_reader_round_trip_every_dtype(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    idx = TensorIndex.from_dir(tmp_path)
    with TensorReader(idx) as r:
        for name, t in tensors.items():
            got = r.read(name)
            assert got.device.type == "cpu"
            assert _same_bytes(got, t), name


def test_reader_sharded_equals_load_file(qwen: Path) -> None:
    expected = load_state_dict(qwen)
    r = TensorReader(TensorIndex.from_dir(qwen))
    for name in r.index.names():
        assert _same_bytes(r.read(name), expected[name]), name
    r.close()
    with pytest.raises(TypeError, match="send its TensorIndex"):
        import pickle

        pickle.dumps(r)


def test_index_is_picklable(qwen: Path) -> None:
    import pickle

    idx = TensorIndex.from_dir(qwen)
    again = pickle.loads(pickle.dumps(idx))
    assert again.names() == idx.names() and again.fingerprint() == idx.fingerprint()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for RSS")
def test_reading_one_tensor_does_not_load_the_file(tmp_path: Path) -> None:
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    # 8 tensors of 8 MiB = 64 MiB; reading one should cost about 8 MiB (the copy) plus the mapped pages read.
    f = tmp_path / "model.safetensors"
    save_file({f"t{i}": torch.full((2 * 1024 * 1024,), float(i)) for i in range(8)}, str(f))
    idx = TensorIndex.from_dir(tmp_path)
    with TensorReader(idx) as r:
        before = rss()
        t = r.read("t5")
        assert float(t.sum()) == 5.0 * t.numel()  # touch every page of the tensor
        grown = rss() - before
    assert grown < 32 * 1024 * 1024, f"RSS grew by {grown} bytes reading one 8 MiB tensor of a 64 MiB file"


# -- writer ----------------------------------------------------------------------------------------------


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    from omnimerge.engine.safetensors_io import dtype_name

    return [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()]


def test_writer_output_loads_and_equals_input(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    out = tmp_path / "out.safetensors"
    with ShardWriter(out, _entries(tensors), {"format": "pt"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    size, sha = w.result
    data = out.read_bytes()
    assert size == len(data) and sha == hashlib.sha256(data).hexdigest()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    loaded = load_file(str(out))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert _same_bytes(loaded[name], t), name
    with safe_open(str(out), framework="pt") as so:
        assert so.metadata() == {"format": "pt"}
    # Our own index agrees too.
    assert TensorIndex.from_files([out]).names() == sorted(tensors)


def test_writer_is_deterministic(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    results = []
    for k in range(2):
        w = ShardWriter(tmp_path / f"{k}.safetensors", _entries(tensors), {"a": "1"}, fsync=False)
        for n, t in tensors.items():
            w.write(n, t.clone())
        results.append(w.close())
    assert results[0] == results[1]
    assert (tmp_path / "0.safetensors").read_bytes() == (tmp_path / "1.safetensors").read_bytes()


def test_writer_rejects_wrong_order_dtype_shape_and_missing(tmp_path: Path) -> None:
    entries = [("a", "F32", (2,)), ("b", "BF16", (1, 3))]
    w = ShardWriter(tmp_path / "x.safetensors", entries)
    with pytest.raises(ShardJobError, match=r"expected tensor 'a' next but got 'b'"):
        w.write("b", torch.zeros(1, 3, dtype=torch.bfloat16))
    w.write("a", torch.zeros(2))
    with pytest.raises(TensorMismatchError, match=r"tensor 'b' is torch.float32 \[1, 3\] but the plan says BF16 \[1, 3\]"):
        w.write("b", torch.zeros(1, 3))
    with pytest.raises(TensorMismatchError, match=r"tensor 'b' is torch.bfloat16 \[3\] but the plan says BF16 \[1, 3\]"):
        w.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ShardJobError, match=r"closed with 1 tensor\(s\) never written \(first: 'b'\)"):
        w.close()


def test_writer_abort_on_exception_removes_file(tmp_path: Path) -> None:
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError):
        with ShardWriter(out, [("a", "F32", (2,))]) as w:
            w.write("a", torch.zeros(2))
            raise ValueError("boom")
    assert not out.exists()


def test_writer_handles_non_contiguous_input(tmp_path: Path) -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    with ShardWriter(tmp_path / "x.safetensors", [("t", "F32", (4, 3))]) as w:
        w.write("t", t)
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["t"], t)


def test_written_model_loads_with_transformers(qwen: Path, tmp_path: Path) -> None:
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path / "model"
    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(qwen / name, out / name)
    idx = TensorIndex.from_dir(qwen)
    groups = plan_shards([(n, idx[n].nbytes) for n in idx.names()], 100_000)
    weight_map = {}
    with TensorReader(idx) as r:
        for k, group in enumerate(groups):
            fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            with ShardWriter(out / fname, [(n, idx[n].dtype, idx[n].shape) for n in group], {"format": "pt"}) as w:
                for n in group:
                    w.write(n, r.read(n))
                    weight_map[n] = fname
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(groups) > 1
    model = Qwen2VLForConditionalGeneration.from_pretrained(out)
    ref = Qwen2VLForConditionalGeneration.from_pretrained(qwen)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_hf_cache_snapshot_symlinks_are_allowed(qwen: Path, tmp_path: Path) -> None:
    from tiny_models import write_hf_cache

    commit = write_hf_cache(tmp_path / "hub", "org/tiny", qwen)
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    assert (snap / "model.safetensors.index.json").is_symlink()
    assert TensorIndex.from_dir(snap).names() == TensorIndex.from_dir(qwen).names()


# -- shard planning ----------------------------------------------------------------------------------------


def test_plan_shards_hand_worked() -> None:
    entries = [("a", 4), ("b", 4), ("c", 3), ("d", 10), ("e", 1), ("f", 9)]
    # limit 10: a+b=8, +c=11 > 10 → [a,b]; c=3, +d=13 → [c]; d=10 → [d]; e=1, +f=10 → [e,f]
    assert plan_shards(entries, 10) == [["a", "b"], ["c"], ["d"], ["e", "f"]]
    # A tensor bigger than the limit gets its own shard.
    assert plan_shards([("x", 1), ("big", 50), ("y", 1)], 10) == [["x"], ["big"], ["y"]]
    assert plan_shards([], 10) == []
    with pytest.raises(PlanError, match="max_shard_bytes must be positive, got 0"):
        plan_shards(entries, 0)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 100), max_size=40), limit=st.integers(1, 120))
def test_plan_shards_properties(sizes: list[int], limit: int) -> None:
    entries = [(f"t{i}", s) for i, s in enumerate(sizes)]
    shards = plan_shards(entries, limit)
    assert [n for shard in shards for n in shard] == [n for n, _ in entries]
    size = dict(entries)
    for k, shard in enumerate(shards):
        total = sum(size[n] for n in shard)
        assert shard and (total <= limit or len(shard) == 1)
        if k + 1 < len(shards):  # greedy: the next shard's first tensor did not fit
            assert total + size[shards[k + 1][0]] > limit


# -- row blocks (the streamed path) -------------------------------------------------------------------------


def test_read_rows_equals_slices_of_the_whole_tensor_with_and_without_a_buffer(tmp_path: Path) -> None:
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "m.safetensors"))
    idx = TensorIndex.from_files([tmp_path / "m.safetensors"])
    buf = torch.empty(1 << 12, dtype=torch.uint8)
    with TensorReader(idx) as r:
        for name, t in tensors.items():
            if t.dim() == 0:
                assert _same_bytes(r.read_rows(name, 0, 1), t) and r.read_rows(name, 0, 1).shape == ()
                continue
            rows = t.shape[0]
            for start, stop in ((0, rows), (0, rows // 2), (rows // 2, rows), (rows, rows)):
                assert _same_bytes(r.read_rows(name, start, stop), t[start:stop]), (name, start, stop)
                got = r.read_rows(name, start, stop, out=buf)
                assert _same_bytes(got, t[start:stop]) and (got.numel() == 0 or got.data_ptr() == buf.data_ptr())
        with pytest.raises(ShardJobError, match=r"rows \[2, 4\) of tensor 'f32' lie outside its 3 row\(s\)"):
            r.read_rows("f32", 2, 4)


@pytest.mark.parametrize("background", [False, True])
def test_write_rows_in_blocks_gives_the_bytes_of_whole_writes(tmp_path: Path, background: bool) -> None:
    tensors = _mixed_tensors()
    with ShardWriter(tmp_path / "whole.safetensors", _entries(tensors), {"format": "pt"}, fsync=False) as w:
        for n, t in tensors.items():
            w.write(n, t)
    with ShardWriter(tmp_path / "rows.safetensors", _entries(tensors), {"format": "pt"}, fsync=False,
                     background=background, queue_blocks=2) as b:
        for n, t in tensors.items():
            if t.dim() == 0:
                b.write_rows(n, t)
            elif t.shape[0] == 0:
                b.write(n, t)
            else:
                for start in range(0, t.shape[0], 2):  # blocks of two rows, the last one shorter
                    b.write_rows(n, t[start:start + 2].clone())
    assert b.result == w.result
    assert (tmp_path / "rows.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_write_rows_rejects_wrong_rows_and_mixing_with_write(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "x.safetensors", [("a", "F32", (4, 3)), ("b", "F32", (2,))], background=True)
    with pytest.raises(TensorMismatchError, match=r"rows of tensor 'a' are torch.float32 \[2, 2\] after 0 row\(s\) "
                                                  r"but the plan says F32 \[4, 3\]"):
        w.write_rows("a", torch.zeros(2, 2))
    w.write_rows("a", torch.zeros(3, 3))
    with pytest.raises(TensorMismatchError, match=r"are torch.float32 \[2, 3\] after 3 row\(s\)"):
        w.write_rows("a", torch.zeros(2, 3))  # one row too many
    with pytest.raises(ShardJobError, match=r"tensor 'a' is half written by write_rows"):
        w.write("a", torch.zeros(4, 3))
    w.write_rows("a", torch.zeros(1, 3))
    with pytest.raises(ShardJobError, match=r"closed with 1 tensor\(s\) never written \(first: 'b'\)"):
        w.close()
