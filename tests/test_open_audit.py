"""Every command under an audit hook on `open`: no path outside the checkpoint, the base, the output,
temporary directories and Python's/the system's own library locations is opened."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, sys
log, seen = open(sys.argv[1], "w"), []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        seen.append(os.path.abspath(os.fsdecode(args[0])))
sys.addaudithook(hook)
from adafuse_export.cli import main
code = main(sys.argv[2:])
json.dump({"code": code, "opened": seen}, log)
log.close()
"""

COMMANDS = {
    "inspect": lambda c, o: ["inspect", c],
    "run": lambda c, o: ["run", c, "--prompt-ids", "1,2", "--save-logits", o / "logits.safetensors"],
    "export-onnx": lambda c, o: ["export-onnx", c, o / "onnx"],
    "export-routes": lambda c, o: ["export-routes", c, o / "routes.safetensors"],
    "validate": lambda c, o: ["validate", c, o / "onnx", "--steps", "1"],
    "convert": lambda c, o: ["convert", c, o / "m.engine", "--max-seq", "16"],
    "make-example": lambda c, o: ["make-example", o / "example"],
}


def system_roots() -> list[Path]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(), site.getusersitepackages(),
             *sysconfig.get_paths().values(), str(REPO / "adafuse_export"),
             str(REPO / "adafuse_export.egg-info"),  # the package's own metadata under `pip install -e .`
             "/usr", "/lib", "/lib64", "/etc", "/proc",
             "/sys", "/dev/null", "/dev/shm"}
    return [Path(os.path.realpath(r)) for r in roots]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_opens_only_what_it_may(example_dirs, tmp_path, command):
    ckpt, out, tmp = tmp_path / "ckpt", tmp_path / "out", tmp_path / "tmp"
    shutil.copytree(example_dirs["pregate"], ckpt)
    for d in (out, tmp):
        d.mkdir()
    shutil.copy(ckpt / "model.safetensors", tmp_path / "decoy.safetensors")  # a sibling it must never read
    if command == "validate":
        subprocess.run([sys.executable, "-m", "adafuse_export", "export-onnx", str(ckpt), str(out / "onnx")], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp), HOME=str(tmp))
    r = subprocess.run([sys.executable, "-c", PROBE, str(report), *map(str, COMMANDS[command](ckpt, out))],
                       capture_output=True, text=True, cwd=out, env=env, timeout=500)
    # cwd is the output folder: shutil.rmtree opens entries relative to a directory fd, which the
    # audit event reports as bare names (the tool itself only opens the absolute paths it is given).
    data = json.loads(report.read_text())
    assert data["code"] in (0, 2) and "Traceback" not in r.stderr, r.stderr  # 2: convert without a runnable TensorRT
    allowed = [Path(os.path.realpath(p)) for p in (ckpt, out, tmp)] + system_roots()
    opened = {Path(os.path.realpath(p)) for p in data["opened"]}
    outside = sorted(str(p) for p in opened if not any(p == a or p.is_relative_to(a) for a in allowed))
    assert outside == [], outside
    assert any(p.is_relative_to(ckpt if command != "make-example" else out) for p in opened)  # the hook saw the reads
