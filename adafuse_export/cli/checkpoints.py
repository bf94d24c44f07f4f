"""`formats` and `inspect`: what can be read, and what a checkpoint holds (headers only)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .options import base_option, emit, format_option


@click.command(short_help="List the checkpoint formats that can be read.")
def formats():
    """List the checkpoint formats that can be read."""
    from ..converters import converters

    width = max(map(len, converters()))
    for name, conv in converters().items():
        emit(f"{name:<{width}}  {conv.description}")


@click.command(short_help="Describe a checkpoint, an ONNX export or an engine.")
@click.argument("ckpt", metavar="PATH", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def inspect(ckpt, fmt, base, as_json):
    """Describe PATH without loading its tensors. PATH is a checkpoint directory (format, model, experts, routing,
    sizes), an `export-onnx` / `convert` ONNX directory or .onnx file (flavour, dtype, graphs, inputs and
    outputs), or a `convert` .engine file (backend, profiles, routing, plugin; checked against its manifest)."""
    artefact = _artefact(ckpt)
    if artefact is not None:
        kind, info, rows = artefact
        _print(dict(info, kind=kind), rows, as_json)
        return
    from ..converters import load_checkpoint
    from ..summary import adapter_summary

    c = load_checkpoint(ckpt, fmt, base)
    m, a = c.model, c.adapter
    info = {
        "path": str(c.path), "format": c.format, "family": m.family,
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                  "num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                  "head_dim": m.head_dim, "rope": m.rope.to_json(),
                  "sliding_rope": m.sliding_rope.to_json() if m.sliding_rope else None, "tie_word_embeddings": m.tie_word_embeddings,
                  "bias_modules": list(m.bias_modules), "sliding_window": m.sliding_window},
        "adapter": adapter_summary(a),
        "read_from": [str(p) for p in c.inputs],
        **c.parameter_counts(),
        "notes": c.notes,
    }
    plain = a.routing == "none"
    rows = [
        ("checkpoint", info["path"]), ("format", c.format),
        *(("base", str(p)) for p in c.inputs[1:]),
        ("model", f"{m.family}: {m.num_layers} layers, hidden {m.hidden_size}, ffn {m.intermediate_size}, "
                  f"heads {m.num_heads}/{m.num_kv_heads} (head_dim {m.head_dim}), vocab {m.vocab_size}"),
        ("rope", m.rope.describe() + (f"; sliding layers {m.sliding_rope.describe()}" if m.sliding_rope else "")
         + (f", first {m.rotary_dim} of {m.head_dim} dims" if m.rotary_dim != m.head_dim else "")),
        ("norm / head", f"rms eps {m.rms_norm_eps:g}, tied embeddings {m.tie_word_embeddings}"),
        ("routing", a.routing + (f" ({a.router_kind})" if a.routing == "layerwise" else "")
         + (f", input {a.pregate_input}, routing table {'exact' if a.routing_table_exact else 'not exact'}" if a.routing == "pregate" else "")),
        ("experts", "none: one LoRA applied to every token (no router)" if plain else
         f"{a.num_experts} x {a.expert_kind}" + (f" per layer {list(a.num_experts_per_layer)}" if a.num_experts_per_layer else "")
         + f", top-{a.top_k}" + (", renormalised" if a.normalize_topk else "")),
        ("rank / alpha", f"r {a.r}, alpha {a.lora_alpha:g}{' (rsLoRA)' if a.use_rslora else ''}"
         + (f", rank_pattern {a.rank_pattern}" if a.rank_pattern else "") + (f", alpha_pattern {a.alpha_pattern}" if a.alpha_pattern else "")),
        ("routed modules", ", ".join(a.target_modules) or "-"),
        ("static modules", ", ".join(a.static_modules) or "-"),
        ("base size", f"{info['base_parameters']:,} parameters, {_bytes(info['base_bytes'])}"),
        ("adapters", f"{info['adapter_parameters']:,} parameters, {_bytes(info['adapter_bytes'])}"),
    ]
    for note in c.notes:
        rows.append(("note", note))
    _print(info, rows, as_json)


def _print(info: dict, rows: list[tuple[str, str]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info, indent=2))  # JSON escapes control characters itself
        return
    for k, v in rows:
        emit(f"{k:<15} {v}")


def _tensors(entries: list[dict]) -> str:
    return ", ".join(f"{t['name']} {t['dtype']}{list(t['shape'])}" for t in entries[:4]) + \
        (f", ... ({len(entries)} in all)" if len(entries) > 4 else "")


def _artefact(path: Path) -> tuple[str, dict, list[tuple[str, str]]] | None:
    """(kind, JSON, table rows) when PATH is something adafuse-export wrote other than a checkpoint, else None."""
    from ..errors import AdafuseError

    try:
        return _describe(path)
    except (KeyError, TypeError, AttributeError) as e:  # a manifest of the right format but the wrong shape
        raise AdafuseError(f"{path}: its manifest lacks or mistypes {e} (not written by this adafuse-export?)") from None


def _describe(path: Path) -> tuple[str, dict, list[tuple[str, str]]] | None:
    from ..onnx import DECODER, MANIFEST

    if path.suffix == ".engine" and not path.is_dir():
        from ..trt.manifest import manifest_path, verify_engine

        m = verify_engine(path)
        e, r = m["engine"], m["routing"]
        rows = [("engine", str(path)), ("manifest", f"{manifest_path(path)} (hashes verified)"),
                ("backend", f"{e['backend']} {e['backend_version']}, runs on {e.get('runs_on', '-')}"
                            + (f"; version-compatible: runs on TensorRT {e['backend_version']}'s lean runtime (libnvinfer_lean)"
                               if e.get("version_compatible") else "")),
                ("precision", f"{e['dtype']}, {e['flavour']} flavour, max batch {e['max_batch']}, max seq {e['max_seq']}"),
                ("kv cache", "updated in place (present bound to the past's memory)" if e.get("kv_in_place")
                 else "copied each step (two buffers)"),
                ("routing", f"{r['kind']}" + (f", {r['num_experts']} experts top-{r['top_k']}" if r["kind"] != "none" else "")),
                ("plugin", f"{m['plugin']['name']} version {m['plugin']['version']}" if m.get("plugin") else "none"),
                ("inputs", _tensors(m["tensors"]["inputs"])), ("outputs", _tensors(m["tensors"]["outputs"])),
                ("profiles", ", ".join(p["name"] for p in m["profiles"])),
                ("source", f"{m['source']['path']} ({m['source']['format']})")]
        return "engine", m, rows
    folder = path if path.is_dir() else path.parent if path.suffix == ".onnx" else None
    if folder is None or not (folder / DECODER).is_file():
        return None
    from ..inputs import read_json

    m = read_json(folder / MANIFEST) if (folder / MANIFEST).is_file() else None
    if not isinstance(m, dict) or m.get("format") != "adafuse-onnx":
        return None
    model, a, graphs = m["model"], m["adapter"], m["graphs"]
    rows = [("onnx export", str(folder)), ("precision", f"{m['dtype']}, {m['flavour']} flavour, opset {m['opset']}"),
            ("model", f"{model['family']}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
                      f"heads {model['num_heads']}/{model['num_kv_heads']}, vocab {model['vocab_size']}"),
            ("routing", a["routing"] + (f", {a['num_experts']} experts top-{a['top_k']}" if a["routing"] != "none" else ""))]
    for name, g in graphs.items():
        rows.append((f"{name} graph", f"{g['file']}: in {_tensors(g['inputs'])}; out {_tensors(g['outputs'])}"))
    rows.append(("source", f"{m['checkpoint']['path']} ({m['checkpoint']['format']})"))
    return "onnx-export", m, rows


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
