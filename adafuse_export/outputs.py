"""Writing outputs so that no output can destroy an input or leave half a file: one mechanism for every command.

`claim(path, ...)` runs before any work is done, for every output (export-onnx, convert's engine,
manifest and .onnx folder, export-routes, run --save-logits, make-example, --timing-cache):
- an output may not be, contain, or sit inside an input (the checkpoint directory with its files,
  the base model directory), compared after resolving symbolic links;
- an existing output is replaced only with --force, and only when it is recognisably something
  this tool wrote (`ours`: an export manifest, an engine manifest, a safetensors header marked
  `adafuse_export.output`, the make-example marker file); a directory only when every entry in it
  is a file the tool's own record names (the export manifest's files, the example's files):
  --force never deletes a user's own files, not even a notes.txt put inside an earlier output;
- a directory output may not be or contain the current directory (replacing it would leave the
  user's shell in a deleted folder);
- a directory where a file is expected (or the reverse) and a missing parent are one-line errors.
`atomic_write` / `atomic_directory` then write through a temporary sibling renamed into place:
a full disk, a file-size limit (RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with
EFBIG) or Ctrl-C leaves the previous output intact and no temporary behind, and errors name the
output, never the temporary. Every write of a command happens inside `write_errors` (those two,
and convert's staging directory), which turns a failed write into that one line.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import AdafuseError

MARKER_KEY = "adafuse_export.output"  # safetensors metadata key of files this tool wrote
EXAMPLE_MARKER = ".adafuse-example"  # file inside a make-example directory


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if out.is_relative_to(inp):
        return "sits inside"
    if inp.is_relative_to(out):
        return "contains"
    return None


def claim(path: Path, *, option: str, inputs: Iterable[Path], force: bool,
          ours: Callable[[Path], "bool | frozenset[str] | None"], directory: bool = False,
          updated_in_place: bool = False) -> Path:
    """Check that `path` may be written (see the module doc); `updated_in_place`: an existing file is read and
    extended (a timing cache), so it needs no --force but must still be a regular file outside the inputs.
    `ours` of a directory returns the names the tool wrote in it (None: not the tool's)."""
    path = Path(path)
    try:
        os.fsencode(path)
        str(path).encode("utf-8")
    except UnicodeError:
        raise AdafuseError(f"{option} {ascii(str(path))}: the path is not valid UTF-8") from None
    real = _real(path)
    for inp in inputs:
        relation = _relation(real, _real(inp))
        if relation:
            raise AdafuseError(f"{option} {path}: the output {relation} the input {inp}; choose a path outside the inputs")
    cwd = _real(Path("."))
    if directory and (real == cwd or cwd.is_relative_to(real)):
        raise AdafuseError(f"{option} {path}: the output {'is' if real == cwd else 'contains'} the current directory, "
                           "which would be replaced under you; run from outside it or choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AdafuseError(f"{option} {path}: {'parent' if directory else 'output'} directory {parent} {state}")
    if not (path.exists() or path.is_symlink()):
        return path
    if path.is_dir() != directory or path.is_symlink():
        found = "a symbolic link" if path.is_symlink() else "a directory" if path.is_dir() else "a file"
        raise AdafuseError(f"{option} {path}: expected {'a directory' if directory else 'a file'}, found {found}")
    if directory and not any(path.iterdir()):
        return path
    if updated_in_place:
        return path
    if not force:
        what = "directory is not empty" if directory else "already exists"
        raise AdafuseError(f"{path}: {what}; pass --force to overwrite")
    written = ours(path)
    if not written:
        raise AdafuseError(f"{option} {path}: exists and was not written by adafuse-export; "
                           "refusing to replace it even with --force (move it away or choose another path)")
    if directory and isinstance(written, frozenset):
        foreign = sorted(set(os.listdir(path)) - written)
        if foreign:
            raise AdafuseError(f"{option} {path}: holds {foreign[0]!r}" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
                               + ", which adafuse-export did not write; --force replaces only what it wrote, "
                               "so move that away first")
    return path


def claim_engine_outputs(outs: dict[str, Path], inputs: tuple[Path, ...], force: bool, timing_cache: Path | None) -> None:
    """convert's outputs (engine, manifest, .onnx folder) and its timing cache, which is read and extended."""
    ours = is_engine_output(outs["manifest"], outs["engine"].name)
    claim(outs["engine"], option="ENGINE", inputs=inputs, force=force, ours=lambda _: ours)
    claim(outs["manifest"], option="ENGINE's manifest", inputs=inputs, force=force, ours=lambda _: ours)
    claim(outs["onnx"], option="ENGINE's ONNX folder", inputs=inputs, force=force, ours=engine_onnx_files, directory=True)
    if timing_cache is not None:
        claim(timing_cache, option="--timing-cache", inputs=inputs + tuple(outs.values()), force=force,
              ours=lambda _: False, updated_in_place=True)


# Recognisers: did this tool write what is at `path`?

def onnx_export_files(path: Path) -> frozenset[str] | None:
    """The files an export's manifest records (graphs, their external data, the routing table, itself), or None."""
    from .inputs import read_json

    try:
        manifest = read_json(path / "manifest.json")
    except AdafuseError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "adafuse-onnx":
        return None
    names = {"manifest.json"}
    graphs = manifest.get("graphs")
    for graph in graphs.values() if isinstance(graphs, dict) else ():
        if isinstance(graph, dict):
            names |= {graph[k] for k in ("file", "external_data") if isinstance(graph.get(k), str)}
    routes = manifest.get("routes")
    if isinstance(routes, dict) and isinstance(routes.get("file"), str):
        names.add(routes["file"])
    return frozenset(names)


BUILD_LOG = "tensorrt_build.log"  # TensorRT's parser and builder messages, which convert keeps in ENGINE.onnx/


def engine_onnx_files(path: Path) -> frozenset[str] | None:
    """convert's ENGINE.onnx folder: the export's files and the builder log convert adds."""
    files = onnx_export_files(path)
    return None if files is None else files | {BUILD_LOG}


def is_onnx_export(path: Path) -> bool:
    return onnx_export_files(path) is not None


def example_files(path: Path) -> frozenset[str] | None:
    """A make-example directory's files (the canonical checkpoint and the marker), or None without the marker."""
    from .checkpoint import ADAPTER_CONFIG, ADAPTERS, BASE_STEM, CONFIG

    if not is_example(path):
        return None
    return frozenset((EXAMPLE_MARKER, CONFIG, ADAPTER_CONFIG, ADAPTERS, f"{BASE_STEM}.safetensors"))


def is_example(path: Path) -> bool:
    return (path / EXAMPLE_MARKER).is_file() and not (path / EXAMPLE_MARKER).is_symlink()


def is_marked_safetensors(path: Path) -> bool:
    from .tensors import read_safetensors_header

    try:
        _, metadata, _ = read_safetensors_header(path)
    except AdafuseError:
        return False
    return isinstance(metadata, dict) and MARKER_KEY in metadata


def is_engine_output(manifest: Path, engine_name: str) -> bool:
    """convert's outputs are ours when the engine manifest beside them names this engine."""
    from .inputs import read_json

    try:
        data = read_json(manifest)
    except AdafuseError:
        return False
    engine = data.get("engine") if isinstance(data, dict) else None
    return isinstance(data, dict) and data.get("format") == "adafuse-engine" and isinstance(engine, dict) \
        and engine.get("file") == engine_name


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


# errors of the write itself (not of reading an input while writing)
WRITE_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _named(error: BaseException, tmp: Path | None, path: Path) -> str:
    """The error's message with the temporary path replaced by the output's."""
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return text if tmp is None else text.replace(str(tmp), str(path))


@contextlib.contextmanager
def write_errors(path: Path, tmp: Path | None = None):
    """A failed write inside the block (full disk, file-size limit, permissions): one AdafuseError naming the
    output `path`, never the temporary `tmp`; other OSErrors (reading an input while writing) pass on."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise AdafuseError(f"{path}: cannot write: {_named(e, tmp, path)}") from None


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the destination directory, then rename.

    A failure or interruption leaves any previous file untouched and no temporary behind.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise AdafuseError(f"{path}: output directory {directory} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise AdafuseError(f"{path}: cannot write in {directory}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except OSError as e:  # full disk, file-size limit, permissions
        _remove(tmp)
        if e.errno not in WRITE_ERRORS:
            raise
        raise AdafuseError(f"{path}: cannot write: {_named(e, tmp, path)}") from None
    except AdafuseError as e:
        _remove(tmp)
        raise AdafuseError(_named(e, tmp, path)) from None
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def move_into_place(moves: Iterable[tuple[Path, Path]], trash: Path) -> None:
    """Rename each staged `src` onto its `dst`, in order (so the last one's presence can mark a set of
    outputs complete). What was at a `dst` is first renamed into `trash` (made when first needed, on
    the same file system; the caller removes it), so a destination is never half-replaced."""
    for src, dst in moves:
        if dst.exists() or dst.is_symlink():
            trash.mkdir(exist_ok=True)
            os.replace(dst, trash / dst.name)
        os.replace(src, dst)


def _remove(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_directory(path: Path, force: bool = False):
    """Build a directory under a temporary sibling name, then rename it into place.

    An existing non-empty `path` is replaced only with `force` (and only once the new one is
    complete); a failure or Ctrl-C leaves the previous directory intact and no temporary behind.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    target = Path(os.path.abspath(path))  # "." or ".." has no name to put a sibling temporary beside
    if path.exists() and not path.is_dir():
        raise AdafuseError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise AdafuseError(f"{path}: directory is not empty; pass --force to overwrite")
    if not parent.is_dir():
        state = "is not a directory" if parent.exists() else "does not exist"
        raise AdafuseError(f"{path}: parent directory {parent} {state}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise AdafuseError(f"{path}: cannot write in {parent}: {e.strerror or e}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
        yield tmp
        trash = tmp.with_name(tmp.name + ".old")
        move_into_place([(tmp, target)], trash)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in WRITE_ERRORS:
            raise
        raise AdafuseError(f"{path}: cannot write: {_named(e, tmp, path)}") from None
    except AdafuseError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdafuseError(_named(e, tmp, path)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
