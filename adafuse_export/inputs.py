"""Reading the user's files so that no input can hurt: three mechanisms, used by every reader.

- Confinement (`confine`): a path that an input names (a shard in an index's weight_map, a file in an
  engine manifest, a fixed file name inside a checkpoint) is resolved against the input's own
  directory and refused when it leaves it: absolute, `..`, or a symbolic link whose target lies
  outside. Symbolic links are allowed when their resolved target is a regular file inside the
  directory, or inside the same Hugging Face cache repository folder (`models--org--name/`, whose
  `snapshots/<rev>/` files link into `../../blobs/`): that is how every HF download is laid out.
- Regular files only (`open_regular`): a FIFO, device or socket is refused from its `stat` before
  any `open` (so nothing blocks), the open itself is non-blocking, and `fstat` checks the opened
  file again (a swap between the two calls is caught).
- Bounded reads (`read_bytes`, `read_json`): a size limit checked against `fstat` before reading,
  JSON nesting depth and integer length limits, every failure one AdafuseError line.
- Sizes held (`check_held`): a count a file states (layers, experts, elements) is checked against what
  the files actually hold before anything proportional to it is allocated or iterated.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .errors import AdafuseError

MAX_JSON_BYTES = 64 * 1024 * 1024  # a 7B shard index is ~30 KB; configs are a few KB
MAX_JSON_DEPTH = 32  # configs nest 3 deep; deeper is not a config


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_readable_file(path: Path, what: str = "file") -> os.stat_result:
    """Not found, a symlink loop, a directory, a FIFO or a device: each its own one-line message."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            raise AdafuseError(f"{path}: broken or looping symbolic link, expected a {what}") from None
        raise AdafuseError(f"{path}: file not found") from None
    except OSError as e:
        if os.path.islink(path):
            raise AdafuseError(f"{path}: broken or looping symbolic link, expected a {what}") from None
        raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise AdafuseError(f"{path}: expected a {what}, found a {_kind(st.st_mode)}")
    return st


def check_directory(path: Path, what: str) -> None:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise AdafuseError(f"{path}: broken or looping symbolic link, expected a {what}")
    if not path.exists():
        raise AdafuseError(f"{path}: {what} not found")
    if not path.is_dir():
        raise AdafuseError(f"{path}: expected a {what}, found a file")


def open_regular(path: Path, what: str = "file") -> BinaryIO:
    """The file opened for reading, refused unless it is a regular file (before and after the open)."""
    path = Path(path)
    check_readable_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise AdafuseError(f"{path}: expected a {what}, found a {_kind(mode)}")
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, what: str, limit: int) -> bytes:
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise AdafuseError(f"{path}: {size} bytes, more than the {limit} a {what} may have")
        try:
            return f.read(limit + 1)[:limit]
        except OSError as e:
            raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None


def _depth(value: object) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json(text: str | bytes, where: object) -> object:
    """JSON with bounded nesting; integers longer than Python's digit limit and deep nesting are errors."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AdafuseError(f"{where}: not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdafuseError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise AdafuseError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # an integer with thousands of digits
        raise AdafuseError(f"{where}: invalid JSON: {str(e).split(';')[0]}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise AdafuseError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> object:
    path = Path(path)
    return parse_json(read_bytes(path, "JSON file", limit), path)


def hf_cache_repo(directory: Path) -> Path | None:
    """`.../models--org--name` when directory (resolved) is `.../models--org--name/snapshots/<rev>`."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return None


def confine(directory: Path, name: str, named_in: object) -> Path:
    """directory/name, refused when name (as named in `named_in`) leaves directory; see the module doc."""
    directory = Path(directory)
    if not isinstance(name, str) or not name:
        raise AdafuseError(f"{named_in}: expected a file name, found {name!r}")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or "\0" in name:
        raise AdafuseError(f"{named_in}: names '{name}', a path outside {directory}; only files inside it may be named")
    path = directory / rel
    check_inside(path, directory)
    return path


def check_inside(path: Path, directory: Path) -> None:
    """Refuse a path (within directory by name) whose symbolic links resolve outside directory."""
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(directory))]
    repo = hf_cache_repo(directory)
    if repo is not None:
        roots.append(repo)
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise AdafuseError(f"{path}: symbolic link to {real}, outside {directory}; only links to files inside the "
                           "checkpoint (or its Hugging Face cache folder) are followed")


def check_held(where: object, key: str, value: int, held: int, holding: str) -> None:
    """Refuse a count a file states (`key` = `value`) when it exceeds `held`, what the files hold: a tiny input
    must not size a huge allocation or loop. `holding` says what was counted ("tensors adapter_model.bin holds")."""
    if value > held:
        raise AdafuseError(f"{where}: {key} is {value}, more than the {held} {holding}")
