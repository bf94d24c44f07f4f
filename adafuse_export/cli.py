"""The `adafuse-export` command line.

Heavy packages (torch, onnx, tensorrt) are imported inside the commands that need
them, so `--help` works everywhere. A user mistake raises AdafuseError: we print its
one line and exit 2; bugs keep their traceback.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from . import __version__
from .errors import AdafuseError, missing_dependency
from .outputs import claim, is_marked_safetensors

EXIT_USAGE = 2


def _import_torch():
    try:
        import torch
    except ImportError:
        raise missing_dependency("torch") from None
    return torch


def parse_ids(text: str, option: str = "--prompt-ids") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise AdafuseError(f"{option}: expected comma-separated integers like 1,2,3, found '{text}'") from None
    if not ids:
        raise AdafuseError(f"{option}: expected at least one token id, found '{text}'")
    return ids


ckpt_argument = click.argument("ckpt", type=click.Path(path_type=Path))
format_option = click.option("--format", "fmt", metavar="NAME", default=None,
                             help="Source format (see `adafuse-export formats`); detected when omitted.")
base_option = click.option("--base", type=click.Path(path_type=Path), default=None,
                           help="Base model directory for PEFT-style adapters (default: base_model_name_or_path).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adafuse-export")
def cli():
    """Export mixture-of-LoRA-experts LLMs (AdaFuse pre-gating + fused adapter kernels).

    \b
    Typical session:
      adafuse-export make-example ex/            # a tiny pre-gated checkpoint
      adafuse-export inspect ex/                 # what is in it
      adafuse-export run ex/ --prompt-ids 1,2,3  # PyTorch reference, greedy decode
    """


@cli.command()
def formats():
    """List the checkpoint formats that can be read."""
    from .converters import converters

    for name, conv in converters().items():
        click.echo(f"{name:<12} {conv.description}")


@cli.command()
@ckpt_argument
@format_option
@base_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def inspect(ckpt, fmt, base, as_json):
    """Describe CKPT without loading its tensors: format, model, experts, routing, sizes."""
    from .converters import load_checkpoint

    c = load_checkpoint(ckpt, fmt, base)
    m, a = c.model, c.adapter
    info = {
        "path": str(c.path), "format": c.format, "family": m.family,
        "model": {"vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
                  "num_layers": m.num_layers, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
                  "head_dim": m.head_dim, "rope_theta": m.rope_theta, "tie_word_embeddings": m.tie_word_embeddings,
                  "bias_modules": list(m.bias_modules), "sliding_window": m.sliding_window},
        "adapter": {"routing": a.routing, "router_kind": a.router_kind if a.routing == "layerwise" else None,
                    "expert_kind": a.expert_kind, "num_experts": a.num_experts,
                    "num_experts_per_layer": list(a.num_experts_per_layer) if a.num_experts_per_layer else None,
                    "top_k": a.top_k, "normalize_topk": a.normalize_topk, "r": a.r, "lora_alpha": a.lora_alpha,
                    "use_rslora": a.use_rslora, "target_modules": list(a.target_modules),
                    "static_modules": list(a.static_modules), "pregate_input": a.pregate_input if a.routing == "pregate" else None,
                    "routing_table": a.routing_table_exact, "rank_pattern": a.rank_pattern, "alpha_pattern": a.alpha_pattern},
        **c.parameter_counts(),
        "notes": c.notes,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
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
        click.echo(f"{k:<15} {v}")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@cli.command()
@ckpt_argument
@format_option
@base_option
@click.option("--prompt-ids", required=True, help="Prompt token ids, comma-separated (e.g. 1,2,3).")
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(0, 100000),
              help="Greedy tokens to generate; prompt + generated must fit max_position_embeddings.")
@click.option("--save-logits", type=click.Path(path_type=Path), default=None,
              help="Write the prompt's logits [1, S, vocab] (float32) to this .safetensors file.")
@click.option("--force", is_flag=True, help="Replace an existing --save-logits file (one that adafuse-export wrote).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--no-adapters", is_flag=True, help="Run the base model alone.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the GPU decoder (fused kernels, CUDA graphs; pre-gated checkpoints with a routing table).")
@click.option("--strategy", type=click.Choice(["auto", "fused", "switch", "unmerged"]), default="auto", show_default=True,
              help="GPU adapter strategy; auto times fused and switch at load and keeps the faster.")
def run(ckpt, fmt, base, prompt_ids, max_new_tokens, save_logits, force, dtype, no_adapters, device, strategy):
    """Greedy-decode with the PyTorch reference model (or the GPU decoder); print the generated ids."""
    torch = _import_torch()
    from .converters import load_checkpoint
    from .reference import ReferenceModel
    from .tensors import save_safetensors

    ids = parse_ids(prompt_ids)
    c = load_checkpoint(ckpt, fmt, base)
    if save_logits is not None:
        claim(save_logits, option="--save-logits", inputs=c.inputs, force=force, ours=is_marked_safetensors)
    bad = [i for i in ids if not 0 <= i < c.model.vocab_size]
    if bad:
        raise AdafuseError(f"--prompt-ids: token id {bad[0]} is out of the vocabulary [0, {c.model.vocab_size})")
    limit = c.model.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise AdafuseError(f"--prompt-ids ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceed the model's "
                           f"context of {limit} positions (max_position_embeddings in {c.path})")
    prompt = torch.tensor([ids])
    if device == "cuda":
        generated, prompt_logits = _run_cuda(c, prompt, max_new_tokens, getattr(torch, dtype), strategy, no_adapters,
                                             want_logits=save_logits is not None)
    else:
        model = ReferenceModel(c, dtype=getattr(torch, dtype), adapters=not no_adapters)
        generated, steps = model.generate(prompt, max_new_tokens)
        prompt_logits = steps[0].logits
        if steps[0].expert_ids is not None:
            click.echo(f"# prompt routes (expert ids per token): {steps[0].expert_ids[0].tolist()}", err=True)
    if save_logits is not None:
        save_safetensors({"logits": prompt_logits.contiguous()}, save_logits, {"prompt_ids": ",".join(map(str, ids))},
                         output="logits")
    click.echo(" ".join(map(str, generated[0].tolist())))


def _run_cuda(c, prompt, max_new_tokens, dtype, strategy, no_adapters, want_logits):
    import torch

    from .kernels.binding import load_kernels
    from .runners.torch_cuda import GpuDecoder, KernelOps, choose_strategy

    if not torch.cuda.is_available():
        raise AdafuseError("--device cuda: no CUDA GPU is visible to PyTorch")
    ops = KernelOps(load_kernels())
    max_seq = prompt.shape[1] + max_new_tokens + 1

    def make(s):
        return GpuDecoder.from_checkpoint(c, device="cuda", dtype=dtype, strategy=s, max_seq=max(max_seq, 16), ops=ops)
    if no_adapters:
        strategy = "dense"
    elif strategy == "auto":
        strategy, timings = choose_strategy(make)
        click.echo("# auto strategy: " + ", ".join(f"{k} {v:.3f} ms/step" for k, v in timings.items())
                   + f" -> {strategy}", err=True)
    dec = make(strategy)
    logits = dec.prefill(prompt.cuda()).cpu() if want_logits else None  # generate() runs its own prefill
    return dec.generate(prompt.cuda(), max_new_tokens).cpu(), logits


@cli.command("export-routes")
@ckpt_argument
@click.argument("out", type=click.Path(path_type=Path))
@format_option
@base_option
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def export_routes(ckpt, out, fmt, base, force):
    """Write the pre-gate's exact routing table to OUT (.safetensors): expert_ids [vocab, k] int32, gates [vocab, k] float32.

    Only for pre-gated checkpoints whose pre-gate reads RMSNorm_0(embed(token)): there the
    route depends on the token id alone, and a table lookup replaces the pre-gate network.
    """
    _import_torch()
    from .converters import load_checkpoint
    from .onnx.export import _write_routes

    c = load_checkpoint(ckpt, fmt, base)
    c.require_routing_table()
    claim(out, option="OUT", inputs=c.inputs, force=force, ours=is_marked_safetensors)
    _write_routes(c, out, "float32")
    click.echo(f"wrote routing table [{c.model.vocab_size}, {c.adapter.top_k}] to {out}")


@cli.command("make-example")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--kind", type=click.Choice(["pregate", "pregate-ffn", "mola", "loramoe", "mixlora", "lora"]),
              default="pregate", show_default=True, help="Adapter kind of the example.")
@click.option("--family", type=click.Choice(["llama", "mistral", "qwen2"]), default="llama", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite a non-empty OUT_DIR.")
def make_example_cmd(out_dir, kind, family, force):
    """Write a tiny random canonical checkpoint (the built-in example) to OUT_DIR."""
    _import_torch()
    from .examples import make_example
    from .outputs import EXAMPLE_MARKER, atomic_directory, is_example

    claim(out_dir, option="OUT_DIR", inputs=(), force=force, ours=is_example, directory=True)
    with atomic_directory(out_dir, force) as tmp:
        make_example(tmp, kind, family)
        (tmp / EXAMPLE_MARKER).write_text(f"written by adafuse-export make-example --kind {kind} --family {family}\n")
    click.echo(f"wrote {kind} example ({family}) to {out_dir}")


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="adafuse-export", standalone_mode=False)
    except AdafuseError as e:
        click.echo(f"error: {e}", err=True)
        return EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    return 0


class Terminated(BaseException):
    """SIGTERM raised where the process is, so that atomic writes remove their temporaries
    (Python's default action for SIGTERM ends the process with no cleanup at all)."""


def _terminate(signum, frame):
    raise Terminated


def entry_point() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main()
    except Terminated:
        click.echo("error: terminated", err=True)
        code = 128 + signal.SIGTERM
    sys.exit(code)


# Commands defined in their own modules register themselves on `cli`.
from . import cli_convert, cli_export  # noqa: E402,F401
