"""`run`: greedy decoding with the PyTorch reference, or on the GPU with the C++ runtime's native backend."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdafuseError
from ..outputs import claim, is_marked_safetensors
from .options import base_option, ckpt_argument, device_option, dtype_option, force_option, format_option, import_torch, parse_ids, emit


@click.command(short_help="Greedy-decode a prompt (PyTorch reference, or the native backend on a GPU).")
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
               "cuda: the C++ runtime's native backend through its C API (the checkpoint written as a native artifact "
               "in a temporary directory, run with the project's CUDA kernels and CUDA graphs; the runtime library from "
               "$ADAFUSE_RUNTIME_LIB or this installation).")
@click.option("--strategy", type=click.Choice(["auto", "fused", "switch", "unmerged"]), default="auto", show_default=True,
              help="--device cuda: how the adapters run: fused (the routed fused linear kernel), switch (the token's "
                   "experts merged into the weights; pre-gated checkpoints), auto (pre-gated: times both at load and "
                   "keeps the faster; else fused); unmerged is the PyTorch path's and is refused.")
@click.option("--weights", type=click.Choice(["dtype", "fp8"]), default="dtype", show_default=True,
              help="--device cuda: the native artifact's projection weights in --dtype, or fp8 (float8 e4m3 with "
                   "per-output-channel scales, W8A16; --dtype float16 or bfloat16), run by either strategy (switch "
                   "merges the experts into 16-bit copies of them).")
def run(ckpt, fmt, base, prompt_ids, max_new_tokens, save_logits, force, dtype, no_adapters, device, strategy, weights):
    """Greedy-decode with the PyTorch reference model (or, --device cuda, the native backend); print the generated ids."""
    torch = import_torch()
    from ..converters import load_checkpoint
    from ..reference import ReferenceModel
    from ..tensors import save_safetensors

    ids = parse_ids(prompt_ids)
    if weights != "dtype" and device != "cuda":
        raise AdafuseError(f"--weights {weights}: applies to --device cuda (the native artifact it writes); the CPU "
                           "reference runs the checkpoint's weights")
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
    if device == "cuda":
        tokens, logits, experts = _run_cuda(c, ids, max_new_tokens, dtype, strategy, no_adapters, weights)
        prompt_logits, routes = torch.from_numpy(logits), None if experts is None else experts[0].tolist()
    else:
        model = ReferenceModel(c, dtype=getattr(torch, dtype), adapters=not no_adapters)
        generated, steps = model.generate(torch.tensor([ids]), max_new_tokens)
        tokens, prompt_logits = generated[0].tolist(), steps[0].logits
        routes = None if steps[0].expert_ids is None else steps[0].expert_ids[0].tolist()
    if routes is not None:
        emit(f"# prompt routes (expert ids per token): {routes}", err=True)
    if save_logits is not None:
        save_safetensors({"logits": prompt_logits.contiguous()}, save_logits, {"prompt_ids": ",".join(map(str, ids))},
                         output="logits")
    emit(" ".join(map(str, tokens)))


def _run_cuda(c, ids: list[int], max_new_tokens: int, dtype: str, strategy: str, no_adapters: bool,
              weights: str = "dtype"):
    """The native backend through the C API: the checkpoint written as a native artifact (batch 1, the run's context)
    into a temporary directory that is removed afterwards, failure or not; opened with the strategy, greedy-decoded.
    Returns (tokens, the prompt's logits [1, S, vocab], its expert ids [1, S, k] or None)."""
    import tempfile

    from .. import native_artifact
    from ..runners.cpp_runtime import load_library, open_native

    torch = import_torch()
    if strategy == "unmerged":
        raise AdafuseError("--strategy unmerged: --device cuda runs the native backend, which applies the adapters fused "
                           "(fused) or merged into the weights (switch); use fused, switch or auto")
    switchable = not no_adapters and c.adapter.routing == "pregate" and bool(c.adapter.target_modules)
    if strategy == "switch" and not switchable:
        raise AdafuseError("--strategy switch merges a pre-gate's experts into the weights: " + (
            "--no-adapters leaves no adapter to merge" if no_adapters else
            f"{c.path} has routing '{c.adapter.routing}'") + " (use --strategy fused)")
    native_artifact.check_weight_format(c, dtype, weights)
    load_library()  # no runtime library: said before anything is written
    if torch.version.cuda is not None and not torch.cuda.is_available():  # a CPU-only torch cannot tell: the runtime will
        raise AdafuseError("--device cuda: no CUDA GPU is visible (PyTorch sees none; CUDA_VISIBLE_DEVICES?)")
    if no_adapters:
        c = c.base_only()
    candidates = ["fused", "switch"] if strategy == "auto" and switchable else ["switch" if strategy == "switch" else "fused"]
    # room for auto's timing steps too (a 4-token prompt and 10 steps)
    max_seq = min(max(len(ids) + max_new_tokens, 16), c.model.max_position_embeddings)
    with tempfile.TemporaryDirectory(prefix="adafuse-run-") as tmp:
        art = Path(tmp) / f"model{native_artifact.SUFFIX}"
        art.mkdir()
        native_artifact.write_artifact(c, art, dtype, max_batch=1, max_seq=max_seq, weights=weights)
        try:
            chosen = candidates[0]
            if len(candidates) > 1:
                chosen, timings = _fastest(art, candidates, c.model.vocab_size)
                emit("# auto strategy: " + ", ".join(f"{k} {v:.3f} ms/step" for k, v in timings.items())
                     + f" -> {chosen}", err=True)
            with open_native(art, chosen) as engine:
                return engine.generate(ids, max_new_tokens)
        except AdafuseError as e:  # the runtime's line names the temporary artifact: say which option ran it
            raise AdafuseError(f"--device cuda: {e}") from None


def _fastest(art: Path, strategies: list[str], vocab: int, steps: int = 8) -> tuple[str, dict[str, float]]:
    """auto: each strategy opened in turn, the median wall time of decode steps (after the first two, which capture
    the CUDA graph) on tokens whose routes change every step; the fastest is kept."""
    import statistics
    import time

    import numpy as np

    from ..runners.cpp_runtime import open_native

    timings = {}
    for strategy in strategies:
        with open_native(art, strategy) as engine:
            engine.prefill(np.array([[1, 2, 3, 4]]) % vocab)
            times = []
            for i in range(steps + 2):
                started = time.perf_counter()
                engine.decode(np.array([(5 + i) % vocab]))  # synchronous: the logits are on the host when it returns
                if i >= 2:
                    times.append((time.perf_counter() - started) * 1e3)
            timings[strategy] = statistics.median(times)
    return min(timings, key=timings.__getitem__), timings
