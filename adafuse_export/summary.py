"""One description of an adapter, which every output formats: `inspect`, the ONNX export manifest,
the graphs' "adafuse.*" metadata, the engine manifest's routing section and validate's check.

Fields that do not apply to the adapter's routing are None (router_kind without layerwise routing,
pregate_input without a pre-gate). ROUTING_KEYS are the routing contract a graph or engine records
and validate compares with a checkpoint.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .spec import AdapterSpec

ROUTING_KEYS = ("routing", "router_kind", "expert_kind", "num_experts", "top_k", "pregate_input")


def adapter_summary(a: AdapterSpec) -> dict[str, Any]:
    summary = {
        "routing": a.routing, "router_kind": a.router_kind if a.routing == "layerwise" else None,
        "expert_kind": a.expert_kind, "num_experts": a.num_experts,
        "num_experts_per_layer": list(a.num_experts_per_layer) if a.num_experts_per_layer else None,
        "top_k": a.top_k, "normalize_topk": a.normalize_topk, "r": a.r, "lora_alpha": a.lora_alpha,
        "use_rslora": a.use_rslora, "target_modules": list(a.target_modules), "static_modules": list(a.static_modules),
        "pregate_input": a.pregate_input if a.routing == "pregate" else None,
        "routing_table": a.routing_table_exact, "rank_pattern": a.rank_pattern, "alpha_pattern": a.alpha_pattern,
    }
    if a.xlora is not None:  # only X-LoRA checkpoints carry the key (nothing exports them: no manifest has it)
        summary["xlora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(a.xlora).items()}
    return summary


def routing_contract(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's ROUTING_KEYS, in that order."""
    return {k: summary[k] for k in ROUTING_KEYS}


def routing_metadata(summary: dict[str, Any]) -> dict[str, str]:
    """The routing contract as ONNX metadata strings ("adafuse.<key>"; "-" for a field that does not apply)."""
    return {f"adafuse.{k}": "-" if v is None else str(v) for k, v in routing_contract(summary).items()}
