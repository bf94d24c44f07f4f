"""Per-token cost of the C++ runtime's sampler (adafuse_sampler_next through the C API), side by side for
one or more builds of libadafuse_runtime.so, at the vocabularies of Llama 2 (32000), Llama 3 (128256) and
Qwen2.5 (151936), on logits shaped like a language model's (a few strong candidates over a normal tail).

    python3 benchmarks/sampling_cpu.py --lib new=build/dev/runtime/libadafuse_runtime.so \\
        --lib old=/tmp/old/libadafuse_runtime.so --out benchmarks/results

Prints a table (median microseconds per token over --repeats draws, and old/new ratios against the first
library) and writes sampling_cpu.json. CPU timings on a shared machine: compare the columns of one run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from adafuse_export.runners.cpp_runtime import Sampler

VOCABS = (32000, 128256, 151936)
CONFIGS = {  # name: (temperature, top_k, top_p)
    "greedy": (0.0, 0, 1.0),
    "temperature 0.8": (0.8, 0, 1.0),
    "top-k 50": (0.8, 50, 1.0),
    "top-p 0.9": (0.8, 0, 0.9),
    "top-k 50 + top-p 0.95": (0.8, 50, 0.95),
}


def lm_logits(vocab: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=vocab).astype(np.float32) * 2.0
    logits[rng.choice(vocab, 8, replace=False)] += rng.uniform(6, 12, size=8).astype(np.float32)
    return logits


def per_token_us(library: str, config: tuple, logits: np.ndarray, repeats: int) -> float:
    sampler = Sampler(*config, seed=1, library=library)
    sampler.next(logits)  # warm: buffers, pages
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sampler.next(logits)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", action="append", required=True, metavar="NAME=PATH",
                    help="a libadafuse_runtime.so to time (repeat; the first is the one the ratios compare against)")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    libs = dict(item.split("=", 1) for item in args.lib)
    names = list(libs)
    rows = []
    print(f"{'vocab':>7} {'config':<22}" + "".join(f" {n + ' us':>12}" for n in names)
          + "".join(f" {n + '/' + names[0]:>12}" for n in names[1:]))
    for vocab in VOCABS:
        logits = lm_logits(vocab, vocab)
        for config_name, config in CONFIGS.items():
            us = {name: per_token_us(path, config, logits, args.repeats) for name, path in libs.items()}
            rows.append(dict(vocab=vocab, config=config_name, temperature=config[0], top_k=config[1], top_p=config[2],
                             us_per_token=us))
            print(f"{vocab:>7} {config_name:<22}" + "".join(f" {us[n]:>12.1f}" for n in names)
                  + "".join(f" {us[n] / us[names[0]]:>12.2f}" for n in names[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampling_cpu.json").write_text(json.dumps(dict(
        what="median microseconds per adafuse_sampler_next call (C API through ctypes, its overhead included)",
        machine=f"{platform.processor() or platform.machine()}, shared 2-core development machine",
        libraries=libs, repeats=args.repeats, rows=rows), indent=1))


if __name__ == "__main__":
    main()
