"""Serving load: adafuse-serve (native backend) on an AdaFuse MoE-LoRA model of the Llama-2-7B shape and on its
dense base, and transformers' own continuous batching on the dense base, under the same load.

  python3 benchmarks/serve_load.py                                  # the GPU machine: everything, one call
  python3 benchmarks/serve_load.py --url http://127.0.0.1:8000      # only drive a service already running

The load is closed-loop: at concurrency N, N clients each send a request, read its streamed tokens to the end,
then send the next, until the level's requests are sent or --level-seconds have passed (requests in flight
then finish and count). The requests are a fixed mix drawn from --seed: prompt lengths log-uniform in
--prompt-lengths (16..2048: short prompts common, long ones present), output lengths uniform in
--output-lengths, token ids uniform over the vocabulary; every system gets the same requests at the same
concurrency. Greedy decoding, no stop ids: every request must generate exactly its max_new_tokens (fewer
counts as an error).

Measured on the client, per concurrency: generated tokens/s over the level's wall time (first request sent
to last token read), TTFT (request sent -> first token read) and inter-token latency (the gaps between
consecutive tokens of one request, pooled over the level's requests) at p50/p99, the request count and the
errors. adafuse-serve is read over HTTP (POST /v1/generate, "stream": true: one {"token": t} line per token);
transformers' ContinuousBatchingManager in process (add_request(streaming=True); a token's time is when the
manager's output queue hands it over), so its numbers carry no HTTP cost.

On the GPU machine (--url not given), into --workdir (default /tmp/serve_load; kept, and reused when present):
the synthetic checkpoint (benchmarks/synthetic_checkpoint.py: --shape llama2-7b, --experts, --rank, pre-gated
with a routing table, --layers decoder layers; its random numbers drawn on the GPU), it and its dense base (the
same checkpoint without adapters: Checkpoint.base_only()) converted with `convert --backend native --dtype bfloat16 --max-batch
--max-seq`, each served by --serve (built by runtime/tools/build_on_gpu.sh), then transformers on the dense
base. Prints a table and writes --out (benchmarks/results/serve_load.json) after each system, so a run cut
short keeps what it measured.

Sizes: the KV cache is max_batch x max_seq slots of 2 x layers x 4096 x 2 bytes (16 layers, 64 x 2176: 36 GB);
--layers 32 (the full 7B) with --max-batch 64 needs 73 GB of cache beside 13.5 GB of weights: an H200, or
--max-batch 32 on an 80 GB H100 (the backend refuses at open, naming the bytes, when it does not fit).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import platform
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
DEFAULT_SERVE = ROOT / "build" / "gpu-native" / "runtime" / "adafuse-serve"
SCHEMA = 1
FIRST_TOKENS = 4  # per request, kept in the JSON to compare the systems' greedy tokens


# ---- the request mix -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


def request_mix(count: int, seed: int, prompt_lengths: tuple[int, int], output_lengths: tuple[int, int],
                vocab: int) -> list[Request]:
    """`count` requests drawn from `seed` alone: the same list for every system."""
    rng = random.Random(seed)
    lo, hi = prompt_lengths
    out = []
    for _ in range(count):
        length = min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        out.append(Request(tuple(rng.randrange(vocab) for _ in range(length)), rng.randint(*output_lengths)))
    return out


# ---- one request's record and the statistics -------------------------------------------------------------

@dataclass
class Record:
    prompt_length: int
    max_new_tokens: int
    sent: float = 0.0  # time.perf_counter() when the request went out
    token_times: list[float] = field(default_factory=list)  # when each token was read
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    index: int = -1  # the request's place in its level's mix

    @property
    def finished(self) -> float:
        return self.token_times[-1] if self.token_times else self.sent


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between the closest ranks (numpy's default);
    None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(s) - 1)
    return s[low] + (s[high] - s[low]) * (pos - low)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def summarize(concurrency: int, records: list[Record], wall_s: float) -> dict[str, Any]:
    """One level's numbers. A request is an error when it failed or generated other than max_new_tokens
    tokens; throughput counts the tokens of every request, TTFT and inter-token gaps those of good ones."""
    errors = [r for r in records if r.error is not None or len(r.tokens) != r.max_new_tokens]
    good = [r for r in records if r not in errors]
    ttft = [r.token_times[0] - r.sent for r in good]
    gaps = [b - a for r in good for a, b in zip(r.token_times, r.token_times[1:])]
    latency = [r.finished - r.sent for r in good]
    generated = sum(len(r.tokens) for r in records)
    by_index = {r.index: r for r in good if r.index >= 0}
    samples = sorted({r.error or f"{len(r.tokens)} tokens, expected {r.max_new_tokens}" for r in errors})[:5]
    return {
        "concurrency": concurrency, "requests": len(records), "completed": len(good), "errors": len(errors),
        "error_samples": samples, "generated_tokens": generated, "wall_s": round(wall_s, 3),
        "throughput_tok_s": round(generated / wall_s, 2) if wall_s > 0 else None,
        "ttft_ms": {"p50": _ms(percentile(ttft, 50)), "p99": _ms(percentile(ttft, 99))},
        "itl_ms": {"p50": _ms(percentile(gaps, 50)), "p99": _ms(percentile(gaps, 99))},
        "latency_ms": {"p50": _ms(percentile(latency, 50)), "p99": _ms(percentile(latency, 99))},
        "prompt_tokens": sum(r.prompt_length for r in records),
        # the first tokens of each request by its place in the mix (null: not sent or failed), to compare systems
        "first_tokens": [by_index[i].tokens[:FIRST_TOKENS] if i in by_index else None
                         for i in range(max(by_index, default=-1) + 1)],
    }


# ---- the closed-loop driver ------------------------------------------------------------------------------

def run_level(send: Callable[[Request], Record], requests: list[Request], concurrency: int,
              max_seconds: float) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the last one ended, until `requests` are
    sent or `max_seconds` passed; the ones in flight then finish and count."""
    records: list[Record] = []
    lock = threading.Lock()
    pending = iter(enumerate(requests))
    start = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                item = next(pending, None) if time.perf_counter() - start < max_seconds else None
            if item is None:
                return
            index, req = item
            try:
                record = send(req)
            except Exception as e:  # a client-side failure is the request's error, never the run's end
                record = Record(len(req.prompt_ids), req.max_new_tokens, time.perf_counter(),
                                error=f"{type(e).__name__}: {e}")
            record.index = index
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max((r.finished for r in records), default=start)
    return summarize(concurrency, records, end - start)


# ---- adafuse-serve over HTTP -----------------------------------------------------------------------------

class ServeClient:
    """POST /v1/generate with "stream": true, read line by line as the tokens arrive."""

    def __init__(self, url: str, timeout: float = 600.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: expected http://HOST:PORT")
        self.url, self.host, self.port, self.timeout = url.rstrip("/"), parts.hostname, parts.port or 80, timeout

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=30) as r:
            return json.loads(r.read())

    def generate(self, req: Request) -> Record:
        record = Record(len(req.prompt_ids), req.max_new_tokens)
        body = json.dumps({"prompt_ids": list(req.prompt_ids), "max_new_tokens": req.max_new_tokens, "stream": True})
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            record.sent = time.perf_counter()
            conn.request("POST", "/v1/generate", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace').strip()}"
                return record
            result = None
            while line := resp.readline():
                now = time.perf_counter()
                item = json.loads(line)
                if "token" in item:
                    record.token_times.append(now)
                    record.tokens.append(int(item["token"]))
                elif "error" in item:
                    record.error = f"engine error mid-stream: {item['error']}"
                else:
                    result = item
            if record.error is None:
                if result is None:
                    record.error = "the stream ended without its result line"
                elif result.get("tokens") != record.tokens:
                    record.error = "the result line's tokens differ from the streamed ones"
            return record
        finally:
            conn.close()


def start_server(serve: Path, artifact: Path, log: Path, args: list[str], timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """adafuse-serve on a free port; returns (process, url) once it listens, or raises with its last stderr line."""
    err = open(log, "w")
    proc = subprocess.Popen([str(serve), "--engine", str(artifact), "--host", "127.0.0.1", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline() if proc.stdout else ""), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        line = ""
    if not line.startswith("listening on http://"):
        stop_server(proc)
        said = [s for s in log.read_text(errors="replace").splitlines() if s.strip()]
        raise RuntimeError(said[-1] if said else f"{serve} did not start within {timeout:.0f}s (exit {proc.returncode})")
    return proc, line.split()[-1]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- transformers' continuous batching (lazy: the GPU machine only) ---------------------------------------

class TransformersCB:
    """model.init_continuous_batching() (transformers >= 4.56; the same calls in 5.17 and 5.24): requests added
    with streaming=True, one reader thread handing each request's outputs to the client waiting on it."""

    def __init__(self, model_dir: Path, device: str, max_new_tokens: int, dtype: str = "bfloat16",
                 cb_config: dict[str, Any] | None = None):
        """cb_config: ContinuousBatchingConfig fields (None: transformers' defaults, sized from the free memory)."""
        import torch
        from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype), attn_implementation="sdpa",
                                                          device_map=device)
        # eos -1: no stop token (the synthetic config's eos 2 would end random requests early)
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        self.manager = self.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=None if cb_config is None else ContinuousBatchingConfig(**cb_config))
        # its own warm-up (CUDA graphs at the largest sizes), as generate_batch does; timed apart from the load
        t = time.perf_counter()
        self.manager.warmup()
        self.warmup_s = round(time.perf_counter() - t, 1)
        self.waiting: dict[str, queue.Queue] = {}
        self.lock = threading.Lock()
        self.count = 0
        self.running = True
        self.failed: str | None = None  # set when the generation thread ended: every waiting client is told
        self.manager.start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while self.running:
            out = self.manager.get_result(timeout=0.05)
            if out is None:
                if not self.manager.is_running() and self.failed is None:
                    self.failed = "transformers' generation thread ended (see its log above)"
                    with self.lock:
                        for events in self.waiting.values():
                            events.put((time.perf_counter(), None, True, self.failed))
                if self.failed:
                    time.sleep(0.05)
                continue
            now = time.perf_counter()
            with self.lock:
                waiting = self.waiting.get(out.request_id)
            if waiting is not None:
                waiting.put((now, list(out.generated_tokens), out.is_finished(), out.error))

    def generate(self, req: Request) -> Record:
        record = Record(len(req.prompt_ids), req.max_new_tokens)
        events: queue.Queue = queue.Queue()
        with self.lock:
            self.count += 1
            rid = f"load-{self.count}"
            self.waiting[rid] = events
        try:
            record.sent = time.perf_counter()
            if self.failed:
                record.error = self.failed
                return record
            if self.manager.add_request(list(req.prompt_ids), request_id=rid, max_new_tokens=req.max_new_tokens,
                                        streaming=True) is None:
                record.error = "transformers refused the request (add_request returned None)"
                return record
            while True:
                try:
                    now, tokens, finished, error = events.get(timeout=300)
                except queue.Empty:
                    record.error = "no output for 300 s"
                    return record
                if tokens is not None:
                    record.token_times += [now] * (len(tokens) - len(record.tokens))
                    record.tokens = tokens
                if error:
                    record.error = str(error)
                if finished:
                    return record
        finally:
            with self.lock:
                del self.waiting[rid]

    def close(self) -> None:
        self.running = False
        self.reader.join()
        self.manager.stop(block=True, timeout=60)


# ---- the GPU run: models, servers, levels ----------------------------------------------------------------

def prepare(args: argparse.Namespace, timings: dict[str, float], log: Callable[[str], None]) -> dict[str, Path]:
    """The checkpoint, its dense base and their native artifacts under --workdir, each made only when absent."""
    from synthetic_checkpoint import write_synthetic

    from adafuse_export import native_artifact
    from adafuse_export.converters import load_checkpoint
    from adafuse_export.convert import convert_native

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.shape}-L{args.layers}-E{args.experts}-R{args.rank}"
    paths = {"moe": args.ckpt or work / f"ckpt-{tag}"}
    paths["moe_native"] = work / f"moe-{tag}-B{args.max_batch}-S{args.max_seq}.native"
    paths["dense_native"] = work / f"dense-{tag}-B{args.max_batch}-S{args.max_seq}.native"

    def step(name: str, done: Path, make: Callable[[], object]) -> None:
        if done.exists():
            log(f"reusing {done.parent}")
            return
        t = time.perf_counter()
        make()
        timings[name] = round(time.perf_counter() - t, 1)
        log(f"{name}: {timings[name]} s")

    def write_checkpoint() -> None:
        cuda = _cuda()
        write_synthetic(paths["moe"], args.shape, args.experts, args.rank, layers=args.layers, log=log,
                        device="cuda" if cuda else "cpu")
        if cuda:  # the servers get the device memory the random numbers held
            import torch

            torch.cuda.empty_cache()

    step("write_checkpoint", paths["moe"] / "adafuse_config.json", write_checkpoint)

    def convert_moe() -> None:
        convert_native(paths["moe"], paths["moe_native"], fmt=None, base=None, dtype="bfloat16", max_batch=args.max_batch,
                       max_seq=args.max_seq, force=True, plugin_library=None, timing_cache=None, strategy=None, log=log)

    def convert_dense() -> None:  # the same checkpoint's base without adapters (routing 'none'), placed when whole
        partial = paths["dense_native"].with_name(paths["dense_native"].name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        native_artifact.write_artifact(load_checkpoint(paths["moe"]).base_only(), partial, "bfloat16",
                                       max_batch=args.max_batch, max_seq=args.max_seq)
        shutil.rmtree(paths["dense_native"], ignore_errors=True)
        partial.rename(paths["dense_native"])

    step("convert_moe", paths["moe_native"] / "manifest.json", convert_moe)
    step("convert_dense", paths["dense_native"] / "manifest.json", convert_dense)
    return paths


def drive(name: str, send: Callable[[Request], Record], args: argparse.Namespace, log: Callable[[str], None]) -> list[dict]:
    """A warm-up at the highest concurrency (short requests: CUDA graphs of many row counts, first allocations),
    then every level with its own request mix."""
    top = max(args.concurrency)
    warm = request_mix(top, args.seed + 999, (args.prompt_lengths[0],) * 2, (8, 8), args.vocab)
    t = time.perf_counter()
    run_level(send, warm, top, args.level_seconds)
    log(f"{name}: warm-up {time.perf_counter() - t:.1f} s")
    levels = []
    for c in args.concurrency:
        n = args.requests or max(8, 2 * c)
        level = run_level(send, request_mix(n, args.seed + c, args.prompt_lengths, args.output_lengths, args.vocab), c,
                          args.level_seconds)
        log(row(level, name))
        levels.append(level)
    return levels


def adafuse_system(name: str, artifact: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    system: dict[str, Any] = {"name": name, "engine": "adafuse-serve", "artifact": str(artifact)}
    t = time.perf_counter()
    serve_args = ["--queue", str(max(64, 2 * max(args.concurrency)))]  # every client's request waits, none gets 503
    if args.no_cuda_graphs:
        serve_args.append("--no-cuda-graphs")
    if args.step_tokens:
        serve_args += ["--step-tokens", str(args.step_tokens)]
    system["serve_args"] = serve_args
    log_file = args.workdir / f"{name}.serve.log"
    try:
        proc, url = start_server(args.serve, artifact, log_file, serve_args)
    except (RuntimeError, OSError) as e:
        system["skipped"] = f"adafuse-serve did not start: {e}"
        log(f"{name}: {system['skipped']}")
        return system
    try:
        system["open_s"] = round(time.perf_counter() - t, 1)
        client = ServeClient(url)
        system["health"] = client.health()
        log(f"{name}: listening on {url} after {system['open_s']} s: {system['health']}")
        system["levels"] = drive(name, client.generate, args, log)
    finally:
        stop_server(proc)
        if proc.returncode not in (0, -15) or any(level["errors"] for level in system.get("levels", [])):
            system["serve_log_tail"] = log_file.read_text(errors="replace").splitlines()[-5:]
    return system


def transformers_system(model_dir: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    system: dict[str, Any] = {"name": "transformers-cb-dense", "engine": "transformers continuous batching",
                              "model": str(model_dir)}
    try:
        import transformers

        system["transformers"] = transformers.__version__
        t = time.perf_counter()
        cb = TransformersCB(model_dir, "cuda", args.output_lengths[1])
        system["open_s"] = round(time.perf_counter() - t, 1)
        system["attn_implementation"] = cb.model.config._attn_implementation
        system["warmup_s"] = cb.warmup_s
        system["client"] = "in process (no HTTP)"
    except Exception as e:  # not installed, no GPU, an API this script does not know: said, and the others stand
        system["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"transformers: {system['skipped']}")
        return system
    try:
        log(f"transformers {system['transformers']}: loaded in {system['open_s']} s ({system['attn_implementation']})")
        system["levels"] = drive(system["name"], cb.generate, args, log)
    finally:
        cb.close()
    return system


# ---- the report ------------------------------------------------------------------------------------------

HEADER = (f"{'system':<24} {'conc':>4} {'reqs':>5} {'err':>4} {'tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}  (ms)")


def row(level: dict[str, Any], name: str = "") -> str:
    def f(x: float | None, w: int) -> str:
        return f"{'-':>{w}}" if x is None else f"{x:>{w}.1f}"
    return (f"{name:<24} {level['concurrency']:>4} {level['requests']:>5} {level['errors']:>4} "
            f"{f(level['throughput_tok_s'], 9)} {f(level['ttft_ms']['p50'], 9)} {f(level['ttft_ms']['p99'], 9)} "
            f"{f(level['itl_ms']['p50'], 8)} {f(level['itl_ms']['p99'], 8)}")


def table(systems: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for s in systems:
        if "skipped" in s:
            lines.append(f"{s['name']:<24} skipped: {s['skipped']}")
        for level in s.get("levels", []):
            lines.append(row(level, s["name"]))
    return "\n".join(lines)


def agreement(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level both systems ran: of the requests both completed, how many had the same first greedy token and
    the same first FIRST_TOKENS (the same weights in bfloat16 on different kernels: near ties may flip)."""
    out = []
    for la, lb in zip(a.get("levels", []), b.get("levels", [])):
        pairs = [(x, y) for x, y in zip(la["first_tokens"], lb["first_tokens"]) if x is not None and y is not None]
        out.append({"concurrency": la["concurrency"], "compared": len(pairs),
                    "first_token_equal": sum(x[:1] == y[:1] for x, y in pairs),
                    f"first_{FIRST_TOKENS}_equal": sum(x == y for x, y in pairs)})
    return out


def write_json(path: Path, config: dict, prep: dict, systems: list[dict], agreement: list | None = None) -> None:
    """The report, replaced whole (written beside, then renamed): a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"benchmark": "serve_load", "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "config": config, "prep_s": prep, "systems": systems,
                               "agreement_adafuse_dense_vs_transformers": agreement}, indent=1) + "\n")
    tmp.replace(path)


def _pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW..HIGH (integers), found '{text}'") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, found '{text}'")
    return a, b


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected concurrencies like 1,4,16,64, found '{text}'") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be positive, found '{text}'")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="drive this running adafuse-serve only (no models, no transformers)")
    ap.add_argument("--label", default="adafuse-serve", help="the system's name with --url [%(default)s]")
    ap.add_argument("--concurrency", type=_levels, default=[1, 4, 16, 64], help="levels [1,4,16,64]")
    ap.add_argument("--requests", type=int, default=0, help="requests per level [max(8, 2 x concurrency)]")
    ap.add_argument("--level-seconds", type=float, default=15.0, help="stop sending new requests after this [%(default)s]")
    ap.add_argument("--prompt-lengths", type=_pair, default=(16, 2048), help="LOW..HIGH, log-uniform [16..2048]")
    ap.add_argument("--output-lengths", type=_pair, default=(16, 128), help="LOW..HIGH, uniform [16..128]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=0, help="token ids below this [the model's]")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    gpu = ap.add_argument_group("the GPU run (without --url)")
    gpu.add_argument("--workdir", type=Path, default=Path("/tmp/serve_load"), help="checkpoints and artifacts [%(default)s]")
    gpu.add_argument("--ckpt", type=Path, default=None, help="an existing synthetic MoE checkpoint to use")
    gpu.add_argument("--serve", type=Path, default=DEFAULT_SERVE, help="adafuse-serve [build/gpu-native/runtime/adafuse-serve]")
    gpu.add_argument("--shape", default="llama2-7b")
    gpu.add_argument("--layers", type=int, default=None,
                     help="decoder layers [16 for llama2-7b (which has 32), else the shape's]")
    gpu.add_argument("--experts", type=int, default=8)
    gpu.add_argument("--rank", type=int, default=16)
    gpu.add_argument("--max-batch", type=int, default=64, help="the artifacts' --max-batch (KV slots) [%(default)s]")
    gpu.add_argument("--max-seq", type=int, default=0, help="the artifacts' --max-seq [longest prompt + longest output]")
    gpu.add_argument("--step-tokens", type=int, default=0, help="adafuse-serve --step-tokens [its default]")
    gpu.add_argument("--no-cuda-graphs", action="store_true", help="adafuse-serve --no-cuda-graphs")
    gpu.add_argument("--systems", default="moe,dense,transformers", help="which to run [%(default)s]")
    args = ap.parse_args(argv)
    args.max_seq = args.max_seq or args.prompt_lengths[1] + args.output_lengths[1]
    started = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {text}", flush=True)

    config: dict[str, Any] = {
        "load": "closed-loop", "concurrency": args.concurrency, "requests_per_level": args.requests or "max(8, 2 x concurrency)",
        "level_seconds": args.level_seconds, "prompt_lengths": list(args.prompt_lengths), "prompt_distribution": "log-uniform",
        "output_lengths": list(args.output_lengths), "output_distribution": "uniform", "seed": args.seed,
        "sampling": "greedy, no stop ids", "host": platform.node(), "python": platform.python_version()}
    prep: dict[str, float] = {}
    systems: list[dict[str, Any]] = []
    agreed: list | None = None
    if args.url:
        try:
            client = ServeClient(args.url)
        except ValueError as e:
            ap.error(f"--url {e}")
        try:
            health = client.health()
        except (OSError, ValueError) as e:
            ap.error(f"--url {args.url}: GET /health failed: {e}")
        args.vocab = args.vocab or int(health["vocab"])
        config.update(vocab=args.vocab, health=health)
        systems.append({"name": args.label, "engine": "adafuse-serve", "url": args.url, "health": health,
                        "levels": drive(args.label, client.generate, args, log)})
    else:
        wanted = set(args.systems.split(","))
        if unknown := wanted - {"moe", "dense", "transformers"}:
            ap.error(f"--systems: unknown {', '.join(sorted(unknown))} (expected moe, dense, transformers)")
        if {"moe", "dense"} & wanted and not args.serve.is_file():
            ap.error(f"--serve {args.serve}: not found (build it with runtime/tools/build_on_gpu.sh)")
        sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # adafuse_export and synthetic_checkpoint
        from synthetic_checkpoint import SHAPES

        if args.shape not in SHAPES:
            ap.error(f"--shape {args.shape}: expected one of {', '.join(sorted(SHAPES))}")
        args.vocab = args.vocab or SHAPES[args.shape]["vocab_size"]
        args.layers = args.layers or (16 if args.shape == "llama2-7b" else SHAPES[args.shape]["num_hidden_layers"])
        config.update(vocab=args.vocab, model={"shape": args.shape, "layers": args.layers,
                                               "shape_layers": SHAPES[args.shape]["num_hidden_layers"], "experts": args.experts,
                                               "rank": args.rank, "routing": "pregate (routing table)", "dtype": "bfloat16",
                                               "max_batch": args.max_batch, "max_seq": args.max_seq},
                      gpu=_gpu_name())
        if args.ckpt is not None and not (args.ckpt / "model.safetensors.index.json").is_file():
            ap.error(f"--ckpt {args.ckpt}: not a synthetic checkpoint (no model.safetensors.index.json; "
                     "benchmarks/synthetic_checkpoint.py writes one)")
        from adafuse_export.errors import AdafuseError

        try:
            paths = prepare(args, prep, log)
        except (AdafuseError, OSError) as e:  # a limit the model refuses (--max-seq), a full disk: one line
            print(f"serve_load.py: preparing the models in {args.workdir}: {e}", file=sys.stderr)
            return 2
        for model in ("moe", "dense"):
            if model in wanted:
                systems.append(adafuse_system(f"adafuse-{model}", paths[f"{model}_native"], args, log))
                write_json(args.out, config, prep, systems)
        if "transformers" in wanted:
            systems.append(transformers_system(paths["moe"], args, log))  # its base: transformers reads no adapter file
        named = {s["name"]: s for s in systems}
        if "adafuse-dense" in named and "transformers-cb-dense" in named:
            agreed = agreement(named["adafuse-dense"], named["transformers-cb-dense"])
            log(f"greedy tokens, adafuse-dense vs transformers: {agreed}")
    write_json(args.out, config, prep, systems, agreed)
    print(table(systems))
    log(f"wrote {args.out}")
    bad = any("skipped" in s or any(level["errors"] for level in s.get("levels", [])) for s in systems)
    return 1 if bad else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
