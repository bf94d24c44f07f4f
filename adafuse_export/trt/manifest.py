"""The engine sidecar manifest (`out.engine` -> `out.json`): everything a C++ service needs.

It records the engine's tensors, shapes, dtypes and optimisation profiles, the routing
contract, the plugin library name/version, and SHA-256 hashes of the engine, the ONNX files
and the routing table, plus the source checkpoint's tensor-index hash. Loaders refuse an
engine whose hash or plugin version does not match (verify_engine).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AdafuseError
from ..onnx import contract, plugin_ops
from ..inputs import confine, open_regular, read_json
from ..summary import adapter_summary, routing_metadata
from ..weights import WEIGHT_FORMATS

MANIFEST_FORMAT = "adafuse-engine"
MANIFEST_VERSION = contract.VERSION  # the decoder contract the engine's tensors follow
# the routing section: "kind" (the summary's "routing") and these fields of summary.adapter_summary
ROUTING_FIELDS = ("router_kind", "expert_kind", "num_experts", "top_k", "normalize_topk", "pregate_input")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:  # a FIFO named in a manifest must not block
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_path(engine: Path) -> Path:
    return engine.with_suffix(".json")


def make_manifest(*, engine_file: Path, engine_name: str, onnx_dir: Path, onnx_dir_name: str, onnx_manifest: dict,
                  backend, io: dict, dtype: str, max_batch: int, max_seq: int, checkpoint, weights: str = "dtype",
                  version_compatible: bool = False, kv_in_place: bool = False) -> dict:
    """version_compatible: built with --version-compatible (engine.version_compatible; the runtime then loads
    TensorRT's lean runtime). kv_in_place: the decoder updates its cache in place (engine.kv_in_place; the runtime binds
    present.{l} to the memory of past_key_values.{l}). Optional fields, absent for false, so the manifest version (the
    decoder contract's) is unchanged and older manifests read as a copied cache."""
    files = {f"{onnx_dir_name}/{p.name}": sha256_file(p) for p in sorted(onnx_dir.iterdir()) if p.is_file()}
    custom_ops = onnx_manifest.get("custom_ops") if onnx_manifest.get("flavour") == "plugin" else None
    adapter = adapter_summary(checkpoint.adapter)
    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "adafuse_export_version": __version__,
        "engine": {"file": engine_name, "sha256": sha256_file(engine_file), "bytes": engine_file.stat().st_size,
                   "backend": backend.name, "backend_version": backend.version, "flavour": onnx_manifest["flavour"],
                   "dtype": dtype, "weights": WEIGHT_FORMATS[weights], "max_batch": max_batch, "max_seq": max_seq,
                   # TensorRT-RTX's build log: an engine with fp8_e4m3 tensors "will not be able to run on sm80, sm86"
                   "runs_on": backend.kind.runs_on + ("; FP8 weights: compute capability 8.9 or newer" if weights == "fp8"
                                                      else ""),
                   **({"version_compatible": True} if version_compatible else {}),
                   **({"kv_in_place": True} if kv_in_place else {})},
        "tensors": {"inputs": io["inputs"], "outputs": io["outputs"]},
        "profiles": io["profiles"],
        # runtime/src/manifest.cpp reads routing.kind, top_k and routes_file
        "routing": {"kind": adapter["routing"], **{k: adapter[k] for k in ROUTING_FIELDS},
                    "routes_file": f"{onnx_dir_name}/routes.safetensors" if (onnx_dir / "routes.safetensors").exists() else None,
                    "pregate_graph": f"{onnx_dir_name}/pregate.onnx" if (onnx_dir / "pregate.onnx").exists() else None},
        "plugin": ({"library": backend.kind.plugin_library, "name": custom_ops["op_type"], "strategy": custom_ops["strategy"],
                    "version": plugin_ops.PLUGIN_VERSION, "namespace": "", "fields": [n for n, _ in plugin_ops.FIELDS]}
                   if custom_ops else None),
        "files": files,
        "source": {"path": str(checkpoint.path), "format": checkpoint.format, "index_sha256": checkpoint.index_sha256()},
    }


def manifest_meta(manifest: dict) -> dict[str, str]:
    """The manifest's routing contract as the "adafuse.*" metadata an ONNX export carries (what
    validate.check_compatible compares with a checkpoint)."""
    r = manifest["routing"]
    meta = {"adafuse.format": f"{MANIFEST_FORMAT}/{MANIFEST_VERSION}", "adafuse.dtype": manifest["engine"]["dtype"],
            "adafuse.flavour": manifest["engine"]["flavour"],
            "adafuse.weights": manifest["engine"].get("weights", WEIGHT_FORMATS["dtype"]), **routing_metadata({**r, "routing": r["kind"]}),
            "adafuse.checkpoint_sha256": manifest["source"]["index_sha256"]}
    if manifest.get("plugin"):
        meta["adafuse.strategy"] = manifest["plugin"]["strategy"]
    return meta


def write_manifest(manifest: dict, path: Path) -> None:
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


# The fields Python reads from a manifest, with their JSON types (a list where a string belongs was a traceback)
FIELD_TYPES: dict[str, dict[str, Any]] = {"engine": {"file": str, "sha256": str, "backend": str, "backend_version": str, "flavour": str,
                          "dtype": str, "max_batch": int, "max_seq": int, "version_compatible": bool, "kv_in_place": bool},
               "routing": {"kind": str, "num_experts": int, "top_k": int, "routes_file": (str, type(None)),
                           "pregate_graph": (str, type(None))},
               "plugin": {"library": str, "name": str, "strategy": str, "version": str},
               "source": {"path": str, "format": str, "index_sha256": str}}


def _check_types(manifest: dict, mpath: Path) -> None:
    for section, fields in FIELD_TYPES.items():
        values = manifest.get(section)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise AdafuseError(f"{mpath}: '{section}' must be an object, found {type(values).__name__}")
        for key, kind in fields.items():
            value = values.get(key)
            if key in values and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
                expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                raise AdafuseError(f"{mpath}: '{section}.{key}' must be {expected.replace('NoneType', 'null')}, "
                                   f"found {type(value).__name__} {json.dumps(value)[:40]}")


def verify_engine(engine: Path, check_files: bool = True) -> dict:
    """The engine's manifest, after checking the engine's (and its files') hashes and plugin version."""
    engine = Path(engine)
    mpath = manifest_path(engine)
    if not mpath.exists() and not mpath.is_symlink():
        raise AdafuseError(f"{engine}: its manifest {mpath} is missing (adafuse-export convert writes it beside the "
                           "engine; the engine cannot be checked or run without it: convert again)")
    manifest = read_json(mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise AdafuseError(f"{mpath}: not an adafuse engine manifest (expected format '{MANIFEST_FORMAT}')")
    if manifest.get("version") != MANIFEST_VERSION:
        raise AdafuseError(f"{mpath}: manifest version {manifest.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
    if not engine.is_file():
        raise AdafuseError(f"{engine}: engine file not found")
    for key in ("engine", "plugin"):
        if manifest.get(key) is not None and not isinstance(manifest.get(key), dict):
            raise AdafuseError(f"{mpath}: '{key}' must be an object, found {type(manifest[key]).__name__}")
    _check_types(manifest, mpath)
    want = manifest.get("engine", {}).get("sha256")
    got = sha256_file(engine)
    if got != want:
        raise AdafuseError(f"{engine}: SHA-256 {got[:16]}... does not match the manifest's {str(want)[:16]}... "
                           "(engine modified or replaced; rebuild it with adafuse-export convert)")
    plugin = manifest.get("plugin")
    if plugin and plugin.get("name") not in plugin_ops.OP_TYPES:
        raise AdafuseError(f"{mpath}: engine needs plugin {plugin.get('name')!r}, this adafuse-export provides "
                           f"{' and '.join(plugin_ops.OP_TYPES)}")
    if plugin and plugin.get("version") != plugin_ops.PLUGIN_VERSION:
        raise AdafuseError(f"{mpath}: engine needs plugin {plugin.get('name')} version {plugin.get('version')!r}, "
                           f"this adafuse-export provides version {plugin_ops.PLUGIN_VERSION!r}")
    if check_files:
        verify_listed_files(manifest, engine.parent, mpath)
    return manifest


def verify_listed_files(manifest: dict, folder: Path, mpath: Path) -> None:
    """Every file the manifest's 'files' lists: named inside `folder`, present, listed once, and of the SHA-256
    recorded (an engine's manifest and a native artifact's alike)."""
    files = manifest.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise AdafuseError(f"{mpath}: 'files' must map file names to SHA-256 strings")
    listed: dict[str, str] = {}
    for rel in files:
        f = confine(folder, rel, mpath)  # a manifest may name only files in its folder
        if not f.is_file():
            raise AdafuseError(f"{f}: file listed in {mpath.name} is missing")
        # each file is hashed once: one file under many spellings ('a', './a', './/a', a link) is refused before
        # any hashing, so the work is bounded by the files that exist, not by the manifest's length
        real = os.path.realpath(f)
        if real in listed:
            first, second = sorted((listed[real], rel))  # the C++ reader meets names in sorted order
            raise AdafuseError(f"{mpath}: 'files' lists one file twice ({first!r} and {second!r})")
        listed[real] = rel
    for rel, digest in files.items():
        f = confine(folder, rel, mpath)
        if sha256_file(f) != digest:
            raise AdafuseError(f"{f}: SHA-256 does not match {mpath.name} (file modified after conversion)")
