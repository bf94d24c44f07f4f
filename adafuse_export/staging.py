"""Staging directories that outlive a killed run, and their removal by the next run.

`convert` builds its outputs in `.OUT.engine.XXXXXXXX.tmp/` beside the output and renames them
into place at the end. A SIGKILL (the kernel's OOM killer, `kill -9`) cannot be caught, so that
directory stays. Every staging directory therefore carries an owner marker (host, pid and the
process's start time); the next run on the same output removes a leftover only when it is a
directory of that name pattern, its marker names this host, and its owner process is gone (or the
pid now belongs to a later process). Anything else is left alone. The marker is read like any input
(a regular file that is not a link, at most MARKER_LIMIT bytes): anyone can plant one.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import AdafuseError
from .inputs import read_json

MARKER = ".adafuse-owner.json"
MARKER_LIMIT = 4096  # the marker we write is about 100 bytes


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; field 22 overall


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    now = _start_time(pid)
    return started is None or now is None or now == started


def make_staging(output: Path) -> Path:
    """A new private staging directory beside `output`, with this process's owner marker inside."""
    parent = output.parent if str(output.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=parent))
    marker = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
              "output": output.name}
    (staging / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return staging


def stale_stagings(output: Path) -> tuple[list[Path], list[Path]]:
    """(leftovers of dead runs on `output` that are safe to remove, same-pattern entries that are not
    ours to judge: no marker, or another host's). Stagings of runs still alive are in neither."""
    parent = output.parent if str(output.parent) else Path(".")
    stale, foreign = [], []
    host = socket.gethostname()
    for entry in sorted(parent.glob(f".{output.name}.*.tmp")):
        owner = _read_marker(entry)
        if (not isinstance(owner, dict) or owner.get("output") != output.name or owner.get("host") != host
                or not isinstance(owner.get("pid"), int)):
            foreign.append(entry)
        elif not _alive(owner["pid"], owner.get("start_time")):
            stale.append(entry)
    return stale, foreign


def _read_marker(entry: Path) -> object:
    """The owner marker of a staging directory, or None: read like any input (a regular file, not a link, bounded:
    a FIFO would block and a link to /dev/zero would never end), since anyone can put one there."""
    marker = entry / MARKER
    if entry.is_symlink() or not entry.is_dir() or marker.is_symlink():
        return None
    try:
        return read_json(marker, limit=MARKER_LIMIT)
    except AdafuseError:
        return None


def remove_stale_stagings(output: Path, log=print) -> list[Path]:
    """Remove what `stale_stagings` finds safe to remove, saying so; returns the removed paths."""
    stale, foreign = stale_stagings(output)
    for entry in stale:
        shutil.rmtree(entry, ignore_errors=True)
        log(f"removed {entry}: staging left by an earlier run on {output.name} that was killed (its process is gone)")
    for entry in foreign:
        log(f"note: left {entry} alone: it carries no adafuse owner marker of this host")
    return stale
