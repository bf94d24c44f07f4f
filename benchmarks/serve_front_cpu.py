"""The HTTP front of adafuse-serve under load, on the CPU: the test server (runtime/tests/replay_server_main.cpp
--history: HistoryBackendForTests, in-flight executor, a simulated step time) driven by many concurrent
clients, while a prober measures GET /health. Answers issue 21's "250 clients with /health p99 < 100 ms"
and shows what the queue bound, cancellation and the metrics do under that load.

    python3 benchmarks/serve_front_cpu.py --build build/dev --clients 250 --seconds 20 --out benchmarks/results

Clients run in --procs worker processes (threads each, so the prober's process is not starved by one
GIL); each loops POST /v1/completions with a random prompt (1-200 ids) and max_tokens (1-32); every
10th request is abandoned mid-generation (the connection closed after its first event), exercising
cancellation. Prints a table and writes serve_front_cpu.json: /health latency p50/p99/max, answers by
status, completions per second, the server's own TTFT / inter-token / queue-wait means from /metrics.
A shared 2-core machine makes these numbers noisy: compare runs of one session only.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _post_completion(port: int, body: dict, abandon: bool, timeout: float) -> int:
    """One request on its own connection; the HTTP status, or 0 when abandoned / failed."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
        head = s.recv(65536)
        m = re.match(rb"HTTP/1\.1 (\d+)", head)
        code = int(m.group(1)) if m else 0
        if abandon and code == 200:
            return 0  # closed after its first bytes: the server cancels the request
        while s.recv(65536):
            pass
    return code


def _client_process(port: int, threads: int, seconds: float, seed: int, out: "mp.Queue") -> None:
    counts: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            body = {"prompt": [rng.randrange(40) for _ in range(rng.randint(1, 200))], "max_tokens": rng.randint(1, 32),
                    "temperature": 0, "stream": True}
            abandon = n % 10 == 0
            try:
                code = _post_completion(port, body, abandon, timeout=120)
            except OSError:
                code = -1
            key = -2 if abandon and code == 0 else code
            with lock:
                counts[key] = counts.get(key, 0) + 1
            if code == 503:
                time.sleep(0.1)  # a client that backs off on 503 (Retry-After says 1 s; a balancer retries elsewhere)

    workers = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put(counts)


def _probe_health(url: str, seconds: float) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                r.read()
            latencies.append(time.monotonic() - start)
        except (urllib.error.URLError, OSError):
            latencies.append(float("inf"))
        time.sleep(0.02)
    return latencies


def _metric_mean(text: str, name: str) -> float | None:
    def value(suffix: str) -> float | None:
        m = re.search(rf"^{name}_{suffix} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None
    total, count = value("sum"), value("count")
    return total / count if total is not None and count else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=Path(os.environ.get("ADAFUSE_NATIVE_BUILD_DIR", "build/dev")))
    ap.add_argument("--clients", type=int, default=250)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--step-delay-ms", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    server = args.build / "runtime/tests/adafuse_replay_server_for_tests"
    cmd = [str(server), "--history", "40", "--max-batch", str(args.max_batch), "--max-seq", "512", "--step-delay-ms",
           str(args.step_delay_ms), "--queue", str(args.queue), "--port", "0", "--max-connections", "4096"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[-1]
        port = int(url.rsplit(":", 1)[1])
        queue: mp.Queue = mp.Queue()
        per = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
        workers = [mp.Process(target=_client_process, args=(port, n, args.seconds, i, queue)) for i, n in enumerate(per) if n]
        start = time.monotonic()
        for w in workers:
            w.start()
        time.sleep(1.0)  # let the load build up before probing
        health = _probe_health(url, args.seconds - 1.5)
        counts: dict[int, int] = {}
        for _ in workers:
            for code, n in queue.get().items():
                counts[code] = counts.get(code, 0) + n
        for w in workers:
            w.join()
        elapsed = time.monotonic() - start
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    finite = sorted(h for h in health if h != float("inf"))
    p = (lambda q: finite[min(len(finite) - 1, int(q * len(finite)))] * 1e3) if finite else (lambda q: float("nan"))
    cancelled = re.search(r"^adafuse_requests_cancelled_total (\S+)$", metrics, re.M)
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "config": vars(args) | {"build": str(args.build), "out": str(args.out)},
        "health_ms": {"probes": len(health), "failed": len(health) - len(finite), "p50": p(0.50), "p99": p(0.99),
                      "max": finite[-1] * 1e3 if finite else None},
        "answers": {("abandoned" if k == -2 else "error" if k == -1 else str(k)): v for k, v in sorted(counts.items())},
        "completed_per_second": counts.get(200, 0) / elapsed,
        "server": {"cancelled": float(cancelled.group(1)) if cancelled else None,
                   "ttft_mean_s": _metric_mean(metrics, "adafuse_time_to_first_token_seconds"),
                   "inter_token_mean_s": _metric_mean(metrics, "adafuse_inter_token_latency_seconds"),
                   "queue_wait_mean_s": _metric_mean(metrics, "adafuse_queue_wait_seconds"),
                   "rows_per_step_mean": _metric_mean(metrics, "adafuse_batch_rows")},
    }
    print(f"{args.clients} clients, {args.seconds:.0f} s, max_batch {args.max_batch}, queue {args.queue}, "
          f"step {args.step_delay_ms} ms ({os.cpu_count()} CPUs)")
    print(f"  /health: {len(health)} probes, p50 {result['health_ms']['p50']:.1f} ms, p99 {result['health_ms']['p99']:.1f} ms, "
          f"max {result['health_ms']['max']:.1f} ms, failed {result['health_ms']['failed']}")
    print("  answers: " + ", ".join(f"{k}: {v}" for k, v in result["answers"].items()))
    print(f"  completed/s {result['completed_per_second']:.1f}; server: " +
          ", ".join(f"{k} {v:.4g}" for k, v in result["server"].items() if v is not None))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_front_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
