"""Open an exported model for running: resolve paths, reject what is not ONNX, check external data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AdafuseError
from . import DECODER, PREGATE, ROUTES, plugin_ops


@dataclass
class ModelFiles:
    decoder: Path
    pregate: Path | None
    routes: Path | None


def resolve(model: Path) -> ModelFiles:
    """MODEL is an exported directory or its decoder .onnx file; siblings are found next to it."""
    model = Path(model)
    if not model.exists():
        raise AdafuseError(f"{model}: model file or directory not found")
    if model.is_dir():
        decoder = model / DECODER
        if not decoder.is_file():
            raise AdafuseError(f"{model}: no {DECODER} in this directory (expected an `adafuse-export export-onnx` output)")
    else:
        decoder = model
    folder = decoder.parent
    pregate = folder / PREGATE if (folder / PREGATE).is_file() and decoder.name != PREGATE else None
    routes = folder / ROUTES if (folder / ROUTES).is_file() else None
    return ModelFiles(decoder, pregate, routes)


def load_header(path: Path):
    """The ModelProto without external tensor data; external-data files are checked for presence and size."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise AdafuseError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise AdafuseError(f"{path}: not an ONNX model (cannot parse it as an ONNX protobuf: {str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except OSError as e:
        raise AdafuseError(f"{path}: cannot read: {e.strerror or e}") from None
    if not model.graph.node or not model.opset_import:
        raise AdafuseError(f"{path}: not an ONNX model (no graph nodes or opset imports found)")
    sizes: dict[Path, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        location = path.parent / info.get("location", "")
        if location not in sizes:
            if not location.is_file():
                raise AdafuseError(f"{path}: external data file '{info.get('location')}' (tensor '{t.name}') is missing from {path.parent}")
            sizes[location] = location.stat().st_size
        numbers = {}
        for key in ("offset", "length"):
            text = info.get(key, "0")
            if not (text.isascii() and text.isdigit()):  # ONNX writes decimal byte counts
                raise AdafuseError(f"{path}: external data {key} of tensor '{t.name}' must be a byte count, found {text!r}")
            numbers[key] = int(text)
        end = numbers["offset"] + numbers["length"]
        if end > sizes[location]:
            raise AdafuseError(f"{path}: external data file '{info.get('location')}' is truncated: tensor '{t.name}' "
                               f"needs bytes up to {end}, found {sizes[location]}")
    return model


def uses_plugin(model) -> bool:
    return any(n.domain == plugin_ops.DOMAIN for n in model.graph.node) or \
        any(o.domain == plugin_ops.DOMAIN for o in model.opset_import)


def metadata(model) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}
