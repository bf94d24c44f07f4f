"""Lazy, strictly validated tensor access.

A TensorSource answers names, shapes and dtypes from file headers alone, and reads
a tensor's bytes only when asked (a 7B checkpoint is inspectable without loading
it). Safetensors headers are parsed here rather than by the safetensors library so
that every defect (truncation, bad offsets, duplicate names, unknown dtypes) gets
a one-line AdafuseError naming the file and tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .errors import AdafuseError
from .inputs import check_held, confine, open_regular, parse_json, read_json
from .outputs import MARKER_KEY, atomic_write
# Re-exported: other modules import these helpers from here.
from .inputs import check_directory, check_readable_file  # noqa: F401,E402
from .outputs import _umask, atomic_directory  # noqa: F401,E402

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit
MAX_RANK = 8
MAX_SHARDS = 100_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, F16, BF16, ...
    origin: str  # file (or description) it comes from, for messages

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


def dtype_code(dtype) -> str:
    import torch

    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3"}
    if dtype not in codes:
        raise AdafuseError(f"tensor dtype {dtype} is not supported")
    return codes[dtype]


class TensorSource:
    """Named tensors with metadata available without reading data."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str):
        """The tensor as a torch.Tensor (read on demand)."""
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def release(self) -> None:
        """Drop open file maps: pages read through a live map stay resident (and count in RSS)."""

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self.names())


def _reject_duplicates(path: Path):
    def hook(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise AdafuseError(f"{path}: duplicate tensor name '{key}' in the safetensors header")
            seen.add(key)
        return dict(pairs)

    return hook


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict, int]:
    """Parse and validate a safetensors header: (tensors, metadata, data start offset)."""
    path = Path(path)
    with open_regular(path, "safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise AdafuseError(f"{path}: truncated safetensors file: {size} bytes, expected at least 8")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:  # the length is not echoed: it is 8 bytes of the file
                raise AdafuseError(f"{path}: not a safetensors file: its header length field exceeds the "
                                   f"{min(size - 8, MAX_HEADER_BYTES)} bytes it may have")
            raw = f.read(n)
        except OSError as e:
            raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates(path))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdafuseError(f"{path}: corrupt safetensors header: not valid UTF-8 JSON") from None
    except (RecursionError, ValueError):
        raise AdafuseError(f"{path}: corrupt safetensors header: nested too deep or a number too long") from None
    if not isinstance(header, dict):
        raise AdafuseError(f"{path}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdafuseError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise AdafuseError(f"{where}: header entry must have dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise AdafuseError(f"{where}: dtype {_short(dtype)} is not supported (expected one of {', '.join(DTYPE_SIZES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= data_size for d in shape)):
            raise AdafuseError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative integers "
                               f"no larger than the file, found {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise AdafuseError(f"{where}: data_offsets must be two integers, found {_short(offsets)}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end <= data_size:
            raise AdafuseError(f"{where}: data_offsets {_short(offsets)} lie outside the {data_size} data bytes (file truncated?)")
        if end - begin != expected:
            raise AdafuseError(f"{where}: data_offsets span {end - begin} bytes, expected {expected} for {dtype} {shape}")
        tensors[name] = TensorInfo(name, tuple(shape), dtype, str(path))
        if end > begin:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise AdafuseError(f"{path}: tensors '{a}' and '{b}' overlap (data_offsets share bytes {begin_b}..{end_a})")
    return tensors, metadata, 8 + n


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class SafetensorsSource(TensorSource):
    """One or more safetensors files (shards), read lazily through memory maps."""

    def __init__(self, files: Iterable[Path], expected_map: Mapping[str, str] | None = None):
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        for file in files:
            file = Path(file)
            infos, _, _ = read_safetensors_header(file)
            for name, info in infos.items():
                if name in self._infos:
                    raise AdafuseError(f"{file}: tensor '{name}' is also in {self._file_of[name]}")
                self._infos[name] = info
                self._file_of[name] = file
        if expected_map is not None:
            for name, shard in expected_map.items():
                if name not in self._infos:
                    raise AdafuseError(f"tensor '{name}': the shard index names {shard}, but no shard holds it")
                if self._file_of[name].name != Path(shard).name:
                    raise AdafuseError(f"tensor '{name}': the shard index names {shard}, found in {self._file_of[name].name}")

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise AdafuseError(f"tensor '{name}' not found") from None

    def release(self) -> None:
        self._handles.clear()

    def get(self, name: str):
        from safetensors import safe_open

        file = self._file_of[self.info(name).name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        try:
            tensor = self._handles[file].get_tensor(name)
        except Exception as e:  # the header was valid, so this is I/O trouble
            raise AdafuseError(f"{file}: cannot read tensor '{name}': {e}") from None
        check_finite(tensor, name, file)
        return tensor


def check_finite(tensor, name: str, origin: object, chunk: int = 1 << 22) -> None:
    """Refuse NaN/Inf weights as they are read (in chunks: a bool mask of a few MB, not of the tensor)."""
    import torch

    if not tensor.is_floating_point():
        return
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if not torch.isfinite(part).all():
            bad = int((~torch.isfinite(flat)).sum())
            raise AdafuseError(f"{origin}: tensor '{name}' has {bad} NaN/Inf values, expected finite weights")


class LazySource(TensorSource):
    """Tensors defined by loader functions (renamed, stacked or converted views)."""

    def __init__(self, entries: Mapping[str, tuple[TensorInfo, Callable[[], object]]]):
        self._entries = dict(entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except KeyError:
            raise AdafuseError(f"tensor '{name}' not found") from None

    def get(self, name: str):
        info = self.info(name)
        tensor = self._entries[name][1]()
        if tuple(tensor.shape) != info.shape:
            raise AdafuseError(f"{info.origin}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(info.shape)}")
        return tensor


def in_memory_source(tensors: object, origin: str) -> LazySource:
    """Wrap already-loaded torch tensors (e.g. from a pickled .bin): a dict of plain, finite, dense CPU tensors."""
    import torch

    if not isinstance(tensors, dict):
        raise AdafuseError(f"{origin}: expected a dict of tensors, found {type(tensors).__name__}")
    entries = {}
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise AdafuseError(f"{origin}: tensor names must be strings, found {type(name).__name__} {_short(name)}")
        if not isinstance(t, torch.Tensor):
            raise AdafuseError(f"{origin}: '{name}' is a {type(t).__name__}, expected a tensor")
        if t.layout != torch.strided or t.is_meta or t.device.type != "cpu":
            raise AdafuseError(f"{origin}: tensor '{name}' is {t.layout} on device {t.device}, expected a dense CPU tensor with data")
        try:
            code = dtype_code(t.dtype)
        except AdafuseError:
            raise AdafuseError(f"{origin}: tensor '{name}' has dtype {t.dtype}, which is not supported") from None
        # zero or overlapping strides let a few bytes stand for 2^40 elements: the elements may not exceed the
        # bytes the file holds for them, checked before the NaN scan (or anything else) walks them
        check_held(origin, f"the size of tensor '{name}' (shape {list(t.shape)}, {t.dtype}) in bytes",
                   t.numel() * t.element_size(), t.untyped_storage().nbytes(),
                   "its stored data holds (zero or overlapping strides)")
        check_finite(t, name, origin)
        entries[name] = (TensorInfo(name, tuple(t.shape), code, origin), (lambda t=t: t))
    return LazySource(entries)


def load_sharded_dir(directory: Path, stem: str) -> SafetensorsSource:
    """`stem.safetensors`, or shards listed in `stem.safetensors.index.json`."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists() or index.is_symlink():
        data = read_json(confine(directory, index.name, directory))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise AdafuseError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        if len(shards) > MAX_SHARDS:
            raise AdafuseError(f"{index}: names {len(shards)} shard files, more than {MAX_SHARDS}")
        _check_shard_numbering(index, shards)
        files = [confine(directory, shard, index) for shard in shards]
        for shard, file in zip(shards, files):
            if not file.exists() and not file.is_symlink():
                raise AdafuseError(f"{index}: shard '{shard}' named in the index is missing from {directory}")
        return SafetensorsSource(files, expected_map=weight_map)
    if single.exists() or single.is_symlink():
        return SafetensorsSource([confine(directory, single.name, directory)])
    raise AdafuseError(f"{directory}: no {single.name} or {index.name} found")


SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors\Z")


def _check_shard_numbering(index: Path, shards: list[str]) -> None:
    """Hugging Face shard names (`-00001-of-00003`) must number 1..N with none missing."""
    numbered = [SHARD_NAME.search(s) for s in shards]
    if not shards or not all(numbered):
        return
    totals = {int(m.group(2)) for m in numbered}
    present = sorted(int(m.group(1)) for m in numbered)
    # compare the count first: a name '-of-999999999999' must not build a range that long
    if len(totals) != 1 or next(iter(totals)) != len(present) or present != list(range(1, len(present) + 1)):
        raise AdafuseError(f"{index}: shard index is not contiguous: it names shards {', '.join(shards)}, "
                           f"expected -00001-of-N .. -N-of-N with none missing")


def save_safetensors(tensors: Mapping[str, object], path: Path, metadata: Mapping[str, str] | None = None,
                     output: str | None = None) -> None:
    """Atomic; `output` marks the file as written by this tool (outputs.MARKER_KEY) so --force may replace it."""
    marked = {**(metadata or {}), **({MARKER_KEY: output} if output else {})}
    write_safetensors_streaming(path, [(n, dtype_code(t.dtype), tuple(t.shape), (lambda t=t: t))
                                       for n, t in tensors.items()], marked)


def save_json(obj: object, path: Path) -> None:  # atomic
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_safetensors_streaming(path: Path, entries: list[tuple[str, str, tuple[int, ...], Callable[[], object]]],
                                metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: entries are (name, dtype code, shape, producer).

    Only one tensor is in memory at a time, so a multi-GB shard needs megabytes of RAM. Atomic.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned

    def write(tmp: Path) -> None:
        import torch

        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, dtype, shape, produce in entries:
                t = produce()
                if dtype_code(t.dtype) != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"producer of '{name}' gave {dtype_code(t.dtype)} {list(t.shape)}, declared {dtype} {list(shape)}")
                f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    atomic_write(path, write)
