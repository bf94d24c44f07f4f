"""Host memory of a TensorRT-RTX engine build, sampled every 2 s: of the builder alone on an ONNX
export, or of stage 4 of a whole `convert` run (--convert).

  python3 -m adafuse_export export-onnx /root/syn7b /root/out/m.onnx --dtype float16
  python3 benchmarks/build_rss.py /root/out/m.onnx/decoder.onnx [--strip-plan]
  python3 benchmarks/build_rss.py --convert /root/out/m.engine /root/syn7b [--max-seq N]

Each sample line (elapsed, VmHWM, VmRSS, RssAnon, RssFile in GiB) is flushed as it is taken,
so a build killed by the OOM killer or a memory cgroup still leaves its last figures. With
--convert, `convert` (its defaults otherwise) runs in this process and the peak is reset
(/proc/self/clear_refs) when stage 4 starts, after its garbage collection: the last line's VmHWM is the build stage's own peak,
with what the earlier stages left in the process counted (what resources.estimate predicts).
These runs are what resources.py's BUILD_* terms were fitted to (docs/large-models.md,
benchmarks/results/build_rss.json).
--strip-plan adds BuilderFlag.STRIP_PLAN (a weight-stripped plan), --refit-identical adds
REFIT_IDENTICAL (the builder may optimise with the weights it was given).
"""
from __future__ import annotations

import argparse
import gc
import threading
import time
from pathlib import Path

from adafuse_export.trt import build
from adafuse_export.trt.backends import select_backend

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="decoder.onnx of an export, or a checkpoint with --convert")
    ap.add_argument("--convert", type=Path, metavar="OUT.engine",
                    help="run `convert SOURCE OUT.engine` here and report its build stage")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--max-seq", type=int, default=None,
                    help="[2048 for an ONNX; convert's default (the model's, at most 2048) with --convert]")
    ap.add_argument("--strip-plan", action="store_true")
    ap.add_argument("--refit-identical", action="store_true")
    a = ap.parse_args()
    t0 = time.time()

    def sample():
        while True:
            print(f"{time.time() - t0:7.1f}s " + " ".join(f"{k} {v:.2f}" for k, v in status().items()), flush=True)
            time.sleep(2)

    threading.Thread(target=sample, daemon=True).start()
    if a.convert:
        return convert_build_stage(a, t0)
    backend = select_backend("tensorrt-rtx")
    if a.strip_plan:
        plain = build.builder_config

        def stripped(backend, builder, dtype):
            config = plain(backend, builder, dtype)
            config.set_flag(backend.trt.BuilderFlag.STRIP_PLAN)
            if a.refit_identical:
                config.set_flag(backend.trt.BuilderFlag.REFIT_IDENTICAL)
            return config

        build.builder_config = stripped
    blob, _ = build.build_engine(backend, a.source, dtype=a.dtype, max_batch=1, max_seq=a.max_seq or 2048,
                                 log=print)
    print(f"built in {time.time() - t0:.1f}s: engine {len(blob) / 2**30:.2f} GiB; " +
          " ".join(f"{k} {v:.2f}" for k, v in status().items()), flush=True)


def reset_peak() -> None:
    """VmHWM := VmRSS (Linux's clear_refs "5"), so the peak that follows is the next stage's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def convert_build_stage(a: argparse.Namespace, t0: float) -> None:
    from adafuse_export import convert

    plain = convert.build_stage
    seen: dict[str, float] = {}

    def measured(*args, **kwargs):
        gc.collect()  # build_stage's first step, done here so the peak is reset after it (its own is then a no-op)
        reset_peak()
        seen.update(start=time.time(), rss_at_start=status()["VmRSS"])
        try:
            return plain(*args, **kwargs)
        finally:
            seen.update(end=time.time(), **status())

    convert.build_stage = measured
    argv = ["convert", str(a.source), str(a.convert), "--dtype", a.dtype, "--force"]
    if a.max_seq is not None:
        argv += ["--max-seq", str(a.max_seq)]
    from adafuse_export.cli import main as cli_main
    try:
        code = cli_main(argv)
    finally:
        if "end" not in seen:
            raise SystemExit("convert stopped before its build stage (see above): no build measured")
        print(f"build stage in {seen['end'] - seen['start']:.1f}s (VmRSS {seen['rss_at_start']:.2f} when it began); "
              + " ".join(f"{k} {seen[k]:.2f}" for k in FIELDS), flush=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
