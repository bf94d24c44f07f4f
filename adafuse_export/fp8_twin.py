"""The FP8 twin: the PyTorch reference with a model's stored FP8 projection weights, dequantized.

An FP8-weights model (a native artifact of `convert --backend native --weights fp8`, or an ONNX export of
`convert --weights fp8`) is judged against the reference whose projection weights are the model's own e4m3
weights times their scales (quantize.dequantize_fp8), so a runtime is judged against what it was given rather
than against the quantization error; validate.quantization_effect measures that error separately.

`load_fp8_twin(model, source)` reads the weights from either form:
  native artifact (a directory)  each stage's stacked matrix '<stage>.weight' [out, in] F8_E4M3 and its
                                 '<stage>.weight_scale' [out] in weights.safetensors; a projection's rows
                                 dequantized in float64, then the model's dtype (the kernels never materialise W)
  ONNX decoder (a .onnx file)    each projection's '<name>.weight' float8e4m3fn initializer and its
                                 '<name>.weight_scale' float32, inline or in external data; dequantized as the
                                 graph's DequantizeLinear does it (float32, one rounding), then the model's dtype
Per-output-channel scales make the two forms the same numbers: a row's scale depends on that row alone.
The twin is the expected result of both native strategies: fused computes (x W8^T) * scale + the LoRA term; switch
merges each decode token's experts into a copy of the weight in the model's dtype, round(W8 * scale + sum_j c_j B A)
(float32, one rounding: the twin's weight plus the deltas, as a 16-bit model's switch merges into its own weight),
so either differs from the twin by the model dtype's rounding only, which validate's bounds cover.
A static LoRA is merged into the stored weight, so its site is dropped from the model. A streaming model
(LayerWeights) reads the rows as it reads a layer, so it still holds one layer at a time.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from .errors import AdafuseError
from .inputs import read_json

ONNX_SCALE_SUFFIX = "_scale"  # '<weight>' float8e4m3fn + '<weight>_scale' float32 (onnx/builder.py fp8_weight)


def stores_fp8(source: Path) -> bool:
    """Whether a native artifact directory or an ONNX decoder file holds FP8 weights (its manifest / metadata)."""
    source = _weights_file(Path(source))
    if source.is_dir():
        from .native_artifact import MANIFEST, stores_fp8 as manifest_fp8

        return manifest_fp8(read_json(source / MANIFEST))
    from .onnx.load import load_header, metadata

    return metadata(load_header(source)).get("adafuse.weights") == "fp8_e4m3"


def load_fp8_twin(model, source: Path) -> bool:
    """Make `model` (a reference.ReferenceModel of the checkpoint `source` was converted from) the FP8 twin of
    `source` (see the module docstring). Returns False, the model untouched, when its weights are not FP8."""
    source = _weights_file(Path(source))
    if source.is_dir():
        from .native_artifact import fp8_rows

        rows = fp8_rows(model.ckpt, source)
    else:
        rows = onnx_fp8_rows(model.ckpt, source)
    if rows is None:
        return False
    read, static = rows
    install(model, read, static)
    return True


def _weights_file(source: Path) -> Path:
    """Where a model's FP8 weights are: an engine's in the ONNX export beside it (`convert` writes OUT.onnx/, whose
    files the engine manifest lists with their SHA-256), an ONNX export directory's in its decoder."""
    if source.suffix == ".engine":
        return source.with_suffix(".onnx") / "decoder.onnx"
    if source.is_dir() and (source / "decoder.onnx").is_file():
        return source / "decoder.onnx"
    return source


Rows = tuple[dict[str, Callable[[], Any]], set[tuple[int, str]]]  # weight name -> its twin weight (float64 or
# float32, still to be cast to the model's dtype); (layer, module) of the static sites merged into their weight


def install(model, read: dict[str, Callable[[], Any]], static: set[tuple[int, str]]) -> None:
    """Swap the weights `read` names for what it reads, cast to the model's device and dtype; drop `static`."""
    from .reference.model import LayerWeights

    for key in static:
        model.sites.pop(key, None)

    def twin(name: str):
        return read[name]().to(device=model.device, dtype=model.dtype).contiguous()

    if isinstance(model.w, LayerWeights):
        load, weights = model.w.load, model.w
        weights.current, weights.layer = {}, None  # nothing read before the swap stays

        def twin_load(src, name):
            return twin(name) if name in read else load(src, name)

        weights.load = twin_load
    else:
        for name in read:
            model.w[name] = twin(name)


def onnx_fp8_rows(ckpt, path: Path) -> Rows | None:
    """The twin's weights of an ONNX decoder exported with FP8 weights, or None when its metadata says it has
    none. Every projection must be there as float8e4m3fn [out, in] with float32 scales [out]: anything else
    (a missing, retyped or reshaped initializer, a scale that is not finite and positive) is refused naming it."""
    import numpy as np
    import torch
    from onnx import TensorProto

    from .native_artifact import stages
    from .onnx.load import load_header, metadata
    from .quantize import dequantize_fp8, quantize_fp8_per_channel
    from .weights import base_weight, torch_dtype

    path = Path(path)
    header = load_header(path)
    if metadata(header).get("adafuse.weights") != "fp8_e4m3":
        return None
    inits = {t.name: t for t in header.graph.initializer}
    m = ckpt.model
    read: dict[str, Callable[[], Any]] = {}
    static: set[tuple[int, str]] = set()

    def check(name: str, elem: int, shape: tuple[int, ...]):
        t = inits.get(name)
        if t is None:
            raise AdafuseError(f"{path}: initializer '{name}' is missing (an FP8 export holds every projection's "
                               f"weight and its scales)")
        if t.data_type != elem or tuple(t.dims) != shape:
            raise AdafuseError(f"{path}: initializer '{name}' is {TensorProto.DataType.Name(t.data_type)} {list(t.dims)}, "
                               f"expected {TensorProto.DataType.Name(elem)} {list(shape)}")
        return t

    def data(t, np_dtype, shape: tuple[int, ...]):
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}  # load_header checked file, offset and length
            raw = np.fromfile(path.parent / info["location"], dtype=np.uint8, count=int(info.get("length", "-1")),
                              offset=int(info.get("offset", "0")))
        else:
            raw = np.frombuffer(t.raw_data, dtype=np.uint8)
        if raw.size != int(np.prod(shape)) * np.dtype(np_dtype).itemsize:
            raise AdafuseError(f"{path}: initializer '{t.name}' holds {raw.size} bytes of raw data, expected "
                               f"{list(shape)} of {TensorProto.DataType.Name(t.data_type)}")
        return torch.from_numpy(raw.copy().view(np_dtype).reshape(shape))

    source = metadata(header).get("adafuse.fp8_quantized_from", "")
    if source not in ("float16", "bfloat16"):
        raise AdafuseError(f"{path}: metadata adafuse.fp8_quantized_from is {source!r}, expected float16 or bfloat16 "
                           f"(the dtype the exporter rounded the weights to before quantizing them)")
    verified: set[str] = set()

    def weight(name: str, site, q_proto, scale):
        q = data(q_proto, np.uint8, tuple(q_proto.dims)).view(torch.float8_e4m3fn)
        if name not in verified:
            # the export must hold this checkpoint's quantization (quantize.py of the weight it was exported from):
            # a tampered scale or matrix would otherwise be the very reference it is judged against
            want_q, want_scale = quantize_fp8_per_channel(base_weight(ckpt, name, torch_dtype(source), site), name)
            for what, got, want in (("_scale", scale, want_scale), ("", q, want_q)):
                diff = (got.view(torch.uint8) if what == "" else got) != (want.view(torch.uint8) if what == "" else want)
                if bool(diff.any()):
                    row = int(diff.nonzero()[0, 0])
                    raise AdafuseError(f"{path}: initializer '{name}{what}' differs from the quantization of {ckpt.path}'s "
                                       f"weight at row {row} ({int(diff.sum())} value(s)): the export is not this "
                                       f"checkpoint's, or was modified")
            verified.add(name)
        return dequantize_fp8(q, scale, torch.float32)  # as DequantizeLinear computes it: q * scale rounded once

    # every projection's pair checked before anything runs; the scales (one float per row) read and checked now,
    # the e4m3 matrices when the reference reads their layer
    for st in stages(ckpt):
        for x in st.members:
            name, out = f"{m.arch.weight_prefix(st.layer, x.module)}.weight", x.rows[1] - x.rows[0]
            q_proto = check(name, TensorProto.FLOAT8E4M3FN, (out, st.in_features))
            scale = data(check(name + ONNX_SCALE_SUFFIX, TensorProto.FLOAT, (out,)), np.float32, (out,))
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                raise AdafuseError(f"{path}: initializer '{name}{ONNX_SCALE_SUFFIX}' holds {float(scale[row])} at row "
                                   f"{row}; FP8 scales are finite and positive (quantize.py)")
            read[name] = partial(weight, name, x.site if x.site is not None and x.site.static else None, q_proto, scale)
            if x.site is not None and x.site.static:
                static.add((st.layer, x.module))
    return read, static
