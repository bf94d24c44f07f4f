"""Every registered family on the GPU decoder against the CPU reference (H200 check).

For each family a pre-gated example is built with the features that set the family apart turned
up (short sliding windows, soft-caps, query scale, a local RoPE base, partial RoPE), then:
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


def check(family: str, root: Path, ops, device: str) -> dict:
    ckpt = make_example(root / family, "pregate", family=family, config=FEATURES.get(family))
    prompt = torch.tensor([PROMPT])
    row: dict = {"family": family, "config": FEATURES.get(family, {})}
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
            print(f"{family:12s} {strategy:9s} same tokens: {row[strategy]['same_tokens']}  "
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
        for family in families.names():
            rows.append(check(family, Path(tmp), ops, args.device))
    ok = all(r[s]["same_tokens"] for r in rows for s in ("dense", "unmerged", "fused", "switch"))
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "dtype": "float32",
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "all_same_tokens": ok, "families": rows}
    (args.out / "gpu_families.json").write_text(json.dumps(report, indent=1) + "\n")
    print("all families: GPU tokens equal the CPU reference's" if ok else "SOME FAMILY DIFFERS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
