"""Fit resources.py's engine-build memory terms to the measured builds in results/build_rss.json.

  python3 benchmarks/fit_build_rss.py [--write]

The peak is modelled as fixed + per layer + bytes of the decoder layers' weights x one factor + bytes of the
weights outside them (embeddings, lm_head, pre-gate) x another; every coefficient is non-negative (a linear
program): each row's figure must be at least HEADROOM x its measured peak, and the sum of figure/measured
over the rows is made as small as possible. Each row's weights come from its checkpoint's tensor shapes
(synthetic_checkpoint.tensor_counts, or the built-in example's headers).

The factor on layer weights is capped at the builder's own growth per layer byte, the slope of the builder-only
rows of one width and several depths: convert's build stage peaks higher than the builder alone (the process's
imports, the checkpoint's mapped pages), but that excess is not the builder's per-layer copies, and the only
convert row of 7B width has one layer, so an uncapped fit would put its excess on the layers (5.9x, 78 GiB for
the whole 7B instead of 59). --write stores the fit in the JSON;
resources.py takes the coefficients rounded up and tests/test_build_memory.py checks them against the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.optimize import linprog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import synthetic_checkpoint  # noqa: E402
from adafuse_export.resources import GiB, ITEMSIZE, Sizes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "build_rss.json"
HEADROOM = 1.10  # run-to-run and machine-to-machine spread of a peak (allocator, page cache, thread count)
TERMS = ("fixed_gib", "per_layer_gib", "per_layer_weight_byte", "per_outside_weight_byte")


def row_sizes(checkpoint: dict) -> Sizes:
    """Element counts of a row's checkpoint: {"example": kind} or {"shape", "layers"?, "experts", "rank"}."""
    if "example" in checkpoint:
        from adafuse_export.converters import load_checkpoint
        from adafuse_export.examples import make_example

        with tempfile.TemporaryDirectory() as d:
            make_example(Path(d) / "ex", checkpoint["example"])
            return Sizes.of(load_checkpoint(Path(d) / "ex"))
    return Sizes.from_counts(synthetic_checkpoint.tensor_counts(
        checkpoint["shape"], checkpoint["experts"], checkpoint["rank"], layers=checkpoint.get("layers")))


def features(s: Sizes, dtype: str = "float16") -> list[float]:
    """The model's inputs for one build, in GiB (and layers): what each coefficient multiplies."""
    item = ITEMSIZE[dtype]
    return [1.0, float(s.layers), s.in_layers * item / GiB, s.outside_layers * item / GiB]


def depth_slope(rows: list[dict], x: np.ndarray, measured: np.ndarray) -> float:
    """Peak GiB per GiB of layer weights among builder-only rows of one shape at several depths (least squares)."""
    by_shape: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r["mode"] == "builder" and "layers" in r["checkpoint"]:
            by_shape.setdefault(r["checkpoint"]["shape"], []).append(i)
    series = max(by_shape.values(), key=lambda idx: len({rows[i]["checkpoint"]["layers"] for i in idx}))
    return float(np.polyfit(x[series, 2], measured[series], 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the fit in results/build_rss.json")
    a = ap.parse_args()
    data = json.loads(RESULTS.read_text())
    rows = data["rows"]
    x = np.array([features(row_sizes(r["checkpoint"])) for r in rows])
    measured = np.array([r["vmhwm_gib"] for r in rows])
    cap = depth_slope(rows, x, measured)
    # minimise sum(estimate / measured) subject to estimate >= HEADROOM * measured, coefficients >= 0
    fit = linprog(c=(x / measured[:, None]).sum(axis=0), A_ub=-x, b_ub=-HEADROOM * measured,
                  bounds=[(0, None), (0, None), (0, cap), (0, None)], method="highs")
    if not fit.success:
        raise SystemExit(f"no non-negative fit: {fit.message}")
    coef = fit.x
    estimate = x @ coef
    for r, e, m in zip(rows, estimate, measured):
        print(f"{r['mode']:<8} {json.dumps(r['checkpoint']):<62} max seq {r['max_seq']:>4}: measured {m:5.2f} GiB, "
              f"fit {e:5.2f} GiB ({e / m:.2f}x)")
    print("  ".join(f"{t} {c:.4f}" for t, c in zip(TERMS, coef)) + f"  (layer factor capped at {cap:.3f})")
    if a.write:
        data["fit"] = {"model": ("peak_gib = fixed_gib + per_layer_gib x layers + per_layer_weight_byte x layer weights (GiB) "
                                  "+ per_outside_weight_byte x weights outside the layers (GiB)"), **{t: round(float(c), 4) for t, c in zip(TERMS, coef)},
                       "headroom": HEADROOM, "layer_factor_cap": round(cap, 4), "estimate_over_measured": [round(float(e / m), 3) for e, m in zip(estimate, measured)],
                       "by": "benchmarks/fit_build_rss.py"}
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
