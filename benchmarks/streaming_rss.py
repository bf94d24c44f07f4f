"""Peak resident memory of inspect / export-routes / export-onnx on a large checkpoint.

  python3 benchmarks/synthetic_checkpoint.py /root/syn7b          # ~13.6 GB, Llama-2-7B shape
  python3 benchmarks/streaming_rss.py /root/syn7b --out benchmarks/results

Each command runs in its own process; peak RSS comes from the kernel's accounting of that
process (wait4 rusage ru_maxrss). Target (issue 6): under 25% of the checkpoint's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(cmd: list[str]) -> dict:
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd), "exit": proc.returncode, "seconds": time.time() - t,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "tail": out.strip().splitlines()[-3:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    size = sum(p.stat().st_size for p in a.ckpt.iterdir() if p.suffix == ".safetensors")
    exe = [sys.executable, "-m", "adafuse_export"]
    work = Path(tempfile.mkdtemp(prefix="rss-", dir=a.out.resolve().parent if a.out.exists() else None))
    rows = []
    try:
        for name, cmd in [
            ("inspect", exe + ["inspect", str(a.ckpt), "--json"]),
            ("export-routes", exe + ["export-routes", str(a.ckpt), str(work / "routes.safetensors")]),
            ("export-onnx portable", exe + ["export-onnx", str(a.ckpt), str(work / "onnx"), "--flavour", "portable",
                                            "--dtype", a.dtype]),
        ]:
            r = measure(cmd)
            r.update(name=name, fraction_of_checkpoint=r["peak_rss_bytes"] / size)
            rows.append(r)
            print(f"{name:<22} exit {r['exit']}  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
                  f"= {r['fraction_of_checkpoint']:.1%} of {size / 2**30:.1f} GiB", flush=True)
            if r["exit"]:
                print("\n".join(r["tail"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "streaming_rss.json").write_text(json.dumps({"checkpoint": str(a.ckpt), "checkpoint_bytes": size,
                                                          "rows": rows}, indent=2))
    print("\n| command | seconds | peak RSS GiB | % of checkpoint |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['fraction_of_checkpoint']:.1%} |")


if __name__ == "__main__":
    main()
