"""`run`: greedy decoding with the PyTorch reference, or the GPU decoder."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdafuseError
from ..outputs import claim, is_marked_safetensors
from .options import base_option, ckpt_argument, device_option, dtype_option, force_option, format_option, import_torch, parse_ids, emit


@click.command(short_help="Greedy-decode a prompt (PyTorch reference, or the GPU decoder).")
@ckpt_argument
@format_option
@base_option
@click.option("--prompt-ids", required=True, help="Prompt token ids, comma-separated (e.g. 1,2,3).")
@click.option("--max-new-tokens", default=8, show_default=True, type=click.IntRange(0, 100000),
              help="Greedy tokens to generate; prompt + generated must fit max_position_embeddings.")
@click.option("--save-logits", type=click.Path(path_type=Path), default=None,
              help="Write the prompt's logits [1, S, vocab] (float32) to this .safetensors file.")
@force_option("Replace an existing --save-logits file (one that adafuse-export wrote).")
@dtype_option("float32")
@click.option("--no-adapters", is_flag=True, help="Run the base model alone.")
@device_option(("cpu", "cuda"), "cpu",
               "cuda: the GPU decoder (fused kernels, CUDA graphs; pre-gated checkpoints with a routing table).")
@click.option("--strategy", type=click.Choice(["auto", "fused", "switch", "unmerged"]), default="auto", show_default=True,
              help="GPU adapter strategy; auto times fused and switch at load and keeps the faster.")
def run(ckpt, fmt, base, prompt_ids, max_new_tokens, save_logits, force, dtype, no_adapters, device, strategy):
    """Greedy-decode with the PyTorch reference model (or the GPU decoder); print the generated ids."""
    torch = import_torch()
    from ..converters import load_checkpoint
    from ..reference import ReferenceModel
    from ..tensors import save_safetensors

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
            emit(f"# prompt routes (expert ids per token): {steps[0].expert_ids[0].tolist()}", err=True)
    if save_logits is not None:
        save_safetensors({"logits": prompt_logits.contiguous()}, save_logits, {"prompt_ids": ",".join(map(str, ids))},
                         output="logits")
    emit(" ".join(map(str, generated[0].tolist())))


def _run_cuda(c, prompt, max_new_tokens, dtype, strategy, no_adapters, want_logits):
    import torch

    from ..kernels.binding import load_kernels
    from ..runners.torch_cuda import GpuDecoder, KernelOps, choose_strategy

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
        emit("# auto strategy: " + ", ".join(f"{k} {v:.3f} ms/step" for k, v in timings.items())
                   + f" -> {strategy}", err=True)
    dec = make(strategy)
    logits = dec.prefill(prompt.cuda()).cpu() if want_logits else None  # generate() runs its own prefill
    return dec.generate(prompt.cuda(), max_new_tokens).cpu(), logits
