"""Where a float16 graph's error comes from: the float16 ONNX graph (ONNX Runtime) and the float16 PyTorch
reference, each against the float32 reference of the same checkpoint, output by output.

  python3 -m adafuse_export export-onnx /root/syn7b /root/out/onnx16 --dtype float16
  python3 benchmarks/fp16_drift.py /root/syn7b /root/out/onnx16 --steps 2 --out benchmarks/results/fp16_drift.json

If the graph's distance from float32 is of the size of the float16 reference's own, the fixed float16
tolerance (graph against the float16 reference) is what fails, not the graph; if the graph is much
further from float32 than the float16 reference, an op of the graph loses precision.
All three run layer by layer (streamed reference, per-layer ONNX Runtime subgraphs), fed the float32
reference's greedy tokens.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adafuse_export.converters import load_checkpoint
from adafuse_export.runners.reference import ReferenceRunner
from adafuse_export.validate import DEFAULT_PROMPT, open_model_runner


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "rms": float(np.sqrt((d * d).mean()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("onnx", type=Path, help="a float16 export-onnx directory")
    ap.add_argument("--steps", type=int, default=2, help="greedy decode steps after the prefill")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fp16_drift.json"))
    a = ap.parse_args()
    ckpt = load_checkpoint(a.ckpt)
    ref32 = ReferenceRunner(ckpt, "float32", stream=True)
    ref16 = ReferenceRunner(ckpt, "float16", stream=True)
    graph = open_model_runner(a.onnx / "decoder.onnx", "layerwise")
    runners = {"reference float32": ref32, "reference float16": ref16, "onnx float16": graph}
    ids = np.asarray([[t % ckpt.model.vocab_size for t in DEFAULT_PROMPT]], np.int64)
    rows: dict[str, dict[str, list]] = {}  # output -> pair -> per-step stats
    greedy = {"reference float16": 0, "onnx float16": 0}
    t0 = time.time()
    for step in range(a.steps + 1):
        outs = {name: (r.prefill(ids) if step == 0 else r.decode(ids)) for name, r in runners.items()}
        want = outs["reference float32"]
        nxt = want.logits[:, -1].argmax(-1)
        for name in greedy:
            greedy[name] += int((outs[name].logits[:, -1].argmax(-1) == nxt).sum())
        for out in ["logits", *want.present]:
            def get(o):
                return o.logits if out == "logits" else o.present[out]

            row = rows.setdefault(out, {"reference float16 vs float32": [], "onnx float16 vs float32": [],
                                        "onnx float16 vs reference float16": []})
            row["reference float16 vs float32"].append(_stats(get(outs["reference float16"]), get(want)))
            row["onnx float16 vs float32"].append(_stats(get(outs["onnx float16"]), get(want)))
            row["onnx float16 vs reference float16"].append(_stats(get(outs["onnx float16"]), get(outs["reference float16"])))
        print(f"step {step} done, {time.time() - t0:.0f} s", flush=True)
        ids = nxt[:, None].astype(np.int64)
    summary = {out: {pair: max(s["max_abs"] for s in steps) for pair, steps in row.items()} for out, row in rows.items()}
    result = {"checkpoint": str(a.ckpt), "onnx": str(a.onnx), "prompt": DEFAULT_PROMPT, "decode_steps": a.steps,
              "greedy_agreement_with_float32": {k: f"{v}/{a.steps + 1}" for k, v in greedy.items()},
              "max_abs_by_output": summary, "per_step": rows, "seconds": time.time() - t0}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'output':<24} {'ref16-ref32':>12} {'onnx16-ref32':>13} {'onnx16-ref16':>13}")
    for out, s in summary.items():
        print(f"{out:<24} {s['reference float16 vs float32']:12.4e} {s['onnx float16 vs float32']:13.4e} "
              f"{s['onnx float16 vs reference float16']:13.4e}")
    print("greedy agreement with float32:", result["greedy_agreement_with_float32"])


if __name__ == "__main__":
    main()
