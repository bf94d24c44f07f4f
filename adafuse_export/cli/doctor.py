"""`adafuse-export doctor`: what this installation holds and whether each native part works."""
from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import AdafuseError
from .options import emit


@click.command(short_help="Check the installed native parts (kernels, plugins, runtime, service).")
@click.option("--require-all", is_flag=True,
              help="Fail when a part was left out of the build too (CI's check of a release wheel).")
def doctor(require_all):
    """Check what this installation holds: the kernel library, the TensorRT plugin library, the C++
    runtime with its header and CMake package, adafuse-serve and adafuse-generate.

    Each library is loaded and its entry points looked up; each executable answers --help. A part the
    build left out (no CUDA compiler, no TensorRT headers, ...) is listed with the reason the build gave.
    Exits non-zero when a shipped part does not work, or with --require-all when one was left out.
    """
    from .. import installation

    emit(f"adafuse-export {__version__} (Python {sys.version.split()[0]}) at {', '.join(map(str, installation.native_roots())) or '-'}")
    checks = installation.check_installation()
    width = max(len(c.part) for c in checks)
    for c in checks:
        emit(f"  {c.part:<{width}}  {c.state:<8}  {c.detail}")
    failed = [c.part for c in checks if c.state == "FAILED"]
    left_out = [c.part for c in checks if c.state == "left out"]
    if failed:
        raise AdafuseError(f"{len(failed)} native part(s) do not work: {', '.join(failed)}")
    if require_all and left_out:
        raise AdafuseError(f"--require-all: left out of this installation: {', '.join(left_out)}")
