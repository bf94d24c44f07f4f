"""Peak resident memory of inspect / export-routes / export-onnx (portable, plugin) on a large checkpoint.

  python3 benchmarks/synthetic_checkpoint.py /root/syn7b          # ~13.6 GB, Llama-2-7B shape
  python3 benchmarks/streaming_rss.py /root/syn7b --out benchmarks/results

Each command runs in its own process; peak RSS comes from the kernel's accounting of that
process (wait4 rusage ru_maxrss). Target (issue 6): under 25% of the checkpoint's bytes.
Outputs go to a temporary directory (--work, default the system's) and are deleted after each
command. Wall times depend on the page cache: a checkpoint read moments ago comes from RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(cmd: list[str]) -> dict:
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()  # before wait4: a full pipe would block the child
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(cmd), "exit": proc.returncode, "seconds": time.time() - t,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "tail": out.strip().splitlines()[-3:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", type=Path, default=None, help="where outputs are written (and deleted) [system temp]")
    ap.add_argument("--skip-plugin", action="store_true", help="do not measure export-onnx --flavour plugin")
    a = ap.parse_args()
    size = sum(p.stat().st_size for p in a.ckpt.iterdir() if p.suffix == ".safetensors")
    exe = [sys.executable, "-m", "adafuse_export"]
    work = Path(tempfile.mkdtemp(prefix="rss-", dir=a.work))
    commands = [
        ("inspect", exe + ["inspect", str(a.ckpt), "--json"]),
        ("export-routes", exe + ["export-routes", str(a.ckpt), str(work / "routes.safetensors")]),
        ("export-onnx portable", exe + ["export-onnx", str(a.ckpt), str(work / "onnx"), "--flavour", "portable",
                                        "--dtype", a.dtype]),
    ]
    if not a.skip_plugin:
        commands.append(("export-onnx plugin", exe + ["export-onnx", str(a.ckpt), str(work / "onnx"), "--flavour", "plugin",
                                                      "--dtype", a.dtype]))
    rows = []
    try:
        for name, cmd in commands:
            r = measure(cmd)
            r.update(name=name, fraction_of_checkpoint=r["peak_rss_bytes"] / size)
            outputs = sorted(work.rglob("*"))
            r["outputs"] = {str(p.relative_to(work)): p.stat().st_size for p in outputs if p.is_file()}
            for p in work.iterdir():  # one export at a time on disk
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            rows.append(r)
            print(f"{name:<22} exit {r['exit']}  {r['seconds']:7.1f} s  peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
                  f"= {r['fraction_of_checkpoint']:.1%} of {size / 2**30:.1f} GiB", flush=True)
            if r["exit"]:
                print("\n".join(r["tail"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    (a.out / "streaming_rss.json").write_text(json.dumps({"checkpoint": str(a.ckpt), "checkpoint_bytes": size,
                                                          "dtype": a.dtype, "git_commit": commit, "machine": machine,
                                                          "rows": rows}, indent=2) + "\n")
    print("\n| command | seconds | peak RSS GiB | % of checkpoint |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['fraction_of_checkpoint']:.1%} |")


if __name__ == "__main__":
    main()
