"""The native artifact: a converted model in the layouts the project's CUDA kernels take, for the C++
runtime's native backend (`adafuse-export convert --backend native CKPT OUT.native`).

OUT.native/ holds
  manifest.json        format 'adafuse-native' version 1: the kernel-library ABI it was written for, the
                       model's dims and family features, the routing contract, the layout of every layer's
                       stages, the SHA-256 of every file (checked as an engine manifest's files are)
  weights.safetensors  the backbone in the model dtype, made from the reference weights: per layer and stage (qkv, o, gate_up, down) one [out, in]
                       matrix with the stage's projections stacked along the rows in role order (q, k, v;
                       gate, up), bias likewise (zeros for a projection without one), static LoRAs merged
                       in float32 as the ONNX export merges them; norms, q/k norms, embedding, head (absent
                       when tied), and the RoPE frequency tables (float32, families/rope.py's numbers); with
                       weights 'fp8' (model.weights 'fp8_e4m3') each stage's matrix is float8 e4m3 instead with
                       its per-output-channel float32 scales '<stage>.weight_scale' [out] (quantize.py, from the
                       dtype-rounded matrix: W8A16, the kernels' ADAFUSE_WEIGHT_FP8_E4M3); everything else
                       keeps the dtype
  adapters.safetensors the experts: a stage whose routed projections share one route (a pre-gate, MixLoRA's
                       FFN router) as ONE lora_linear site (A [E, R, in] the members' A stacked along the rank
                       axis, B [E, out, R] block-diagonal with each member's scale folded in, so scale 1);
                       per-projection routers (MoLA, LoRAMoE) keep one site per projection (B scaled) and
                       its router [E, in]; routers and an in-decoder pre-gate in float32
  routes.safetensors   the pre-gate as a routing table (routes.write_routing_table, float32 whatever the
                       dtype), when the route is a function of the token id

Nothing is executed here: runtime/src/native_artifact.cpp reads and checks this, and says which family
features the native execution does not cover. Tensors are produced and written one at a time
(tensors.write_safetensors_streaming), so memory stays near the largest stage, not the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .checkpoint import Checkpoint, Site
from .errors import AdafuseError
from .families import EMBED, FINAL_NORM, LM_HEAD, STAGES
from .inputs import read_json
from .kernels.binding import ABI_VERSION
from .summary import adapter_summary
from .weights import WEIGHT_FORMATS, base_weight, read_released, rounded, torch_dtype

FORMAT = "adafuse-native"
VERSION = 1
SUFFIX = ".native"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ADAPTERS = "adapters.safetensors"
ROUTES = "routes.safetensors"
NORM_SLOTS = ("attn_in", "attn_out", "mlp_in", "mlp_out")  # families.base.LayerNorms fields
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ROUTING_FIELDS = ("router_kind", "expert_kind", "num_experts", "top_k", "normalize_topk", "pregate_input")


@dataclass(frozen=True)
class Member:
    """One projection of a stage: its rows in the stage's stacked matrix and its adapter."""
    module: str
    roles: tuple[str, ...]
    rows: tuple[int, int]
    site: Site | None  # None: no adapter; static ones are merged into the weight
    rank: int  # 0 unless routed


@dataclass(frozen=True)
class Stage:
    layer: int
    name: str  # families.STAGES key
    members: tuple[Member, ...]
    in_features: int
    out_features: int
    bias: bool
    adapter: str | None  # "grouped", "per_module" or None
    experts: int

    @property
    def prefix(self) -> str:
        return f"layers.{self.layer}.{self.name}"

    @property
    def routed(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.rank)


def adapter_layout(ckpt: Checkpoint) -> str | None:
    """How a stage's routed projections are stored: one site when they share a route, else one each."""
    a = ckpt.adapter
    if not a.target_modules:
        return None  # plain LoRA: every adapter is static, merged into the weights
    if a.routing == "layerwise" and a.expert_kind == "linear":
        return "per_module"  # each projection has its own router
    return "grouped"  # pre-gate, or MixLoRA's FFN router: one route per token for every member


def stages(ckpt: Checkpoint) -> list[Stage]:
    m, a = ckpt.model, ckpt.adapter
    sites = {(s.layer, s.module): s for s in ckpt.sites()}
    layout = adapter_layout(ckpt)
    out = []
    for layer in range(m.num_layers):
        for stage in STAGES:
            members, row = [], 0
            for p in m.arch.stage_projections(stage):
                rows = m.linear_shape(p.name)[0]
                site = sites.get((layer, p.name))
                rank = a.site_rank(site.name) if site is not None and not site.static else 0
                members.append(Member(p.name, p.roles, (row, row + rows), site, rank))
                row += rows
            routed = any(x.rank for x in members)
            out.append(Stage(layer, stage, tuple(members), m.role_shape(STAGES[stage][0])[1], row,
                             any(x.module in m.bias_modules for x in members), layout if routed else None,
                             a.experts_in_layer(layer) if routed else 0))
    return out


Entry = tuple[str, str, tuple[int, ...], Callable[[], Any]]  # name, safetensors dtype, shape, producer


class _Tensors:
    """The artifact's tensors as (name, dtype, shape, producer): shapes known up front, bytes made on demand."""

    def __init__(self, ckpt: Checkpoint, dtype: str, weights: str = "dtype"):
        self.ckpt, self.dtype, self.td = ckpt, SAFETENSORS_DTYPES[dtype], torch_dtype(dtype)
        self.fp8 = weights == "fp8"

    def base(self, name: str, src_name: str, shape: tuple[int, ...]) -> Entry:
        return name, self.dtype, shape, lambda: base_weight(self.ckpt, src_name, self.td)

    def router(self, name: str, src_name: str, shape: tuple[int, ...]) -> Entry:
        """Routers run in float32 on dtype-rounded weights, as in the reference."""
        return name, "F32", shape, lambda: rounded(self.ckpt.adapters, src_name, self.td)

    def site_A(self, site: Site):
        return read_released(self.ckpt.adapters, f"{site.name}.lora_A").to(self.td)

    def scaled_B(self, site: Site):
        """The dtype-rounded B times the site's scale in float32, rounded again."""
        B = read_released(self.ckpt.adapters, f"{site.name}.lora_B").to(self.td)
        return (B.float() * self.ckpt.adapter.site_scale(site.name)).to(self.td)

    def stage_weight(self, st: Stage):
        import torch

        m = self.ckpt.model
        parts = [base_weight(self.ckpt, f"{m.arch.weight_prefix(st.layer, x.module)}.weight", self.td,
                             x.site if x.site is not None and x.site.static else None) for x in st.members]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def stage_fp8(self, st: Stage, part: int):
        """The stage's matrix quantized (quantize.py): part 0 the e4m3 matrix, 1 its scales."""
        from .quantize import quantize_fp8_per_channel

        return quantize_fp8_per_channel(self.stage_weight(st), f"{st.prefix}.weight")[part]

    def stage_bias(self, st: Stage):
        import torch

        m = self.ckpt.model
        parts = [base_weight(self.ckpt, f"{m.arch.weight_prefix(st.layer, x.module)}.bias", self.td)
                 if x.module in m.bias_modules else torch.zeros(x.rows[1] - x.rows[0], dtype=self.td)
                 for x in st.members]
        return torch.cat(parts)

    def grouped_A(self, st: Stage):
        import torch

        return torch.cat([read_released(self.ckpt.adapters, f"{x.site.name}.lora_A").to(self.td)
                          for x in st.routed if x.site is not None], dim=1)

    def grouped_B(self, st: Stage):
        """Block-diagonal: member j's rows read only member j's rank columns (one LoRA shrink serves the stage)."""
        import torch

        B = torch.zeros(st.experts, st.out_features, sum(x.rank for x in st.routed), dtype=self.td)
        col = 0
        for x in st.routed:
            assert x.site is not None
            B[:, x.rows[0]:x.rows[1], col:col + x.rank] = self.scaled_B(x.site)
            col += x.rank
        return B

    def backbone(self) -> list[Entry]:
        m = self.ckpt.model
        h, arch = m.hidden_size, m.arch
        out = [self.base("embed_tokens", EMBED, (m.vocab_size, h)), self.base("final_norm", FINAL_NORM, (h,))]
        if not m.tie_word_embeddings:
            out.append(self.base("lm_head", LM_HEAD, (m.vocab_size, h)))
        for name, rope in rope_tables(self.ckpt).items():
            out.append((name, "F32", tuple(rope.shape), partial(_same, rope)))
        by_layer: dict[int, list[Stage]] = {}
        for st in stages(self.ckpt):
            by_layer.setdefault(st.layer, []).append(st)
        for layer in range(m.num_layers):
            for slot in NORM_SLOTS:
                norm = getattr(arch.norms, slot)
                if norm is not None:
                    out.append(self.base(f"layers.{layer}.{slot}_norm", arch.norm_weight(layer, norm), (h,)))
            if arch.qk_norm:
                for role in ("q", "k"):
                    out.append(self.base(f"layers.{layer}.{role}_norm", arch.qk_norm_weight(layer, role), (m.head_dim,)))
            for st in by_layer[layer]:
                if self.fp8:
                    out.append((f"{st.prefix}.weight", "F8_E4M3", (st.out_features, st.in_features),
                                partial(self.stage_fp8, st, 0)))
                    out.append((f"{st.prefix}.weight_scale", "F32", (st.out_features,), partial(self.stage_fp8, st, 1)))
                else:
                    out.append((f"{st.prefix}.weight", self.dtype, (st.out_features, st.in_features),
                                partial(self.stage_weight, st)))
                if st.bias:
                    out.append((f"{st.prefix}.bias", self.dtype, (st.out_features,), partial(self.stage_bias, st)))
        return out

    def adapters(self) -> list[Entry]:
        a, m = self.ckpt.adapter, self.ckpt.model
        out: list[Entry] = []
        if a.routing == "pregate" and not a.routing_table_exact:  # the pre-gate runs inside the decoder
            out.append(self.router("pregate.weight", "pregate.weight", (a.num_experts, m.hidden_size)))
            if "pregate.bias" in self.ckpt.adapters:
                out.append(self.router("pregate.bias", "pregate.bias", (a.num_experts,)))
        if a.routing == "layerwise" and a.expert_kind == "ffn":
            for layer in range(m.num_layers):
                out.append(self.router(f"layers.{layer}.mlp.router", f"layers.{layer}.mlp.router.weight",
                                       (a.experts_in_layer(layer), m.hidden_size)))
        for st in stages(self.ckpt):
            if st.adapter == "grouped":
                rank = sum(x.rank for x in st.routed)
                out.append((f"{st.prefix}.lora_A", self.dtype, (st.experts, rank, st.in_features),
                            partial(self.grouped_A, st)))
                out.append((f"{st.prefix}.lora_B", self.dtype, (st.experts, st.out_features, rank),
                            partial(self.grouped_B, st)))
            elif st.adapter == "per_module":
                for x in st.routed:
                    assert x.site is not None
                    site, rows = x.site, x.rows[1] - x.rows[0]
                    name = f"layers.{st.layer}.{x.module}"
                    out.append((f"{name}.lora_A", self.dtype, (st.experts, x.rank, st.in_features),
                                partial(self.site_A, site)))
                    out.append((f"{name}.lora_B", self.dtype, (st.experts, rows, x.rank),
                                partial(self.scaled_B, site)))
                    out.append(self.router(f"{name}.router", f"{site.name}.router.weight", (st.experts, st.in_features)))
        return out


def _same(t):
    return t


def rope_tables(ckpt: Checkpoint) -> dict[str, Any]:
    """name -> float32 frequencies: each RoPE's inv_freq (and LongRoPE's long set), as families/rope.py computes
    them for every backend; 'rope.sliding.*' for the sliding layers' RoPE when it differs (Gemma 3)."""
    m = ckpt.model
    out = {}
    for which, rope in (("full", m.rope), ("sliding", m.sliding_rope)):
        if rope is None:
            continue
        out[f"rope.{which}.inv_freq"] = rope.inv_freq()
        if rope.switch_at is not None:
            out[f"rope.{which}.long_inv_freq"] = rope.long_inv_freq()
    return out


def _rope_json(rope) -> dict | None:
    return None if rope is None else rope.to_json()


def manifest(ckpt: Checkpoint, dtype: str, files: dict[str, str], max_batch: int, max_seq: int,
             weights: str = "dtype") -> dict:
    """The manifest (format FORMAT / VERSION); `files`: name -> SHA-256 of every file beside it."""
    m, a = ckpt.model, ckpt.adapter
    summary = adapter_summary(a)
    arch = m.arch
    by_layer: dict[int, list[Stage]] = {}
    for st in stages(ckpt):
        by_layer.setdefault(st.layer, []).append(st)

    def stage_json(st: Stage) -> dict:
        adapter = None
        if st.adapter is not None:
            adapter = {"layout": st.adapter, "experts": st.experts}
            if st.adapter == "grouped":
                adapter["rank"] = sum(x.rank for x in st.routed)
        return {"stage": st.name, "bias": st.bias, "adapter": adapter,
                "modules": [{"name": x.module, "roles": list(x.roles), "rank": x.rank,
                             "static_merged": x.site is not None and x.site.static} for x in st.members]}

    return {
        "format": FORMAT, "version": VERSION, "adafuse_export_version": __version__,
        "kernels": {"abi_version": ABI_VERSION},
        "model": {"family": m.family, "dtype": dtype, "weights": WEIGHT_FORMATS[weights],
                  "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
                  "intermediate_size": m.intermediate_size, "num_layers": m.num_layers, "num_heads": m.num_heads,
                  "num_kv_heads": m.num_kv_heads, "head_dim": m.head_dim,
                  "max_position_embeddings": m.max_position_embeddings, "tie_word_embeddings": m.tie_word_embeddings},
        "features": {"norm": arch.norm, "norm_eps": m.rms_norm_eps,
                     "norms": {slot: getattr(arch.norms, slot) is not None for slot in NORM_SLOTS},
                     "qk_norm": arch.qk_norm, "activation": m.hidden_act, "attn_softcap": m.attn_softcap,
                     "final_softcap": m.final_softcap, "embed_scale": m.embed_scale, "query_scale": m.query_scale,
                     "rotary_dim": m.rotary_dim, "rope": _rope_json(m.rope), "sliding_rope": _rope_json(m.sliding_rope),
                     "sliding_window": m.sliding_window, "sliding_layers": list(m.sliding_layers)},
        "routing": {"kind": a.routing, **{k: summary[k] for k in ROUTING_FIELDS},
                    "routes_file": ROUTES if a.routing_table_exact else None,
                    "static_modules_merged": list(a.static_modules)},
        "layers": [{"stages": [stage_json(st) for st in by_layer[layer]]} for layer in range(m.num_layers)],
        "runtime": {"max_batch": max_batch, "max_seq": max_seq},
        "files": files,
        "source": {"path": str(ckpt.path), "format": ckpt.format, "index_sha256": ckpt.index_sha256()},
    }


def write_artifact(ckpt: Checkpoint, out: Path, dtype: str, max_batch: int, max_seq: int,
                   log: Callable[[str], object] | None = None, weights: str = "dtype") -> dict:
    """Write the artifact's files into the (empty, staged) directory `out`; returns the manifest.
    One tensor at a time: memory is the largest stage's tensors, not the model's."""
    from .outputs import MARKER_KEY
    from .progress import Progress
    from .routes import write_routing_table
    from .tensors import DTYPE_SIZES, write_safetensors_streaming
    from .trt.manifest import sha256_file, write_manifest

    if dtype not in SAFETENSORS_DTYPES:
        raise AdafuseError(f"--dtype '{dtype}' is unknown (expected one of {', '.join(SAFETENSORS_DTYPES)})")
    ckpt.require_exportable()
    check_kernel_limits(ckpt)
    check_weight_format(ckpt, dtype, weights)
    tensors = _Tensors(ckpt, dtype, weights)
    meta = {MARKER_KEY: "native", "checkpoint_index_sha256": ckpt.index_sha256(), "dtype": dtype}
    groups = [(WEIGHTS, tensors.backbone()), (ADAPTERS, tensors.adapters())]
    total = sum(math.prod(shape) * DTYPE_SIZES[code] for _, entries in groups for _, code, shape, _ in entries)
    meter = Progress("writing the tensors", sum(len(e) for _, e in groups), total) if log else None

    def counted(entry: Entry) -> Entry:
        name, code, shape, produce = entry

        def run():
            t = produce()
            if meter is not None:
                meter.update(t.numel() * t.element_size())
            return t
        return name, code, shape, run

    for file, entries in groups:
        if entries:
            write_safetensors_streaming(out / file, [counted(e) for e in entries], meta)
    if meter is not None:
        meter.done()
    if ckpt.adapter.routing_table_exact:
        write_routing_table(ckpt, out / ROUTES, "float32")
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    result = manifest(ckpt, dtype, files, max_batch, max_seq, weights)
    write_manifest(result, out / MANIFEST)
    return result


def check_weight_dtype(dtype: str, weights: str) -> None:
    """--weights and --dtype together (no checkpoint needed): FP8 weights run with 16-bit activations."""
    if weights not in WEIGHT_FORMATS:
        raise AdafuseError(f"--weights '{weights}' is unknown (expected one of {', '.join(WEIGHT_FORMATS)})")
    if weights == "fp8" and dtype not in ("float16", "bfloat16"):
        raise AdafuseError(f"--weights fp8 keeps the activations in --dtype, which must then be float16 or bfloat16 "
                           f"(the kernels run FP8 weights with 16-bit activations), got --dtype {dtype}")


def check_weight_format(ckpt: Checkpoint, dtype: str, weights: str) -> None:
    """--weights fp8 needs what the kernels' FP8 path needs (adafuse_kernels.h ADAFUSE_WEIGHT_FP8_E4M3): 16-bit
    activations and every stage's in_features % 16 == 0; refused before anything is written."""
    check_weight_dtype(dtype, weights)
    if weights != "fp8":
        return
    for st in stages(ckpt):
        if st.in_features % 16:
            raise AdafuseError(f"{ckpt.path}: --weights fp8 needs every projection's input size to be a multiple of 16 "
                               f"(16 FP8 weights per 16-byte load), stage {st.prefix} has {st.in_features}")


def check_kernel_limits(ckpt: Checkpoint) -> None:
    """Experts and ranks the lora_linear kernel cannot take are refused before anything is written (the
    plugin flavour's limits, plugin_ops.check_limits); top-k beyond the kernel's is named at open instead."""
    from .onnx import plugin_ops

    remedy = "the native backend runs every adapter with those kernels; convert with --backend tensorrt-rtx instead"
    for st in stages(ckpt):
        if st.adapter == "grouped":
            plugin_ops.check_limits(f"{ckpt.path}: adapter stage {st.prefix} (its projections' ranks stacked)",
                                    num_experts=st.experts, rank=sum(x.rank for x in st.routed), remedy=remedy)
        elif st.adapter == "per_module":
            for x in st.routed:
                plugin_ops.check_limits(f"{ckpt.path}: adapter site layers.{st.layer}.{x.module}",
                                        num_experts=st.experts, rank=x.rank, remedy=remedy)


def artifact_files(path: Path) -> frozenset[str] | None:
    """The files a native artifact's manifest records (and itself), or None when `path` holds none (outputs.claim)."""
    try:
        data = read_json(Path(path) / MANIFEST)
    except AdafuseError:
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(files, dict):
        return None
    return frozenset({MANIFEST, *(name for name in files if isinstance(name, str))})


def stores_fp8(manifest: object) -> bool:
    """The artifact's stage weights are FP8 e4m3 (`convert --weights fp8`)."""
    model = manifest.get("model") if isinstance(manifest, dict) else None
    return isinstance(model, dict) and model.get("weights") == WEIGHT_FORMATS["fp8"]


def load_fp8_twin(model, artifact: Path) -> bool:
    """fp8_twin.load_fp8_twin of a native artifact: `model` becomes its FP8 twin (False: its weights are not FP8)."""
    from .fp8_twin import load_fp8_twin as load

    return load(model, Path(artifact))


def fp8_rows(ckpt: Checkpoint, artifact: Path):
    """The FP8 twin's weights of a native artifact (fp8_twin.Rows), or None when its weights are not FP8: every
    projection's rows of the stored e4m3 stage matrix and its scales, dequantized in float64 (quantize.dequantize_fp8),
    read from the file when called."""
    from safetensors import safe_open

    artifact = Path(artifact)
    if not stores_fp8(read_json(artifact / MANIFEST)):
        return None
    path = str(artifact / WEIGHTS)
    read, static = {}, set()
    with safe_open(path, framework="pt") as f:
        for st in stages(ckpt):
            shape = tuple(f.get_slice(f"{st.prefix}.weight").get_shape())
            if shape != (st.out_features, st.in_features):
                raise AdafuseError(f"{path}: '{st.prefix}.weight' is {list(shape)}, the checkpoint {ckpt.path} makes it "
                                   f"[{st.out_features}, {st.in_features}]")
            for x in st.members:
                read[f"{ckpt.model.arch.weight_prefix(st.layer, x.module)}.weight"] = partial(_stage_rows, path, st, x)
                if x.site is not None and x.site.static:
                    static.add((st.layer, x.module))
    return read, static


def _stage_rows(path: str, st: Stage, x: Member):
    from safetensors import safe_open

    from .quantize import dequantize_fp8

    lo, hi = x.rows
    with safe_open(path, framework="pt") as f:
        return dequantize_fp8(f.get_slice(f"{st.prefix}.weight")[lo:hi], f.get_slice(f"{st.prefix}.weight_scale")[lo:hi])
