"""Lazy, strictly validated tensor access.

A TensorSource answers names, shapes and dtypes from file headers alone, and reads
a tensor's bytes only when asked (a 7B checkpoint is inspectable without loading
it). Safetensors headers are parsed here rather than by the safetensors library so
that every defect (truncation, bad offsets, duplicate names, unknown dtypes) gets
a one-line AdafuseError naming the file and tensor.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .errors import AdafuseError

# safetensors dtype code -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors spec's own limit


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


def torch_dtype(code: str):
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }[code]


def dtype_code(dtype) -> str:
    import torch

    codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
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
    check_readable_file(path, "safetensors file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise AdafuseError(f"{path}: truncated safetensors file: {size} bytes, expected at least 8")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise AdafuseError(f"{path}: corrupt safetensors file: header length {n} is larger than the {size - 8} bytes after it")
            if n > MAX_HEADER_BYTES:
                raise AdafuseError(f"{path}: corrupt safetensors file: header length {n} exceeds {MAX_HEADER_BYTES}")
            raw = f.read(n)
    except OSError as e:
        raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdafuseError(f"{path}: corrupt safetensors header: not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise AdafuseError(f"{path}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}")
    data_size = size - 8 - n
    metadata = header.pop("__metadata__", {}) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise AdafuseError(f"{where}: header entry must have dtype, shape and data_offsets, found {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise AdafuseError(f"{where}: dtype '{dtype}' is not supported (expected one of {', '.join(DTYPE_SIZES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise AdafuseError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise AdafuseError(f"{where}: data_offsets must be two integers, found {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end <= data_size:
            raise AdafuseError(f"{where}: data_offsets {offsets} lie outside the {data_size} data bytes (file truncated?)")
        if end - begin != expected:
            raise AdafuseError(f"{where}: data_offsets span {end - begin} bytes, expected {expected} for {dtype} {shape}")
        tensors[name] = TensorInfo(name, tuple(shape), dtype, str(path))
    return tensors, metadata, 8 + n


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
            return self._handles[file].get_tensor(name)
        except Exception as e:  # the header was valid, so this is I/O trouble
            raise AdafuseError(f"{file}: cannot read tensor '{name}': {e}") from None


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


def in_memory_source(tensors: Mapping[str, object], origin: str) -> LazySource:
    """Wrap already-loaded torch tensors (e.g. from a pickled .bin)."""
    entries = {}
    for name, t in tensors.items():
        info = TensorInfo(name, tuple(t.shape), dtype_code(t.dtype), origin)
        entries[name] = (info, (lambda t=t: t))
    return LazySource(entries)


def load_sharded_dir(directory: Path, stem: str) -> SafetensorsSource:
    """`stem.safetensors`, or shards listed in `stem.safetensors.index.json`."""
    directory = Path(directory)
    single = directory / f"{stem}.safetensors"
    index = directory / f"{stem}.safetensors.index.json"
    if index.exists():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise AdafuseError(f"{index}: expected a 'weight_map' object of tensor name -> shard file")
        shards = sorted(set(weight_map.values()))
        _check_shard_numbering(index, shards)
        for shard in shards:
            if not (directory / shard).is_file():
                raise AdafuseError(f"{index}: shard '{shard}' named in the index is missing from {directory}")
        return SafetensorsSource([directory / s for s in shards], expected_map=weight_map)
    if single.exists():
        return SafetensorsSource([single])
    raise AdafuseError(f"{directory}: no {single.name} or {index.name} found")


SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def _check_shard_numbering(index: Path, shards: list[str]) -> None:
    """Hugging Face shard names (`-00001-of-00003`) must number 1..N with none missing."""
    numbered = [SHARD_NAME.search(s) for s in shards]
    if not shards or not all(numbered):
        return
    totals = {int(m.group(2)) for m in numbered}
    present = sorted(int(m.group(1)) for m in numbered)
    if len(totals) != 1 or present != list(range(1, totals.pop() + 1)):
        raise AdafuseError(f"{index}: shard index is not contiguous: it names shards {', '.join(shards)}, "
                           f"expected -00001-of-N .. -N-of-N with none missing")


def check_readable_file(path: Path, what: str = "file") -> None:
    """Not found, a symlink loop, or a directory: each gets its own one-line message."""
    if path.is_symlink() and not path.exists():
        raise AdafuseError(f"{path}: broken or looping symbolic link, expected a {what}")
    if not path.exists():
        raise AdafuseError(f"{path}: file not found")
    if path.is_dir():
        raise AdafuseError(f"{path}: expected a {what}, found a directory")


def check_directory(path: Path, what: str) -> None:
    if path.is_symlink() and not path.exists():
        raise AdafuseError(f"{path}: broken or looping symbolic link, expected a {what}")
    if not path.exists():
        raise AdafuseError(f"{path}: {what} not found")
    if not path.is_dir():
        raise AdafuseError(f"{path}: expected a {what}, found a file")


def read_json(path: Path) -> object:
    path = Path(path)
    check_readable_file(path, "JSON file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise AdafuseError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AdafuseError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the destination directory, then rename.

    A failure or interruption leaves any previous file untouched and no temporary behind.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise AdafuseError(f"{path}: output directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise AdafuseError(f"{path}: cannot write in {directory}: {e.strerror or e}") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False):
    """Build a directory under a temporary sibling name, then rename it into place.

    An existing non-empty `path` is replaced only with `force` (and only once the new one is
    complete); a failure or Ctrl-C leaves the previous directory intact and no temporary behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.exists() and not path.is_dir():
        raise AdafuseError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise AdafuseError(f"{path}: directory is not empty; pass --force to overwrite")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AdafuseError(f"{path}: parent directory {parent} {state}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise AdafuseError(f"{path}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / "d")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(tensors: Mapping[str, object], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=dict(metadata or {})))


def save_json(obj: object, path: Path) -> None:
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
