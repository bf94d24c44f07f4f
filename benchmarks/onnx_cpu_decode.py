"""CPU decode: ONNX Runtime (portable ONNX export) vs the PyTorch reference, side by side.

A ~100M-parameter llama (random weights) with a pre-gated mixture of 8 LoRA experts,
rank 16, top-2, on all seven projections. Both runners prefill the same prompt, then
greedy-decode; we time each decode step (pre-gate + decoder for ONNX Runtime) and report
the median over repeats.

    python benchmarks/onnx_cpu_decode.py            # writes benchmarks/results/onnx_cpu_decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = {  # ~100M parameters: 2 x 24.6M embeddings + 8 layers x 6.3M
    "vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
    "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 2048,
}


def time_decode(prefill, decode, prompt: np.ndarray, steps: int) -> tuple[float, list[float], list[int]]:
    t0 = time.perf_counter()
    logits = prefill(prompt)
    prefill_s = time.perf_counter() - t0
    tokens, per_step = [], []
    for _ in range(steps):
        nxt = np.asarray(logits)[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(int(nxt[0, 0]))
        t0 = time.perf_counter()
        logits = decode(nxt)
        per_step.append(time.perf_counter() - t0)
    return prefill_s, per_step, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64, help="decode steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}" if os.cpu_count() > 1 else "1",
                    help="comma-separated intra-op thread counts to measure (each runner at each count)")
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "onnx_cpu_decode.json")
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from adafuse_export.converters import load_checkpoint
    from adafuse_export.examples import make_example
    from adafuse_export.onnx.export import export_onnx
    from adafuse_export.runners.onnxruntime import OnnxRuntimeRunner
    from adafuse_export.runners.reference import ReferenceRunner

    thread_counts = [int(t) for t in str(args.threads).split(",")]
    config = dict(CONFIG, num_hidden_layers=args.layers)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="adafuse-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        make_example(tmp / "ckpt", "pregate", num_experts=8, top_k=2, r=16, config=config)
        ckpt = load_checkpoint(tmp / "ckpt")
        counts = ckpt.parameter_counts()
        export_onnx(ckpt, tmp / "onnx", "portable", "float32")
        setup_s = time.perf_counter() - t0
        onnx_bytes = sum(f.stat().st_size for f in (tmp / "onnx").iterdir())
        ref = ReferenceRunner(ckpt, "float32")
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, config["vocab_size"], size=(1, args.prompt_len), dtype=np.int64)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            ort_runner = OnnxRuntimeRunner(tmp / "onnx", providers=["CPUExecutionProvider"], threads=threads)
            runners = {
                "onnxruntime": (lambda ids: ort_runner.prefill(ids).logits, lambda ids: ort_runner.decode(ids).logits),
                "pytorch-reference": (lambda ids: ref.step_logits(ids, True).numpy(),
                                      lambda ids: ref.step_logits(ids, False).numpy()),
            }
            tokens = {}
            for name, (prefill, decode) in runners.items():
                time_decode(prefill, decode, prompt, 4)  # warm-up
                prefill_ms, step_ms = [], []
                for _ in range(args.repeats):
                    p, steps, toks = time_decode(prefill, decode, prompt, args.steps)
                    prefill_ms.append(1e3 * p)
                    step_ms.append(1e3 * statistics.median(steps))
                tokens[name] = toks
                ms = statistics.median(step_ms)
                rows.append({"runner": name, "threads": threads, "decode_ms_per_step": ms, "tokens_per_s": 1e3 / ms,
                             "prefill_ms": statistics.median(prefill_ms), "decode_ms_per_step_repeats": step_ms,
                             "prefill_ms_repeats": prefill_ms})
            agree = sum(a == b for a, b in zip(tokens["onnxruntime"], tokens["pytorch-reference"]))
            rows[-1]["greedy_agreement_with_onnxruntime"] = rows[-2]["greedy_agreement_with_reference"] = f"{agree}/{args.steps}"
            del ort_runner

    report = {
        "benchmark": "onnx_cpu_decode",
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "model": {"config": config, "adapter": {"routing": "pregate", "num_experts": 8, "top_k": 2, "r": 16,
                                                "target_modules": "q,k,v,o,gate,up,down"}, **counts},
        "onnx": {"flavour": "portable", "dtype": "float32", "bytes": onnx_bytes},
        "run": {"batch": 1, "prompt_len": args.prompt_len, "decode_steps": args.steps, "repeats": args.repeats,
                "threads": thread_counts, "statistic": "median over repeats of each repeat's median step time",
                "onnxruntime_step": "pregate.onnx + decoder.onnx, numpy KV cache fed back each step"},
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__, "onnxruntime": ort.__version__,
                        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor() or None,
                        "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "setup_s": setup_s,
        "results": rows,
    }
    print(f"{counts['base_parameters'] / 1e6:.1f}M base + {counts['adapter_parameters'] / 1e6:.1f}M adapter parameters, "
          f"batch 1, prompt {args.prompt_len}, {args.steps} decode steps x {args.repeats} repeats "
          f"(load average before {load_before[0]:.2f})")
    print(f"{'runner':<20} {'threads':>7} {'ms/step':>9} {'tokens/s':>9} {'prefill ms':>11} {'speed-up':>9}")
    for r in rows:
        base = next(x for x in rows if x["runner"] == "pytorch-reference" and x["threads"] == r["threads"])
        print(f"{r['runner']:<20} {r['threads']:>7} {r['decode_ms_per_step']:>9.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['prefill_ms']:>11.1f} {base['decode_ms_per_step'] / r['decode_ms_per_step']:>8.2f}x")
    print("greedy agreement, each runner following its own tokens: "
          + ", ".join(f"{r['threads']} thread(s) {r['greedy_agreement_with_reference']}" for r in rows if r["runner"] == "onnxruntime"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
