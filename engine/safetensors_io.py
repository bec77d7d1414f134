"""Safetensors headers, lazy tensor reads and streaming shard writes.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header + a flat data buffer. The header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
buffer) plus an optional ``"__metadata__"`` dict of strings. Everything the planner needs (names, dtypes,
shapes, sizes) is in the headers, so :class:`TensorIndex` reads only those; :class:`TensorReader` then reads
single tensors, or row blocks of them, with pread, and :class:`ShardWriter` writes one output file front to back (header first,
from the plan, then each tensor in order) while hashing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .errors import PlanError, ShardJobError, SourceError, SourceNotFoundError, TensorMismatchError, UnsafeCheckpointError

__all__ = [
    "DTYPES",
    "SUPPORTED_FLOAT",
    "DtypeInfo",
    "TensorInfo",
    "TensorIndex",
    "TensorReader",
    "ShardWriter",
    "plan_shards",
    "dtype_name",
    "read_header",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DtypeInfo:
    """A safetensors dtype: its torch dtype and size of one element in bytes."""

    name: str
    torch: torch.dtype
    itemsize: int


DTYPES: dict[str, DtypeInfo] = {
    d.name: d
    for d in (
        DtypeInfo("F64", torch.float64, 8),
        DtypeInfo("F32", torch.float32, 4),
        DtypeInfo("F16", torch.float16, 2),
        DtypeInfo("BF16", torch.bfloat16, 2),
        DtypeInfo("I64", torch.int64, 8),
        DtypeInfo("I32", torch.int32, 4),
        DtypeInfo("I16", torch.int16, 2),
        DtypeInfo("I8", torch.int8, 1),
        DtypeInfo("U8", torch.uint8, 1),
        DtypeInfo("BOOL", torch.bool, 1),
        DtypeInfo("F8_E4M3", torch.float8_e4m3fn, 1),
        DtypeInfo("F8_E5M2", torch.float8_e5m2, 1),
    )
}
SUPPORTED_FLOAT: frozenset[str] = frozenset({"F32", "F16", "BF16", "F64"})

_BY_TORCH: dict[torch.dtype, str] = {d.torch: d.name for d in DTYPES.values()}

# A header larger than this is not a real checkpoint (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
# A background ShardWriter flushes its file to disk after this many bytes (see ShardWriter).
SYNC_EVERY_BYTES = 128 << 20
# Data bytes per file that go into its digest: cheap, and catches most rewrites with an unchanged layout.
SAMPLE_BYTES = 64 * 1024
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Pickle files trainers leave next to weights; they are not tensors of the model.
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise SourceError(
            f"dtype {dtype} has no safetensors equivalent; supported: {', '.join(DTYPES)}."
        ) from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and absolute byte range [start, end) in that file.

    For pickle weights (only with ``allow_pickle``) the byte range is unknown and ``start == end == -1``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class FileHeader:
    """One file's parsed header: its tensors (in offset order), metadata, size, modification time and a
    digest of the length field, the header and the first :data:`SAMPLE_BYTES` of data."""

    file: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    size: int
    digest: str
    mtime_ns: int = 0


def read_header(file: Path) -> FileHeader:
    """Parse and validate one safetensors header without touching the data buffer.

    Raises:
        SourceNotFoundError: the file does not exist.
        SourceError: bad header length, bad JSON, unknown dtype, offsets that disagree with the shape,
            overlap each other or leave the file.
    """
    file = Path(file)
    try:
        stat = file.stat()
        size = stat.st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(
                    f"'{file}' is {size} bytes, too short to be a safetensors file (it needs an 8-byte "
                    "header length). The file is truncated or not safetensors; download it again."
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise SourceError(
                    f"'{file}' declares a {n}-byte header but the file has {size - 8} bytes after the length "
                    "field. The file is truncated or not safetensors; download it again."
                )
            raw = f.read(n)
            sample = f.read(SAMPLE_BYTES)
    except FileNotFoundError:
        raise SourceNotFoundError(f"Weights file '{file}' does not exist.") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(
            f"'{file}' has a header that is not valid JSON ({e}). The file is corrupt or not safetensors; "
            "download it again."
        ) from None
    if not isinstance(header, dict):
        raise SourceError(f"'{file}' has a header that is not a JSON object; the file is not safetensors.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SourceError(f"'{file}' has a __metadata__ that is not a map of strings to strings.")
    data_start = 8 + n
    data_size = size - data_start
    tensors = [_tensor_info(file, name, entry, data_start, data_size) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.start, t.end))
    prev: TensorInfo | None = None
    for t in tensors:
        if prev is not None and t.start < prev.end:
            raise SourceError(
                f"'{file}': tensors '{prev.name}' and '{t.name}' overlap (bytes {prev.start}-{prev.end} and "
                f"{t.start}-{t.end}). The file is corrupt; download or convert it again."
            )
        if t.end > t.start:
            prev = t
    digest = hashlib.sha256(head + raw + sample).hexdigest()
    return FileHeader(file, tuple(tensors), dict(metadata), size, digest, stat.st_mtime_ns)


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise SourceError(f"'{file}': entry for tensor '{name}' lacks dtype, shape or data_offsets.")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SourceError(
            f"'{file}': tensor '{name}' has dtype {dtype!r}, which omnimerge does not read; "
            f"supported: {', '.join(DTYPES)}."
        )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SourceError(f"'{file}': tensor '{name}' has an invalid shape {shape!r}.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SourceError(f"'{file}': tensor '{name}' has invalid data_offsets {offsets!r}.")
    info = TensorInfo(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])
    if offsets[1] - offsets[0] != info.nbytes:
        raise SourceError(
            f"'{file}': tensor '{name}' is {dtype} {list(shape)} ({info.nbytes} bytes) but its data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]} bytes. The file is corrupt."
        )
    if offsets[1] > data_size:
        raise SourceError(
            f"'{file}': tensor '{name}' ends at data byte {offsets[1]} but the file holds only {data_size} "
            "data bytes. The file is truncated; download it again."
        )
    return info


class TensorIndex:
    """Every tensor of a checkpoint (names, dtypes, shapes, byte ranges), built from headers alone.

    Attributes:
        root: the checkpoint directory (shard paths are relative to it).
        files: the weight files, in the order their tensors are listed.
        metadata: each file's ``__metadata__``.
        digests: sha256 of each file's length field, header and first 64 KiB of data.
        sizes: each file's size in bytes.
        mtimes: each file's modification time (ns) when indexed.
        pickle: True when the weights are pickle files (loaded only because ``allow_pickle`` was given).
    """

    def __init__(
        self,
        root: Path,
        tensors: Sequence[TensorInfo],
        *,
        metadata: Mapping[Path, dict[str, str]],
        digests: Mapping[Path, str],
        sizes: Mapping[Path, int],
        mtimes: Mapping[Path, int] | None = None,
        pickle: bool = False,
    ) -> None:
        self.root = Path(root)
        self._tensors: dict[str, TensorInfo] = {}
        for t in tensors:
            if t.name in self._tensors:
                raise SourceError(
                    f"Tensor '{t.name}' appears in both '{self._tensors[t.name].file}' and '{t.file}' under "
                    f"'{root}'. A checkpoint must hold each tensor once; remove the stray file."
                )
            self._tensors[t.name] = t
        files: list[Path] = []
        for t in tensors:
            if t.file not in files:
                files.append(t.file)
        self.files = files + [f for f in sizes if f not in files]
        self.metadata = dict(metadata)
        self.digests = dict(digests)
        self.sizes = dict(sizes)
        self.mtimes = dict(mtimes or {})
        self.pickle = pickle

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: Path | str, allow_pickle: bool = False) -> "TensorIndex":
        """Index a checkpoint directory.

        Looks, in this order, for ``model.safetensors.index.json`` (or one other ``*.safetensors.index.json``),
        ``model.safetensors``, any ``*.safetensors``; then pickle weights, which are refused unless
        ``allow_pickle``.

        Raises:
            SourceNotFoundError: no such directory, no weights in it, or an index naming a missing shard.
            UnsafeCheckpointError: pickle weights without ``allow_pickle``; an index escaping the directory.
            SourceError: a malformed header or index.
        """
        root = Path(path)
        if not root.is_dir():
            raise SourceNotFoundError(f"Checkpoint directory '{root}' does not exist or is not a directory.")
        indexes = sorted(root.glob("*.safetensors.index.json"))
        if (root / SAFETENSORS_INDEX).is_file():
            return cls.from_index_file(root / SAFETENSORS_INDEX)
        if len(indexes) == 1:
            return cls.from_index_file(indexes[0])
        if len(indexes) > 1:
            raise SourceError(
                f"'{root}' holds several safetensors indexes ({', '.join(p.name for p in indexes)}) and no "
                f"{SAFETENSORS_INDEX}; point the recipe at a directory with one model."
            )
        if (root / SAFETENSORS_SINGLE).is_file():
            return cls.from_files([root / SAFETENSORS_SINGLE], root=root)
        singles = sorted(root.glob("*.safetensors"))
        if singles:
            return cls.from_files(singles, root=root)
        pickles = _pickle_files(root)
        if pickles:
            if not allow_pickle:
                names = ", ".join(p.name for p in pickles[:3]) + (" ..." if len(pickles) > 3 else "")
                raise UnsafeCheckpointError(
                    f"Checkpoint '{root}' has only pickle weights ({names}). Pickle files can run arbitrary "
                    "code when loaded, so omnimerge refuses them by default. If you trust this checkpoint, set "
                    "`allow_pickle: true` for it in the recipe (it is then loaded with "
                    "torch.load(weights_only=True)), or convert it to safetensors first (e.g. load it with "
                    "transformers and call save_pretrained(..., safe_serialization=True))."
                )
            return cls.from_pickle(pickles, root=root)
        raise SourceNotFoundError(
            f"Checkpoint directory '{root}' holds no weights (no *.safetensors, no index, no pickle files)."
        )

    @classmethod
    def from_index_file(cls, index_file: Path | str) -> "TensorIndex":
        """Index a sharded checkpoint from its ``*.safetensors.index.json`` (``weight_map`` order)."""
        index_file = Path(index_file)
        root = index_file.parent
        weight_map = _read_weight_map(index_file)
        shards: dict[str, Path] = {}
        for rel in dict.fromkeys(weight_map.values()):
            shards[rel] = _safe_shard_path(root, rel, index_file)
        headers = {rel: read_header(p) for rel, p in shards.items()}
        by_file = {rel: {t.name: t for t in h.tensors} for rel, h in headers.items()}
        tensors = []
        for name, rel in weight_map.items():
            info = by_file[rel].get(name)
            if info is None:
                raise SourceError(
                    f"'{index_file}' maps tensor '{name}' to '{rel}', but that shard does not contain it. "
                    "The index and shards come from different saves; download the checkpoint again."
                )
            tensors.append(info)
        mapped = set(weight_map)
        for rel, h in headers.items():
            extra = [t.name for t in h.tensors if t.name not in mapped]
            if extra:
                logger.warning(
                    "%s: shard %s holds %d tensor(s) the index does not list (e.g. %s); they are ignored, "
                    "as transformers ignores them.", index_file, rel, len(extra), extra[0],
                )
        return cls(
            root,
            tensors,
            metadata={h.file: h.metadata for h in headers.values()},
            digests={h.file: h.digest for h in headers.values()},
            sizes={h.file: h.size for h in headers.values()},
            mtimes={h.file: h.mtime_ns for h in headers.values()},
        )

    @classmethod
    def from_files(cls, files: Sequence[Path | str], root: Path | str | None = None) -> "TensorIndex":
        """Index explicit safetensors files (e.g. ``adapter_model.safetensors``); names sorted."""
        paths = [Path(f) for f in files]
        if not paths:
            raise SourceNotFoundError("No safetensors files were given to index.")
        headers = [read_header(p) for p in paths]
        tensors = sorted((t for h in headers for t in h.tensors), key=lambda t: t.name)
        return cls(
            Path(root) if root is not None else paths[0].parent,
            tensors,
            metadata={h.file: h.metadata for h in headers},
            digests={h.file: h.digest for h in headers},
            sizes={h.file: h.size for h in headers},
            mtimes={h.file: h.mtime_ns for h in headers},
        )

    @classmethod
    def from_pickle(cls, files: Sequence[Path], root: Path) -> "TensorIndex":
        """Index pickle weights (only call when the user allowed pickle). Loads with ``weights_only=True``
        and ``mmap=True``, so tensor data is mapped, not read."""
        logger.warning("Loading pickle weights from %s (allow_pickle is set).", root)
        tensors = []
        for f in files:
            for name, t in _load_pickle(f).items():
                tensors.append(TensorInfo(name, dtype_name(t.dtype), tuple(t.shape), f, -1, -1))
        tensors.sort(key=lambda t: t.name)
        digests = {}
        for f in files:
            with open(f, "rb") as fh:
                h = hashlib.sha256(fh.read(SAMPLE_BYTES))
            for t in tensors:
                if t.file == f:
                    h.update(f"{t.name}\0{t.dtype}\0{t.shape}\n".encode())
            digests[f] = h.hexdigest()
        return cls(
            root, tensors, metadata={f: {} for f in files}, digests=digests,
            sizes={f: f.stat().st_size for f in files}, mtimes={f: f.stat().st_mtime_ns for f in files},
            pickle=True,
        )

    # -- mapping interface --------------------------------------------------------------------------

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"Tensor '{name}' is not in checkpoint '{self.root}'.") from None

    def get(self, name: str) -> TensorInfo | None:
        return self._tensors.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        """Tensor names in a stable order: the index's ``weight_map`` order, else sorted."""
        return list(self._tensors)

    def infos(self) -> list[TensorInfo]:
        return list(self._tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (not headers)."""
        return sum(t.nbytes for t in self._tensors.values())

    def fingerprint(self, with_mtime: bool = True) -> str:
        """sha256 over each file's name (relative to root), size, digest (header + first 64 KiB of data) and,
        with ``with_mtime``, modification time. Cheap (no full read). Leave mtimes out where the content is
        pinned otherwise (a hub commit); then a rewrite that keeps layout, size and the first 64 KiB of
        every file is not detected."""
        h = hashlib.sha256()
        for f in self.files:
            rel = os.path.relpath(f, self.root)
            mtime = self.mtimes.get(f, 0) if with_mtime else 0
            h.update(f"{rel}\0{self.sizes[f]}\0{self.digests[f]}\0{mtime}\n".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"TensorIndex({str(self.root)!r}, {len(self)} tensors in {len(self.files)} files)"


def _read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        doc = json.loads(index_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"Index '{index_file}' is not valid JSON ({e}); download the checkpoint again.") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise SourceError(
            f"Index '{index_file}' has no 'weight_map' of tensor names to shard files; it is not a "
            "Hugging Face checkpoint index."
        )
    return weight_map


def _safe_shard_path(root: Path, rel: str, index_file: Path) -> Path:
    """Resolve a shard named by an index, refusing anything outside ``root``."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise UnsafeCheckpointError(
            f"Index '{index_file}' names shard '{rel}', which is outside the model directory. Shard paths "
            "must be plain file names relative to the index; this index is malformed or malicious."
        )
    full = root / p
    real = full.resolve()
    allowed = _allowed_roots(root)
    if not any(real.is_relative_to(a) for a in allowed):
        raise UnsafeCheckpointError(
            f"Index '{index_file}' names shard '{rel}', a symlink that leads outside the model directory "
            f"(to '{real}'). Copy the real file into the directory if you trust it."
        )
    if not full.is_file():
        raise SourceNotFoundError(
            f"Index '{index_file}' names shard '{rel}', which does not exist in '{root}'. The download is "
            "incomplete; download the checkpoint again."
        )
    return full


def _allowed_roots(root: Path) -> list[Path]:
    """Where a shard may really live: the model directory, and for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<commit>``, whose files are symlinks into ``../../blobs``) that
    repository's blob store."""
    real = root.resolve()
    roots = [real]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith(("models--", "datasets--")):
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _pickle_files(root: Path) -> list[Path]:
    index = root / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_weight_map(index)
        return [_safe_shard_path(root, rel, index) for rel in dict.fromkeys(weight_map.values())]
    return sorted(
        p for p in root.iterdir()
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and p.name not in NOT_WEIGHTS
        and not p.name.startswith("rng_state")
    )


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for bad or unsafe pickles
        raise UnsafeCheckpointError(
            f"Pickle weights '{file}' could not be loaded with torch.load(weights_only=True): {e}. "
            "Convert the checkpoint to safetensors."
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"Pickle file '{file}' is not a state dict of tensors.")
    return obj


class TensorReader:
    """Reads single tensors of an index lazily, each file opened once on first use.

    Tensors are read with ``pread`` into fresh memory (not mmap): the process holds only the tensors alive
    at the moment — file pages stay in the OS page cache, not in this process's RSS, whatever the size of
    the files it has read from. Construct it where it is used (e.g. inside a worker); it holds open files
    and is not picklable.
    """

    def __init__(self, index: TensorIndex) -> None:
        self.index = index
        self._handles: dict[Path, Any] = {}

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype, on CPU, in memory of its own (writable)."""
        info = self.index[name]
        if self.index.pickle:
            return self._open(info.file)[name].clone()
        rows = info.shape[0] if info.shape else 1
        return self.read_rows(name, 0, rows)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` (along the first dimension) of tensor ``name``, in its stored dtype.

        A 0-d tensor has one row (``0, 1``: the scalar itself). With ``out`` (a contiguous uint8 CPU tensor
        of at least the rows' byte size) the bytes land in it and the result is a view of it — a buffer
        reused from chunk to chunk; otherwise in fresh memory.
        """
        info = self.index[name]
        shape = info.shape
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise ShardJobError(f"rows [{start}, {stop}) of tensor '{name}' lie outside its {rows} row(s) (a bug).")
        row_shape = tuple(shape[1:])
        out_shape = (stop - start, *row_shape) if shape else ()
        if self.index.pickle:
            full = self._open(info.file)[name]
            return (full[start:stop] if shape else full).clone()
        row_bytes = math.prod(row_shape) * DTYPES[info.dtype].itemsize
        nbytes = (stop - start) * row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        if buf.numel() != nbytes:
            raise ShardJobError(f"read buffer of {out.numel()} bytes is too small for {nbytes} bytes of "  # type: ignore[union-attr]
                                f"tensor '{name}' (a bug).")
        handle = self._open(info.file)
        view = memoryview(buf.numpy())
        offset = info.start + start * row_bytes
        done = 0
        try:
            while done < nbytes:
                got = os.preadv(handle, [view[done:]], offset + done)
                if got <= 0:
                    raise SourceError(f"'{info.file}' ended inside tensor '{name}' (truncated after indexing?).")
                done += got
        except OSError as e:
            raise SourceError(f"Could not read tensor '{name}' from '{info.file}': {e}") from None
        return buf.view(DTYPES[info.dtype].torch).reshape(out_shape)

    def _open(self, file: Path) -> Any:
        h = self._handles.get(file)
        if h is None:
            if self.index.pickle:
                h = _load_pickle(file)
            else:
                try:
                    h = os.open(file, os.O_RDONLY)
                except FileNotFoundError:
                    raise SourceNotFoundError(f"Weights file '{file}' disappeared after it was indexed.") from None
            self._handles[file] = h
        return h

    def close(self) -> None:
        """Close every open file."""
        for h in self._handles.values():
            if isinstance(h, int):
                os.close(h)
        self._handles.clear()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> None:
        raise TypeError("TensorReader holds open files; send its TensorIndex and build a reader in the worker.")


class ShardWriter:
    """Writes one ``.safetensors`` file front to back, hashing it as it goes.

    The header comes from the plan (names, dtypes, shapes in output order); tensors are then appended in
    exactly that order, whole (:meth:`write`) or in consecutive row blocks (:meth:`write_rows`), so the
    writer never holds more than what it was handed. Offsets are contiguous from 0 and the header is
    space-padded to a multiple of 8 bytes, as safetensors writes it; the same entries, metadata and tensors
    give the same bytes.

    With ``background=True`` a thread does the file writes and the sha256 (both release the GIL), so they
    overlap the caller's compute, and (with ``fsync``) flushes to disk every :data:`SYNC_EVERY_BYTES`, so
    little is left for the final fsync; at most ``queue_blocks`` handed-over blocks wait for it. The tensors
    handed over must not be modified afterwards (the engine hands over fresh casts). Errors of the thread
    surface at the next call.

    Usage::

        with ShardWriter(tmp, entries, {"format": "pt"}) as w:
            for name, t in tensors:
                w.write(name, t)
        size, sha = w.result
    """

    def __init__(
        self,
        path: Path | str,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
        *,
        fsync: bool = True,
        background: bool = False,
        queue_blocks: int = 4,
    ) -> None:
        self.path = Path(path)
        self._entries = [(n, d, tuple(int(s) for s in shape)) for n, d, shape in entries]
        self._fsync = fsync
        self._next = 0
        self._rows_done = 0  # rows of the current entry written so far (write_rows)
        self.result: tuple[int, str] | None = None
        header: dict[str, Any] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise PlanError(f"Metadata for shard '{self.path}' must map strings to strings.")
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, dtype, shape in self._entries:
            if dtype not in DTYPES:
                raise PlanError(f"Shard '{self.path}': tensor '{name}' has unknown dtype {dtype!r}.")
            if name in header:
                raise PlanError(f"Shard '{self.path}' lists tensor '{name}' twice.")
            nbytes = TensorInfo(name, dtype, shape, self.path, 0, 0).nbytes
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
        raw += b" " * (-len(raw) % 8)
        self._sha = hashlib.sha256()
        self._size = 0
        self._f = open(self.path, "wb")
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._unsynced = 0
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_blocks))
            self._thread = threading.Thread(target=self._drain, name=f"write-{self.path.name}", daemon=True)
            self._thread.start()
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _put(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self._sha.update(data)
        if self._thread is not None and self._fsync:
            self._unsynced += len(data) if isinstance(data, bytes) else data.nbytes
            if self._unsynced >= SYNC_EVERY_BYTES:  # on the writer's thread: the disk works while we compute
                self._f.flush()
                os.fdatasync(self._f.fileno())
                self._unsynced = 0

    def _drain(self) -> None:
        while True:
            item = self._queue.get()  # type: ignore[union-attr]
            if item is None:
                return
            if self._error is None:
                try:
                    self._put(item if isinstance(item, bytes) else memoryview(item.numpy()))
                except BaseException as exc:  # noqa: BLE001 - surfaced at the next call
                    self._error = exc

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            raise ShardJobError(f"Writing shard '{self.path}' failed: {self._error}") from self._error

    def _emit(self, data: bytes | torch.Tensor) -> None:
        """Append ``data`` (bytes, or a contiguous CPU uint8 tensor) to the file and the hash."""
        self._size += len(data) if isinstance(data, bytes) else data.numel()
        if self._queue is not None:
            self._raise_thread_error()
            self._queue.put(data)
        else:
            self._put(data if isinstance(data, bytes) else memoryview(data.numpy()))

    def _check_open(self, name: str) -> tuple[str, tuple[int, ...]]:
        if self._f.closed or self.result is not None:
            raise ShardJobError(f"Shard '{self.path}' is already closed; cannot write '{name}'.")
        if self._next >= len(self._entries):
            raise ShardJobError(f"Shard '{self.path}' got tensor '{name}' after all its entries were written.")
        want, dtype, shape = self._entries[self._next]
        if name != want:
            raise ShardJobError(
                f"Shard '{self.path}' expected tensor '{want}' next but got '{name}'; tensors must be written "
                "in the order of the shard's entries."
            )
        return dtype, shape

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``name``; it must be the next entry, with its planned dtype and shape."""
        dtype, shape = self._check_open(name)
        if self._rows_done:
            raise ShardJobError(f"Shard '{self.path}': tensor '{name}' is half written by write_rows; finish it "
                                "with write_rows.")
        if tensor.dtype != DTYPES[dtype].torch or tuple(tensor.shape) != shape:
            raise TensorMismatchError(
                f"Shard '{self.path}': tensor '{name}' is {tensor.dtype} {list(tensor.shape)} but the plan says "
                f"{dtype} {list(shape)}. Cast it before writing, or fix the plan."
            )
        self._append(tensor)
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (along the first dimension) of entry ``name``; the entry is complete when all
        its rows are written. A 0-d entry is one row: pass the scalar itself."""
        dtype, shape = self._check_open(name)
        total = shape[0] if shape else 1
        if shape:
            fits = rows.dim() == len(shape) and tuple(rows.shape[1:]) == shape[1:]
            got = int(rows.shape[0]) if fits else 0
        else:
            fits, got = rows.dim() == 0, 1
        if not fits or rows.dtype != DTYPES[dtype].torch or self._rows_done + got > total:
            raise TensorMismatchError(
                f"Shard '{self.path}': rows of tensor '{name}' are {rows.dtype} {list(rows.shape)} after "
                f"{self._rows_done} row(s) but the plan says {dtype} {list(shape)}. Cast them before writing, "
                "or fix the plan."
            )
        self._append(rows)
        self._rows_done += got
        if self._rows_done == total:
            self._rows_done = 0
            self._next += 1

    def _append(self, tensor: torch.Tensor) -> None:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._emit(flat.view(torch.uint8))

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # type: ignore[union-attr]
            self._thread.join()
            self._thread = None

    def close(self) -> tuple[int, str]:
        """Finish the file; returns ``(size_bytes, sha256_hex)``.

        Raises:
            ShardJobError: some entries were never written (the partial file is left for the caller,
                which wrote it under a temporary name), or the background thread failed to write.
        """
        if self.result is not None:
            return self.result
        self._stop_thread()
        missing = [n for n, _, _ in self._entries[self._next:]]
        if missing or self._error is not None:
            self._f.close()
            self._raise_thread_error()
            raise ShardJobError(
                f"Shard '{self.path}' was closed with {len(missing)} tensor(s) never written (first: "
                f"'{missing[0]}'); the file is incomplete."
            )
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        self.result = (self._size, self._sha.hexdigest())
        return self.result

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._error = self._error or ShardJobError("aborted")
        self._stop_thread()
        if not self._f.closed:
            self._f.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def plan_shards(entries: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group ``(name, nbytes)`` in order into shards of at most ``max_shard_bytes`` data bytes.

    A new shard starts when adding the next tensor would pass the limit; a tensor larger than the limit
    gets a shard of its own. Pure: the same entries always give the same grouping.

    Raises:
        PlanError: ``max_shard_bytes`` is not positive.
    """
    if max_shard_bytes <= 0:
        raise PlanError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in entries:
        if current and used + nbytes > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards
