"""Test HTTP servers (adafuse-serve, the replay / history test server) started on port 0: each is read up to its
"listening on http://HOST:PORT" line, and every one started is stopped when the group closes."""
from __future__ import annotations

import subprocess
from collections.abc import Sequence


class Servers:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: Sequence[object]) -> str:
        """Starts cmd (which must listen on port 0) and returns its base URL; fails with its stderr if it died."""
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # "listening on http://127.0.0.1:PORT", or EOF if it died
        if not line.startswith("listening on http://"):
            proc.kill()
            raise AssertionError(f"{cmd[0]} did not start: {line!r} {proc.stderr.read()[-2000:]}")
        return line.split()[-1]

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
