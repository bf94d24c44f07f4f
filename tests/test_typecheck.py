"""mypy over the files setup.cfg's [mypy] section lists (runners/, trt/, validate.py, convert.py,
the ONNX builder and plugin-op contract): zero errors. mypy is installed by the [test] extra."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors():
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "setup.cfg")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "Success: no issues found" in r.stdout, f"mypy:\n{r.stdout}{r.stderr}"
