"""Arguments and options that several commands share, defined once; and the packages commands import lazily.

Each factory fixes an option's name, type and choices; a command passes what differs (its default,
its help). Choices come from the module that owns them, imported without torch or onnx so that
`--help` stays light.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdafuseError, missing_dependency, shown
from ..onnx.plugin_ops import STRATEGIES as PLUGIN_STRATEGIES

DTYPES = ("float32", "float16", "bfloat16")

ckpt_argument = click.argument("ckpt", type=click.Path(path_type=Path))
format_option = click.option("--format", "fmt", metavar="NAME", default=None,
                             help="Source format (see `adafuse-export formats`); detected when omitted.")
base_option = click.option("--base", type=click.Path(path_type=Path), default=None,
                           help="Base model directory for PEFT-style adapters (default: base_model_name_or_path).")


def emit(text: object = "", err: bool = False) -> None:
    """Print one line, escaped (errors.shown). The CLI prints every line through here (JSON aside, which escapes
    itself), and never a line with its own line breaks: no string from an input forges a line or drives the terminal."""
    click.echo(shown(text), err=err)


def dtype_option(default: str, help: str | None = None):
    return click.option("--dtype", type=click.Choice(DTYPES), default=default, show_default=True, help=help)


def force_option(help: str):
    """--force: replace an existing output, and only one that adafuse-export wrote (outputs.claim)."""
    return click.option("--force", is_flag=True, help=help)


def plugin_strategy_option(help: str):
    """--strategy of the plugin flavour: the op of every adapter site (onnx.plugin_ops.STRATEGIES; default fused)."""
    return click.option("--strategy", type=click.Choice(list(PLUGIN_STRATEGIES)), default=None, help=help)


def device_option(choices: tuple[str, ...], default: str, help: str):
    return click.option("--device", type=click.Choice(list(choices)), default=default, show_default=True, help=help)


def backend_option(help: str, extra: tuple[str, ...] = ()):
    """--backend: auto or a TensorRT kind (trt.backends), plus the command's own `extra` choices."""
    from ..trt.backends import names

    return click.option("--backend", type=click.Choice(["auto", *names(), *extra]), default="auto", show_default=True,
                        help=help)


def family_choices() -> list[str]:
    """The one place the CLI's model-family choices come from: the family registry (adafuse_export/families/)."""
    from ..families import names

    return list(names())


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdafuseError(f"{option}: expected comma-separated integers like 1,2,3, found '{text}'") from None
    if not ids:
        raise AdafuseError(f"{option}: expected at least one token id, found '{text}'")
    return ids


def import_torch():
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch") from None
    return torch


def import_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise missing_dependency("onnx", "onnx") from None
