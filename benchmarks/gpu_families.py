"""Every registered family, and every scaled RoPE, on the GPU decoder against the CPU reference (H200 check).

For each family a pre-gated example is built with the features that set the family apart turned
up (short sliding windows, soft-caps, query scale, a local RoPE base, partial RoPE), and one more per
scaled RoPE the bases people fine-tune use (Llama 3.1's llama3, Qwen2.5's YaRN, Phi-3.5's LongRoPE with
its switch to the long factors inside the decoded steps, Gemma 3's linear on the full layers with tied
embeddings, linear, dynamic), then:
  - the CPU reference (float32) decodes greedily, with and without adapters;
  - the GPU decoder (float32, kernel library) decodes the same prompt with every strategy
    (dense without adapters; unmerged, fused, switch with them);
  - tokens must be equal, and the prefill logits' largest difference is recorded.
A prompt longer than the windows makes the windows matter. Writes gpu_families.json under --out.

Usage (device): python3 benchmarks/gpu_families.py --out $OUT    (here: --device cpu --out /tmp/x)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from adafuse_export import families
from adafuse_export.examples import make_example
from adafuse_export.kernels.binding import load_kernels
from adafuse_export.reference import ReferenceModel
from adafuse_export.runners.torch_cuda import GpuDecoder, KernelOps, TorchOps

WINDOW = 4
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # longer than WINDOW
NEW_TOKENS = 12
# Per family: config overrides that switch its distinguishing features on in the tiny example.
FEATURES: dict[str, dict] = {
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=24, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW),
    "gemma2": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                   final_logit_softcapping=1.5, attn_logit_softcapping=2.0),
    "gemma3_text": dict(head_dim=24, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
                        final_logit_softcapping=1.5, rope_local_base_freq=20.0,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
# name -> (family, config overrides): scaled RoPE, original context lengths short enough to matter here
SCALED: dict[str, tuple[str, dict]] = {
    "llama3.1-llama3": ("llama", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2.5-yarn": ("qwen2", dict(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16})),
    "phi3.5-longrope": ("phi3", dict(original_max_position_embeddings=16, rope_scaling={
        "type": "longrope", "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
        "long_factor": [1.0, 1.5, 2.5, 4.0, 7.0, 12.0, 20.0, 32.0]})),  # switches at position 16: mid-decode
    "gemma3-linear-tied": ("gemma3_text", dict(FEATURES["gemma3_text"], tie_word_embeddings=True, rope_theta=1e6,
                                               rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "mistral-linear": ("mistral", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen3-dynamic": ("qwen3", dict(head_dim=24, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}


def check(name: str, family: str, config: dict | None, root: Path, ops, device: str) -> dict:
    ckpt = make_example(root / name, "pregate", family=family, config=config)
    prompt = torch.tensor([PROMPT])
    row: dict = {"family": family, "name": name, "config": config or {}, "rope": ckpt.model.rope.describe()}
    for adapters in (False, True):
        ref = ReferenceModel(ckpt, dtype=torch.float32, adapters=adapters)
        want, steps = ref.generate(prompt, NEW_TOKENS)
        want_logits = steps[0].logits
        for strategy in (("unmerged", "fused", "switch") if adapters else ("dense",)):
            dec = GpuDecoder.from_checkpoint(ckpt, device=device, dtype=torch.float32, strategy=strategy,
                                             max_seq=len(PROMPT) + NEW_TOKENS + 1, ops=ops)
            logits = dec.prefill(prompt.to(device)).float().cpu()
            got = dec.generate(prompt.to(device), NEW_TOKENS).cpu()
            row[strategy] = {
                "tokens": got[0].tolist(), "reference_tokens": want[0].tolist(),
                "same_tokens": bool(torch.equal(got, want)),
                "prefill_logits_max_abs_diff": float((logits - want_logits).abs().max()),
            }
            print(f"{name:18s} {strategy:9s} same tokens: {row[strategy]['same_tokens']}  "
                  f"prefill max |diff| {row[strategy]['prefill_logits_max_abs_diff']:.2e}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the decoder's PyTorch ops (checks this script without a GPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ops = KernelOps(load_kernels()) if args.device == "cuda" else TorchOps()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f, f, FEATURES.get(f)) for f in families.names()] + [(n, f, c) for n, (f, c) in SCALED.items()]
        for name, family, config in cases:
            rows.append(check(name, family, config, Path(tmp), ops, args.device))
    ok = all(r[s]["same_tokens"] for r in rows for s in ("dense", "unmerged", "fused", "switch"))
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "dtype": "float32",
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "all_same_tokens": ok, "families": rows}
    (args.out / "gpu_families.json").write_text(json.dumps(report, indent=1) + "\n")
    print("all families and scaled RoPEs: GPU tokens equal the CPU reference's" if ok else "SOME FAMILY DIFFERS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
