"""What each `convert` stage needs (peak memory, disk), estimated from the checkpoint's headers before
any weight is read, and what this machine has (its memory cgroup's limit if any, else MemAvailable;
free disk where the outputs go).

The figures are models fitted to measurements: export and validation on the Llama-2-7B-shaped synthetic
checkpoint (benchmarks/streaming_rss.py), the engine build on models from the tiny example to 7B width
(benchmarks/build_rss.py); docs/large-models.md. Each Need says what it counts.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .checkpoint import Checkpoint
from .errors import AdafuseError

GiB = 2**30
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Python, torch, onnx and onnxruntime imported, before any weight (measured: about 0.5 GiB).
RUNTIME_OVERHEAD = 600 * 2**20
# TensorRT-RTX 1.7's engine build (stage 4 of convert), peak resident memory of the whole process:
#   BUILD_FIXED_BYTES                                   the process (Python, torch, ONNX Runtime, TensorRT-RTX) and the builder
#   + BUILD_BYTES_PER_LAYER x decoder layers           per-layer graph and tactics
#   + BUILD_BYTES_PER_LAYER_WEIGHT_BYTE x the layers' weights (adapters included): the parser's, the builder's
#     and the engine's copies
#   + BUILD_BYTES_PER_OUTSIDE_WEIGHT_BYTE x the weights outside the layers (embeddings, lm_head, pre-gate)
# fitted (benchmarks/fit_build_rss.py: non-negative, each figure >= 1.1x its measurement) to the builds in
# benchmarks/results/build_rss.json, rounded up: convert's own build stage of the built-in example (0.54 GiB),
# a 58M Llama (8 layers, 32k vocabulary; 1.17 GiB), a 162M Qwen3 (152k vocabulary; 1.52 GiB at max seq 512 and
# 2048 alike) and a Llama-2-7B-width layer (4.16 GiB), and the builder alone on 7B-width models of 1, 2 and 4
# layers (3.42, 5.16, 8.62 GiB). The figure is 1.10-1.32x convert's measured peaks. max seq does not count: on a
# host without a GPU the builder allocates no activations (the 162M Qwen3 peaked at 1.52 GiB at 512 and 2048).
BUILD_FIXED_BYTES = int(0.56 * GiB)
BUILD_BYTES_PER_LAYER = 21 * 2**20
BUILD_BYTES_PER_LAYER_WEIGHT_BYTE = 4.39
BUILD_BYTES_PER_OUTSIDE_WEIGHT_BYTE = 4.65


@dataclass(frozen=True)
class Need:
    stage: str  # "export", "validate", "build" (reading the headers, done by now, needs little)
    memory: int  # peak resident bytes of the process during the stage
    disk: int  # bytes the stage adds beside the output
    what: str  # how the figure is made up, for messages


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


@dataclass(frozen=True)
class Sizes:
    """Element counts from the headers: all weights, the largest tensor, the decoder layers (how many, all
    their weights, the largest one's), and what lies outside the layers (embeddings, lm_head, final norm,
    pre-gate)."""

    elements: int
    largest_tensor: int
    largest_layer: int
    outside_layers: int
    layers: int = 0
    in_layers: int = 0

    @classmethod
    def of(cls, ckpt: Checkpoint) -> "Sizes":
        return cls.from_counts((name, source.info(name).numel) for source in (ckpt.base, ckpt.adapters)
                               for name in source.names())

    @classmethod
    def from_counts(cls, counts: Iterable[tuple[str, int]]) -> "Sizes":
        """From (tensor name, element count) pairs: a checkpoint's headers, or a shape's expected tensors."""
        per_layer: dict[int, int] = {}
        outside = largest = total = 0
        for name, n in counts:
            total += n
            largest = max(largest, n)
            layer = _layer_of(name)
            if layer is None:
                outside += n
            else:
                per_layer[layer] = per_layer.get(layer, 0) + n
        return cls(total, largest, max(per_layer.values(), default=0), outside, len(per_layer), sum(per_layer.values()))

    def bytes(self, dtype: str) -> int:
        return self.elements * ITEMSIZE[dtype]


def estimate(ckpt: Checkpoint, dtype: str, validate: str, reference_dtype: str | None, build: bool) -> list[Need]:
    """Peak memory and disk of each stage. validate: full | layerwise | off; reference_dtype: the dtype the
    reference and the validated graph run in (float32 when a bfloat16 export is checked through its
    float32 twin), None for the model's. A half-precision graph is judged against the float32 reference as
    well (validate's measured bound): both references are counted."""
    s = Sizes.of(ckpt)
    weights = s.bytes(dtype)
    f32_largest = s.largest_tensor * 4
    needs = [Need("export", RUNTIME_OVERHEAD + 2 * f32_largest, weights,
                  f"one tensor at a time (largest {f32_largest / GiB:.2f} GiB in float32)")]
    if validate != "off":
        vdtype = reference_dtype or dtype
        graph = s.bytes(vdtype)
        if validate == "full":
            # ONNX Runtime's optimised CPU session: the weights, plus float32 copies of float16 ones (constant-folded
            # Casts) or packed copies of float32 ones (prepacking)
            ort = graph + s.bytes("float32")
            ref, how, held = graph, "the reference's weights", f"{vdtype} graph"
            if vdtype != "float32":
                ref, how = ref + s.bytes("float32"), f"the {vdtype} and float32 references' weights"
        else:
            # one segment at a time (a layer, or the embeddings/head outside them): its pages of the mapped data
            # file, plus float32 copies of its weights while it runs when the graph is half precision (ONNX
            # Runtime's CPU provider casts float16 MatMul operands)
            segment = max(s.largest_layer, s.outside_layers)
            ort = segment * (ITEMSIZE[vdtype] + (4 if vdtype != "float32" else 0))
            # one layer held, plus one tensor in flight (read, then converted to the reference's dtype)
            ref = (s.outside_layers + s.largest_layer) * ITEMSIZE[vdtype] + f32_largest
            how, held = "the reference's embeddings and head plus one layer", f"one layer of the {vdtype} graph"
            if vdtype != "float32":  # the float32 reference streams beside it, one layer held too
                ref += (s.outside_layers + s.largest_layer) * 4
                how = f"the {vdtype} and float32 references' embeddings and heads plus one layer each"
        disk = graph if vdtype != dtype else 0  # the float32 twin is written too
        needs.append(Need("validate", RUNTIME_OVERHEAD + ort + ref, disk,
                          f"ONNX Runtime {ort / GiB:.1f} GiB ({held}) + {how} {ref / GiB:.1f} GiB"))
    if build:
        memory, what = build_memory(s, dtype)
        needs.append(Need("build", memory, weights, what))
    return needs


def _amount(n: float) -> str:
    """GiB down to a tenth of one, then MiB, then KiB: a tiny model's terms read as sizes, not as 0.0 GiB."""
    if n >= 0.1 * GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def build_memory(s: Sizes, dtype: str) -> tuple[int, str]:
    """(peak bytes of convert's engine build, its terms for messages); the terms are described above."""
    item = ITEMSIZE[dtype]
    layers, layer_weights, outside = s.layers * BUILD_BYTES_PER_LAYER, s.in_layers * item, s.outside_layers * item
    memory = (BUILD_FIXED_BYTES + layers + int(BUILD_BYTES_PER_LAYER_WEIGHT_BYTE * layer_weights)
              + int(BUILD_BYTES_PER_OUTSIDE_WEIGHT_BYTE * outside))
    what = (f"TensorRT-RTX builder: {_amount(BUILD_FIXED_BYTES)} fixed + {s.layers} layer{'s' if s.layers != 1 else ''} x {_amount(BUILD_BYTES_PER_LAYER)} + "
            f"{BUILD_BYTES_PER_LAYER_WEIGHT_BYTE}x the {_amount(layer_weights)} of layer weights + "
            f"{BUILD_BYTES_PER_OUTSIDE_WEIGHT_BYTE}x the {_amount(outside)} of weights outside them (embeddings, head), fitted to measured builds")
    return memory, what


# ---- what the machine has --------------------------------------------------------------------------
def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _cgroup_room() -> tuple[int, str] | None:
    """(limit minus what the cgroup holds that cannot be reclaimed, description) of the tightest memory
    cgroup this process is in (v1 or v2, walking up to the root), or None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        root = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        here = root / rel.lstrip("/")
        while True:
            limit = _read_int(here / ("memory.max" if v2 else "memory.limit_in_bytes"))
            if limit is not None and limit < 1 << 60:
                stat = _stat(here / "memory.stat")
                if v2:
                    used = stat.get("anon", _read_int(here / "memory.current") or 0)
                else:  # v1's usage counts page cache, which the kernel reclaims before it kills
                    used = stat.get("total_rss", stat.get("rss", _read_int(here / "memory.usage_in_bytes") or 0))
                room = limit - used
                if best is None or room < best[0]:
                    best = (room, f"memory cgroup {here} (limit {limit / GiB:.1f} GiB, {used / GiB:.1f} GiB in use)")
            if here == root or here.parent == here:
                break
            here = here.parent
    return best


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def memory_available() -> tuple[int, str]:
    """(bytes this process may still use, where the figure comes from)."""
    options = []
    avail = _mem_available()
    if avail is not None:
        options.append((avail, f"MemAvailable {avail / GiB:.1f} GiB"))
    room = _cgroup_room()
    if room is not None:
        options.append(room)
    if not options:
        return (1 << 62, "unknown (no /proc/meminfo)")
    return min(options)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


# ---- the check ---------------------------------------------------------------------------------------
def check(needs: list[Need], out_dir: Path, suggestions: dict[str, str], log=print) -> list[str]:
    """Compare each stage's needs with the machine. Memory: raise AdafuseError for the first stage that
    does not fit, naming `suggestions[stage]` (the option that would fit), except the build stage,
    which is returned as refused (the caller stops before it and keeps the validated ONNX). Disk: the
    stages' disk needs add up (staging holds everything until the end)."""
    mem, source = memory_available()
    free = disk_free(out_dir)
    log(f"resources: {mem / GiB:.1f} GiB of memory available ({source}), {free / GiB:.1f} GiB free disk in {out_dir}")
    refused: list[str] = []
    counted = 0
    for need in needs:
        log(f"  {need.stage:<9} needs about {need.memory / GiB:5.1f} GiB memory, {need.disk / GiB:5.1f} GiB disk "
            f"({need.what})")
        if need.memory > mem:
            text = (f"stage '{need.stage}' needs about {need.memory / GiB:.1f} GiB of memory ({need.what}), "
                    f"but {mem / GiB:.1f} GiB is available ({source})")
            if need.stage == "build":
                refused.append(text)
                continue
            hint = suggestions.get(need.stage)
            raise AdafuseError(f"{text}; {hint}" if hint else text)
        counted += need.disk
    disk = counted
    if disk > free:
        raise AdafuseError(f"{out_dir}: convert needs about {disk / GiB:.1f} GiB of free disk for its outputs and "
                           f"temporaries, found {free / GiB:.1f} GiB free")
    return refused

