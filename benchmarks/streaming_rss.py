"""Peak resident memory of inspect / export-routes / export-onnx (portable, plugin) and of `convert`
with each validation mode on a large checkpoint.

  python3 benchmarks/synthetic_checkpoint.py /root/syn7b          # ~13.6 GB, Llama-2-7B shape
  python3 benchmarks/streaming_rss.py /root/syn7b --out benchmarks/results
  python3 benchmarks/streaming_rss.py /root/syn7b --only-convert --convert-modes layerwise,full,off

Each command runs in its own process; peak RSS comes from the kernel's accounting of that
process (wait4 rusage ru_maxrss). Target (issue 6): under 25% of the checkpoint's bytes.
`convert` is also sampled every 0.5 s (/proc/PID/status) and split by its stage headers
("[N/4 ...]"): wall time and peak RSS per stage, with RSS split into anonymous memory (what
the process allocated) and file pages (memory-mapped weights, which the kernel can reclaim).
Outputs go to a temporary directory (--work, default the system's) and are deleted after each
command. Wall times depend on the page cache: a checkpoint read moments ago comes from RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
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


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def measure_stages(cmd: list[str], interval: float = 0.5) -> dict:
    """Run `convert`, attributing time and sampled memory to the stage whose header was printed last."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    stages: list[dict] = [{"stage": "start", "start": 0.0, "peak_rss_bytes": 0, "peak_anon_bytes": 0, "peak_file_bytes": 0}]
    lines: list[str] = []

    def sample():
        while proc.poll() is None:
            st = _status(proc.pid)
            cur = stages[-1]
            cur["peak_rss_bytes"] = max(cur["peak_rss_bytes"], st.get("VmRSS", 0))
            cur["peak_anon_bytes"] = max(cur["peak_anon_bytes"], st.get("RssAnon", 0))
            cur["peak_file_bytes"] = max(cur["peak_file_bytes"], st.get("RssFile", 0))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        print("    " + line.rstrip("\n"), flush=True)
        m = re.match(r"\[(\d)/4\s+[\d.]+s\] (\S+)", line)
        if m:
            stages.append({"stage": f"{m.group(1)} {m.group(2)}", "start": time.time() - t0, "peak_rss_bytes": 0,
                           "peak_anon_bytes": 0, "peak_file_bytes": 0})
    _, status, usage = os.wait4(proc.pid, 0)
    sampler.join()
    end = time.time() - t0
    for cur, nxt in zip(stages, stages[1:] + [{"start": end}]):
        cur["seconds"] = nxt["start"] - cur["start"]
    return {"command": " ".join(cmd), "exit": os.waitstatus_to_exitcode(status), "seconds": end,
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stages": stages[1:] if len(stages) > 1 else stages,
            "tail": lines[-12:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--work", type=Path, default=None, help="where outputs are written (and deleted) [system temp]")
    ap.add_argument("--skip-plugin", action="store_true", help="do not measure export-onnx --flavour plugin")
    ap.add_argument("--convert-modes", default="layerwise,full,off",
                    help="convert --validate modes to measure, comma-separated ('' for none)")
    ap.add_argument("--convert-dtype", default="float16", help="convert --dtype [float16: what runs in ONNX Runtime here]")
    ap.add_argument("--only-convert", action="store_true", help="measure convert only; keep the other rows of --out's JSON")
    a = ap.parse_args()
    limit = _memory_limit()  # read before the runs: a late import error would lose them
    size = sum(p.stat().st_size for p in a.ckpt.iterdir() if p.suffix == ".safetensors")
    exe = [sys.executable, "-m", "adafuse_export"]
    work = Path(tempfile.mkdtemp(prefix="rss-", dir=a.work))
    commands = [] if a.only_convert else [
        ("inspect", exe + ["inspect", str(a.ckpt), "--json"]),
        ("export-routes", exe + ["export-routes", str(a.ckpt), str(work / "routes.safetensors")]),
        ("export-onnx portable", exe + ["export-onnx", str(a.ckpt), str(work / "onnx"), "--flavour", "portable",
                                        "--dtype", a.dtype]),
    ]
    if not a.skip_plugin and not a.only_convert:
        commands.append(("export-onnx plugin", exe + ["export-onnx", str(a.ckpt), str(work / "onnx"), "--flavour", "plugin",
                                                      "--dtype", a.dtype]))
    rows: list[dict] = []
    convert_rows: list[dict] = []
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
        for mode in [m for m in a.convert_modes.split(",") if m]:
            r = measure_stages(exe + ["convert", str(a.ckpt), str(work / "m.engine"), "--dtype", a.convert_dtype,
                                      "--validate", mode, "--force"])
            r.update(name=f"convert --validate {mode}", fraction_of_checkpoint=r["peak_rss_bytes"] / size)
            for st in r["stages"]:
                st["fraction_of_checkpoint"] = st["peak_rss_bytes"] / size
            for p in work.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            convert_rows.append(r)
            print(f"convert --validate {mode:<9} exit {r['exit']}  {r['seconds']:7.1f} s  peak RSS "
                  f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB", flush=True)
            for st in r["stages"]:
                print(f"    stage {st['stage']:<14} {st['seconds']:7.1f} s  peak RSS {st['peak_rss_bytes'] / 2**30:6.2f} GiB "
                      f"(anonymous {st['peak_anon_bytes'] / 2**30:.2f}, file pages {st['peak_file_bytes'] / 2**30:.2f})")
            print("\n".join(r["tail"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    previous = a.out / "streaming_rss.json"
    if a.only_convert and previous.exists():
        rows = json.loads(previous.read_text()).get("rows", [])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    (a.out / "streaming_rss.json").write_text(json.dumps({"checkpoint": str(a.ckpt), "checkpoint_bytes": size,
                                                          "dtype": a.dtype, "git_commit": commit, "machine": machine,
                                                          "memory_limit": limit,
                                                          "rows": rows, "convert_dtype": a.convert_dtype,
                                                          "convert": convert_rows}, indent=2) + "\n")
    print("\n| command | seconds | peak RSS GiB | % of checkpoint |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | {r['fraction_of_checkpoint']:.1%} |")
    for r in convert_rows:
        for st in r["stages"]:
            print(f"| {r['name']}: {st['stage']} | {st['seconds']:.1f} | {st['peak_rss_bytes'] / 2**30:.2f} "
                  f"(anon {st['peak_anon_bytes'] / 2**30:.2f}) | {st['fraction_of_checkpoint']:.1%} |")


def _memory_limit() -> str:
    """What bounded the run: the memory cgroup's figure as convert reads it."""
    from adafuse_export.resources import memory_available

    return memory_available()[1]


if __name__ == "__main__":
    main()
