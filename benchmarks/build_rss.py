"""Host memory of a TensorRT-RTX engine build from an ONNX export, sampled every 2 s.

  python3 -m adafuse_export export-onnx /root/syn7b /root/out/m.onnx --dtype float16
  python3 benchmarks/build_rss.py /root/out/m.onnx/decoder.onnx [--strip-plan]

Each sample line (elapsed, VmHWM, VmRSS, RssAnon, RssFile in GiB) is flushed as it is taken,
so a build killed by the OOM killer or a memory cgroup still leaves its last figures. This is
how resources.BUILD_BYTES_PER_WEIGHT_BYTE and BUILD_FIXED_BYTES were fitted (docs/large-models.md).
--strip-plan adds BuilderFlag.STRIP_PLAN (a weight-stripped plan), --refit-identical adds
REFIT_IDENTICAL (the builder may optimise with the weights it was given).
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--strip-plan", action="store_true")
    ap.add_argument("--refit-identical", action="store_true")
    a = ap.parse_args()
    t0 = time.time()

    def sample():
        while True:
            print(f"{time.time() - t0:7.1f}s " + " ".join(f"{k} {v:.2f}" for k, v in status().items()), flush=True)
            time.sleep(2)

    threading.Thread(target=sample, daemon=True).start()
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
    blob, _ = build.build_engine(backend, a.onnx, dtype=a.dtype, max_batch=1, max_seq=a.max_seq, log=print)
    print(f"built in {time.time() - t0:.1f}s: engine {len(blob) / 2**30:.2f} GiB; " +
          " ".join(f"{k} {v:.2f}" for k, v in status().items()), flush=True)


if __name__ == "__main__":
    main()
