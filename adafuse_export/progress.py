"""Progress of a long stage (tensors written, bytes, ETA): one rewritten line on a terminal,
plain lines at most every `every` seconds otherwise (logs, pipes, CI)."""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, TextIO


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Progress:
    def __init__(self, what: str, total_items: int, total_bytes: int, stream: TextIO | None = None,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic, indent: str = "         "):
        self.what, self.total_items, self.total_bytes = what, total_items, total_bytes
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.1 if self.tty else every
        self.clock, self.indent = clock, indent
        self.items = self.bytes = 0
        self.start = self.last = clock()
        self._open_line = False

    def line(self, now: float) -> str:
        elapsed = now - self.start
        text = f"{self.indent}{self.what}: {self.items}/{self.total_items} tensors, {_size(self.bytes)} of {_size(self.total_bytes)}"
        if self.total_bytes and self.bytes:
            eta = elapsed * (self.total_bytes - self.bytes) / self.bytes
            text += f", {elapsed:.0f} s, ETA {eta:.0f} s"
        return text

    def update(self, nbytes: int, items: int = 1) -> None:
        self.items += items
        self.bytes += nbytes
        now = self.clock()
        if now - self.last < self.every and self.items < self.total_items:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\033[K")
            self._open_line = True
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


@contextmanager
def heartbeat(log: Callable[[str], object], what: str, every: float | None = None,
              stream: TextIO | None = None) -> Iterator[None]:
    """A line `what: N s` every `every` seconds while the body runs, for work that reports nothing itself
    (TensorRT's engine build): every 10 s on a terminal, every 60 s in logs and pipes."""
    tty = bool(getattr(stream if stream is not None else sys.stdout, "isatty", lambda: False)())
    period = every if every is not None else (10.0 if tty else 60.0)
    stop, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(period):
            log(f"{what}: {time.monotonic() - start:.0f} s")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
