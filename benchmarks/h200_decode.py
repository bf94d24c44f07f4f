"""Whole-model decode on the GPU through the one GPU decode path: the C++ runtime's native backend over its C API
(adafuse_export/runners/cpp_runtime.py, Engine), on the Llama-2-7B shape in bfloat16 with 8 experts top-2 of rank 16
(random weights; a pre-gate with its routing table).

  ADAFUSE_RUNTIME_LIB=<runtime/tools/build_on_gpu.sh's output> PYTHONPATH=. python3 benchmarks/h200_decode.py --out $OUT

1. correctness: every example kind (llama) and every family and scaled RoPE (tests/family_decode_cases.py), converted
   to float32 native artifacts and opened with each strategy they allow: greedy tokens, prefill logits and expert
   ids against the CPU reference.
2. decode: ms per adafuse_decode call (the step's logits on the host when it returns) at batch 1, 8, 32, 64 with
   strategy fused and at batch 1 with switch (the route changing every step, and unchanged), context 512; tokens/s,
   the weight-read floor (the backbone's bytes over the device's copy bandwidth), and the dense base (same backbone,
   no adapters, same backend) at the same batches with each row's ratio to it; the same model with FP8 e4m3 base
   weights (`--weights fp8`, fused) at the same batches (issue 23's whole-step FP8 row: its x_dense is the ratio to
   the bf16 dense step), with its greedy agreement: the FP8 artifact's greedy tokens against the bf16 artifact's on
   held prompts (`fp8_agreement`); a second artifact of rank 64 (`fused-r64`, fused) at batch 8 against its bytes
   floor (add_bytes_floor).
3. host overhead of the C API: adafuse_decode's wall time minus the GPU time of the same call (CUDA events the
   runtime records around the step's work, adafuse_last_step_gpu_time), batch 1, per call, median.
4. prefill: the time to first token of a 512-token prompt (adafuse_step, the last position's logits on the host)
   against transformers' SDPA prefill of the same shape (LlamaForCausalLM, bf16, the last position's logits).

The GEMMs of more than 16 rows (batches 32 and 64, the prefill) run through cuBLASLt where it loads; run again with
ADAFUSE_NATIVE_GEMM=kernels (and another --out) for the kernel library's GEMMs: the JSON records which ("native_gemm").

Prints a table and writes OUT/native_backend.json (benchmarks/decode_targets.py judges issue 23's targets from it).
Defaults fit one device call of < 8 minutes; --quick (8 layers of the 7B width, batches 1 and 8) fits one of about 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from adafuse_export import native_artifact as native  # noqa: E402
from adafuse_export.checkpoint import Checkpoint  # noqa: E402
from adafuse_export.errors import AdafuseError  # noqa: E402
from adafuse_export.examples import KINDS, make_example  # noqa: E402
from adafuse_export.runners.cpp_runtime import Engine, load_library, open_native  # noqa: E402
from adafuse_export.tensors import LazySource, TensorInfo  # noqa: E402
from adafuse_export.trt.manifest import write_manifest  # noqa: E402

EXPERTS, TOP_K, RANK = 8, 2, 16
WIDE_RANK = 64  # the second artifact's rank (issue 23's batch-8 r64 row)
HELD_PROMPTS, HELD_PROMPT_TOKENS, HELD_NEW_TOKENS = 4, 16, 24  # FP8 greedy agreement
WEIGHTS_DEVICE = "cuda"  # where the random weights are drawn (tests/test_benchmarks_native.py: cpu)


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------- 1. correctness on the tiny examples
def check_correctness(root: Path, quick: bool) -> list[dict]:
    from family_decode_cases import against_reference, attention_head_dim, cases, convert, strategies

    runs: list[tuple[str, str, dict | None, str]] = [(kind, "llama", None, kind) for kind in KINDS]
    if not quick:
        runs += [(name, family, attention_head_dim(config), "pregate") for name, family, config in
                 (p.values for p in cases())]
    rows = []
    for name, family, config, kind in runs:
        make_example(root / name, kind, family, config=config)
        for strategy in strategies(kind):
            art = convert(root / name, root / f"{name}-{strategy}.native", max_batch=1 if strategy == "switch" else 4)
            try:
                r = against_reference(root / name, art, strategy)
            except Exception as e:  # a refusal or failure is a row, not the end of the benchmark
                r = {"passed": False, "error": f"{type(e).__name__}: {e}"}
            rows.append({"case": name, "kind": kind, "family": family, "strategy": strategy, **r})
            log(f"correctness {name:<20} {kind:<12} {strategy:<7} {'PASS' if r['passed'] else 'FAIL ' + str(r)}")
    return rows


# ---------------------------------------------------------------- the 7B-shape artifact
def synthetic_checkpoint(layers: int, rank: int = RANK) -> Checkpoint:
    """The Llama-2-7B shape (benchmarks/synthetic_checkpoint.py) with random bf16 weights made on the GPU, one
    tensor at a time when the artifact writer asks for it (the same values every time: seeded by name)."""
    from synthetic_checkpoint import specs

    cfg, spec, adapter = specs("llama2-7b", EXPERTS, rank, TOP_K, layers)
    stub = Checkpoint(Path("synthetic-7b"), "adafuse", cfg, spec, adapter, LazySource({}), LazySource({}))

    def producer(name: str, shape: tuple[int, ...], std: float, offset: float = 0.0):
        def make():
            g = torch.Generator(device=WEIGHTS_DEVICE).manual_seed(zlib.crc32(name.encode()))
            t = torch.randn(shape, device=WEIGHTS_DEVICE, generator=g) * std + offset
            return t.to(torch.bfloat16).cpu()
        return make

    def source(shapes: dict, std_of) -> LazySource:
        return LazySource({n: (TensorInfo(n, tuple(s), "BF16", "synthetic"), producer(n, tuple(s), *std_of(n)))
                           for n, s in shapes.items()})

    base = source(spec.hf_weight_shapes(), lambda n: (0.05, 1.0) if n.endswith("norm.weight") else (0.02,))
    adapters = source({n: s for n, (s, _) in stub.expected_adapter_shapes().items()},
                      lambda n: (1.0,) if n.startswith("pregate") else (0.02,))
    return Checkpoint(Path("synthetic-7b"), "adafuse", cfg, spec, adapter, base, adapters)


def write_artifacts(ckpt: Checkpoint, root: Path, max_batch: int, max_seq: int) -> tuple[Path, Path]:
    """(fused artifact of max_batch slots, switch artifact of one): the second shares the first's files (hard links)
    under its own manifest."""
    fused, switch = root / "fused.native", root / "switch.native"
    fused.mkdir()
    t = time.time()
    manifest = native.write_artifact(ckpt, fused, "bfloat16", max_batch=max_batch, max_seq=max_seq)
    switch.mkdir()
    for name in manifest["files"]:
        os.link(fused / name, switch / name)
    write_manifest(native.manifest(ckpt, "bfloat16", manifest["files"], 1, max_seq), switch / native.MANIFEST)
    size = sum((fused / n).stat().st_size for n in manifest["files"])
    log(f"7B-shape artifact ({ckpt.model.num_layers} layers): {size / 1e9:.1f} GB written in {time.time() - t:.0f} s")
    return fused, switch


def weight_read_bytes(art: Path, ckpt: Checkpoint) -> int:
    """Bytes one decode step reads at least: the backbone but the embedding (gathered row by row)."""
    m = ckpt.model
    return (art / native.WEIGHTS).stat().st_size - m.vocab_size * m.hidden_size * 2


def adapter_bytes_per_expert(ckpt: Checkpoint, element_bytes: int = 2) -> int:
    """Bytes of one expert's A and B over every routed stage, as the artifact stores them (native_artifact.stages):
    a grouped stage (q/k/v, gate/up stacked) holds A [rank_sum, in] and a block-diagonal B [out, rank_sum] whose zero
    blocks the kernels read too, so its bytes are rank_sum * (in + out); a per-module site rank * (in + its rows)."""
    total = 0
    for st in native.stages(ckpt):
        if st.adapter == "grouped":
            total += sum(x.rank for x in st.routed) * (st.in_features + st.out_features)
        elif st.adapter == "per_module":
            total += sum(x.rank * (st.in_features + x.rows[1] - x.rows[0]) for x in st.routed)
    return total * element_bytes


def experts_per_step(expert_ids: np.ndarray, feed: list[int], batch: int, steps: int, warmup: int = 3) -> float:
    """Mean count of distinct experts the timed decode steps route to (decode_walls' feed: row r of step k takes
    feed[(k * batch + r) % len(feed)]; expert_ids: the routing table, one route of top_k experts per token id, the
    same in every layer). Uniform routes would give E * (1 - (1 - top_k / E) ** batch): 7.2 of 8 at batch 8, top-2."""
    counts = [len({int(e) for r in range(batch) for e in expert_ids[feed[(k * batch + r) % len(feed)]]})
              for k in range(warmup, warmup + steps)]
    return float(np.mean(counts))


def add_bytes_floor(row: dict, art: Path, ckpt: Checkpoint, feed: list[int], steps: int, bandwidth: float) -> None:
    """A routed row's bytes_read: what a decode step of row["batch"] rows must read, the backbone's bytes
    (weight_read_bytes) plus the A and B of every expert its rows route to (experts_per_step x
    adapter_bytes_per_expert); and bytes_floor_ms = (W + experts x (A + B per expert)) / copy bandwidth. The KV cache
    and activations are left out."""
    from safetensors.numpy import load_file

    experts = experts_per_step(load_file(str(art / native.ROUTES))["expert_ids"], feed, row["batch"], steps)
    per_expert = adapter_bytes_per_expert(ckpt)
    weights, adapters = weight_read_bytes(art, ckpt), experts * per_expert
    row["bytes_read"] = {"weights": weights, "experts_per_step": experts, "adapter_bytes_per_expert": per_expert,
                         "adapters": adapters}
    row["bytes_floor_ms"] = (weights + adapters) / bandwidth * 1e3


def copy_bandwidth() -> float:
    n = 2 * 1024**3
    x = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    del x, y
    return 2 * n * 10 / (time.perf_counter() - t)  # bytes read + written per second


def routed_tokens(art: Path, n: int, vocab: int) -> list[int]:
    """n token ids whose consecutive routes differ (the routing table's): every step switches experts."""
    from safetensors.numpy import load_file

    ids = load_file(str(art / native.ROUTES))["expert_ids"]
    gen = np.random.default_rng(5)
    out = [int(gen.integers(vocab))]
    while len(out) < n:
        t = int(gen.integers(vocab))
        if not np.array_equal(ids[t], ids[out[-1]]):
            out.append(t)
    return out


def held_prompts(vocab: int) -> list[list[int]]:
    """The fixed prompts of the FP8 greedy agreement (the same every run)."""
    return np.random.default_rng(21).integers(0, vocab, (HELD_PROMPTS, HELD_PROMPT_TOKENS)).tolist()


def greedy_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [engine.generate(p, HELD_NEW_TOKENS)[0] for p in prompts]


def forced_picks(engine: Engine, prompts: list[list[int]], reference: list[list[int]]) -> list[list[int]]:
    """The engine's greedy pick at each position of the reference's continuation, given the reference's prefix
    (one prefill of prompt + reference[:-1]): agreement without the cascade of a first different token."""
    picks = []
    for p, ref in zip(prompts, reference):
        logits = engine.prefill(np.asarray([p + ref[:-1]]))[0][0]
        picks.append(logits[len(p) - 1:].argmax(-1).astype(int).tolist())
    return picks


def agreement_figures(reference: list[list[int]], free: list[list[int]], forced: list[list[int]]) -> dict:
    """reference: the bf16 artifact's greedy tokens per prompt; free: the other artifact's own greedy tokens; forced:
    its picks on the reference's prefixes (forced_picks). agreement: the fraction of forced picks equal to the
    reference; free_running: the fraction of positions where the free tokens equal it; first_divergence: per prompt,
    the first position where they differ (the length when none)."""
    if not (len(reference) == len(free) == len(forced)) or any(
            not (len(r) == len(f) == len(g)) for r, f, g in zip(reference, free, forced)):
        raise ValueError("reference, free and forced tokens must have the same prompts and lengths")
    n = sum(len(r) for r in reference)
    return {"agreement": sum(a == b for r, g in zip(reference, forced) for a, b in zip(r, g)) / n,
            "free_running": sum(a == b for r, f in zip(reference, free) for a, b in zip(r, f)) / n,
            "first_divergence": [next((i for i, (a, b) in enumerate(zip(r, f)) if a != b), len(r))
                                 for r, f in zip(reference, free)],
            "prompts": len(reference), "new_tokens": len(reference[0]) if reference else 0}


# ---------------------------------------------------------------- 2, 3. decode steps
def decode_walls(engine: Engine, batch: int, ctx: int, feed: list[int], steps: int, warmup: int = 3,
                 gpu: list[float] | None = None) -> list[float]:
    """ms of each adafuse_decode call after a prefill of `ctx` tokens per row; row r of step k takes
    feed[(k * batch + r) % len(feed)]. gpu: receives each call's GPU time (adafuse_last_step_gpu_time)."""
    prompt = np.random.default_rng(3).integers(0, engine.vocab, (batch, ctx))
    engine.prefill(prompt)
    out = np.empty((batch, engine.vocab), np.float32)
    times = []
    for k in range(warmup + steps):
        ids = np.array([feed[(k * batch + r) % len(feed)] for r in range(batch)], np.int64)
        t = time.perf_counter()
        engine.decode(ids, out)
        if k >= warmup:  # the first steps capture the CUDA graph of this row count
            times.append((time.perf_counter() - t) * 1e3)
            if gpu is not None:
                gpu.append(engine.last_step_gpu_ms())
    return times


def host_overhead(engine: Engine, ctx: int, feed: list[int], steps: int) -> dict:
    """Batch 1: adafuse_decode's wall time and the GPU time of the same call, from CUDA events the runtime records
    around the step's work on its stream (its first upload to its last download): the difference is what the
    host adds (argument checks, input packing, the graph launch, the wait's wake-up, the return)."""
    gpu: list[float] = []
    walls = decode_walls(engine, 1, ctx, feed, steps, gpu=gpu)
    over = [w - g for w, g in zip(walls, gpu)]
    return {"wall_ms": statistics.median(walls), "gpu_ms": statistics.median(gpu),
            "host_overhead_ms": statistics.median(over), "steps": steps, "method": "wall - CUDA events of the same call"}


def bench_decode(fused: Path, switch: Path, ckpt: Checkpoint, batches: list[int], ctx: int, steps: int,
                 results: dict, greedy_reference: bool = False) -> dict | None:
    """The fused and switch rows; with greedy_reference, the bf16 fused artifact's greedy tokens on held_prompts and
    the fraction of them its own prefill picks on their prefixes (forced_picks: the prefill's GEMMs against the decode
    steps' GEMVs, the ceiling of another artifact's forced agreement), returned for the FP8 artifact's agreement."""
    bw = copy_bandwidth()
    reference = None
    floor = weight_read_bytes(fused, ckpt) / bw * 1e3
    results["copy_bandwidth_GBps"] = bw / 1e9
    vocab = ckpt.model.vocab_size
    feed = routed_tokens(fused, (steps + 8) * max(batches), vocab)
    for strategy, art, rows in (("fused", fused, [(b, "route changes") for b in batches]),
                                ("switch", switch, [(1, "route changes"), (1, "route unchanged")])):
        t = time.time()
        with open_native(art, strategy) as engine:
            log(f"opened {art.name} ({strategy}) in {time.time() - t:.0f} s")
            for batch, routes in rows:
                ms = statistics.median(decode_walls(engine, batch, ctx, feed if routes == "route changes" else feed[:1],
                                                    steps))
                row = {"strategy": strategy, "batch": batch, "ctx": ctx, "routes": routes, "ms_per_step": ms,
                       "tokens_per_s": batch / ms * 1e3, "weight_read_floor_ms": floor, "x_floor": ms / floor}
                if strategy == "fused":
                    add_bytes_floor(row, art, ckpt, feed, steps, bw)
                results["decode"].append(row)
                log(f"decode {strategy:<6} b={batch:<2} ctx={ctx} {routes:<15} {ms:8.2f} ms/step "
                    f"{row['tokens_per_s']:8.0f} tok/s  (floor {floor:.2f} ms)")
            try:
                results["host_overhead"].append({"strategy": strategy, "batch": 1, "ctx": ctx,
                                                 **host_overhead(engine, ctx, feed, min(steps, 16))})
                h = results["host_overhead"][-1]
                log(f"host overhead {strategy}: adafuse_decode {h['wall_ms']:.3f} ms, GPU {h['gpu_ms']:.3f} ms, "
                    f"overhead {h['host_overhead_ms']:.3f} ms")
            except Exception as e:  # reported, not hidden
                results["host_overhead"].append({"strategy": strategy, "error": f"{type(e).__name__}: {e}"})
                log(f"host overhead {strategy} failed: {type(e).__name__}: {e}")
            if strategy == "fused":
                results["prefill"].append(native_ttft(engine, ctx))
                if greedy_reference:
                    try:
                        prompts = held_prompts(vocab)
                        tokens = greedy_tokens(engine, prompts)
                        forced = forced_picks(engine, prompts, tokens)
                        reference = {"tokens": tokens,
                                     "forced_self": agreement_figures(tokens, tokens, forced)["agreement"]}
                    except Exception as e:  # reported, not hidden: the FP8 rows still run
                        results["fp8_agreement"] = {"error": f"bf16 reference: {type(e).__name__}: {e}"}
                        log(f"bf16 greedy reference failed: {type(e).__name__}: {e}")
    return reference


def bench_variant(label: str, source: Checkpoint, work: Path, batches: list[int], ctx: int, steps: int, results: dict,
                  weights: str = "dtype", then: Callable[[Engine], None] | None = None) -> None:
    """Another artifact of the same shape (source: the checkpoint, its base without adapters, or one of another
    rank) through the same backend and kernels, fused, at every batch: rows of strategy `label` (a routed one's with
    its bytes floor, bytes_read). then: called with the open engine after the rows."""
    art = work / f"{label}.native"
    art.mkdir()
    t = time.time()
    native.write_artifact(source, art, "bfloat16", max_batch=max(batches), max_seq=ctx + steps + 16, weights=weights)
    log(f"{label} artifact written in {time.time() - t:.0f} s")
    floor = weight_read_bytes(art, source) / (results["copy_bandwidth_GBps"] * 1e9) * 1e3
    n, vocab = (steps + 8) * max(batches), source.model.vocab_size
    routed = source.adapter.routing != "none"
    feed = routed_tokens(art, n, vocab) if routed else np.random.default_rng(6).integers(0, vocab, n).tolist()
    routes = "route changes" if routed else "no adapters"
    with open_native(art, "fused") as engine:
        for batch in batches:
            ms = statistics.median(decode_walls(engine, batch, ctx, feed, steps))
            row = {"strategy": label, "batch": batch, "ctx": ctx, "routes": routes, "ms_per_step": ms,
                   "tokens_per_s": batch / ms * 1e3, "weight_read_floor_ms": floor, "x_floor": ms / floor}
            if routed:
                add_bytes_floor(row, art, source, feed, steps, results["copy_bandwidth_GBps"] * 1e9)
            results["decode"].append(row)
            bytes_floor = f", bytes floor {row['bytes_floor_ms']:.2f} ms" if routed else ""
            log(f"decode {label:<9} b={batch:<2} ctx={ctx} {routes:<15} {ms:8.2f} ms/step (floor {floor:.2f} ms"
                f"{bytes_floor})")
        if then is not None:
            then(engine)
    shutil.rmtree(art)


def bench_fp8(ckpt: Checkpoint, work: Path, batches: list[int], ctx: int, steps: int, results: dict,
              reference: dict | None) -> None:
    """The same model with FP8 e4m3 base weights (per-output-channel scales; adapters and activations bf16:
    `convert --backend native --weights fp8`), fused, the route changing every step: issue 23's whole-step row,
    whose x_dense is its ratio to the bf16 dense step. reference: bench_decode's greedy reference of the bf16 artifact
    on held_prompts, against which the FP8 artifact's tokens are compared (results["fp8_agreement"],
    agreement_figures)."""
    def agreement(engine: Engine) -> None:
        if reference is None:
            return
        try:
            prompts, tokens = held_prompts(engine.vocab), reference["tokens"]
            a = agreement_figures(tokens, greedy_tokens(engine, prompts), forced_picks(engine, prompts, tokens))
            results["fp8_agreement"] = {**a, "prompt_tokens": HELD_PROMPT_TOKENS,
                                        "bf16_forced_self_agreement": reference["forced_self"]}
            log(f"FP8 greedy agreement with bf16: {a['agreement']:.3f} on the bf16 prefixes (bf16's own prefill: "
                f"{reference['forced_self']:.3f}), {a['free_running']:.3f} free-running (first divergence "
                f"{a['first_divergence']})")
        except Exception as e:  # reported, not hidden
            results["fp8_agreement"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"FP8 greedy agreement failed: {type(e).__name__}: {e}")
    bench_variant("fused-fp8", ckpt, work, batches, ctx, steps, results, weights="fp8", then=agreement)


def bench_wide_rank(layers: int, work: Path, ctx: int, steps: int, results: dict) -> None:
    """A second artifact of rank WIDE_RANK (same backbone, same seeds), fused, a route per row, at batch 8: issue
    23's r64 row, judged against its bytes floor (W plus the A and B of the experts a step reads)."""
    bench_variant(f"fused-r{WIDE_RANK}", synthetic_checkpoint(layers, WIDE_RANK), work, [8], ctx, steps, results)


def bench_dense(ckpt: Checkpoint, work: Path, batches: list[int], ctx: int, steps: int, results: dict) -> None:
    """The same backbone without adapters (routing 'none') through the same backend and kernels: the dense model a
    user would otherwise serve, each batch's ratio against it recorded on the other rows."""
    bench_variant("dense", ckpt.base_only(), work, batches, ctx, steps, results)
    by_batch = {r["batch"]: r["ms_per_step"] for r in results["decode"] if r["strategy"] == "dense"}
    for r in results["decode"]:
        if r["strategy"] != "dense" and r["batch"] in by_batch:
            r["x_dense"] = r["ms_per_step"] / by_batch[r["batch"]]


# ---------------------------------------------------------------- 4. prefill
def native_ttft(engine: Engine, ctx: int, repeats: int = 5) -> dict:
    """A ctx-token prompt in one in-flight step of slot 0, the last position's logits on the host."""
    prompt = np.random.default_rng(9).integers(0, engine.vocab, ctx).tolist()
    if ctx > engine.max_step_tokens:
        raise ValueError(f"a {ctx}-token prompt exceeds one step of {engine.max_step_tokens} tokens")
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        engine.step([(0, 0, prompt)])
        if i:
            times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    log(f"prefill native fused, {ctx} tokens: TTFT {ms:.2f} ms")
    return {"variant": "native backend (fused), adafuse_step", "ctx": ctx, "ttft_ms": ms}


def transformers_ttft(ckpt: Checkpoint, ctx: int, repeats: int = 5) -> dict:
    """transformers' Llama of the same shape (random bf16 weights, SDPA attention): a forward of the prompt with its
    KV cache, the last position's logits on the host."""
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in ckpt.hf_config.items() if k != "model_type"})
    setattr(cfg, "_attn_implementation", "sdpa")  # what the model reads; recorded below as it ran
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).bfloat16().eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda")
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(prompt, use_cache=True, logits_to_keep=1)
            out.logits[0, -1].float().cpu()
            if i >= 2:
                times.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(times)
    attn = getattr(model.config, "_attn_implementation", "?")
    del model, out
    torch.cuda.empty_cache()
    log(f"prefill transformers ({attn}), {ctx} tokens: TTFT {ms:.2f} ms")
    return {"variant": f"transformers {transformers.__version__} LlamaForCausalLM ({attn})", "ctx": ctx, "ttft_ms": ms}


# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--quick", action="store_true", help="8 layers of the 7B width, batches 1 and 8, the example kinds only")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the 7B shape [32; --quick 8]")
    ap.add_argument("--batches", default=None, help="decode batches (fused) [1,8,32,64; --quick 1,8]")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--no-transformers", action="store_true", help="skip transformers' prefill")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense base's decode rows (a second artifact)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8-weight decode rows (a third artifact)")
    ap.add_argument("--no-agreement", action="store_true",
                    help="skip the FP8 artifact's greedy agreement with the bf16 one on held prompts")
    ap.add_argument("--no-r64", action="store_true", help=f"skip the rank-{WIDE_RANK} batch-8 row (another artifact)")
    ap.add_argument("--work", type=Path, default=None, help="where the artifacts are written [a temporary directory]")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers = args.layers or (8 if args.quick else 32)
    batches = [int(b) for b in (args.batches or ("1,8" if args.quick else "1,8,32,64")).split(",") if b]
    try:
        lib = load_library()
    except AdafuseError as e:
        sys.exit(f"error: {e}")
    results: dict = {"device": torch.cuda.get_device_name(), "runtime": lib.adafuse_version().decode(),
                     "torch": torch.__version__, "shape": f"llama-2-7b width, {layers} layers, bfloat16",
                     "adapter": {"experts": EXPERTS, "top_k": TOP_K, "rank": RANK, "routing": "pregate (routing table)"},
                     "native_gemm": os.environ.get("ADAFUSE_NATIVE_GEMM") or "auto",
                     "ctx": args.ctx, "steps": args.steps, "correctness": [], "decode": [], "host_overhead": [],
                     "prefill": []}
    path = args.out / "native_backend.json"

    def save():  # after each stage: a later one that runs out of time keeps the earlier rows
        path.write_text(json.dumps(results, indent=2))
    work = Path(tempfile.mkdtemp(prefix="adafuse-bench-", dir=args.work))
    try:
        t = time.time()
        results["correctness"] = check_correctness(work / "tiny", args.quick)
        log(f"correctness: {sum(r['passed'] for r in results['correctness'])}/{len(results['correctness'])} "
            f"in {time.time() - t:.0f} s")
        save()
        ckpt = synthetic_checkpoint(layers)
        fused, switch = write_artifacts(ckpt, work, max(batches), args.ctx + args.steps + 16)
        reference = bench_decode(fused, switch, ckpt, batches, args.ctx, args.steps, results,
                                 greedy_reference=not (args.no_fp8 or args.no_agreement))
        save()
        shutil.rmtree(work / "fused.native")
        shutil.rmtree(work / "switch.native")
        if not args.no_fp8:
            bench_fp8(ckpt, work, batches, args.ctx, args.steps, results, reference)
            save()
        if not args.no_r64:
            bench_wide_rank(layers, work, args.ctx, args.steps, results)
            save()
        if not args.no_dense:
            bench_dense(ckpt, work, batches, args.ctx, args.steps, results)
            save()
        if not args.no_transformers:
            try:
                results["prefill"].append(transformers_ttft(ckpt, args.ctx))
            except Exception as e:  # reported, not hidden
                results["prefill_error"] = f"transformers: {type(e).__name__}: {e}"
                log(f"transformers prefill failed: {type(e).__name__}: {e}")
        save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log("\n| strategy | batch | ctx | routes | ms/step | tokens/s | x floor | x bytes floor | x dense |")
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["decode"]:
        dense = f"{r['x_dense']:.2f}" if "x_dense" in r else "-"
        by_bytes = f"{r['ms_per_step'] / r['bytes_floor_ms']:.2f}" if "bytes_floor_ms" in r else "-"
        log(f"| {r['strategy']} | {r['batch']} | {r['ctx']} | {r['routes']} | {r['ms_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r['x_floor']:.2f} | {by_bytes} | {dense} |")
    for h in results["host_overhead"]:
        if "error" not in h:
            log(f"host overhead ({h['strategy']}, batch 1): {h['host_overhead_ms']:.3f} ms of {h['wall_ms']:.3f} ms")
    for p in results["prefill"]:
        log(f"TTFT {p['ctx']} tokens, {p['variant']}: {p['ttft_ms']:.2f} ms")
    ok = all(r["passed"] for r in results["correctness"])
    log("correctness against the CPU reference: " + ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
