"""`formats` and `inspect`: what can be read, and what a checkpoint holds (headers only)."""
from __future__ import annotations

import json

import click

from .options import base_option, ckpt_argument, format_option, emit


@click.command()
def formats():
    """List the checkpoint formats that can be read."""
    from ..converters import converters

    width = max(map(len, converters()))
    for name, conv in converters().items():
        emit(f"{name:<{width}}  {conv.description}")


@click.command()
@ckpt_argument
@format_option
@base_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def inspect(ckpt, fmt, base, as_json):
    """Describe CKPT without loading its tensors: format, model, experts, routing, sizes."""
    from ..converters import load_checkpoint
    from ..summary import adapter_summary

    c = load_checkpoint(ckpt, fmt, base)
    m, a = c.model, c.adapter
    info = {
        "path": str(c.path), "format": c.format, "family": m.family,
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                  "num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                  "head_dim": m.head_dim, "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_word_embeddings,
                  "bias_modules": list(m.bias_modules), "sliding_window": m.sliding_window},
        "adapter": adapter_summary(a),
        **c.parameter_counts(),
        "notes": c.notes,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))  # JSON escapes control characters itself
        return
    rows = [
        ("checkpoint", info["path"]), ("format", c.format),
        ("model", f"{m.family}: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.intermediate_size}, "
                  f"heads {m.num_heads}/{m.num_kv_heads} (head_dim {m.head_dim}), vocab {m.vocab_size}"),
        ("rope / norm", f"theta {m.rope_theta:g}, rms eps {m.rms_norm_eps:g}, tied embeddings {m.tie_word_embeddings}"),
        ("routing", a.routing + (f" ({a.router_kind})" if a.routing == "layerwise" else "")
         + (f", input {a.pregate_input}, routing table {'exact' if a.routing_table_exact else 'not exact'}" if a.routing == "pregate" else "")),
        ("experts", f"{a.num_experts} x {a.expert_kind}" + (f" per layer {list(a.num_experts_per_layer)}" if a.num_experts_per_layer else "")
         + f", top-{a.top_k}" + (", renormalised" if a.normalize_topk else "")),
        ("rank / alpha", f"r {a.r}, alpha {a.lora_alpha:g}{' (rsLoRA)' if a.use_rslora else ''}"
         + (f", rank_pattern {a.rank_pattern}" if a.rank_pattern else "") + (f", alpha_pattern {a.alpha_pattern}" if a.alpha_pattern else "")),
        ("routed modules", ", ".join(a.target_modules) or "-"),
        ("static modules", ", ".join(a.static_modules) or "-"),
        ("base", f"{info['base_parameters']:,} parameters, {_bytes(info['base_bytes'])}"),
        ("adapters", f"{info['adapter_parameters']:,} parameters, {_bytes(info['adapter_bytes'])}"),
    ]
    for note in c.notes:
        rows.append(("note", note))
    for k, v in rows:
        emit(f"{k:<15} {v}")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
