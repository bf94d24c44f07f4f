"""Source-format converters, one module each, registered by name.

A converter answers `detect(path)` (does this directory look like my format?) and
`load(path, base=None)` (a validated canonical Checkpoint, tensors still lazy).
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..errors import AdafuseError
from ..tensors import check_directory


class Converter:
    name: str = ""
    description: str = ""

    def detect(self, path: Path) -> bool:
        raise NotImplementedError

    def load(self, path: Path, base: Path | None = None) -> Checkpoint:
        raise NotImplementedError


REGISTRY: dict[str, Converter] = {}


def register(cls: type[Converter]) -> type[Converter]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"converter '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def _ensure_loaded() -> None:
    # Importing the modules registers them; order is detection order.
    from . import adafuse, peft_lora, moe_peft, lora_nums, xlora  # noqa: F401


def converters() -> dict[str, Converter]:
    _ensure_loaded()
    return REGISTRY


def detect_format(path: Path) -> str:
    path = Path(path)
    check_directory(path, "checkpoint directory")
    for name, conv in converters().items():
        if conv.detect(path):
            return name
    raise AdafuseError(f"{path}: unknown checkpoint layout (registered formats: {', '.join(converters())}; use --format NAME to force one)")


def load_checkpoint(path: Path | str, format: str | None = None, base: Path | str | None = None,
                    validate: bool = True) -> Checkpoint:
    path = Path(path)
    for option, p in (("CKPT", path), ("--base", base)):
        try:
            str(p).encode("utf-8")
        except UnicodeError:
            raise AdafuseError(f"{option} {ascii(str(p))}: the path is not valid UTF-8") from None
    name = format or detect_format(path)
    if name not in converters():
        raise AdafuseError(f"--format '{name}' is unknown (registered formats: {', '.join(converters())})")
    check_directory(path, "checkpoint directory")
    ckpt = converters()[name].load(path, Path(base) if base else None)
    if validate:
        ckpt.validate()
    return ckpt


def resolve_base(adapter_dir: Path, declared: object, base: Path | None) -> Path:
    """The base model directory of a PEFT-style adapter: --base, else base_model_name_or_path if local."""
    if base is not None:
        try:
            check_directory(base, "base model directory")
        except AdafuseError as e:
            raise AdafuseError(f"--base {e}") from None
        return base
    if isinstance(declared, str) and declared:
        candidate = Path(declared)
        if not candidate.is_absolute():
            local = (adapter_dir / candidate)
            candidate = local if local.is_dir() else candidate
        if candidate.is_dir():
            return candidate
        raise AdafuseError(f"{adapter_dir}: base_model_name_or_path '{declared}' is not a local directory; pass --base DIR")
    raise AdafuseError(f"{adapter_dir}: adapter names no base model; pass --base DIR")

